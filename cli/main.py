"""The ``cellseg`` command group. Sub-commands import torch lazily so ``--help`` is instant."""

from __future__ import annotations

import click

from cellseg import __version__

from .evaluate import evaluate_command
from .train import train_command

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="cellseg")
def cellseg() -> None:
    """Nucleus segmentation for H&E whole-slide images with CausalCellSegmenter.

    \b
    Examples:
      cellseg predict slide.svs --out nuclei.geojson
      cellseg train --data monuseg/ --out runs/wsi
      cellseg evaluate --data monuseg/test --model runs/wsi/best.safetensors
    """


cellseg.add_command(train_command, "train")
cellseg.add_command(evaluate_command, "evaluate")
try:  # the predict command lives in its own module
    from .predict import predict_command

    cellseg.add_command(predict_command, "predict")
except ImportError:  # pragma: no cover - only while the module is being written
    pass


def main() -> None:
    cellseg(prog_name="cellseg")


if __name__ == "__main__":
    main()
