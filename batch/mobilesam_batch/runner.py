"""Run segment-everything over many inputs: plan, compute planes, write outputs, resume.

The unit of work is one 2D plane. A run

1. holds its output folder (:class:`~.folder.OutputFolder`: checked, locked against
   a second run, with a temporary folder of its own);
2. plans (:func:`~.jobs.plan`): opens every input lazily, names its outputs (clashes
   with other inputs' outputs refused, or resolved by ``--on-clash``), skips it when
   its provenance record matches this run and every output exists, and picks up the
   planes an earlier, interrupted run saved;
3. segments the planes not yet done, here or on dask workers, saving each finished
   plane (:mod:`.planes`), so a killed run loses at most the planes in flight;
4. when all planes of an input are done, writes its outputs from the saved planes
   and moves them into place, provenance record last (:mod:`.finish`).

A file that cannot be read fails alone: it is reported with the reason and the run
goes on. A full, read-only or forbidden output folder stops the run once, with
:class:`~.folder.OutputError` in the summary (exit status 1); what was finished
stays, and running the same command again finishes the rest.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .executors import Cluster, ClusterError, dask_results, local_results
from .finish import finish
from .folder import WORK_DIR, OutputError, OutputFolder, check_writable
from .inputs import InputError
from .jobs import CLASH_CHOICES, Job, output_paths, output_stem, plan
from .link import LinkOptions
from .planes import RAN_ON, Writer, save_plane
from .segment import ModelSpec, SegmentOptions, get_segmenter

__all__ = [
    "CLASH_CHOICES",
    "RAN_ON",
    "WORK_DIR",
    "LinkOptions",
    "RunConfig",
    "Summary",
    "output_paths",
    "output_stem",
    "run",
]


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
    on_clash : {"refuse", "suffix", "overwrite"}
        What to do when an input's outputs would replace another input's (see
        :mod:`.jobs`).
    scheduler : str or None
        None: this process; ``"local"``: a LocalCluster of ``workers`` processes;
        otherwise the address of a dask scheduler (``tcp://host:8786``).
    workers : int
        Worker processes of the LocalCluster.
    worker_timeout : float
        Seconds to wait for a dask worker before giving up.
    command : list of str, optional
        The command line, recorded in the provenance.
    link : LinkOptions or None
        ``--link``: link each stack's planes into 3D objects or tracks (:mod:`.link`).
    embeddings : str or None
        ``--embeddings``: an embedding store of the (one) input, checked before its
        planes run; planes it holds are not embedded again (:mod:`.embeddings`).
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
    on_clash: str = "refuse"
    scheduler: str | None = None
    workers: int = 1
    worker_timeout: float = 60.0
    command: list[str] | None = None
    link: LinkOptions | None = None
    embeddings: str | None = None

    def output_kinds(self) -> list[str]:
        kinds = ["labels"]
        kinds += [k for k in ("coco", "csv", "zarr") if getattr(self, k)]
        if self.link is not None and self.link.writes_tracks:
            kinds.append("tracks")
        return kinds


@dataclass
class Summary:
    """What happened to each input."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    planned: list[Path] = field(default_factory=list)
    #: inputs inside the output folder, left out quietly (outputs of earlier runs)
    ignored: int = 0
    interrupted: bool = False
    #: why the run stopped early (output folder full or not writable, no dask worker)
    stopped: str | None = None
    planes: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        text = f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed"
        if self.planned:
            text = f"{len(self.planned)} to do, {len(self.skipped)} up to date, "
            text += f"{len(self.failed)} failed (dry run)"
        if self.ignored:
            text += f", {self.ignored} file(s) inside the output folder ignored"
        if self.interrupted:
            text += "; interrupted: run the same command again to resume"
        elif self.stopped:
            text += "; stopped early (see the error above): run the same command again to finish"
        return text

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed or self.stopped else 0


def run(
    config: RunConfig,
    *,
    log: Callable[[str], None] = print,
    progress: bool = True,
    folder: OutputFolder | None = None,
) -> Summary:
    """Segment every plane of every input and write the outputs.

    Parameters
    ----------
    config : RunConfig
    log : callable
        Receives one line per input (done, skipped, failed) and notes.
    progress : bool
        Show a progress bar over planes (tqdm on stderr) with rate and ETA.
    folder : OutputFolder, optional
        ``config.outdir``, already held by the caller (the command line takes it
        before loading the model); None: held here for the run.

    Returns
    -------
    Summary
        ``exit_code`` is 0 when every input is done or skipped, 1 when some failed
        or the run stopped early (``summary.stopped``), 130 when interrupted.

    Raises
    ------
    OutputError
        The output folder cannot be used (a file, not writable, held by another run).
    """
    summary = Summary()
    start = time.perf_counter()
    try:
        if config.dry_run:
            check_writable(config.outdir)
            _dry_run(config, summary, log)
            return summary
        own = folder is None
        if own:
            folder = OutputFolder.open(config.outdir, command=config.command, log=log)
        try:
            _run(config, folder, summary, log, progress)
        finally:
            if own:
                with _second_interrupt_exits():
                    folder.close()
    finally:
        summary.seconds = time.perf_counter() - start
    return summary


def _dry_run(config: RunConfig, summary: Summary, log: Callable[[str], None]) -> None:
    for job in plan(config, summary, log):
        summary.planned.append(job.path)
        shape = "x".join(str(s) for s in job.source["shape"])
        log(
            f"would segment {job.path} ({job.source['axes']} {shape}, "
            f"{len(job.todo)} of {len(job.indices)} planes to do) -> "
            f"{', '.join(p.name for p in job.outputs.values())}"
        )


def _run(
    config: RunConfig,
    folder: OutputFolder,
    summary: Summary,
    log: Callable[[str], None],
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    bar = cluster = writer = None
    jobs: list[Job] = []
    try:
        # saved planes are reused only when computed as this run computes them (what
        # "auto" resolves to); dask workers elsewhere decide for themselves
        local = config.scheduler in (None, "local")
        same_as = get_segmenter(config.model, config.options).where() if local else None
        jobs = plan(config, summary, log, same_as)
        for job in [j for j in jobs if not j.todo]:  # finished planes from an earlier run
            finish(job, config, folder.tmp, summary, log)
        pending = [j for j in jobs if j.todo]
        tasks = [(job, index) for job in pending for index in job.todo]
        if not tasks:
            return
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
            results = local_results(tasks, config)
        else:
            cluster = Cluster(
                config.scheduler, config.workers, worker_timeout=config.worker_timeout, log=write
            )
            results = dask_results(tasks, config, cluster)

        writer = Writer()
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
            writer.submit(save_plane, job, result, folder.tmp)
            summary.planes += 1
            remaining[id(job)] -= 1
            bar.update(1)
            bar.set_postfix_str(job.path.name, refresh=False)
            if remaining[id(job)] == 0:
                job.close()
                writer.submit(finish, job, config, folder.tmp, summary, write)
        writer.close()
    except KeyboardInterrupt:
        summary.interrupted = True
    except (OutputError, ClusterError) as exc:
        summary.stopped = str(exc)
    finally:
        with _second_interrupt_exits():
            if writer is not None:  # (before the temporary folder goes)
                writer.close(raise_errors=False)
            if bar is not None:
                bar.close()
            for job in jobs:
                job.close()
                if job.failed:  # no empty folder left for an input that failed
                    _rmdir(job.cache)
            if cluster is not None:
                cluster.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, InputError):
        return exc.reason
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, ValueError) else text


def _rmdir(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


class _second_interrupt_exits:
    """While cleaning up, Ctrl-C (or SIGTERM, where it raises) ends the process at once
    and quietly (exit status 130) instead of raising inside the cleanup."""

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if callable(signal.getsignal(sig)):  # a handler that raises, not SIG_IGN
                    self._previous[sig] = signal.signal(sig, _exit_now)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _exit_now(signum, frame) -> None:
    print("interrupted again: stopping now", file=sys.stderr, flush=True)
    os._exit(130)
