"""One interactive training step on one image: SAM's recipe, batched over objects.

For an image with instance labels the step

1. picks up to ``objects`` labelled objects and gives each a first prompt: a point
   (the three-mask output; the loss takes the best of the three, as SAM does for an
   ambiguous prompt) or a noisy box (the single-mask output);
2. adds ``background`` points whose answer is "no object": every output empty and a
   predicted IoU of 0, so that segment-everything learns to drop grid points that
   hit no object;
3. runs ``rounds - 1`` corrective rounds: a new point from the error region of the
   previous best mask, the previous logits as the mask prompt (detached), the
   single-mask output;
4. returns the mean over rounds of ``focal_weight * focal + dice_weight * dice``
   of the best mask plus ``iou_weight`` times the MSE of the predicted IoU against
   the IoU of each predicted mask.

The mask losses are computed on the decoder's low-resolution logits (256 x 256 for
SAM) inside a window around each object plus a sample of far tokens
(:mod:`napari_mobilesam.training.decoder`), against the ground truth brought to that
frame (:func:`napari_mobilesam.distill.finetune.low_res_target`). With
``loss_upsample`` > 1 the window's logits are first upsampled bilinearly as inference
upsamples them, and compared with the ground truth at that finer resolution: a target
thresholded at the decoder's resolution moves every boundary to the nearest low-res
pixel edge, which caps the IoU a perfect decoder reaches (0.94 on the held-out images
of the quality benchmark, 0.93 for cells under 800 px) where the upsampled logits can
place it anywhere (0.995).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..model import Sam
from .decoder import TOKEN_PIXELS, InputFrame, Window, decode_tokens, window_logits
from .losses import dice_loss_per_mask, focal_loss_per_mask, mask_iou
from .prompts import background_points, corrective_points, noisy_boxes, points_from_masks

__all__ = ["StepConfig", "image_embedding", "interactive_loss", "upsample_window"]


@dataclass(frozen=True)
class StepConfig:
    """Sizes and weights of one training step.

    Parameters
    ----------
    objects : int
        Objects prompted per image (all of them when the image has fewer).
    background : int
        Background points per image ("no object" prompts).
    rounds : int
        1 first prompt + ``rounds - 1`` corrective clicks.
    box_fraction : float
        Probability that an object's first prompt is a box rather than a point.
    min_area : int
        Objects with fewer pixels (original image) are never prompted.
    far_tokens : int
        Image tokens outside each object's window whose logits also enter the loss.
    focal_weight, dice_weight, iou_weight : float
        Loss weights. SAM fine-tunes with focal : dice = 20 : 1; a decoder trained from
        a fresh initialisation with that weight learns to predict empty masks (the
        focal loss of the many background pixels wins before any object is found),
        hence 1 : 1 by default.
    neighbour_weight : float
        How many times a pixel of another labelled object counts in the focal loss of
        an object's mask (1 = like any pixel). Above 1 it penalises masks that spill
        into touching cells, the commonest error of a model that merges neighbours.
    loss_upsample : int
        The window's logits are upsampled this many times (bilinear, as inference does)
        before the mask losses and the IoU head's target are computed, against the
        ground truth at that resolution; 1 = at the decoder's resolution, 4 = at the
        model's full input resolution (1024 px for SAM). Far tokens stay at the
        decoder's resolution (each pixel counting ``loss_upsample ** 2`` times).
    """

    objects: int = 12
    background: int = 2
    rounds: int = 2
    box_fraction: float = 0.5
    min_area: int = 12
    far_tokens: int = 64
    focal_weight: float = 1.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    neighbour_weight: float = 1.0
    loss_upsample: int = 1

    def __post_init__(self) -> None:
        for name in ("objects", "rounds", "loss_upsample"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("background", "min_area", "far_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.box_fraction <= 1:
            raise ValueError(f"box_fraction must be in [0, 1], got {self.box_fraction!r}")
        for name in ("focal_weight", "dice_weight", "iou_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.neighbour_weight >= 1:
            raise ValueError(f"neighbour_weight must be >= 1, got {self.neighbour_weight!r}")


def image_embedding(model: Sam, x: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """The image encoder's output for a preprocessed (B, 3, S, S) batch, as float32.

    ``autocast`` runs the encoder in bfloat16 autocast (CPUs with bf16 units, GPUs).
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        emb = model.image_encoder(x)
    return emb.float()


def _select(labels: np.ndarray, cfg: StepConfig, rng: np.random.Generator) -> np.ndarray:
    ids, counts = np.unique(labels, return_counts=True)
    ids = ids[(ids > 0) & (counts >= cfg.min_area)]
    if len(ids) > cfg.objects:
        ids = rng.choice(ids, size=cfg.objects, replace=False)
    return np.sort(ids)


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (B, 4) of (B, H, W) bool masks, in pixel indices."""
    rows, cols = masks.any(2), masks.any(1)
    r = torch.arange(masks.shape[1])
    c = torch.arange(masks.shape[2])
    y0 = torch.where(rows, r, masks.shape[1]).min(1).values
    y1 = torch.where(rows, r, -1).max(1).values
    x0 = torch.where(cols, c, masks.shape[2]).min(1).values
    x1 = torch.where(cols, c, -1).max(1).values
    return torch.stack([x0, y0, x1, y1], 1).float()


@dataclass
class _Prompt:
    """One object's (or background point's) prompts and what the last round gave."""

    target: torch.Tensor  # (4h, 4w) bool, low-res frame
    window: Window
    coords: torch.Tensor | None = None  # (n, 2) input-frame (x, y)
    labels: torch.Tensor | None = None  # (n,)
    box: torch.Tensor | None = None  # (4,)
    previous: torch.Tensor | None = None  # (1, 4h, 4w) logits of the last best mask
    is_background: bool = False
    # other objects' pixels, bool, at the loss's resolution: (4h, 4w) x loss_upsample
    others: torch.Tensor | None = None
    fine: torch.Tensor | None = None  # (4fh, 4fw) bool target when loss_upsample f > 1


class _Losses:
    """Accumulates the mask and IoU losses of all rounds."""

    def __init__(self, cfg: StepConfig, far_mix: float = 1.0) -> None:
        self.cfg = cfg
        self.far_mix = far_mix
        self.mask: list[torch.Tensor] = []
        self.iou: list[torch.Tensor] = []
        self.last_iou: list[float] = []
        self.first_iou: list[float] = []

    def score(
        self, logits: torch.Tensor, far: torch.Tensor | None, far_weight: float, p: _Prompt
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-mask losses (M,) and actual IoUs (M,) of window + far logits.

        Each far pixel counts ``far_weight`` times in the focal loss and the IoU (the far
        tokens are a sample of everything outside the window), so that they estimate
        those of the whole low-resolution mask; the dice loss counts it once.
        """
        m = logits.shape[0]
        f = self.cfg.loss_upsample
        if f == 1:
            rows, cols = p.window.pixels
            target = p.target[rows, cols]
        else:
            logits, rows, cols = upsample_window(logits, p.window, f)
            if p.fine is not None:
                target = p.fine[rows, cols]
            else:  # background prompt: nothing anywhere
                target = torch.zeros(logits.shape[-2:], dtype=torch.bool)
        others = None if p.others is None else p.others[rows, cols]
        target = target.reshape(1, -1).to(logits.device)
        flat = logits.reshape(m, -1)
        weight = torch.ones(1, flat.shape[1], device=flat.device)
        focal_weight = weight
        if others is not None:  # set only when neighbour_weight != 1
            others = others.reshape(1, -1).to(flat.device)
            focal_weight = weight + (self.cfg.neighbour_weight - 1) * others.float()
        if far is not None:
            n = far[0].numel()
            flat = torch.cat([flat, far.reshape(m, -1)], 1)
            target = torch.cat([target, target.new_zeros(1, n)], 1)
            weight = torch.cat([weight, weight.new_full((1, n), far_weight * f * f)], 1)
            focal_weight = torch.cat([focal_weight, weight[:, -n:]], 1)
        # (M, 1, n): the loss helpers reduce over the last two axes
        flat, target, weight, focal_weight = (
            flat[:, None],
            target[:, None].expand_as(flat[:, None]),
            weight[:, None],
            focal_weight[:, None],
        )
        cfg = self.cfg
        # the IoU (the IoU head's target) counts every pixel as it is; only the focal
        # loss weighs the neighbours' pixels more
        per_mask = cfg.focal_weight * focal_loss_per_mask(flat, target, focal_weight)
        # dice unweighted: balanced around the object (weighted, the far background
        # would dominate it and a fresh decoder collapses to empty masks)
        per_mask = per_mask + cfg.dice_weight * dice_loss_per_mask(flat, target)
        actual = mask_iou(flat.detach() > 0, target, weight)
        if p.is_background:
            actual = torch.zeros_like(actual)
        return per_mask, actual


def upsample_window(
    logits: torch.Tensor, window: Window, factor: int
) -> tuple[torch.Tensor, slice, slice]:
    """A window's logits upsampled ``factor`` times as the full logits are at inference.

    Parameters
    ----------
    logits : (M, H, W)
        Low-resolution logits of ``window`` (``window.pixels``).
    window : Window
    factor : int

    Returns
    -------
    up : (M, factor * H - 2 b, factor * W - 2 b), b = factor // 2
        Bilinear (``align_corners=False``) upsampling without its outer ``b`` pixels per
        side: there the window's edge clamps what the full logits would interpolate
        from their neighbours; inside, the values equal those of the upsampled full
        logits (a test checks it).
    rows, cols : slice
        Where ``up`` lies in the upsampled full frame.
    """
    b = factor // 2
    up = F.interpolate(logits[:, None], scale_factor=factor, mode="bilinear", align_corners=False)
    up = up[:, 0, b : up.shape[-2] - b, b : up.shape[-1] - b]
    r, c = window.pixels
    rows = slice(r.start * factor + b, r.stop * factor - b)
    cols = slice(c.start * factor + b, c.stop * factor - b)
    return up, rows, cols


def _far_tokens(
    window: Window, grid: tuple[int, int], n: int, gen: torch.Generator
) -> tuple[torch.Tensor | None, float]:
    """Up to ``n`` distinct random tokens outside ``window`` and how many tokens each
    stands for."""
    if n == 0:
        return None, 0.0
    inside = torch.zeros(grid, dtype=torch.bool)
    inside[window.t0 : window.t1, window.u0 : window.u1] = True
    outside = torch.nonzero(~inside.flatten())[:, 0]
    if len(outside) == 0:
        return None, 0.0
    pick = torch.randperm(len(outside), generator=gen)[:n]
    return outside[pick], len(outside) / len(pick)


def _run_round(
    model: Sam,
    embedding: torch.Tensor,
    prompts: list[_Prompt],
    multimask: bool,
    losses: _Losses,
    gen: torch.Generator,
    first: bool,
    frame: InputFrame | None = None,
) -> None:
    """Decode ``prompts`` (same prompt layout) in one call and add their losses.

    Prompt coordinates are in the embedded input's frame; ``frame`` places that input in
    the model's full input frame (see :class:`InputFrame`).
    """
    device = embedding.device
    grid = tuple(embedding.shape[-2:])
    frame = frame or InputFrame()
    points = None
    if prompts[0].coords is not None:
        points = (
            torch.stack([p.coords for p in prompts]).to(device),
            torch.stack([p.labels for p in prompts]).to(device),
        )
    boxes = torch.stack([p.box for p in prompts]).to(device) if prompts[0].box is not None else None
    masks = None if first else torch.stack([p.previous for p in prompts]).to(device)
    sparse, dense = frame.encode_prompts(model, points, boxes, masks)
    hyper, iou_pred, keys = decode_tokens(model, embedding, sparse, dense, multimask, frame)
    mask_terms, iou_terms = [], []
    for b, p in enumerate(prompts):
        far_idx, far_weight = _far_tokens(p.window, grid, losses.cfg.far_tokens, gen)
        far_weight = 1.0 + losses.far_mix * (far_weight - 1.0)
        k = keys[b : b + 1] if keys.shape[0] > 1 else keys
        win, far = window_logits(model, k, hyper[b], grid, p.window, far_idx)
        far = None if far is None else far.float()
        per_mask, actual = losses.score(win.float(), far, far_weight, p)
        best = int(per_mask.detach().argmin())
        mask_terms.append(per_mask[best])
        iou_terms.append(F.mse_loss(iou_pred[b].float(), actual, reduction="sum") / len(actual))
        if not p.is_background:
            losses.last_iou.append(float(actual[best]))
            if first:
                losses.first_iou.append(float(actual[best]))
        canvas = torch.full(
            (1, *p.target.shape),
            float(far[best].detach().mean()) if far is not None else -10.0,
            device=device,
        )
        canvas[0][p.window.pixels] = win[best].detach().float()
        p.previous = canvas
    losses.mask.append(torch.stack(mask_terms).mean())
    losses.iou.append(torch.stack(iou_terms).mean())


def _add_corrective_click(p: _Prompt, gen: torch.Generator, scale: float) -> None:
    rows, cols = p.window.pixels
    pred = (p.previous[0][rows, cols] > 0).cpu()[None]
    xy, lab = corrective_points(pred, p.target[rows, cols][None], gen, scale)
    xy = xy + torch.tensor([cols.start * scale, rows.start * scale])
    if p.coords is None:
        p.coords, p.labels = xy, lab
    else:
        p.coords = torch.cat([p.coords, xy])
        p.labels = torch.cat([p.labels, lab])


def interactive_loss(
    model: Sam,
    embedding: torch.Tensor,
    input_size: tuple[int, int],
    labels: np.ndarray,
    cfg: StepConfig,
    rng: np.random.Generator,
    far_mix: float = 1.0,
    frame: InputFrame | None = None,
) -> tuple[torch.Tensor, dict[str, float]] | None:
    """SAM's interactive training loss for one image.

    Parameters
    ----------
    model : Sam
    embedding : (1, C, h, w) float32
        The image's embedding (with or without gradient).
    input_size : (int, int)
        (h, w) of the resized image inside the model's padded input.
    labels : (H, W) integer array
        Instance labels of the original image, 0 = background.
    cfg : StepConfig
    rng : numpy Generator
        Drives every random choice (objects, prompt kinds, points, noise).
    far_mix : float in [0, 1]
        How much the far tokens stand for everything outside each object's window:
        1 weights them by the share of the mask they sample (the losses estimate
        full-mask losses), 0 counts each far pixel once (a loss balanced around the
        object). A fresh decoder trained on full-mask losses from the start learns to
        predict empty masks (the background outweighs any object); ramping 0 -> 1
        lets it first learn where objects are, then stop spilling beyond them.
    frame : InputFrame, optional
        Where the embedded input sits in the model's full input frame, when it is a crop
        of it (training at a smaller ``input_size``); default: it is the full input.

    Returns
    -------
    (loss, parts) or None
        The scalar loss and floats: ``mask`` (focal + dice), ``iou`` (IoU-head
        MSE), ``miou`` (mean IoU of the objects' best masks in the last round),
        ``miou_first`` (the same after the first prompt),
        ``objects``; None when the image has no object large enough to prompt.
    """
    from ..distill.finetune import low_res_target

    ids = _select(labels, cfg, rng)
    if len(ids) == 0:
        return None
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    low = tuple(model.prompt_encoder.mask_input_size)
    grid = tuple(embedding.shape[-2:])
    scale = input_size[0] / labels.shape[0]
    masks = torch.from_numpy(labels[None] == ids[:, None, None])
    target = low_res_target(masks, model.img_size, input_size, low)[:, 0] > 0.5
    keep = target.flatten(1).any(1)
    masks, target = masks[keep], target[keep]
    if len(masks) == 0:
        return None
    # the mask losses' frame: the low-res one, or loss_upsample times finer
    loss_res = (low[0] * cfg.loss_upsample, low[1] * cfg.loss_upsample)
    fine = None
    if cfg.loss_upsample > 1:
        fine = low_res_target(masks, model.img_size, input_size, loss_res)[:, 0] > 0.5
    foreground = None
    if cfg.neighbour_weight != 1:
        fg = torch.from_numpy(np.asarray(labels) > 0)[None]
        foreground = low_res_target(fg, model.img_size, input_size, loss_res)[0, 0] > 0.5
    is_box = rng.random(len(masks)) < cfg.box_fraction
    first_xy = points_from_masks(masks, gen, scale)
    boxes = noisy_boxes(_boxes(masks) * scale, gen)
    point_prompts, box_prompts = [], []
    for i in range(len(masks)):
        p = _Prompt(target=target[i], window=Window.around(target[i], grid))
        if fine is not None:
            p.fine = fine[i]
        if foreground is not None:
            p.others = foreground & ~(target[i] if fine is None else fine[i])
        if is_box[i]:
            p.box = boxes[i]
            box_prompts.append(p)
        else:
            p.coords, p.labels = first_xy[i : i + 1], torch.ones(1, dtype=torch.long)
            point_prompts.append(p)
    low_scale = model.img_size / low[0]  # input-frame pixels per low-res pixel
    background = []
    for xy in background_points(labels, cfg.background, rng) * scale:
        t = torch.zeros(low, dtype=torch.bool)  # a 4x4-token window around the point
        r, c = int(xy[1] / low_scale), int(xy[0] / low_scale)
        span = 2 * TOKEN_PIXELS
        t[max(0, r - span) : r + span, max(0, c - span) : c + span] = True
        p = _Prompt(target=torch.zeros(low, dtype=torch.bool), window=Window.around(t, grid))
        p.coords = torch.from_numpy(np.asarray(xy, np.float32))[None]
        p.labels = torch.ones(1, dtype=torch.long)
        p.is_background = True
        background.append(p)

    losses = _Losses(cfg, far_mix)
    if point_prompts or background:
        _run_round(model, embedding, point_prompts + background, True, losses, gen, True, frame)
    if box_prompts:
        _run_round(model, embedding, box_prompts, False, losses, gen, True, frame)
    for _ in range(cfg.rounds - 1):
        losses.last_iou = []
        for group in (point_prompts, box_prompts):
            if not group:
                continue
            for p in group:
                _add_corrective_click(p, gen, low_scale)
            _run_round(model, embedding, group, False, losses, gen, False, frame)
    mask_loss = torch.stack(losses.mask).mean()
    iou_loss = torch.stack(losses.iou).mean()
    loss = mask_loss + cfg.iou_weight * iou_loss
    parts = {
        "mask": float(mask_loss.detach()),
        "iou": float(iou_loss.detach()),
        "miou": float(np.mean(losses.last_iou)) if losses.last_iou else float("nan"),
        "miou_first": float(np.mean(losses.first_iou)) if losses.first_iou else float("nan"),
        "objects": float(len(masks)),
    }
    return loss, parts
