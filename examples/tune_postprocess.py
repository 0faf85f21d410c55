"""Tune a model's post-processing on validation tiles, on the path users get (issue 10 point 1).

Every candidate is scored as ``cellseg evaluate --protocol native`` scores a model: each tile
through ``cellseg predict``'s own code, its GeoJSON polygons rasterised onto the ground truth,
mean AJI over the tiles (PQ, DQ, SQ and Dice reported too). The network runs once per tile; the
search is staged (``cellseg.evaluation.DEFAULT_TUNING_GRIDS``: watershed thresholds, then the
minimum areas around the best thresholds). Use validation tiles only: the test tiles are for
the final report.

    python examples/tune_postprocess.py --data ../shared/data/monuseg/train \
        --ids ../shared/data/monuseg/val_ids.txt --json tuning.json --out tuned.safetensors

``--out`` writes a copy of the model whose stored post-processing is the best found, which
``cellseg predict --model`` and ``cellseg evaluate --model`` then use as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellseg.checkpoint import default_model_path, load_bundle, save_bundle  # noqa: E402
from cellseg.data import find_ids_file, find_samples, load_sample, read_ids  # noqa: E402
from cellseg.evaluation import TUNING_METRICS, postprocess_of, tune_postprocess  # noqa: E402
from cellseg.inference import Predictor  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of validation tiles")
    parser.add_argument(
        "--ids", type=Path, default=None, help="ids to use (default: val_ids.txt beside --data)"
    )
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the best and every row")
    parser.add_argument("--out", type=Path, default=None, help="model copy with the best")
    return parser.parse_args(argv)


def validation_samples(data: Path, ids_file: Path | None):
    ids_file = ids_file or find_ids_file(data)
    if ids_file is None:
        raise SystemExit(f"error: no val_ids.txt beside {data}; pass --ids")
    wanted = set(read_ids(ids_file))
    return [load_sample(f) for f in find_samples(data) if f.image_id in wanted]


def print_rows(rows: list[dict], best: dict) -> None:
    names = ("fg_threshold", "marker_threshold", "min_marker_area_um2", "min_area_um2")
    header = "".join(f"{n[:12]:>13}" for n in names) + "".join(f"{m:>8}" for m in TUNING_METRICS)
    print("stage " + header)
    for row in rows:
        mark = "  <- best" if all(row[n] == best[n] for n in names) else ""
        print(
            f"{row['stage']:>5} "
            + "".join(f"{row[n]:13g}" for n in names)
            + "".join(f"{row[m]:8.4f}" for m in TUNING_METRICS)
            + mark
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = validation_samples(args.data, args.ids)
    model_path = args.model or default_model_path()
    bundle = load_bundle(model_path)
    predictor = Predictor(bundle, device=args.device, precision=args.precision)
    start = time.perf_counter()
    best, rows = tune_postprocess(
        predictor, samples, postprocess_of(bundle), progress=sys.stderr.isatty()
    )
    seconds = time.perf_counter() - start
    print_rows(rows, best.to_dict())
    print(
        f"{len(rows)} candidates on {len(samples)} tiles in {seconds:.0f} s "
        f"(precision {predictor.precision}); best: {json.dumps(best.to_dict())}"
    )
    if args.json is not None:
        report = {
            "model": str(model_path),
            "precision": predictor.precision,
            "tiles": [s.image_id for s in samples],
            "best": best.to_dict(),
            "rows": rows,
        }
        partial = args.json.with_name(args.json.name + ".partial")
        partial.write_text(json.dumps(report, indent=2))
        os.replace(partial, args.json)
    if args.out is not None:
        meta = {**bundle.meta, "postprocess": best.to_dict(), "postprocess_tuning": rows}
        save_bundle(args.out, bundle.model, bundle.config, meta, half=True)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
