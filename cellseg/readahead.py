"""Read-ahead of slide regions in worker processes, so reading overlaps inference.

Each worker process opens the slide once and reads whole blocks (about 2000 px at the model's
resolution) with one ``read_region`` call each; the main process receives them in submission
order while up to ``prefetch`` further reads are in flight. Slow slide decoding is the usual
reason a GPU sits idle (PEERS.md §3 and §5); worker processes sidestep both the GIL and
OpenSlide's per-handle locking. ``workers=0`` reads in one background thread instead (tests,
tiny inputs), which still overlaps with the model because the decoders release the GIL.

This module must not import torch: worker processes are started with ``spawn`` and import it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from .workers import start_pool

log = logging.getLogger(__name__)

Key = TypeVar("Key")

_local = threading.local()  # the worker's open slide (one per process, or the reader thread)


@dataclass(frozen=True)
class SlideSource:
    """How a worker opens the slide: the arguments of :func:`cellseg.slide.open_slide`."""

    path: Path
    backend: str = "openslide"
    mpp: float | None = None


@dataclass(frozen=True)
class ReadRequest:
    """One region to read: ``size_wh`` pixels at ``target_mpp`` from level-0 ``origin_xy``."""

    origin_xy: tuple[float, float]
    size_wh: tuple[int, int]
    target_mpp: float


def _open_in_worker(source: SlideSource) -> None:
    from .slide import open_slide

    _local.slide = open_slide(source.path, source.backend, source.mpp)


def _read(request: ReadRequest) -> np.ndarray:
    """``H×W×3`` uint8 region (runs in the worker)."""
    return _local.slide.read_region_at_mpp(request.origin_xy, request.size_wh, request.target_mpp)


def _ready() -> None:
    """Does nothing; submitting it makes the executor start a worker (which opens the slide)."""


class RegionReader:
    """Ordered, bounded read-ahead of slide regions.

    Args:
        source: the slide to open in each worker.
        workers: reader processes; 0 reads in one background thread of this process.
        prefetch: reads in flight at most (bounds memory: each is one block image); defaults to
            ``2·workers + 1``.

    Use as a context manager; :meth:`read_ahead` yields ``(key, image)`` in input order.
    Worker processes are started when the reader is created (from the calling thread, so that
    they end with this process: :func:`cellseg.workers.start_pool`); their start-up (imports,
    opening the slide: seconds) overlaps with the caller's planning. With ``workers=0``,
    :meth:`start` opens the slide in the reader thread early.
    """

    def __init__(self, source: SlideSource, workers: int = 1, prefetch: int | None = None) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers
        self.prefetch = prefetch or 2 * max(workers, 1) + 1
        self._executor: Executor
        if workers == 0:
            self._executor = ThreadPoolExecutor(1, initializer=_open_in_worker, initargs=(source,))
        else:
            # Workers end with this process and ignore Ctrl-C (cellseg.workers).
            self._executor = start_pool(workers, _open_in_worker, (source,))

    def start(self) -> None:
        """Starts every worker now, without waiting for them (processes start in ``__init__``)."""
        if self.workers == 0:
            self._executor.submit(_ready)

    def read_ahead(
        self, requests: Iterable[tuple[Key, ReadRequest]], prefetch: int | None = None
    ) -> Iterator[tuple[Key, np.ndarray]]:
        """Reads every request, keeping up to ``prefetch`` (default: the reader's) in flight;
        yields in input order.

        Errors raised while reading (e.g. :class:`cellseg.errors.SlideError` for a corrupt
        tile) are re-raised here, at the request that failed.
        """
        in_flight = prefetch or self.prefetch
        pending: deque[tuple[Key, Future]] = deque()
        todo = iter(requests)
        exhausted = False
        while True:
            while not exhausted and len(pending) < in_flight:
                item = next(todo, None)
                if item is None:
                    exhausted = True
                    break
                key, request = item
                pending.append((key, self._executor.submit(_read, request)))
            if not pending:
                return
            key, future = pending.popleft()
            yield key, future.result()

    def close(self) -> None:
        """Stops the workers, cancelling reads not yet started."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RegionReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
