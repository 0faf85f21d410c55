"""Slide lists, shards and the task executors of ``cellseg.scheduling`` (issue 12, item 1)."""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

import pytest

from cellseg.errors import CellsegError
from cellseg.scheduling import (
    INSTALL_HINT,
    LocalLayout,
    expand_slides,
    local_layout,
    parse_shard,
    read_slide_list,
    run_tasks,
    shard_slides,
)


def touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


# ----------------------------------------------------------------------------------- slide lists


def test_a_text_list_skips_comments_and_resolves_relative_paths(tmp_path):
    listing = tmp_path / "lists" / "cohort.txt"
    listing.parent.mkdir()
    listing.write_text("# cohort A\n\na.svs\n  sub/b.svs  \n/abs/c.svs\n# done\n")
    assert read_slide_list(listing) == [
        listing.parent / "a.svs",
        listing.parent / "sub" / "b.svs",
        Path("/abs/c.svs"),
    ]


@pytest.mark.parametrize("column", ["path", "slide", "Path"])
def test_a_csv_list_reads_its_path_column(tmp_path, column):
    listing = tmp_path / "cohort.csv"
    rows = [f"patient,{column},grade", "p1,a.svs,2", "p2,,3", 'p3,"x, y.svs",1']
    listing.write_text("\ufeff" + "\n".join(rows) + "\n")  # with a spreadsheet's BOM
    assert read_slide_list(listing) == [tmp_path / "a.svs", tmp_path / "x, y.svs"]


def test_a_csv_without_a_path_column_is_one_clear_error(tmp_path):
    listing = tmp_path / "cohort.csv"
    listing.write_text("patient,file\np1,a.svs\n")
    with pytest.raises(CellsegError) as info:
        read_slide_list(listing)
    message = str(info.value)
    assert "cohort.csv" in message and "'path'" in message and "patient, file" in message
    assert "\n" not in message


def test_an_unreadable_list_is_a_cellseg_error(tmp_path):
    with pytest.raises(CellsegError, match=r"missing\.txt"):
        read_slide_list(tmp_path / "missing.txt")


def test_globs_are_expanded_recursively_and_sorted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    touch(Path("c/b.svs"), Path("c/a.svs"), Path("c/deep/er/d.svs"), Path("c/notes.txt"))
    Path("c/folder.svs").mkdir()  # e.g. a MIRAX data folder: not a slide
    assert expand_slides(["c/*.svs"]) == [Path("c/a.svs"), Path("c/b.svs")]
    assert expand_slides(["c/**/*.svs"]) == [
        Path("c/a.svs"),
        Path("c/b.svs"),
        Path("c/deep/er/d.svs"),
    ]


def test_existing_names_with_glob_characters_and_missing_files_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    touch(Path("[1].svs"), Path("1.svs"))
    assert expand_slides(["[1].svs"]) == [Path("[1].svs")]  # the file, not the pattern's 1.svs
    assert expand_slides(["gone.svs", "none*.svs"]) == [Path("gone.svs"), Path("none*.svs")]


def test_arguments_and_lists_merge_without_duplicates_in_a_stable_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    touch(Path("a.svs"), Path("b.svs"), Path("c.svs"))
    Path("list.txt").write_text("c.svs\n./a.svs\nmissing.svs\nb.svs\n")
    slides = expand_slides(["b.svs", str(tmp_path / "b.svs"), "a.svs"], "list.txt")
    assert slides == [Path("b.svs"), Path("a.svs"), Path("c.svs"), Path("missing.svs")]


# -------------------------------------------------------------------------------------- shards


@pytest.mark.parametrize("text, expected", [("0/1", (0, 1)), ("3/4", (3, 4)), (" 1 / 2 ", (1, 2))])
def test_shards_parse(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["2/2", "-1/2", "0/0", "1", "a/b", "1/2/3", ""])
def test_bad_shards_are_rejected(text):
    with pytest.raises(ValueError):
        parse_shard(text)


@pytest.mark.parametrize("n_slides", [0, 1, 5, 12, 31])
def test_shards_are_disjoint_balanced_cover_the_list_and_ignore_its_order(n_slides):
    slides = [Path(f"cohort/s{i:03d}.svs") for i in range(n_slides)]
    shuffled = random.Random(n_slides).sample(slides, len(slides))
    for count in range(1, 8):
        shares = [shard_slides(slides, index, count) for index in range(count)]
        seen = [p for share in shares for p in share]
        assert sorted(seen) == slides  # every slide once: disjoint and covering
        sizes = [len(share) for share in shares]
        assert max(sizes) - min(sizes) <= 1
        for index, share in enumerate(shares):
            other_order = shard_slides(shuffled, index, count)
            assert sorted(other_order) == sorted(share)
            assert other_order == [p for p in shuffled if p in share]  # order kept


# ---------------------------------------------------------------------------------- executors


def halve_even(x: int) -> int:
    """A task for the executors: fails for odd numbers."""
    if x % 2:
        raise ValueError(f"{x} is odd")
    return x // 2


def test_serial_runs_yield_results_and_exceptions_in_order():
    outcomes = list(run_tasks(halve_even, [4, 3, 8]))
    assert [item for item, _ in outcomes] == [4, 3, 8]
    assert outcomes[0][1] == 2 and outcomes[2][1] == 4
    assert isinstance(outcomes[1][1], ValueError) and "3 is odd" in str(outcomes[1][1])


def test_the_local_layout_shares_cores_or_gpus():
    assert local_layout(10, cores=16) == LocalLayout(4, 4, gpu=False, daemon=True)
    assert local_layout(1, cores=16) == LocalLayout(1, 16)  # never more workers than slides
    assert local_layout(10, cores=2) == LocalLayout(1, 2)
    gpu = local_layout(10, gpus=2, cores=16)
    assert (gpu.n_workers, gpu.torch_threads, gpu.resources) == (2, 8, {"GPU": 1})
    assert not gpu.daemon  # its reader processes feed the GPU


def test_a_missing_dask_install_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(CellsegError, match=r"causal-cellseg\[distributed\]") as info:
        list(run_tasks(halve_even, [2], "local"))
    assert INSTALL_HINT in str(info.value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_scheduler_is_one_line(monkeypatch):
    pytest.importorskip("distributed")
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(CellsegError) as info:
        list(run_tasks(halve_even, [2], address, connect_timeout_s=0.5))
    message = str(info.value)
    assert message.startswith(f"cannot reach the Dask scheduler at {address} within 0.5 s")
    assert "\n" not in message


@pytest.mark.slow  # ~6-10 s: two worker processes start; the run_slide job's pickling is
# checked in test_reliability, the client path on in-process workers in test_cohort_cli
def test_a_local_cluster_of_two_workers_runs_every_task_once():
    pytest.importorskip("distributed")
    import cloudpickle

    # The workers cannot import this test module by name: ship its functions by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    small_cluster = LocalLayout(n_workers=2, torch_threads=1, memory_limit="512MiB")
    try:
        items = list(range(7))
        outcomes = dict(
            run_tasks(halve_even, items, "local", layout=small_cluster, workers_timeout_s=30)
        )
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert sorted(outcomes) == items
    for x, outcome in outcomes.items():
        if x % 2:
            assert isinstance(outcome, ValueError) and f"{x} is odd" in str(outcome)
        else:
            assert outcome == x // 2


def double(x: int) -> int:
    return 2 * x


def test_two_runs_at_once_on_one_scheduler_get_their_own_results():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        first = run_tasks(halve_even, [4, 8], cluster.scheduler_address)
        next(first)  # submitted, and its futures held while the second run goes
        second = dict(run_tasks(double, [4, 8], cluster.scheduler_address))
        first.close()
    assert second == {4: 8, 8: 16}


# ------------------------------------------------- the per-slide task on a worker (cellseg.batch)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    from cellseg.checkpoint import save_bundle
    from cellseg.model import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig.tiny()
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_bundle(path, build_model(config), config, {"name": "tiny", "mpp": 0.5, "tile_px": 224})
    return path


def test_the_model_is_loaded_once_per_key_and_checked_against_the_clients_copy(tiny_model):
    from cellseg.batch import cached_predictor
    from cellseg.checkpoint import file_sha256

    sha = file_sha256(tiny_model)
    first = cached_predictor(tiny_model, "cpu", False, sha)
    assert cached_predictor(tiny_model, "cpu", False, sha) is first
    assert cached_predictor(tiny_model, "cpu", True, sha) is not first  # TTA: another key
    bf16 = cached_predictor(tiny_model, "cpu", False, sha, "bf16")  # precision: another key
    assert bf16 is not first and bf16.precision == "bf16"
    tiny_model.touch()  # replaced while a worker lives: loaded again, and checked again
    with pytest.raises(CellsegError, match="differs from the client's"):
        cached_predictor(tiny_model, "cpu", False, "0" * 64)


def test_a_job_gives_each_slide_its_outputs_and_absolute_paths_for_workers(tmp_path, monkeypatch):
    from cellseg.batch import SlideJob
    from cellseg.predict import SlideOutputs

    monkeypatch.chdir(tmp_path)
    job = SlideJob(SlideOutputs(summary=Path("s.json")), out_dir=Path("res"), overlays=True)
    outputs = job.outputs_for(Path("in/a.svs"))
    assert outputs == SlideOutputs(
        Path("res/a.geojson"), Path("res/a.zarr"), Path("res/a.png"), Path("s.json")
    )
    far = job.absolute()
    assert far.out_dir == tmp_path / "res" and far.outputs.summary == tmp_path / "s.json"
    assert far.outputs_for(Path("b.svs")).geojson == tmp_path / "res" / "b.geojson"


def test_a_daemonic_worker_reads_and_labels_in_threads(monkeypatch):
    import multiprocessing

    from cellseg import batch

    options = batch.PredictOptions(workers=3, label_workers=2)
    assert batch._process_options(options) is options
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True, raising=False)
    threaded = batch._process_options(options)
    assert (threaded.workers, threaded.label_workers) == (0, 0)
