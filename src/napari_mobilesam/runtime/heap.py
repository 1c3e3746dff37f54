"""Keep freed memory for the next image (glibc malloc settings).

Every image through the encoder allocates the same large tensors again (1024x1024:
maps of 4-16 MB). glibc hands big blocks back to the kernel when they are freed:
blocks above its *mmap threshold* are unmapped, and free memory at the top of a heap
above its *trim threshold* is released; the next image's tensors are then fresh pages
that the kernel must map and zero again. Both thresholds adapt upwards as big blocks
come and go, but not everywhere: in threads other than the main one (napari's
workers, dask's) the encoder keeps faulting in fresh pages for every image
(docs/speed.md gives the numbers).

:func:`keep_freed_memory` pins both thresholds, once per process, at the ceilings that
glibc's adaptation climbs to on 64-bit systems: 32 MiB for the mmap threshold and 64
MiB for the trim threshold, so at most 64 MiB of freed memory stays with a heap
beyond what it uses. :func:`~napari_mobilesam.engine.make_engine` calls it for
models on the CPU.

Set the environment variable ``MOBILESAM_KEEP_FREED_MEMORY=0`` to leave malloc
alone. Other C libraries (macOS, Windows, musl) are left alone too.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

__all__ = ["ENV_VAR", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

#: environment variable: "0" (or "false", "no", "off") leaves malloc's settings alone
ENV_VAR = "MOBILESAM_KEEP_FREED_MEMORY"
#: blocks up to this size come from the heap (glibc's own ceiling on 64-bit systems)
MMAP_THRESHOLD = 32 * 2**20
#: free memory at the top of a heap is released only beyond this (glibc's ceiling too)
TRIM_THRESHOLD = 64 * 2**20

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_applied: bool | None = None


def _glibc():
    """The C library when it is glibc (has ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no such symbol)
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse; once per process.

    Sets ``M_MMAP_THRESHOLD`` to :data:`MMAP_THRESHOLD` and ``M_TRIM_THRESHOLD``
    to :data:`TRIM_THRESHOLD` with ``mallopt``.

    Returns
    -------
    bool
        Whether the settings are in effect: False where the C library is not glibc,
        where ``mallopt`` refused them, or when :data:`ENV_VAR` is ``0``.
    """
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return bool(ok) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
