"""One slide of a cohort as a self-contained task, and the cohort report ``cohort.csv``.

:func:`run_slide` is what ``cellseg predict`` runs for every slide, in this process or as a task
on a Dask worker (:func:`cellseg.scheduling.run_tasks` runs ``partial(run_slide, job=job)``): a
top-level, picklable function of a slide path and a picklable :class:`SlideJob` (options, where
the outputs go, model *path*), returning a plain dict, the slide's row of ``cohort.csv``. The
model is loaded through a per-process cache (:func:`cached_predictor`), so a worker process
loads it once for all its slides.

A slide that fails with an unexpected error is retried once (``SlideJob.retries``); expected
failures (``CellsegError``: a broken slide, unknown mpp, a full disk) would only fail again and are
recorded at once. Another process holding the slide's lock gives status ``busy`` (that process
records the slide). A Dask worker that dies on a slide is the caller's to record
(:func:`failed_row`).

:func:`update_cohort` merges rows into ``cohort.csv`` keyed by slide, under a short lock, written
atomically, so several processes (or runs) can share one report.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .atomic import AtomicFile
from .errors import BusyError, CellsegError, ModelError, OutputError
from .outputs import os_error_message
from .predict import PredictOptions, SlideOutputs, _precision_of, predict_slide
from .scheduling import can_start_processes, prepare_worker, worker_name

log = logging.getLogger(__name__)

COHORT_COLUMNS = (
    "slide",
    "status",  # done, skipped (outputs of the same run exist), failed, busy (locked elsewhere)
    "error",
    "nuclei",
    "tissue_mm2",
    "nuclei_per_mm2",
    "mpp",
    "mpp_source",
    "seconds",
    "model_sha256",
    "precision",
    "worker",  # the Dask worker that ran the slide (its name or address), else the host
)
COHORT_LOCK_WAIT_S = 60.0  # a cohort.csv lock older than this belongs to a dead process

_PREDICTORS: dict[tuple, Any] = {}


@dataclass(frozen=True)
class SlideJob:
    """How to process a slide, without the slide path (picklable: no model, no open file).

    Attributes:
        outputs: explicit output paths (a single slide's ``--out``, ``--zarr``, ...).
        options: reading, tiling and post-processing choices.
        model_path: checkpoint; None: the model shipped with cellseg.
        device: ``auto``, ``cpu`` or ``cuda``.
        tta: test-time augmentation.
        retries: further attempts after an unexpected failure.
        progress: draw a progress bar on stderr.
        out_dir: each slide's ``<stem>.geojson``, ``.zarr``, ``.json`` go here (an explicit
            path in ``outputs`` wins); None: only ``outputs``.
        overlays: with ``out_dir``, also ``<stem>.png``.
        model_sha256: the client's model file hash; a worker whose copy differs refuses to run.
        torch_threads: CPU threads for torch in the process that runs the slide; None: as it
            is (in a Dask worker: the host's cores split between its workers).
        precision: ``auto``, ``fp32`` or ``bf16`` (``auto`` is resolved where the slide runs:
            a worker's own hardware decides).
    """

    outputs: SlideOutputs = field(default_factory=SlideOutputs)
    options: PredictOptions = field(default_factory=PredictOptions)
    model_path: Path | None = None
    device: str = "auto"
    tta: bool = False
    retries: int = 1
    progress: bool = False
    out_dir: Path | None = None
    overlays: bool = False
    model_sha256: str | None = None
    torch_threads: int | None = None
    precision: str = "auto"

    def outputs_for(self, slide_path: str | Path) -> SlideOutputs:
        """The slide's outputs: ``outputs`` where given, else ``out_dir/<stem>.*``."""
        if self.out_dir is None:
            return self.outputs
        base = SlideOutputs.in_dir(self.out_dir, Path(slide_path), overlay=self.overlays)
        given = self.outputs
        return SlideOutputs(
            geojson=given.geojson or base.geojson,
            zarr=given.zarr or base.zarr,
            overlay=given.overlay or base.overlay,
            summary=given.summary or base.summary,
        )

    def absolute(self) -> SlideJob:
        """The same job with absolute paths, for worker processes in another working folder."""
        given = {k: v.absolute() for k, v in vars(self.outputs).items() if v is not None}
        return replace(
            self,
            outputs=replace(self.outputs, **given),
            model_path=None if self.model_path is None else self.model_path.absolute(),
            out_dir=None if self.out_dir is None else self.out_dir.absolute(),
        )


def cached_predictor(
    model_path: Path | None,
    device: str = "auto",
    tta: bool = False,
    sha256: str | None = None,
    precision: str = "auto",
) -> Any:
    """The ``cellseg.inference.Predictor`` of a checkpoint, loaded once per process.

    The key holds the file's size and modification time, so a file replaced between two runs of
    a long-lived worker is loaded again. ``sha256``: the client's hash of the file, checked when
    it is loaded, so a worker whose copy differs (another file system) fails instead of mixing
    two models in one cohort.
    """
    from .checkpoint import default_model_path, file_sha256, load_bundle
    from .inference import Predictor

    path = Path(model_path) if model_path is not None else default_model_path()
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, device, tta, precision)
    if key not in _PREDICTORS:
        if sha256 is not None and file_sha256(path) != sha256:
            raise ModelError(f"{path}: this worker's copy differs from the client's (SHA-256)")
        _PREDICTORS.clear()  # one model per process at a time
        bundle = load_bundle(path)
        _PREDICTORS[key] = Predictor(bundle, device=device, precision=precision, tta=tta)
    return _PREDICTORS[key]


def _row(slide: Path, status: str, error: str = "", **values: Any) -> dict[str, Any]:
    row = dict.fromkeys(COHORT_COLUMNS, "")
    row.update({"slide": str(Path(slide).absolute()), "status": status, "error": error})
    row["worker"] = worker_name() or socket.gethostname()
    row.update({k: ("" if v is None else v) for k, v in values.items() if k in row})
    return row


def summary_row(slide: Path, summary: dict[str, Any], precision: str | None) -> dict[str, Any]:
    """The cohort row of a finished (or skipped) slide's run summary."""
    nuclei = int(summary.get("nuclei", 0))
    area = summary.get("tissue_area_mm2")
    if area is None:
        area = summary.get("processed_area_mm2")
    density = round(nuclei / area, 2) if area else None
    return _row(
        slide,
        "skipped" if summary.get("skipped") else "done",
        "; ".join(summary.get("warnings", [])),
        nuclei=nuclei,
        tissue_mm2=None if area is None else round(float(area), 6),
        nuclei_per_mm2=density,
        mpp=summary.get("slide_mpp"),
        mpp_source=summary.get("mpp_source"),
        seconds=summary.get("seconds"),
        model_sha256=(summary.get("model") or {}).get("sha256"),
        precision=precision,
    )


def failed_row(slide: str | Path, exc: BaseException) -> dict[str, Any]:
    """The row of a slide whose task ended in ``exc`` outside :func:`run_slide` (e.g. a Dask
    worker that died on it), with a one-line error."""
    if isinstance(exc, CellsegError):
        error = str(exc)
    else:
        error = f"{slide}: internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"
    return {**_row(Path(slide), "failed", error), "worker": ""}  # where it ran is not known


def _process_options(options: PredictOptions) -> PredictOptions:
    """Reader and labelling pools as threads where this process may not start processes (a
    daemonic Dask worker); :func:`cellseg.predict.predict_slide` records the numbers used."""
    if can_start_processes():
        return options
    return replace(options, workers=0, label_workers=0)


def _model(job: SlideJob) -> Any:
    device = prepare_worker(job.device, job.torch_threads)
    return cached_predictor(job.model_path, device, job.tta, job.model_sha256, job.precision)


def run_slide(slide_path: str | Path, job: SlideJob, predictor: Any = None) -> dict[str, Any]:
    """Processes one slide; returns its ``cohort.csv`` row (never raises for a failed slide).

    Args:
        slide_path: the slide.
        job: options and outputs (:meth:`SlideJob.outputs_for` the slide).
        predictor: a loaded model to use instead of ``job.model_path`` (the CLI passes the one
            it loaded for a run in its own process; Dask workers leave it None and use
            :func:`cached_predictor`).

    The row has every column of :data:`COHORT_COLUMNS`; failures have ``status`` ``failed`` and
    the one-line ``error``. Unexpected exceptions (bugs) are logged with their traceback.
    KeyboardInterrupt propagates (the partial state is kept for resuming).
    """
    slide = Path(slide_path)
    outputs = job.outputs_for(slide)
    options = _process_options(job.options)
    error = ""
    for attempt in range(1 + max(0, job.retries)):
        try:
            model = predictor or _model(job)
            summary = predict_slide(slide, model, outputs, options, progress=job.progress)
            return summary_row(slide, summary, _precision_of(model, job.options))
        except BusyError as exc:
            return _row(slide, "busy", str(exc))
        except CellsegError as exc:  # expected failures (bad slide, full disk) would only repeat
            return _row(slide, "failed", str(exc))
        except Exception as exc:  # a bug or a transient failure: retried, then recorded
            detail = " ".join(str(exc).split())
            error = f"{slide}: internal error: {type(exc).__name__}: {detail}"
            log.error("%s", error, exc_info=exc)
        if attempt < job.retries:
            log.warning("%s: failed (%s); retrying once", slide, error)
    return _row(slide, "failed", error)


# --------------------------------------------------------------------------------- cohort.csv


@contextlib.contextmanager
def _short_lock(path: Path, wait_s: float = COHORT_LOCK_WAIT_S):
    """An O_EXCL lock file held for a read-modify-write of a small shared file."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime > wait_s:
                    path.unlink()  # its owner died while holding it
                    continue
            if time.monotonic() > deadline:
                raise OutputError(f"{path}: held by another process for too long") from None
            time.sleep(0.05)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        path.unlink(missing_ok=True)


def read_cohort(path: Path) -> list[dict[str, str]]:
    """Rows of an existing ``cohort.csv`` ([] when there is none)."""
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value


def update_cohort(path: Path, rows: list[dict[str, Any]]) -> None:
    """Merges ``rows`` into ``path`` (one row per slide, the newest wins), atomically.

    A ``busy`` row never replaces an existing row: the process that holds the slide writes its
    own. Rows are sorted by slide so the file does not depend on finishing order.
    """
    path = Path(path)
    try:
        _merge_cohort(path, rows)
    except OSError as exc:
        message = os_error_message(exc, path.parent)
        if message is None:
            raise
        raise OutputError(message.replace("the same command resumes", "run again")) from exc


def _merge_cohort(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _short_lock(path.with_name(path.name + ".lock")):
        merged = {row["slide"]: row for row in read_cohort(path)}
        for row in rows:
            if row["status"] == "busy" and row["slide"] in merged:
                continue
            merged[row["slide"]] = {k: _csv_value(row.get(k, "")) for k in COHORT_COLUMNS}
        with AtomicFile(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COHORT_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for slide in sorted(merged):
                writer.writerow(merged[slide])
