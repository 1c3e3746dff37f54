"""Helpers of the output-file tests of mobilesam-everything: temporaries left in a folder,
random label stacks and their planes."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def leftovers(folder: Path) -> list[str]:
    """Hidden temporaries (or moved-aside old versions) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def random_stack(shape: tuple[int, ...], high: int, dtype, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=shape).astype(dtype)


def planes_of(stack: np.ndarray):
    """A one-shot generator over the (H, W) planes of ``stack``."""
    return (p for p in stack.reshape(-1, *stack.shape[-2:]))
