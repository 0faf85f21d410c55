"""Where the old native protocol and predict's path differ, one change at a time (issue 10).

On the MoNuSeg validation tiles (``val_ids.txt``), shipped model (or ``--model``), fp32, the
model's own post-processing. Rows, each one change from the row before:

1. the old protocol: tile resized to 0.5 µm/px (bilinear, antialiased, as in training),
   ``predict_array`` with 64 px overlap (last tile anchored at the image edge), probabilities
   resized to the tile's 0.25 µm/px and the watershed there;
2. the watershed at 0.5 µm/px, labels nearest-upsampled to the tile;
3. 32 px overlap (predict's 16 µm);
4. probabilities through uint8, as predict stores them;
5. the tile read by 2×2 area averaging (predict's reader) instead of the bilinear resize;
6. ``predict_slide`` itself (its tile grid, blending, tissue mask), its Zarr label map
   nearest-upsampled;
7. predict's GeoJSON polygons rasterised (``cellseg evaluate --protocol native``).

    python benchmarks/native_gap.py            # about 4 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellseg.checkpoint import default_model_path, load_bundle  # noqa: E402
from cellseg.data import find_samples, load_sample, read_ids  # noqa: E402
from cellseg.evaluation import (  # noqa: E402
    EVALUATION_OPTIONS,
    polygon_labels,
    postprocess_of,
    read_geojson_polygons,
    score_labels,
)
from cellseg.inference import Predictor, predict_array  # noqa: E402
from cellseg.instances import label_instances  # noqa: E402
from cellseg.predict import SlideOutputs, predict_slide  # noqa: E402
from cellseg.resample import resize_image, resize_labels_nearest  # noqa: E402
from cellseg.store import to_uint8  # noqa: E402

ROWS = (
    "old: probabilities resized to 0.25, watershed there",
    "watershed at 0.5, labels upsampled",
    "overlap 32 px",
    "uint8 probabilities",
    "area-averaged reading",
    "predict_slide's label map",
    "predict_slide's polygons (new path)",
)
METRICS = ("dice", "aji", "pq", "dq", "sq")


def uint8_round_trip(probs: np.ndarray) -> np.ndarray:
    """The release's float -> uint8 -> float round trip of the stored probabilities (issue 11
    removed it from predict; kept here to measure what it cost)."""
    nucleus = to_uint8(1.0 - probs[0]).astype(np.float32) / 255.0
    interior = np.minimum(to_uint8(probs[1]).astype(np.float32) / 255.0, nucleus)
    return np.stack([1.0 - nucleus, interior, nucleus - interior])


def area_average(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = (s // factor for s in image.shape[:2])
    blocks = image[: h * factor, : w * factor].reshape(h, factor, w, factor, 3)
    return np.rint(blocks.astype(np.float64).mean(axis=(1, 3))).astype(np.uint8)


def tile_rows(sample, predictor, post) -> list[dict]:
    """The seven rows' scores of one tile."""
    h, w = sample.labels.shape
    scale = sample.mpp / predictor.mpp
    image = resize_image(sample.image, (round(h * scale), round(w * scale)), antialias=True)

    def score(labels_model_px: np.ndarray) -> dict:
        up = resize_labels_nearest(labels_model_px, (h, w))
        return score_labels(sample.image_id, sample.labels, up)

    probs64 = predict_array(image, predictor, predictor.tile_px, 64)
    fine = F.interpolate(torch.from_numpy(probs64)[None], size=(h, w), mode="bilinear")[0]
    rows = [
        score_labels(
            sample.image_id, sample.labels, label_instances(fine.numpy(), sample.mpp, post)
        )
    ]
    rows.append(score(label_instances(probs64, predictor.mpp, post)))
    probs32 = predict_array(image, predictor, predictor.tile_px, 32)
    rows.append(score(label_instances(probs32, predictor.mpp, post)))
    rows.append(score(label_instances(uint8_round_trip(probs32), predictor.mpp, post)))
    factor = round(1 / scale)
    averaged = predict_array(area_average(sample.image, factor), predictor, predictor.tile_px, 32)
    rows.append(score(label_instances(uint8_round_trip(averaged), predictor.mpp, post)))
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        Image.fromarray(sample.image).save(folder / "tile.png")
        outputs = SlideOutputs(geojson=folder / "tile.geojson", zarr=folder / "tile.zarr")
        options = replace(EVALUATION_OPTIONS, mpp=sample.mpp)
        predict_slide(folder / "tile.png", predictor, outputs, options)
        labels = np.asarray(zarr.open_group(str(outputs.zarr), mode="r")["labels/nuclei/0"][:])
        rows.append(score(labels.squeeze().astype(np.int64)))
        polygons = read_geojson_polygons(outputs.geojson)
        rows.append(score_labels(sample.image_id, sample.labels, polygon_labels(polygons, (h, w))))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/monuseg")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.model or default_model_path())
    predictor = Predictor(bundle, device="cpu", precision="fp32")
    wanted = set(read_ids(args.data / "val_ids.txt"))
    files = [f for f in find_samples(args.data / "train") if f.image_id in wanted]
    per_tile = [tile_rows(load_sample(f), predictor, postprocess_of(bundle)) for f in files]
    print(f"{len(files)} validation tiles, fp32, means:")
    print(f"{'':<54}" + "".join(f"{m:>8}" for m in METRICS))
    for i, name in enumerate(ROWS):
        means = [np.mean([tile[i][m] for tile in per_tile]) for m in METRICS]
        print(f"{i + 1}. {name:<51}" + "".join(f"{v:8.4f}" for v in means))
    return 0


if __name__ == "__main__":
    sys.exit(main())
