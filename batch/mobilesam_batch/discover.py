"""Find the inputs of ``mobilesam-everything``: files, folders and glob patterns.

:func:`discover_inputs` expands what the user named into a list of input paths and
a list of :class:`InputError` for what gives nothing (a missing file, an empty
folder, a pattern without match, a dangling symbolic link).
:func:`split_output_folder` keeps the output folder's own files out of the inputs.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SUPPORTED_SUFFIXES", "InputError", "discover_inputs", "split_output_folder"]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".zarr")
# file suffix -> reader kind (a .zarr store is a folder)
_FILE_SUFFIXES = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".npy": "npy",
}
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")


class InputError(Exception):
    """An input that cannot be used: missing, unsupported, empty or undecodable.

    Attributes
    ----------
    path : Path
        The file, folder or pattern at fault.
    reason : str
        What is wrong with it. ``str(exc) == f"{path}: {reason}"``.
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# ----------------------------------------------------------------------------- discovery


def _is_zarr_dir(path: Path) -> bool:
    """Whether ``path`` is a zarr store folder (``*.zarr`` or holding zarr metadata)."""
    if not path.is_dir():
        return False
    return path.suffix.lower() == ".zarr" or any((path / m).is_file() for m in _ZARR_MARKERS)


def _is_candidate(path: Path) -> bool:
    """Whether a folder entry or glob match is an input: supported file or zarr folder."""
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return _is_zarr_dir(path)
    return path.is_file() and path.suffix.lower() in _FILE_SUFFIXES


def _scan_folder(folder: Path, recursive: bool, visited: set[Path]) -> list[Path]:
    """Supported inputs in ``folder`` sorted by name; subfolders too when ``recursive``."""
    visited.add(folder.resolve())
    found = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if _is_candidate(entry) or _is_dangling(entry):
            found.append(entry)
        elif recursive and entry.is_dir() and not entry.name.startswith("."):
            if entry.resolve() not in visited:  # symlink loops
                found.extend(_scan_folder(entry, True, visited))
    return found


def _is_pattern(text: str) -> bool:
    """Whether ``text`` is a glob pattern (contains ``*``, ``?`` or ``[``)."""
    return any(c in text for c in "*?[")


def _glob(pattern: str) -> tuple[list[Path], bool]:
    """Inputs matching ``pattern`` (sorted) and whether the pattern matched anything at all.

    Matches inside a zarr store below the pattern's literal prefix are skipped, so that
    ``data/**/*`` yields ``data/a.zarr`` and not its inner arrays.
    """
    matches = sorted(glob.glob(pattern, recursive=True))
    parts = Path(pattern).parts
    n_literal = next((i for i, p in enumerate(parts) if _is_pattern(p)), len(parts))
    kept = []
    for match in map(Path, matches):
        above = [Path(*match.parts[:i]) for i in range(n_literal + 1, len(match.parts))]
        wanted = _is_candidate(match) or _is_dangling(match)
        if wanted and not any(_is_zarr_dir(p) for p in above):
            kept.append(match)
    return kept, bool(matches)


def discover_inputs(
    specs: Sequence[str | Path], recursive: bool = False
) -> tuple[list[Path], list[InputError]]:
    """Expand files, folders and glob patterns into input paths.

    Parameters
    ----------
    specs : sequence of str or Path
        Each one is an image file, a zarr store folder (``*.zarr`` or a folder holding
        ``zarr.json`` / ``.zarray`` / ``.zgroup``), a folder of images, or a glob pattern
        (contains ``*``, ``?`` or ``[``; ``**`` matches any depth).
    recursive : bool
        Also take the images in subfolders of a folder (never inside a zarr store).

    Returns
    -------
    paths : list of Path
        The inputs, in the order of ``specs``; within a folder or glob, sorted by name.
        Paths resolving to the same file are kept once, at their first occurrence.
    errors : list of InputError
        One per spec that gave nothing: an unsupported or missing file, a folder without
        supported images, a pattern without match; and one per dangling symbolic link
        (named, or found in a folder or glob with a supported suffix). Unsupported and
        hidden files inside a folder or glob are skipped silently.
    """
    paths: list[Path] = []
    errors: list[InputError] = []
    seen: set[Path] = set()
    for spec in specs:
        path = Path(spec)
        found: list[Path] = []
        if path.is_dir() and not _is_zarr_dir(path):
            try:
                found = _scan_folder(path, recursive, set())
            except OSError as exc:
                errors.append(InputError(path, f"cannot list folder: {_short(exc)}"))
                continue
            if not found:
                errors.append(InputError(path, "no supported images in folder"))
        elif path.exists():
            suffix = path.suffix.lower()
            if suffix in SUPPORTED_SUFFIXES or _is_zarr_dir(path):
                found = [path]
            else:
                supported = ", ".join(SUPPORTED_SUFFIXES)
                reason = f"unsupported file type {suffix!r} (supported: {supported})"
                errors.append(InputError(path, reason))
        elif path.is_symlink():
            found = [path]  # dangling: reported below
        elif _is_pattern(str(spec)):
            found, matched = _glob(str(spec))
            if not matched:
                errors.append(InputError(path, "no file matches this pattern"))
            elif not found:
                errors.append(InputError(path, "no supported images match this pattern"))
        else:
            errors.append(InputError(path, "no such file or directory"))
        for p in found:
            if p.is_symlink() and not p.exists():
                if p.absolute() not in seen:
                    seen.add(p.absolute())
                    errors.append(InputError(p, _dangling_reason(p)))
                continue
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(p)
    return paths, errors


def _is_dangling(path: Path) -> bool:
    """A visible symbolic link whose target is missing, named like a supported input."""
    if path.name.startswith(".") or not path.is_symlink() or path.exists():
        return False
    target = Path(os.readlink(path))
    return any(p.suffix.lower() in SUPPORTED_SUFFIXES for p in (path, target))


def _dangling_reason(path: Path) -> str:
    return f"dangling symbolic link: its target {os.readlink(path)} does not exist"


def _short(exc: BaseException) -> str:
    """First line of an exception message, at most 200 characters."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def split_output_folder(
    specs: Sequence[str | Path], paths: list[Path], outdir: Path
) -> tuple[list[Path], list[InputError], int]:
    """Keep the output folder's files out of the inputs.

    An input inside ``outdir`` (e.g. a label image of an earlier run, found by
    scanning an input folder that holds the output folder) is left out quietly and
    counted. One the user pointed at (a file or folder named inside ``outdir``, or a
    glob pattern whose fixed part lies there) is an error instead: outputs are never
    read back as inputs.

    Parameters
    ----------
    specs : sequence of str or Path
        What the user named, as given to :func:`discover_inputs`.
    paths : list of Path
        What :func:`discover_inputs` found.
    outdir : Path
        The output folder.

    Returns
    -------
    kept : list of Path
        The inputs outside ``outdir``, in order.
    errors : list of InputError
        One per input inside ``outdir`` that the user pointed at.
    ignored : int
        How many inputs inside ``outdir`` were left out quietly.
    """
    out = outdir.resolve()
    named = []  # the parts of what the user named that lie inside the output folder
    for spec in specs:
        text = str(spec)
        fixed = Path(text)
        if _is_pattern(text):
            parts = fixed.parts
            fixed = Path(*parts[: next(i for i, p in enumerate(parts) if _is_pattern(p))] or ".")
        if _within(fixed.resolve(), out):
            named.append(fixed.resolve())
    kept: list[Path] = []
    errors: list[InputError] = []
    ignored = 0
    for path in paths:
        resolved = path.resolve()
        if not _within(resolved, out):
            kept.append(path)
        elif any(_within(resolved, n) for n in named):
            reason = (
                f"is inside the output folder {outdir}: outputs are not read back as inputs; "
                "move it out of there or choose another -o folder"
            )
            errors.append(InputError(path, reason))
        else:
            ignored += 1
    return kept, errors, ignored


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents
