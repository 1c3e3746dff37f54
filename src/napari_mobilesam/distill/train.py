"""Decoupled distillation: train a student image encoder on stored teacher embeddings.

The student is the student's image encoder plus the teacher's prompt encoder and mask
decoder (frozen, :func:`~napari_mobilesam.distill.models.load_teacher_parts`); only
the encoder is trained, with a plain MSE loss between its (C, h, w) output and the
teacher's embedding of the same image read from an
:class:`~napari_mobilesam.distill.store.EmbeddingStore`.

Run folder (``TrainConfig.out``)::

    RUN/
      run.json        provenance: config, store, teacher, sizes, versions, start time
      log.csv         one row per optimizer step: step,epoch,loss,lr,images_per_s,
                      elapsed_s (or log.jsonl with the same fields)
      student.pt      the complete student in the official checkpoint format
      checkpoint.pt   everything needed to resume (see :func:`train`)

Multi-GPU: launch with ``torchrun --nproc_per_node N -m napari_mobilesam.distill.cli
train ...``; each process trains on its shard of every epoch (DistributedDataParallel).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_path
from .data import DataError
from .models import (
    config_from_dict,
    config_to_dict,
    load_teacher_parts,
    resolve_config,
    save_student,
    spec_name,
)
from .store import EmbeddingStore
from .train_config import (  # noqa: F401 (public names of this module)
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LOG_FIELDS,
    NO_DECAY_NAMES,
    TrainConfig,
    _default_warmup,
    lr_at,
    param_groups,
)
from .train_parts import (
    _atomic_write_text,
    _Dist,
    _DistillDataset,
    _epoch_indices,
    _IndexSampler,
    _Log,
    _rng_state,
    _set_rng_state,
    load_encoder_weights,
)

__all__ = ["TrainConfig", "load_encoder_weights", "lr_at", "param_groups", "train"]

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train ``cfg.student``'s image encoder to reproduce the stored teacher embeddings.

    Loss: mean squared error over all elements between the student's embedding
    (float32) and the teacher's (stored float16, read as float32). Only the image
    encoder is trained (AdamW, see :func:`param_groups`); the prompt encoder and mask
    decoder are the teacher's, frozen.

    Schedule (per optimizer step, see :func:`lr_at`): linear warmup from 0 to
    ``cfg.lr`` over ``warmup_steps`` steps, then a cosine decay to
    ``cfg.lr * cfg.min_lr_ratio`` at the last step. Total steps =
    ``epochs * steps_per_epoch``, or ``max_steps`` if smaller, where
    ``steps_per_epoch = ceil(ceil(n_images / world_size) / batch_size)``. A resumed
    run recomputes the schedule for its own ``epochs`` / ``max_steps`` and continues
    at the saved step.

    Data order: epoch ``e`` visits the usable images in a permutation seeded with
    ``seed + e``, split over the processes like ``DistributedSampler`` (padded by
    repetition so that every process gets the same count), in batches of
    ``batch_size`` per process (the last, partial batch kept).

    Checkpoints: at each epoch end, every ``save_every`` steps, and when stopping
    at ``max_steps``, ``out/student.pt`` (official format, loads with
    ``napari_mobilesam.build.load_model``) and ``out/checkpoint.pt`` (encoder,
    optimizer, schedule position, GradScaler, epoch / step / batches done in the
    epoch, RNG states, config) are written atomically, so an interrupted run (Ctrl-C,
    crash) keeps its last complete checkpoint. ``resume=True`` continues exactly
    where it was saved, within an epoch too; log rows after the checkpoint are
    dropped first.

    Parameters
    ----------
    cfg : TrainConfig
    progress : bool
        Show a progress bar per epoch (on rank 0).

    Returns
    -------
    dict
        ``steps`` (optimizer steps done in total), ``epochs`` (epochs completed),
        ``final_loss`` (last logged loss), ``images_per_s`` (this call's average,
        all processes), ``student`` and ``log`` (paths).

    Raises
    ------
    TypeError
        ``cfg`` is not a TrainConfig.
    DataError
        The store holds no finished embedding, an image is missing, or the teacher
        weights are not those the store was made with.
    ValueError
        The student's embedding shape or input size differs from the store's;
        ``out`` has a checkpoint but ``resume`` is False, or ``resume`` without a
        checkpoint, or a checkpoint of a different run setup.
    FileNotFoundError
        Missing teacher weights or ``init`` checkpoint.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    env = _Dist.setup(cfg.device)
    try:
        return _train(cfg, progress, env)
    finally:
        env.close()


def _train(cfg: TrainConfig, progress: bool, env: _Dist) -> dict:
    from tqdm.auto import tqdm

    from .. import __version__
    from ..weights import sha256_file

    store = EmbeddingStore.open(cfg.embeddings)
    meta = store.meta
    s_cfg = resolve_config(cfg.student)
    emb = s_cfg.image_embedding_size
    student_shape = (s_cfg.encoder.out_chans, emb, emb)
    if student_shape != store.embed_shape or s_cfg.image_size != meta.get("img_size"):
        raise ValueError(
            f"student {spec_name(cfg.student)!r} maps {s_cfg.image_size} px inputs to "
            f"{student_shape} embeddings, the store {os.fspath(cfg.embeddings)!r} holds "
            f"{meta.get('img_size')} px -> {store.embed_shape} teacher embeddings"
        )

    # teacher weights: the ones the store was made with
    weights = cfg.teacher_weights
    if weights is None:
        if not meta.get("teacher_weights"):
            raise ValueError(
                f"the store {os.fspath(cfg.embeddings)!r} does not name its teacher weights; "
                "pass teacher_weights (--teacher-weights)"
            )
        weights = Path(meta["teacher_weights"])
    if not weights.is_file():
        raise FileNotFoundError(
            f"teacher weights {os.fspath(weights)!r} do not exist; pass the teacher checkpoint "
            "the store was made with as teacher_weights (--teacher-weights)"
        )
    sha = sha256_file(weights)
    if meta.get("teacher_sha256") and sha != meta["teacher_sha256"]:
        raise DataError(
            f"teacher weights {os.fspath(weights)!r} (sha256 {sha[:16]}...) are not the ones "
            f"the store {os.fspath(cfg.embeddings)!r} was made with (sha256 "
            f"{meta['teacher_sha256'][:16]}..., {meta.get('teacher_weights')!r})"
        )

    # usable rows and their images
    done = store.done()
    rows = [int(r) for r in done.nonzero()[0]]
    if len(rows) < len(store):
        log.warning(
            "%d of %d images have no embedding in %s and are skipped",
            len(store) - len(rows), len(store), cfg.embeddings,
        )  # fmt: skip
    if not rows:
        raise DataError(f"the embedding store {os.fspath(cfg.embeddings)!r} holds no embedding")
    root = cfg.images
    if not root.is_dir():
        raise DataError(f"image folder {os.fspath(root)!r} does not exist or is not a folder")
    missing = [store.images[r] for r in rows if not (root / store.images[r]).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(
            f"image {os.fspath(root / missing[0])!r}{more} of the store is missing from "
            f"{os.fspath(root)!r}"
        )
    rows_digest = hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()

    # run folder
    out = cfg.out
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume and not ckpt_path.is_file():
        raise ValueError(
            f"nothing to resume: {os.fspath(ckpt_path)!r} does not exist (run without resume)"
        )
    if not cfg.resume and ckpt_path.exists():
        raise ValueError(
            f"{os.fspath(out)!r} already holds a training run (checkpoint.pt); "
            "use --resume or a new --out"
        )
    student_config = config_to_dict(s_cfg)
    ckpt = None
    if cfg.resume:
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated / not a torch file / foreign objects
            from ..build import load_error_detail  # (torch's weights_only advice left out)

            raise ValueError(
                f"cannot read the training checkpoint {os.fspath(ckpt_path)!r}: "
                f"{load_error_detail(exc)}"
            ) from None
        _check_checkpoint(ckpt, ckpt_path, student_config, cfg, env.world, rows_digest)

    # model
    teacher_spec = (
        config_from_dict(meta["teacher_config"], source=f"store {os.fspath(cfg.embeddings)!r}")
        if isinstance(meta.get("teacher_config"), dict)
        else meta["teacher"]
    )
    model = load_teacher_parts(cfg.student, teacher_spec, weights, seed=cfg.seed)
    encoder = model.image_encoder
    if cfg.init is not None and ckpt is None:
        load_encoder_weights(encoder, cfg.init)
    if ckpt is not None:
        encoder.load_state_dict(ckpt["encoder"])
    dev = env.device
    cuda = dev.type == "cuda"
    encoder.to(dev).train()
    if cuda:
        encoder.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    elif cfg.amp:
        log.info("amp is ignored on the CPU")
    use_amp = bool(cfg.amp and cuda)
    amp_dtype = None
    if use_amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(dev.type, enabled=use_amp and amp_dtype == torch.float16)

    # schedule
    per_rank = math.ceil(len(rows) / env.world)
    steps_per_epoch = math.ceil(per_rank / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else _default_warmup(total)

    optimizer = torch.optim.AdamW(
        param_groups(encoder, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas
    )
    step, epoch, batch0, elapsed0 = 0, 0, 0, 0.0
    last_loss = float("nan")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0), strict=True):
            group["weight_decay"], group["betas"] = decay, cfg.betas  # this run's settings
        if ckpt["scaler"]:  # empty when the scaler was disabled
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        epoch, batch0 = int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
        elapsed0 = float(ckpt["elapsed_s"])
        last_loss = float(ckpt["last_loss"])
        _set_rng_state(ckpt["rng"], cuda)

    rank0 = env.rank == 0
    log_path = out / ("log.csv" if cfg.log_format == "csv" else "log.jsonl")
    student_path = out / "student.pt"
    run_log = None
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        _write_run_json(out, cfg, store, sha, len(rows), env, __version__, resumed=ckpt is not None)
        run_log = _Log(log_path, cfg.log_format, keep_until=step if ckpt is not None else None)

    def save(pos_epoch: int, pos_batch: int) -> None:
        if not rank0:
            return
        save_student(model, student_path)
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "encoder": {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": {"step": step, "total_steps": total, "warmup_steps": warmup},
            "scaler": scaler.state_dict(),
            "epoch": pos_epoch,
            "batch_in_epoch": pos_batch,
            "step": step,
            "elapsed_s": elapsed0 + (time.perf_counter() - t_start),
            "last_loss": last_loss,
            "rng": _rng_state(cuda),
            "config": cfg.to_dict(),
            "student_config": student_config,
            "world_size": env.world,
            "rows": len(rows),
            "rows_sha256": rows_digest,
            "teacher_sha256": sha,
        }
        with atomic_path(ckpt_path) as tmp:
            torch.save(state, tmp)

    net = encoder
    if env.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(encoder, device_ids=[dev.index] if cuda else None)

    sampler = _IndexSampler()
    loader = torch.utils.data.DataLoader(
        _DistillDataset(store, rows, root),
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=cuda,
        persistent_workers=cfg.workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]

    t_start = time.perf_counter()
    images_run = 0
    try:
        while epoch < cfg.epochs and step < total:
            indices = _epoch_indices(len(rows), epoch, cfg.seed, env.world, env.rank)
            sampler.indices = indices[batch0 * cfg.batch_size :]
            bar = tqdm(
                total=steps_per_epoch,
                initial=batch0,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                unit="step",
                disable=not (progress and rank0),
            )
            batch = batch0
            t_prev = time.perf_counter()
            try:
                for x, y in loader:
                    x = x.to(dev, non_blocking=True)
                    y = y.to(dev, non_blocking=True)
                    if cuda:
                        x = x.contiguous(memory_format=torch.channels_last)
                    lr = lr_at(step, total, warmup, cfg.lr, cfg.min_lr_ratio)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                        pred = net(x)
                    loss = F.mse_loss(pred.float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg.grad_clip is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    last_loss = float(env.mean(loss.detach()).item())
                    step += 1
                    batch += 1
                    n_img = x.shape[0] * env.world
                    images_run += n_img
                    now = time.perf_counter()
                    rate = n_img / max(now - t_prev, 1e-9)
                    t_prev = now
                    if run_log is not None:
                        run_log.write(
                            {
                                "step": step,
                                "epoch": epoch + 1,
                                "loss": repr(last_loss),
                                "lr": repr(lr),
                                "images_per_s": f"{rate:.2f}",
                                "elapsed_s": f"{elapsed0 + now - t_start:.3f}",
                            }
                        )
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4g}", img_s=f"{rate:.1f}")
                    epoch_end = batch == steps_per_epoch
                    if epoch_end:
                        save(epoch + 1, 0)
                    elif step >= total or (cfg.save_every and step % cfg.save_every == 0):
                        save(epoch, batch)
                    if step >= total:
                        break
            finally:
                bar.close()
            if batch == steps_per_epoch:
                epoch, batch0 = epoch + 1, 0
            else:
                batch0 = batch
    finally:
        if run_log is not None:
            run_log.close()
    seconds = time.perf_counter() - t_start
    if env.world > 1:  # every process returns once rank 0 has written its files
        import torch.distributed as dist

        dist.barrier()
    return {
        "steps": step,
        "epochs": epoch,
        "final_loss": last_loss,
        "images_per_s": images_run / seconds if images_run else 0.0,
        "student": str(student_path),
        "log": str(log_path),
    }


def _check_checkpoint(
    ckpt, path: Path, student_config: dict, cfg: TrainConfig, world: int, rows_digest: str
) -> None:
    """Raise ValueError when ``ckpt`` cannot continue the run ``cfg`` describes."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a mobilesam-distill training checkpoint")
    old = ckpt["config"]
    diffs = []
    if ckpt["student_config"] != student_config:
        diffs.append("the student architecture")
    for name in ("batch_size", "seed"):
        if old[name] != getattr(cfg, name):
            diffs.append(f"{name} ({old[name]} then, {getattr(cfg, name)} now)")
    if ckpt["world_size"] != world:
        diffs.append(f"the number of processes ({ckpt['world_size']} then, {world} now)")
    if ckpt["rows_sha256"] != rows_digest:
        diffs.append(f"the finished embeddings of the store ({ckpt['rows']} images then)")
    if diffs:
        raise ValueError(
            f"cannot resume from {os.fspath(path)!r}: it was trained with different "
            f"{'; '.join(diffs)}. Resume with the same settings, or use a new --out"
        )


def _write_run_json(
    out: Path, cfg, store: EmbeddingStore, sha: str, n_rows: int, env: _Dist, version: str,
    resumed: bool,
) -> None:  # fmt: skip
    path = out / "run.json"
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    previous = {}
    if resumed and path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
    info = {
        "config": cfg.to_dict(),
        "store": str(Path(cfg.embeddings).resolve()),
        "teacher": store.meta.get("teacher"),
        "teacher_sha256": sha,
        "images": len(store),
        "images_used": n_rows,
        "world_size": env.world,
        "device": str(env.device),
        "torch": torch.__version__,
        "napari_mobilesam": version,
        "start_time": previous.get("start_time", now),
        "resumed_at": [*previous.get("resumed_at", []), now] if resumed else [],
    }
    _atomic_write_text(path, json.dumps(info, indent=1) + "\n")
