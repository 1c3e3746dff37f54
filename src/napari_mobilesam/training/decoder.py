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

__all__ = ["InputFrame", "Window", "decode_tokens", "window_logits"]

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


@dataclass(frozen=True)
class InputFrame:
    """Where a training input sits in the model's full input frame.

    Training a 1024 px model at a 512 px input (``input_size``) shows it a crop of
    what a 1024 px input would hold. Its prompts and the decoder's positional encoding
    must be those that the crop's pixels have in the full frame: encoded in a 512 px
    frame of their own, every distance between a prompt and an image token looks twice
    as long as at 1024 px, and the decoder learns object extents on a scale that
    inference halves. Measured on the first stand-in model, trained that way: the same
    cells at the same pixel scale scored point / box mIoU 0.85 / 0.89 in the 512 px
    frame it was trained in and 0.65 / 0.74 in the 1024 px frame it is used in, its
    masks spilling into touching cells.

    The prompt encoder of the training model keeps the full frame's
    ``input_image_size``; the crop's tokens are the rows ``row:row+h`` and columns
    ``col:col+w`` of the full token grid.

    Attributes
    ----------
    row, col : int
        Offset of the crop's top-left token in the full grid.
    """

    row: int = 0
    col: int = 0

    @staticmethod
    def stride(model: Sam) -> int:
        """Input pixels per image token."""
        return model.img_size // model.prompt_encoder.image_embedding_size[0]

    def shift(self, model: Sam) -> torch.Tensor:
        """(x, y) input pixels to add to the crop's prompt coordinates."""
        s = self.stride(model)
        return torch.tensor([self.col * s, self.row * s], dtype=torch.float32)

    def dense_pe(self, model: Sam, grid: tuple[int, int]) -> torch.Tensor:
        """(1, C, h, w): the positional encoding of the crop's tokens in the full grid."""
        pe = model.prompt_encoder
        s = self.stride(model)
        full = (pe.input_image_size[0] // s, pe.input_image_size[1] // s)
        if self.row + grid[0] > full[0] or self.col + grid[1] > full[1]:
            raise ValueError(f"a {grid} crop at ({self.row}, {self.col}) leaves the {full} grid")
        out = pe.pe_layer(full)[:, self.row : self.row + grid[0], self.col : self.col + grid[1]]
        return out[None]

    def encode_prompts(
        self,
        model: Sam,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt encoder's (sparse, dense) embeddings of prompts given in the crop's
        pixel frame ((B, N, 2) points as (x, y), (B, 4) boxes as XYXY), placed in the full
        frame."""
        shift = self.shift(model).to(model.prompt_encoder.no_mask_embed.weight.device)
        if points is not None:
            points = (points[0] + shift, points[1])
        if boxes is not None:
            boxes = boxes + shift.repeat(2)
        return model.prompt_encoder(points, boxes, masks)

    @classmethod
    def random(cls, model: Sam, full_size: int, rng) -> InputFrame:
        """A uniformly placed crop of ``model``'s input in a ``full_size`` input."""
        s = cls.stride(model)
        spare = max(0, (full_size - model.img_size) // s)
        return cls(int(rng.integers(spare + 1)), int(rng.integers(spare + 1)))


def decode_tokens(
    model: Sam,
    embedding: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    multimask: bool,
    frame: InputFrame | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The transformer part of the decoder.

    Parameters
    ----------
    embedding : (1, C, h, w)
    sparse : (B, N, C) prompt tokens
    dense : (1 or B, C, h, w) dense prompt embedding
    multimask : bool
        Use the three multimask tokens (else the single-mask token).
    frame : InputFrame, optional
        Where the embedding's tokens sit in the full input (default: it is the full input).

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
    pe = (frame or InputFrame()).dense_pe(model, tuple(embedding.shape[-2:]))
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
