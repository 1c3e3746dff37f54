"""The output folder of a run: checked before the model loads, held by one run at a time.

:meth:`OutputFolder.open` creates the folder if needed, proves that it can be
written, takes its lock file ``OUTDIR/.mobilesam-everything.lock`` and makes the
run's own temporary folder ``OUTDIR/.mobilesam-work/tmp-<random>``. A second run on
the same folder refuses at once with :class:`OutputError`, naming the run that holds
it (pid, host, start time).

The lock is an exclusive ``flock`` on the lock file, which the kernel (or the NFS
lock manager) releases when its process ends, however it ends: a lock left by a
killed run is taken over by the next one, which notes it and clears that run's
temporary folder. On filesystems without ``flock`` (e.g. Lustre mounted without
it) the lock file's contents decide: a holder on this host that no longer runs is
taken over; a holder on another host has to be removed by hand (the message says
how).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .provenance import now

__all__ = [
    "LOCK_NAME",
    "WORK_DIR",
    "OutputError",
    "OutputFolder",
    "check_writable",
    "held",
    "is_fatal",
]

LOCK_NAME = ".mobilesam-everything.lock"
WORK_DIR = ".mobilesam-work"
#: errors that no other input would escape: the folder, not one file, is at fault
_FATAL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
#: flock unsupported by the filesystem
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_HOST = socket.gethostname()


class OutputError(Exception):
    """The output folder cannot be used: not a folder, not writable, full, or in use.

    The run stops (exit status 1); what is finished stays finished, and running the
    same command again resumes.
    """


def is_fatal(exc: BaseException) -> bool:
    """Whether a write error concerns the whole output folder (full, read-only, denied)."""
    return isinstance(exc, OSError) and exc.errno in _FATAL


def describe(exc: OSError) -> str:
    """``strerror`` of an OSError, without the path (messages name it themselves)."""
    return exc.strerror or str(exc)


def check_writable(path: Path) -> None:
    """Check, without writing anything, that ``path`` is or can become a writable folder.

    Raises
    ------
    OutputError
        ``path`` is a file, lies below a file, or its nearest existing folder cannot
        be written.
    """
    if path.exists() and not path.is_dir():
        raise OutputError(f"-o {path}: is a file, not a folder; give a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"-o {path}: {existing} is a file, so no folder can be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"-o {path}: the folder {existing} cannot be written")


class OutputFolder:
    """An output folder held by this run; use :meth:`open`.

    Attributes
    ----------
    path : Path
        The output folder.
    work : Path
        ``path / ".mobilesam-work"``: saved planes of unfinished inputs.
    tmp : Path
        This run's temporary folder inside ``work`` (same filesystem as ``path``,
        so finished files are renamed into place).
    """

    def __init__(self, path: Path, fd: int | None, tmp: Path) -> None:
        self.path = path
        self.work = path / WORK_DIR
        self.tmp = tmp
        self._fd = fd

    @classmethod
    def open(
        cls, path: Path, *, command: list[str] | None = None, log: Callable[[str], None] = print
    ) -> OutputFolder:
        """Create (if needed), check and lock ``path`` for this run.

        Parameters
        ----------
        path : Path
            The output folder.
        command : list of str, optional
            Recorded in the lock file for whoever finds the folder in use.
        log : callable
            Receives a note when a lock left by an ended run is taken over.

        Raises
        ------
        OutputError
            ``path`` is a file, cannot be created or written, or another run holds it.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise OutputError(f"-o {path}: is a file, not a folder; give a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"-o {path}: cannot create the folder: {describe(exc)}") from None
        me = {"pid": os.getpid(), "host": _HOST, "started": now(), "command": command}
        fd, previous = _lock(path / LOCK_NAME, me, _folder_in_use(path))
        try:
            work = path / WORK_DIR
            if previous is not None:
                log(f"note: {path} was left locked by a run that ended ({_who(previous)}); "
                    "taking over")  # fmt: skip
            _clear_temporaries(work)  # of runs that ended: this one holds the folder now
            tmp = work / f"tmp-{secrets.token_hex(4)}"
            tmp.mkdir(parents=True)
        except OSError as exc:
            _unlock(path / LOCK_NAME, fd)
            raise _cannot_write(path, exc) from None
        except BaseException:
            _unlock(path / LOCK_NAME, fd)
            raise
        return cls(path, fd, tmp)

    def close(self) -> None:
        """Remove this run's temporary folder, the work folder if empty, and the lock."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            self.work.rmdir()
        except OSError:
            pass  # saved planes of unfinished inputs stay for the rerun
        if self._fd is not None:
            _unlock(self.path / LOCK_NAME, self._fd)
            self._fd = None

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _cannot_write(folder: Path, exc: OSError) -> OutputError:
    return OutputError(
        f"-o {folder}: cannot write in this folder: {describe(exc)}; choose a writable folder"
    )


def _clear_temporaries(work: Path) -> None:
    if not work.is_dir():
        return
    for entry in work.iterdir():
        if entry.name == "tmp" or entry.name.startswith("tmp-"):
            shutil.rmtree(entry, ignore_errors=True)


def _who(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "its details could not be read"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')}"
    )


@contextmanager
def held(lock: Path, in_use: Callable[[str], str], *, command: list[str] | None = None):
    """Hold the lock file ``lock`` for the block, as a run holds its output folder: a
    second holder refuses at once, a lock left by an ended process is taken over.

    Parameters
    ----------
    lock : Path
        The lock file (created; removed at the end).
    in_use : callable(str) -> str
        The refusal's message, given who holds the lock ("pid 12, host h, started ...").
    command : list of str, optional
        Recorded in the lock file for whoever finds it held.

    Yields
    ------
    dict or None
        The record of an ended process whose lock was taken over, if any.

    Raises
    ------
    OutputError
        Another process holds the lock, or the lock file cannot be written.
    """
    me = {"pid": os.getpid(), "host": _HOST, "started": now(), "command": command}
    fd, previous = _lock(lock, me, in_use)
    try:
        yield previous
    finally:
        _unlock(lock, fd)


def _lock(
    lock: Path, me: dict[str, Any], in_use: Callable[[str], str]
) -> tuple[int, dict[str, Any] | None]:
    """Take the lock file; returns its descriptor and the record of an ended holder, if any.

    With ``flock``, a run that ends releases the lock with its process; the file it
    leaves behind (a killed run cannot remove it) is then only a record. Another run
    may remove the file between our ``open`` and our ``flock``, so the lock counts
    only when the locked file is still the one at ``lock``.
    """
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise _cannot_write(lock.parent, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(lock, wait=True)
            os.close(fd)
            raise OutputError(in_use(_who(holder))) from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                os.close(fd)
                raise OutputError(f"-o {lock.parent}: cannot lock it: {describe(exc)}") from None
            return fd, _lock_without_flock(lock, fd, me, in_use)
        if not _same_file(fd, lock):
            os.close(fd)  # removed by the run that held it: lock the new one
            continue
        previous = _read_holder(lock, wait=False)
        try:
            _write_holder(fd, me)
        except OSError as exc:
            _unlock(lock, fd)
            raise _cannot_write(lock.parent, exc) from None
        ended = previous is not None and previous.get("pid") != me["pid"]
        return fd, previous if ended else None


def _lock_without_flock(
    lock: Path, fd: int, me: dict[str, Any], in_use: Callable[[str], str]
) -> dict[str, Any] | None:
    """The lock file's contents decide where the filesystem has no ``flock``."""
    holder = _read_holder(lock, wait=False)
    if holder is not None and holder.get("pid") != me["pid"]:
        if holder.get("host") != me["host"] or _alive(holder.get("pid")):
            os.close(fd)
            message = in_use(_who(holder))
            if holder.get("host") != me["host"]:
                message += f" (this filesystem cannot lock files; if it has ended, delete {lock})"
            raise OutputError(message)
    try:
        _write_holder(fd, me)
    except OSError as exc:
        os.close(fd)
        raise _cannot_write(lock.parent, exc) from None
    return holder


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _write_holder(fd: int, me: dict[str, Any]) -> None:
    data = (json.dumps(me) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_holder(lock: Path, *, wait: bool) -> dict[str, Any] | None:
    """The lock file's record. With ``wait`` (the lock is held), give a holder that has
    just locked a moment to replace an ended run's record by its own (up to 50 tries,
    20 ms apart)."""
    record = None
    for _ in range(50 if wait else 1):
        try:
            record = json.loads(lock.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        if not isinstance(record, dict) or "pid" not in record:
            record = None
        elif not wait or record.get("host") != _HOST or _alive(record["pid"]):
            return record
        time.sleep(0.02)
    return record


def _folder_in_use(folder: Path) -> Callable[[str], str]:
    """The refusal when another run holds the output folder, given who holds it."""

    def message(who: str) -> str:
        return (
            f"-o {folder}: another mobilesam-everything run is writing there ({who}); "
            "wait for it to finish (then run this command again to add what it lacks), "
            "or choose another -o folder"
        )

    return message


def _unlock(lock: Path, fd: int) -> None:
    """Remove the lock file, then release it (waiting runs then lock a new file)."""
    try:
        if _same_file(fd, lock):
            lock.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)
