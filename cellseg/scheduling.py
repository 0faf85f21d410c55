"""Cohorts of slides: slide lists, ``--shard I/N`` and running per-slide tasks on Dask.

Three independent pieces behind ``cellseg predict`` (issue 12, item 1):

* :func:`expand_slides`: positional arguments, quoted globs (``**`` recursive) and slide lists
  (``--slides list.txt`` or a CSV with a ``path`` or ``slide`` column) -> one list of paths,
  duplicates removed, order kept, missing files kept (they are reported as failed slides).
* :func:`parse_shard` / :func:`shard_slides`: the I-th of N disjoint shares of that list, for
  Slurm array jobs (``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``).
* :func:`run_tasks`: ``task(item)`` for every item, in this process or as tasks on a Dask
  distributed cluster (a :class:`~distributed.LocalCluster` or an existing scheduler), yielding
  ``(item, result or exception)`` as the tasks finish. The scheduling knows nothing of slides:
  it only calls ``task(item)`` (``cellseg predict`` runs :func:`cellseg.batch.run_slide`);
  :func:`prepare_worker`, :func:`worker_name` and :func:`can_start_processes` are what that task
  asks on a worker.

Dask is an optional dependency (``pip install causal-cellseg[distributed]``), imported only when
a scheduler is asked for.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import logging
import multiprocessing
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CellsegError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install causal-cellseg[distributed]"
CSV_PATH_COLUMNS = ("path", "slide")  # first one present wins
GLOB_CHARS = frozenset("*?[")
CPU_CORES_PER_SLIDE = 4  # a slide's reader, model and labelling threads keep ~4 cores busy
CONNECT_TIMEOUT_S = 10.0
WORKERS_TIMEOUT_S = 60.0


# ----------------------------------------------------------------------------------- slide lists


def read_slide_list(list_path: str | Path) -> list[Path]:
    """The slides named by a list file, relative paths taken relative to the file's folder.

    ``*.csv``: a header row with a ``path`` (or ``slide``) column; empty cells are skipped.
    Anything else: one path per line; blank lines and lines starting with ``#`` are skipped.

    Raises:
        CellsegError: the file cannot be read, or a CSV has no path column.
    """
    list_path = Path(list_path)
    try:
        text = list_path.read_text(encoding="utf-8-sig")  # utf-8-sig: spreadsheets add a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise CellsegError(f"{list_path}: cannot read the slide list ({exc})") from None
    if list_path.suffix.lower() == ".csv":
        entries = _csv_entries(list_path, text)
    else:
        lines = (line.strip() for line in text.splitlines())
        entries = [line for line in lines if line and not line.startswith("#")]
    base = list_path.parent
    return [Path(e) if Path(e).is_absolute() else base / e for e in entries]


def _csv_entries(list_path: Path, text: str) -> list[str]:
    reader = csv.DictReader(text.splitlines())
    columns = {name.strip().lower(): name for name in reader.fieldnames or [] if name}
    column = next((columns[c] for c in CSV_PATH_COLUMNS if c in columns), None)
    if column is None:
        found = ", ".join(columns.values()) or "none"
        raise CellsegError(
            f"{list_path}: a slide list CSV needs a 'path' or 'slide' column (found: {found})"
        )
    return [row[column].strip() for row in reader if (row.get(column) or "").strip()]


def _expand_argument(argument: str | Path) -> list[Path]:
    """An existing path as is; else a glob (``**`` recursive, sorted, files only: a MIRAX
    slide's data folder beside its ``.mrxs`` is not a slide); else the path itself."""
    text = str(argument)
    if os.path.exists(text) or not GLOB_CHARS & set(text):
        return [Path(text)]
    matches = sorted(m for m in glob.glob(text, recursive=True) if os.path.isfile(m))
    # An unmatched pattern stays, so that it is reported as a missing slide rather than dropped.
    return [Path(m) for m in matches] or [Path(text)]


def _identity(path: Path) -> str:
    """Same file, same key, however it was spelled (``a.svs``, ``./a.svs``, ``/abs/a.svs``)."""
    return os.path.normcase(os.path.abspath(path))


def expand_slides(
    arguments: Iterable[str | Path] = (), list_file: str | Path | None = None
) -> list[Path]:
    """The slides of a run: ``arguments`` (paths or quoted globs) then those of ``list_file``.

    Duplicates (the same file spelled differently) are removed keeping the first; the order is
    otherwise kept. Paths that do not exist are kept, so the run reports them as failed slides.
    """
    candidates = [p for a in arguments for p in _expand_argument(a)]
    if list_file is not None:
        candidates += read_slide_list(list_file)
    seen: set[str] = set()
    slides = []
    for path in candidates:
        key = _identity(path)
        if key not in seen:
            seen.add(key)
            slides.append(path)
    return slides


# -------------------------------------------------------------------------------------- shards


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N`` (0-based, like ``$SLURM_ARRAY_TASK_ID``).

    Raises:
        ValueError: not two integers, ``N < 1`` or ``I`` outside ``[0, N)``; the message says
            which.
    """
    index_text, sep, count_text = str(text).replace(" ", "").partition("/")
    try:
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"{text!r} is not I/N (two integers, e.g. 0/4)") from None
    if not sep or count < 1:
        raise ValueError(f"{text!r}: N must be an integer >= 1")
    if not 0 <= index < count:
        raise ValueError(f"{text!r}: I is 0-based and must satisfy 0 <= I < N")
    return index, count


def shard_slides(slides: Sequence[Path], index: int, count: int) -> list[Path]:
    """The ``index``-th of ``count`` disjoint shares of ``slides``; together they are all of them.

    Round-robin over the slides sorted by absolute path, so that the shares differ in size by at
    most one and do not depend on the order of the arguments (every array task of a job must
    split the same list the same way, even if a shell expands a glob in another order). The
    slides of the share keep their order in ``slides``.
    """
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= I < N")
    ranked = sorted({_identity(p) for p in slides})
    mine = set(ranked[index::count])
    return [p for p in slides if _identity(p) in mine]


# ---------------------------------------------------------------------------------- executors


@dataclass(frozen=True)
class LocalLayout:
    """How a ``--scheduler local`` cluster is laid out on this machine.

    Attributes:
        n_workers: worker processes; each runs one task (slide) at a time.
        torch_threads: CPU threads each worker gives torch.
        gpu: one worker per GPU, tasks need the ``GPU`` resource.
        daemon: Dask's default daemonic workers cannot start processes, so a slide's reader and
            labelling pools run as threads there; GPU workers are not daemonic so that their
            reader processes can keep the GPU fed.
        memory_limit: per worker, as Dask takes it (``"auto"``: the machine's memory shared
            between the workers; Dask restarts a worker that goes over 95 % of it).
    """

    n_workers: int
    torch_threads: int
    gpu: bool = False
    daemon: bool = True
    memory_limit: str | int = "auto"

    @property
    def resources(self) -> dict[str, float] | None:
        return {"GPU": 1} if self.gpu else None


def usable_cores() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_layout(
    n_items: int,
    gpus: int = 0,
    cores: int | None = None,
    cores_per_slide: int = CPU_CORES_PER_SLIDE,
) -> LocalLayout:
    """Worker processes for ``n_items`` tasks on this machine.

    With GPUs: one worker per GPU (a second slide on the same GPU would only queue behind the
    first), each with the ``GPU`` resource. On the CPU: ``cores // cores_per_slide`` workers
    (one slide each at a time, so slides run side by side instead of one slide's threads
    fighting for the cores), torch's threads split evenly between them. Never more workers than
    tasks.
    """
    cores = cores or usable_cores()
    wanted = gpus if gpus > 0 else cores // cores_per_slide
    n_workers = max(1, min(wanted, max(n_items, 1)))
    torch_threads = max(1, cores // n_workers)
    return LocalLayout(n_workers, torch_threads, gpu=gpus > 0, daemon=gpus == 0)


def require_distributed():
    """The ``distributed`` module, or a CellsegError saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise CellsegError(f"--scheduler needs Dask distributed: {INSTALL_HINT}") from None
    return distributed


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@contextlib.contextmanager
def _client(scheduler: str, layout: LocalLayout, connect_timeout_s: float):
    """A Dask client of a new LocalCluster (``"local"``) or of the scheduler at an address."""
    distributed = require_distributed()
    import dask

    if scheduler != "local":
        try:
            client = distributed.Client(scheduler, timeout=connect_timeout_s)
        except ValueError as exc:
            raise CellsegError(
                f"--scheduler {scheduler}: neither 'local' nor an address like "
                f"tcp://HOST:8786 ({_first_line(exc)})"
            ) from None
        except (OSError, TimeoutError) as exc:
            first = _first_line(exc)
            raise CellsegError(
                f"cannot reach the Dask scheduler at {scheduler} within "
                f"{connect_timeout_s:g} s ({first})"
            ) from None
        with client:
            yield client
        return
    env = {var: str(layout.torch_threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with (
        dask.config.set({"distributed.worker.daemon": layout.daemon}),
        distributed.LocalCluster(
            n_workers=layout.n_workers,
            threads_per_worker=1,  # one slide at a time per worker process
            processes=True,
            resources=layout.resources,
            memory_limit=layout.memory_limit,
            dashboard_address=None,  # no port to clash with another run's
            silence_logs=logging.CRITICAL,  # failures are reported per item by the caller
            env=env,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def _wait_for_workers(client, scheduler: str, timeout_s: float, resources) -> None:
    try:
        client.wait_for_workers(1, timeout=timeout_s)
    except TimeoutError:
        raise CellsegError(
            f"the Dask scheduler at {scheduler} has no workers after {timeout_s:g} s "
            f"(start some: dask worker {scheduler} --nthreads 1)"
        ) from None
    # A task needing a resource that no worker has would wait forever: say so instead.
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    for name, amount in (resources or {}).items():
        if not any(w.get("resources", {}).get(name, 0) >= amount for w in workers):
            hint = " that --device cuda needs" if name == "GPU" else ""
            raise CellsegError(
                f"no worker of {scheduler} offers the {name} resource{hint} (start them with: "
                f"dask worker {scheduler} --nthreads 1 --resources {name}={amount:g})"
            )


def run_tasks(
    task: Callable[[Any], Any],
    items: Sequence[Any],
    scheduler: str | None = None,
    *,
    resources: dict[str, float] | None = None,
    layout: LocalLayout | None = None,
    connect_timeout_s: float | None = None,
    workers_timeout_s: float | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Runs ``task(item)`` for each item, yielding ``(item, result)`` in order of completion.

    ``result`` is the task's return value, or the exception it raised (``Exception``s are
    caught and yielded, one item's failure never stops the others; retrying is the caller's
    choice). ``KeyboardInterrupt`` propagates and cancels the tasks not yet finished.

    Args:
        task: a picklable callable (a top-level function, or a ``functools.partial`` of one)
            when a scheduler is given: it runs in the worker processes.
        items: picklable task arguments.
        scheduler: None: serially in this process, in order. ``"local"``: a new
            ``LocalCluster`` laid out by ``layout`` (default: :func:`local_layout` for the CPU).
            Anything else: the address of a running scheduler (``tcp://HOST:8786``).
        resources: Dask worker resources each task needs, e.g. ``{"GPU": 1}``: only workers
            started with ``--resources GPU=1`` run it, one task per GPU at a time.
        connect_timeout_s: give up reaching an external scheduler after this long (None:
            ``CONNECT_TIMEOUT_S``).
        workers_timeout_s: give up when the cluster has no worker after this long (None:
            ``WORKERS_TIMEOUT_S``).

    Raises:
        CellsegError: Dask is not installed, the scheduler cannot be reached or has no
            suitable workers.
    """
    if scheduler is None:
        yield from _run_serial(task, items)
        return
    if not items:
        return
    if scheduler == "local":
        layout = layout or local_layout(len(items))
        resources = resources or layout.resources
    connect_timeout_s = connect_timeout_s or CONNECT_TIMEOUT_S
    with _client(scheduler, layout, connect_timeout_s) as client:
        _wait_for_workers(client, scheduler, workers_timeout_s or WORKERS_TIMEOUT_S, resources)
        yield from _run_on(client, task, items, resources)


def _run_serial(task, items) -> Iterator[tuple[Any, Any]]:
    for item in items:
        try:
            result = task(item)
        except Exception as exc:  # yielded to the caller, who records it
            result = exc
        yield item, result


def _readable(item: Any, exc: BaseException) -> BaseException:
    """Dask's ``KilledWorker`` (the worker process died on this task, repeatedly) in words."""
    if type(exc).__name__ != "KilledWorker":
        return exc
    return CellsegError(
        f"{item}: the Dask worker running it died (out of memory or a crash; see the worker's "
        "log); Dask gave up after its allowed retries"
    )


def _run_on(client, task, items, resources) -> Iterator[tuple[Any, Any]]:
    from distributed import as_completed

    # Keys are unique per run: the scheduler shares a key's result between its clients, so two
    # runs at once (two shards, two users) with keys like cellseg-0 would get each other's
    # results. The run id and index also name the task on the dashboard.
    run_id = uuid.uuid4().hex[:12]
    futures = {
        client.submit(task, item, resources=resources, key=f"cellseg-{run_id}-{i}"): item
        for i, item in enumerate(items)
    }
    try:
        for future in as_completed(futures):
            item = futures[future]
            if future.status == "error":
                yield item, _readable(item, future.exception())
            elif future.status == "cancelled":
                yield item, CellsegError(f"{item}: the task was cancelled by the cluster")
            else:
                yield item, future.result()
            future.release()
    finally:
        client.cancel(list(futures))  # nothing keeps running for a run that stopped


# ------------------------------------------------------------------------- on a worker process


def _current_worker():
    """The Dask worker running this task, or None (distributed is not imported for nothing: a
    Dask worker has always imported it, and the import takes seconds)."""
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def in_dask_worker() -> bool:
    """Whether this code runs inside a Dask worker task."""
    return _current_worker() is not None


def worker_name() -> str | None:
    """The Dask worker running this task: its address, with its name when it has a name of its
    own (``dask worker --name``); None outside Dask."""
    worker = _current_worker()
    if worker is None:
        return None
    name = worker.name
    if isinstance(name, str) and name and name != worker.address:
        return f"{name} ({worker.address})"
    return str(worker.address)


def can_start_processes() -> bool:
    """False in a daemonic process (Dask's default workers), which may not have children."""
    return not multiprocessing.current_process().daemon


def _host_share_of_cores() -> int:
    """This host's cores divided by the Dask worker processes on it now (at least 1).

    Asked again for every slide (one small scheduler call), as workers come and go.
    """
    from distributed import get_client, get_worker

    cores = usable_cores()
    try:
        host = get_worker().address.rsplit(":", 1)[0]
        workers = get_client().scheduler_info(n_workers=-1)["workers"]
        peers = sum(1 for address in workers if address.rsplit(":", 1)[0] == host)
    except (OSError, ValueError, KeyError, TimeoutError):
        return cores
    return max(1, cores // max(peers, 1))


def prepare_worker(device: str, torch_threads: int | None = None) -> str:
    """Sets torch's CPU threads for this process and returns the device for its model.

    ``torch_threads`` None inside a Dask worker: the host's cores split between the Dask worker
    processes on it (Dask's nanny sets ``OMP_NUM_THREADS=1``, which would leave torch one
    thread). On a ``LocalCluster`` with several GPUs, worker ``k`` gets ``cuda:k``; elsewhere
    each GPU worker should see one GPU (``CUDA_VISIBLE_DEVICES``), see examples/dask_cluster.sh.
    """
    worker = _current_worker()
    if worker is None and torch_threads is None:
        return device  # an ordinary process: as it is
    import torch

    if torch_threads is None:
        torch_threads = _host_share_of_cores()
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    # LocalCluster names its workers 0, 1, ...: worker k takes GPU k.
    local_index = getattr(worker, "name", None)
    if (
        device in ("cuda", "auto")
        and isinstance(local_index, int)
        and torch.cuda.device_count() > 1
    ):
        return f"cuda:{local_index % torch.cuda.device_count()}"
    return device
