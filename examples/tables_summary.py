"""Summarise the Table 1 / 2 runs of ``examples/tables.sh`` as a Markdown table.

Usage: python examples/tables_summary.py [RUNS_ROOT] [EPOCHS]      (defaults: runs 60)

Reads ``RUNS_ROOT/table-e{EPOCHS}-s{SEED}/{row}/`` (``log.jsonl``, ``test-paper.json``) for every
seed found. Per row: test DSC and mIoU (%) as mean ± sample std over seeds of each seed's mean over
the 14 test tiles, the per-seed values, best validation Dice, epochs run and summed wall time.
Rows without a finished evaluation are listed as missing, never silently dropped.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

ROWS = {
    "backbone": ("Backbone (CNN + Transformer)", "--no-dac --no-cim"),
    "backbone-cim": ("Backbone + CIM", "--no-dac"),
    "backbone-dac": ("Backbone + DAC", "--no-cim"),
    "full": ("Backbone + DAC + CIM (CausalCellSegmenter)", "(none)"),
    "unet": ("U-Net", "--arch unet --no-cim"),
    "attention-unet": ("Attention U-Net", "--arch attention_unet --no-cim"),
}


def read_run(folder: Path) -> dict | None:
    test = folder / "test-paper.json"
    if not test.is_file():
        return None
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    # the epoch the trainer kept as best.safetensors: its last "best" mark
    best = [r for r in log if r.get("best")][-1] if any(r.get("best") for r in log) else log[-1]
    summary = json.loads(test.read_text())["summary"]
    return {
        "dice": 100 * summary["dice"]["mean"],
        "iou": 100 * summary["iou"]["mean"],
        "val": 100 * best["val_dice"],
        "best_epoch": best["epoch"],
        "epochs": len(log),
        "minutes": sum(r["seconds"] for r in log) / 60,
    }


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def main(root: Path, epochs: int) -> None:
    seeds = sorted(
        int(m.group(1))
        for p in root.glob(f"table-e{epochs}-s*")
        if (m := re.fullmatch(rf"table-e{epochs}-s(\d+)", p.name))
    )
    print(f"Paper preset, {epochs}-epoch budget, seeds {seeds}; DSC / mIoU in %.\n")
    print(
        "| row | flags | seeds | test DSC | test mIoU | DSC per seed | best val Dice (epoch) "
        "per seed | epochs run | wall time (all seeds) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key, (name, flags) in ROWS.items():
        runs = {s: read_run(root / f"table-e{epochs}-s{s}" / key) for s in seeds}
        done = {s: r for s, r in runs.items() if r}
        missing = [s for s, r in runs.items() if not r]
        if not done:
            print(f"| {name} | `{flags}` | none finished | | | | | | |")
            continue
        note = f" (missing: {missing})" if missing else ""
        per_seed_dice = " / ".join(f"{r['dice']:.2f}" for r in done.values())
        per_seed_val = " / ".join(f"{r['val']:.2f} ({r['best_epoch']})" for r in done.values())
        print(
            f"| {name} | `{flags}` | {len(done)}{note} "
            f"| {spread([r['dice'] for r in done.values()])} "
            f"| {spread([r['iou'] for r in done.values()])} "
            f"| {per_seed_dice} | {per_seed_val} "
            f"| {' / '.join(str(r['epochs']) for r in done.values())} "
            f"| {sum(r['minutes'] for r in done.values()):.0f} min |"
        )


if __name__ == "__main__":
    main(
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs"),
        int(sys.argv[2]) if len(sys.argv) > 2 else 60,
    )
