"""Translation consistency of whole-slide prediction (issue 11 point 1).

Predicts the same slide twice, the second time with the tile grid shifted by half a stride
(``PredictOptions.grid_offset_px``), and prints, in both directions, the fraction of nuclei
matched at IoU >= 0.5 and the mean IoU of the matches. With ``--roi`` it also predicts that ROI
alone and compares it with the whole-slide nuclei whose centroid lies in the ROI (same count,
same outlines expected: the ROI's tiles are the whole-slide tiles).

On a tree without ``grid_offset_px`` (today's release, for the "before" numbers) the shift is
emulated with an ROI that starts half a stride into the slide (its grid starts at the ROI), and
only nuclei at least ``--margin-px`` inside both processed areas are compared.

    python benchmarks/translation_consistency.py --precision fp32 --roi 800,1200,600,600

Prints one line per comparison and, with ``--json``, writes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import shape
from shapely.strtree import STRtree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_SLIDES = (
    Path("/work/shared/data/wsi/CMU-1-Small-Region.svs"),
    ROOT / "tests" / "data" / "CMU-1-Small-Region.svs",
)
AREA_BINS_PX = (0, 20, 40, 80, 160, 10**9)  # nucleus area in model pixels (0.5 µm/px)


def _parse_xywh(text: str) -> tuple[int, int, int, int]:
    x, y, w, h = (int(v) for v in text.split(","))
    return (x, y, w, h)


def polygons(path: Path) -> list[shapely.Polygon]:
    """The nucleus polygons of a GeoJSON FeatureCollection (QuPath level-0 pixels)."""
    return [shape(f["geometry"]) for f in json.loads(path.read_text())["features"]]


def match(a: list, b: list, level0_per_model_px: float, threshold: float = 0.5) -> dict:
    """For each polygon of ``a`` its best-IoU polygon of ``b``: the fraction of ``a`` matched at
    IoU >= threshold, the mean IoU of those matches, and the fraction identical (IoU 1).

    The unmatched ones are split into *absent* (no polygon of ``b`` overlaps them: a detection
    that flipped) and *moved* (overlapped, IoU below threshold: a split, merge or shifted
    outline), and the matched fraction is given per area bin (``AREA_BINS_PX``, model pixels at
    0.5 µm/px: 4 px² = 1 µm²) to show where the flips are.
    """
    if not a:
        return {"n": 0, "matched": float("nan"), "mean_iou": float("nan"), "identical": 0.0}
    tree = STRtree(b)
    ious = np.zeros(len(a))
    for i, polygon in enumerate(a):
        for j in tree.query(polygon, predicate="intersects"):
            other = b[int(j)]
            inter = polygon.intersection(other).area
            if inter > 0:
                ious[i] = max(ious[i], inter / polygon.union(other).area)
    good = ious >= threshold
    areas_px = np.array([p.area for p in a]) / level0_per_model_px**2
    by_area = {}
    for lo, hi in itertools.pairwise(AREA_BINS_PX):
        in_bin = (areas_px >= lo) & (areas_px < hi)
        if in_bin.any():
            label = f"{lo}-{hi}" if hi < AREA_BINS_PX[-1] else f">={lo}"
            by_area[label] = [int(in_bin.sum()), float(good[in_bin].mean())]
    return {
        "n": len(a),
        "matched": float(good.mean()),
        "mean_iou": float(ious[good].mean()) if good.any() else float("nan"),
        "identical": float((ious >= 1 - 1e-9).mean()),
        "absent": float((ious == 0).mean()),
        "moved": float(((ious > 0) & ~good).mean()),
        "matched_by_area_px": by_area,
    }


def inside(polys: list, box_xyxy: tuple[float, float, float, float]) -> list:
    x0, y0, x1, y1 = box_xyxy
    out = []
    for p in polys:
        c = p.centroid
        if x0 <= c.x < x1 and y0 <= c.y < y1:
            out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument(
        "--mpp", type=float, default=0.5, help="slide mpp override (0.5; 0: the slide's own)"
    )
    parser.add_argument("--no-shift", action="store_true", help="only the ROI check")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--overlap-px", type=int, default=None, help="default: the library's")
    parser.add_argument("--blending", default=None, help="centre or linear (default: library's)")
    parser.add_argument("--shift-px", type=int, default=None, help="default: half a stride")
    parser.add_argument("--roi", type=_parse_xywh, default=None, help="X,Y,W,H ROI check")
    parser.add_argument("--margin-px", type=int, default=128, help="emulated shift only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--tta", action="store_true", help="average the 8 flips of each tile")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from cellseg.checkpoint import default_model_path, load_bundle
    from cellseg.inference import Predictor
    from cellseg.predict import PredictOptions, SlideOutputs, predict_slide
    from cellseg.slide import open_slide

    if args.threads:
        torch.set_num_threads(args.threads)
    slide = args.slide or next((p for p in DEFAULT_SLIDES if p.is_file()), None)
    if slide is None:
        print("no slide: pass --slide", file=sys.stderr)
        return 1
    bundle = load_bundle(args.model or default_model_path(), "cpu")
    predictor = Predictor(bundle, device="cpu", precision=args.precision, tta=args.tta)
    fields = {f.name for f in dataclasses.fields(PredictOptions)}
    has_offset = "grid_offset_px" in fields
    mpp = args.mpp or None
    base = {"mpp": mpp, "workers": 0, "label_workers": 0}
    if args.overlap_px is not None:
        base["overlap_px"] = args.overlap_px
    if args.blending is not None:
        base["blending"] = args.blending
    with open_slide(slide, "openslide", mpp) as opened:
        width, height = opened.bounds_xy[2], opened.bounds_xy[3]
        scale = predictor.mpp / opened.mpp
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cellseg-translation-"))
    work.mkdir(parents=True, exist_ok=True)

    def run(name: str, **extra) -> tuple[list, dict]:
        out = SlideOutputs(geojson=work / f"{name}.geojson")
        start = time.perf_counter()
        options = PredictOptions(**base, **extra, overwrite=True)
        summary = predict_slide(slide, predictor, out, options)
        summary["wall_s"] = time.perf_counter() - start
        return polygons(out.geojson), summary

    reference, ref_summary = run("reference")
    stride = ref_summary["tiling"]["tile_px"] - ref_summary["tiling"]["overlap_px"]
    shift = args.shift_px if args.shift_px is not None else stride // 2
    tiles_per_mm2 = ref_summary["tiles"] / ref_summary["processed_area_mm2"]
    grid_per_mm2 = (1000.0 / (stride * ref_summary["mpp"])) ** 2  # every tile of the grid
    results: dict[str, object] = {
        "slide": str(slide),
        "precision": predictor.precision,
        "overlap_px": ref_summary["tiling"]["overlap_px"],
        "blending": args.blending or "default",
        "tta": args.tta,
        "shift_px": shift,
        "tiles": ref_summary["tiles"],
        "tiles_per_mm2": round(tiles_per_mm2, 1),
        "grid_tiles_per_mm2": round(grid_per_mm2, 1),
        "seconds": round(ref_summary["wall_s"], 1),
        "nuclei": len(reference),
        "mode": "grid_offset_px" if has_offset else "emulated with an ROI",
    }
    if args.no_shift:
        a = b = []
    elif has_offset:
        shifted, _ = run("shifted", grid_offset_px=(shift, shift))
        a, b = reference, shifted
    else:
        offset = round(shift * scale)
        shifted, _ = run("shifted", roi_xywh=(offset, offset, width - offset, height - offset))
        m = args.margin_px
        box = (offset + m, offset + m, width - m, height - m)
        a, b = inside(reference, box), inside(shifted, box)
    results["shift"] = (
        {}
        if args.no_shift
        else {
            "reference_in_shifted": match(a, b, scale),
            "shifted_in_reference": match(b, a, scale),
        }
    )
    print(
        f"{slide.name}: overlap {results['overlap_px']} px, {grid_per_mm2:.1f} grid tiles/mm² "
        f"({tiles_per_mm2:.1f} tissue tiles per processed mm²), {results['blending']} "
        f"blending, {predictor.precision}, "
        f"{results['mode']}"
    )
    for key, value in results["shift"].items():
        print(
            f"  half-stride shift ({shift} px), {key}: {value['matched']:.4f} of {value['n']} "
            f"matched at IoU >= 0.5, mean IoU {value['mean_iou']:.4f}, "
            f"identical {value['identical']:.4f}; unmatched: absent {value['absent']:.4f}, "
            f"moved {value['moved']:.4f}"
        )
        bins = ", ".join(
            f"{k} px² {v[1]:.3f} (n={v[0]})" for k, v in value["matched_by_area_px"].items()
        )
        print(f"    matched by area: {bins}")
    if args.roi is not None:
        x, y, w, h = args.roi
        roi_polys, _ = run("roi", roi_xywh=args.roi)
        whole = inside(reference, (x, y, x + w, y + h))
        roi_polys = inside(roi_polys, (x, y, x + w, y + h))
        results["roi"] = {
            "roi": list(args.roi),
            "whole_slide_count": len(whole),
            "roi_count": len(roi_polys),
            "whole_in_roi": match(whole, roi_polys, scale),
            "roi_in_whole": match(roi_polys, whole, scale),
        }
        r = results["roi"]
        print(
            f"  ROI {x},{y},{w},{h}: {r['roi_count']} nuclei vs {r['whole_slide_count']} of the "
            f"whole slide; identical {r['whole_in_roi']['identical']:.4f} / "
            f"{r['roi_in_whole']['identical']:.4f}, matched {r['whole_in_roi']['matched']:.4f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
