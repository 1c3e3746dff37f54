"""Teacher embeddings of a folder of images, computed once into an :class:`EmbeddingStore`.

The teacher's image encoder runs on exactly the inputs the predictor makes
(:func:`~napari_mobilesam.distill.data.load_image` +
:func:`~napari_mobilesam.distill.data.preprocess`); image reading and preprocessing
run in ``DataLoader`` worker processes so that disk IO overlaps the encoder. The run
is resumable: rows already in the store are skipped, rows that failed are retried.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from os import PathLike
from pathlib import Path

import torch

from ..build import resolve_device
from .data import DataError, find_images, load_image, preprocess
from .models import SamConfigLike, config_to_dict, load_sam, resolve_config, spec_name
from .store import EmbeddingStore

__all__ = ["embed_images"]

log = logging.getLogger(__name__)


class _ImageDataset(torch.utils.data.Dataset):
    """``(row, x, error)``: x (3, S, S) float32 model input, or None with the reason."""

    def __init__(self, paths: list[Path], rows: list[int], img_size: int, mean, std) -> None:
        self.paths = paths
        self.rows = rows
        self.img_size = img_size
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            image = load_image(self.paths[row])
        except DataError as exc:
            return row, None, str(exc)
        x, _ = preprocess(image, self.img_size, self.mean, self.std)
        return row, x, None


def _collate(items):
    ok = [(row, x) for row, x, _ in items if x is not None]
    bad = [(row, err) for row, x, err in items if x is None]
    rows = [row for row, _ in ok]
    x = torch.stack([x for _, x in ok]) if ok else None
    return rows, x, bad


def _autocast_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def embed_images(
    teacher: SamConfigLike,
    teacher_weights: str | PathLike,
    images: str | PathLike,
    out: str | PathLike,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    workers: int = 2,
    amp: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Compute the teacher's image embeddings of every image of a folder into a store.

    Parameters
    ----------
    teacher : SamConfigLike
        Registry name (``"vit_h"``, ``"vit_t"``, ...), JSON config file, or
        :class:`~napari_mobilesam.build.SamConfig`.
    teacher_weights : path
        The teacher's checkpoint (official format).
    images : path
        Image folder (searched recursively, see
        :func:`~napari_mobilesam.distill.data.find_images`); SA-1B ``.json`` files
        beside the images are ignored here.
    out : path
        Store folder (:class:`~napari_mobilesam.distill.store.EmbeddingStore`). If it
        already holds a store, the run resumes: the teacher must be the same and the
        images it holds must still be in ``images``; images new to the folder (or
        beyond an earlier ``limit``) are added to it as new rows; rows already done
        are skipped, failed rows are retried.
    device : str or torch.device, optional
        None = CUDA when available, else CPU.
    batch_size : int
        Images per encoder call.
    workers : int
        ``DataLoader`` worker processes reading and preprocessing images (0 = in
        this process).
    amp : bool
        On CUDA, run the encoder under autocast (bfloat16 when supported, else
        float16); ignored on the CPU.
    limit : int, optional
        Only the first ``limit`` images (in sorted order).
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict
        ``total`` (images of this call, after ``limit``), ``computed`` (written by
        this call),
        ``skipped`` (already done before), ``failed`` (unreadable in this call),
        ``seconds`` (wall time of this call), ``store`` (path).

    Raises
    ------
    ValueError
        Bad ``batch_size`` / ``workers`` / ``limit``, or an unknown teacher.
    FileNotFoundError
        ``teacher_weights`` does not exist.
    DataError
        No images in ``images``, or ``out`` holds a store with images that
        ``images`` no longer has, or of another teacher.

    Notes
    -----
    The store's ``meta`` records ``teacher`` (name), ``teacher_config`` (the full
    :func:`~napari_mobilesam.distill.models.config_to_dict` description),
    ``teacher_weights`` (absolute path), ``teacher_sha256``, ``img_size``,
    ``pixel_mean``, ``pixel_std`` and ``images_root``. An unreadable image is
    recorded in the store (``failed()``) with a warning, and the run goes on.
    """
    from tqdm.auto import tqdm

    from ..weights import sha256_file

    start = time.perf_counter()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be a non-negative integer, got {workers!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    cfg = resolve_config(teacher)
    weights = Path(teacher_weights)
    if not weights.is_file():
        raise FileNotFoundError(f"teacher weights {str(weights)!r} do not exist")
    root = Path(images)
    paths = find_images(root)
    if limit is not None:
        paths = paths[:limit]
    rel = [p.relative_to(root).as_posix() for p in paths]
    out = Path(out)
    sha = sha256_file(weights)
    emb = cfg.image_embedding_size
    embed_shape = (cfg.encoder.out_chans, emb, emb)

    if (out / "index.json").exists():
        store = EmbeddingStore.open(out)
        _check_resume(store, root, sha, embed_shape, cfg.image_size)
        added = store.extend(rel)  # images new to the folder (or beyond an earlier --limit)
        if added:
            log.info("%d images are new to %s: rows %d-%d", added, out, len(store) - added,
                     len(store) - 1)  # fmt: skip
        row_of = {p: r for r, p in enumerate(store.images)}
        done = store.done()
        todo = [row_of[p] for p in rel if not done[row_of[p]]]
    else:
        store = None
        todo = list(range(len(rel)))
    skipped = len(rel) - len(todo)
    if store is not None and not todo:
        log.info("all %d images of %s are already embedded", len(rel), out)
        return _result(len(rel), 0, skipped, 0, start, out)

    dev = resolve_device(device)
    model = load_sam(cfg, weights, device=dev)
    if store is None:
        meta = {
            "teacher": spec_name(teacher),
            "teacher_config": config_to_dict(cfg),
            "teacher_weights": str(weights.resolve()),
            "teacher_sha256": sha,
            "img_size": int(model.img_size),
            "pixel_mean": [float(v) for v in model.pixel_mean.flatten().tolist()],
            "pixel_std": [float(v) for v in model.pixel_std.flatten().tolist()],
            "images_root": str(root.resolve()),
        }
        store = EmbeddingStore.create(out, rel, embed_shape, meta)
    encoder = model.image_encoder
    cuda = dev.type == "cuda"
    if cuda:
        encoder.to(memory_format=torch.channels_last)
    elif amp:
        log.info("amp is ignored on the CPU")
    use_amp = bool(amp and cuda)
    amp_dtype = _autocast_dtype(dev) if use_amp else None

    dataset = _ImageDataset(
        [root / p for p in store.images], todo, store.meta["img_size"], store.meta["pixel_mean"],
        store.meta["pixel_std"],
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=cuda,
    )
    computed = failed = 0
    bar = tqdm(total=len(todo), unit="img", desc="embedding", disable=not progress)
    try:
        with torch.inference_mode():
            for rows, x, bad in loader:
                for row, reason in bad:
                    store.mark_failed(row, reason)
                    warnings.warn(f"skipping unreadable image: {reason}", stacklevel=2)
                    failed += 1
                if rows:
                    x = x.to(dev, non_blocking=True)
                    if cuda:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                        y = encoder(x)
                    if tuple(y.shape[1:]) != store.embed_shape:
                        raise ValueError(
                            f"the teacher encoder returned embeddings of shape "
                            f"{tuple(y.shape[1:])}, the store expects {store.embed_shape}"
                        )
                    store.write(rows, y)
                    computed += len(rows)
                bar.update(len(rows) + len(bad))
    finally:
        bar.close()
    return _result(len(rel), computed, skipped, failed, start, out)


def _check_resume(
    store: EmbeddingStore, root: Path, sha: str, embed_shape: tuple, img_size: int
) -> None:
    """Raise DataError when an existing store holds images that ``root`` no longer has,
    or was made by another teacher. (Images new to ``root`` are added to it.)"""
    hint = "use a new --out folder (or the original image folder / teacher)"
    where = f"embedding store {os.fspath(store.path)!r}"
    gone = [p for p in store.images if not (root / p).is_file()]
    if gone:
        more = f" and {len(gone) - 1} more" if len(gone) > 1 else ""
        raise DataError(
            f"{where} holds embeddings of images that {os.fspath(root)!r} no longer has "
            f"({gone[0]!r}{more}); {hint}"
        )
    old = store.meta.get("teacher_sha256")
    if old != sha:
        raise DataError(
            f"{where} was made with teacher weights of sha256 {old!r} "
            f"({store.meta.get('teacher_weights')!r}), not {sha!r}; {hint}"
        )
    if store.embed_shape != tuple(embed_shape) or store.meta.get("img_size") != img_size:
        raise DataError(
            f"{where} holds {store.meta.get('img_size')} px -> {store.embed_shape} embeddings, "
            f"the teacher makes {img_size} px -> {tuple(embed_shape)}; {hint}"
        )


def _result(total: int, computed: int, skipped: int, failed: int, start: float, out) -> dict:
    return {
        "total": total,
        "computed": computed,
        "skipped": skipped,
        "failed": failed,
        "seconds": time.perf_counter() - start,
        "store": str(out),
    }
