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


def domain_roots(args) -> dict[str, Path]:
    """The datasets the model is packaged for: MoNuSeg always, CoNSeP when given."""
    roots = {"monuseg": args.data}
    if args.consep is not None:
        roots["consep"] = args.consep
    return roots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder of `cellseg train`")
    parser.add_argument("--data", type=Path, required=True, help="MoNuSeg root (train/, test/)")
    parser.add_argument("--consep", type=Path, default=None, help="CoNSeP root (train/, test/)")
    parser.add_argument("--out", type=Path, default=Path("cellseg/weights/default.safetensors"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-tune", action="store_true", help="keep the run's post-processing")
    parser.add_argument("--model", type=Path, default=None, help="default: RUN/best.safetensors")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bundle = load_bundle(args.model or args.run / "best.safetensors")
    # The validation tiles the run itself held out (every domain), recorded in its meta.
    val_ids = set(bundle.meta.get("val_ids") or [])
    if not val_ids:
        val_ids = set(read_ids(find_ids_file(args.data / "train") or args.data / "val_ids.txt"))
    post = postprocess_of(bundle)
    grid = bundle.meta.get("postprocess_tuning")
    if not args.no_tune:
        t0 = time.perf_counter()
        # On predict's own path (as `cellseg evaluate --protocol native` scores), in fp32, on
        # the validation tiles of every domain, each domain weighing the same.
        predictor = Predictor(bundle, device="cpu", precision="fp32")
        by_domain = {
            name: load_split(root / "train", val_ids) for name, root in domain_roots(args).items()
        }
        by_domain = {name: group for name, group in by_domain.items() if group}
        post, grid = tune_postprocess(predictor, by_domain, postprocess_of(bundle))
        print(
            f"tuned post-processing on {sum(map(len, by_domain.values()))} validation tiles "
            f"of {', '.join(by_domain)}: {post} "
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

    results, seconds = {}, {}
    for name, root in domain_roots(args).items():
        for split, samples in (
            ("val", load_split(root / "train", val_ids)),
            ("test", load_split(root / "test")),
        ):
            t0 = time.perf_counter()
            results[name, split] = evaluate(shipped, samples, protocol="native")
            seconds[name, split] = time.perf_counter() - t0
            summary = results[name, split]["summary"]
            print(f"{name} {split}: " + ", ".join(f"{k} {summary[k]['mean']:.4f}" for k in summary))
    for (name, split), result in results.items():
        if split == "test":
            suffix = "" if name == "monuseg" else f"-{name}"
            path = args.out.with_name(f"{args.out.stem}.test-native{suffix}.json")
            path.write_text(json.dumps(result, indent=2))
    stages, commands = training_stages(args.run), packaging(args, shipped)
    card = model_card(shipped, args.out, stages, results, seconds, post, commands)
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
    data = opts["data"] if isinstance(opts["data"], list) else [opts["data"]]
    flags = [
        " ".join(f"--data {d}" for d in data) + f" --preset {opts['preset']}",
        f"--epochs {opts['epochs']}",
        f"--lr {opts['lr']:g} --seed {opts['seed']} --threads {opts['threads'] or 1}",
    ]
    flags += ["--no-cim"] * (not opts["use_cim"]) + ["--no-dac"] * (not opts["use_dac"])
    flags += ["--no-stain-aug"] * (opts["preset"] == "wsi" and not opts.get("stain_aug", False))
    flags += ["--distance-map"] * bool(opts.get("distance_head"))
    if opts.get("shift_consistency"):
        flags.append(f"--shift-consistency {opts['shift_consistency']:g}")
    if opts.get("init_from"):
        flags.append(f"--init {opts['init_from']}")
    return "cellseg train " + " ".join(flags) + f" --out {opts['out']}"


DATASETS = {
    "monuseg": "MoNuSeg 2018 (Kumar et al., IEEE TMI 2017; 40x TCGA tiles of 7 organs from many "
    "hospitals), licence CC BY-NC-SA 4.0",
    "consep": "CoNSeP (Graham et al., Medical Image Analysis 2019; colorectal adenocarcinoma, "
    "UHCW, 40x), licence Apache-2.0, used as the 256x256 patch cut in ../shared/data/consep",
}


def dataset_description(name: str) -> str:
    """The card's line for a domain; a split view of a dataset is named ``<dataset>-<view>``
    after its folder (the trainer names domains after their folders)."""
    return DATASETS.get(name) or DATASETS.get(name.split("-")[0], name)


def packaging(args, bundle) -> list[str]:
    """The commands that turned the run into the shipped file, as this invocation was given.

    With a learned rejection in the model (``--model``, made by ``examples/fit_rejection.py``
    from a first, tuning pass of this script), the three steps; else the one.
    """
    consep = f" --consep {args.consep}" if args.consep else ""
    tune = f"python examples/package_model.py {args.run} --data {args.data}{consep}"
    if "rejection" not in bundle.meta or args.model is None:
        return [tune + (" --no-tune" if args.no_tune else "")]
    # The first pass's output is not recorded in the model; RESULTS' recipe puts it beside the
    # rejecting copy as default.safetensors, so name it only where that file is really there.
    tuned = args.model.with_name("default.safetensors")
    tuned = tuned if tuned.is_file() else Path("TUNED.safetensors")
    data = f" --data {args.data}" + (f" --data {args.consep}" if args.consep else "")
    return [
        f"{tune} --out {tuned}",
        f"python examples/fit_rejection.py {tuned} --out {args.model}{data}",
        f"{tune} --model {args.model} --no-tune",
    ]


def lineage(stages: list[dict]) -> str:
    """Where the first stage started: another run folder is a stage itself; weights whose run
    is not here are named by the SHA-256 the trainer recorded (options.json ``init_sha256``)."""
    first = stages[0]["options"]
    if not first["options"].get("init_from"):
        return "random initialisation"
    sha = first.get("init_sha256", "unknown")
    return f"`--init` weights SHA-256 `{sha}` (an earlier model, see docs/RESULTS.md)"


def rejection_line(meta: dict) -> list[str]:
    rejection = meta.get("rejection")
    if not rejection:
        return []
    return [
        '- **Learned rejection** of false positives (`meta["rejection"]`, cellseg/rejection.py): '
        f"logistic regression on {len(rejection['features'])} per-nucleus measurements, fitted "
        f"on the training tiles, threshold {rejection['threshold']:g} chosen on the validation "
        "sets."
    ]


def model_card(bundle, path, stages, results, seconds, post, package_commands) -> str:
    def fmt(summary, key: str) -> str:
        return f"{summary[key]['mean']:.4f} ± {summary[key]['std']:.4f}"

    options, log, opts = stages[-1]["options"], stages[-1]["log"], stages[-1]["options"]["options"]
    best = max((r for r in log if r.get("best")), key=lambda r: r["val_dice"], default=log[-1])
    total_s = sum(r["seconds"] for st in stages for r in st["log"])
    epochs = " + ".join(
        f"{len(st['log'])} (budget {st['options']['options']['epochs']})" for st in stages
    )
    cfg = json.dumps(bundle.config.to_dict())
    cim = "on" if opts["use_cim"] else "off"
    outputs = "3 classes (background, nucleus interior, nucleus boundary)"
    if bundle.config.distance_head:
        outputs += " and a distance map (each nucleus's normalised distance transform, the seeds)"
    if opts.get("shift_consistency"):
        outputs += f"; shift-consistency term, weight {opts['shift_consistency']:g}"
    meta = bundle.meta
    commands = [f"  {i + 1}. `{train_command(st)}`" for i, st in enumerate(stages)]
    commands += [
        f"  {len(stages) + 1 + i}. `{command}`" for i, command in enumerate(package_commands)
    ]
    datasets = meta.get("datasets") or {"monuseg": {"train": len(meta["train_ids"])}}
    data_lines = [
        f"  - {dataset_description(name)}: {d.get('train', '?')} training images, "
        f"{d.get('val', '?')} held out for validation"
        for name, d in datasets.items()
    ]
    views = [name for name in datasets if name not in DATASETS and name.split("-")[0] in DATASETS]
    if views:
        data_lines.append(
            f"  ({', '.join(views)}: a split view of the dataset, symlinks to its images, masks "
            "and mpp.json with its own train/val_ids.txt, to validate on an earlier model's "
            "held-out tiles; docs/RESULTS.md gives the commands.)"
        )
    rows = []
    for (name, split), result in sorted(results.items()):
        summary = result["summary"]
        cells = " | ".join(fmt(summary, k) for k in ("dice", "aji", "pq", "dq", "sq"))
        n = len(result["per_image"])
        rows.append(f"| {name} {split} | {n} | {cells} | {seconds[name, split]:.0f} s |")
    lines = [
        "# cellseg default model",
        "",
        f"- **Architecture**: CausalCellSegmenter (arXiv 2403.06066), config `{cfg}`",
        f"  ({options['params'] / 1e6:.2f} M parameters, {options['gflops_224']:.2f} GFLOPs per",
        f"  224² tile), {outputs}, CIM {cim}.",
        f"- **Resolution**: {meta['mpp']} µm/px, 224² tiles. Weights stored as fp16 safetensors.",
        f"- **Training precision**: {meta.get('precision', 'fp32')} (the last stage).",
        "- **Training data** (each resampled from its own mpp to the model's; equal crops per",
        "  domain per epoch; validation split by whole source tile):",
        *data_lines,
        "  The weights derive from MoNuSeg's CC BY-NC-SA 4.0 data and are offered under the same",
        "  non-commercial, share-alike terms.",
        "- **Commands** (a later stage starts from the previous stage's best weights, `--init`:",
        "  a warm restart with a fresh optimiser and cosine schedule; the first from "
        f"{lineage(stages)}):",
        *commands,
        f"- **Epochs**: {epochs}; best validation Dice of the last stage",
        f"  {best['val_dice']:.4f} at its epoch {best['epoch']}"
        + (f" (per domain {best['val_dice_by_domain']})" if "val_dice_by_domain" in best else "")
        + f"; {total_s / 60:.0f} min of training in all, on a 2-core CPU (no GPU).",
        "- **Post-processing** (tuned for AJI on predict's path, mean over the validation sets):",
        f"  `{json.dumps(post.to_dict())}`",
        *rejection_line(meta),
        f"- **SHA-256**: `{file_sha256(path)}`",
        "",
        "## Metrics (native protocol: the polygons `cellseg predict` writes, rasterised onto the",
        "ground truth; mean ± std over images; precision `auto` on the packaging machine)",
        "",
        "| set | images | Dice | AJI | PQ | DQ | SQ | time |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Command: `cellseg evaluate --data ../shared/data/monuseg/test --protocol native` (and",
        "`--data ../shared/data/consep/test`); per-image values in "
        f"`{path.stem}.test-native*.json`. Validation rows are the tiles the run held out; the",
        "test sets were not used for any choice.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
