"""Helpers shared by the benchmark scripts: timing, inputs, reporting."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden"


def default_weights() -> Path | None:
    """The golden checkpoint (random values, official format) if it is beside the checkout."""
    path = GOLDEN / "mobile_sam_random.pt"
    return path if path.exists() else None


def default_image() -> np.ndarray:
    """The golden photo (770 x 769 RGB) if present, else a synthetic image of that size."""
    path = GOLDEN / "images" / "public_photo.png"
    if path.exists():
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(770, 769, 3), dtype=np.uint8)


def interleaved(
    funcs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, in turn (A B A B ...), after warm-up runs.

    Interleaving makes a comparison robust to the machine's speed drifting.
    Returns seconds per call for every function.
    """
    for f in funcs.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in funcs}
    for _ in range(repeats):
        for name, f in funcs.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return times


def summary(ts: list[float]) -> dict[str, float]:
    return {"min": min(ts), "median": statistics.median(ts), "max": max(ts), "n": len(ts)}


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(rows: list[tuple[str, dict, dict]], unit: str = "ms") -> str:
    """Rows of (what, ours, baseline) summaries -> a text table with median ratios."""
    scale = 1e3 if unit == "ms" else 1.0
    head = f"{'':28} {'ours (median)':>14} {'baseline (median)':>18} {'ours/baseline':>14}"
    lines = [head, "-" * len(head)]
    for what, ours, base in rows:
        ratio = ours["median"] / base["median"]
        lines.append(
            f"{what:28} {ours['median'] * scale:11.1f} {unit} {base['median'] * scale:15.1f} {unit}"
            f" {ratio:13.2f}x"
        )
    return "\n".join(lines)


def write_json(path: str | os.PathLike | None, payload: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
