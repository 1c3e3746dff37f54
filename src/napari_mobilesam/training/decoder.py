"""The mask decoder's forward pass for training, with logits only where the loss looks.

SAM's decoder turns the transformer's per-prompt image tokens (B, h*w, C) into
low-resolution logits through two 2x2, stride-2 transposed convolutions (with a
per-pixel LayerNorm and GELUs between them), then a dot product with each mask
token's hypernetwork vector. Each image token therefore maps to its own 4x4 block
of logits, independently of its neighbours: the logits of any set of tokens can be
computed from those tokens alone, and they equal the full computation's logits there.

Training uses that to compute, per prompt, only

- a *window* around the object (its box enlarged by a margin), where the
  foreground/background balance of the loss is reasonable, and
- a few random *far* tokens outside the window, so that false positives far from the
  object still cost something,

which makes the decoder's mask path several times cheaper than full 256 x 256 logits
for typical cells and avoids the empty-mask collapse that a loss dominated by distant
background pixels causes early in training.

Only the SAM-shaped parts of the decoder are used (``transformer``, ``iou_token``,
``mask_tokens``, ``output_upscaling``, ``output_hypernetworks_mlps``,
``iou_prediction_head``), so any implementation with SAM's state-dict layout works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import Sam

__all__ = ["Window", "decode_tokens", "window_logits"]

#: Low-resolution logit pixels per image token along each side (two 2x upscalings).
TOKEN_PIXELS = 4


@dataclass(frozen=True)
class Window:
    """A rectangle of image tokens: rows ``t0:t1``, columns ``u0:u1``."""

    t0: int
    t1: int
    u0: int
    u1: int

    @property
    def pixels(self) -> tuple[slice, slice]:
        """The window in the low-resolution logits' frame (rows, cols)."""
        p = TOKEN_PIXELS
        return slice(self.t0 * p, self.t1 * p), slice(self.u0 * p, self.u1 * p)

    @classmethod
    def around(
        cls, target: torch.Tensor, grid: tuple[int, int], grow: float = 0.5, min_tokens: int = 4
    ) -> Window:
        """The tokens covering ``target``'s box grown by ``grow`` times its size per side.

        Parameters
        ----------
        target : (4h, 4w) bool
            A low-resolution mask (non-empty).
        grid : (h, w)
            Token grid size.
        """
        rows = torch.nonzero(target.any(1))[:, 0]
        cols = torch.nonzero(target.any(0))[:, 0]
        p = TOKEN_PIXELS
        out = []
        for lo, hi, n in (
            (int(rows[0]), int(rows[-1]) + 1, grid[0]),
            (int(cols[0]), int(cols[-1]) + 1, grid[1]),
        ):
            extra = max(grow * (hi - lo), p * min_tokens / 2)
            a = max(0, int((lo - extra) // p))
            b = min(n, int(-(-(hi + extra) // p)))
            out += [a, b]
        return cls(*out)


def decode_tokens(
    model: Sam,
    embedding: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    multimask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The transformer part of the decoder.

    Parameters
    ----------
    embedding : (1, C, h, w)
    sparse : (B, N, C) prompt tokens
    dense : (1 or B, C, h, w) dense prompt embedding
    multimask : bool
        Use the three multimask tokens (else the single-mask token).

    Returns
    -------
    hyper : (B, M, C/8)
        Hypernetwork vectors of the M = 3 or 1 selected mask tokens.
    iou : (B, M)
        Predicted IoU of those masks.
    keys : (B or 1, h*w, C)
        The transformer's image tokens.
    """
    dec = model.mask_decoder
    b = sparse.shape[0]
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], 0)
    tokens = torch.cat([out_tokens[None].expand(b, -1, -1), sparse], 1)
    src = embedding + dense
    pe = model.prompt_encoder.get_dense_pe()
    hs, keys = dec.transformer(src, pe, tokens)
    sl = slice(1, dec.num_mask_tokens) if multimask else slice(0, 1)
    mask_tokens = hs[:, 1 : 1 + dec.num_mask_tokens][:, sl]
    mlps = list(dec.output_hypernetworks_mlps)[sl]
    hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(mlps)], 1)
    iou = dec.iou_prediction_head(hs[:, 0])[:, sl]
    return hyper, iou, keys


def window_logits(
    model: Sam,
    keys: torch.Tensor,
    hyper: torch.Tensor,
    grid: tuple[int, int],
    window: Window,
    far: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One prompt's logits inside ``window`` and at the ``far`` tokens.

    Parameters
    ----------
    keys : (1, h*w, C)
        The prompt's image tokens.
    hyper : (M, C/8)
        The prompt's hypernetwork vectors.
    grid : (h, w)
    window : Window
    far : (n,) int64 token indices (row-major), optional

    Returns
    -------
    win : (M, 4 th, 4 tw)
        Logits of the window, equal to the full low-resolution logits there.
    far_logits : (M, n, 4, 4) or None
        The 4x4 logit blocks of the far tokens.
    """
    h, w = grid
    c = keys.shape[-1]
    up = model.mask_decoder.output_upscaling
    img = keys.reshape(h, w, c)[window.t0 : window.t1, window.u0 : window.u1]
    feat = up(img.permute(2, 0, 1)[None])[0]  # (C/8, 4 th, 4 tw)
    win = torch.einsum("mc,chw->mhw", hyper, feat)
    far_logits = None
    if far is not None and len(far):
        tok = keys.reshape(h * w, c)[far]  # (n, C)
        f = up(tok[:, :, None, None])  # (n, C/8, 4, 4)
        far_logits = torch.einsum("mc,nchw->mnhw", hyper, f)
    return win, far_logits
