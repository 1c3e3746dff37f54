"""Settings of a ``mobilesam-train`` run, checked once, stored with the run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .step import StepConfig

__all__ = ["ENCODER_MODES", "TrainConfig"]

#: What of the image encoder is trained: nothing (embeddings cached), its last
#: stage and neck, or all of it.
ENCODER_MODES = ("none", "last", "all")


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Parameters
    ----------
    out : Path
        Run folder: checkpoints, logs, ``run.json``.
    data : Path, optional
        Folder of annotated images (see :mod:`napari_mobilesam.training.data`).
    synthetic : int
        Train on this many fresh synthetic images per epoch instead of ``data``.
    val_data : Path, optional
        Held-out folder; default: ``val_fraction`` of ``data`` (or, with
        ``synthetic``, ``val_images`` generated images).
    val_fraction : float
    val_images : int
        Held-out synthetic images.
    model : str
        Architecture (registry name, e.g. ``vit_t``).
    checkpoint : Path or str, optional
        Starting weights (a file or a registry name); None starts from a fresh
        initialisation of every part.
    train_encoder : {"none", "last", "all"}
    epochs : int
    lr : float
        Peak learning rate of the decoder (after a linear warm-up, then cosine decay
        to ``min_lr_ratio * lr``).
    encoder_lr : float, optional
        Peak learning rate of the trained encoder parts (default ``lr``).
    weight_decay : float
    warmup : int
        Warm-up steps.
    min_lr_ratio : float
    grad_clip : float
        Clip the global gradient norm (0 = off).
    step : StepConfig
        Prompts and loss weights of a step.
    far_ramp : (float, float)
        Fractions of the run between which the focal loss moves from balanced around
        each object to a full-mask estimate (``far_mix`` of
        :func:`~napari_mobilesam.training.step.interactive_loss` goes 0 -> 1).
        ``(0, 0)``: full-mask from the start (fine-tuning); about ``(0.5, 0.8)`` for a
        fresh decoder, which first learns where objects are, then to stop spilling.
    aux_weight : float
        Weight of the dense auxiliary loss on the encoder
        (:mod:`napari_mobilesam.training.auxiliary`); useful when the encoder trains
        from a fresh initialisation, 0 (off) otherwise.
    augment : bool
        Random flips, 90-degree rotations and contrast (folders; off when the
        encoder is frozen, whose embeddings are then cached per image).
    eval_points_per_side : int
        Segment-everything grid of the held-out scores (0 = skip).
    eval_every : int
        Score the held-out set every this many epochs (and after the last).
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
    input_size : int, optional
        Train at this model input size instead of the architecture's (e.g. 512 for a
        1024 model: about 4x cheaper per step). Each image is then cropped to the
        matching fraction of its longer side, so objects keep the size (in embedding
        cells) they have at full size, and placed at a random position of the full
        input frame, whose positional encoding its prompts and tokens keep
        (:class:`~napari_mobilesam.training.decoder.InputFrame`). The weights are the
        same; scores and checkpoints are always at full size.
    input_frame : {"full", "own"}
        ``full``: a smaller ``input_size``'s crops keep the full input's prompt frame
        (right; inference sees the full frame). ``own``: each crop is a frame of its
        own, distances in it twice as long as at full size (how the stand-in model's
        first two phases were trained, kept to reproduce them; see ``training.md``).
    precision : {"auto", "fp32", "bf16"}
        The encoder's forward/backward in bfloat16 autocast (``auto``: where the
        hardware has bf16 units).
    seed : int
    """

    out: Path
    data: Path | None = None
    synthetic: int = 0
    val_data: Path | None = None
    val_fraction: float = 0.2
    val_images: int = 8
    model: str = "vit_t"
    checkpoint: Path | str | None = None
    train_encoder: str = "none"
    epochs: int = 10
    lr: float = 3e-4
    encoder_lr: float | None = None
    weight_decay: float = 0.01
    warmup: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    step: StepConfig = field(default_factory=StepConfig)
    far_ramp: tuple[float, float] = (0.0, 0.0)
    aux_weight: float = 0.0
    augment: bool = True
    eval_points_per_side: int = 32
    eval_every: int = 1
    device: str = "auto"
    input_size: int | None = None
    input_frame: str = "full"
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.data is None) == (self.synthetic == 0):
            raise ValueError("give exactly one of data (a folder) and synthetic (images per epoch)")
        if not isinstance(self.synthetic, int) or self.synthetic < 0:
            raise ValueError(f"synthetic must be an int >= 0, got {self.synthetic!r}")
        if self.train_encoder not in ENCODER_MODES:
            raise ValueError(
                f"train_encoder must be one of {ENCODER_MODES}, got {self.train_encoder!r}"
            )
        if self.input_frame not in ("full", "own"):
            raise ValueError(f"input_frame must be full or own, got {self.input_frame!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        for name in ("epochs", "eval_every", "val_images"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("warmup", "eval_points_per_side", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "encoder_lr"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a number > 0, got {v!r}")
        if self.aux_weight and self.train_encoder == "none":
            raise ValueError(
                "aux_weight trains the encoder: it needs train_encoder 'last' or 'all'"
            )
        for name in ("weight_decay", "grad_clip", "aux_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.input_size is not None and (
            not isinstance(self.input_size, int) or self.input_size < 64 or self.input_size % 64
        ):
            raise ValueError(f"input_size must be a multiple of 64, got {self.input_size!r}")
        if not 0 < self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in (0, 1], got {self.min_lr_ratio!r}")
        ramp = tuple(self.far_ramp)
        if len(ramp) != 2 or not 0 <= ramp[0] <= ramp[1] <= 1:
            raise ValueError(
                f"far_ramp must be (start, end) with 0 <= start <= end <= 1, got {ramp!r}"
            )
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")

    @property
    def caches_embeddings(self) -> bool:
        """A frozen encoder on a fixed set of images: embed each image once."""
        return self.train_encoder == "none" and self.data is not None and self.input_size is None

    def to_dict(self) -> dict:
        """JSON-able settings (paths as strings)."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, Path):
                out[k] = str(v)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """The settings :meth:`to_dict` wrote (a run's ``config.json``).

        Raises
        ------
        ValueError
            Unknown or missing settings, or values the checks reject.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}: written by another version?")
        kw = dict(data)
        for k in ("out", "data", "val_data"):
            if kw.get(k) is not None:
                kw[k] = Path(kw[k])
        if isinstance(kw.get("step"), dict):
            kw["step"] = StepConfig(**kw["step"])
        if "far_ramp" in kw:
            kw["far_ramp"] = tuple(kw["far_ramp"])
        if "input_frame" not in kw:  # written before the setting: crops had their own frame
            kw["input_frame"] = "own" if kw.get("input_size") is not None else "full"
        try:
            return cls(**kw)
        except TypeError as exc:
            raise ValueError(f"incomplete training settings: {exc}") from None
