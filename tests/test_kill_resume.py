"""kill -9 at chosen points of a run, then the same call again: the result is the uninterrupted
one, and nothing stray is left (issue 13).

A subprocess runs ``predict_slide`` with the disc oracle (no torch: it starts in about a second)
and SIGKILLs itself where ``CELLSEG_TEST_KILL_AT`` says (cellseg/journal.py ``_test_hook``):
after a region is committed, once every output is staged, between the renames of the outputs,
after the last rename, and while the work folder is being removed. Also: helper processes die
with a killed parent, and Ctrl-C / SIGTERM give one line and exit 130.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from oracle import DiscOracle, disc_image, seam_centres
from slides import make_pyramid_tiff

from cellseg.journal import TEST_KILL_ENV
from cellseg.predict import PredictOptions, SlideOutputs, predict_slide
from cellseg.store import pyramid_shapes

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FAST = {"region_px": 384, "chunk_px": 256, "workers": 0, "label_workers": 0, "batch_size": 7}
NAMES = {"geojson": "n.geojson", "zarr": "n.zarr", "overlay": "o.png", "summary": "s.json"}

SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing, os, sys, time
    from pathlib import Path
    from oracle import DiscOracle
    from cellseg.predict import PredictOptions, SlideOutputs, predict_slide

    slide, out, options = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    kill_points = json.loads(sys.argv[4])
    names = {"geojson": "n.geojson", "zarr": "n.zarr", "overlay": "o.png", "summary": "s.json"}
    pids_file = options.pop("pids_file", None)

    def on_region(done, total):
        if pids_file and done == 1:  # report the helper processes, then wait to be killed
            pids = [p.pid for p in multiprocessing.active_children()]
            Path(pids_file).write_text(json.dumps(pids))
            time.sleep(120)

    def run(folder):
        outputs = SlideOutputs(**{k: folder / v for k, v in names.items()})
        predict_slide(slide, DiscOracle(), outputs, PredictOptions(**options), on_region=on_region)

    if not kill_points:
        run(out)
        sys.exit(0)
    # One forked child per kill point: the imports above are paid once (zarr is first used in
    # the children, so no thread of it is lost in the fork).
    status = {}
    for point in kill_points:
        pid = os.fork()
        if pid == 0:
            os.environ["CELLSEG_TEST_KILL_AT"] = point
            run(out / point.replace(":", "_"))
            os._exit(0)
        status[point] = os.waitpid(pid, 0)[1]
    print(json.dumps({p: os.WTERMSIG(s) if os.WIFSIGNALED(s) else -1 for p, s in status.items()}))
    """
)


def outputs_in(folder: Path) -> SlideOutputs:
    return SlideOutputs(**{k: folder / v for k, v in NAMES.items()})


def run_script(slide: Path, out: Path, kill_points: list[str] | None = None, **options):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    env.pop(TEST_KILL_ENV, None)
    args = [sys.executable, "-c", SCRIPT, str(slide), str(out), json.dumps({**FAST, **options})]
    args.append(json.dumps(kill_points or []))
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    image, _ = disc_image(450, 800, seam_centres(450, 800, [192, 384, 576, 768]))
    return make_pyramid_tiff(tmp_path_factory.mktemp("kill") / "seam.svs", image, 0.5, levels=1)


@pytest.fixture(scope="module")
def reference(slide, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    predict_slide(slide, DiscOracle(), outputs_in(out), PredictOptions(**FAST))
    return out


def features(path: Path) -> dict:
    collection = json.loads(path.read_text())
    return {
        f["properties"]["measurements"]["Label"]: (f["geometry"], f["properties"]["measurements"])
        for f in collection["features"]
    }


def assert_complete_and_equal(reference: Path, out: Path) -> None:
    assert features(out / "n.geojson") == features(reference / "n.geojson")
    group = zarr.open_group(str(out / "n.zarr"), mode="r")
    assert group.attrs["complete"] is True
    levels = [str(level) for level in range(len(pyramid_shapes(group["0"].shape)))]
    # Exactly its arrays: the pyramids, no stray working array (rgb, interior_probability).
    assert sorted(p.name for p in (out / "n.zarr").iterdir()) == sorted(
        [".zattrs", ".zgroup", "labels", *levels]
    )
    labels_dir = out / "n.zarr" / "labels" / "nuclei"
    assert sorted(p.name for p in labels_dir.iterdir()) == sorted([".zattrs", ".zgroup", *levels])
    expected = zarr.open_group(str(reference / "n.zarr"), mode="r")
    assert dict(group.attrs)["multiscales"] == dict(expected.attrs)["multiscales"]
    for level in levels:
        for name in (level, f"labels/nuclei/{level}"):
            np.testing.assert_array_equal(group[name][:], expected[name][:])
    summary = json.loads((out / "s.json").read_text())
    assert summary["nuclei"] == json.loads((reference / "s.json").read_text())["nuclei"]
    assert (out / "o.png").stat().st_size > 0


# Kill points in the order a run reaches them (zarr-finishing: working arrays deleted, image
# pyramid built, label pyramid not yet); outputs are renamed geojson, overlay, summary,
# zarr, then the provenance.
KILL_POINTS = [
    "region:2",
    "zarr-finishing",
    "staged",
    "published:n.geojson",
    "published:n.zarr",
    "published:n.geojson.cellseg-provenance.json",
    "journal-removed",
]
# The default suite kills mid-run, between two renames and during the clean-up; -m slow adds
# the others.
DEFAULT_POINTS = ("region:2", "zarr-finishing", "published:n.geojson", "journal-removed")


@pytest.fixture(scope="module")
def killed(request, slide, tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """Runs killed at the selected points: ``(folder of their outputs, point -> signal)``."""
    selected = {
        item.callspec.params["kill_at"]
        for item in request.session.items
        if hasattr(item, "callspec") and "kill_at" in item.callspec.params
    }
    out = tmp_path_factory.mktemp("killed")
    process = run_script(slide, out, [p for p in KILL_POINTS if p in selected])
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return out, json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "kill_at",
    [p if p in DEFAULT_POINTS else pytest.param(p, marks=pytest.mark.slow) for p in KILL_POINTS],
)
def test_kill_9_then_rerun_gives_the_uninterrupted_result(killed, slide, reference, kill_at):
    folder, signals = killed
    assert signals[kill_at] == signal.SIGKILL  # the run really died at that point
    out = folder / kill_at.replace(":", "_")
    for name in NAMES.values():  # whatever carries a final name is complete
        if name == "n.geojson" and (out / name).exists():
            json.loads((out / name).read_text())
        if name == "n.zarr" and (out / name).exists():
            assert zarr.open_group(str(out / name), mode="r").attrs["complete"] is True
    oracle = DiscOracle()
    summary = predict_slide(slide, oracle, outputs_in(out), PredictOptions(**FAST))
    if kill_at.startswith("published") or kill_at == "journal-removed":
        assert oracle.calls == 0  # finished by renaming (or skipped): nothing recomputed
    if kill_at == "journal-removed":
        assert summary["skipped"] is True
    assert_complete_and_equal(reference, out)
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted([*NAMES.values(), "n.geojson.cellseg-provenance.json"])


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has ended; only its exit status waits to be read


@pytest.mark.slow  # about 10 s: spawning the helpers dominates
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to inspect processes")
def test_helper_processes_end_with_a_killed_parent(slide, tmp_path):
    pids_file = tmp_path / "pids.json"
    process = run_script(
        slide, tmp_path / "out", workers=1, label_workers=1, pids_file=str(pids_file)
    )
    try:
        deadline = time.monotonic() + 60
        while not pids_file.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)  # the file is written in one call; let it land
        pids = json.loads(pids_file.read_text())
        assert len(pids) >= 2  # a reader and a labelling process
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(pid) for pid in pids)
    finally:
        if process.poll() is None:
            process.kill()


def test_workers_ignore_ctrl_c():
    from cellseg.workers import start_pool

    pool = start_pool(1)
    try:
        assert pool.submit(signal.getsignal, signal.SIGINT).result(timeout=60) == signal.SIG_IGN
    finally:
        pool.shutdown()


def test_ctrl_c_prints_one_line_and_exits_130(slide, tmp_path, monkeypatch):
    import cellseg.cli.predict as cli_predict
    from cellseg.cli.main import cellseg

    from cellseg import predict

    class Interrupted(DiscOracle):
        def __call__(self, tiles):
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_predict, "_load_predictor", lambda *a, **k: Interrupted())
    monkeypatch.setattr(predict, "default_workers", lambda: 0)
    monkeypatch.setattr(predict, "default_label_workers", lambda: 0)
    result = CliRunner().invoke(cellseg, ["predict", str(slide), "--out", str(tmp_path / "n.json")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 130 and len(lines) == 1
    assert "interrupted; the same command resumes it" in lines[0]
    assert not (tmp_path / "n.json").exists()


def test_sigterm_is_handled_like_ctrl_c():
    code = textwrap.dedent(
        """
        import os, signal, time, click
        from cellseg.cli.common import user_errors

        @click.command()
        @user_errors
        def main():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

        main()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 130
    assert done.stderr.strip() == "error: interrupted"
