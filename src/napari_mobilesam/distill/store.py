"""On-disk store of teacher embeddings: one float16 zarr chunk per image.

Layout of a store folder::

    STORE/
      index.json        {"format": "mobilesam-embeddings", "version": 1,
                         "images": [relative posix paths], "embed_shape": [C, h, w],
                         "dtype": "float16", **meta}
      embeddings.zarr/  zarr v3 array (N, C, h, w) float16, chunks (1, C, h, w),
                        uncompressed, chunk files ``c/<row>/0/0/0``
      done.log          append-only: one finished row index per line
      failed.log        append-only: ``row<TAB>reason`` per unreadable image

Crash safety: ``index.json`` is written last when a store is created (temp file +
``os.replace``), so a folder without it is not a store and can be created again.
Zarr writes each chunk to a temporary file and renames it into place; :meth:`write`
then ``fsync``\\s the chunk files and only afterwards appends the rows to ``done.log``
(flush + ``fsync``). A row is *done* only once its line in ``done.log`` is complete
(ends with a newline): reading ignores a truncated last line, and the next append
cuts it off first. So an interrupted run never shows a half-written embedding as
done, and resuming just recomputes the rows that are not done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomic
from .data import DataError

__all__ = ["FORMAT", "VERSION", "EmbeddingStore"]

#: ``format`` value of ``index.json``.
FORMAT = "mobilesam-embeddings"
#: Current (and highest readable) ``version`` of ``index.json``.
VERSION = 1

_INDEX = "index.json"
_ARRAY = "embeddings.zarr"
_DONE = "done.log"
_FAILED = "failed.log"
_RESERVED = ("format", "version", "images", "embed_shape", "dtype")


class EmbeddingStore:
    """Teacher embeddings of a fixed list of images, float16, one zarr chunk per image.

    Use :meth:`create` for a new store and :meth:`open` for an existing one.

    Attributes
    ----------
    path : Path
        The store folder.
    images : list of str
        Image paths (relative, posix) in row order.
    embed_shape : tuple of int
        (C, h, w) of one embedding.
    meta : dict
        Provenance written by the creator (teacher name, weights and sha256, input
        size, pixel normalisation, ...): every key of ``index.json`` except the
        format fields.

    Notes
    -----
    A store can be pickled (e.g. into ``DataLoader`` worker processes): the zarr
    array is reopened lazily in each process.
    """

    def __init__(
        self,
        path: Path,
        images: list[str],
        embed_shape: tuple[int, int, int],
        meta: dict,
    ) -> None:
        self.path = Path(path)
        self.images = list(images)
        self.embed_shape = tuple(int(v) for v in embed_shape)
        self.meta = dict(meta)
        self._done = np.zeros(len(self.images), dtype=bool)
        self._failed: dict[int, str] = {}
        self._reader = None
        self._writer = None
        self._pid = os.getpid()
        self._logs_repaired: set[str] = set()
        self._load_logs()

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(
        cls,
        path: str | PathLike,
        images: list[str],
        embed_shape: tuple[int, int, int],
        meta: dict,
    ) -> EmbeddingStore:
        """Create an empty store for ``images`` in the folder ``path``.

        Parameters
        ----------
        path : path
            Folder; created if needed. Leftovers of an interrupted ``create`` (no
            ``index.json``) are replaced.
        images : list of str
            Relative posix paths of the images, one row each, in this order.
        embed_shape : tuple of int
            (C, h, w) of one embedding.
        meta : dict
            JSON-able provenance stored in ``index.json`` (must not use the keys
            ``format``, ``version``, ``images``, ``embed_shape``, ``dtype``).

        Raises
        ------
        DataError
            ``path`` already holds a store (``index.json``).
        ValueError
            Empty or duplicate ``images``, a bad ``embed_shape``, or reserved /
            non-JSON-able ``meta``.
        """
        import zarr

        path = Path(path)
        images = [str(p) for p in images]
        if not images:
            raise ValueError("images must list at least one image")
        if len(set(images)) != len(images):
            dup = next(p for p in images if images.count(p) > 1)
            raise ValueError(f"images lists {dup!r} more than once")
        shape = _check_shape(embed_shape)
        clash = sorted(set(meta) & set(_RESERVED))
        if clash:
            raise ValueError(f"meta must not use the reserved keys {clash}")
        index = _index(images, shape, meta)
        try:
            text = json.dumps(index, indent=1)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"meta is not JSON-able: {exc}") from None
        if (path / _INDEX).exists():
            raise DataError(
                f"{str(path)!r} already holds an embedding store; open it, or choose a new folder"
            )
        path.mkdir(parents=True, exist_ok=True)
        for name in (_DONE, _FAILED):  # leftovers of an interrupted create
            (path / name).unlink(missing_ok=True)
        zarr.create_array(
            store=str(path / _ARRAY),
            shape=(len(images), *shape),
            chunks=(1, *shape),
            dtype="float16",
            fill_value=0,
            compressors=None,
            chunk_key_encoding={"name": "default", "separator": "/"},
            overwrite=True,
        )
        for name in (_DONE, _FAILED):
            (path / name).touch()
        write_text_atomic(path / _INDEX, text)
        return cls(path, images, shape, {k: v for k, v in index.items() if k not in _RESERVED})

    @classmethod
    def open(cls, path: str | PathLike) -> EmbeddingStore:
        """Open an existing store.

        Raises
        ------
        DataError
            ``path`` has no ``index.json``, it is not readable JSON of this format
            (or of a newer version), or the zarr array is missing or does not have
            the shape and dtype the index describes.
        """
        path = Path(path)
        index_path = path / _INDEX
        if not index_path.is_file():
            raise DataError(f"{str(path)!r} is not an embedding store (no {_INDEX})")
        try:
            index = json.loads(index_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read {str(index_path)!r}: {exc}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataError(
                f"{str(index_path)!r} does not describe an embedding store "
                f"(format {index.get('format') if isinstance(index, dict) else None!r}, "
                f"expected {FORMAT!r})"
            )
        version = index.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise DataError(
                f"{str(index_path)!r} has version {version!r}; this napari-mobilesam reads "
                f"versions up to {VERSION} (upgrade the package)"
            )
        images = index.get("images")
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise DataError(f"{str(index_path)!r}: 'images' is not a list of paths")
        try:
            shape = _check_shape(index.get("embed_shape"))
        except ValueError as exc:
            raise DataError(f"{str(index_path)!r}: {exc}") from None
        meta = {k: v for k, v in index.items() if k not in _RESERVED}
        store = cls(path, images, shape, meta)
        try:
            arr = store._array()
        except Exception as exc:
            raise DataError(f"embedding store {str(path)!r}: cannot open {_ARRAY}: {exc}") from None
        expected = (len(images), *shape)
        # more rows than the index lists: an interrupted extend(); they are not part of it
        if (
            tuple(arr.shape[1:]) != shape
            or arr.shape[0] < len(images)
            or str(arr.dtype) != "float16"
        ):
            raise DataError(
                f"embedding store {str(path)!r}: {_ARRAY} has shape {tuple(arr.shape)} and "
                f"dtype {arr.dtype}, the index describes {expected} float16"
            )
        return store

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({str(self.path)!r}, {len(self)} images, "
            f"embed_shape={self.embed_shape}, done={int(self._done.sum())})"
        )

    def done(self) -> np.ndarray:
        """bool (N,): rows whose embedding is completely written."""
        return self._done.copy()

    def failed(self) -> dict[int, str]:
        """Rows recorded as unreadable (and not written since): ``{row: reason}``."""
        return {r: why for r, why in self._failed.items() if not self._done[r]}

    def read(self, row: int) -> np.ndarray:
        """The embedding of ``row``: float16 (C, h, w).

        Raises
        ------
        DataError
            The row is not written (not done).
        ValueError
            ``row`` is out of range.
        """
        row = self._check_row(row)
        if not self._done[row]:
            raise DataError(
                f"embedding store {str(self.path)!r}: row {row} ({self.images[row]!r}) "
                "has not been written"
            )
        return np.asarray(self._array()[row], dtype=np.float16)

    # ------------------------------------------------------------------ writing

    def write(self, rows: Sequence[int], embeddings) -> None:
        """Store ``embeddings`` (B, C, h, w) as rows ``rows`` and mark them done.

        ``embeddings`` is a numpy array or a torch tensor (any device) of any float
        dtype; it is stored as float16. The rows are marked done only after their
        chunks are on disk.

        Raises
        ------
        ValueError
            Out-of-range or repeated rows, or ``embeddings`` of the wrong shape.
        """
        rows = [self._check_row(r) for r in rows]
        if len(set(rows)) != len(rows):
            raise ValueError(f"rows must not repeat, got {rows}")
        data = _to_float16(embeddings)
        if data.shape != (len(rows), *self.embed_shape):
            raise ValueError(
                f"embeddings must have shape {(len(rows), *self.embed_shape)} for {len(rows)} "
                f"rows, got {data.shape}"
            )
        if not rows:
            return
        arr = self._array(write=True)
        order = np.argsort(rows, kind="stable")
        start = 0
        while start < len(order):  # contiguous runs of rows in one call each
            stop = start + 1
            while stop < len(order) and rows[order[stop]] == rows[order[stop - 1]] + 1:
                stop += 1
            r0 = rows[order[start]]
            arr[r0 : r0 + stop - start] = data[order[start:stop]]
            start = stop
        for r in rows:
            _fsync_file(self.path / _ARRAY / "c" / str(r) / "0" / "0" / "0")
        self._append(_DONE, "".join(f"{r}\n" for r in rows))
        self._done[rows] = True

    def extend(self, images: Sequence[str]) -> int:
        """Add rows, not yet done, for the ``images`` the store does not list yet.

        The rows already there keep their numbers and embeddings; the new images get
        the next rows, in the order given. The array grows first and ``index.json``
        is replaced afterwards (temp file + ``os.replace``): an interrupted call
        leaves the store as it was, with spare rows that :meth:`open` ignores and
        the next call reuses.

        Parameters
        ----------
        images : sequence of str
            Relative posix paths; those already in the store are skipped.

        Returns
        -------
        int
            The number of rows added.

        Raises
        ------
        ValueError
            ``images`` repeats a path.
        """
        images = [str(p) for p in images]
        if len(set(images)) != len(images):
            dup = next(p for p in images if images.count(p) > 1)
            raise ValueError(f"images lists {dup!r} more than once")
        have = set(self.images)
        new = [p for p in images if p not in have]
        if not new:
            return 0
        listed = self.images + new
        text = json.dumps(_index(listed, self.embed_shape, self.meta), indent=1)
        self._array(write=True).resize((len(listed), *self.embed_shape))
        self._reader = None  # reopened with the new shape
        write_text_atomic(self.path / _INDEX, text)
        self.images = listed
        self._done = np.concatenate([self._done, np.zeros(len(new), dtype=bool)])
        return len(new)

    def mark_failed(self, row: int, reason: str) -> None:
        """Record that the image of ``row`` could not be read (``reason`` is one line)."""
        row = self._check_row(row)
        reason = " ".join(str(reason).split()) or "unknown error"
        self._append(_FAILED, f"{row}\t{reason}\n")
        self._failed[row] = reason

    # ------------------------------------------------------------------ internals

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reader"] = state["_writer"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def _array(self, write: bool = False):
        import zarr

        if self._pid != os.getpid():  # forked: reopen in this process
            self._reader = self._writer = None
            self._pid = os.getpid()
        if write:
            if self._writer is None:
                # every chunk gets a file, all-zero ones too (fsync'ed in write())
                with zarr.config.set({"array.write_empty_chunks": True}):
                    self._writer = zarr.open_array(store=str(self.path / _ARRAY), mode="r+")
            return self._writer
        if self._reader is None:
            self._reader = zarr.open_array(store=str(self.path / _ARRAY), mode="r")
        return self._reader

    def _check_row(self, row) -> int:
        if isinstance(row, bool) or not isinstance(row, int | np.integer):
            raise TypeError(f"row must be an integer, got {row!r}")
        row = int(row)
        if not 0 <= row < len(self.images):
            raise ValueError(f"row {row} is out of range for a store of {len(self.images)} images")
        return row

    def _load_logs(self) -> None:
        n = len(self.images)
        for line in _complete_lines(self.path / _DONE):
            try:
                r = int(line)
            except ValueError:
                continue
            if 0 <= r < n:
                self._done[r] = True
        for line in _complete_lines(self.path / _FAILED):
            head, _, reason = line.partition("\t")
            try:
                r = int(head)
            except ValueError:
                continue
            if 0 <= r < n:
                self._failed[r] = reason

    def _append(self, name: str, text: str) -> None:
        path = self.path / name
        if name not in self._logs_repaired:
            _cut_partial_line(path)
            self._logs_repaired.add(name)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def _index(images: list[str], shape: tuple[int, ...], meta: dict) -> dict:
    """The content of ``index.json``."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "images": images,
        "embed_shape": list(shape),
        "dtype": "float16",
        **meta,
    }


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        out = tuple(int(v) for v in shape)
        ok = len(out) == 3 and all(v > 0 for v in out) and all(int(v) == v for v in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"embed_shape must be three positive integers (C, h, w), got {shape!r}")
    return out


def _to_float16(embeddings) -> np.ndarray:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(embeddings, torch.Tensor):
        if not embeddings.is_floating_point():
            raise TypeError(f"embeddings must be floating point, got {embeddings.dtype}")
        return embeddings.detach().to(device="cpu", dtype=torch.float16).contiguous().numpy()
    arr = np.asarray(embeddings)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"embeddings must be floating point, got {arr.dtype}")
    return arr.astype(np.float16, copy=False)


def _complete_lines(path: Path) -> list[str]:
    """Lines of a log that end with a newline (a truncated last line is ignored)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")[:-1]  # the part after the last newline is incomplete
    return [ln.decode("utf-8", errors="replace") for ln in lines if ln.strip()]


def _cut_partial_line(path: Path) -> None:
    """Truncate ``path`` after its last newline (drop an interrupted last line)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "r+b") as fh:
        pos = size
        block = 4096
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        else:
            keep = 0
        if keep != size:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # pragma: no cover - every written chunk has a file
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
