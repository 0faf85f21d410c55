"""``cellseg predict``: segment the nuclei of whole-slide images into GeoJSON and Zarr.

Only click and the standard library are imported at module level; torch and the pipeline are
imported when the command runs, so ``cellseg --help`` stays instant.
"""

from __future__ import annotations

import math
import sys
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import click

from .common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    device_option,
    fail,
    precision_option,
    tta_option,
    user_errors,
)

OBJECT_TYPES = ("detection", "cell", "annotation")  # cellseg.geojson.OBJECT_TYPES
GEOJSON_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz")  # what QuPath imports


class OffsetType(click.ParamType):
    """``X,Y``: two integers >= 0 (pixels at the model's mpp)."""

    name = "X,Y"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            x, y = (int(p) for p in str(value).replace(" ", "").split(","))
        except ValueError:
            self.fail(f"{value!r} is not two integers X,Y", param, ctx)
        if x < 0 or y < 0:
            self.fail(f"{value!r}: offsets must be >= 0", param, ctx)
        return (x, y)


MIN_BLOCK_PX, MAX_BLOCK_PX = 256, 16384  # below: too small for halo + overlap; above: memory


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


def _check_outputs(slides, out_dir, geojson, zarr_path, overlay, summary, overlays=False):
    """The explicit output paths of the run, checked against the slides; usage errors exit."""
    from cellseg.predict import SlideOutputs

    if overlays and out_dir is None:
        fail("--overlays writes <stem>.png in --out-dir; give --out-dir (or --overlay FILE)")
    if overlays and overlay is not None:
        fail("--overlay and --overlays contradict each other; give one")
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


def _slide_list(slides, slide_list, shard, quiet: bool):
    """The slides of this run (arguments, globs, --slides) and this shard's share of them."""
    from cellseg.scheduling import expand_slides, shard_slides

    everything = expand_slides(slides, slide_list)
    if not everything:
        fail(f"{slide_list}: lists no slides" if slide_list else "give SLIDES or --slides FILE")
    if shard is None:
        return everything, everything
    mine = shard_slides(everything, *shard)
    if not quiet:
        click.echo(
            f"shard {shard[0]}/{shard[1]}: {len(mine)} of {len(everything)} slides", err=True
        )
    return everything, mine


def _check_mpp(mpp: float | None) -> None:
    from cellseg.slide import MPP_RANGE

    low, high = MPP_RANGE
    if mpp is not None and not (math.isfinite(mpp) and low <= mpp <= high):
        fail(f"--mpp {mpp:g}: expected a resolution of {low:g}-{high:g} µm per pixel")


def _check_paths(slides, plans, model_path: Path | None, cohort: Path | None) -> None:
    """Refuses (usage error) outputs that share a path or that are inputs, before any work."""
    from cellseg.outputs import output_conflicts

    paths = [p for plan in plans for p in (*plan.paths(), *plan.bookkeeping_paths())]
    if cohort is not None:
        paths.append(cohort)
    inputs = [*slides, *([model_path] if model_path is not None else [])]
    problem = output_conflicts(paths, inputs)
    if problem is not None:
        fail(problem)


def _report(slide: Path, row: dict, outputs, quiet: bool, remote: bool = False) -> None:
    """One line per slide: the result on stdout, anything else on stderr.

    ``remote``: the slide ran on a Dask worker, whose log lines stay in the worker's log, so its
    warnings (e.g. no tissue found), recorded in the row, are printed here.
    """
    status = row["status"]
    name = click.format_filename(slide)
    if remote and status == "done" and row["error"] and not quiet:
        click.echo(f"warning: {name}: {row['error']}", err=True)
    if status == "failed":
        click.echo(f"error: {row['error']}", err=True)
    elif status == "busy":
        click.echo(f"warning: {row['error']}", err=True)
    elif status == "skipped":
        if not quiet:
            click.echo(
                f"{name}: skipped, outputs of the same run exist (--overwrite to redo)", err=True
            )
    else:
        click.echo(
            f"{name}: {row['nuclei']} nuclei, {float(row['seconds'] or 0):.1f} s -> "
            f"{', '.join(map(str, outputs.paths()))}"
        )


def _model_file(model_path: Path | None) -> Path:
    from cellseg.checkpoint import default_model_path

    if model_path is not None:
        return model_path
    if not default_model_path().is_file():
        fail(
            "no default model is installed with this copy of cellseg; pass --model "
            "<checkpoint.safetensors> (e.g. runs/wsi/best.safetensors from cellseg train)",
            code=EXIT_FAILURE,
        )
    return default_model_path()


def _load_predictor(
    model_path: Path | None, device: str, tta: bool = False, precision: str = "auto"
):
    from cellseg.checkpoint import load_bundle
    from cellseg.inference import Predictor

    bundle = load_bundle(_model_file(model_path))
    return Predictor(bundle, device=device, precision=precision, tta=tta)


def _check_model(model_path: Path | None) -> tuple[Path, str]:
    """The model file for Dask workers to load and its SHA-256, checked here once so that a bad
    file is one error before any task starts."""
    from cellseg.checkpoint import file_sha256, load_bundle

    path = _model_file(model_path)
    load_bundle(path)  # ModelError: one line
    return path, file_sha256(path)


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


def _slide_task(job, scheduler, layout, model_path, device, tta, precision):
    """``slide -> cohort row``: :func:`cellseg.batch.run_slide` with the job bound (picklable).

    In this process the model is loaded once, here; Dask workers load it themselves, once per
    worker process, and get absolute paths (their working folder is not ours).
    """
    from functools import partial

    from cellseg.batch import run_slide

    if scheduler is None:
        predictor = _load_predictor(model_path, device, tta, precision)
        return partial(run_slide, job=job, predictor=predictor)
    path, sha256 = _check_model(model_path)
    threads = layout.torch_threads if layout is not None else None
    job = replace(job, model_path=path, model_sha256=sha256, torch_threads=threads, progress=False)
    return partial(run_slide, job=job.absolute())


def _interrupted(scheduler, current) -> None:
    """One line for Ctrl-C or SIGTERM, then exit 130 (the partial state is kept)."""
    if scheduler is not None:  # Dask cancels queued tasks but cannot stop running ones
        message = "interrupted; slides already running on Dask workers finish there, the same "
        message += "command resumes the others"
    else:  # serial: the slide that was running
        message = f"{current}: interrupted; the same command resumes it"
    click.echo(message, err=True)
    sys.exit(EXIT_INTERRUPTED)


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
    help="OME-Zarr image (NGFF 0.4): probability pyramid, nuclei in labels/ (single slide).",
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
    help="Write <stem>.geojson, <stem>.zarr and <stem>.json per slide here, and cohort.csv "
    "(one row per slide: status, error, nuclei, tissue mm², ...).",
)
@click.option(
    "--overlays",
    is_flag=True,
    help="With --out-dir: also write an overlay picture <stem>.png per slide.",
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
    help="µm per level-0 pixel, overriding the slide's metadata (0.05-20).",
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
    "--block-px",
    type=click.IntRange(min=MIN_BLOCK_PX, max=MAX_BLOCK_PX),
    default=1024,
    show_default=True,
    help="Side of a read block and post-processing region at the model's mpp (rounded to whole "
    "tile strides). Memory and speed only: the nuclei are the same for every value.",
)
@click.option(
    "--grid-offset-px",
    type=OffsetType(),
    default=None,
    hidden=True,
    help="Test hook: shift the slide's tile grid by X,Y model pixels (each below the stride).",
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
@precision_option
@click.option(
    "--object-type",
    type=click.Choice(OBJECT_TYPES),
    default="detection",
    show_default=True,
    help="QuPath object type of each nucleus (cell: a cell grown around each nucleus, "
    "see --cell-expansion-um).",
)
@click.option(
    "--cell-expansion-um",
    type=click.FloatRange(min=0, max=16),
    default=None,
    help="With --object-type cell: how far each cell grows from its nucleus, without "
    "overlapping its neighbours (QuPath's cell expansion). Default: 5.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Redo slides whose outputs exist (without it, outputs of the same run are skipped and "
    "outputs of a different run are an error).",
)
@click.pass_context
@user_errors
def predict_command(
    ctx,
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
    overlays,
    backend,
    mpp,
    roi,
    no_tissue_mask,
    block_px,
    grid_offset_px,
    batch_size,
    workers,
    label_workers,
    device,
    tta,
    precision,
    object_type,
    cell_expansion_um,
    overwrite,
):
    """Segment the nuclei of one or more whole-slide images.

    Each slide is read at the model's resolution, tissue tiles are run through the network and
    blended without seams, and every nucleus becomes one QuPath detection. A slide whose
    outputs exist from the same inputs and options is skipped (a changed input or option is an
    error unless --overwrite); an interrupted slide resumes where it stopped; a slide that
    fails is reported and recorded in <out-dir>/cohort.csv, the others go on, and the exit
    status is 1 at the end.

    \b
    Examples:
      cellseg predict slide.svs --out nuclei.geojson --zarr nuclei.zarr --overlay overview.png
      cellseg predict cohort/*.svs --out-dir results/ --overlays --device cuda --batch-size 256
      cellseg predict slide.mrxs --roi 20000,15000,4000,4000 --mpp 0.243 --out roi.geojson.gz
      cellseg predict --slides cohort.csv --out-dir results/ --scheduler tcp://head:8786
      cellseg predict 'cohort/**/*.svs' --out-dir results/ --shard 0/8
    """
    if cell_expansion_um is not None and object_type != "cell":
        fail("--cell-expansion-um needs --object-type cell")
    if object_type == "cell" and cell_expansion_um is None:
        cell_expansion_um = 5.0  # QuPath's default cell expansion
    quiet = bool((ctx.obj or {}).get("quiet"))
    everything, mine = _slide_list(slides, slide_list, shard, quiet)
    explicit = _check_outputs(everything, out_dir, geojson, zarr_path, overlay, summary, overlays)
    _check_mpp(mpp)
    from cellseg.batch import SlideJob, failed_row, update_cohort
    from cellseg.outputs import SlideLock, check_writable
    from cellseg.predict import PredictOptions
    from cellseg.scheduling import run_tasks

    options = PredictOptions(
        backend=backend,
        mpp=mpp,
        roi_xywh=roi,
        tissue_mask=not no_tissue_mask,
        region_px=block_px,
        grid_offset_px=grid_offset_px or (0, 0),
        batch_size=batch_size,
        workers=workers,
        label_workers=label_workers,
        object_type=object_type,
        cell_expansion_um=cell_expansion_um or 0.0,
        overwrite=overwrite,
    )
    progress = sys.stderr.isatty() and not quiet and scheduler is None
    job = SlideJob(explicit, options, model_path, device, tta, progress=progress)
    job = replace(job, out_dir=out_dir, overlays=overlays, precision=precision)
    cohort = out_dir / "cohort.csv" if out_dir is not None else None
    # Clashes are checked on the whole list, so that every shard accepts or refuses it alike.
    _check_paths(everything, [job.outputs_for(s) for s in everything], model_path, cohort)
    if not mine:
        return  # an empty shard: nothing to do is not an error
    plans = {slide: job.outputs_for(slide) for slide in mine}
    # Before the model is loaded or any slide read: a read-only --out-dir fails in a second.
    check_writable(
        [p for plan in plans.values() for p in plan.paths()] + ([cohort] if cohort else [])
    )
    resources, layout = _execution(scheduler, device, len(mine))
    task = _slide_task(job, scheduler, layout, model_path, device, tta, precision)
    for slide, outputs in plans.items():
        # (A locked slide is another process's current work, not an interrupted run.)
        if outputs.is_resumable() and not SlideLock(outputs.lock_path).is_held() and not quiet:
            click.echo(f"{slide}: resuming the interrupted run", err=True)
    # Workers have their own working folder: they get absolute paths, we print the given ones.
    given = {(slide.absolute() if scheduler else slide): slide for slide in mine}
    pending = dict.fromkeys(mine)  # in order: a serial run's current slide is the first one
    failed = []
    runs = run_tasks(task, list(given), scheduler, resources=resources, layout=layout)
    try:
        with closing(runs):
            for item, outcome in runs:
                slide = given[item]
                del pending[slide]
                # A task that did not return a row: the worker died, or a bug outside run_slide.
                row = failed_row(slide, outcome) if isinstance(outcome, BaseException) else outcome
                _report(slide, row, plans[slide], quiet, remote=scheduler is not None)
                if cohort is not None:
                    update_cohort(cohort, [row])
                if row["status"] == "failed":
                    failed.append(slide)
    except KeyboardInterrupt:
        _interrupted(scheduler, next(iter(pending), None))
    if failed:
        if len(mine) > 1:
            names = ", ".join(str(s) for s in failed)
            where = f"; recorded in {cohort}" if cohort is not None else ""
            click.echo(f"{len(failed)} of {len(mine)} slides failed: {names}{where}", err=True)
        sys.exit(EXIT_FAILURE)
