"""``cellseg train``: train CausalCellSegmenter (or a baseline) on MoNuSeg."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import device_option, fail, precision_option, user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data",
    required=True,
    multiple=True,
    type=click.Path(path_type=Path),
    help="MoNuSeg folder (with train/) or the training folder itself; or a patch folder "
    "(images/ + instance_masks/ + mpp.json, like CoNSeP). Repeat for several domains (wsi).",
)
@click.option(
    "--preset",
    type=click.Choice(["wsi", "paper"]),
    default="wsi",
    show_default=True,
    help="wsi: 224 px crops at --mpp; paper: whole tile resized to 224 (UCTransNet).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("runs/cellseg"),
    show_default=True,
    help="Run folder: log.jsonl, best/last checkpoints.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Epoch budget (cosine length). Default 400 (paper) / 150 (wsi).",
)
@click.option("--batch-size", type=click.IntRange(min=2), default=8, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="AdamW learning rate.")
@click.option(
    "--arch",
    type=click.Choice(["causal", "unet", "attention_unet"]),
    default="causal",
    show_default=True,
    help="CausalCellSegmenter or a Table 1 baseline.",
)
@click.option(
    "--model-size",
    type=click.Choice(["default", "paper", "tiny"]),
    default="default",
    show_default=True,
    help="Widths: default 16..256, paper 32..512 (SPEC §6.2).",
)
@click.option(
    "--mpp",
    type=float,
    default=0.5,
    show_default=True,
    help="wsi preset: resolution of the training crops in µm/px.",
)
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Early stopping: epochs without a better validation Dice.",
)
@click.option(
    "--binary",
    is_flag=True,
    help="Two classes (the paper's output) instead of adding a boundary class.",
)
@click.option(
    "--distance-map",
    is_flag=True,
    help="Also regress each nucleus's normalised distance map (a 4th output channel) and seed "
    "the watershed from it instead of the interior class (docs/RESULTS.md compares the two).",
)
@click.option(
    "--shift-consistency",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Weight of a translation-consistency term (wsi preset, beyond the paper): two 224 px "
    "windows of each crop, up to 64 px apart, must predict the same probabilities where they "
    "overlap, so a nucleus gets the same outline wherever the tile grid puts it. 0: off.",
)
@click.option("--no-cim", is_flag=True, help="Ablation: uniform sample weights (plain CE).")
@click.option("--no-dac", is_flag=True, help="Ablation: CNN + Transformer backbone only.")
@click.option(
    "--no-stain-aug",
    is_flag=True,
    help="Ablation (wsi preset): no haematoxylin-eosin stain augmentation.",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@click.option(
    "--init",
    "init_from",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Fine-tune: start from this model's weights (same config); fresh optimiser and schedule.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for torch (default: torch's choice).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="DataLoader processes augmenting the next batches beside the step (0: in the main "
    "process). Pays where cores are spare; see benchmarks/README.md.",
)
@click.option(
    "--compile",
    "compile_model",
    is_flag=True,
    help="torch.compile the model (minutes to compile on a CPU; no gain shown there).",
)
@device_option
@precision_option
@user_errors
def train_command(
    data,
    preset,
    out_dir,
    epochs,
    batch_size,
    lr,
    arch,
    model_size,
    mpp,
    patience,
    binary,
    distance_map,
    shift_consistency,
    no_cim,
    no_dac,
    no_stain_aug,
    resume,
    init_from,
    seed,
    threads,
    workers,
    compile_model,
    device,
    precision,
):
    """Train on MoNuSeg with the causal (CIM) loss, keeping the best model on validation Dice.

    \b
    Example:
      cellseg train --data ../shared/data/monuseg --preset paper --epochs 400 --out runs/paper
      cellseg train --data ../shared/data/monuseg --preset paper --precision bf16 --out runs/bf16
      cellseg train --data ../shared/data/monuseg --out runs/wsi --resume
      cellseg train --data ../shared/data/monuseg --init runs/wsi/best.safetensors --out runs/ft
      cellseg train --data ../shared/data/monuseg --data ../shared/data/consep --out runs/multi
    """
    from cellseg.outputs import check_writable
    from cellseg.training import TrainOptions, train

    if preset == "paper" and len(data) > 1:
        fail("the paper preset trains on one dataset (give --data once)")
    if binary and distance_map:
        fail("--distance-map needs the three classes (drop --binary)")
    if shift_consistency and preset == "paper":
        fail("--shift-consistency is for the wsi preset")
    check_writable([out_dir / "best.safetensors"])  # a read-only --out fails now, not at epoch 1
    opts = TrainOptions(
        data=[str(d) for d in data],
        out=str(out_dir),
        preset=preset,
        arch=arch,
        model_size=model_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        use_cim=not no_cim,
        use_dac=not no_dac,
        num_classes=2 if binary else 3,
        distance_head=distance_map,
        shift_consistency=shift_consistency,
        mpp=mpp,
        device=device,
        precision=precision,
        seed=seed,
        threads=threads,
        workers=workers,
        compile=compile_model,
        init_from=str(init_from) if init_from else None,
        stain_aug=not no_stain_aug and preset == "wsi",
    )
    # Progress bars only on a terminal: logs of batch jobs get the one line per epoch.
    summary = train(opts, resume=resume, progress=sys.stderr.isatty())
    click.echo(
        f"done: {summary['epochs']} epochs, best val Dice {summary['best_val_dice']:.4f} "
        f"at epoch {summary['best_epoch']}; checkpoints in {out_dir}"
    )
