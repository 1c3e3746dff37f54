"""Windowed upsampling of low-resolution mask logits.

The predictor's ``postprocess_masks`` is two bilinear resizes (256 -> 1024, crop,
1024 -> original). Both are linear and separable, so their composition is
``M_y @ X @ M_x^T`` with small (H x 256) and (W x 256) matrices. Each output
pixel is a convex combination of nearby low-res samples, so a positive pixel
can only lie where some sample it reads is positive: upsampling a mask only
inside the window that its positive low-res samples reach gives the complete
mask at a cost proportional to its box, not to the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 weights of torch's 1-D bilinear resize (align_corners=False)."""
    eye = torch.eye(n_in, dtype=torch.float32)[None, None]  # rows are the samples
    out = F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False)
    return out[0, 0].double()


@dataclass
class Upsampler:
    """Composite resize low-res (lh, lw) -> input frame (S, S) -> crop (h, w) -> (H, W).

    Attributes
    ----------
    my, mx : torch.Tensor
        (H, lh) and (W, lw) float32 composite weights.
    row_lo, row_hi, col_lo, col_hi : np.ndarray
        For each output row/column, the first and last low-res index it reads.
    """

    my: torch.Tensor
    mx: torch.Tensor
    row_lo: np.ndarray
    row_hi: np.ndarray
    col_lo: np.ndarray
    col_hi: np.ndarray

    @classmethod
    def create(
        cls,
        low_res: tuple[int, int],
        img_size: int,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> Upsampler:
        mats = []
        for n_low, n_in, n_out in zip(low_res, input_size, original_size, strict=True):
            first = _resize_matrix(n_low, img_size)[:n_in]  # (n_in, n_low)
            second = _resize_matrix(n_in, n_out)  # (n_out, n_in)
            mats.append(second @ first)
        lo_hi = []
        for m in mats:
            nz = m > 0
            lo_hi.append(nz.to(torch.int8).argmax(dim=1).numpy())
            lo_hi.append(m.shape[1] - 1 - nz.flip(1).to(torch.int8).argmax(dim=1).numpy())
        return cls(mats[0].float(), mats[1].float(), *lo_hi)

    def window(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """Output window (r0, r1, c0, c1), ends exclusive, reading low-res rows/cols in
        the inclusive low-res box (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = box
        r0 = int(np.searchsorted(self.row_hi, y0, side="left"))
        r1 = int(np.searchsorted(self.row_lo, y1, side="right"))
        c0 = int(np.searchsorted(self.col_hi, x0, side="left"))
        c1 = int(np.searchsorted(self.col_lo, x1, side="right"))
        return r0, r1, c0, c1

    def logits(self, low_res: torch.Tensor, win: tuple[int, int, int, int]) -> torch.Tensor:
        """Upsampled logits of one (lh, lw) mask inside ``win`` -> (r1 - r0, c1 - c0)."""
        r0, r1, c0, c1 = win
        a, b = int(self.row_lo[r0]), int(self.row_hi[r1 - 1]) + 1
        c, d = int(self.col_lo[c0]), int(self.col_hi[c1 - 1]) + 1
        x = low_res[a:b, c:d].float()
        return self.my[r0:r1, a:b] @ x @ self.mx[c0:c1, c:d].T
