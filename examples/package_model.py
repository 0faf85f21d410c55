"""Turn a finished `cellseg train` run into the model shipped inside the package.

Steps (issue 4): tune the watershed thresholds on the *validation* tiles, store the weights as fp16
safetensors with their config and metadata, evaluate on the test tiles (native protocol; reported,
never used for a choice), and write a model card with the SHA-256.

    python examples/package_model.py runs/wsi-default --data ../shared/data/monuseg \
        --out cellseg/weights/default.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cellseg.checkpoint import file_sha256, load_bundle, save_bundle
from cellseg.data import find_ids_file, find_samples, load_sample, read_ids
from cellseg.evaluation import evaluate, tune_postprocess


def load_split(folder: Path, ids: set[str] | None = None):
    files = find_samples(folder)
    return [load_sample(f) for f in files if ids is None or f.image_id in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder of `cellseg train`")
    parser.add_argument("--data", type=Path, required=True, help="MoNuSeg root (train/, test/)")
    parser.add_argument("--out", type=Path, default=Path("cellseg/weights/default.safetensors"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bundle = load_bundle(args.run / "best.safetensors")
    val_ids = set(read_ids(find_ids_file(args.data / "train") or args.data / "val_ids.txt"))
    val = load_split(args.data / "train", val_ids)
    t0 = time.perf_counter()
    post, grid = tune_postprocess(bundle, val)
    print(
        f"tuned post-processing on {len(val)} validation tiles: {post} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    meta = {
        **bundle.meta,
        "name": "cellseg-default",
        "postprocess": post.to_dict(),
        "postprocess_tuning": grid,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_bundle(args.out, bundle.model, bundle.config, meta, half=True)
    shipped = load_bundle(args.out)

    test = load_split(args.data / "test")
    t0 = time.perf_counter()
    result = evaluate(shipped, test, protocol="native")
    seconds = time.perf_counter() - t0
    result_path = args.out.with_name(args.out.stem + ".test-native.json")
    result_path.write_text(json.dumps(result, indent=2))
    log = [json.loads(line) for line in (args.run / "log.jsonl").read_text().splitlines()]
    options = json.loads((args.run / "options.json").read_text())
    card = model_card(shipped, args.out, options, log, result, seconds, post)
    args.out.with_name("MODEL_CARD.md").write_text(card)
    print(card)


def model_card(bundle, path, options, log, result, seconds, post) -> str:
    s = result["summary"]

    def fmt(key: str) -> str:
        return f"{s[key]['mean']:.4f} ± {s[key]['std']:.4f}"

    opts = options["options"]
    best = max((r for r in log if r.get("best")), key=lambda r: r["val_dice"], default=log[-1])
    total_s = sum(r["seconds"] for r in log)
    cfg = json.dumps(bundle.config.to_dict())
    cim = "on" if opts["use_cim"] else "off"
    meta = bundle.meta
    train_cmd = (
        f"cellseg train --data ../shared/data/monuseg --preset {opts['preset']} "
        f"--epochs {opts['epochs']} --seed {opts['seed']} --threads 1 --out runs/wsi-default"
    )
    lines = [
        "# cellseg default model",
        "",
        f"- **Architecture**: CausalCellSegmenter (arXiv 2403.06066), config `{cfg}`",
        f"  ({options['params'] / 1e6:.2f} M parameters, {options['gflops_224']:.2f} GFLOPs per",
        f"  224² tile), 3 classes (background, nucleus interior, nucleus boundary), CIM {cim}.",
        f"- **Resolution**: {meta['mpp']} µm/px, 224² tiles. Weights stored as fp16 safetensors.",
        "- **Training data**: MoNuSeg 2018 training set (Kumar et al., TMI 2017):",
        f"  {len(meta['train_ids'])} tiles for training, {len(meta['val_ids'])} for validation",
        "  (UCTransNet split). The data is licensed CC BY-NC-SA 4.0; these weights are derived",
        "  from it and are offered under the same non-commercial, share-alike terms.",
        f"- **Command**: `{train_cmd}`, then",
        "  `python examples/package_model.py runs/wsi-default --data ../shared/data/monuseg`.",
        f"- **Epochs**: {len(log)} run (budget {opts['epochs']}); best validation Dice",
        f"  {best['val_dice']:.4f} at epoch {best['epoch']}; {total_s / 60:.0f} min of training",
        "  on a 2-core CPU (no GPU).",
        "- **Post-processing** (tuned for AJI on the validation tiles):",
        f"  `{json.dumps(post.to_dict())}`",
        f"- **SHA-256**: `{file_sha256(path)}`",
        "",
        "## Test metrics (MoNuSeg 2018 test, 14 tiles, native protocol; mean ± std over tiles)",
        "",
        "| Dice | IoU | AJI | PQ | DQ | SQ |",
        "|---|---|---|---|---|---|",
        "| " + " | ".join(fmt(k) for k in ("dice", "iou", "aji", "pq", "dq", "sq")) + " |",
        "",
        f"Evaluated in {seconds:.0f} s with `cellseg evaluate --data ../shared/data/monuseg/test",
        f"--protocol native` (per-image values: `{path.stem}.test-native.json`). The test set was",
        "not used for any choice.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
