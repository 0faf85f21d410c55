"""Where the CPU seconds of ``cellseg predict`` go, per stage, fp32 against ``auto`` (issue 11).

One run predicts the same slide several times, each in a fresh Python process with the real
``cellseg.predict.predict_slide`` (GeoJSON and Zarr outputs, default options), once per
precision (``--precision``, default ``fp32 auto``) and per code checkout (``--code``, default
this one; give a second checkout, e.g. an extracted copy of the release, to compare it side by
side). Before the slide, each process times the predictor alone on in-memory batches (model-only
tiles/s). Rounds (``--rounds``) alternate the configurations so that load from other processes
on a shared machine hits them alike.

The per-stage figures come from wrapping the pipeline's own functions (nothing is copied): for
each stage, the *busy* wall seconds of its outermost calls and the CPU seconds of the calling
thread (``time.thread_time``). The model's CPU seconds in torch's intra-op threads are not
visible to the calling thread: they are in ``unattributed`` (process CPU minus the stages), with
Python overhead. ``read`` is the CPU of the reader processes (``RUSAGE_CHILDREN``) plus any read
in this process. Labelling runs in the post-processing thread (``--label-workers 0``, the
default on 2 cores) so that its stages are visible.

Usage::

    python benchmarks/stage_times.py --slide /work/shared/data/wsi/CMU-1-Small-Region.svs
    python benchmarks/stage_times.py --size-mm 1.5 --code . --code /tmp/cellseg-release
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# stage -> (module, attribute path) of the functions whose outermost calls are that stage
STAGES: dict[str, list[tuple[str, str]]] = {
    "model": [("cellseg.inference", "Predictor.__call__")],
    "read": [("cellseg.readahead", "_read")],  # in this process only with 0 reader workers
    "batch": [("cellseg.pipeline", "cut_tiles")],
    "stitch": [
        ("cellseg.stitch", "Stitcher.add_tiles"),
        ("cellseg.stitch", "Stitcher.finish_block"),
    ],
    "zarr": [
        ("cellseg.store", f"PredictionStore.{name}")
        for name in (
            "write_probabilities",
            "write_cells",
            "read_probabilities",
            "write_pixels",
            "read_pixels",
            "write_labels",
            "finish",
        )
    ],
    "watershed": [("cellseg.nuclei", "label_instances")],
    "ownership": [("cellseg.nuclei", "owned_nuclei")],
    "polygons": [("cellseg.nuclei", "label_polygons")],
    "measurements": [
        ("cellseg.nuclei", "shape_measurements"),
        ("cellseg.nuclei", "stain_measurements"),
    ],
    "geojson": [
        ("cellseg.geojson", "GeoJSONWriter.write"),
        ("cellseg.geojson", "GeoJSONWriter.close"),
    ],
    "journal": [("cellseg.journal", "Journal.record_region")],
}


class StageClock:
    """Busy wall seconds and thread CPU seconds per stage; nested instrumented calls count once
    (for the outermost stage), so the stages do not overlap."""

    def __init__(self) -> None:
        self.wall_s: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.cpu_s: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.calls: dict[str, int] = dict.fromkeys(STAGES, 0)
        self._lock = threading.Lock()
        self._depth = threading.local()

    def wrap(self, stage: str, func: Callable) -> Callable:
        @functools.wraps(func)
        def timed(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth:
                return func(*args, **kwargs)
            self._depth.n = 1
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return func(*args, **kwargs)
            finally:
                self._depth.n = 0
                with self._lock:
                    self.wall_s[stage] += time.perf_counter() - wall
                    self.cpu_s[stage] += time.thread_time() - cpu
                    self.calls[stage] += 1

        return timed

    def install(self) -> list[str]:
        """Wrap every stage function that this checkout has; returns the ones it lacks."""
        missing = []
        for stage, targets in STAGES.items():
            for module_name, path in targets:
                try:
                    owner = importlib.import_module(module_name)
                    *parents, name = path.split(".")
                    for parent in parents:
                        owner = getattr(owner, parent)
                    original = getattr(owner, name)
                except (ImportError, AttributeError):
                    missing.append(f"{module_name}.{path}")
                    continue
                setattr(owner, name, self.wrap(stage, original))
                if not parents:  # a function: also where other modules imported it by name
                    _rebind_imports(module_name, name, original, getattr(owner, name))
        return missing


def stage_cpu(run: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Runs ``run()`` with the stage functions wrapped; returns its result and the figures.

    The figures: ``stage_cpu_s`` and ``stage_busy_s`` (per stage, this process's threads),
    ``cpu_process_s`` (this process, all threads), ``cpu_children_s`` (child processes that
    ended meanwhile: readers, labelling workers), ``unattributed_cpu_s`` (process CPU outside
    the stages: torch's intra-op threads, Zarr's I/O thread, Python overhead) and
    ``missing_hooks`` (stage functions this checkout does not have).
    """
    clock = StageClock()
    missing = clock.install()
    cpu_self = _cpu_seconds(resource.RUSAGE_SELF)
    cpu_children = _cpu_seconds(resource.RUSAGE_CHILDREN)
    value = run()
    cpu_self = _cpu_seconds(resource.RUSAGE_SELF) - cpu_self
    figures = {
        "cpu_process_s": cpu_self,
        "cpu_children_s": _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_children,
        "stage_cpu_s": dict(clock.cpu_s),
        "stage_busy_s": dict(clock.wall_s),
        "unattributed_cpu_s": cpu_self - sum(clock.cpu_s.values()),
        "missing_hooks": missing,
    }
    return value, figures


def _rebind_imports(module_name: str, name: str, original: Callable, wrapped: Callable) -> None:
    for module in list(sys.modules.values()):
        if module is None or not getattr(module, "__name__", "").startswith("cellseg"):
            continue
        if module.__name__ != module_name and getattr(module, name, None) is original:
            setattr(module, name, wrapped)


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(request_path: Path) -> None:
    """One configuration in this (fresh) process: model only, then the slide end to end."""
    request = json.loads(request_path.read_text())
    import torch

    for module in ("cellseg.inference", "cellseg.pipeline", "cellseg.predict", "cellseg.nuclei"):
        importlib.import_module(module)  # all imported before the functions are wrapped
    from cellseg.checkpoint import load_bundle
    from cellseg.inference import Predictor
    from cellseg.predict import PredictOptions, SlideOutputs, predict_slide

    if request["threads"]:
        torch.set_num_threads(request["threads"])
    bundle = load_bundle(request["model"])
    predictor = Predictor(bundle, device="cpu", precision=request["precision"])
    tile_px, batch = predictor.tile_px, request["batch_size"]
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (batch, tile_px, tile_px, 3), dtype=np.uint8)
    predictor(tiles)  # warm-up: allocator, oneDNN kernel choice
    start = time.perf_counter()
    for _ in range(request["model_batches"]):
        predictor(tiles)
    model_tps = request["model_batches"] * batch / (time.perf_counter() - start)

    out_dir = Path(request["out_dir"])
    options = PredictOptions(batch_size=batch, label_workers=0, overwrite=True)
    outputs = SlideOutputs(geojson=out_dir / "nuclei.geojson", zarr=out_dir / "nuclei.zarr")
    start = time.perf_counter()
    summary, stages = stage_cpu(
        lambda: predict_slide(request["slide"], predictor, outputs, options)
    )
    wall_s = time.perf_counter() - start
    result = {
        "precision": predictor.precision,
        "model_tiles_per_s": model_tps,
        "wall_s": wall_s,
        "tiles": summary["tiles"],
        "nuclei": summary["nuclei"],
        **stages,
        "peak_rss_mb": _peak_rss_mb(),
        "pipeline_stats": summary.get("stages", {}),
    }
    request_path.with_suffix(".result.json").write_text(json.dumps(result))


def run_child(code: Path, precision: str, args: argparse.Namespace, work: Path, tag: str) -> dict:
    out_dir = work / tag
    out_dir.mkdir(parents=True, exist_ok=True)
    request = out_dir / "request.json"
    request.write_text(
        json.dumps(
            {
                "slide": str(args.slide),
                "model": str(args.model),
                "precision": precision,
                "threads": args.threads,
                "batch_size": args.batch_size,
                "model_batches": args.model_batches,
                "out_dir": str(out_dir),
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(code)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(request)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{done.stderr[-3000:]}")
    return json.loads(request.with_suffix(".result.json").read_text())


def _children(result: dict, stage: str) -> float:
    """Child-process CPU belongs to ``read`` here: labelling runs in this process."""
    return result["cpu_children_s"] if stage == "read" else 0.0


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def report(results: dict[str, list[dict]]) -> list[str]:
    """The side-by-side table: one column per configuration (means over the rounds)."""
    names = list(results)
    width = max(14, *(len(n) for n in names))
    lines = [f"{'':<26}" + "".join(f"{n:>{width + 2}}" for n in names)]

    def row(label: str, values: Sequence[float], fmt: str = "{:.2f}") -> None:
        lines.append(f"{label:<26}" + "".join(f"{fmt.format(v):>{width + 2}}" for v in values))

    first = results[names[0]][0]
    row("resolved precision", [0] * 0)
    lines[-1] = f"{'resolved precision':<26}" + "".join(
        f"{results[n][0]['precision']:>{width + 2}}" for n in names
    )
    row("model only (tiles/s)", [_mean(results[n], "model_tiles_per_s") for n in names])
    walls = [_mean(results[n], "wall_s") for n in names]
    row("end to end wall (s)", walls)
    row("end to end (tiles/s)", [first["tiles"] / w for w in walls])
    row("nuclei", [results[n][0]["nuclei"] for n in names], "{:.0f}")
    row("process CPU (s)", [_mean(results[n], "cpu_process_s") for n in names])
    lines.append("CPU seconds per stage (thread CPU; read = reader processes):")
    for stage in STAGES:
        values = [
            float(np.mean([r["stage_cpu_s"][stage] + _children(r, stage) for r in results[n]]))
            for n in names
        ]
        row(f"  {stage}", values)
    row("  unattributed (torch threads)", [_mean(results[n], "unattributed_cpu_s") for n in names])
    lines.append("busy wall seconds per stage:")
    for stage in ("model", "stitch", "zarr", "watershed", "polygons", "measurements", "geojson"):
        values = [float(np.mean([r["stage_busy_s"][stage] for r in results[n]])) for n in names]
        row(f"  {stage}", values)
    row("peak RSS (MiB)", [max(r["peak_rss_mb"] for r in results[n]) for n in names], "{:.0f}")
    base = walls[0]
    row(f"wall ratio to {names[0]}", [base / w for w in walls])
    for n in names:
        if results[n][0]["missing_hooks"]:
            lines.append(f"note: {n} lacks {', '.join(results[n][0]['missing_hooks'])}")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=None, help="default: a synthetic slide")
    parser.add_argument("--size-mm", type=float, default=1.0, help="side of the synthetic slide")
    parser.add_argument("--model", type=Path, default=ROOT / "cellseg/weights/default.safetensors")
    parser.add_argument("--code", type=Path, action="append", help="checkout(s) to compare")
    parser.add_argument("--precision", nargs="+", default=["fp32", "auto"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model-batches", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child_main(args.child)
        return
    codes = [c.resolve() for c in (args.code or [ROOT])]
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.slide is None:
            sys.path.insert(0, str(HERE))
            from synthetic_slide import write_synthetic_slide

            side_px = round(args.size_mm * 4000)
            args.slide = work / f"synthetic-{side_px}px.svs"
            write_synthetic_slide(args.slide, side_px, side_px)
        load = os.getloadavg()[0]
        print(f"slide {args.slide}; load average {load:.2f} on {os.cpu_count()} cores", flush=True)
        results: dict[str, list[dict]] = {}
        for round_index in range(args.rounds):
            for code_index, code in enumerate(codes):
                for precision in args.precision:
                    name = f"{code.name if len(codes) > 1 else ''}{'/' if len(codes) > 1 else ''}"
                    name += precision
                    tag = f"r{round_index}-c{code_index}-{precision}"
                    result = run_child(code, precision, args, work, tag)
                    results.setdefault(name, []).append(result)
                    print(
                        f"{tag} {name}: {result['wall_s']:.1f} s, {result['nuclei']} nuclei, "
                        f"model {result['model_tiles_per_s']:.1f} tiles/s",
                        flush=True,
                    )
        lines = report(results)
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps({"slide": str(args.slide), "results": results}, indent=1))


if __name__ == "__main__":
    main()
