"""Atomic writes: a temporary beside the destination, renamed onto it when complete.

Readers never see a half-written file or folder, and an interrupted write leaves the
destination as it was. Everything in the package that writes to disk goes through
:func:`atomic_path` (or :func:`write_text_atomic`, :func:`write_json_atomic`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_path", "to_json", "write_json_atomic", "write_text_atomic"]


def _temp_sibling(dest: Path, folder: Path, suffix: str, *, create: str | None) -> Path:
    """A fresh hidden path ``folder/.<dest name>.<random><suffix>``.

    ``create`` is ``"file"`` (an empty file, mode 0o666 less the umask), ``"dir"``
    (an empty folder) or None (only a name that does not exist yet).
    """
    while True:
        path = folder / f".{dest.name}.{secrets.token_hex(4)}{suffix}"
        try:
            if create == "file":
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            elif create == "dir":
                os.mkdir(path)
            elif os.path.lexists(path):
                continue
        except FileExistsError:
            continue
        return path


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _fsync_file(path: Path) -> None:
    """Flush a finished file's data to disk, so that a rename never exposes an empty file."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(dest: Path, tmp_dir: Path | None = None, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write to and rename it onto ``dest`` on success.

    Parameters
    ----------
    dest : path
        The final file or folder.
    tmp_dir : path, optional
        Existing folder for the temporary, on the same filesystem as ``dest``
        (``os.replace`` cannot cross filesystems). Default: ``dest``'s folder.
    is_dir : bool
        Yield an empty temporary folder instead of an empty temporary file.

    Yields
    ------
    Path
        ``tmp_dir/.<dest name>.<random>.tmp``, already created (empty).

    Notes
    -----
    On normal exit a file is flushed to disk and ``os.replace``-d onto ``dest``.
    A folder replacing an existing ``dest`` first moves the old one aside to a
    hidden name in ``tmp_dir``, renames the new one into place (moving the old
    one back if that fails) and then deletes the old one (a warning names it if
    that fails). On an exception in the body the temporary (file or folder tree)
    is deleted and the exception re-raised; ``dest`` is left as it was.

    Raises
    ------
    FileNotFoundError
        If ``tmp_dir`` (or ``dest``'s folder) is not an existing folder.
    """
    dest = Path(dest)
    folder = Path(tmp_dir) if tmp_dir is not None else dest.parent
    if not folder.is_dir():
        what = "tmp_dir" if tmp_dir is not None else "the destination's folder"
        raise FileNotFoundError(f"{what} {str(folder)!r} is not an existing folder (for {dest})")
    tmp = _temp_sibling(dest, folder, ".tmp", create="dir" if is_dir else "file")
    try:
        yield tmp
        if not is_dir:
            _fsync_file(tmp)
        if is_dir and os.path.lexists(dest):
            old = _temp_sibling(dest, folder, ".old", create=None)
            os.rename(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.rename(old, dest)
                raise
            try:
                _remove(old)
            except OSError as err:
                warnings.warn(
                    f"replaced {dest} but could not delete its old version at {old}: {err}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        else:
            os.replace(tmp, dest)
    except BaseException:
        try:
            _remove(tmp)
        except OSError:  # never hide the original error behind a cleanup error
            pass
        raise


def write_text_atomic(dest: Path, text: str, tmp_dir: Path | None = None) -> None:
    """Write ``text`` (UTF-8, newlines untranslated) to ``dest`` atomically."""
    with atomic_path(dest, tmp_dir) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def _json_default(obj: Any) -> Any:
    """``json`` fallback: numpy scalars and arrays to Python numbers and lists, paths to str."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable: {obj!r}")


def to_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text (no NaN/Infinity) of ``obj``, numpy values converted.

    Raises
    ------
    TypeError
        If ``obj`` holds something JSON cannot represent.
    ValueError
        If ``obj`` holds NaN or infinite floats (not valid JSON).
    """
    return json.dumps(obj, indent=indent, default=_json_default, allow_nan=False)


def write_json_atomic(dest: Path, obj: Any, tmp_dir: Path | None = None) -> None:
    """Write ``obj`` as JSON (indent 2, trailing newline) to ``dest`` atomically.

    numpy scalars and arrays become Python numbers and (nested) lists, paths strings;
    raises as :func:`to_json` does, before anything is written.
    """
    write_text_atomic(dest, to_json(obj, indent=2) + "\n", tmp_dir)
