"""Saved planes: each finished plane of an unfinished input, kept until its outputs exist.

A plane is saved as ``OUTDIR/.mobilesam-work/<stem>-<key>/plane_<i>_<j>.npz`` (labels,
scores, seconds, and what ran it), so a killed run loses at most the planes in
flight and a rerun with the same key picks them up. The folder of an input is made
when its first plane is saved: an input that fails before leaves none behind.
:class:`Writer` saves planes and writes outputs in one background thread.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .folder import OutputError, describe, is_fatal
from .outputs import atomic_path

if TYPE_CHECKING:
    from .jobs import Job
    from .segment import PlaneResult

__all__ = ["RAN_ON", "Writer", "load_plane", "save_plane", "scan_cache"]

#: what the provenance records of each (host, process setup) that ran planes
RAN_ON = ("host", "device", "backend", "threads", "precision", "mode", "nms")


def plane_name(index: tuple[int, ...]) -> str:
    """``plane_000001_000002.npz`` for plane (1, 2); ``plane.npz`` for a 2D image."""
    return "plane" + "".join(f"_{i:06d}" for i in index) + ".npz"


def save_plane(job: Job, result: PlaneResult, tmp_dir: Path) -> None:
    """Save one finished plane atomically and register it with its job.

    Raises
    ------
    OutputError
        The output folder is full, read-only or denies writing.
    """
    dest = job.cache / plane_name(result.index)
    where = {k: result.extra.get(k, "") for k in RAN_ON} if "device" in result.extra else {}
    try:
        job.cache.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest, tmp_dir) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                labels=result.labels,
                predicted_iou=result.predicted_iou,
                stability_score=result.stability_score,
                seconds=np.float64(result.seconds),
                where=np.array(json.dumps(where)),
                embedding=np.array(result.extra.get("embedding", "computed")),
            )
    except OSError as exc:
        if is_fatal(exc):
            raise OutputError(
                f"cannot write in {dest.parents[2]}: {describe(exc)} (saving a plane of "
                f"{job.path}); free space or fix the folder, then run the same command "
                "again to finish"
            ) from None
        raise
    job.done[result.index] = (result.n_objects, result.seconds)
    if result.extra.get("embedding") == "store":
        job.from_store.add(result.index)
    if where:
        job.ran_on.add(tuple(where[k] for k in RAN_ON))


def load_plane(
    job: Job, index: tuple[int, ...], folder: Path | None = None
) -> dict[str, np.ndarray]:
    """The arrays of a saved plane: ``labels``, ``predicted_iou``, ``stability_score``
    (from ``folder``, default the job's saved planes)."""
    with np.load((job.cache if folder is None else folder) / plane_name(index)) as z:
        return {k: z[k] for k in z.files}


def scan_cache(job: Job, same_as: dict[str, str] | None = None) -> None:
    """Register the planes that earlier runs of the same key saved, and what ran them.

    Parameters
    ----------
    job : Job
    same_as : dict, optional
        ``device``, ``backend``, ``precision``, ``mode`` and ``nms`` of this run: a
        saved plane computed otherwise (e.g. ``--precision auto`` resolved to bf16
        elsewhere) is computed again, so that one output never mixes the two.
        None: keep every readable plane.
    """
    if not job.cache.is_dir():
        return
    for index in job.indices:
        path = job.cache / plane_name(index)
        if not path.exists():
            continue
        try:
            with np.load(path) as z:
                n, seconds = len(z["predicted_iou"]), float(z["seconds"])
                where = json.loads(str(z["where"])) if "where" in z.files else {}
                stored = "embedding" in z.files and str(z["embedding"]) == "store"
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # unreadable: compute it again
            continue
        if same_as is not None and where and not _same_computation(where, same_as):
            path.unlink(missing_ok=True)
            continue
        job.done[index] = (n, seconds)
        if stored:
            job.from_store.add(index)
        if where:
            job.ran_on.add(tuple(where.get(k, "") for k in RAN_ON))


def _same_computation(a: dict, b: dict) -> bool:
    def kind(device) -> str:
        return str(device).split(":")[0]

    keys = ("backend", "precision", "mode", "nms")
    return kind(a.get("device")) == kind(b.get("device")) and all(
        str(a.get(k)) == str(b.get(k)) for k in keys
    )


class Writer:
    """Saves planes and finishes jobs in one background thread, in submission order.

    The next plane is segmented meanwhile. At most ``limit`` writes wait (bounded
    memory); an error raised by a write is raised again in the caller at the next
    :meth:`submit` or at :meth:`close`. After an :class:`~.folder.OutputError` (the
    folder is full or not writable) the writes still waiting are skipped: the error
    is met once.
    """

    def __init__(self, limit: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mobilesam-writer")
        self._pending: deque = deque()
        self._limit = limit
        self._stopped = False

    def _call(self, fn: Callable[..., None], *args) -> None:
        if self._stopped:
            return
        try:
            fn(*args)
        except OutputError:
            self._stopped = True
            raise

    def submit(self, fn: Callable[..., None], *args) -> None:
        self._pending.append(self._pool.submit(self._call, fn, *args))
        while self._pending and (self._pending[0].done() or len(self._pending) > self._limit):
            self._pending.popleft().result()

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for every submitted write (nothing is left half-done), then stop."""
        try:
            while self._pending:
                future = self._pending.popleft()
                if raise_errors:
                    future.result()
                else:
                    future.exception()  # waits; the error is already being handled
        finally:
            self._pool.shutdown(wait=True)
