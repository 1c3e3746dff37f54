"""Settings of a distillation run (:class:`TrainConfig`), its schedule and parameter groups."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch

from ..build import (
    SamConfig,
)
from .models import (
    SamConfigLike,
    config_to_dict,
)

log = logging.getLogger("napari_mobilesam.distill.train")

CHECKPOINT_FORMAT = "mobilesam-distill-checkpoint"
CHECKPOINT_VERSION = 1
LOG_FIELDS = ("step", "epoch", "loss", "lr", "images_per_s", "elapsed_s")

#: Parameter names (suffixes) of attention-bias / position tables: no weight decay.
NO_DECAY_NAMES = ("attention_biases", "rel_pos_h", "rel_pos_w", "pos_embed")


@dataclass
class TrainConfig:
    """Settings of a distillation run (``mobilesam-distill train``).

    Attributes
    ----------
    embeddings : Path
        An :class:`~napari_mobilesam.distill.store.EmbeddingStore` folder.
    images : Path
        The image folder the store was made from (images are ``images / rel``).
    out : Path
        Run folder (created).
    student : SamConfigLike
        Student architecture: registry name, JSON config file or ``SamConfig``.
    teacher_weights : Path, optional
        The teacher's checkpoint (its prompt encoder and mask decoder go into the
        student); default: the store's ``meta["teacher_weights"]``. Either way its
        sha256 must be the store's ``teacher_sha256``.
    epochs, batch_size : int
        Passes over the data; images per optimizer step *per process*.
    lr, weight_decay, betas : float
        AdamW settings (peak learning rate).
    warmup_steps : int, optional
        Linear warmup length; default ``max(1, min(500, round(0.05 * total)))``.
    min_lr_ratio : float
        The cosine schedule ends at ``lr * min_lr_ratio``.
    grad_clip : float, optional
        Clip the gradient norm to this value (None = no clipping).
    amp : bool
        CUDA only: autocast (bfloat16 when supported, else float16 with a
        ``GradScaler``); ignored with a logged note on the CPU.
    resume : bool
        Continue from ``out/checkpoint.pt``.
    workers : int
        ``DataLoader`` worker processes per training process (0 = in process).
    seed : int
        Seeds the student initialisation and the per-epoch data order.
    device : str, optional
        None = CUDA when available, else CPU (under ``torchrun``: ``cuda:LOCAL_RANK``).
    init : Path, optional
        Initialise the student encoder from this checkpoint's ``image_encoder.*``.
    max_steps : int, optional
        Stop after this many optimizer steps in total.
    save_every : int, optional
        Also write the checkpoint every this many steps.
    log_format : str
        ``"csv"`` or ``"jsonl"``.
    """

    embeddings: Path
    images: Path
    out: Path
    student: SamConfigLike = "vit_t"
    teacher_weights: Path | None = None
    epochs: int = 8
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    amp: bool = False
    resume: bool = False
    workers: int = 2
    seed: int = 0
    device: str | None = None
    init: Path | None = None
    max_steps: int | None = None
    save_every: int | None = None
    log_format: str = "csv"

    def __post_init__(self) -> None:
        for name in ("embeddings", "images", "out"):
            setattr(self, name, Path(getattr(self, name)))
        for name in ("teacher_weights", "init"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        _positive_int(self, "epochs")
        _positive_int(self, "batch_size")
        _positive_int(self, "workers", minimum=0)
        _positive_int(self, "seed", minimum=0)
        for name in ("warmup_steps",):
            if getattr(self, name) is not None:
                _positive_int(self, name, minimum=0)
        for name in ("max_steps", "save_every"):
            if getattr(self, name) is not None:
                _positive_int(self, name)
        if not _number(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not _number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not _number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        if self.grad_clip is not None and (not _number(self.grad_clip) or self.grad_clip <= 0):
            raise ValueError(f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        if self.log_format not in ("csv", "jsonl"):
            raise ValueError(f"log_format must be 'csv' or 'jsonl', got {self.log_format!r}")

    def to_dict(self) -> dict:
        """JSON-able form (paths as strings; a ``SamConfig`` student as its dict)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, SamConfig):
                value = {"config": config_to_dict(value)}
            elif isinstance(value, PathLike):
                value = os.fspath(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(cfg: TrainConfig, name: str, minimum: int = 1) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------- schedule


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr_ratio: float) -> float:
    """Learning rate of the optimizer step ``step`` (0-based) of ``total``.

    Linear warmup: ``lr * (step + 1) / warmup`` for ``step < warmup``, so the first
    step already learns and step ``warmup - 1`` uses the peak ``lr``. Then a half
    cosine from the peak to ``lr * min_lr_ratio`` at the last step ``total - 1``
    (held there beyond it). With ``warmup = 0`` the cosine starts at step 0.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    peak = max(warmup - 1, 0)
    p = min(1.0, (step - peak) / max(1, total - 1 - peak))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _default_warmup(total: int) -> int:
    return max(1, min(500, round(0.05 * total)))


def param_groups(encoder: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay only on weight matrices / kernels.

    No decay on 1-D parameters (biases, norm weights) and on the attention-bias /
    position tables (names ending in :data:`NO_DECAY_NAMES`: TinyViT's
    ``attention_biases``, ViT's ``rel_pos_h`` / ``rel_pos_w`` / ``pos_embed``).
    """
    decay, no_decay = [], []
    for name, p in encoder.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# ---------------------------------------------------------------------- data
