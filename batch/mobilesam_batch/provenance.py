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


def is_up_to_date(provenance_path: Path, key: str, outputs: list[Path]) -> bool:
    """True when the provenance record matches ``key`` and every output exists."""
    record = read_provenance(provenance_path)
    if record is None or record.get("key") != key:
        return False
    return all(p.exists() for p in outputs)
