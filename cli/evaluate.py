"""``cellseg evaluate``: score a model on MoNuSeg tiles (paper or native protocol)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .common import device_option, precision_option, tta_option, user_errors

COLUMNS = ("dice", "iou", "aji", "pq", "dq", "sq")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder of tiles with annotations (e.g. monuseg/test).",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Checkpoint (.safetensors); default: the model shipped with cellseg.",
)
@click.option(
    "--protocol",
    type=click.Choice(["paper", "native"]),
    default="native",
    show_default=True,
    help="paper: Dice/IoU at 224 px; native: Dice/IoU/AJI/PQ of the polygons `cellseg predict` "
    "writes for each tile, on the ground truth's grid.",
)
@click.option(
    "--ids",
    "ids_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Only the image ids listed in this file (one per line).",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write per-image values and mean ± std here.",
)
@tta_option
@device_option
@precision_option
@user_errors
def evaluate_command(data, model_path, protocol, ids_file, json_out, tta, device, precision):
    """Evaluate a checkpoint and print a per-image table with mean ± std.

    The native protocol runs each tile through predict's own code at the tile's mpp (same
    resolution, precision, post-processing and polygons as `cellseg predict`) and scores the
    polygons rasterised back onto the annotation's grid.

    \b
    Example:
      cellseg evaluate --data ../shared/data/monuseg/test --model runs/wsi/best.safetensors \\
          --protocol native --json metrics.json
    """
    from cellseg.atomic import write_atomic
    from cellseg.checkpoint import default_model_path, load_bundle
    from cellseg.data import find_samples, load_sample, read_ids
    from cellseg.evaluation import evaluate

    if json_out is not None:
        from cellseg.outputs import check_writable

        check_writable([json_out])  # before minutes of evaluation, not after
    files = find_samples(data)
    if ids_file is not None:
        wanted = set(read_ids(ids_file))
        files = [f for f in files if f.image_id in wanted]
    samples = [load_sample(f) for f in files]  # bad data fails before the model is loaded
    bundle = load_bundle(model_path or default_model_path())
    progress = sys.stderr.isatty() and not (click.get_current_context().find_root().obj or {}).get(
        "quiet"
    )
    result = evaluate(
        bundle,
        samples,
        protocol=protocol,
        device=device,
        tta=tta,
        precision=precision,
        progress=progress,
    )
    cols = [c for c in COLUMNS if c in result["summary"]]
    click.echo(f"{'image':<28}" + "".join(f"{c:>9}" for c in cols))
    for row in result["per_image"]:
        click.echo(f"{row['image_id']:<28}" + "".join(f"{row[c]:9.4f}" for c in cols))
    summ = result["summary"]
    click.echo(f"{'mean':<28}" + "".join(f"{summ[c]['mean']:9.4f}" for c in cols))
    click.echo(f"{'std':<28}" + "".join(f"{summ[c]['std']:9.4f}" for c in cols))
    if json_out is not None:
        write_atomic(json_out, json.dumps(result, indent=2))
