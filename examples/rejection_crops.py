"""Before/after crops of a slide's nucleus outlines for a model with a learned rejection.

    python examples/rejection_crops.py MODEL MODEL_WITH_REJECTION \
        --slide ../shared/data/wsi/CMU-1-Small-Region.svs --out-dir docs/images \
        --crop keratin:1250,1230,340 --crop ink:1640,1180,340 --crop fibres:560,2330,340

Both models run through ``cellseg.predict.predict_slide`` (as ``cellseg predict`` does, one
torch thread); each crop ``NAME:X,Y,SIDE`` (level-0 pixels) is written as
``rejection_NAME.png``: left the first model's outlines (those the second model no longer
writes in red), right the second model's. Small palette PNGs, for docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellseg.checkpoint import load_bundle  # noqa: E402
from cellseg.evaluation import read_geojson_polygons  # noqa: E402
from cellseg.inference import Predictor  # noqa: E402
from cellseg.predict import PredictOptions, SlideOutputs, predict_slide  # noqa: E402
from cellseg.slide import open_slide  # noqa: E402

KEPT_RGB, REJECTED_RGB = (0, 255, 0), (255, 0, 0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--slide", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--crop", action="append", required=True, help="NAME:X,Y,SIDE")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def outlines(model: Path, slide: Path, folder: Path) -> list:
    """Level-0 nucleus polygons ``cellseg predict`` writes for ``slide`` with ``model``
    (QuPath coordinates: the slide's bounds origin is 0 for a plain SVS region)."""
    predictor = Predictor(load_bundle(model), device="cpu")
    geojson = folder / f"{model.stem}.geojson"
    options = PredictOptions(workers=0, label_workers=0, overwrite=True)
    summary = predict_slide(slide, predictor, SlideOutputs(geojson=geojson), options)
    print(f"{model}: {summary['nuclei']} nuclei, {summary.get('nuclei_rejected', 0)} rejected")
    return read_geojson_polygons(geojson)


def draw(crop: Image.Image, polygons, origin_xy, colour_of) -> Image.Image:
    picture = crop.copy()
    pen = ImageDraw.Draw(picture)
    x0, y0 = origin_xy
    for polygon in polygons:
        xy = [(x - x0, y - y0) for x, y in polygon.exterior.coords]
        pen.line(xy, fill=colour_of(polygon), width=1)
    return picture


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        before = outlines(args.before, args.slide, Path(tmp))
        after = outlines(args.after, args.slide, Path(tmp))
    kept = {polygon.wkb for polygon in after}
    slide = open_slide(args.slide)
    bx, by = slide.bounds_xy[:2]
    for spec in args.crop:
        name, numbers = spec.split(":")
        x, y, side = (int(v) for v in numbers.split(","))
        crop = Image.fromarray(slide.read_region_at_mpp((bx + x, by + y), (side, side), slide.mpp))
        box_polys = [p for p in before if _in_box(p, x, y, side)]
        left = draw(crop, box_polys, (x, y), lambda p: KEPT_RGB if p.wkb in kept else REJECTED_RGB)
        right = draw(crop, [p for p in after if _in_box(p, x, y, side)], (x, y), lambda p: KEPT_RGB)
        pair = Image.new("RGB", (2 * side + 4, side), (255, 255, 255))
        pair.paste(left, (0, 0))
        pair.paste(right, (side + 4, 0))
        path = args.out_dir / f"rejection_{name}.png"
        pair.quantize(colors=128).save(path, optimize=True)
        n_rejected = sum(p.wkb not in kept for p in box_polys)
        print(f"{path}: {len(box_polys)} nuclei before, {n_rejected} rejected")
    return 0


def _in_box(polygon, x: int, y: int, side: int) -> bool:
    x0, y0, x1, y1 = polygon.bounds
    return x1 > x and y1 > y and x0 < x + side and y0 < y + side


if __name__ == "__main__":
    sys.exit(main())
