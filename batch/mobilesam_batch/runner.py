"""Run segment-everything over many inputs: plan, compute planes, write outputs, resume.

The unit of work is one 2D plane. For every input the runner

1. opens it lazily and works out its planes and output names;
2. skips it when its provenance record matches this run (same input size and
   mtime, model weights, parameters and outputs) and every output exists;
3. segments the planes not yet done, here or on dask workers, saving each finished
   plane in ``OUTDIR/.mobilesam-work/<stem>-<key>/`` (so a killed run loses at
   most the planes in flight);
4. when all planes are done, writes the outputs from the saved planes one plane at
   a time (memory stays flat however long the stack), each atomically, then the
   provenance record last, then removes the saved planes.

A file that cannot be read fails alone: it is reported with the reason and the run
goes on. Outputs only ever appear complete: every file is written under
``.mobilesam-work/tmp`` and renamed into place.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .inputs import ImageSource, InputError, discover_inputs, open_source
from .outputs import (
    atomic_path,
    coco_annotations,
    labels_dtype,
    ngff_attrs,
    object_table,
    write_coco_json,
    write_json_atomic,
    write_labels_tiff,
    write_labels_zarr,
    write_objects_csv,
)
from .provenance import environment, input_identity, is_up_to_date, now, run_key
from .segment import ModelSpec, PlaneResult, SegmentOptions, get_segmenter, segment_plane

WORK_DIR = ".mobilesam-work"
#: what the provenance records of each (host, process setup) that ran planes
RAN_ON = ("host", "device", "backend", "threads", "precision", "mode", "nms")
# how long to wait for a dask scheduler given by address
CONNECT_TIMEOUT = "30s"


@dataclass
class RunConfig:
    """Everything one run of ``mobilesam-everything`` needs.

    Parameters
    ----------
    inputs : list of str
        Files, folders and glob patterns.
    outdir : Path
        Output folder (created).
    model : ModelSpec
        The model, with its weights already resolved to a local file.
    model_sha256 : str
        Checksum of the weights, recorded and part of the resume key.
    options : SegmentOptions
    coco, csv, zarr : bool
        Extra outputs besides the label TIFF and its provenance record.
    axes : str or None
        Axes of every input, overriding file metadata (e.g. ``"TZYX"``).
    recursive, overwrite, dry_run : bool
    scheduler : str or None
        None: this process; ``"local"``: a LocalCluster of ``workers`` processes;
        otherwise the address of a dask scheduler (``tcp://host:8786``).
    workers : int
        Worker processes of the LocalCluster.
    command : list of str, optional
        The command line, recorded in the provenance.
    """

    inputs: list[str]
    outdir: Path
    model: ModelSpec
    model_sha256: str
    options: SegmentOptions = field(default_factory=SegmentOptions)
    coco: bool = False
    csv: bool = False
    zarr: bool = False
    axes: str | None = None
    recursive: bool = False
    overwrite: bool = False
    dry_run: bool = False
    scheduler: str | None = None
    workers: int = 1
    command: list[str] | None = None

    def output_kinds(self) -> list[str]:
        kinds = ["labels"]
        kinds += [k for k in ("coco", "csv", "zarr") if getattr(self, k)]
        return kinds


@dataclass
class Summary:
    """What happened to each input."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    planned: list[Path] = field(default_factory=list)
    interrupted: bool = False
    planes: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        text = f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed"
        if self.planned:
            text = f"{len(self.planned)} to do, {len(self.skipped)} up to date, "
            text += f"{len(self.failed)} failed (dry run)"
        if self.interrupted:
            text += "; interrupted: run the same command again to resume"
        return text

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed else 0


@dataclass
class Job:
    """One input on its way through the run."""

    path: Path
    stem: str
    source: dict[str, Any]
    identity: dict[str, Any]
    key: str
    outputs: dict[str, Path]
    cache: Path
    indices: list[tuple[int, ...]]
    done: dict[tuple[int, ...], tuple[int, float]] = field(default_factory=dict)
    # RAN_ON values of the planes: what ran them, as resolved where they ran
    ran_on: set[tuple] = field(default_factory=set)
    failed: str | None = None
    started: float = field(default_factory=time.perf_counter)
    _open: ImageSource | None = None

    @property
    def todo(self) -> list[tuple[int, ...]]:
        return [i for i in self.indices if i not in self.done]

    def open(self, axes: str | None) -> ImageSource:
        if self._open is None:
            self._open = open_source(self.path, axes)
        return self._open

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None


def output_stem(path: Path) -> str:
    """File name without its image suffix (``a.ome.tif`` -> ``a``)."""
    name = path.name
    lower = name.lower()
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name


def output_paths(outdir: Path, stem: str, kinds: list[str]) -> dict[str, Path]:
    """``kind -> path`` of the outputs of one input; ``provenance`` always included."""
    names = {
        "labels": f"{stem}_labels.tif",
        "zarr": f"{stem}_labels.zarr",
        "coco": f"{stem}_coco.json",
        "csv": f"{stem}_objects.csv",
        "provenance": f"{stem}_labels.json",
    }
    return {k: outdir / names[k] for k in [*kinds, "provenance"]}


# --------------------------------------------------------------------------- plane cache


def _plane_name(index: tuple[int, ...]) -> str:
    return "plane" + "".join(f"_{i:06d}" for i in index) + ".npz"


def _save_plane(job: Job, result: PlaneResult, tmp_dir: Path) -> None:
    dest = job.cache / _plane_name(result.index)
    with atomic_path(dest, tmp_dir) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            labels=result.labels,
            predicted_iou=result.predicted_iou,
            stability_score=result.stability_score,
            seconds=np.float64(result.seconds),
        )
    job.done[result.index] = (result.n_objects, result.seconds)
    if "device" in result.extra:
        job.ran_on.add(tuple(result.extra.get(k, "") for k in RAN_ON))


class _Writer:
    """Saves planes and finishes jobs in one background thread, in submission order.

    The next plane is segmented meanwhile: compressing one 1024x1024 label plane takes
    about 18 ms and writing a one-plane file's outputs about as long again, against
    a GPU's ~50 ms per plane. At most ``limit`` writes wait (bounded memory); an
    error raised by a write is raised again in the caller at the next
    :meth:`submit` or at :meth:`close`.
    """

    def __init__(self, limit: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mobilesam-writer")
        self._pending: deque = deque()
        self._limit = limit

    def submit(self, fn: Callable[..., None], *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))
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


def _load_plane(job: Job, index: tuple[int, ...]) -> dict[str, np.ndarray]:
    with np.load(job.cache / _plane_name(index)) as z:
        return {k: z[k] for k in z.files}


def _scan_cache(job: Job) -> None:
    """Register the planes a previous, interrupted run of the same key finished."""
    if not job.cache.is_dir():
        return
    for index in job.indices:
        path = job.cache / _plane_name(index)
        if not path.exists():
            continue
        try:
            with np.load(path) as z:
                job.done[index] = (len(z["predicted_iou"]), float(z["seconds"]))
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # unreadable: compute it again


# ------------------------------------------------------------------------------ outputs


def _scores(plane: dict[str, np.ndarray]) -> dict[int, dict[str, float]]:
    return {
        k + 1: {"predicted_iou": float(iou), "stability_score": float(stab)}
        for k, (iou, stab) in enumerate(
            zip(plane["predicted_iou"], plane["stability_score"], strict=True)
        )
    }


def _write_outputs(job: Job, config: RunConfig, tmp_dir: Path) -> dict[str, Any]:
    """Write every output of a finished job from its saved planes; provenance last."""
    src = job.source
    out_shape = tuple(src["out_shape"])
    out_axes = src["out_axes"]
    max_id = max((n for n, _ in job.done.values()), default=0)
    dtype = labels_dtype(max_id)

    def planes() -> Iterator[np.ndarray]:
        for index in job.indices:
            yield _load_plane(job, index)["labels"]

    info = {"tool": "mobilesam-everything", "version": __version__, "source": str(job.path)}
    write_labels_tiff(
        job.outputs["labels"], planes(), out_shape, out_axes, dtype, tmp_dir=tmp_dir,
        description=info,
    )  # fmt: skip
    if config.zarr:
        write_labels_zarr(
            job.outputs["zarr"], planes(), out_shape, out_axes, dtype, tmp_dir=tmp_dir,
            attrs=info,
        )  # fmt: skip
    if config.csv:
        write_objects_csv(job.outputs["csv"], _object_rows(job), tmp_dir=tmp_dir)
    if config.coco:
        _write_coco(job, tmp_dir)

    planes_record = [
        {
            "index": list(index),
            "objects": job.done[index][0],
            "seconds": round(job.done[index][1], 3),
        }
        for index in job.indices
    ]
    record = {
        "tool": "mobilesam-everything",
        "version": __version__,
        "created": now(),
        "command": config.command,
        "key": job.key,
        "input": {**job.identity, **{k: v for k, v in src.items() if k not in ("out_shape",)}},
        "model": {
            "name": config.model.name,
            "weights": config.model.weights,
            "sha256": config.model_sha256,
            "backend": config.model.backend,
            "precision": config.model.precision,
            "device": config.model.device,
            "ran_on": [dict(zip(RAN_ON, r, strict=True)) for r in sorted(job.ran_on)],
        },
        "parameters": {**config.options.resolved(), "axes": config.axes},
        "outputs": {
            **{k: p.name for k, p in job.outputs.items() if k != "provenance"},
            "dtype": np.dtype(dtype).name,
            "shape": list(out_shape),
            "axes": out_axes,
            "label_ids": "per plane: 1..N in each plane, by decreasing predicted IoU",
        },
        "objects": int(sum(n for n, _ in job.done.values())),
        "planes": planes_record,
        "environment": environment(),
    }
    write_json_atomic(job.outputs["provenance"], record, tmp_dir=tmp_dir)
    return record


def _object_rows(job: Job) -> Iterator[dict[str, Any]]:
    for index in job.indices:
        plane = _load_plane(job, index)
        for row in object_table(plane["labels"], _scores(plane)):
            yield {"plane": _flat_plane(job, index), **row}


def _flat_plane(job: Job, index: tuple[int, ...]) -> int:
    """A plane's position as one number: its flat index in C order (0 for a 2D image)."""
    shape = tuple(job.source["out_shape"][:-2])
    return int(np.ravel_multi_index(index, shape)) if index else 0


def _write_coco(job: Job, tmp_dir: Path) -> None:
    """COCO JSON, one image per plane and one annotation per label, streamed plane by plane."""
    height, width = job.source["out_shape"][-2:]
    images = [
        {"id": i, "file_name": job.path.name, "height": height, "width": width, "plane": list(ix)}
        for i, ix in enumerate(job.indices, start=1)
    ]

    def annotations() -> Iterator[dict[str, Any]]:
        next_id = 1
        for image_id, index in enumerate(job.indices, start=1):
            plane = _load_plane(job, index)
            anns = coco_annotations(plane["labels"], image_id, next_id, _scores(plane))
            next_id += len(anns)
            yield from anns

    info = {
        "description": f"mobilesam-everything objects of {job.path.name}",
        "version": __version__,
        "date_created": now(),
    }
    write_coco_json(job.outputs["coco"], images, annotations(), info=info, tmp_dir=tmp_dir)


# ------------------------------------------------------------------------------ planning


def _plan(config: RunConfig, summary: Summary, log: Callable[[str], None]) -> list[Job]:
    paths, errors = discover_inputs(config.inputs, recursive=config.recursive)
    for err in errors:
        summary.failed.append((str(err.path), err.reason))
        log(f"FAILED {err.path}: {err.reason}")
    outdir = config.outdir.resolve()
    paths = [p for p in paths if not _is_within(p.resolve(), outdir)]

    kinds = config.output_kinds()
    model = {
        "name": config.model.name,
        "sha256": config.model_sha256,
        "backend": config.model.backend,
    }
    if config.model.precision != "fp32":  # (absent for fp32: keys of earlier runs still match)
        model["precision"] = config.model.precision
    parameters = {**config.options.resolved(), "axes": config.axes}
    jobs: list[Job] = []
    stems: dict[str, Path] = {}
    for path in paths:
        stem = output_stem(path)
        if stem in stems:
            reason = (
                f"its outputs would overwrite those of {stems[stem]} (same name "
                f"{stem!r}); run the two separately with different -o folders"
            )
            summary.failed.append((str(path), reason))
            log(f"FAILED {path}: {reason}")
            continue
        stems[stem] = path
        try:
            with open_source(path, config.axes) as src:
                _check_channels(src, config.options)
                source = src.describe()
                source.update(out_shape=list(src.out_shape), out_axes=src.out_axes)
                indices = [tuple(int(i) for i in ix) for ix in src.plane_indices()]
                if config.zarr:
                    ngff_attrs(src.out_axes)  # OME-Zarr takes 2 to 5 axes: fail now, not later
        except (InputError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, InputError) else str(exc)
            summary.failed.append((str(path), reason))
            log(f"FAILED {path}: {reason}")
            continue
        identity = input_identity(path)
        key = run_key(identity, source, model, parameters, kinds)
        outputs = output_paths(config.outdir, stem, kinds)
        job = Job(
            path=path, stem=stem, source=source, identity=identity, key=key, outputs=outputs,
            cache=config.outdir / WORK_DIR / f"{stem}-{key[:16]}", indices=indices,
        )  # fmt: skip
        if not config.overwrite and is_up_to_date(
            outputs["provenance"], key, list(outputs.values())
        ):
            # planes a run killed between the provenance record and their removal left
            shutil.rmtree(job.cache, ignore_errors=True)
            summary.skipped.append(path)
            log(f"skip   {path} (outputs up to date)")
            continue
        if config.overwrite:
            shutil.rmtree(job.cache, ignore_errors=True)
        else:
            _scan_cache(job)
        jobs.append(job)
    return jobs


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_channels(src: ImageSource, options: SegmentOptions) -> None:
    """Fail early, by file, when the channels cannot be shown as RGB."""
    n = src.n_channels
    if options.channels is None:
        if src.channel_axis is not None and n not in (1, 3, 4):
            raise ValueError(
                f"has {n} channels (axes {src.axes}); choose up to 3 with --channels, "
                "e.g. --channels 0,1"
            )
        return
    bad = [c for c in options.channels if not -n <= c < n]
    if bad:
        raise ValueError(f"--channels {bad} out of range: the image has {n} channel(s)")


# ----------------------------------------------------------------------------- executors

Task = tuple[Job, tuple[int, ...]]


def _local_results(
    tasks: Iterable[Task], config: RunConfig
) -> Iterator[tuple[Task, PlaneResult | BaseException]]:
    """Segment planes in this process, reading the next plane while the model runs."""
    seg = get_segmenter(config.model, config.options)

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
                result = seg.segment(fut.result(), index)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                yield task, exc
                continue
            result.seconds = time.perf_counter() - start
            yield task, result


def _dask_results(
    tasks: Iterable[Task], config: RunConfig, client
) -> Iterator[tuple[Task, PlaneResult | BaseException]]:
    """Segment planes on dask workers, keeping a bounded number of planes in flight."""
    from distributed import as_completed

    n_workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
    window = 2 * n_workers + 1
    queue = deque(tasks)
    owner: dict[Any, Task] = {}
    running = as_completed()

    def submit_next() -> None:
        while queue:
            job, index = task = queue.popleft()
            if job.failed:
                continue
            fut = client.submit(
                segment_plane, str(job.path), config.axes, index, config.model, config.options,
                pure=False,
            )  # fmt: skip
            owner[fut] = task
            running.add(fut)
            return

    for _ in range(window):
        submit_next()
    try:
        for fut in running:
            task = owner.pop(fut)
            try:
                result = fut.result()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                result = exc
            submit_next()
            yield task, result
    finally:
        for fut in owner:
            fut.cancel()


class _Cluster:
    """A dask client for ``--scheduler``: a LocalCluster or an existing scheduler."""

    def __init__(self, scheduler: str, workers: int) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise RuntimeError(
                "--scheduler needs dask.distributed: pip install 'napari-mobilesam[cluster]'"
            ) from None
        import logging

        self.cluster = None
        if scheduler == "local":
            self.cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=None, silence_logs=logging.ERROR,
            )  # fmt: skip
            self.client = Client(self.cluster)
        else:
            try:
                self.client = Client(scheduler, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                raise RuntimeError(
                    f"cannot reach the dask scheduler at {scheduler!r}: {exc}"
                ) from None

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# ----------------------------------------------------------------------------------- run


def run(
    config: RunConfig,
    *,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Summary:
    """Segment every plane of every input and write the outputs.

    Parameters
    ----------
    config : RunConfig
    log : callable
        Receives one line per input (done, skipped, failed) and notes.
    progress : bool
        Show a progress bar over planes (tqdm on stderr) with rate and ETA.

    Returns
    -------
    Summary
        ``exit_code`` is 0 when every input is done or skipped, 1 when some failed,
        130 when interrupted (Ctrl-C).
    """
    from tqdm.auto import tqdm

    summary = Summary()
    start = time.perf_counter()
    config.outdir.mkdir(parents=True, exist_ok=True)
    work = config.outdir / WORK_DIR
    tmp_dir = work / "tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of a killed run
    tmp_dir.mkdir(parents=True, exist_ok=True)

    bar = None
    cluster = None
    writer = None
    jobs: list[Job] = []
    try:
        jobs = _plan(config, summary, log)
        if config.dry_run:
            for job in jobs:
                summary.planned.append(job.path)
                shape = "x".join(str(s) for s in job.source["shape"])
                log(
                    f"would segment {job.path} ({job.source['axes']} {shape}, "
                    f"{len(job.todo)} of {len(job.indices)} planes to do) -> "
                    f"{', '.join(p.name for p in job.outputs.values())}"
                )
            return summary

        for job in [j for j in jobs if not j.todo]:  # finished planes from an earlier run
            _finish(job, config, tmp_dir, summary, log)
        pending = [j for j in jobs if j.todo]
        tasks = [(job, index) for job in pending for index in job.todo]
        if not tasks:
            return summary
        for job in pending:
            job.cache.mkdir(parents=True, exist_ok=True)
        remaining = {id(job): len(job.todo) for job in pending}

        # redraw often on a terminal; in a log file (cluster job output) every 30 s
        interval = 0.5 if sys.stderr.isatty() else 30.0
        bar = tqdm(
            total=len(tasks), unit="plane", disable=not progress, dynamic_ncols=True,
            mininterval=interval,
        )  # fmt: skip

        def write(line: str) -> None:
            with tqdm.external_write_mode():  # the line above the bar, wherever log prints
                log(line)

        if config.scheduler is None:
            results = _local_results(tasks, config)
        else:
            cluster = _Cluster(config.scheduler, config.workers)
            results = _dask_results(tasks, config, cluster.client)

        writer = _Writer()
        for (job, _index), result in results:
            if job.failed:
                continue
            if isinstance(result, BaseException):
                job.failed = _reason(result)
                job.close()
                summary.failed.append((str(job.path), job.failed))
                write(f"FAILED {job.path}: {job.failed}")
                bar.update(remaining[id(job)])
                continue
            writer.submit(_save_plane, job, result, tmp_dir)
            summary.planes += 1
            remaining[id(job)] -= 1
            bar.update(1)
            bar.set_postfix_str(job.path.name, refresh=False)
            if remaining[id(job)] == 0:
                job.close()
                writer.submit(_finish, job, config, tmp_dir, summary, write)
        writer.close()
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if writer is not None:  # (before the temporary folder goes)
            writer.close(raise_errors=False)
        if bar is not None:
            bar.close()
        for job in jobs:
            job.close()
        if cluster is not None:
            cluster.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        _remove_empty(work)
        summary.seconds = time.perf_counter() - start
    return summary


def _finish(job: Job, config: RunConfig, tmp_dir: Path, summary: Summary, log) -> None:
    """Write a finished job's outputs and clear its saved planes."""
    try:
        record = _write_outputs(job, config, tmp_dir)
    except (OSError, ValueError) as exc:
        job.failed = f"cannot write outputs: {exc}"
        summary.failed.append((str(job.path), job.failed))
        log(f"FAILED {job.path}: {job.failed}")
        return
    shutil.rmtree(job.cache, ignore_errors=True)
    summary.done.append(job.path)
    n = len(job.indices)
    seconds = sum(s for _, s in job.done.values())
    log(
        f"done   {job.path} ({n} plane{'s' if n != 1 else ''}, {record['objects']} objects, "
        f"{seconds:.1f} s) -> {job.outputs['labels'].name}"
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, InputError):
        return exc.reason
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, ValueError) else text


def _remove_empty(folder: Path) -> None:
    """Remove the work folder when nothing is left in it."""
    try:
        folder.rmdir()
    except OSError:
        pass
