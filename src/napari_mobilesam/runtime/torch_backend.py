"""The reference backend: the model's own torch modules."""

from __future__ import annotations

import numpy as np
import torch

from ..model import Sam
from .base import EncoderDecoderBackend
from .graphs import DecoderGraph

__all__ = ["TorchBackend"]


class TorchBackend(EncoderDecoderBackend):
    """Runs ``model`` itself: the reference the other backends are tested against.

    The encoder is ``model.image_encoder`` as it is (fused or not, on the model's
    device); the decoder is :class:`~napari_mobilesam.runtime.graphs.DecoderGraph`
    over the model's prompt encoder and mask decoder, the plain unfactorised
    computation without image cache. Inputs and outputs are CPU numpy arrays.

    Parameters
    ----------
    model : Sam
        Used in place (not copied, not changed).
    """

    name = "torch"

    def __init__(self, model: Sam) -> None:
        if not isinstance(model, Sam):
            raise TypeError(f"model must be a Sam model, got {type(model).__name__}")
        self.model = model
        self.graph = DecoderGraph(model)
        self.img_size = int(model.img_size)
        c = model.prompt_encoder.embed_dim
        h, w = model.prompt_encoder.image_embedding_size
        self.embed_shape = (int(c), int(h), int(w))

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device=self.model.device, dtype=self.model.pixel_mean.dtype)

    @torch.no_grad()
    def encode(self, x: np.ndarray) -> np.ndarray:
        """See :meth:`EncoderDecoderBackend.encode`."""
        x = self._check_image(x)
        return self.model.image_encoder(self._tensor(x)).float().cpu().numpy()

    @torch.no_grad()
    def decode(
        self,
        embedding: np.ndarray,
        coords: np.ndarray,
        labels: np.ndarray,
        mask_input: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`EncoderDecoderBackend.decode`."""
        embedding, coords, labels, mask_input = self._check_prompts(
            embedding, coords, labels, mask_input
        )
        self.graph.image_pe = self.graph.image_pe.to(self.model.device)
        masks = has_mask = None
        if mask_input is not None:
            masks = self._tensor(mask_input)
            has_mask = masks.new_ones(masks.shape[0])
        low_res, iou = self.graph(
            self._tensor(embedding), self._tensor(coords), self._tensor(labels), masks, has_mask
        )
        return low_res.float().cpu().numpy(), iou.float().cpu().numpy()
