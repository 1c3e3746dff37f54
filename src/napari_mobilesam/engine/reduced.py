"""16-bit decoding of many prompts, with a float32 fallback where it overflows.

Segment-everything decodes a whole grid of prompts per image: work bound by memory
traffic and float32 arithmetic, which a 16-bit copy of the mask decoder halves. The
IoU head still runs in float32 on the output tokens. float16 on a GPU (tensor cores
run it as fast as bfloat16, and its finer mantissa keeps the logits closer to
float32's), bfloat16 on a CPU (fast kernels on CPUs with bf16 units; float16 has
none). Where a chunk of prompts gives non-finite values in 16 bits it is decoded again
by the float32 decoder. Single prompts (``Predictor.predict``) keep float32.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..accel.decoder import ImageCache, decode_tokens, prepare_image
from ..model import MaskDecoder, Sam
from .base import Decoded, Decoder, Prompts

if TYPE_CHECKING:
    from .torch_eager import TorchDecoder, TorchImage

__all__ = ["ReducedDecoder"]


@dataclass(frozen=True)
class ReducedImage:
    """What :class:`ReducedDecoder` keeps per image: the 16-bit cache, and what the
    float32 fallback keeps."""

    cache: ImageCache
    fallback: TorchImage


class ReducedDecoder(Decoder):
    """A 16-bit copy of the model's mask decoder (cached, factorised) with a fallback.

    Parameters
    ----------
    model : Sam
    fallback : TorchDecoder
        Decodes a chunk again in float32 where 16 bits overflow; its ``chunk`` is used.
    dtype : torch.dtype, optional
        Default: float16 on CUDA, bfloat16 elsewhere.

    Notes
    -----
    The copy is made on first use from the model's weights at that time.
    """

    on_device = True

    def __init__(
        self, model: Sam, fallback: TorchDecoder, dtype: torch.dtype | None = None
    ) -> None:
        self.model = model
        self.fallback = fallback
        self.dtype = dtype or (torch.float16 if model.device.type == "cuda" else torch.bfloat16)
        self.name = f"torch {str(self.dtype).removeprefix('torch.')}"
        self._copy: MaskDecoder | None = None
        self._lock = threading.Lock()

    @property
    def bits(self) -> int:
        """Bits per value of the decoder's arithmetic (16)."""
        return torch.finfo(self.dtype).bits

    def reduced(self) -> MaskDecoder:
        """The 16-bit copy of the mask decoder (made once)."""
        with self._lock:
            if self._copy is None:
                self._copy = copy.deepcopy(self.model.mask_decoder).to(self.dtype).eval()
            return self._copy

    @torch.no_grad()
    def prepare(self, features: torch.Tensor) -> ReducedImage:
        fallback = self.fallback.prepare(features)
        pe = self.model.prompt_encoder
        _, no_mask = pe(None, None, None)
        d = self.dtype
        cache = prepare_image(self.reduced(), fallback.features.to(d), pe.get_dense_pe().to(d),
                              no_mask.to(d))  # fmt: skip
        return ReducedImage(cache, fallback)

    @torch.no_grad()
    def decode(
        self, image: ReducedImage, prompts: Prompts, *, multimask: bool = True, min_iou=None
    ) -> Decoded:
        if prompts.masks is not None or prompts.boxes is not None:
            return self.fallback.decode(image.fallback, prompts, multimask=multimask,
                                        min_iou=min_iou)  # fmt: skip
        n = len(prompts)
        step = self.fallback.chunk or max(n, 1)
        parts, offsets = [], []
        for i in range(0, n, step):
            part = prompts.rows(i, i + step)
            found = self._decode(image.cache, part, multimask, min_iou)
            if found is None:  # non-finite in 16 bits: float32
                found = self.fallback.decode(image.fallback, part, multimask=multimask,
                                             min_iou=min_iou)  # fmt: skip
                found = found if len(found.rows) else False
            if found is not False:
                parts.append(found)
                offsets.append(i)
        m = self.model.mask_decoder.num_multimask_outputs if multimask else 1
        empty = Decoded.empty(m, self.model.prompt_encoder.mask_input_size,
                              image.fallback.features.device)  # fmt: skip
        return Decoded.cat(parts, offsets, empty)

    def _decode(self, cache: ImageCache, prompts: Prompts, multimask: bool, min_iou):
        """One chunk in 16 bits: Decoded, False when no prompt passes ``min_iou``, or
        None when the values are not finite."""
        model, low = self.model, self.reduced()
        sparse, _ = model.prompt_encoder((prompts.coords, prompts.labels), None, None)
        hs, keys, size = decode_tokens(low, sparse.to(self.dtype), cache=cache,
                                       factorized=self.fallback.factorized)  # fmt: skip
        sl = low.token_slice(multimask)
        iou = model.mask_decoder.iou_prediction_head(hs[:, 0].float())[:, sl]  # float32 head
        rows = torch.arange(len(iou), device=iou.device)
        if min_iou is not None:
            rows = torch.nonzero((iou > min_iou).any(dim=1)).flatten()
            if len(rows) == 0:
                return None if not torch.isfinite(iou).all() else False
            hs, iou = hs[rows], iou[rows]
            keys = keys if keys.shape[0] == 1 else keys[rows]
        low_res = low.masks_from_tokens(hs, keys, size, sl).float()
        if not (torch.isfinite(iou).all() and torch.isfinite(low_res).all()):
            return None
        return Decoded(low_res, iou, rows.cpu())
