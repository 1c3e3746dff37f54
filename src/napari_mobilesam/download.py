"""Downloading a model's weights file: verified, atomic, and cleaned up after a kill.

:func:`download` writes the bytes to a ``.part`` file beside the destination, holding
an exclusive ``flock`` on it while it writes, checks size and sha256 and renames it
into place. :func:`remove_stale_parts` removes the ``.part`` files whose download
ended without cleaning up (SIGKILL, power loss): unlocked ones. Use
:func:`napari_mobilesam.weights.fetch`, which calls both.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from os import PathLike
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from .weights import CACHE_ENV, MIRROR_ENV, ModelInfo, WeightsError, _remember, download_url

__all__ = ["download", "remove_stale_parts"]

#: Seconds to wait for the server to connect or to send the next bytes.
_TIMEOUT_S = 60
_CHUNK = 1 << 16


def remove_stale_parts(folder: Path, filename: str) -> list[Path]:
    """Remove ``.<filename>.*.part`` files that no download is writing any more.

    A download holds an exclusive ``flock`` on its ``.part`` file while it writes,
    which the kernel releases when the process ends however it ends (SIGKILL
    included): an unlocked ``.part`` file is a leftover. Where files cannot be
    locked, a leftover that cannot be deleted is kept.

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    removed = []
    try:
        candidates = sorted(Path(folder).glob(f".{filename}.*.part"))
    except OSError:
        return removed
    for part in candidates:
        try:
            fd = os.open(part, os.O_RDWR)
        except OSError:
            continue
        try:
            if _try_lock(fd):
                part.unlink()
                removed.append(part)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; True when taken (or where the
    platform has no ``flock``: the delete itself then fails on a file in use)."""
    try:
        import fcntl
    except ImportError:  # Windows: an open file cannot be deleted there
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return False  # cannot tell: keep it
    return True


class _Sink:
    """File-like writer that hashes, counts and reports the bytes it writes.

    The progress bar (if ``progress``) is created on the first bytes, so that a
    server that cannot be reached leaves no empty bar behind.
    """

    def __init__(self, f: BinaryIO, info: ModelInfo, progress: bool) -> None:
        self._f = f
        self._info = info
        self._progress = progress
        self.bar = None
        self.hash = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes) -> int:
        n = self._f.write(data)
        self.hash.update(data)
        self.nbytes += len(data)
        if self._progress:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=self._info.size,
                    desc=self._info.filename,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1000,
                    file=sys.stderr,
                    leave=True,
                )
            self.bar.update(len(data))
        return n

    def flush(self) -> None:
        self._f.flush()


def _transfer(url: str, sink: _Sink) -> None:
    """Copy ``url`` into ``sink``: http(s) through pooch, ``file://`` from disk."""
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        import pooch

        downloader = pooch.HTTPDownloader(
            progressbar=False,
            chunk_size=_CHUNK,
            timeout=_TIMEOUT_S,
            headers={"User-Agent": "napari-mobilesam"},
        )
        downloader(url, sink, None)
    elif scheme == "file":
        from urllib.request import url2pathname

        with open(url2pathname(urlparse(url).path), "rb") as src:
            while block := src.read(_CHUNK):
                sink.write(block)
    else:
        raise _Unsupported(f"unsupported URL scheme {scheme!r} (use https://, http:// or file://)")


class _Unsupported(Exception):
    """Internal: the URL's scheme cannot be downloaded."""


def _reason(exc: BaseException) -> str:
    """One line saying why a transfer failed."""
    import requests

    if isinstance(exc, _Unsupported):
        return str(exc)
    if isinstance(exc, requests.exceptions.Timeout):
        return f"the server did not answer within {_TIMEOUT_S} s (timeout): {exc}"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return f"could not connect (offline, server down or name not resolved): {exc}"
    if isinstance(exc, requests.exceptions.HTTPError):
        resp = exc.response
        status = f"{resp.status_code} {resp.reason}" if resp is not None else str(exc)
        return f"the server answered HTTP {status}"
    broken = (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)
    if isinstance(exc, broken):
        return f"truncated transfer: the connection broke before the whole file arrived ({exc})"
    if isinstance(exc, requests.exceptions.RequestException):
        return f"download failed: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _error(info: ModelInfo, url: str, dest: Path, reason: str) -> WeightsError:
    """A :class:`WeightsError` whose message explains how to work offline."""
    fn = info.filename
    lines = [
        f"could not download the weights of model {info.name!r} ({fn})",
        f"  from:   {url}",
        f"  reason: {reason}",
        "To work offline, put the file there yourself:",
        f"  {dest}",
        f"  (sha256 {info.sha256}, size {info.size:,} bytes; published at {info.url})",
        f"or set {CACHE_ENV} to a folder that holds {fn},",
        f"or set {MIRROR_ENV} to a mirror (https://... or file:///...) that serves {fn},",
        f'or pass the file directly: checkpoint="path/to/{fn}" in Python, '
        "--weights PATH on the command line.",
    ]
    return WeightsError("\n".join(lines), model=info.name, url=url, dest=dest, reason=reason)


def download(info: ModelInfo, dest: str | PathLike, *, progress: bool = True) -> Path:
    """Download one weights file to ``dest``, verified and atomic.

    The bytes go to a temporary ``.part`` file in ``dest``'s folder (created if
    needed); only when the size and sha256 match ``info`` is it renamed to
    ``dest``, replacing any file there. On any failure, including Ctrl-C, the
    temporary file is removed and ``dest`` is left untouched.

    Parameters
    ----------
    info : ModelInfo
        What to download and how to check it; the URL is
        ``download_url(info)`` (so ``MOBILESAM_WEIGHTS_MIRROR`` applies).
    dest : str or path-like
        Final path of the file.
    progress : bool
        Show a tqdm progress bar on stderr.

    Returns
    -------
    pathlib.Path
        ``dest``.

    Raises
    ------
    WeightsError
        Unreachable server, HTTP error, truncated transfer, wrong size, checksum
        mismatch, unsupported URL, or the folder cannot be written.
    """
    dest = Path(dest)
    url = download_url(info)
    tmp: Path | None = None
    sink: _Sink | None = None
    try:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, name = _locked_part(dest)
        except OSError as exc:
            reason = f"cannot write to the folder {str(dest.parent)!r}: {exc}"
            raise _error(info, url, dest, reason) from exc
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f, info, progress)
            try:
                _transfer(url, sink)
            except (OSError, EOFError, _Unsupported) as exc:
                raise _error(info, url, dest, _reason(exc)) from exc
        if sink.nbytes != info.size:
            what = "truncated transfer" if sink.nbytes < info.size else "wrong size"
            reason = f"{what}: received {sink.nbytes:,} bytes, expected {info.size:,}"
            raise _error(info, url, dest, reason)
        got = sink.hash.hexdigest()
        if got != info.sha256:
            reason = (
                f"checksum mismatch: expected sha256 {info.sha256}, "
                f"but the file that arrived has sha256 {got}"
            )
            raise _error(info, url, dest, reason)
        try:
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except OSError as exc:
            reason = f"cannot move the downloaded file into place: {exc}"
            raise _error(info, url, dest, reason) from exc
        tmp = None
        _remember(dest, got)
    finally:
        if sink is not None and sink.bar is not None:
            sink.bar.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return dest


def _locked_part(dest: Path) -> tuple[int, str]:
    """A new ``.<name>.*.part`` file beside ``dest``, locked while it is written (so that
    :func:`remove_stale_parts` in another process leaves it alone)."""
    while True:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        _try_lock(fd)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(name))
        except FileNotFoundError:  # removed before it was locked: take another
            same = False
        if same:
            return fd, name
        os.close(fd)
