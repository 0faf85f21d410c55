"""What the exported outlines score once rasterised back onto the ground truth (issue 10 point 5).

For the MoNuSeg validation tiles (``val_ids.txt``; never the test set) it runs
``python -m cellseg.cli.main predict`` on all tiles at once (``--mpp 0.25 --precision fp32``,
``--out-dir``), rasterises every GeoJSON polygon onto the tile's ground-truth grid (a pixel is
the nucleus's when its centre, ``(c + 0.5, r + 0.5)`` in QuPath's frame, is inside; later
polygons do not overwrite earlier ones) and scores it with :mod:`cellseg.metrics` (Dice of the
foreground, AJI, PQ). It also prints the GeoJSON sizes and vertex counts, and times the polygon
stage (:func:`cellseg.geojson.label_polygons`, pixel and sub-pixel outlines, on the label and
probability maps of the Zarr outputs).

With ``--before-src DIR`` (a checkout of older code, e.g. ``git archive <commit> | tar -x -C
DIR``) the same is done with that code first, and both rows are printed. It is a measurement
script, not the official evaluation path (``cellseg evaluate --protocol native``).

    python benchmarks/outline_accuracy.py --before-src /tmp/cellseg-base
    python benchmarks/outline_accuracy.py --tiles 2            # a quick part
    python benchmarks/outline_accuracy.py --levels 0.6,0.55,0.5,0.45,0.4   # other contour levels
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from skimage.draw import polygon as fill_polygon

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellseg.data import find_samples, load_sample, read_ids  # noqa: E402
from cellseg.geojson import label_polygons  # noqa: E402
from cellseg.metrics import dice, instance_metrics  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "monuseg"


def rasterise_geojson(path: Path, shape_hw: tuple[int, int]) -> tuple[np.ndarray, int]:
    """``(H×W int32 labels, vertex count)`` of a GeoJSON of level-0 polygons (first one wins)."""
    features = json.loads(path.read_text())["features"]
    labels = np.zeros(shape_hw, np.int32)
    vertices = 0
    for index, feature in enumerate(features, start=1):
        ring_xy = np.asarray(feature["geometry"]["coordinates"][0], dtype=np.float64)
        vertices += len(ring_xy) - 1
        # Pixel (r, c) spans [c, c+1) × [r, r+1): its centre is inside when (c, r) is inside the
        # polygon shifted by half a pixel (skimage tests integer points).
        rows, cols = fill_polygon(ring_xy[:, 1] - 0.5, ring_xy[:, 0] - 0.5, shape=shape_hw)
        free = labels[rows, cols] == 0
        labels[rows[free], cols[free]] = index
    return labels, vertices


def run_predict(src: Path, images: list[Path], out_dir: Path) -> float:
    """``cellseg predict`` of ``images`` with the code under ``src``; its wall time in s."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-m", "cellseg.cli.main", "predict", *map(str, images)]
    command += ["--mpp", "0.25", "--precision", "fp32", "--out-dir", str(out_dir)]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, cwd=src)
    return time.perf_counter() - start


def polygon_stage_s(zarr_path: Path, repeats: int = 3) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of label_polygons on a Zarr's labels: pixel, sub-pixel."""
    labels, probability = _zarr_maps(zarr_path)
    ids = np.unique(labels)[1:]
    times = []
    for options in ({}, {"probability": probability}):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            label_polygons(labels, ids, (0, 0), 2.0, **options)
            best = min(best, time.perf_counter() - start)
        times.append(best)
    return times[0], times[1]


def _zarr_maps(zarr_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, nucleus probability in [0, 1])`` at the model's resolution from a Zarr output."""
    group = zarr.open_group(str(zarr_path), mode="r")
    labels = np.asarray(group["labels/nuclei/0"][:]).astype(np.int64)
    probability = np.asarray(group["0"][:]).astype(np.float32) / 255.0
    return labels.reshape(labels.shape[-2:]), probability.reshape(probability.shape[-2:])


def rasterise_polygons(polygons: list, shape_hw: tuple[int, int]) -> np.ndarray:
    """:func:`rasterise_geojson` of shapely polygons (same pixel-centre rule, first wins)."""
    labels = np.zeros(shape_hw, np.int32)
    for index, polygon in enumerate(polygons, start=1):
        ring_xy = np.asarray(polygon.exterior.coords)
        rows, cols = fill_polygon(ring_xy[:, 1] - 0.5, ring_xy[:, 0] - 0.5, shape=shape_hw)
        free = labels[rows, cols] == 0
        labels[rows[free], cols[free]] = index
    return labels


def level_sweep(samples: list, out_dir: Path, levels: list[float]) -> dict[str, dict]:
    """Re-outline predict's nuclei (the Zarr labels and probability) at other contour levels.

    At the level predict used this reproduces its GeoJSON's scores: the same nuclei, outlined by
    the same :func:`cellseg.geojson.label_polygons` (on the whole canvas instead of per region).
    """
    scores: dict[str, list] = {str(level): [] for level in levels}
    for files in samples:
        sample = load_sample(files)
        labels, probability = _zarr_maps(out_dir / f"{files.image_path.stem}.zarr")
        scale = sample.labels.shape[0] / labels.shape[0]
        ids = np.unique(labels)[1:]
        for level in levels:
            polygons = label_polygons(
                labels, ids, (0, 0), scale, probability=probability, level=level
            )
            pred = rasterise_polygons(list(polygons.values()), sample.labels.shape)
            metrics = instance_metrics(sample.labels, pred)
            scores[str(level)].append(
                (dice(pred > 0, sample.labels > 0), metrics["aji"], metrics["pq"])
            )
    return {
        level: dict(zip(("dice", "aji", "pq"), np.mean(rows, axis=0).tolist(), strict=True))
        for level, rows in scores.items()
    }


def score(src: Path, samples: list, work: Path, name: str) -> dict:
    """Predict with ``src``, rasterise and score every tile; means and totals."""
    out_dir = work / name
    wall_s = run_predict(src, [s.image_path for s in samples], out_dir)
    rows = []
    for files in samples:
        sample = load_sample(files)
        geojson_path = out_dir / f"{files.image_path.stem}.geojson"
        pred, vertices = rasterise_geojson(geojson_path, sample.labels.shape)
        scores = instance_metrics(sample.labels, pred)
        pixel_s, subpixel_s = polygon_stage_s(out_dir / f"{files.image_path.stem}.zarr")
        rows.append(
            {
                "tile": files.image_id,
                "dice": dice(pred > 0, sample.labels > 0),
                "aji": scores["aji"],
                "pq": scores["pq"],
                "nuclei": int(pred.max()),
                "vertices": vertices,
                "bytes": geojson_path.stat().st_size,
                "pixel_polygons_s": pixel_s,
                "subpixel_polygons_s": subpixel_s,
            }
        )
        print(
            f"{name} {files.image_id}: " + json.dumps({k: rows[-1][k] for k in list(rows[-1])[1:]})
        )
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("dice", "aji", "pq")}
    total = {k: sum(r[k] for r in rows) for k in ("nuclei", "vertices", "bytes")}
    stage = {k: sum(r[k] for r in rows) for k in ("pixel_polygons_s", "subpixel_polygons_s")}
    return {
        "src": str(src),
        "predict_wall_s": wall_s,
        "mean": mean,
        **total,
        **stage,
        "tiles": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MoNuSeg root")
    parser.add_argument("--tiles", type=int, default=None, help="only the first N val tiles")
    parser.add_argument("--before-src", type=Path, default=None, help="older code to compare")
    parser.add_argument(
        "--levels",
        type=lambda text: [float(v) for v in text.split(",")],
        default=None,
        help="also re-outline the nuclei at these contour levels, e.g. 0.6,0.55,0.5,0.45,0.4",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the outputs here")
    args = parser.parse_args(argv)
    wanted = set(read_ids(args.data / "val_ids.txt"))
    samples = [s for s in find_samples(args.data / "train") if s.image_id in wanted]
    samples = samples[: args.tiles] if args.tiles else samples
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        results = {}
        if args.before_src is not None:
            results["before"] = score(args.before_src.resolve(), samples, work, "before")
        results["after"] = score(ROOT, samples, work, "after")
        if args.levels:
            results["levels"] = level_sweep(samples, work / "after", args.levels)
    for level, mean in results.get("levels", {}).items():
        print(
            f"contour level {level}: Dice {mean['dice']:.4f} AJI {mean['aji']:.4f} "
            f"PQ {mean['pq']:.4f}"
        )
    for name, result in ((k, v) for k, v in results.items() if k != "levels"):
        print(
            f"{name}: Dice {result['mean']['dice']:.4f} AJI {result['mean']['aji']:.4f} "
            f"PQ {result['mean']['pq']:.4f} | {result['nuclei']} nuclei, {result['vertices']} "
            f"vertices, {result['bytes'] / 1e6:.2f} MB GeoJSON | label_polygons pixel "
            f"{result['pixel_polygons_s']:.3f} s, sub-pixel {result['subpixel_polygons_s']:.3f} s"
        )
    if "before" in results:
        before, after = results["before"], results["after"]
        print(
            "after/before: GeoJSON bytes "
            f"{after['bytes'] / before['bytes']:.3f}, vertices "
            f"{after['vertices'] / before['vertices']:.3f}, polygon stage "
            f"{after['subpixel_polygons_s'] / after['pixel_polygons_s']:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
