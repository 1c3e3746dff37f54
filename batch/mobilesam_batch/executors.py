"""Where planes are segmented: in this process, or on dask workers.

Both executors take ``(job, plane index)`` tasks and yield ``(task, result)`` pairs,
where a result is a :class:`~.segment.PlaneResult` or the exception that plane
raised (which fails its input alone).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from .segment import PlaneResult, get_segmenter, segment_plane

if TYPE_CHECKING:
    from .jobs import Job
    from .runner import RunConfig

__all__ = ["CONNECT_TIMEOUT", "Cluster", "ClusterError", "dask_results", "local_results"]

Task = tuple["Job", tuple[int, ...]]
#: how long to wait for a dask scheduler given by address
CONNECT_TIMEOUT = "30s"
#: seconds between checks that the cluster still has workers
_POLL_S = 1.0


class ClusterError(RuntimeError):
    """The dask cluster cannot run the planes: unreachable, or without workers."""


def local_results(
    tasks: Iterable[Task], config: RunConfig
) -> Iterator[tuple[Task, PlaneResult | BaseException]]:
    """Segment planes in this process, reading the next plane while the model runs."""
    seg = get_segmenter(config.model, config.options)
    store = {} if config.embeddings is None else {"embeddings": config.embeddings}

    def read(task: Task) -> np.ndarray:
        job, index = task
        return job.open(config.axes).read_plane(index)

    pending = deque(tasks)

    def read_next(pool: ThreadPoolExecutor):
        while pending and pending[0][0].failed:
            pending.popleft()
        if not pending:
            return None
        task = pending.popleft()
        return task, pool.submit(read, task)

    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = read_next(pool)
        while ahead is not None:
            task, fut = ahead
            ahead = read_next(pool)  # the next plane is read while this one is segmented
            job, index = task
            if job.failed:
                continue
            start = time.perf_counter()
            try:
                result = seg.segment(fut.result(), index, **store)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                yield task, exc
                continue
            result.seconds = time.perf_counter() - start
            yield task, result


def dask_results(
    tasks: Iterable[Task], config: RunConfig, cluster: Cluster
) -> Iterator[tuple[Task, PlaneResult | BaseException]]:
    """Segment planes on dask workers, keeping a bounded number of planes in flight.

    Raises
    ------
    ClusterError
        The cluster has had no worker for ``config.worker_timeout`` seconds while
        planes were waiting.
    """
    from distributed import wait

    client = cluster.client
    window = 2 * max(1, cluster.n_workers()) + 1
    queue = deque(tasks)
    owner: dict[Any, Task] = {}

    def submit_next() -> None:
        while queue:
            job, index = task = queue.popleft()
            if job.failed:
                continue
            fut = client.submit(
                segment_plane, str(job.path), config.axes, index, config.model, config.options,
                config.embeddings, pure=False,
            )  # fmt: skip
            owner[fut] = task
            return

    for _ in range(window):
        submit_next()
    try:
        while owner:
            try:
                done, _ = wait(list(owner), timeout=_POLL_S, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            if not done:
                cluster.check_workers()
                continue
            cluster.workers_seen()
            for fut in [f for f in owner if f in done]:  # in submission order
                task = owner.pop(fut)
                result = _result(fut, cluster)
                submit_next()
                yield task, result
    finally:
        for fut in owner:
            fut.cancel()


def _result(fut, cluster: Cluster) -> PlaneResult | BaseException:
    """A finished future's result, or the exception it raised.

    A result held only by a worker that has since left is lost: the future goes back
    to pending and would wait for a worker forever, so it is waited on in steps, with
    the no-worker clock (:meth:`Cluster.check_workers`) running in between.
    """
    while True:
        try:
            return fut.result(timeout=_POLL_S)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            if isinstance(exc, TimeoutError) and not fut.done():  # (not the plane's own)
                cluster.check_workers()
                continue
            return exc


class Cluster:
    """A dask client for ``--scheduler``: a LocalCluster or an existing scheduler.

    Parameters
    ----------
    scheduler : str
        ``"local"`` or a scheduler address (``tcp://host:8786``).
    workers : int
        Worker processes of a LocalCluster.
    worker_timeout : float
        Seconds to wait for a worker (at the start, or when all have left) before
        giving up with :class:`ClusterError`.
    log : callable
        Receives the lines that say what is being waited for.
    """

    def __init__(
        self, scheduler: str, workers: int, *, worker_timeout: float, log: Callable[[str], None]
    ) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise ClusterError(
                "--scheduler needs dask.distributed: pip install 'napari-mobilesam[cluster]'"
            ) from None
        self.address = scheduler
        self.timeout = worker_timeout
        self._log = log
        self._idle_since: float | None = None
        self.cluster = None
        if scheduler == "local":
            # the workers ignore Ctrl-C (this process stops them), else each prints a
            # traceback; SIG_IGN is the one disposition a new process inherits
            # worker logs below CRITICAL silenced: a plane's error comes back on its
            # future and is reported with its input; during shutdown after Ctrl-C a
            # worker whose scheduler has gone logs heartbeat tracebacks at ERROR
            with _ignoring_sigint():
                self.cluster = LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                    dashboard_address=None, silence_logs=logging.CRITICAL,
                )  # fmt: skip
            self.client = Client(self.cluster)
        else:
            try:
                self.client = Client(scheduler, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                raise ClusterError(
                    f"cannot reach the dask scheduler at {scheduler!r}: {exc}"
                ) from None
        try:
            self._wait_for_workers()
        except BaseException:
            self.close()
            raise

    def n_workers(self) -> int:
        return len(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def _wait_for_workers(self) -> None:
        if self.n_workers() > 0:
            return
        self._log(
            f"waiting for a dask worker to join the scheduler at {self.address} "
            f"(up to {self.timeout:g} s, --worker-timeout)"
        )
        try:
            self.client.wait_for_workers(1, timeout=self.timeout)
        except TimeoutError:
            raise ClusterError(
                f"no dask worker joined the scheduler at {self.address} within "
                f"{self.timeout:g} s; start workers (dask worker {self.address}) or wait "
                "longer with --worker-timeout"
            ) from None

    def workers_seen(self) -> None:
        """Note that work is progressing (resets the no-worker clock)."""
        self._idle_since = None

    def check_workers(self) -> None:
        """Called while no plane finishes: give up when no worker has been there for
        ``timeout`` seconds."""
        if self.n_workers() > 0:
            self._idle_since = None
            return
        if self._idle_since is None:
            self._idle_since = time.monotonic()
            self._log(
                f"waiting for a dask worker: the scheduler at {self.address} has none left "
                f"(up to {self.timeout:g} s, --worker-timeout)"
            )
        elif time.monotonic() - self._idle_since > self.timeout:
            raise ClusterError(
                f"the scheduler at {self.address} has had no worker for {self.timeout:g} s "
                "while planes were waiting; start workers, then run the same command again"
            )

    def close(self) -> None:
        """Close the client and a LocalCluster. From here on this process's dask logs
        below CRITICAL are dropped: comms closing late (after Ctrl-C, on a busy machine)
        log tracebacks at INFO once LocalCluster.close has restored dask's log level."""
        logging.getLogger("distributed").setLevel(logging.CRITICAL)
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


class _ignoring_sigint:
    """Ignore SIGINT in this block (main thread only; elsewhere signals cannot be set)."""

    def __enter__(self):
        self._main = threading.current_thread() is threading.main_thread()
        if self._main:
            self._previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        return self

    def __exit__(self, *exc):
        if self._main:
            signal.signal(signal.SIGINT, self._previous)
        return False
