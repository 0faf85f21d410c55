"""The ``cellseg`` command group. Sub-commands import torch lazily so ``--help`` is instant."""

from __future__ import annotations

import sys

import click

from cellseg import __version__

from .common import configure_logging
from .evaluate import evaluate_command
from .train import train_command

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class OneLineErrorGroup(click.Group):
    """click's group, but a usage error is one line (``error: ...``, exit 2) like every other
    error, instead of click's three (usage, hint, error)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `cellseg`: the help, as click
                exc.show()
                sys.exit(exc.exit_code)
            where = exc.ctx.command_path if exc.ctx is not None else "cellseg"
            click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrorGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="cellseg")
@click.option(
    "-v", "--verbose", count=True, help="More messages: -v info (mpp source, level), -vv debug."
)
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr (no progress bar).")
@click.pass_context
def cellseg(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Nucleus segmentation for H&E whole-slide images with CausalCellSegmenter.

    Exit status: 0 done, 1 a failure (one "error:" line; in a batch, any failed slide),
    2 a usage error, 130 interrupted (Ctrl-C or SIGTERM; the same command resumes).

    \b
    Examples:
      cellseg predict slide.svs --out nuclei.geojson
      cellseg train --data monuseg/ --out runs/wsi
      cellseg evaluate --data monuseg/test --model runs/wsi/best.safetensors
    """
    if verbose and quiet:
        raise click.UsageError("-v and -q contradict each other")
    configure_logging(verbose, quiet)
    ctx.obj = {"quiet": quiet, "verbose": verbose}


def _late_verbosity(ctx: click.Context, param: click.Parameter, value) -> None:
    """``cellseg predict ... -q`` means ``cellseg -q predict ...``: the flags after the
    sub-command add to the group's, and logging is configured again with the sum."""
    if not value:
        return
    settings = ctx.find_root().obj
    if param.name == "late_verbose":
        settings["verbose"] += value
    else:
        settings["quiet"] = True
    if settings["verbose"] and settings["quiet"]:
        raise click.UsageError("-v and -q contradict each other", ctx=ctx)
    configure_logging(settings["verbose"], settings["quiet"])


def _with_verbosity_flags(command: click.Command) -> click.Command:
    """Adds the group's -v/-q to a sub-command (hidden from its help; same meaning)."""
    command.params += [
        click.Option(
            ["-v", "--verbose", "late_verbose"],
            count=True,
            expose_value=False,
            callback=_late_verbosity,
            help="Same as 'cellseg -v'.",
        ),
        click.Option(
            ["-q", "--quiet", "late_quiet"],
            is_flag=True,
            expose_value=False,
            callback=_late_verbosity,
            help="Same as 'cellseg -q'.",
        ),
    ]
    return command


cellseg.add_command(_with_verbosity_flags(train_command), "train")
cellseg.add_command(_with_verbosity_flags(evaluate_command), "evaluate")
try:  # the predict command lives in its own module
    from .predict import predict_command

    cellseg.add_command(_with_verbosity_flags(predict_command), "predict")
except ImportError:  # pragma: no cover - only while the module is being written
    pass


def main() -> None:
    cellseg(prog_name="cellseg")


if __name__ == "__main__":
    main()
