"""Fit a learned rejection of false-positive nuclei and choose it on validation (issue 10 point 6).

    python examples/fit_rejection.py cellseg/weights/default.safetensors \
        --out rejecting.safetensors --json rejection.json --threads 1

1. Every *training* tile of each ``--data`` folder (the trainer's own split:
   ``cellseg.training.load_domain``; MoNuSeg train minus ``val_ids.txt``, CoNSeP train minus its
   held-out source tiles; where the model's ``meta["val_ids"]`` names tiles of a folder, exactly
   those are its validation tiles) goes through ``cellseg predict``'s code (the path of
   ``evaluate --protocol native``) with the model's rejection off. Each predicted nucleus is
   labelled 1 when it matches a true nucleus at IoU >= 0.5 (``--match-iou``), else 0; its
   features are measurements predict wrote (``cellseg.rejection.DEFAULT_FEATURES``).
2. A logistic regression is fitted on them (``cellseg.rejection.fit_logistic``).
3. On the *validation* tiles the nuclei predict wrote are filtered at each threshold and scored
   as ``evaluate --protocol native`` scores them (the nuclei are independent, so this equals
   re-running predict with the rejection); the threshold with the best mean of AJI and PQ
   (averaged over the domains, so each dataset weighs the same) is kept, and no rejection at all
   when none beats keeping every nucleus.
4. The choice is checked through the official path (predict with ``meta["rejection"]`` set) and
   ``--out`` gets a copy of the model (same weight bytes) with it in its meta.

Test tiles are never read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellseg.atomic import atomic_path  # noqa: E402
from cellseg.checkpoint import load_bundle  # noqa: E402
from cellseg.evaluation import (  # noqa: E402
    TileCache,
    evaluate_samples,
    polygon_labels,
    polygon_match_iou,
    predict_nuclei,
    score_labels,
)
from cellseg.inference import Predictor  # noqa: E402
from cellseg.metrics import summarize  # noqa: E402
from cellseg.rejection import (  # noqa: E402
    DEFAULT_FEATURES,
    REJECTION_KEY,
    feature_matrix,
    fit_logistic,
)
from cellseg.training import TrainOptions, load_domain  # noqa: E402

DATA = (ROOT.parent / "shared/data/monuseg/train", ROOT.parent / "shared/data/consep/train")
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))
MATCH_IOU = 0.5
METRICS = ("dice", "aji", "pq", "nuclei_pred", "nuclei_true")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="model copy with the rejection")
    parser.add_argument("--data", type=Path, action="append", default=None, help="repeatable")
    parser.add_argument("--seed", type=int, default=TrainOptions.seed, help="split seed")
    parser.add_argument("--val-fraction", type=float, default=TrainOptions.val_fraction)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument(
        "--match-iou",
        type=float,
        default=MATCH_IOU,
        help="a training nucleus is true when its IoU with a true one is at least this",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write every number")
    return parser.parse_args(argv)


def model_split(domain, model_val_ids):
    """The domain with the model's own validation tiles (``meta["val_ids"]``) as its validation
    set where the model was trained on this domain (some of its tiles are among them): a seeded
    split could otherwise fit on, or choose on, the wrong tiles. Domains the model never saw keep
    the trainer's seeded split."""
    held_out = set(model_val_ids or ())
    samples = domain.train + domain.val
    if not held_out & {s.image_id for s in samples}:
        return domain
    val = [s for s in samples if s.image_id in held_out]
    train = [s for s in samples if s.image_id not in held_out]
    print(f"{domain.name}: the model's own split, {len(train)} training / {len(val)} validation")
    return dataclasses.replace(domain, train=train, val=val)


def collect(cache: TileCache, samples) -> list[dict]:
    """Per tile: the nuclei predict wrote (polygons, measurements) and their match IoU."""
    out = []
    for sample in samples:
        nuclei = predict_nuclei(sample, cache)
        polygons = [polygon for polygon, _ in nuclei]
        out.append(
            {
                "sample": sample,
                "polygons": polygons,
                "measurements": [m for _, m in nuclei],
                "iou": polygon_match_iou(polygons, sample.labels),
            }
        )
    return out


def score_kept(tiles: list[dict], probability: list[np.ndarray], threshold: float) -> dict:
    """Mean native metrics of the validation tiles keeping nuclei with p >= threshold."""
    rows = []
    for tile, p in zip(tiles, probability, strict=True):
        kept = [poly for poly, keep in zip(tile["polygons"], p >= threshold, strict=True) if keep]
        gt = tile["sample"].labels
        rows.append(score_labels(tile["sample"].image_id, gt, polygon_labels(kept, gt.shape)))
    summary = summarize(rows)
    return {m: summary[m]["mean"] for m in METRICS}


def choose_threshold(val: dict[str, list[dict]], rejection) -> tuple[float | None, list[dict]]:
    """The threshold with the best domain-averaged (AJI + PQ) / 2; None when keeping every
    nucleus (threshold 0) is at least as good."""
    probability = {
        name: [
            rejection.probability(feature_matrix(t["measurements"], rejection.features))
            if t["measurements"]
            else np.zeros(0)
            for t in tiles
        ]
        for name, tiles in val.items()
    }
    rows = []
    for threshold in (0.0, *THRESHOLDS):
        per_domain = {n: score_kept(val[n], probability[n], threshold) for n in val}
        score = float(np.mean([(d["aji"] + d["pq"]) / 2 for d in per_domain.values()]))
        rows.append({"threshold": threshold, "score": score, "domains": per_domain})
    best = max(rows, key=lambda row: (row["score"], -row["threshold"]))
    return (best["threshold"] or None), rows


def official(cache: TileCache, val: dict[str, list[dict]], meta: dict) -> dict[str, dict]:
    """``evaluate --protocol native`` on each validation domain with the given model meta."""
    cache.predictor.bundle.meta = meta
    out = {}
    for name, tiles in val.items():
        samples = [tile["sample"] for tile in tiles]
        summary = evaluate_samples(cache, samples, "native")["summary"]
        out[name] = {m: summary[m]["mean"] for m in METRICS}
    return out


def write_model(source: Path, target: Path, meta: dict) -> None:
    """``source``'s tensors byte for byte, with ``meta`` in the header."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as handle:
        header = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    header["meta"] = json.dumps(meta)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def print_table(title: str, numbers: dict[str, dict]) -> None:
    print(title)
    for name, d in numbers.items():
        print(
            f"  {name:10s} Dice {d['dice']:.4f}  AJI {d['aji']:.4f}  PQ {d['pq']:.4f}  "
            f"nuclei/tile {d['nuclei_pred']:.1f} (true {d['nuclei_true']:.1f})"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    roots = [Path(root) for root in (args.data or DATA)]
    opts = TrainOptions(
        data=[str(r) for r in roots], seed=args.seed, val_fraction=args.val_fraction
    )
    domains = [load_domain(root, opts) for root in roots]
    bundle = load_bundle(args.model)
    domains = [model_split(d, bundle.meta.get("val_ids")) for d in domains]
    meta = {k: v for k, v in bundle.meta.items() if k != REJECTION_KEY}
    bundle.meta = dict(meta)  # fitting and "before" run without any stored rejection
    cache = TileCache(Predictor(bundle, device=args.device, precision=args.precision))

    start = time.perf_counter()
    train = [tile for d in domains for tile in collect(cache, d.train)]
    val = {d.name: collect(cache, d.val) for d in domains}
    print(
        f"predicted {len(train)} training and {sum(map(len, val.values()))} validation tiles "
        f"in {time.perf_counter() - start:.0f} s (precision {cache.precision})"
    )

    x = np.concatenate(
        [feature_matrix(t["measurements"], DEFAULT_FEATURES) for t in train if t["measurements"]]
    )
    y = np.concatenate([t["iou"] >= args.match_iou for t in train]).astype(np.float64)
    rejection = fit_logistic(x, y, DEFAULT_FEATURES, l2=args.l2)
    train_p = rejection.probability(x)
    print(
        f"training nuclei: {len(y)} ({int(y.sum())} matched, {int(len(y) - y.sum())} false); "
        f"fitted accuracy at 0.5: {np.mean((train_p >= 0.5) == (y > 0)):.3f}"
    )
    for feature, coef in sorted(
        zip(rejection.features, rejection.coef, strict=True), key=lambda fc: -abs(fc[1])
    ):
        print(f"  {coef:+.3f}  {feature}")

    threshold, rows = choose_threshold(val, rejection)
    print("threshold  score(AJI+PQ)/2  " + "  ".join(f"{n} AJI/PQ/n" for n in val))
    for row in rows:
        cells = "  ".join(
            f"{d['aji']:.4f}/{d['pq']:.4f}/{d['nuclei_pred']:.0f}" for d in row["domains"].values()
        )
        print(f"{row['threshold']:9.2f}  {row['score']:.4f}  {cells}")

    before = official(cache, val, dict(meta))
    print_table("validation, no rejection (official native path):", before)
    report = {
        "model": str(args.model),
        "precision": cache.precision,
        "match_iou": args.match_iou,
        "rows": rows,
        "before": before,
        "rejection": None,
        "after": None,
    }
    final_meta = dict(meta)
    if threshold is None:
        print("no threshold beats keeping every nucleus on validation: no rejection stored")
    else:
        chosen = rejection.with_threshold(threshold)
        final_meta[REJECTION_KEY] = chosen.to_dict()
        after = official(cache, val, final_meta)
        print_table(f"validation, rejection at p >= {threshold} (official native path):", after)
        x_val = [t["measurements"] for tiles in val.values() for t in tiles]
        flat = [m for tile in x_val for m in tile]
        start = time.perf_counter()
        chosen.keep(flat)
        seconds = time.perf_counter() - start
        print(
            f"rejection cost: {1e6 * seconds / max(1, len(flat)):.2f} µs per nucleus "
            f"({len(flat)} nuclei)"
        )
        report.update(
            rejection=chosen.to_dict(),
            after=after,
            us_per_nucleus=1e6 * seconds / max(1, len(flat)),
        )
    if args.json is not None:
        partial = args.json.with_name(args.json.name + ".partial")
        partial.write_text(json.dumps(report, indent=2, default=float))
        os.replace(partial, args.json)
    if args.out is not None:
        write_model(args.model, args.out, final_meta)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
