"""A dense auxiliary loss that teaches a fresh image encoder where objects and edges are.

SAM's losses reach the image encoder only through the mask decoder, which is itself
untrained when everything starts from a fresh initialisation; the encoder then learns
slowly. This head gives it a direct, dense signal: a 1x1 convolution maps each
embedding cell to a 4x4 block of two logits (foreground, object boundary) in the
decoder's low-resolution frame (``pixel_shuffle``), trained with binary cross-entropy
against the labels. It only needs what the mask decoder's own upscaling path reads
(per-cell features with sub-cell detail), and it is thrown away after training: the
saved checkpoints hold the SAM model alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import find_boundaries
from torch import nn

__all__ = ["DenseHead", "dense_targets"]

#: Low-resolution pixels per embedding cell along each side (SAM: 256 / 64).
SUBCELLS = 4


class DenseHead(nn.Module):
    """Embedding (B, C, h, w) -> foreground and boundary logits (B, 2, 4h, 4w)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, 2 * SUBCELLS * SUBCELLS, 1)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.proj(embedding), SUBCELLS)

    def loss(
        self,
        embedding: torch.Tensor,
        labels: np.ndarray,
        img_size: int,
        input_size: tuple[int, int],
    ) -> torch.Tensor:
        """Mean BCE over the image part of the low-resolution frame (padding excluded);
        boundary pixels weighted 3x (they are few)."""
        target = dense_targets(labels, img_size, input_size, tuple(embedding.shape[-2:]))
        logits = self(embedding.float())[0]
        h = -(-input_size[0] * logits.shape[-2] // img_size)
        w = -(-input_size[1] * logits.shape[-1] // img_size)
        pos_weight = torch.tensor([1.0, 3.0], device=logits.device).view(2, 1, 1)
        return F.binary_cross_entropy_with_logits(
            logits[:, :h, :w], target[:, :h, :w].to(logits.device), pos_weight=pos_weight
        )


def dense_targets(
    labels: np.ndarray, img_size: int, input_size: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """(2, 4h, 4w) float targets: foreground, and a 2-pixel-thick object boundary.

    ``labels`` (H, W) at the original size is brought to the low-resolution frame as
    the masks of the decoder's loss are (bilinear to ``input_size``, padded, pooled;
    max-pooled for the thin boundary).
    """
    from ..distill.finetune import low_res_target

    low = (grid[0] * SUBCELLS, grid[1] * SUBCELLS)
    fg = low_res_target(torch.from_numpy(labels > 0)[None], img_size, input_size, low)[:, 0]
    # a thin edge would vanish under area pooling: any edge pixel marks its cell
    edge = torch.from_numpy(find_boundaries(labels, mode="thick"))[None, None].float()
    edge = F.interpolate(edge, size=input_size, mode="bilinear", align_corners=False)
    edge = F.pad(edge, (0, img_size - input_size[1], 0, img_size - input_size[0]))
    edge = (F.adaptive_max_pool2d(edge, low) > 0.25).float()[0]
    return torch.cat([fg, edge])
