"""``cellseg predict`` through click's CliRunner: usage, batches with bad slides, skipping, e2e."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from cellseg.cli.main import cellseg
from click.testing import CliRunner
from oracle import disc_image, use_oracle_in_cli
from slides import make_pyramid_tiff

from cellseg.batch import read_cohort

REPO = Path(__file__).resolve().parents[1]


def run(*args: str):
    return CliRunner().invoke(cellseg, ["predict", *map(str, args)])


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture
def oracle(monkeypatch):
    """The command with the disc oracle instead of a checkpoint, reading in-process."""
    use_oracle_in_cli(monkeypatch)


@pytest.fixture(scope="module")
def good_slides(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("good")
    paths = []
    for i in range(2):
        centres = [(y, x) for y in range(40, 260, 50) for x in range(40 + 10 * i, 420, 50)]
        image, _ = disc_image(300, 450, centres)
        paths.append(make_pyramid_tiff(folder / f"good{i}.svs", image, 0.5, levels=1))
    return paths


@pytest.fixture(scope="module")
def garbage_slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "garbage.svs"
    path.write_bytes(b"\x00not a slide" * 200)
    return path


def test_help_shows_the_options_and_an_example():
    result = run("--help")
    assert result.exit_code == 0
    for text in ("--out-dir", "--zarr", "--overlay", "--roi", "--object-type", "Examples:"):
        assert text in result.output


def test_the_command_module_does_not_import_torch():
    code = "import sys, cellseg.cli.predict; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["a.svs", "b.svs", "--out", "x.geojson"], "--out need a single slide"),
        (["a.svs", "b.svs"], "several slides need --out-dir"),
        (["a.svs"], "nothing to write"),
        (["a.svs", "--out", "x.txt"], "--out x.txt: expected a file ending in .geojson"),
        (["a.svs", "--overlay", "x.gif"], "expected a file ending in .png"),
        (["a.svs", "--out", "x.geojson", "--cell-expansion-um", "5"], "needs --object-type cell"),
        (["a.svs", "--out", "x.geojson", "--block-px", "100"], "'--block-px': 100 is not in"),
        (["a.svs", "--out", "x.geojson", "--grid-offset-px", "3"], "not two integers X,Y"),
    ],
)
def test_usage_errors_are_one_line(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert stderr_lines(result) == [f"error: {stderr_lines(result)[0][7:]}"]
    assert message in result.stderr


def test_missing_default_model_asks_for_model(monkeypatch, tmp_path, good_slides):
    from cellseg import checkpoint

    monkeypatch.setattr(checkpoint, "default_model_path", lambda: tmp_path / "none.safetensors")
    result = run(good_slides[0], "--out", tmp_path / "n.geojson")
    assert result.exit_code == 1 and "--model" in result.stderr
    assert len(stderr_lines(result)) == 1 and not (tmp_path / "n.geojson").exists()


def test_a_broken_slide_gives_one_line_and_no_file(oracle, tmp_path, garbage_slide):
    result = run(garbage_slide, "--out", tmp_path / "n.geojson", "--zarr", tmp_path / "n.zarr")
    assert result.exit_code == 1
    assert stderr_lines(result) == [stderr_lines(result)[0]]
    assert stderr_lines(result)[0].startswith("error: ") and "garbage.svs" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_batch_goes_on_past_bad_slides_and_fails_at_the_end(
    oracle, tmp_path, good_slides, garbage_slide, slide_without_mpp
):
    out = tmp_path / "results"
    slides = [good_slides[0], garbage_slide, slide_without_mpp, good_slides[1]]
    result = run(*slides, "--out-dir", out)
    assert result.exit_code == 1
    errors = [line for line in stderr_lines(result) if line.startswith("error: ")]
    assert len(errors) == 2 and "garbage.svs" in errors[0] and "no_mpp.svs" in errors[1]
    last = stderr_lines(result)[-1]
    assert last.startswith("2 of 4 slides failed: ") and "garbage.svs" in last
    assert "no_mpp.svs" in last and "cohort.csv" in last
    names = sorted(p.name for p in out.iterdir())
    expected = [f"good{i}.{ext}" for i in (0, 1) for ext in ("geojson", "json", "zarr")]
    provenance = [f"good{i}.geojson.cellseg-provenance.json" for i in (0, 1)]
    assert names == sorted([*expected, *provenance, "cohort.csv"])
    rows = {Path(r["slide"]).name: r for r in read_cohort(out / "cohort.csv")}
    assert sorted(rows) == sorted(s.name for s in slides)
    garbage = rows["garbage.svs"]
    assert garbage["status"] == "failed" and "garbage.svs" in garbage["error"]
    assert rows["no_mpp.svs"]["status"] == "failed" and "mpp" in rows["no_mpp.svs"]["error"]
    for i in (0, 1):
        summary = json.loads((out / f"good{i}.json").read_text())
        collection = json.loads((out / f"good{i}.geojson").read_text())
        assert summary["nuclei"] == len(collection["features"]) > 20
        assert f"good{i}.svs: {summary['nuclei']} nuclei" in result.output

    for i in (0, 1):
        row = rows[f"good{i}.svs"]
        assert row["status"] == "done" and int(row["nuclei"]) > 20 and row["mpp"] == "0.5"
        assert float(row["nuclei_per_mm2"]) == pytest.approx(
            int(row["nuclei"]) / float(row["tissue_mm2"]), rel=1e-3
        )

    again = run(*slides[:1], slides[3], "--out-dir", out)
    assert again.exit_code == 0 and again.stderr.count("skipped, outputs of the same run") == 2
    rows = {Path(r["slide"]).name: r for r in read_cohort(out / "cohort.csv")}
    assert rows["good0.svs"]["status"] == "skipped" and rows["garbage.svs"]["status"] == "failed"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight ``ModelConfig.tiny()`` bundle at 0.5 µm/px (mechanics, not accuracy)."""
    torch = pytest.importorskip("torch")
    from cellseg.checkpoint import save_bundle
    from cellseg.model import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig.tiny()
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    meta = {"name": "tiny-random", "mpp": 0.5, "tile_px": 224, "postprocess": {}}
    save_bundle(path, build_model(config), config, meta)
    return path


def run_cmu(cmu_slide: Path, model: Path, out: Path, *extra: str):
    import torch

    torch.set_num_threads(1)
    paths = {
        "--out": "n.geojson.gz",
        "--zarr": "n.zarr",
        "--overlay": "o.png",
        "--summary": "s.json",
    }
    args = [x for option, name in paths.items() for x in (option, out / name)]
    return run(cmu_slide, "--model", model, "--device", "cpu", "--batch-size", "8", *args, *extra)


def check_cmu_outputs(out: Path, canvas_hw: tuple[int, int]) -> dict:
    import gzip

    summary = json.loads((out / "s.json").read_text())
    assert summary["mpp"] == 0.5 and summary["slide_mpp"] == pytest.approx(0.499)
    assert summary["mpp_source"] == "openslide.mpp-x" and summary["model"]["name"] == "tiny-random"
    group = zarr.open_group(str(out / "n.zarr"), mode="r")
    assert group["0"].shape == canvas_hw and group.attrs["complete"] is True
    collection = json.loads(gzip.decompress((out / "n.geojson.gz").read_bytes()))
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == summary["nuclei"] == group.attrs["nuclei"]
    assert np.asarray(group["labels/nuclei/0"][:]).max() == summary["nuclei"]
    assert group.attrs["multiscales"][0]["axes"][0]["unit"] == "micrometer"
    assert "multiscales" in group["labels/nuclei"].attrs and "rgb" not in group
    for feature in collection["features"]:  # the tiny random model's "nuclei" on real H&E
        m = feature["properties"]["measurements"]
        for stain in ("Hematoxylin", "Eosin"):
            low, mean, high = (m[f"Nucleus: {stain} OD {s}"] for s in ("min", "mean", "max"))
            assert low <= mean <= high and m[f"Nucleus: {stain} OD std dev"] >= 0
        assert m["Nucleus: Max caliper µm"] >= m["Nucleus: Min caliper µm"] > 0
    assert (out / "o.png").stat().st_size > 1000
    return summary


def test_end_to_end_on_a_region_of_the_cmu_slide(tmp_path, cmu_slide, tiny_checkpoint):
    result = run_cmu(
        cmu_slide, tiny_checkpoint, tmp_path, "--roi", "700,900,600,500", "--workers", "0"
    )
    assert result.exit_code == 0, result.output
    summary = check_cmu_outputs(tmp_path, (499, 599))  # 500 and 600 level-0 px at 0.499 µm/px
    # The ROI's tiles are the whole-slide grid's tiles (stride 160) that cover it and its 64 px
    # halo: 6 × 6 at most (it was 3 × 3 on a grid that started at the ROI; issue 11).
    assert summary["area_xywh_level0"] == [700, 900, 600, 500] and summary["tiles"] <= 36


@pytest.mark.slow  # about 40 s on 2 busy cores: random weights make ~18k speckle "nuclei"
def test_end_to_end_on_the_whole_cmu_slide(tmp_path, cmu_slide, tiny_checkpoint):
    result = run_cmu(cmu_slide, tiny_checkpoint, tmp_path, "--workers", "1")
    assert result.exit_code == 0, result.output
    height, width = (int(np.ceil(n * 0.499 / 0.5)) for n in (2967, 2220))
    summary = check_cmu_outputs(tmp_path, (height, width))
    assert 0 < summary["tiles"] <= 12 * 16 and summary["tissue_area_mm2"] > 0.3
