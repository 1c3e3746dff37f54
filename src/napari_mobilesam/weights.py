"""Model weights: the registry of published checkpoints, the cache, the downloader.

The registry (``weights/registry.json`` in a source checkout, shipped in the wheel
as ``napari_mobilesam/_data/registry.json``) records for each model name the file
name, download URL, sha256, size in bytes, license and a description.

:func:`fetch` returns the path of a model's weights file, downloading it into the
cache folder (see :func:`cache_dir`) on first use. Every download is checked
against the registry's size and sha256 and written atomically: a failed or
interrupted download leaves nothing at the final path. Every failure raises
:class:`WeightsError`, whose message says which file to put where to work offline.

Environment variables
---------------------
MOBILESAM_CACHE
    Folder that holds the weights files (overrides the default cache folder).
MOBILESAM_WEIGHTS_MIRROR
    Base URL of a mirror that serves the files under their registry file names,
    ``<mirror>/<filename>``: an institutional server (``https://...``) or a shared
    folder (``file:///...``). Used instead of the registry URLs.

Importing this module touches neither the network nor the disk (apart from
reading the registry) and does not import torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

__all__ = [
    "REGISTRY",
    "ModelInfo",
    "WeightsError",
    "cache_dir",
    "download",
    "download_url",
    "fetch",
    "get_model_info",
    "sha256_file",
    "weight_path",
]

#: Environment variable naming the cache folder.
CACHE_ENV = "MOBILESAM_CACHE"
#: Environment variable naming a mirror that serves ``<mirror>/<filename>``.
MIRROR_ENV = "MOBILESAM_WEIGHTS_MIRROR"

#: Registry shipped inside the wheel (pyproject force-include).
_PACKAGED_REGISTRY = Path(__file__).resolve().parent / "_data" / "registry.json"
#: The ``weights/`` folder of a source checkout: registry and checkout-local cache.
_CHECKOUT_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"

#: Seconds to wait for the server to connect or to send the next bytes.
_TIMEOUT_S = 60
_CHUNK = 1 << 16
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_REQUIRED_KEYS = ("filename", "url", "sha256", "size", "license", "description")


class WeightsError(RuntimeError):
    """A model's weights could not be downloaded.

    Raised for every failed download: server unreachable or offline (connection
    refused, DNS failure, timeout), an HTTP error status, a truncated transfer or a
    file of the wrong size, and a checksum mismatch. The message names the model,
    the URL and the reason, and explains how to work offline.

    Attributes
    ----------
    model : str or None
        Registry name of the model.
    url : str or None
        The URL the download was attempted from.
    dest : pathlib.Path or None
        Where the file was to be written (and where to put it by hand).
    reason : str or None
        Why the download failed, in one line.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        url: str | None = None,
        dest: Path | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.model = model
        self.url = url
        self.dest = dest
        self.reason = reason


@dataclass(frozen=True)
class ModelInfo:
    """One published weights file.

    Attributes
    ----------
    name : str
        Registry name (``vit_t``, ``vit_b``, ``vit_l``, ``vit_h``).
    filename : str
        File name in the cache, as published (e.g. ``mobile_sam.pt``).
    url : str
        Canonical download URL.
    sha256 : str
        Lower-case hex sha256 of the file.
    size : int
        File size in bytes.
    license : str
        SPDX license identifier of the weights.
    description : str
        One line for people.
    source : str
        Web page of the project that publishes the weights ("" if unknown).
    """

    name: str
    filename: str
    url: str
    sha256: str
    size: int
    license: str
    description: str
    source: str = ""


# --------------------------------------------------------------------------- registry


def _load_registry(paths: list[Path] | None = None) -> dict[str, ModelInfo]:
    """Read the first registry file that exists among ``paths``.

    Parameters
    ----------
    paths : list of pathlib.Path, optional
        Candidates in order; by default the packaged copy, then the checkout's.

    Returns
    -------
    dict of str to ModelInfo
        In file order.

    Raises
    ------
    FileNotFoundError
        None of the candidates exists (a broken installation).
    ValueError
        The file is not valid JSON or an entry is malformed; names file and entry.
    """
    if paths is None:
        paths = [_PACKAGED_REGISTRY, _CHECKOUT_WEIGHTS / "registry.json"]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            "model registry not found; looked in: "
            + ", ".join(str(p) for p in paths)
            + " (reinstall napari-mobilesam)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"model registry {str(path)!r} is not valid JSON: {exc}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"model registry {str(path)!r} has no 'models' mapping")
    return {name: _parse_entry(path, name, entry) for name, entry in models.items()}


def _parse_entry(path: Path, name: str, entry: object) -> ModelInfo:
    """Check one registry entry and turn it into a :class:`ModelInfo`."""
    where = f"model registry {str(path)!r}, entry {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    size = entry["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"{where}: 'size' must be a positive integer, got {size!r}")
    if not isinstance(entry["sha256"], str) or not _SHA256_RE.fullmatch(entry["sha256"]):
        raise ValueError(
            f"{where}: 'sha256' must be 64 lower-case hex digits, got {entry['sha256']!r}"
        )
    filename = entry["filename"]
    if not isinstance(filename, str) or not filename or Path(filename).name != filename:
        raise ValueError(f"{where}: 'filename' must be a bare file name, got {filename!r}")
    return ModelInfo(
        name=name,
        filename=filename,
        url=str(entry["url"]),
        sha256=entry["sha256"],
        size=size,
        license=str(entry["license"]),
        description=str(entry["description"]),
        source=str(entry.get("source", "")),
    )


#: Every known model, by name, loaded from ``registry.json`` at import.
REGISTRY: dict[str, ModelInfo] = _load_registry()


def get_model_info(name: str) -> ModelInfo:
    """Look up a model in the registry.

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"vit_t"``.

    Returns
    -------
    ModelInfo

    Raises
    ------
    TypeError
        ``name`` is not a string.
    ValueError
        ``name`` is not in the registry; the message lists the known names.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}: {name!r}")
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ValueError(f"unknown model name {name!r}; known names: {known}") from None


# ------------------------------------------------------------------------------ cache


def cache_dir() -> Path:
    """The folder that holds downloaded weights files.

    Resolved in this order:

    1. the environment variable ``MOBILESAM_CACHE``, if set and not empty;
    2. in a source checkout (``weights/registry.json`` exists next to ``src/``),
       that ``weights/`` folder: the checkout-local weight cache, ignored by git;
    3. the user cache folder of the operating system,
       ``pooch.os_cache("napari-mobilesam")`` (e.g. ``~/.cache/napari-mobilesam``
       on Linux, ``~/Library/Caches/napari-mobilesam`` on macOS).

    The folder is not created here; :func:`fetch` creates it when needed.

    Returns
    -------
    pathlib.Path
        Absolute path.
    """
    env = os.environ.get(CACHE_ENV, "")
    if env:
        return Path(os.path.abspath(os.path.expanduser(env)))
    if (_CHECKOUT_WEIGHTS / "registry.json").is_file():
        return _CHECKOUT_WEIGHTS
    import pooch  # lazy: ~0.1 s, only needed outside a checkout

    return Path(pooch.os_cache("napari-mobilesam")).absolute()


def weight_path(name: str) -> Path:
    """Where the weights file of model ``name`` lives in the cache.

    Parameters
    ----------
    name : str
        Registry name.

    Returns
    -------
    pathlib.Path
        ``cache_dir() / filename``; the file may not exist yet.
    """
    return cache_dir() / get_model_info(name).filename


def download_url(info: ModelInfo) -> str:
    """The URL a model is downloaded from.

    Parameters
    ----------
    info : ModelInfo

    Returns
    -------
    str
        ``info.url``, or ``<mirror>/<info.filename>`` when the environment
        variable ``MOBILESAM_WEIGHTS_MIRROR`` is set to a mirror's base URL.
    """
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        return f"{mirror.rstrip('/')}/{info.filename}"
    return info.url


def sha256_file(path: str | PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks.

    Parameters
    ----------
    path : str or path-like
    chunk : int
        Bytes read at a time.

    Returns
    -------
    str
        64 lower-case hex digits.

    Raises
    ------
    ValueError
        ``chunk`` is smaller than 1.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 byte, got {chunk!r}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_cached(info: ModelInfo, path: Path) -> bool:
    """True when ``path`` is a file of the registry size."""
    try:
        return path.is_file() and path.stat().st_size == info.size
    except OSError:
        return False


def fetch(name: str, *, progress: bool = True) -> Path:
    """Path of a model's weights file, downloading it into the cache if needed.

    A file already in the cache with the registry size is returned as is,
    without any network access. Otherwise the file is downloaded from
    :func:`download_url`, checked against the registry's size and sha256, and
    moved into place atomically (see :func:`download`).

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"vit_t"``.
    progress : bool
        Show a progress bar on stderr while downloading.

    Returns
    -------
    pathlib.Path
        ``weight_path(name)``, which now exists.

    Raises
    ------
    ValueError
        Unknown model name.
    WeightsError
        The download failed; the message says how to work offline.
    """
    info = get_model_info(name)
    dest = cache_dir() / info.filename
    if _is_cached(info, dest):
        return dest
    return download(info, dest, progress=progress)


# --------------------------------------------------------------------------- download


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
            fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
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
    finally:
        if sink is not None and sink.bar is not None:
            sink.bar.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return dest
