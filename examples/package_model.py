"""Turn a finished `cellseg train` run into the model shipped inside the package.

Steps (issue 4): tune the post-processing on the *validation* tiles (on predict's own path, as
examples/tune_postprocess.py does), store the weights as fp16 safetensors with their config and
metadata, evaluate on the test tiles (native protocol: the polygons predict writes; reported,
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
from cellseg.evaluation import evaluate, postprocess_of, tune_postprocess
from cellseg.inference import Predictor


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
    # On predict's own path (as `cellseg evaluate --protocol native` scores), in fp32.
    predictor = Predictor(bundle, device="cpu", precision="fp32")
    post, grid = tune_postprocess(predictor, val, postprocess_of(bundle))
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
    card = model_card(shipped, args.out, training_stages(args.run), result, seconds, post)
    args.out.with_name("MODEL_CARD.md").write_text(card)
    print(card)


def training_stages(run: Path) -> list[dict]:
    """The run and, through ``--init``, the runs it was fine-tuned from (oldest first).

    Each stage: ``run`` folder, ``options`` (its options.json) and ``log`` (its log.jsonl rows).
    """
    stages = []
    while run is not None:
        options = json.loads((run / "options.json").read_text())
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        stages.insert(0, {"run": run, "options": options, "log": log})
        init = options["options"].get("init_from")
        run = Path(init).parent if init and (Path(init).parent / "options.json").is_file() else None
    return stages


def train_command(stage: dict) -> str:
    """The ``cellseg train`` command line that produced a stage."""
    opts = stage["options"]["options"]
    flags = [
        f"--data {opts['data']} --preset {opts['preset']} --epochs {opts['epochs']}",
        f"--lr {opts['lr']:g} --seed {opts['seed']} --threads {opts['threads'] or 1}",
    ]
    flags += ["--no-cim"] * (not opts["use_cim"]) + ["--no-dac"] * (not opts["use_dac"])
    if opts.get("init_from"):
        flags.append(f"--init {opts['init_from']}")
    return "cellseg train " + " ".join(flags) + f" --out {opts['out']}"


def model_card(bundle, path, stages, result, seconds, post) -> str:
    s = result["summary"]

    def fmt(key: str) -> str:
        return f"{s[key]['mean']:.4f} ± {s[key]['std']:.4f}"

    options, log, opts = stages[-1]["options"], stages[-1]["log"], stages[-1]["options"]["options"]
    best = max((r for r in log if r.get("best")), key=lambda r: r["val_dice"], default=log[-1])
    total_s = sum(r["seconds"] for st in stages for r in st["log"])
    epochs = " + ".join(
        f"{len(st['log'])} (budget {st['options']['options']['epochs']})" for st in stages
    )
    cfg = json.dumps(bundle.config.to_dict())
    cim = "on" if opts["use_cim"] else "off"
    meta = bundle.meta
    commands = [f"  {i + 1}. `{train_command(st)}`" for i, st in enumerate(stages)]
    commands.append(
        f"  {len(stages) + 1}. `python examples/package_model.py {stage_run(stages[-1])} "
        "--data ../shared/data/monuseg`"
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
        "- **Commands** (a later stage starts from the previous stage's best weights, `--init`:",
        "  a warm restart with a fresh optimiser and cosine schedule):",
        *commands,
        f"- **Epochs**: {epochs}; best validation Dice of the last stage",
        f"  {best['val_dice']:.4f} at its epoch {best['epoch']}; {total_s / 60:.0f} min of",
        "  training in all, on a 2-core CPU (no GPU).",
        "- **Post-processing** (tuned for AJI on the validation tiles):",
        f"  `{json.dumps(post.to_dict())}`",
        f"- **SHA-256**: `{file_sha256(path)}`",
        "",
        "## Test metrics (MoNuSeg 2018 test, 14 tiles, native protocol: predict's polygons; "
        "mean ± std over tiles)",
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


def stage_run(stage: dict) -> str:
    return str(stage["options"]["options"]["out"])


if __name__ == "__main__":
    main()
