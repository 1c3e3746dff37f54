"""Provenance records: what produced an output, and whether a rerun may skip it.

Each input gets ``<stem>_labels.json`` beside its label image. It is written last,
after every other output of that input, so its presence with a matching ``key``
means the outputs are complete and were made from the same input file with the
same model and parameters; a rerun then skips the input (resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PROVENANCE_FORMAT = 1


def input_identity(path: Path) -> dict[str, Any]:
    """Size and modification time of an input (a file or a zarr directory).

    Returns
    -------
    dict
        ``path`` (absolute), ``size`` (bytes; for a directory, of the directory
        entry), ``mtime_ns`` and ``mtime`` (ISO 8601, UTC).
    """
    st = os.stat(path)
    return {
        "path": str(Path(path).resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "mtime": datetime.fromtimestamp(st.st_mtime, UTC).isoformat(),
    }


def run_key(
    identity: dict[str, Any],
    source: dict[str, Any],
    model: dict[str, Any],
    parameters: dict[str, Any],
    outputs: list[str],
) -> str:
    """Hex digest of everything that determines an input's outputs.

    Parameters
    ----------
    identity : dict
        From :func:`input_identity` (size and mtime; the path is left out so that
        a moved folder still resumes).
    source : dict
        The input's layout (format, shape, dtype, axes).
    model : dict
        ``name``, ``sha256`` of the weights and ``backend``.
    parameters : dict
        Every segmentation parameter with its effective value.
    outputs : list of str
        The output kinds requested (``labels``, ``coco``, ...).
    """
    record = {
        "format": PROVENANCE_FORMAT,
        "input": {"size": identity["size"], "mtime_ns": identity["mtime_ns"]},
        "source": source,
        "model": model,
        "parameters": parameters,
        "outputs": sorted(outputs),
    }
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def environment() -> dict[str, Any]:
    """Versions and host, for the record."""
    import numpy

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "numpy": numpy.__version__,
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = torch.__version__
    return env


def now() -> str:
    """Current time, ISO 8601 UTC, seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_provenance(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None when absent or unreadable (then the input is redone)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def file_digest(path: Path) -> str:
    """SHA-256 of an output: a file's bytes, or a directory's (a zarr store) files, each
    with its path relative to the directory, in sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def changed_outputs(record: dict[str, Any] | None, folder: Path) -> list[str]:
    """The outputs a record lists with their SHA-256 (``outputs.sha256``, by kind) that
    exist in ``folder`` with other contents: edited since the run wrote them. A missing
    file, or a record of a version that kept no digests, counts as unchanged."""
    outputs = record.get("outputs") if isinstance(record, dict) else None
    digests = outputs.get("sha256") if isinstance(outputs, dict) else None
    if not isinstance(digests, dict):
        return []
    changed = []
    for kind, digest in sorted(digests.items()):
        name = outputs.get(kind)
        if not isinstance(name, str) or Path(name).name != name or not name:
            continue
        path = Path(folder) / name
        if path.exists() and file_digest(path) != digest:
            changed.append(name)
    return changed
