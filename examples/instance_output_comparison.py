"""Which instance output separates nuclei better? (issue 10 point 4) On validation tiles only.

Compares models trained at the same budget that differ in their instance output: today's
interior/boundary classes (markers from ``p1``) and the distance-map head (markers from the
regressed distance map ``d``; ``cellseg train --distance-map``). Each model's post-processing is
tuned on predict's own path (``cellseg.evaluation.tune_postprocess``, the same grids for every
model: thresholds, minimum areas, thresholds again, for the mean AJI over the domains) and the
best setting's validation Dice, AJI, PQ, DQ, SQ are reported per domain. A distance-head model is
also scored with its distance channel dropped (markers from its interior class), which separates
what the extra training signal does from what the distance seeding does.

The validation tiles are the ones each run held out (``val_ids`` in its meta: MoNuSeg's
``val_ids.txt`` and whole CoNSeP source tiles); runs compared must share them.

    python examples/instance_output_comparison.py \
        --model classes=runs/cmp-classes/best.safetensors \
        --model distance=runs/cmp-distance/best.safetensors \
        --monuseg ../shared/data/monuseg --consep ../shared/data/consep --json comparison.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellseg.atomic import write_atomic  # noqa: E402
from cellseg.checkpoint import load_bundle  # noqa: E402
from cellseg.data import find_samples, load_sample  # noqa: E402
from cellseg.evaluation import TUNING_METRICS, TileCache, tune_postprocess  # noqa: E402
from cellseg.inference import Predictor  # noqa: E402
from cellseg.instances import PostProcess  # noqa: E402

# The default grids with lower marker thresholds as well: a normalised distance map's cores lie
# at lower values than a confident interior probability, and each model gets the same search.
_THRESHOLDS = {
    "fg_threshold": (0.4, 0.5, 0.6, 0.7),
    "marker_threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
}
GRIDS = (
    _THRESHOLDS,
    {"min_marker_area_um2": (0.25, 0.5, 1.0, 2.0, 4.0), "min_area_um2": (2.0, 3.0, 5.0, 8.0)},
    _THRESHOLDS,
)
# ``--grid coarse``: 25 candidates instead of 77 (5-6 min per model and variant on one thread of
# 2 cores, instead of about 20), the same for every model. The staged search is greedy, so the
# fine grid usually, but not always, finds a better setting.
COARSE_GRIDS = (
    {"fg_threshold": (0.5, 0.6, 0.7), "marker_threshold": (0.4, 0.5, 0.6, 0.7, 0.8)},
    {"min_marker_area_um2": (0.5, 1.0, 2.0), "min_area_um2": (2.0, 3.0, 5.0)},
)


class ClassesOnly:
    """A distance-head predictor seen as a three-class one: channel 3 dropped, so labelling
    seeds its markers from the interior class as for a class model."""

    num_classes = 3

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor

    def __getattr__(self, name: str) -> Any:
        if name == "predictor":
            raise AttributeError(name)
        return getattr(self.predictor, name)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return self.predictor(tiles)[:, :3]


def validation_domains(bundle, roots: dict[str, Path], limit: int | None = None) -> dict[str, list]:
    """``{domain: samples}`` of the tiles the run held out (its meta's ``val_ids``)."""
    val_ids = set(bundle.meta.get("val_ids") or [])
    if not val_ids:
        raise SystemExit("error: the model's meta records no val_ids")
    domains = {}
    for name, root in roots.items():
        folder = root / "train" if (root / "train").is_dir() else root
        samples = [load_sample(f) for f in find_samples(folder) if f.image_id in val_ids]
        if samples:
            domains[name] = samples[:limit] if limit else samples
    return domains


def compare(args: argparse.Namespace) -> dict:
    roots = {"monuseg": args.monuseg}
    if args.consep is not None:
        roots["consep"] = args.consep
    grids = COARSE_GRIDS if args.grid == "coarse" else GRIDS
    report: dict[str, Any] = {"grids": [dict(g) for g in grids], "variants": {}}
    reference_ids = None
    for spec in args.model:
        name, _, path = spec.partition("=")
        bundle = load_bundle(Path(path))
        ids = sorted(bundle.meta.get("val_ids") or [])
        if reference_ids is not None and ids != reference_ids:
            raise SystemExit(f"error: {path} held out other validation tiles than the first model")
        reference_ids = ids
        domains = validation_domains(bundle, roots, args.limit)
        cache = TileCache(Predictor(bundle, device="cpu", precision=args.precision))
        variants = [(name, cache)]
        if bundle.config.distance_head:
            variants.append((f"{name} (interior markers)", ClassesOnly(cache)))
        for label, predictor in variants:
            t0 = time.perf_counter()
            best, rows = tune_postprocess(predictor, domains, PostProcess(), grids)
            row = next(r for r in rows if all(r[k] == v for k, v in best.to_dict().items()))
            report["variants"][label] = {
                "model": str(path),
                "epoch": bundle.meta.get("epoch"),
                "best": best.to_dict(),
                "metrics": row,
                "candidates": len(rows),
                "seconds": time.perf_counter() - t0,
            }
            print_variant(label, row, domains, time.perf_counter() - t0)
    return report


def print_variant(label: str, row: dict, domains: dict, seconds: float) -> None:
    parts = []
    for domain in domains:
        values = " / ".join(
            f"{row.get(f'{m}_{domain}', row[m]):.3f}" for m in ("dice", "aji", "pq")
        )
        parts.append(f"{domain} Dice/AJI/PQ {values}")
    score = np.mean([row["aji"], row["pq"]])
    print(f"{label}: " + "; ".join(parts) + f"; mean (AJI+PQ)/2 {score:.4f} ({seconds:.0f} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=checkpoint")
    parser.add_argument("--monuseg", type=Path, required=True, help="MoNuSeg root or train/")
    parser.add_argument("--consep", type=Path, default=None, help="CoNSeP root or train/")
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--grid", default="fine", choices=("fine", "coarse"))
    parser.add_argument("--limit", type=int, default=None, help="first N tiles per domain (smoke)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = compare(args)
    if args.json is not None:
        write_atomic(args.json, json.dumps(report, indent=2))
    print(f"{'variant':<32}" + "".join(f"{m:>8}" for m in TUNING_METRICS) + "  (mean over domains)")
    for label, entry in report["variants"].items():
        metrics = entry["metrics"]
        print(f"{label:<32}" + "".join(f"{metrics[m]:8.4f}" for m in TUNING_METRICS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
