"""What every backend implements: an :class:`Encoder` and a :class:`Decoder`.

Both work on torch tensors on the engine's device, in the *input frame* (the image
resized so its longer side is the model's input size, before padding). Everything
before the encoder (resize, normalise, pad) and after the decoder (upsampling the
low-res logits) is shared by all backends (:mod:`.frames`).

A decoder is stateless between images: :meth:`Decoder.prepare` turns one image's
embedding into whatever the decoder wants to keep for it (a per-image cache), and
:meth:`Decoder.decode` takes that back with each batch of prompts. Callers own the
prepared state, so one decoder serves several images and threads at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

__all__ = ["Decoded", "Decoder", "Encoder", "ImageEmbedding", "Prompts"]


@dataclass(frozen=True)
class ImageEmbedding:
    """An image embedding with the sizes needed to decode against it.

    Attributes
    ----------
    features : torch.Tensor
        (1, C, h', w') float32 encoder output (256 x 64 x 64 for SAM models).
    original_size : (int, int)
        (H, W) of the image given to ``set_image``.
    input_size : (int, int)
        (h, w) after resize-longest-side, before padding.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    def to(self, device: str | torch.device) -> ImageEmbedding:
        """Copy on another device."""
        return ImageEmbedding(self.features.to(device), self.original_size, self.input_size)


@dataclass(frozen=True)
class Prompts:
    """A batch of B prompts in the input frame; any of the four may be None.

    Attributes
    ----------
    coords : torch.Tensor or None
        (B, N, 2) float32 (x, y) points.
    labels : torch.Tensor or None
        (B, N) int64: 1 foreground, 0 background; with ``coords``.
    boxes : torch.Tensor or None
        (B, 4) float32 XYXY.
    masks : torch.Tensor or None
        (B, 1, 4h', 4w') float32 low-res logits of an earlier prediction.
    """

    coords: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        for t in (self.coords, self.boxes, self.masks):
            if t is not None:
                return int(t.shape[0])
        return 1  # no prompt at all: one empty prompt, as SAM's prompt encoder does

    def rows(self, start: int, stop: int) -> Prompts:
        """Prompts ``start:stop`` of the batch."""
        sl = slice(start, stop)
        if (start <= 0 and stop >= len(self)) or all(
            t is None for t in (self.coords, self.boxes, self.masks)
        ):
            return self
        return Prompts(*(None if t is None else t[sl] for t in (
            self.coords, self.labels, self.boxes, self.masks)))  # fmt: skip


@dataclass(frozen=True)
class Decoded:
    """Decoder output for the P prompts of a batch that were kept.

    Attributes
    ----------
    low_res : torch.Tensor
        (P, M, 4h', 4w') float32 mask logits, M = 3 (multimask) or 1.
    iou : torch.Tensor
        (P, M) float32 predicted IoU.
    rows : torch.Tensor
        (P,) int64 indices of those prompts in the batch (all of them, in order,
        unless ``min_iou`` dropped some), on the CPU.
    """

    low_res: torch.Tensor
    iou: torch.Tensor
    rows: torch.Tensor

    @staticmethod
    def empty(masks: int, low_res_size: tuple[int, int], device) -> Decoded:
        """No prompts: (0, ``masks``, h, w) logits, (0, ``masks``) IoU, no rows."""
        iou = torch.zeros(0, masks, device=device)
        return Decoded(
            iou.new_zeros(0, masks, *low_res_size), iou, torch.zeros(0, dtype=torch.long)
        )

    @staticmethod
    def cat(parts: list[Decoded], offsets: list[int], empty: Decoded) -> Decoded:
        """Concatenate chunk results; ``offsets`` are each chunk's first row."""
        if not parts:
            return empty
        if len(parts) == 1 and offsets[0] == 0:
            return parts[0]
        rows = [p.rows.to(torch.long).cpu() + off for p, off in zip(parts, offsets, strict=True)]
        return Decoded(
            torch.cat([p.low_res for p in parts]), torch.cat([p.iou for p in parts]),
            torch.cat(rows),
        )  # fmt: skip


class Encoder(ABC):
    """Runs a model's image encoder.

    Attributes
    ----------
    name : str
        What runs it, for :meth:`Engine.describe` (``"torch"``, ``"onnx int8"``).
    """

    name: str = "encoder"

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of preprocessed images.

        Parameters
        ----------
        x : torch.Tensor
            (B, 3, S, S) float32, normalised and zero-padded (``Sam.preprocess``).

        Returns
        -------
        torch.Tensor
            (B, C, h', w') float32 on the engine's device.
        """

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether the encoder replays CUDA graphs."""
        return False


class Decoder(ABC):
    """Runs a model's prompt encoder and mask decoder against one image at a time.

    Attributes
    ----------
    name : str
        What runs it, for :meth:`Engine.describe`.
    """

    name: str = "decoder"
    #: whether it works in the model device's memory (a GPU's decoder passes are then
    #: sized to its free memory)
    on_device: bool = False

    def prepare(self, features: torch.Tensor):
        """What this decoder keeps per image, made from its (1, C, h', w') embedding.

        Returns an object to pass to :meth:`decode` with every batch of prompts for
        that image; by default the features themselves.
        """
        return features

    @abstractmethod
    def decode(
        self, image, prompts: Prompts, *, multimask: bool = True, min_iou: float | None = None
    ) -> Decoded:
        """Mask logits and predicted IoU of a batch of prompts.

        Parameters
        ----------
        image
            :meth:`prepare` of the image's embedding.
        prompts : Prompts
            B prompts in the input frame.
        multimask : bool
            The three multimask outputs (M = 3), else the single-mask output (M = 1).
        min_iou : float, optional
            Drop the prompts none of whose masks has a predicted IoU above this
            (decoders that can may skip their upscaling).

        Returns
        -------
        Decoded
        """
