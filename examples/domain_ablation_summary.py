"""Table of examples/domain_ablation.sh: per-domain validation Dice at each run's best epoch.

python examples/domain_ablation_summary.py runs/domains-e6-s0
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def best_record(run: Path) -> dict | None:
    """The log line of the epoch kept as best.safetensors (the last one marked best)."""
    log = run / "log.jsonl"
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    best = [r for r in records if r.get("best")]
    return (best or records)[-1] if records else None


def main() -> None:
    root = Path(sys.argv[1])
    rows = []
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        record = best_record(run)
        if record is None:
            continue
        by_domain = record.get("val_dice_by_domain", {})
        seconds = sum(
            json.loads(line)["seconds"] for line in (run / "log.jsonl").read_text().splitlines()
        )
        rows.append((run.name, record["epoch"], record["val_dice"], by_domain, seconds))
    domains = sorted({d for row in rows for d in row[3]})
    print("| run | best epoch | val Dice (mean) | " + " | ".join(domains) + " | train min |")
    print("|---|---|---|" + "---|" * len(domains) + "---|")
    for name, epoch, mean, by_domain, seconds in rows:
        cells = " | ".join(f"{by_domain.get(d, float('nan')):.4f}" for d in domains)
        print(f"| {name} | {epoch} | {mean:.4f} | {cells} | {seconds / 60:.1f} |")


if __name__ == "__main__":
    main()
