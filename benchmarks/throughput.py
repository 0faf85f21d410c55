"""Throughput benchmark of whole-slide prediction (issue 5): reader, model, end to end, memory.

In one run on a generated slide (synthetic H&E-like tissue, a JPEG pyramidal SVS at 0.25 µm/px,
see ``synthetic_slide.py``) this script measures:

1. **reader only**: the regions the pipeline reads (one ``read_region`` per block of tissue
   tiles, with the pipeline's read-ahead worker processes), cut into the same 224 px network
   tiles and stacked into the same batches, in tiles/s;
2. **model only**: ``cellseg.inference.Predictor`` on those batches, already in memory, in
   tiles/s;
3. **end to end**: ``cellseg.predict.predict_slide`` (the function behind ``cellseg predict``),
   GeoJSON and Zarr outputs on, in a fresh subprocess, in tiles/s and in seconds per mm² of
   tissue (the model runs at its own mpp, 0.5 µm/px for the shipped model);
4. **peak resident memory** of that run: the peak of its main process and of its largest
   worker process (Linux ``VmHWM``), and the sampled peak of the whole process tree's summed
   RSS (psutil);

and prints, last, the ratio ``end-to-end / min(reader-only, model-only)`` (issue 5 asks for at
least 0.85) and the memory figures. ``--scale-test`` repeats the end-to-end run on a slide of 4×
the area and prints the growth of peak memory (issue 5 asks for less than 20%); ``--train``
adds the training throughput of the real ``cellseg.training.Trainer`` (images/s of its
``train_epoch``: loader, augmentation and steps, batch 8, 224², CIM on) in fp32 and in the
precision ``--precision auto`` picks on this machine, with their ratio (issue 9).

Run from the repository root: ``python benchmarks/throughput.py`` (see ``benchmarks/README.md``).

Only light modules are imported at module level: the reader's worker processes are started with
``spawn`` and re-import this file, and must not pay for (or hold the memory of) torch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

BENCH_DIR = Path(__file__).resolve().parent
SLIDE_MPP = 0.25  # level-0 resolution of the generated slides (a 40× scan)
MiB = 1024 * 1024
RATIO_TARGET = 0.85  # issue 5, point 2
GROWTH_TARGET = 0.20  # issue 5, point 3
MIN_STREAMING_BLOCKS = 3  # blocks per side before labelling can overlap with inference
RSS_SAMPLE_S = 0.05
WSI_EPOCH_IMAGES = 24 * 8  # wsi preset: 24 training tiles × 8 random crops per epoch


# -------------------------------------------------------------------------------------- results


@dataclass
class Hardware:
    """Where the numbers were measured."""

    cpu_model: str
    logical_cores: int
    physical_cores: int | None
    usable_cores: int
    load_average_1m: float  # before the run; near the core count: other work shares the CPU
    torch_version: str
    torch_threads: int
    device: str
    gpu_name: str | None


@dataclass
class ModelInfo:
    """The checkpoint benchmarked."""

    path: str
    name: str
    random_fallback: bool  # the default model file was absent: random weights, same compute
    parameters: int
    mpp: float
    tile_px: int


@dataclass
class SlideInfo:
    """The slide benchmarked (generated, or ``--slide``); sizes at level 0."""

    path: str
    width_px: int
    height_px: int
    mpp: float
    generated: bool
    tissue_fraction: float | None = None  # of the generated slide's area
    nuclei_drawn: int | None = None
    generate_seconds: float | None = None


@dataclass
class StageResult:
    """One isolated stage: ``tiles`` network tiles in ``seconds``."""

    tiles: int
    seconds: float
    tiles_per_second: float


@dataclass
class EndToEndResult:
    """One ``predict_slide`` run in its own process; memory in MiB."""

    slide: SlideInfo
    tiles: int
    seconds: float
    tiles_per_second: float
    tissue_area_mm2: float | None
    seconds_per_mm2: float | None
    nuclei: int
    peak_before_predict_mb: float  # the child's peak after loading and warming up the model
    peak_rss_main_mb: float  # the child's main process over its whole life (VmHWM)
    peak_rss_worker_mb: float  # the largest reader/labelling worker process (VmHWM, sampled)
    peak_rss_tree_mb: float  # largest sampled sum of RSS over the child and its workers
    precision: str = "fp32"  # what the predictor ran (``--precision`` resolved)
    stage_cpu_s: dict[str, float] = field(default_factory=dict)  # stage_times.stage_cpu
    cpu_process_s: float = 0.0  # the child process, all threads, during predict_slide
    cpu_children_s: float = 0.0  # reader and labelling processes
    unattributed_cpu_s: float = 0.0  # process CPU outside the stages (torch's threads, ...)


@dataclass
class ScaleResult:
    """Peak memory at 1× and 4× the slide area (issue 5 point 3: growth < 20%)."""

    base: EndToEndResult
    quadruple: EndToEndResult
    growth_main: float  # (peak 4× - peak 1×) / peak 1×, main process
    growth_tree: float  # the same for the sampled process tree


@dataclass
class TrainResult:
    """``Trainer.train_epoch`` (loader and augmentation, forward, CIM weights, loss, backward,
    AdamW) in one precision and worker setting."""

    device: str
    precision: str
    channels_last: bool
    workers: int
    compile: bool
    model_size: str
    batch_size: int
    tile_px: int
    cim: bool
    steps: int
    seconds: float
    images_per_second: float
    wsi_epoch_seconds: float  # an epoch of the wsi preset (192 crops), validation excluded
    chosen: bool = False  # the precision ``--precision auto`` picks on this machine


@dataclass
class Settings:
    """The throughput options, with the pipeline's machine-dependent defaults resolved."""

    batch_size: int
    workers: int
    label_workers: int
    backend: str
    device: str
    threads: int | None
    compile: bool
    model_batches: int  # the model-only stage runs the first this many batches
    precision: str = "auto"  # --precision: auto, fp32 or bf16


@dataclass
class BenchmarkResult:
    """Everything one run measured (``--json`` writes it); None for stages not run."""

    hardware: Hardware
    model: ModelInfo
    settings: Settings
    slide: SlideInfo | None = None
    reader_only: StageResult | None = None
    model_only: StageResult | None = None
    end_to_end: EndToEndResult | None = None
    ratio: float | None = None
    scale: ScaleResult | None = None
    train: list[TrainResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def stage_result(tiles: int, seconds: float) -> StageResult:
    return StageResult(tiles, seconds, tiles / seconds if seconds > 0 else 0.0)


def pipeline_ratio(end_to_end_tps: float, reader_tps: float, model_tps: float) -> float:
    """``end-to-end / min(reader-only, model-only)`` tiles/s: 1.0 means the pipeline runs as fast
    as its slowest stage alone, i.e. the stages overlap perfectly."""
    return end_to_end_tps / min(reader_tps, model_tps)


def relative_growth(before: float, after: float) -> float:
    """``(after - before) / before``: 0.15 means 15% more."""
    return (after - before) / before


# ------------------------------------------------------------------------------------- hardware


def cpu_model_name() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_hardware(device: Any) -> Hardware:
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return Hardware(
        cpu_model=cpu_model_name(),
        logical_cores=os.cpu_count() or 1,
        physical_cores=psutil.cpu_count(logical=False),
        usable_cores=usable or 1,
        load_average_1m=round(os.getloadavg()[0], 2),
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
        device=str(device),
        gpu_name=gpu,
    )


# ---------------------------------------------------------------------------------------- model


def write_random_model(path: Path) -> Path:
    """A checkpoint of the default architecture with random weights (seeded): the same compute
    as the shipped model, for use until ``cellseg/weights/default.safetensors`` exists."""
    import torch

    from cellseg.checkpoint import save_bundle
    from cellseg.model import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig()
    meta = {"mpp": 0.5, "tile_px": 224, "name": "random-init-default-config"}
    save_bundle(path, build_model(config), config, meta)
    return path


def resolve_model(
    model: Path | None, work_dir: Path, default: Path | None = None
) -> tuple[Path, bool]:
    """The checkpoint to benchmark and whether it is the random-weights fallback.

    ``model`` when given; else the shipped default model; else (not shipped yet) a random
    checkpoint of the default config written into ``work_dir``.
    """
    if model is not None:
        return Path(model), False
    if default is None:
        from cellseg.checkpoint import default_model_path

        default = default_model_path()
    if Path(default).is_file():
        return Path(default), False
    return write_random_model(work_dir / "random-default-config.safetensors"), True


def describe_model(bundle: Any, path: Path, fallback: bool) -> ModelInfo:
    from cellseg.model import count_parameters

    return ModelInfo(
        path=str(path),
        name=bundle.name,
        random_fallback=fallback,
        parameters=count_parameters(bundle.model),
        mpp=float(bundle.meta.get("mpp", 0.5)),
        tile_px=int(bundle.meta.get("tile_px", bundle.config.tile_px)),
    )


# ---------------------------------------------------------------------------------------- slide


def slide_side_px(size_mm: float | None, size_px: int | None) -> int:
    """Level-0 side of the square slide: ``--size-px``, else ``--size-mm`` at 0.25 µm/px."""
    if size_px is not None:
        return int(size_px)
    return round(float(size_mm) * 1000.0 / SLIDE_MPP)


def generate_slide(path: Path, side_px: int) -> SlideInfo:
    """Writes a square synthetic slide of ``side_px`` level-0 pixels (see synthetic_slide.py)."""
    from synthetic_slide import write_synthetic_slide

    start = time.perf_counter()
    written = write_synthetic_slide(path, side_px, side_px, mpp=SLIDE_MPP)
    return SlideInfo(
        path=str(written.path),
        width_px=written.width_px,
        height_px=written.height_px,
        mpp=written.mpp,
        generated=True,
        tissue_fraction=written.tissue_fraction,
        nuclei_drawn=written.nuclei,
        generate_seconds=time.perf_counter() - start,
    )


def existing_slide(path: Path, backend: str) -> SlideInfo:
    from cellseg.slide import open_slide

    with open_slide(path, backend) as slide:
        width, height = slide.dimensions_xy
        return SlideInfo(str(path), int(width), int(height), float(slide.mpp), generated=False)


# ------------------------------------------------------------------------ reader and model alone


def block_reads(plan: Any) -> list[Any]:
    """The pipeline's reads for a fresh run (``cellseg.pipeline.block_jobs``), in raster order,
    without the blocks that hold no tissue tile (the pipeline reads nothing for them)."""
    from cellseg.pipeline import block_jobs

    return [job for job in block_jobs(plan) if job.tiles]


class _BatchRecorder:
    """Stands in for the model inside the pipeline's batcher: counts (and keeps the first few)
    batches and returns uninitialised probabilities, so only reading, cutting and stacking run."""

    def __init__(self, num_classes: int, keep: int) -> None:
        self.num_classes = num_classes
        self.keep = keep
        self.kept: list[np.ndarray] = []
        self.tiles = 0

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.tiles += len(tiles)
        if len(self.kept) < self.keep:
            self.kept.append(tiles)
        return np.empty((len(tiles), self.num_classes, *tiles.shape[1:3]), np.float32)


class _DiscardPost:
    """The post-processing thread's inbox, discarding (the reader stage times no stitching)."""

    def put(self, message: tuple | None) -> None:
        pass


def time_reader(
    plan: Any, source: Any, workers: int, batch_size: int, keep_batches: int
) -> tuple[StageResult, list[np.ndarray]]:
    """Reads every block as the pipeline does, cuts and batches its tiles; nothing else runs.

    The reads are ``cellseg.pipeline.block_jobs`` through the pipeline's read-ahead
    (``RegionReader``), and the tiles are cut and stacked by the pipeline's own batcher
    (``cellseg.pipeline._Batcher``) with the model replaced by a recorder. The worker processes
    are started (and open the slide) before the clock starts, with tiny warm-up reads: that
    start-up is paid once per slide, not per tile. (Warming up with a whole block would leave
    it in OpenSlide's tile cache and flatter the timed reads.)

    Returns:
        The timing, and the first ``keep_batches`` batches, for :func:`time_model`.
    """
    from cellseg.pipeline import PipelineStats, _Batcher
    from cellseg.readahead import ReadRequest, RegionReader

    reads = block_reads(plan)
    recorder = _BatchRecorder(plan.num_classes, keep_batches)
    batcher = _Batcher(recorder, plan.layout, batch_size, _DiscardPost(), PipelineStats())
    with RegionReader(source, workers) as reader:
        tiny = ReadRequest(reads[0].request.origin_xy, (16, 16), plan.model_mpp)
        for _ in reader.read_ahead([(None, tiny)] * (2 * max(workers, 1))):
            pass
        start = time.perf_counter()
        images = reader.read_ahead((read.block, read.request) for read in reads)
        for read, (_, image) in zip(reads, images, strict=True):
            batcher.add_block(read.block, read.tiles, image, read.origin_yx)
        batcher.flush()
        seconds = time.perf_counter() - start
    return stage_result(recorder.tiles, seconds), recorder.kept


def time_model(predictor: Any, batches: Sequence[np.ndarray]) -> StageResult:
    """Runs the predictor on in-memory batches; one warm-up call (allocator, cuDNN autotuning,
    ``torch.compile``) is not timed. Predictor returns host arrays, so GPU work is included."""
    predictor(batches[0])
    start = time.perf_counter()
    for batch in batches:
        predictor(batch)
    return stage_result(sum(len(b) for b in batches), time.perf_counter() - start)


# ------------------------------------------------------------------------------ end to end


def child_request(slide_path: Path, model_path: Path, out_dir: Path, settings: Settings) -> dict:
    return {
        "slide": str(slide_path),
        "model": str(model_path),
        "out_dir": str(out_dir),
        "settings": dataclasses.asdict(settings),
    }


def child_main(request_path: str) -> None:
    """Entry point of the end-to-end subprocess: one ``predict_slide`` run, results as JSON.

    Writes ``<request>.result.json`` with the run summary, the seconds of the call and the
    memory figures, so the peak RSS belongs to this run alone.
    """
    import torch
    from stage_times import stage_cpu  # benchmarks/ is on the child's path

    from cellseg.checkpoint import load_bundle
    from cellseg.inference import Predictor
    from cellseg.predict import PredictOptions, SlideOutputs, predict_slide

    request = json.loads(Path(request_path).read_text())
    settings = Settings(**request["settings"])
    if settings.threads:
        torch.set_num_threads(settings.threads)
    bundle = load_bundle(request["model"])
    predictor = Predictor(
        bundle, device=settings.device, compile=settings.compile, precision=settings.precision
    )
    tile_px = predictor.tile_px
    predictor(np.zeros((settings.batch_size, tile_px, tile_px, 3), np.uint8))  # as time_model
    peak_before = process_peak_mb(psutil.Process())
    out_dir = Path(request["out_dir"])
    options = PredictOptions(
        backend=settings.backend,
        batch_size=settings.batch_size,
        workers=settings.workers,
        label_workers=settings.label_workers,
        overwrite=True,
    )
    outputs = SlideOutputs(geojson=out_dir / "nuclei.geojson", zarr=out_dir / "nuclei.zarr")
    start = time.perf_counter()
    summary, stages = stage_cpu(
        lambda: predict_slide(request["slide"], predictor, outputs, options)
    )
    seconds = time.perf_counter() - start
    result = {
        "summary": summary,
        "seconds": seconds,
        "precision": predictor.precision,
        "stages": stages,
        "peak_before_predict_mb": peak_before,
        "peak_rss_main_mb": process_peak_mb(psutil.Process()),
    }
    Path(request_path + ".result.json").write_text(json.dumps(result, default=str))


def process_peak_mb(process: psutil.Process) -> float:
    """Peak RSS of a live process in MiB: Linux's ``VmHWM``, else its current RSS.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries it across ``exec``, so a process started
    from a big parent reports the parent's peak (``VmHWM`` belongs to the new image alone).
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return process.memory_info().rss / MiB


@dataclass
class TreeMemory:
    """Memory of a process tree, sampled: peak per process and peak of the sum of RSS.

    A process counts from the second sample that sees it: right after ``fork`` (or during a
    ``vfork``), before its ``exec``, it still shows its parent's memory. ``VmHWM`` only grows,
    so skipping the first sighting loses nothing but processes younger than one interval.
    """

    root_pid: int
    peak_by_pid: dict[int, float] = field(default_factory=dict)
    peak_sum_mb: float = 0.0
    seen: set[int] = field(default_factory=set)

    def sample(self, root: psutil.Process) -> None:
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            if proc.pid not in self.seen:
                self.seen.add(proc.pid)
                continue
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_info().rss / MiB
                peak = process_peak_mb(proc)
                self.peak_by_pid[proc.pid] = max(self.peak_by_pid.get(proc.pid, 0.0), peak)
        self.peak_sum_mb = max(self.peak_sum_mb, total)

    @property
    def largest_worker_mb(self) -> float:
        """Largest peak among the root's descendants (0 without any)."""
        others = (v for pid, v in self.peak_by_pid.items() if pid != self.root_pid)
        return max(others, default=0.0)


def run_sampled(command: list[str], log_path: Path) -> tuple[int, TreeMemory]:
    """Runs ``command`` to completion, sampling its process tree every RSS_SAMPLE_S seconds."""
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        memory = TreeMemory(child.pid)
        root = psutil.Process(child.pid)
        while child.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                memory.sample(root)
            time.sleep(RSS_SAMPLE_S)
    return child.returncode, memory


def run_end_to_end(
    slide: SlideInfo, model_path: Path, settings: Settings, work_dir: Path
) -> EndToEndResult:
    """``predict_slide`` in a fresh Python process (imports, model and pools of its own)."""
    out_dir = Path(tempfile.mkdtemp(prefix="e2e-", dir=work_dir))
    request_path = out_dir / "request.json"
    request_path.write_text(
        json.dumps(child_request(Path(slide.path), model_path, out_dir, settings))
    )
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); "
        "from throughput import child_main; child_main(sys.argv[1])"
    )
    log_path = out_dir / "child.log"
    status, memory = run_sampled([sys.executable, "-c", code, str(request_path)], log_path)
    if status != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"end-to-end run failed (exit {status}):\n" + "\n".join(tail))
    raw = json.loads(Path(str(request_path) + ".result.json").read_text())
    raw["peak_rss_worker_mb"] = memory.largest_worker_mb
    return end_to_end_result(slide, raw, memory.peak_sum_mb)


def end_to_end_result(slide: SlideInfo, raw: dict, peak_tree_mb: float) -> EndToEndResult:
    summary, seconds = raw["summary"], float(raw["seconds"])
    tiles = int(summary["tiles_run_this_session"])
    area = summary.get("tissue_area_mm2")
    return EndToEndResult(
        slide=slide,
        tiles=tiles,
        seconds=seconds,
        tiles_per_second=tiles / seconds,
        tissue_area_mm2=area or None,
        seconds_per_mm2=seconds / area if area else None,
        nuclei=int(summary["nuclei"]),
        peak_before_predict_mb=raw["peak_before_predict_mb"],
        peak_rss_main_mb=raw["peak_rss_main_mb"],  # the child's own, exact
        peak_rss_worker_mb=raw["peak_rss_worker_mb"],
        peak_rss_tree_mb=max(peak_tree_mb, raw["peak_rss_main_mb"]),
        precision=raw["precision"],
        stage_cpu_s=raw["stages"]["stage_cpu_s"],
        cpu_process_s=raw["stages"]["cpu_process_s"],
        cpu_children_s=raw["stages"]["cpu_children_s"],
        unattributed_cpu_s=raw["stages"]["unattributed_cpu_s"],
    )


def scale_result(base: EndToEndResult, quadruple: EndToEndResult) -> ScaleResult:
    return ScaleResult(
        base=base,
        quadruple=quadruple,
        growth_main=relative_growth(base.peak_rss_main_mb, quadruple.peak_rss_main_mb),
        growth_tree=relative_growth(base.peak_rss_tree_mb, quadruple.peak_rss_tree_mb),
    )


# ------------------------------------------------------------------------------------- training


def write_training_tiles(root: Path, n_tiles: int = 4, size_px: int = 480, seed: int = 0) -> Path:
    """A MoNuSeg-layout folder (``train/images``, ``train/instance_masks``, ``val_ids.txt``) of
    synthetic H&E-like tiles with random discs at 0.25 µm/px, for ``--train`` without data."""
    import tifffile
    from PIL import Image
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    for sub in ("images", "instance_masks"):
        (root / "train" / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"SYNTHETIC-{i:02d}" for i in range(n_tiles)]
    for image_id in ids:
        labels = np.zeros((size_px, size_px), np.int32)
        for label in range(1, size_px * size_px // 2500):
            centre = tuple(rng.uniform(0, size_px, 2))
            labels[disk(centre, rng.uniform(10, 18), shape=labels.shape)] = label
        image = np.where(labels[..., None] > 0, (88, 52, 138), (226, 156, 196)).astype(float)
        image = (image + rng.normal(0, 6, image.shape)).clip(0, 255).astype(np.uint8)
        tifffile.imwrite(root / "train" / "images" / f"{image_id}.tif", image)
        Image.fromarray(labels.astype(np.uint16)).save(
            root / "train" / "instance_masks" / f"{image_id}.png"
        )
    (root / "val_ids.txt").write_text(ids[0] + "\n")
    return root


def time_training(
    data: Path,
    out: Path,
    device: str,
    precision: str,
    batch_size: int = 8,
    steps: int = 4,
    workers: int = 0,
    model_size: str = "default",
    compile_model: bool = False,
) -> TrainResult:
    """Images/s of ``cellseg.training.Trainer.train_epoch`` (the code ``cellseg train`` runs):
    loader with augmentation (``workers`` processes), forward, CIM weights, loss, backward,
    AdamW, in ``precision``. The wsi preset's epoch is shortened to about ``steps`` batches (one
    crop per tile per pass); one warm-up epoch (worker start-up, kernel selection, compile) is
    not timed. Validation is not part of it.
    """
    import math

    from cellseg.training import Trainer, TrainOptions

    opts = TrainOptions(
        data=str(data),
        out=str(out),
        preset="wsi",
        model_size=model_size,
        batch_size=batch_size,
        crops_per_tile=batch_size,  # at least one batch whatever the tile count; set below
        device=device,
        precision=precision,
        workers=workers,
        compile=compile_model,
    )
    trainer = Trainer(opts, progress=False)
    tiles = len(trainer.train_samples)
    trainer.train_set.crops_per_tile = max(1, math.ceil(steps * batch_size / tiles))
    timed_steps = len(trainer.loader)
    trainer.train_epoch()  # warm-up
    _synchronize(trainer.device)
    trainer.epoch += 1
    start = time.perf_counter()
    trainer.train_epoch()
    _synchronize(trainer.device)
    seconds = time.perf_counter() - start
    images_per_second = batch_size * timed_steps / seconds
    return TrainResult(
        device=str(trainer.device),
        precision=trainer.precision,
        channels_last=trainer.channels_last,
        workers=workers,
        compile=compile_model,
        model_size=model_size,
        batch_size=batch_size,
        tile_px=224,
        cim=opts.use_cim,
        steps=timed_steps,
        seconds=seconds,
        images_per_second=images_per_second,
        wsi_epoch_seconds=WSI_EPOCH_IMAGES / images_per_second,
    )


def benchmark_training(args: argparse.Namespace, work_dir: Path) -> list[TrainResult]:
    """fp32 and the precision ``auto`` picks here (plus ``--train-precision``), for each
    ``--train-workers`` value, all in this one run; the ratios to fp32 are printed last."""
    from cellseg.inference import resolve_device
    from cellseg.precision import resolve_precision

    data = args.train_data
    if data is None:
        data = write_training_tiles(work_dir / "train-data")
    chosen = resolve_precision("auto", resolve_device(args.device))
    precisions = list(dict.fromkeys(["fp32", chosen, *args.train_precision]))
    results = []
    for workers in args.train_workers:
        for precision in precisions:
            result = time_training(
                data,
                work_dir / f"train-{precision}-{workers}",
                args.device,
                precision,
                args.train_batch,
                args.train_steps,
                workers,
                args.train_model_size,
                args.compile,
            )
            result.chosen = precision == chosen
            say(train_line(result))
            results.append(result)
    return results


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------- printing


def _fmt_mb(value: float) -> str:
    return f"{value:,.0f} MiB"


def hardware_line(hw: Hardware) -> str:
    cores = f"{hw.logical_cores} logical / {hw.physical_cores or '?'} physical cores"
    if hw.usable_cores != hw.logical_cores:
        cores += f" ({hw.usable_cores} usable)"
    gpu = f" ({hw.gpu_name})" if hw.gpu_name else ""
    return (
        f"hardware: {hw.cpu_model}, {cores}, load average {hw.load_average_1m} before the run; "
        f"torch {hw.torch_version} with {hw.torch_threads} thread"
        f"{'s' if hw.torch_threads != 1 else ''}; device {hw.device}{gpu}"
    )


def model_line(info: ModelInfo) -> str:
    line = (
        f"model: {info.name} ({info.parameters / 1e6:.2f} M parameters, {info.tile_px} px tiles "
        f"at {info.mpp} µm/px) from {info.path}"
    )
    if info.random_fallback:
        line += (
            "\n  note: the default model cellseg/weights/default.safetensors is absent, so this "
            "is the default config with RANDOM weights: the same network compute, but its "
            "nuclei (post-processing load) differ from a trained model's"
        )
    return line


def slide_line(slide: SlideInfo) -> str:
    area = slide.width_px * slide.height_px * (slide.mpp / 1000) ** 2
    line = (
        f"slide: {slide.width_px}x{slide.height_px} px at {slide.mpp:g} µm/px "
        f"({area:.2f} mm²) {slide.path}"
    )
    if slide.generated:
        line += (
            f"\n  generated in {slide.generate_seconds:.1f} s: synthetic H&E JPEG SVS, "
            f"{100 * slide.tissue_fraction:.0f}% tissue, {slide.nuclei_drawn} nuclei drawn"
        )
    return line


def stage_line(label: str, stage: StageResult, detail: str) -> str:
    return (
        f"{label:<13} {stage.tiles:6d} tiles in {stage.seconds:8.2f} s = "
        f"{stage.tiles_per_second:8.2f} tiles/s  ({detail})"
    )


def end_to_end_line(e2e: EndToEndResult) -> str:
    stage = StageResult(e2e.tiles, e2e.seconds, e2e.tiles_per_second)
    per_mm2 = (
        f"{e2e.seconds_per_mm2:.2f} s/mm² of tissue ({e2e.tissue_area_mm2:.3f} mm²)"
        if e2e.seconds_per_mm2 is not None
        else "no tissue area"
    )
    return stage_line(
        "end to end",
        stage,
        f"predict_slide, {e2e.precision}, GeoJSON + Zarr; {per_mm2}; {e2e.nuclei} nuclei",
    )


def stage_cpu_lines(e2e: EndToEndResult) -> list[str]:
    """Where the end-to-end run's CPU seconds went (benchmarks/stage_times.py's hooks)."""
    if not e2e.stage_cpu_s:
        return []
    total = e2e.cpu_process_s + e2e.cpu_children_s
    parts = [f"{k} {v:.2f}" for k, v in e2e.stage_cpu_s.items() if v >= 0.005]
    return [
        f"CPU seconds per stage ({total:.1f} s in all): " + ", ".join(parts),
        f"  + reader/labelling processes {e2e.cpu_children_s:.2f}, unattributed (torch "
        f"intra-op threads, Zarr I/O thread, Python) {e2e.unattributed_cpu_s:.2f}",
    ]


def train_line(train: TrainResult) -> str:
    layout = ", channels_last" if train.channels_last else ""
    return (
        f"training      {train.images_per_second:.2f} images/s on {train.device}, "
        f"{train.precision}{layout}{' (auto)' if train.chosen else ''}, {train.workers} loader "
        f"workers{', compiled' if train.compile else ''} (Trainer.train_epoch, {train.model_size} "
        f"model, batch {train.batch_size}, {train.tile_px}², CIM {'on' if train.cim else 'off'}, "
        f"{train.steps} timed steps) = {train.wsi_epoch_seconds:.0f} s per wsi-preset epoch of "
        f"{WSI_EPOCH_IMAGES} crops"
    )


def train_ratio_lines(results: Sequence[TrainResult]) -> list[str]:
    """Each setting's images/s against fp32 with no loader workers, measured in this run."""
    base = next((r for r in results if r.precision == "fp32" and r.workers == 0), results[0])
    return [
        f"training ratio {r.precision}, {r.workers} workers{' (auto)' if r.chosen else ''} / "
        f"fp32, 0 workers = {r.images_per_second:.2f} / {base.images_per_second:.2f} = "
        f"{r.images_per_second / base.images_per_second:.2f}x"
        for r in results
        if r is not base
    ]


def memory_lines(e2e: EndToEndResult) -> list[str]:
    side = f"{e2e.slide.width_px}x{e2e.slide.height_px} px"
    return [
        f"peak RSS, end to end ({side} slide, {e2e.tiles} tiles):",
        f"  main process   {_fmt_mb(e2e.peak_rss_main_mb):>11} (peak before predict_slide, "
        f"model loaded and run once: {_fmt_mb(e2e.peak_before_predict_mb)})",
        f"  largest worker {_fmt_mb(e2e.peak_rss_worker_mb):>11} (reader / labelling process)",
        f"  process tree   {_fmt_mb(e2e.peak_rss_tree_mb):>11} (sum of RSS, sampled every "
        f"{RSS_SAMPLE_S * 1000:.0f} ms)",
    ]


def scale_lines(scale: ScaleResult) -> list[str]:
    def one(label: str, e2e: EndToEndResult) -> str:
        side = e2e.slide.width_px
        area = side * side * (e2e.slide.mpp / 1000) ** 2
        return (
            f"scale test {label}: {side}² px ({area:.2f} mm², {e2e.tiles} tiles): peak RSS main "
            f"{_fmt_mb(e2e.peak_rss_main_mb)}, tree {_fmt_mb(e2e.peak_rss_tree_mb)}"
        )

    verdict = "meets" if max(scale.growth_main, scale.growth_tree) < GROWTH_TARGET else "MISSES"
    return [
        one("1x", scale.base),
        one("4x", scale.quadruple),
        f"peak RSS growth for 4x area: main {100 * scale.growth_main:+.1f}%, tree "
        f"{100 * scale.growth_tree:+.1f}% ({verdict} the issue 5 target < "
        f"{100 * GROWTH_TARGET:.0f}%)",
    ]


def ratio_line(result: BenchmarkResult) -> str:
    e2e, reader, model = result.end_to_end, result.reader_only, result.model_only
    bottleneck = "reader" if reader.tiles_per_second < model.tiles_per_second else "model"
    verdict = "meets" if result.ratio >= RATIO_TARGET else "MISSES"
    return (
        f"ratio end-to-end / min(reader-only, model-only) = {e2e.tiles_per_second:.2f} / "
        f"{min(reader.tiles_per_second, model.tiles_per_second):.2f} ({bottleneck}) = "
        f"{result.ratio:.3f} ({verdict} the issue 5 target >= {RATIO_TARGET})"
    )


def final_lines(result: BenchmarkResult) -> list[str]:
    """What the run prints last: notes, training, the ratio, then the memory figures."""
    lines = [f"note: {note}" for note in result.notes]
    if result.train:
        lines += [train_line(train) for train in result.train]
        lines += train_ratio_lines(result.train)
    if result.ratio is not None:
        lines.append(ratio_line(result))
    if result.end_to_end is not None:
        lines += memory_lines(result.end_to_end)
    if result.scale is not None:
        lines += scale_lines(result.scale)
    return lines


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/throughput.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--size-mm", type=float, default=1.0, help="side of the square slide")
    size.add_argument("--size-px", type=int, default=None, help="side in level-0 pixels")
    size.add_argument("--slide", type=Path, default=None, help="an existing slide instead")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint; default: shipped")
    parser.add_argument("--batch-size", type=int, default=16, help="tiles per model call")
    parser.add_argument("--workers", type=int, default=None, help="reader processes (0: thread)")
    parser.add_argument("--label-workers", type=int, default=None, help="labelling processes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--precision", default="auto", choices=("auto", "fp32", "bf16"), help="model precision"
    )
    parser.add_argument("--backend", default="openslide", choices=("openslide", "tiffslide"))
    parser.add_argument(
        "--model-batches",
        type=int,
        default=16,
        help="the model-only stage times the first N batches (steady state, bounded memory)",
    )
    parser.add_argument("--scale-test", action="store_true", help="also run at 4x the area")
    parser.add_argument("--train", action="store_true", help="also time training (Trainer)")
    parser.add_argument("--train-only", action="store_true", help="only time training")
    parser.add_argument("--train-steps", type=int, default=4, help="timed training steps")
    parser.add_argument("--train-batch", type=int, default=8, help="training batch size")
    parser.add_argument(
        "--train-data", type=Path, default=None, help="MoNuSeg folder; default: synthetic tiles"
    )
    parser.add_argument(
        "--train-model-size", default="default", choices=("default", "paper", "tiny")
    )
    parser.add_argument(
        "--train-precision",
        action="append",
        default=[],
        choices=("fp32", "bf16"),
        help="also time this precision (fp32 and what auto picks are always timed)",
    )
    parser.add_argument(
        "--train-workers",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[0],
        help="DataLoader worker counts to time, comma-separated (e.g. 0,1)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep slides/outputs here")
    args = parser.parse_args(argv)
    if args.scale_test and args.slide is not None:
        parser.error("--scale-test needs a generated slide: drop --slide")
    for name in ("batch_size", "model_batches", "train_steps", "train_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def make_settings(args: argparse.Namespace) -> Settings:
    from cellseg.predict import PredictOptions, pipeline_settings

    resolved = pipeline_settings(
        PredictOptions(workers=args.workers, label_workers=args.label_workers)
    )
    return Settings(
        batch_size=args.batch_size,
        workers=resolved.workers,
        label_workers=resolved.label_workers,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        compile=args.compile,
        model_batches=args.model_batches,
        precision=args.precision,
    )


def say(line: str) -> None:
    print(line, flush=True)


def benchmark_stages(
    result: BenchmarkResult, predictor: Any, model_path: Path, work_dir: Path
) -> None:
    """Reader only, model only and end to end on ``result.slide``; fills ``result``."""
    from cellseg.errors import CellsegError
    from cellseg.predict import PredictOptions, plan_slide
    from cellseg.readahead import SlideSource
    from cellseg.slide import open_slide

    settings, slide_path = result.settings, Path(result.slide.path)
    with open_slide(slide_path, settings.backend) as slide:
        plan = plan_slide(slide, predictor, PredictOptions(backend=settings.backend))
    layout = plan.layout
    if not plan.tile_mask.any():
        raise CellsegError(f"{slide_path}: no tissue tiles to benchmark")
    say(
        f"plan: {int(plan.tile_mask.sum())} tissue tiles of {layout.tile_px} px (overlap "
        f"{layout.overlap_px} px) of {plan.tile_mask.size}, in blocks of {layout.block_px} px "
        f"at {plan.model_mpp:g} µm/px"
    )
    blocks_y, blocks_x = layout.n_blocks_yx
    if min(blocks_y, blocks_x) < MIN_STREAMING_BLOCKS:
        result.notes.append(
            f"the slide is {blocks_y}x{blocks_x} blocks of {layout.block_px} px: a region is "
            "labelled once its 3x3 block neighbourhood is predicted, so here labelling mostly "
            f"runs after inference; use --size-mm 3 or more for the steady-state ratio"
        )
    source = SlideSource(slide_path, settings.backend)
    result.reader_only, batches = time_reader(
        plan, source, settings.workers, settings.batch_size, settings.model_batches
    )
    n = settings.workers
    workers = f"{n} reader process{'es' if n > 1 else ''}" if n else "a reader thread"
    say(stage_line("reader only", result.reader_only, f"{workers}, cut into batches"))
    result.model_only = time_model(predictor, batches)
    say(stage_line("model only", result.model_only, f"batch {settings.batch_size}, in memory"))
    result.end_to_end = run_end_to_end(result.slide, model_path, settings, work_dir)
    say(end_to_end_line(result.end_to_end))
    for line in stage_cpu_lines(result.end_to_end):
        say(line)
    result.ratio = pipeline_ratio(
        result.end_to_end.tiles_per_second,
        result.reader_only.tiles_per_second,
        result.model_only.tiles_per_second,
    )


def benchmark_scale(result: BenchmarkResult, model_path: Path, work_dir: Path) -> None:
    """The end-to-end run on a slide of twice the side (4× the area)."""
    side = 2 * result.slide.width_px
    say(f"scale test: generating a {side}x{side} px slide (4x the area) ...")
    big = generate_slide(work_dir / f"synthetic-{side}px.svs", side)
    quadruple = run_end_to_end(big, model_path, result.settings, work_dir)
    say(end_to_end_line(quadruple))
    result.scale = scale_result(result.end_to_end, quadruple)


def run(args: argparse.Namespace, work_dir: Path) -> BenchmarkResult:
    import torch

    from cellseg.checkpoint import load_bundle
    from cellseg.inference import Predictor, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    hardware = describe_hardware(device)
    say(hardware_line(hardware))
    model_path, fallback = resolve_model(args.model, work_dir)
    bundle = load_bundle(model_path)
    model = describe_model(bundle, model_path, fallback)
    say(model_line(model))
    result = BenchmarkResult(hardware, model, make_settings(args), notes=run_notes(hardware, model))
    if not args.train_only:
        result.slide = benchmark_slide(args, work_dir)
        say(slide_line(result.slide))
        predictor = Predictor(
            bundle, device=args.device, compile=args.compile, precision=args.precision
        )
        benchmark_stages(result, predictor, model_path, work_dir)
        if args.scale_test:
            benchmark_scale(result, model_path, work_dir)
    if args.train or args.train_only:
        result.train = benchmark_training(args, work_dir)
    return result


def benchmark_slide(args: argparse.Namespace, work_dir: Path) -> SlideInfo:
    """``--slide``, or a generated square slide of ``--size-px`` / ``--size-mm``."""
    if args.slide is not None:
        return existing_slide(args.slide, args.backend)
    side = slide_side_px(args.size_mm, args.size_px)
    return generate_slide(work_dir / f"synthetic-{side}px.svs", side)


def run_notes(hardware: Hardware, model: ModelInfo) -> list[str]:
    """Caveats repeated with the final figures."""
    notes = []
    if hardware.load_average_1m >= 0.5 * hardware.usable_cores:
        notes.append(
            f"load average {hardware.load_average_1m} on {hardware.usable_cores} cores before "
            "the run: other processes share the machine, so these numbers are pessimistic"
        )
    if model.random_fallback:
        notes.append("random-weights model (the default model file is absent)")
    return notes


def write_json(result: BenchmarkResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(result), indent=2, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> BenchmarkResult:
    from cellseg.errors import CellsegError

    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.work_dir is not None:
            work_dir = args.work_dir
            work_dir.mkdir(parents=True, exist_ok=True)
        else:
            work_dir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="cellseg-bench-"))
            )
        try:
            result = run(args, work_dir)
        except CellsegError as exc:  # a bad --slide, --model or --device: one line, no traceback
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    if args.json is not None:
        write_json(result, args.json)
        say(f"results: {args.json}")
    say("== result ==")
    for line in final_lines(result):
        say(line)
    return result


if __name__ == "__main__":
    main()
