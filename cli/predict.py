"""``cellseg predict``: segment the nuclei of whole-slide images into GeoJSON and Zarr.

Only click and the standard library are imported at module level; torch and the pipeline are
imported when the command runs, so ``cellseg --help`` stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import device_option, fail, tta_option, user_errors

OBJECT_TYPES = ("detection", "cell", "annotation")  # cellseg.geojson.OBJECT_TYPES
GEOJSON_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz")  # what QuPath imports


class RoiType(click.ParamType):
    """``X,Y,W,H`` in level-0 pixels (integers, W and H > 0)."""

    name = "X,Y,W,H"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).replace(" ", "").split(",")
        try:
            x, y, w, h = (int(p) for p in parts)
        except ValueError:
            self.fail(f"{value!r} is not four integers X,Y,W,H", param, ctx)
        if w <= 0 or h <= 0:
            self.fail(f"{value!r}: width and height must be > 0", param, ctx)
        return (x, y, w, h)


def _check_suffix(path: Path | None, allowed: tuple[str, ...], option: str) -> None:
    if path is not None and not path.name.lower().endswith(allowed):
        fail(f"{option} {path}: expected a file ending in {', '.join(allowed)}")


def _check_outputs(slides, out_dir, geojson, zarr_path, overlay, summary):
    """The explicit output paths of the run, checked against the slides; usage errors exit."""
    from cellseg.predict import SlideOutputs

    explicit = {"--out": geojson, "--zarr": zarr_path, "--overlay": overlay, "--summary": summary}
    given = [name for name, value in explicit.items() if value is not None]
    if len(slides) > 1:
        if given:
            fail(f"{', '.join(given)} need a single slide; use --out-dir for several slides")
        if out_dir is None:
            fail("several slides need --out-dir")
        stems = [s.stem for s in slides]
        duplicates = sorted({s for s in stems if stems.count(s) > 1})
        if duplicates:
            fail(f"slides share the name {duplicates[0]!r}; their outputs in --out-dir would clash")
    elif out_dir is None and not given:
        fail("nothing to write: give --out, --zarr, --overlay, --summary or --out-dir")
    _check_suffix(geojson, GEOJSON_SUFFIXES, "--out")
    _check_suffix(overlay, (".png", ".jpg", ".jpeg", ".tif", ".tiff"), "--overlay")
    _check_suffix(summary, (".json",), "--summary")
    return SlideOutputs(geojson=geojson, zarr=zarr_path, overlay=overlay, summary=summary)


class ShardType(click.ParamType):
    """``I/N``: the I-th (0-based) of N disjoint shares of the slide list."""

    name = "I/N"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from cellseg.scheduling import parse_shard

        try:
            return parse_shard(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _slide_list(slides, slide_list, shard):
    """The slides of this run (arguments, globs, --slides) and this shard's share of them."""
    from cellseg.scheduling import expand_slides, shard_slides

    everything = expand_slides(slides, slide_list)
    if not everything:
        fail(f"{slide_list}: lists no slides" if slide_list else "give SLIDES or --slides FILE")
    if shard is None:
        return everything, everything
    mine = shard_slides(everything, *shard)
    click.echo(f"shard {shard[0]}/{shard[1]}: {len(mine)} of {len(everything)} slides", err=True)
    return everything, mine


def _model_file(model_path: Path | None) -> Path:
    from cellseg.checkpoint import default_model_path

    if model_path is not None:
        return model_path
    if not default_model_path().is_file():
        fail(
            "no default model is installed with this copy of cellseg; pass --model "
            "<checkpoint.safetensors> (e.g. runs/wsi/best.safetensors from cellseg train)"
        )
    return default_model_path()


def _load_predictor(model_path: Path | None, device: str, tta: bool = False):
    from cellseg.checkpoint import load_bundle
    from cellseg.inference import Predictor

    return Predictor(load_bundle(_model_file(model_path)), device=device, tta=tta)


def _model_spec(model_path: Path | None, device: str, tta: bool):
    """The model for Dask workers to load: checked here once, so that a bad file is one error."""
    from cellseg.checkpoint import file_sha256, load_bundle
    from cellseg.slidetask import ModelSpec

    model_path = _model_file(model_path)
    load_bundle(model_path)  # ModelError: one line, before any task starts
    # Absolute, as the workers' working folder is not ours.
    return ModelSpec(model_path.resolve(), file_sha256(model_path), device, tta)


def _execution(scheduler, device, n_slides):
    """Dask resources and LocalCluster layout for ``--scheduler`` and ``--device``."""
    if scheduler is None:
        return None, None
    from cellseg.scheduling import require_distributed

    require_distributed()  # before the model is loaded: the install hint comes at once
    if scheduler != "local":
        # The workers decide "auto" themselves; "cuda" only runs where the GPU resource is.
        return ({"GPU": 1} if device == "cuda" else None), None
    import torch

    from cellseg.inference import resolve_device
    from cellseg.scheduling import local_layout

    gpus = torch.cuda.device_count() if resolve_device(device).type == "cuda" else 0
    layout = local_layout(n_slides, gpus=gpus)
    return layout.resources, layout


def _slide_task(scheduler, layout, model_path, device, tta, options, out_dir, explicit):
    """``slide -> record``: :func:`cellseg.slidetask.run_slide` with the job bound (picklable)."""
    from dataclasses import replace
    from functools import partial

    from cellseg.slidetask import SlideJob, run_slide

    if scheduler is None:  # in this process: the model is loaded once, here
        job = SlideJob(None, options, out_dir, explicit, progress=sys.stderr.isatty())
        return partial(run_slide, job=job, predictor=_load_predictor(model_path, device, tta))
    spec = _model_spec(model_path, device, tta)
    if layout is not None:
        spec = replace(spec, torch_threads=layout.torch_threads)
    # Workers have their own working folder: they get absolute paths.
    absolute = {k: v.absolute() for k, v in vars(explicit).items() if v is not None}
    out_dir = out_dir.absolute() if out_dir is not None else None
    return partial(run_slide, job=SlideJob(spec, options, out_dir, replace(explicit, **absolute)))


def _report(slide, outcome) -> bool:
    """Prints one slide's outcome; True when it failed."""
    if isinstance(outcome, BaseException):  # a bug or a lost worker, not an expected failure
        text = str(outcome).strip()
        first = text.splitlines()[0] if text else ""
        click.echo(f"error: {slide}: {type(outcome).__name__}: {first}", err=True)
        return True
    if outcome["status"] == "skipped":
        click.echo(f"{slide}: skipped, outputs exist (--overwrite to redo)", err=True)
    elif outcome["status"] == "failed":
        click.echo(f"error: {outcome['error']}", err=True)
        return True
    else:
        result = outcome["summary"]
        resumed = " (resumed)" if outcome["resumed"] else ""
        click.echo(
            f"{slide}: {result['nuclei']} nuclei, {result['tiles']} tiles, "
            f"{result['seconds']:.1f} s{resumed} -> {', '.join(outcome['outputs'])}"
        )
    return False


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("slides", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--slides",
    "slide_list",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Slide list: one path per line (# comments), or a CSV with a 'path' column; "
    "relative paths are relative to the list. Quoted globs in SLIDES also work ('**/*.svs').",
)
@click.option(
    "--shard",
    type=ShardType(),
    default=None,
    help="Only the I-th (0-based) of N disjoint, balanced shares of the slides, for array "
    "jobs (see examples/slurm_array.sbatch).",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="local|ADDRESS",
    help="Run the slides as Dask tasks: 'local' starts a LocalCluster here, tcp://HOST:8786 "
    "uses a running scheduler (needs the 'distributed' extra; see examples/dask_cluster.sh).",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Checkpoint (.safetensors); default: the model shipped with cellseg.",
)
@click.option(
    "--out",
    "geojson",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Nuclei for QuPath: .geojson, or .geojson.gz for gzip (single slide).",
)
@click.option(
    "--zarr",
    "zarr_path",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Zarr v3 group with probability and labels (single slide).",
)
@click.option(
    "--overlay",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Downsampled picture with the outlines drawn, .png/.jpg (single slide).",
)
@click.option(
    "--summary",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON run summary (single slide).",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write <stem>.geojson, <stem>.zarr and <stem>.json per slide here.",
)
@click.option(
    "--backend",
    type=click.Choice(["openslide", "tiffslide"]),
    default="openslide",
    show_default=True,
    help="Slide reader (plain PNG/JPEG/TIFF images also work).",
)
@click.option(
    "--mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="µm per level-0 pixel, overriding the slide's metadata.",
)
@click.option(
    "--roi",
    type=RoiType(),
    default=None,
    help="Only this rectangle, in level-0 pixels as QuPath shows the slide.",
)
@click.option(
    "--no-tissue-mask", is_flag=True, help="Run every tile of the slide (or ROI), glass included."
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Tiles per model call (raise it on a GPU, e.g. 256).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Slide-reading processes (0: a thread). Default: half the cores, at most 4.",
)
@click.option(
    "--label-workers",
    type=click.IntRange(min=0),
    default=None,
    help="Processes for instance extraction and polygons (0: a thread). "
    "Default: (cores - 2) / 2, at most 8.",
)
@device_option
@tta_option
@click.option(
    "--object-type",
    type=click.Choice(OBJECT_TYPES),
    default="detection",
    show_default=True,
    help="QuPath object type of each nucleus.",
)
@click.option("--overwrite", is_flag=True, help="Replace existing outputs instead of skipping.")
@user_errors
def predict_command(
    slides,
    slide_list,
    shard,
    scheduler,
    model_path,
    geojson,
    zarr_path,
    overlay,
    summary,
    out_dir,
    backend,
    mpp,
    roi,
    no_tissue_mask,
    batch_size,
    workers,
    label_workers,
    device,
    tta,
    object_type,
    overwrite,
):
    """Segment the nuclei of one or more whole-slide images.

    Each slide is read at the model's resolution, tissue tiles are run through the network and
    blended without seams, and every nucleus becomes one QuPath detection. Slides whose outputs
    exist are skipped (unless --overwrite); an interrupted slide resumes where it stopped; a
    slide that cannot be read is reported and the others go on (exit status 2 at the end).

    \b
    Examples:
      cellseg predict slide.svs --out nuclei.geojson --zarr nuclei.zarr --overlay overview.png
      cellseg predict cohort/*.svs --out-dir results/ --device cuda --batch-size 256
      cellseg predict slide.mrxs --roi 20000,15000,4000,4000 --mpp 0.243 --out roi.geojson.gz
      cellseg predict --slides cohort.csv --out-dir results/ --scheduler tcp://head:8786
      cellseg predict 'cohort/**/*.svs' --out-dir results/ --shard 0/8
    """
    everything, mine = _slide_list(slides, slide_list, shard)
    explicit = _check_outputs(everything, out_dir, geojson, zarr_path, overlay, summary)
    from contextlib import closing

    from cellseg.predict import PredictOptions
    from cellseg.scheduling import run_tasks

    options = PredictOptions(
        backend=backend,
        mpp=mpp,
        roi_xywh=roi,
        tissue_mask=not no_tissue_mask,
        batch_size=batch_size,
        workers=workers,
        label_workers=label_workers,
        object_type=object_type,
        overwrite=overwrite,
    )
    if not mine:
        return  # an empty shard: nothing to do is not an error
    resources, layout = _execution(scheduler, device, len(mine))
    task = _slide_task(scheduler, layout, model_path, device, tta, options, out_dir, explicit)
    # Workers have their own working folder: they get absolute paths, we print the given ones.
    given = {(p.absolute() if scheduler else p): p for p in mine}
    failed = 0
    runs = run_tasks(task, list(given), scheduler, resources=resources, layout=layout)
    try:
        with closing(runs):
            for slide, outcome in runs:
                failed += _report(given[slide], outcome)
    except KeyboardInterrupt:
        if scheduler is not None:  # Dask cancels queued tasks but cannot stop running ones
            click.echo("stopped; slides already running on workers finish there", err=True)
        click.echo("the same command resumes the unfinished slides", err=True)
        raise
    if failed:
        if len(mine) > 1:
            click.echo(f"{failed} of {len(mine)} slides failed", err=True)
        sys.exit(2)
