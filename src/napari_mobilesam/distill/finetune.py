"""Optional fine-tuning of the mask decoder on top of a frozen (distilled) image encoder.

Decoupled distillation leaves the teacher's mask decoder untouched; when the student's
embeddings are close but not equal to the teacher's, a short fine-tuning of the decoder
on ground-truth masks (SA-1B annotations) can recover some mask quality. The image
encoder and the prompt encoder stay frozen; only ``mask_decoder`` is trained.

The loss is SAM's (Kirillov et al. 2023, section 3 and appendix A), on the single-mask
output's low-resolution logits ``x`` (B, 1, 4h, 4w) against the ground-truth mask
``y`` in {0, 1} brought to the same frame, with ``p = sigmoid(x)``:

- sigmoid focal loss (Lin et al. 2017), alpha = 0.25, gamma = 2, averaged over pixels
  and masks: ``FL = alpha_t * (1 - p_t) ** gamma * BCE(x, y)`` with
  ``p_t = p * y + (1 - p) * (1 - y)`` and ``alpha_t = alpha * y + (1 - alpha) * (1 - y)``;
- dice loss per mask, averaged: ``D = 1 - (2 * sum(p * y) + 1) / (sum(p) + sum(y) + 1)``;
- IoU-head loss: ``MSE(iou_pred, IoU(x > 0, y))``, the predicted IoU against the IoU
  of the predicted mask with the ground truth (no gradient through the latter).

``loss = focal_weight * FL + dice_weight * D + iou_weight * MSE_iou``; SAM weights
focal : dice as 20 : 1 and the IoU loss by 1 (the defaults).
"""

from __future__ import annotations

import csv
import io
import math
from os import PathLike
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import write_text_atomic
from ..build import resolve_device
from ..model import Sam
from ..transforms import apply_boxes, apply_coords
from . import data
from .evaluate import points_in_mask, xywh_to_xyxy
from .models import SamConfigLike, load_sam, save_student

__all__ = ["LOG_FIELDS", "dice_loss", "finetune_decoder", "low_res_target", "sigmoid_focal_loss"]

#: Columns of ``log.csv``.
LOG_FIELDS: tuple[str, ...] = ("step", "epoch", "loss", "focal", "dice", "iou_loss", "lr")


def sigmoid_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Mean sigmoid focal loss of logits against a {0, 1} target of the same shape."""
    target = target.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * ce).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the first axis of ``1 - (2 sum(p y) + 1) / (sum(p) + sum(y) + 1)``."""
    p = torch.sigmoid(logits).flatten(1)
    y = target.to(p.dtype).flatten(1)
    return (1 - (2 * (p * y).sum(1) + 1) / (p.sum(1) + y.sum(1) + 1)).mean()


def low_res_target(
    masks: torch.Tensor, img_size: int, input_size: tuple[int, int], low_res: tuple[int, int]
) -> torch.Tensor:
    """Ground-truth masks in the decoder's low-resolution frame.

    Parameters
    ----------
    masks : (B, H, W) bool tensor
        Masks at the original image size.
    img_size : int
        The model's square input side (1024).
    input_size : (int, int)
        (h, w) of the resized image inside the padded square.
    low_res : (int, int)
        Size of the decoder's logits (256, 256): ``img_size`` divided by an integer.

    Returns
    -------
    (B, 1, *low_res) float32 in {0, 1}
        Resized bilinearly to ``input_size`` (as the image is), zero-padded to
        ``img_size``, area-averaged down to ``low_res``, thresholded at 0.5.
    """
    h, w = input_size
    x = F.interpolate(masks[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)
    x = F.pad(x, (0, img_size - w, 0, img_size - h))
    x = F.adaptive_avg_pool2d(x, low_res)
    return (x > 0.5).float()


def _iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = (logits > 0).flatten(1)
    gt = target.flatten(1) > 0.5
    inter = (pred & gt).sum(1).float()
    union = (pred | gt).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _check(name: str, value, *, low: float = 0.0, strict: bool = False, integer: bool = False):
    ok = not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = math.isfinite(float(value)) and (value > low if strict else value >= low)
    if not ok:
        kind = "an integer" if integer else "a number"
        rel = ">" if strict else ">="
        raise ValueError(f"{name} must be {kind} {rel} {low:g}, got {value!r}")


def _annotated(root: Path, limit: int | None) -> list[tuple[int, Path]]:
    paths = data.find_images(root)
    found = [(i, p) for i, p in enumerate(paths) if data.annotation_path(p).is_file()]
    if not found:
        raise data.DataError(
            f"no SA-1B annotations (.json beside the images) found in {str(root)!r}: decoder "
            "fine-tuning needs ground-truth masks"
        )
    return found if limit is None else found[:limit]


def _prompts(anns: list[dict], shape, k: int, rng: np.random.Generator, source: str):
    """Up to ``k`` annotated masks, each with a box (XYXY) or one positive point (x, y)."""
    chosen = rng.permutation(len(anns))[:k]
    masks, kinds, prompts = [], [], []
    for i in chosen:
        mask = data.rle_decode(anns[i]["segmentation"])
        if mask.shape != tuple(shape):
            raise data.DataError(
                f"annotation {int(i)} of {source} is a {mask.shape[0]}x{mask.shape[1]} mask, "
                f"the image is {shape[0]}x{shape[1]}"
            )
        if not mask.any():
            continue
        is_box = bool(rng.random() < 0.5)
        masks.append(mask)
        kinds.append(is_box)
        if is_box:
            prompts.append(np.clip(xywh_to_xyxy(anns[i]["bbox"]), 0, [shape[1], shape[0]] * 2))
        else:
            prompts.append(points_in_mask(mask, rng, 1)[0])
    return masks, np.array(kinds, dtype=bool), prompts


def _decode(net: Sam, feat, coords, boxes) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-mask low-res logits (B, 1, 4h, 4w) and IoU (B, 1); grads to the decoder."""
    with torch.no_grad():
        points = None
        if coords is not None:
            labels = torch.ones(coords.shape[:2], dtype=torch.int64, device=coords.device)
            points = (coords, labels)
        sparse, dense = net.prompt_encoder(points, boxes, None)
        pe = net.prompt_encoder.get_dense_pe()
    return net.mask_decoder(feat, pe, sparse, dense, False)


def _write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def finetune_decoder(
    checkpoint: str | PathLike,
    images: str | PathLike,
    out: str | PathLike,
    *,
    model: SamConfigLike = "vit_t",
    epochs: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    masks_per_image: int = 16,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    seed: int = 0,
    device=None,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune the mask decoder of ``checkpoint`` on SA-1B ground truth.

    One optimiser step (AdamW, constant ``lr``) per annotated image and epoch. Per
    image: its embedding is computed once (no gradient, encoder frozen in eval mode);
    ``masks_per_image`` annotated masks are drawn (fewer when the image has fewer;
    empty masks are dropped), each prompted by its box (XYXY, from the annotated
    ``[x, y, w, h]``) or one positive point drawn uniformly inside the mask (50/50);
    the single-mask output is compared with the mask brought to the low-resolution
    frame (:func:`low_res_target`) by the loss of the module docstring. Images are
    visited in a random order each epoch; everything random is drawn from
    ``(seed, epoch, image index)``.

    Parameters
    ----------
    checkpoint : path
        A complete checkpoint in the official format (e.g. ``RUN/student.pt``).
    images : path
        Folder of images with SA-1B ``.json`` annotations beside them; images without
        one are skipped.
    out : path
        Output folder: ``finetuned.pt`` (complete official-format checkpoint, written
        atomically) and ``log.csv`` (``step,epoch,loss,focal,dice,iou_loss,lr``,
        rewritten after every epoch).
    model : SamConfigLike
        Architecture of ``checkpoint``.
    epochs : int
        Passes over the annotated images.
    lr, weight_decay : float
        AdamW settings.
    masks_per_image : int
        Annotated masks (prompts) per image and step.
    focal_weight, dice_weight, iou_weight : float
        Loss weights.
    seed : int
    device : str or torch.device, optional
        Default: CUDA when available.
    limit : int, optional
        Use the first ``limit`` annotated images (sorted path order).
    progress : bool
        tqdm progress bar (stderr).

    Returns
    -------
    dict
        ``steps``, ``epochs``, ``first_loss``, ``final_loss`` (of the first / last
        step), ``images`` (annotated images used), ``checkpoint`` and ``log``
        (paths as str).

    Raises
    ------
    ValueError
        A bad numeric argument (named).
    napari_mobilesam.distill.data.DataError
        No images, no annotated image, or no non-empty annotated mask at all.
    FileNotFoundError, napari_mobilesam.build.CheckpointError
        Missing or unusable checkpoint.
    """
    _check("epochs", epochs, low=1, integer=True)
    _check("masks_per_image", masks_per_image, low=1, integer=True)
    _check("lr", lr, strict=True)
    _check("weight_decay", weight_decay)
    for name, value in (("focal_weight", focal_weight), ("dice_weight", dice_weight),
                        ("iou_weight", iou_weight)):  # fmt: skip
        _check(name, value)
    if focal_weight + dice_weight + iou_weight <= 0:
        raise ValueError("focal_weight, dice_weight and iou_weight must not all be 0")
    if limit is not None:
        _check("limit", limit, low=1, integer=True)
    dev = resolve_device(device)
    root = Path(images)
    items = _annotated(root, limit)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    net = load_sam(model, checkpoint, device=dev)
    for part in (net.image_encoder, net.prompt_encoder):
        part.requires_grad_(False).eval()
    decoder = net.mask_decoder.requires_grad_(True).train()
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    low_res = tuple(4 * s for s in net.prompt_encoder.image_embedding_size)
    log_path = out / "log.csv"
    rows: list[dict] = []
    used: set[int] = set()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(epochs) * len(items), desc="finetune decoder", unit="img")
    try:
        for epoch in range(int(epochs)):
            order = np.random.default_rng([seed, epoch]).permutation(len(items))
            for j in order:
                index, path = items[j]
                if bar is not None:
                    bar.update(1)
                anns = data.read_annotations(path)
                if not anns:
                    continue
                image = data.load_image(path)
                shape = image.shape[:2]
                rng = np.random.default_rng([seed, epoch, index])
                masks, is_box, prompts = _prompts(anns, shape, int(masks_per_image), rng, str(path))
                if not masks:
                    continue
                used.add(index)
                stats = _step(net, opt, image, masks, is_box, prompts, low_res,
                              (focal_weight, dice_weight, iou_weight))  # fmt: skip
                rows.append({"step": len(rows) + 1, "epoch": epoch, **stats,
                             "lr": opt.param_groups[0]["lr"]})  # fmt: skip
                if bar is not None:
                    bar.set_postfix(loss=f"{stats['loss']:.4f}")
            _write_log(log_path, rows)
    finally:
        if bar is not None:
            bar.close()
    if not rows:
        raise data.DataError(f"no non-empty annotated mask found in {str(root)!r}")
    ckpt = save_student(net.eval(), out / "finetuned.pt")
    return {
        "steps": len(rows),
        "epochs": int(epochs),
        "first_loss": rows[0]["loss"],
        "final_loss": rows[-1]["loss"],
        "images": len(used),
        "checkpoint": str(ckpt),
        "log": str(log_path),
    }


def _step(net: Sam, opt, image, masks, is_box, prompts, low_res, weights) -> dict:
    """One optimiser step on one image's prompts; returns the loss terms."""
    dev = net.device
    x, input_size = data.preprocess(
        image,
        net.img_size,
        pixel_mean=net.pixel_mean.flatten().tolist(),
        pixel_std=net.pixel_std.flatten().tolist(),
    )
    with torch.no_grad():
        feat = net.image_encoder(x[None].to(dev)).float()
    size = image.shape[:2]
    target = low_res_target(
        torch.from_numpy(np.stack(masks)).to(dev), net.img_size, input_size, low_res
    )
    logits, ious = [], []
    order = []
    for box_kind in (False, True):
        sel = np.flatnonzero(is_box == box_kind)
        if not sel.size:
            continue
        stacked = np.stack([prompts[i] for i in sel])
        if box_kind:
            b = apply_boxes(stacked, size, net.img_size)
            lo, io = _decode(net, feat, None, torch.as_tensor(b, dtype=torch.float32, device=dev))
        else:
            c = apply_coords(stacked[:, None, :], size, net.img_size)
            lo, io = _decode(net, feat, torch.as_tensor(c, dtype=torch.float32, device=dev), None)
        logits.append(lo)
        ious.append(io)
        order.append(sel)
    idx = torch.as_tensor(np.concatenate(order), device=dev)
    target = target[idx]
    logits = torch.cat(logits)
    iou_pred = torch.cat(ious)[:, 0]
    focal = sigmoid_focal_loss(logits, target)
    dice = dice_loss(logits, target)
    iou_loss = F.mse_loss(iou_pred, _iou(logits.detach(), target))
    wf, wd, wi = weights
    loss = wf * focal + wd * dice + wi * iou_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {
        "loss": float(loss.item()),
        "focal": float(focal.item()),
        "dice": float(dice.item()),
        "iou_loss": float(iou_loss.item()),
    }
