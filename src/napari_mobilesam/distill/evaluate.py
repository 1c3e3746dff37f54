"""Judge a student encoder by the masks it gives: mIoU against the teacher.

MobileSAM's protocol: the same random prompts go to the teacher (its image encoder,
prompt encoder and mask decoder) and to the student (the student's image encoder with
the same prompt encoder and mask decoder, which is what a student checkpoint holds).
The score is the mean IoU between the two models' masks; the mean squared error
between the two image embeddings is reported beside it.

Prompts (:func:`sample_prompts`) are drawn per image from a generator seeded with
``(seed, image index)``, so a run is reproducible and an image gets the same prompts
whatever else is evaluated with it. With SA-1B annotations beside an image, point
prompts are pixels drawn uniformly inside randomly chosen annotated masks and box
prompts are the annotated boxes; otherwise points are uniform over the image and boxes
are random. Every prompt is decoded as a single mask (``multimask_output=False``) at
the original image resolution (logits > 0), through the same
:class:`~napari_mobilesam.predictor.Predictor` code for both models.
"""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from ..build import resolve_device
from ..model import Sam
from ..predictor import ImageEmbedding, Predictor
from . import data
from .models import SamConfigLike, load_sam, load_teacher_parts, spec_name
from .report import format_report

__all__ = [
    "PROMPT_KINDS",
    "evaluate",
    "format_report",
    "mask_iou",
    "points_in_mask",
    "sample_prompts",
    "xywh_to_xyxy",
]

#: Values of ``evaluate(prompts=...)``.
PROMPT_KINDS: tuple[str, ...] = ("points", "boxes", "both")

# Full-resolution masks decoded at once are bounded to about this many pixels
# (per model, bool), so large photos do not hold every prompt's mask in memory.
_CHUNK_PIXELS = 2**25
_MAX_CHUNK = 64


# -- prompts -------------------------------------------------------------------------


def xywh_to_xyxy(bbox) -> np.ndarray:
    """SA-1B / COCO boxes (..., 4) ``[x, y, w, h]`` -> XYXY ``[x0, y0, x0 + w, y0 + h]``."""
    b = np.asarray(bbox, dtype=np.float64)
    return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], axis=-1)


def points_in_mask(mask: np.ndarray, rng: np.random.Generator, k: int = 1) -> np.ndarray:
    """``k`` pixels drawn uniformly (with replacement) from the True pixels of ``mask``.

    Parameters
    ----------
    mask : (H, W) bool
    rng : numpy.random.Generator
    k : int

    Returns
    -------
    (k, 2) float64
        (x, y) pixel indices (column, row), SAM's point convention.

    Raises
    ------
    ValueError
        ``mask`` has no True pixel.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("mask is empty: no pixel to draw a point from")
    idx = rng.integers(0, len(xs), size=k)
    return np.stack([xs[idx], ys[idx]], axis=1).astype(np.float64)


def _decoded(annotations: list[dict], i: int, shape: tuple[int, int], cache: dict, source: str):
    if i not in cache:
        mask = data.rle_decode(annotations[i]["segmentation"])
        if mask.shape != tuple(shape):
            raise data.DataError(
                f"annotation {i} of {source} is a {mask.shape[0]}x{mask.shape[1]} mask, the "
                f"image is {shape[0]}x{shape[1]}"
            )
        cache[i] = mask
    return cache[i]


def sample_prompts(
    image_shape: tuple[int, int],
    annotations: list[dict] | None,
    n: int,
    *,
    seed: int = 0,
    index: int = 0,
    kinds: str = "both",
    source: str = "image",
) -> dict[str, np.ndarray]:
    """The evaluation prompts of one image, deterministic in ``(seed, index)``.

    Points and boxes come from separate generators (``default_rng([seed, index, 0])``
    and ``[seed, index, 1]``), so an image's point prompts are the same whether or not
    boxes are asked for.

    Parameters
    ----------
    image_shape : (int, int)
        (H, W) of the original image.
    annotations : list of dict or None
        :func:`~napari_mobilesam.distill.data.read_annotations` of the image. When
        non-empty: each point is one pixel drawn uniformly inside an annotated mask (the
        masks are taken in a random order, cycling when ``n`` exceeds their number; an
        empty mask gives its box centre), and the boxes are up to ``n`` distinct
        annotated boxes in random order. When empty or None: points are uniform over
        the image; boxes are random, inside the image, each side at least 1/16 of the
        image's shorter side (and 1 px).
    n : int
        Prompts of each kind.
    seed, index : int
        The run's seed and the image's index in the folder.
    kinds : {"points", "boxes", "both"}
        Which prompts to make; the other array is empty.
    source : str
        Names the image in errors.

    Returns
    -------
    dict
        ``"points"``: (Np, 2) float64, (x, y) pixels of the original image (one
        positive point per prompt); ``"boxes"``: (Nb, 4) float64, XYXY in original
        pixels. Np = n; Nb = n, or the number of annotations when fewer.

    Raises
    ------
    ValueError
        ``n`` < 1 or an unknown ``kinds``.
    napari_mobilesam.distill.data.DataError
        An annotated mask whose size is not the image's.
    """
    if kinds not in PROMPT_KINDS:
        raise ValueError(f"prompts must be one of {PROMPT_KINDS}, got {kinds!r}")
    if not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be a positive number of prompts, got {n!r}")
    h, w = (int(v) for v in image_shape)
    anns = annotations or []
    points = np.zeros((0, 2))
    boxes = np.zeros((0, 4))
    if kinds in ("points", "both"):
        rng = np.random.default_rng([seed, index, 0])
        if anns:
            order = rng.permutation(len(anns))
            chosen = order[np.arange(n) % len(anns)]
            cache: dict[int, np.ndarray] = {}
            rows = []
            for i in chosen:
                mask = _decoded(anns, int(i), (h, w), cache, source)
                if mask.any():
                    rows.append(points_in_mask(mask, rng, 1)[0])
                else:
                    x0, y0, x1, y1 = xywh_to_xyxy(anns[i]["bbox"])
                    rows.append(np.array([(x0 + x1) / 2, (y0 + y1) / 2]))
            points = np.stack(rows)
        else:
            xs = rng.integers(0, w, size=n)
            ys = rng.integers(0, h, size=n)
            points = np.stack([xs, ys], axis=1).astype(np.float64)
    if kinds in ("boxes", "both"):
        rng = np.random.default_rng([seed, index, 1])
        if anns:
            chosen = rng.permutation(len(anns))[:n]
            boxes = xywh_to_xyxy([anns[i]["bbox"] for i in chosen])
            boxes = np.clip(boxes, 0, [w, h, w, h])
        else:
            m = min(max(1.0, min(h, w) / 16), float(min(h, w)))
            x0 = rng.uniform(0, w - m, size=n)
            y0 = rng.uniform(0, h - m, size=n)
            x1 = x0 + m + rng.random(n) * (w - x0 - m)
            y1 = y0 + m + rng.random(n) * (h - y0 - m)
            boxes = np.stack([x0, y0, x1, y1], axis=1)
    return {"points": points, "boxes": boxes}


# -- masks ---------------------------------------------------------------------------


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of (B, ...) bool masks pairwise along the first axis -> (B,) float32.

    Two empty masks have IoU 1.
    """
    a = a.flatten(1)
    b = b.flatten(1)
    inter = (a & b).sum(1)
    union = (a | b).sum(1)
    iou = inter.double() / union.clamp(min=1).double()
    return torch.where(union == 0, torch.ones_like(iou), iou).float()


def _chunk(shape: tuple[int, int]) -> int:
    return max(1, min(_MAX_CHUNK, _CHUNK_PIXELS // max(1, shape[0] * shape[1])))


@torch.no_grad()
def _prompt_ious(
    teacher: Predictor, student: Predictor, points: np.ndarray, boxes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """IoU between the two predictors' single masks for every point and every box."""
    size = teacher.original_size
    step = _chunk(size)
    out = []
    for kind, prompts in (("points", points), ("boxes", boxes)):
        ious = []
        for i in range(0, len(prompts), step):
            part = prompts[i : i + step]
            masks = []
            for pred in (teacher, student):
                if kind == "points":
                    coords = pred.transform.apply_coords(part[:, None, :], size)
                    coords_t = torch.as_tensor(coords, dtype=torch.float32, device=pred.device)
                    labels_t = torch.ones(coords_t.shape[:2], dtype=torch.int64, device=pred.device)
                    m, _, _ = pred.predict_torch(coords_t, labels_t, multimask_output=False)
                else:
                    bx = pred.transform.apply_boxes(part, size)
                    bx_t = torch.as_tensor(bx, dtype=torch.float32, device=pred.device)
                    m, _, _ = pred.predict_torch(None, None, bx_t, multimask_output=False)
                masks.append(m[:, 0])
            ious.append(mask_iou(masks[0], masks[1].to(masks[0].device)).cpu().numpy())
        out.append(np.concatenate(ious) if ious else np.zeros(0, np.float32))
    return out[0], out[1]


@torch.no_grad()
def _embed(model: Sam, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """(1, C, h, w) float32 embedding of an RGB uint8 image and its input size (h, w)."""
    x, input_size = data.preprocess(
        image,
        model.img_size,
        pixel_mean=model.pixel_mean.flatten().tolist(),
        pixel_std=model.pixel_std.flatten().tolist(),
    )
    return model.image_encoder(x[None].to(model.device)).float(), input_size


# -- evaluation ----------------------------------------------------------------------


def _open_store(embeddings, teacher_weights, teacher: Sam):
    from ..weights import sha256_file
    from .store import EmbeddingStore

    store = EmbeddingStore.open(embeddings)
    meta = store.meta
    want = sha256_file(teacher_weights)
    have = meta.get("teacher_sha256")
    if have != want:
        raise ValueError(
            f"embeddings {os.fspath(embeddings)!r} were computed with teacher weights of "
            f"sha256 {have}, but teacher_weights {os.fspath(teacher_weights)!r} has sha256 "
            f"{want}"
        )
    emb = tuple(teacher.prompt_encoder.image_embedding_size)
    shape = (teacher.prompt_encoder.embed_dim, *emb)
    if tuple(store.embed_shape) != shape or int(meta.get("img_size", -1)) != teacher.img_size:
        raise ValueError(
            f"embeddings {os.fspath(embeddings)!r} hold {tuple(store.embed_shape)} embeddings "
            f"of {meta.get('img_size')} px inputs; the teacher makes {shape} from "
            f"{teacher.img_size} px"
        )
    return store


def _mean(values: list[np.ndarray]) -> float | None:
    v = np.concatenate(values) if values else np.zeros(0)
    return float(v.mean()) if v.size else None


def evaluate(
    student: str | PathLike,
    teacher: SamConfigLike,
    teacher_weights: str | PathLike,
    images: str | PathLike,
    *,
    student_model: SamConfigLike = "vit_t",
    prompts: str = "both",
    n: int = 50,
    seed: int = 0,
    device=None,
    embeddings: str | PathLike | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Mask mIoU and embedding MSE of a student against its teacher.

    Parameters
    ----------
    student : path
        The student checkpoint (official format, e.g. ``RUN/student.pt``): image
        encoder, prompt encoder and mask decoder.
    teacher : SamConfigLike
        The teacher's architecture (registry name, JSON config file or SamConfig).
    teacher_weights : path
        The teacher's weights (official format).
    images : path
        Folder of images (:func:`~napari_mobilesam.distill.data.find_images`), with
        optional SA-1B ``.json`` annotations beside them (then the prompts follow the
        annotations, see :func:`sample_prompts`).
    student_model : SamConfigLike
        The student's architecture.
    prompts : {"points", "boxes", "both"}
        Prompt kinds; ``n`` of each per image.
    n : int
        Prompts of each kind per image (fewer boxes when an image has fewer
        annotations).
    seed : int
        Prompt seed; image ``i`` of the folder draws from ``(seed, i)``.
    device : str or torch.device, optional
        Default: CUDA when available.
    embeddings : path, optional
        An :class:`~napari_mobilesam.distill.store.EmbeddingStore` of this teacher:
        the teacher's embeddings are read from it instead of running its encoder
        (its prompt encoder and decoder still run; the float16 embeddings are used
        as float32). Images are matched to store rows by their path relative to
        ``images``; only images with a finished row are evaluated, the others are
        counted in ``"skipped"``.
    limit : int, optional
        Evaluate the first ``limit`` images (in sorted path order, after the store
        filter).
    progress : bool
        tqdm progress bar over images (stderr).

    Returns
    -------
    dict
        ``miou`` (mean IoU over all prompts), ``miou_points`` / ``miou_boxes`` (over
        the prompts of that kind; None when not asked for), ``embedding_mse`` (mean
        over images of the mean squared difference of the (C, h, w) float32
        embeddings), ``n_images``, ``n_prompts``, ``n_points``, ``n_boxes``,
        ``skipped``, ``per_image`` (list of ``{"image": relative posix path, "miou",
        "miou_points", "miou_boxes", "embedding_mse", "n_prompts"}``), ``student``,
        ``teacher``, ``student_model``, ``prompts``, ``n``, ``seed``, ``embeddings``.

    Raises
    ------
    ValueError
        Bad ``prompts``, ``n`` or ``limit``; student and teacher embeddings of
        different shapes; an embedding store of other teacher weights or shapes.
    napari_mobilesam.distill.data.DataError
        No images, unreadable images or annotations, no finished store row.
    FileNotFoundError, napari_mobilesam.build.CheckpointError
        Missing or unusable checkpoints.
    """
    if prompts not in PROMPT_KINDS:
        raise ValueError(f"prompts must be one of {PROMPT_KINDS}, got {prompts!r}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be a positive number of prompts, got {n!r}")
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive number of images, got {limit!r}")
    dev = resolve_device(device)
    root = Path(images)
    paths = data.find_images(root)
    indexed = list(enumerate(paths))  # the index seeds the prompts: before any filter

    student_net = load_sam(student_model, student, device=dev)
    store = None
    if embeddings is None:
        teacher_net = load_sam(teacher, teacher_weights, device=dev)
    else:
        # only the teacher's prompt encoder and decoder are needed (no ViT-H in memory)
        teacher_net = load_teacher_parts(student_model, teacher, teacher_weights).eval().to(dev)
        store = _open_store(embeddings, teacher_weights, teacher_net)
    s_shape = (
        student_net.prompt_encoder.embed_dim,
        *student_net.prompt_encoder.image_embedding_size,
    )
    t_shape = (
        teacher_net.prompt_encoder.embed_dim,
        *teacher_net.prompt_encoder.image_embedding_size,
    )
    if s_shape != t_shape or student_net.img_size != teacher_net.img_size:
        raise ValueError(
            f"student_model {spec_name(student_model)!r} embeds {student_net.img_size} px into "
            f"{s_shape}, the teacher {spec_name(teacher)!r} embeds {teacher_net.img_size} px "
            f"into {t_shape}"
        )

    skipped = 0
    rows: dict[int, int] = {}
    if store is not None:
        row_of = {rel: i for i, rel in enumerate(store.images)}
        done = np.asarray(store.done(), dtype=bool)
        kept = []
        for i, p in indexed:
            r = row_of.get(p.relative_to(root).as_posix())
            if r is not None and done[r]:
                rows[i] = r
                kept.append((i, p))
            else:
                skipped += 1
        if not kept:
            raise data.DataError(
                f"embeddings {os.fspath(embeddings)!r} hold no finished embedding of an image "
                f"in {str(root)!r}"
            )
        indexed = kept
    if limit is not None:
        indexed = indexed[:limit]

    t_pred = Predictor(teacher_net)
    s_pred = Predictor(student_net)
    per_image = []
    all_points: list[np.ndarray] = []
    all_boxes: list[np.ndarray] = []
    mses = []
    bar = _progress(indexed, progress)
    try:
        for i, path in bar:
            rel = path.relative_to(root).as_posix()
            image = data.load_image(path)
            size = (int(image.shape[0]), int(image.shape[1]))
            anns = data.read_annotations(path)
            sampled = sample_prompts(
                size, anns, n, seed=seed, index=i, kinds=prompts, source=str(path)
            )
            s_feat, input_size = _embed(student_net, image)
            if store is None:
                t_feat, _ = _embed(teacher_net, image)
            else:
                t_feat = torch.from_numpy(np.asarray(store.read(rows[i]), dtype=np.float32))
                t_feat = t_feat[None].to(dev)
            mse = float(((s_feat - t_feat) ** 2).mean().item())
            t_pred.set_embedding(ImageEmbedding(t_feat, size, input_size))
            s_pred.set_embedding(ImageEmbedding(s_feat, size, input_size))
            iou_p, iou_b = _prompt_ious(t_pred, s_pred, sampled["points"], sampled["boxes"])
            all_points.append(iou_p)
            all_boxes.append(iou_b)
            mses.append(mse)
            both = np.concatenate([iou_p, iou_b])
            per_image.append(
                {
                    "image": rel,
                    "miou": float(both.mean()),
                    "miou_points": float(iou_p.mean()) if iou_p.size else None,
                    "miou_boxes": float(iou_b.mean()) if iou_b.size else None,
                    "embedding_mse": mse,
                    "n_prompts": int(both.size),
                }
            )
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(miou=f"{_mean(all_points + all_boxes):.3f}")
    finally:
        if hasattr(bar, "close"):
            bar.close()
    n_points = int(sum(v.size for v in all_points))
    n_boxes = int(sum(v.size for v in all_boxes))
    return {
        "miou": _mean(all_points + all_boxes),
        "miou_points": _mean(all_points) if prompts != "boxes" else None,
        "miou_boxes": _mean(all_boxes) if prompts != "points" else None,
        "embedding_mse": float(np.mean(mses)),
        "n_images": len(per_image),
        "n_prompts": n_points + n_boxes,
        "n_points": n_points,
        "n_boxes": n_boxes,
        "skipped": skipped,
        "per_image": per_image,
        "student": os.fspath(student),
        "student_model": spec_name(student_model),
        "teacher": spec_name(teacher),
        "teacher_weights": os.fspath(teacher_weights),
        "embeddings": None if embeddings is None else os.fspath(embeddings),
        "prompts": prompts,
        "n": int(n),
        "seed": int(seed),
    }


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="evaluate", unit="img", leave=False)
