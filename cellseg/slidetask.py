"""One slide of a batch as a picklable task: ``run_slide(slide_path, job) -> record``.

The body of ``cellseg predict``'s per-slide loop, moved out of the CLI so that
:func:`cellseg.scheduling.run_tasks` can run it in this process or on Dask workers (each worker
loads the model once through :func:`cellseg.scheduling.cached_predictor`). Expected failures
(:class:`~cellseg.errors.CellsegError`: unreadable slide, unknown mpp) become a ``failed``
record; anything else is a bug and propagates (the executor reports it for that slide).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CellsegError
from .predict import PredictOptions, SlideOutputs, predict_slide
from .scheduling import cached_predictor, can_start_processes, prepare_worker, worker_name


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load the model itself (the key of its model cache)."""

    path: Path
    sha256: str | None = None
    device: str = "auto"
    tta: bool = False
    amp: bool = True
    torch_threads: int | None = None  # None: this host's cores split between its workers


@dataclass(frozen=True)
class SlideJob:
    """Everything but the slide: model, options and where the outputs go.

    ``outputs`` are explicit output paths (single-slide runs); ``out_dir`` gives each slide
    ``<stem>.geojson``, ``.zarr`` and ``.json`` there; an explicit path wins.
    """

    model: ModelSpec | None
    options: PredictOptions = field(default_factory=PredictOptions)
    out_dir: Path | None = None
    outputs: SlideOutputs = field(default_factory=SlideOutputs)
    progress: bool = False

    def outputs_for(self, slide_path: Path) -> SlideOutputs:
        base = SlideOutputs.in_dir(self.out_dir, slide_path) if self.out_dir else SlideOutputs()
        given = self.outputs
        return SlideOutputs(
            geojson=given.geojson or base.geojson,
            zarr=given.zarr or base.zarr,
            overlay=given.overlay or base.overlay,
            summary=given.summary or base.summary,
        )


def _worker_options(options: PredictOptions) -> PredictOptions:
    """Reader and labelling pools as threads where this process may not start processes."""
    if can_start_processes():
        return options
    from dataclasses import replace

    return replace(options, workers=0, label_workers=0)


def run_slide(slide_path: str | Path, job: SlideJob, predictor: Any = None) -> dict[str, Any]:
    """Predicts one slide of a batch; returns its record.

    Args:
        slide_path: the slide.
        job: model, options and outputs (see :class:`SlideJob`).
        predictor: an already loaded model (serial runs); None: ``job.model`` through this
            process's model cache.

    Returns:
        ``{"slide", "status", "error", "resumed", "outputs", "summary", "worker"}``: status
        ``done``
        (``summary`` is :func:`cellseg.predict.predict_slide`'s), ``skipped`` (every output
        exists; ``overwrite`` is off) or ``failed`` (``error`` is the one-line message).
    """
    slide_path = Path(slide_path)
    outputs = job.outputs_for(slide_path)
    record: dict[str, Any] = {
        "slide": str(slide_path),
        "status": "done",
        "error": None,
        "resumed": outputs.is_resumable(),
        "outputs": [str(p) for p in outputs.paths()],
        "summary": None,
        "worker": worker_name(),
    }
    options = job.options
    if not options.overwrite and not record["resumed"] and outputs.existing() == outputs.paths():
        record["status"] = "skipped"
        return record
    try:
        if predictor is None:
            spec = job.model
            device = prepare_worker(spec.device, spec.torch_threads)
            predictor = cached_predictor(str(spec.path), spec.sha256, device, spec.tta, spec.amp)
        options = _worker_options(options)
        record["summary"] = predict_slide(
            slide_path, predictor, outputs, options, progress=job.progress
        )
    except CellsegError as exc:
        record.update(status="failed", error=str(exc))
    return record
