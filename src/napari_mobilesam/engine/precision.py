"""Numeric precision of the image encoder: what ``precision=`` accepts and means."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["AUTOCAST", "PRECISIONS", "cpu_has_bf16", "resolve_precision"]

#: torch.autocast dtype of each ``precision`` (None: plain float32).
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: what ``precision=`` accepts
PRECISIONS = (*AUTOCAST, "auto")


def check_precision(precision: object) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return precision


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The image encoder precision that ``precision`` means on ``device``.

    ``"auto"`` is the fastest choice that keeps the golden masks (mean IoU >= 0.98
    against float32): on CUDA ``"bf16"`` (``"fp16"`` on GPUs without bfloat16);
    on a CPU ``"bf16"`` when it has bfloat16 units (:func:`cpu_has_bf16`), else
    ``"fp32"``; ``"fp32"`` on other devices. Other values are returned unchanged.

    Parameters
    ----------
    precision : {"fp32", "bf16", "fp16", "auto"}
    device : str or torch.device

    Returns
    -------
    str
        ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    """
    if check_precision(precision) != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return "fp32"


@functools.lru_cache(maxsize=1)
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX-BF16).

    Read from the ``flags`` line of ``/proc/cpuinfo`` (Linux); False where that
    is missing, so other systems keep float32 under ``precision="auto"``.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.partition(":")[2].split()))
    return False
