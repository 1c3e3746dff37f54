"""Model weights: the registry of published checkpoints, the cache, the downloader.

The registry (``weights/registry.json`` in a source checkout, shipped in the wheel
as ``napari_mobilesam/_data/registry.json``) records for each model name the file
name, download URL, sha256, size in bytes, license and a description.

:func:`fetch` returns the path of a model's weights file, downloading it into the
cache folder (see :func:`cache_dir`) on first use. Every download is checked
against the registry's size and sha256 and written atomically: a failed or
interrupted download leaves nothing at the final path, and the ``.part`` file of a
download whose process was killed is removed by the next :func:`fetch`. A file
already in the cache is checked against the registry's sha256 once per file
version (:func:`file_sha256` remembers digests by size and modification time, in
the process and beside the file as ``.<name>.sha256.json``). Every failure raises
:class:`WeightsError`, whose message says what to do.

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
import threading
from os import PathLike
from pathlib import Path

from .registry import (
    _PACKAGED_REGISTRY,  # noqa: F401  (re-exported for tests and tools)
    _SHA256_RE,
    CHECKOUT_WEIGHTS,
    ModelInfo,
    _load_registry,
    _parse_entry,  # noqa: F401
    bundled_path,
)

__all__ = [
    "REGISTRY",
    "ModelInfo",
    "WeightsError",
    "cache_dir",
    "default_max_upscale",
    "download",
    "download_url",
    "fetch",
    "file_sha256",
    "get_model_info",
    "local_path",
    "remove_stale_parts",
    "sha256_file",
    "verify_cached",
    "weight_path",
]

#: Environment variable naming the cache folder.
CACHE_ENV = "MOBILESAM_CACHE"
#: Environment variable naming a mirror that serves ``<mirror>/<filename>``.
MIRROR_ENV = "MOBILESAM_WEIGHTS_MIRROR"

#: The ``weights/`` folder of a source checkout: registry and checkout-local cache.
_CHECKOUT_WEIGHTS = CHECKOUT_WEIGHTS


class WeightsError(RuntimeError):
    """A model's weights could not be downloaded, or the cached file is not the
    published one.

    Raised for every failed download: server unreachable or offline (connection
    refused, DNS failure, timeout), an HTTP error status, a truncated transfer or a
    file of the wrong size, and a checksum mismatch; the message names the model,
    the URL and the reason, and explains how to work offline. Raised too for a
    cached file of the right size but the wrong sha256 (``url`` is None then); the
    message says how to replace it.

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


def default_max_upscale(name: str) -> float | None:
    """The upscale limit model ``name`` uses unless told otherwise
    (:attr:`ModelInfo.max_upscale`); None for no limit or a name not in the registry (such
    a name is refused where the model loads)."""
    info = REGISTRY.get(name)
    return None if info is None else info.max_upscale


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


def local_path(info: ModelInfo) -> Path:
    """Where a model's weights file is on this machine (or will be, once downloaded):
    :func:`napari_mobilesam.registry.bundled_path` for bundled weights, else the cache."""
    return bundled_path(info) if info.bundled else cache_dir() / info.filename


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


#: (resolved path, size, mtime_ns) -> sha256 of files hashed in this process
_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256.json")


def file_sha256(path: str | PathLike) -> str:
    """Hex sha256 of a file, computed once per version of the file.

    The digest is remembered by (path, size, modification time): in this process,
    and for files in the cache folder (:func:`cache_dir`) also in a hidden
    ``.<name>.sha256.json`` beside the file, so that a 2.5 GB checkpoint is hashed
    once, not at every start. A file replaced or modified gets a new size or
    modification time, and is hashed again.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    str
        64 lower-case hex digits.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _DIGESTS_LOCK:
        if key in _DIGESTS:
            return _DIGESTS[key]
    in_cache = path.parent == cache_dir().resolve()
    digest = _read_sidecar(path, st) if in_cache else None
    if digest is None:
        digest = sha256_file(path)
        if in_cache:
            _write_sidecar(path, st, digest)
    with _DIGESTS_LOCK:
        _DIGESTS[key] = digest
    return digest


def _read_sidecar(path: Path, st: os.stat_result) -> str | None:
    try:
        memo = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(memo, dict) or (memo.get("size"), memo.get("mtime_ns")) != (
        st.st_size,
        st.st_mtime_ns,
    ):
        return None
    digest = memo.get("sha256")
    return digest if isinstance(digest, str) and _SHA256_RE.fullmatch(digest) else None


def _write_sidecar(path: Path, st: os.stat_result, digest: str) -> None:
    """Remember ``digest`` beside ``path`` (quietly skipped where the folder is read-only)."""
    from .atomic import write_json_atomic

    memo = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        write_json_atomic(_sidecar(path), memo)
    except OSError:
        pass


def _is_cached(info: ModelInfo, path: Path) -> bool:
    """True when ``path`` is a file of the registry size (its contents unchecked)."""
    try:
        return path.is_file() and path.stat().st_size == info.size
    except OSError:
        return False


def cache_state(info: ModelInfo, path: Path) -> str:
    """``"ok"`` (registry size and sha256), ``"mismatch"`` (registry size, another
    sha256), ``"partial"`` (another size) or ``"missing"``; hashes at most once per
    file version (:func:`file_sha256`)."""
    if not _is_cached(info, path):
        return "partial" if path.exists() else "missing"
    return "ok" if file_sha256(path) == info.sha256 else "mismatch"


def verify_cached(info: ModelInfo, path: Path) -> Path:
    """Check a cached weights file of the registry size against the registry's sha256.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    WeightsError
        The file's sha256 differs from the registry's; the message says how to
        replace it.
    """
    got = file_sha256(path)
    if got != info.sha256:
        lines = [
            f"the cached weights of model {info.name!r} are not the published file:",
            f"  {path}",
            f"  has sha256 {got},",
            f"  expected   {info.sha256} (a damaged or replaced file).",
            (
                "It ships with napari-mobilesam: reinstall it (in a checkout: "
                "git checkout -- weights/)."
                if info.bundled
                else f"To fix it, download it again: `mobilesam weights download {info.name}` "
                "replaces it (or delete the file; it is downloaded on next use)."
            ),
            "To use a checkpoint of your own, pass it directly: --weights PATH on the "
            'command line, checkpoint="PATH" in Python.',
        ]
        reason = f"sha256 mismatch: {got}"
        raise WeightsError("\n".join(lines), model=info.name, dest=path, reason=reason)
    return path


def fetch(name: str, *, progress: bool = True) -> Path:
    """Path of a model's weights file, downloading it into the cache if needed.

    A file already in the cache with the registry size is checked against the
    registry's sha256 (once per file version, see :func:`file_sha256`) and returned,
    without any network access. Otherwise the file is downloaded from
    :func:`download_url`, checked against the registry's size and sha256, and
    moved into place atomically (see :func:`download`). ``.part`` files of killed
    downloads are removed first (:func:`remove_stale_parts`).

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
        The download failed (the message says how to work offline), or the cached
        file has the wrong sha256 (the message says how to replace it).
    """
    info = get_model_info(name)
    if info.bundled:
        return _bundled(info)
    dest = cache_dir() / info.filename
    remove_stale_parts(dest.parent, info.filename)
    if _is_cached(info, dest):
        return verify_cached(info, dest)
    return download(info, dest, progress=progress)


def _bundled(info: ModelInfo) -> Path:
    """The verified path of weights shipped with the package (never downloaded)."""
    path = bundled_path(info)
    if not _is_cached(info, path):
        raise WeightsError(
            f"the weights of model {info.name!r} ship with napari-mobilesam but "
            f"{path} is {'damaged (wrong size)' if path.exists() else 'missing'}; "
            "reinstall napari-mobilesam (in a checkout: git checkout -- weights/)",
            model=info.name, dest=path, reason="bundled file missing or damaged",
        )  # fmt: skip
    return verify_cached(info, path)


def _remember(path: Path, digest: str) -> None:
    """Record the digest of a file just downloaded (checked while it arrived)."""
    try:
        st = path.stat()
    except OSError:
        return
    with _DIGESTS_LOCK:
        _DIGESTS[(str(path.resolve()), st.st_size, st.st_mtime_ns)] = digest
    if path.parent.resolve() == cache_dir().resolve():
        _write_sidecar(path.resolve(), st, digest)


def download(info: ModelInfo, dest: str | PathLike, *, progress: bool = True) -> Path:
    """Download one weights file to ``dest``, verified and atomic: see
    :func:`napari_mobilesam.download.download`."""
    from .download import download as _download  # (it imports this module)

    return _download(info, dest, progress=progress)


def remove_stale_parts(folder: Path, filename: str) -> list[Path]:
    """Remove leftover ``.part`` files: see :func:`napari_mobilesam.download.remove_stale_parts`."""
    from .download import remove_stale_parts as _remove

    return _remove(folder, filename)
