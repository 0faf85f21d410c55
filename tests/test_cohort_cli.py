"""``cellseg predict`` over cohorts: --slides lists, --shard I/N and --scheduler (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cellseg.cli.main import cellseg
from click.testing import CliRunner
from oracle import disc_image, use_oracle_in_cli
from slides import make_pyramid_tiff

from cellseg.batch import read_cohort


def run(*args: str):
    return CliRunner().invoke(cellseg, ["predict", *map(str, args)])


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def done(out: Path) -> set[str]:
    """Stems of the slides whose outputs are complete in ``out`` (their provenance, renamed
    last, is there)."""
    suffix = ".geojson.cellseg-provenance.json"
    return {p.name.removesuffix(suffix) for p in out.glob(f"*{suffix}")}


def statuses(out: Path) -> dict[str, str]:
    """``cohort.csv`` as {slide file name: status}."""
    return {Path(row["slide"]).name: row["status"] for row in read_cohort(out / "cohort.csv")}


@pytest.fixture
def oracle(monkeypatch):
    use_oracle_in_cli(monkeypatch)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """``cohort/`` with four small disc slides and ``broken.svs``, plus ``list.txt``."""
    folder = tmp_path_factory.mktemp("cohort")
    for i in range(4):
        centres = [(y, x) for y in range(30, 200, 45) for x in range(30 + 7 * i, 280, 45)]
        image, _ = disc_image(224, 300, centres)
        make_pyramid_tiff(folder / f"s{i}.svs", image, 0.5, levels=1)
    (folder / "broken.svs").write_bytes(b"\x00not a slide" * 100)
    (folder / "list.txt").write_text("# the cohort\ns0.svs\ns1.svs\nbroken.svs\ns2.svs\ns3.svs\n")
    return folder


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    from cellseg.checkpoint import save_bundle
    from cellseg.model import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig.tiny()
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    meta = {"name": "tiny-random", "mpp": 0.5, "tile_px": 224, "postprocess": {}}
    save_bundle(path, build_model(config), config, meta)
    return path


def test_shards_of_a_slide_list_are_disjoint_and_cover_it(oracle, cohort, tmp_path):
    out = tmp_path / "results"
    results = [
        run("--slides", cohort / "list.txt", "--out-dir", out / str(i), "--shard", f"{i}/2")
        for i in range(2)
    ]
    shares = [done(out / str(i)) for i in range(2)]
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == {"s0", "s1", "s2", "s3"}
    failed = [i for i, result in enumerate(results) if result.exit_code != 0]
    assert len(failed) == 1 and results[failed[0]].exit_code == 1  # the shard with broken.svs
    assert "broken.svs" in errors(results[failed[0]])[0]
    assert statuses(out / str(failed[0]))["broken.svs"] == "failed"
    assert all("of 5 slides" in result.stderr for result in results)
    rows = [set(statuses(out / str(i))) for i in range(2)]
    assert not rows[0] & rows[1] and len(rows[0] | rows[1]) == 5


def test_quoted_globs_and_lists_merge_without_running_a_slide_twice(oracle, cohort, tmp_path):
    result = run(cohort / "s*.svs", "--slides", cohort / "list.txt", "--out-dir", tmp_path)
    assert result.exit_code == 1 and len(errors(result)) == 1
    assert result.output.count(" nuclei, ") == 4 and "1 of 5 slides failed: " in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shard", "2/2", "a.svs"], "0 <= I < N"),
        (["--shard", "x", "a.svs"], "is not I/N"),
        (["--out-dir", "r"], "give SLIDES or --slides"),
    ],
)
def test_cohort_usage_errors(args, message):
    result = run(*args)
    assert result.exit_code == 2 and message in result.stderr


def test_a_list_without_a_path_column_is_one_line(tmp_path):
    listing = tmp_path / "cohort.csv"
    listing.write_text("patient,file\np1,a.svs\n")
    result = run("--slides", listing, "--out-dir", tmp_path / "r")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == errors(result) and "'path'" in result.stderr


def test_without_dask_the_scheduler_option_says_what_to_install(monkeypatch, cohort, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    result = run(cohort / "s0.svs", "--out-dir", tmp_path / "r", "--scheduler", "local")
    assert result.exit_code == 1 and errors(result) == result.stderr.strip().splitlines()
    assert "pip install causal-cellseg[distributed]" in result.stderr
    assert not (tmp_path / "r").exists()


def test_an_unreachable_scheduler_is_one_line_and_writes_nothing(
    monkeypatch, cohort, tiny_checkpoint, tmp_path
):
    pytest.importorskip("distributed")
    from cellseg import scheduling

    monkeypatch.setattr(scheduling, "CONNECT_TIMEOUT_S", 0.5)
    out = tmp_path / "r"
    args = [cohort / "s0.svs", "--model", tiny_checkpoint, "--out-dir", out]
    result = run(*args, "--scheduler", "tcp://127.0.0.1:9")
    assert result.exit_code == 1
    assert errors(result) == result.stderr.strip().splitlines()
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.stderr
    assert done(out) == set()


@pytest.fixture
def scheduler_address():
    """A Dask scheduler with two in-process (thread) workers: the client, task pickling and
    result path of ``--scheduler ADDRESS`` without the seconds that worker processes take to
    start and import torch (the test below with ``--scheduler local`` has real processes)."""
    distributed = pytest.importorskip("distributed")
    import torch

    threads = torch.get_num_threads()  # the workers set torch's (process-wide) thread count
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address
    torch.set_num_threads(threads)


def check_cohort_run(result, out: Path) -> None:
    """Three slides, ``broken.svs`` among them: two outputs once, one failure recorded in
    cohort.csv and named at the end, exit 1."""
    assert result.exit_code == 1, result.output
    assert len(errors(result)) == 1 and "broken.svs" in errors(result)[0]
    assert "1 of 3 slides failed: " in result.stderr and "broken.svs; recorded in" in result.stderr
    assert done(out) == {"s0", "s1"}
    assert statuses(out) == {"s0.svs": "done", "s1.svs": "done", "broken.svs": "failed"}
    workers = {row["worker"] for row in read_cohort(out / "cohort.csv") if row["status"] == "done"}
    assert all(w.startswith(("tcp://", "inproc://")) for w in workers), workers
    for stem in ("s0", "s1"):
        summary = json.loads((out / f"{stem}.json").read_text())
        features = json.loads((out / f"{stem}.geojson").read_text())["features"]
        assert summary["nuclei"] == len(features)
        assert summary["model"]["name"] == "tiny-random"
        assert result.output.count(f"{stem}.svs: {summary['nuclei']} nuclei") == 1
    leftovers = [*out.glob("*.partial"), *out.glob("*.cellseg-work"), *out.glob("*.cellseg-lock")]
    assert not leftovers


def test_a_scheduler_address_runs_the_good_slides_and_reports_the_broken_one(
    cohort, tiny_checkpoint, tmp_path, scheduler_address
):
    out = tmp_path / "results"
    slides = [cohort / "s0.svs", cohort / "broken.svs", cohort / "s1.svs"]
    common = ["--model", tiny_checkpoint, "--device", "cpu", "--out-dir", out, "--batch-size", "4"]
    threads = ["--workers", "0", "--label-workers", "0"]  # in-process workers: no reader processes
    result = run(*slides, *common, *threads, "--scheduler", scheduler_address)
    check_cohort_run(result, out)


@pytest.mark.slow  # ~10-25 s: worker processes start and import torch
def test_a_local_cluster_runs_the_good_slides_and_reports_the_broken_one(
    cohort, tiny_checkpoint, tmp_path
):
    pytest.importorskip("distributed")
    out = tmp_path / "results"
    slides = [cohort / "s0.svs", cohort / "broken.svs", cohort / "s1.svs"]
    common = ["--model", tiny_checkpoint, "--device", "cpu", "--out-dir", out, "--batch-size", "4"]
    result = run(*slides, *common, "--scheduler", "local")
    check_cohort_run(result, out)
    summary = json.loads((out / "s0.json").read_text())
    assert summary["tiling"]["workers"] == 0  # daemonic Dask workers read in a thread


def test_cuda_on_workers_without_the_gpu_resource_is_one_line(
    cohort, tiny_checkpoint, tmp_path, scheduler_address
):
    out = tmp_path / "results"
    args = [cohort / "s0.svs", "--model", tiny_checkpoint, "--out-dir", out, "--device", "cuda"]
    result = run(*args, "--scheduler", scheduler_address)
    assert result.exit_code == 1 and errors(result) == result.stderr.strip().splitlines()
    assert "offers the GPU resource" in result.stderr and "--resources GPU=1" in result.stderr
    assert done(out) == set()


def test_a_worker_that_dies_on_a_slide_is_a_failed_row_and_the_others_go_on(
    oracle, cohort, tmp_path, monkeypatch
):
    from cellseg import scheduling

    real = scheduling.run_tasks
    killed_worker = type("KilledWorker", (Exception,), {})  # distributed's, by name

    def one_worker_dies(task, items, scheduler=None, **kwargs):
        for item, outcome in real(task, items, None):
            if Path(item).name == "s1.svs":  # what run_tasks yields for Dask's KilledWorker
                outcome = scheduling._readable(item, killed_worker("s1 on tcp://w1"))
            yield item, outcome

    monkeypatch.setattr(scheduling, "run_tasks", one_worker_dies)
    out = tmp_path / "results"
    result = run(cohort / "s0.svs", cohort / "s1.svs", cohort / "s2.svs", "--out-dir", out)
    assert result.exit_code == 1 and len(errors(result)) == 1
    assert "s1.svs: the Dask worker running it died" in errors(result)[0]
    assert statuses(out) == {"s0.svs": "done", "s1.svs": "failed", "s2.svs": "done"}
    assert "1 of 3 slides failed: " in result.stderr


def test_warnings_of_slides_run_on_workers_are_printed_by_the_client(
    tiny_checkpoint, tmp_path, scheduler_address, monkeypatch
):
    import numpy as np

    make_pyramid_tiff(tmp_path / "blank.svs", np.full((224, 300, 3), 255, np.uint8), 0.5)
    monkeypatch.chdir(tmp_path)
    common = ["--model", tiny_checkpoint, "--device", "cpu", "--out-dir", "results"]
    result = run("blank.svs", *common, "--workers", "0", "--scheduler", scheduler_address)
    assert result.exit_code == 0, result.output
    # The client's line names the slide as given (these in-process workers also log their own,
    # with the absolute path; real worker processes log to their own log).
    lines = result.stderr.splitlines()
    assert sum(line.startswith("warning: blank.svs: no tissue found") for line in lines) == 1
