"""The ``mobilesam-train`` loop: epochs of interactive steps, held-out scores, resume.

A run folder holds

- ``best.pt``: the weights that scored best on the held-out set so far, in the
  official checkpoint format (``load_model(model, "best.pt")``, the napari widgets
  and ``mobilesam-everything --weights`` take it as it is);
- ``last.pt``: the same format, after the last finished epoch;
- ``state.pt``: what resuming needs (weights, optimiser, position, random state);
- ``log.csv``: one row per step; ``val.csv``: one row per held-out evaluation;
- ``run.json``: the settings, the data, the scores of the best checkpoint.

Every file is written atomically; an interrupted run leaves the files of its last
finished epoch, and ``resume=True`` continues from there with the same settings.
The held-out score that picks ``best.pt`` is the mean of point mIoU, box mIoU and
segment-everything F1 (when measured).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path, to_json, write_json_atomic, write_text_atomic
from ..build import build_sam, resolve_device
from ..distill.data import preprocess
from ..distill.models import load_sam, resolve_config, save_student
from .auxiliary import DenseHead
from .config import TrainConfig
from .data import DataError, Example, find_pairs, split_pairs
from .decoder import InputFrame
from .evaluate import evaluate
from .sources import FolderSource, SyntheticSource, augment
from .step import image_embedding, interactive_loss

__all__ = ["LOG_FIELDS", "VAL_FIELDS", "train"]

LOG_FIELDS = (
    "step", "epoch", "loss", "mask", "iou", "aux", "miou_first", "miou", "objects", "lr", "seconds",
)  # fmt: skip
VAL_FIELDS = (
    "epoch", "step", "score", "point_miou", "point_oracle_miou", "random_point_miou",
    "box_miou", "precision", "recall", "f1", "ap50",
)  # fmt: skip


def lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine to ``min_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _sources(cfg: TrainConfig):
    if cfg.synthetic:
        train = SyntheticSource(cfg.synthetic, seed=cfg.seed)
        if cfg.val_data is not None:
            return train, FolderSource(find_pairs(cfg.val_data), cfg.seed).all()
        return train, train.held_out(cfg.val_images)
    pairs = find_pairs(cfg.data)
    if cfg.val_data is not None:
        held = find_pairs(cfg.val_data)
    else:
        pairs, held = split_pairs(pairs, cfg.val_fraction, cfg.seed)
    if not pairs:
        raise DataError(f"no training images left in {cfg.data} after the held-out split")
    return FolderSource(pairs, cfg.seed), FolderSource(held, cfg.seed).all() if held else []


def _trainable(model, mode: str) -> tuple[list, list]:
    """(encoder parameters, decoder parameters) to train; the rest is frozen."""
    enc = model.image_encoder
    for p in enc.parameters():
        p.requires_grad_(mode == "all")
    if mode == "last":
        parts = [getattr(enc, "neck", None)]
        layers = getattr(enc, "layers", None) or getattr(enc, "blocks", None)
        if layers is not None:
            parts.append(layers[-1])
        for part in parts:
            if part is not None:
                for p in part.parameters():
                    p.requires_grad_(True)
    for p in model.prompt_encoder.parameters():
        p.requires_grad_(True)
    for p in model.mask_decoder.parameters():
        p.requires_grad_(True)
    enc_params = [p for p in enc.parameters() if p.requires_grad]
    dec_params = [p for p in [*model.prompt_encoder.parameters(), *model.mask_decoder.parameters()]]
    return enc_params, dec_params


def _far_mix(progress: float, ramp: tuple[float, float]) -> float:
    """0 before ``ramp[0]`` of the run, 1 after ``ramp[1]``, linear between."""
    start, end = ramp
    if progress >= end:
        return 1.0
    if progress <= start:
        return 0.0
    return (progress - start) / (end - start)


def _set_modes(model, mode: str, fresh: bool) -> None:
    """Training mode for what trains; a frozen encoder runs in eval mode.

    Fine-tuning keeps pretrained BatchNorm statistics frozen (at batch size 1 they
    would become one image's, as detection models avoid). A fresh model must learn
    them: its BatchNorm layers normalise by batch statistics and update the running
    ones (frozen at their initial 0 / 1, the untrained activations blow up).
    """
    model.train()
    if mode == "none":
        model.image_encoder.eval()
    if not fresh:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def _groups(params: list, lr: float, weight_decay: float) -> list[dict]:
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay, "peak": lr},
        {"params": rest, "weight_decay": 0.0, "peak": lr},
    ]


def _csv(fields: tuple[str, ...], rows: list[dict]) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return out.getvalue()


def _read_csv(path: Path, until_step: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= until_step]


def _changed_settings(stored: str, cfg: TrainConfig) -> list[str] | None:
    """How ``cfg`` differs from a run's stored settings (JSON): ``"name: old -> new"``
    per setting (nested ones as ``step.objects``), empty when they are the same, None
    when the stored settings cannot be read. Settings added since the run was written
    count as what that version did."""
    try:
        old = TrainConfig.from_dict(json.loads(stored))
    except (ValueError, TypeError):
        return None
    a = json.loads(to_json(old.to_dict()))
    b = json.loads(to_json(cfg.to_dict()))
    return _differences(a, b, "")


def _differences(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def _score(res: dict) -> float:
    keys = [k for k in ("point_miou", "box_miou", "f1") if k in res and not math.isnan(res[k])]
    return float(np.mean([res[k] for k in keys])) if keys else float("nan")


def _train_config(cfg: TrainConfig):
    """The architecture, at ``cfg.input_size`` when given (same parameters)."""
    config = resolve_config(cfg.model)
    if cfg.input_size is None or cfg.input_size == config.image_size:
        return config
    return dataclasses.replace(
        config, encoder=dataclasses.replace(config.encoder, img_size=cfg.input_size)
    )


def _model(cfg: TrainConfig, device: torch.device):
    """The starting model: fresh (seeded) or with ``cfg.checkpoint`` loaded, unfused.

    At a smaller ``input_size`` the prompt encoder keeps the full input frame: each
    training input is placed in it (:class:`~napari_mobilesam.training.decoder.InputFrame`).
    """
    model = _starting_model(cfg, device)
    full = resolve_config(cfg.model).image_size
    if cfg.input_frame == "full" and model.img_size < full:
        model.prompt_encoder.input_image_size = (full, full)
    return model


def _starting_model(cfg: TrainConfig, device: torch.device):
    config = _train_config(cfg)
    if cfg.checkpoint is None:
        torch.manual_seed(cfg.seed)
        return build_sam(config).to(device)
    weights = Path(cfg.checkpoint)
    if not weights.exists() and isinstance(cfg.checkpoint, str) and not weights.suffix:
        from ..weights import fetch

        weights = fetch(cfg.checkpoint)  # a registry name: its (cached) official weights
    return load_sam(config, weights, device)


def _crop(ex, fraction: float, rng: np.random.Generator):
    """A random square-ish crop of ``fraction`` of the example's longer side."""
    if fraction >= 1:
        return ex
    h, w = ex.labels.shape
    side = max(16, round(max(h, w) * fraction))
    ch, cw = min(h, side), min(w, side)
    r, c = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    return Example(ex.name, ex.image[r : r + ch, c : c + cw], ex.labels[r : r + ch, c : c + cw])


def _eval_model(cfg: TrainConfig, model, device):
    """An inference copy of ``model`` for the held-out scores, with the fast inference
    modules (:func:`~napari_mobilesam.accel.optimize`), as ``load_model`` gives users."""
    from ..accel import optimize

    copy = build_sam(resolve_config(cfg.model))
    copy.load_state_dict(model.state_dict())
    copy.eval()
    optimize(copy)
    return copy.to(device)


def train(
    cfg: TrainConfig, *, resume: bool = False, progress: bool = True, stop_after: int | None = None
) -> dict:
    """Run (or resume) a training run; returns the summary written to ``run.json``.

    Parameters
    ----------
    cfg : TrainConfig
    resume : bool
        Continue the run in ``cfg.out`` after its last finished epoch.
    progress : bool
        A progress bar per epoch.
    stop_after : int, optional
        Stop after this many epochs of the ``cfg.epochs``-epoch schedule (the learning
        rate follows the whole schedule; the run can be resumed to its end). The
        held-out set is scored at the stop.

    Raises
    ------
    DataError
        Unusable training data (named file and problem).
    FileExistsError
        ``cfg.out`` holds a run and ``resume`` is False, or the settings of the run
        there differ from ``cfg``.
    ValueError
        ``stop_after`` below 1.
    """
    from ..engine.precision import resolve_precision

    if stop_after is not None and stop_after < 1:
        raise ValueError(f"--stop-after must be at least 1 epoch, got {stop_after}")
    out = Path(cfg.out)
    state_path = out / "state.pt"
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(
            f"{out} already holds files; use another --out, or --resume to continue its run"
        )
    device = resolve_device(None if cfg.device == "auto" else cfg.device)
    autocast = (
        resolve_precision(cfg.precision, device) == "bf16" if cfg.precision != "fp32" else False
    )
    source, held_out = _sources(cfg)
    if not held_out:
        import warnings

        warnings.warn(
            "no held-out images (one image pair, --val-fraction 0, or --val-images 0): "
            "nothing is scored, val.csv stays empty and best.pt is the last epoch's "
            "model; give --val FOLDER or more pairs to keep the best one",
            UserWarning,
            stacklevel=2,
        )
    model = _model(cfg, device)
    full_size = resolve_config(cfg.model).image_size
    enc_params, dec_params = _trainable(model, cfg.train_encoder)
    _set_modes(model, cfg.train_encoder, fresh=cfg.checkpoint is None)
    head = None
    if cfg.aux_weight:
        head = DenseHead(model.prompt_encoder.embed_dim).to(device)
        dec_params = dec_params + list(head.parameters())
    groups = _groups(dec_params, cfg.lr, cfg.weight_decay)
    if enc_params:
        groups += _groups(enc_params, cfg.encoder_lr or cfg.lr, cfg.weight_decay)
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    per_epoch = len(source)
    total = cfg.epochs * per_epoch
    start_epoch, step, best, rows, val_rows = 0, 0, -math.inf, [], []
    summary: dict = {}
    out.mkdir(parents=True, exist_ok=True)
    if resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        changed = _changed_settings(state["config"], cfg)
        if changed is None or changed:
            what = "unreadable settings" if changed is None else "other settings"
            detail = "" if not changed else f" ({'; '.join(changed)})"
            raise FileExistsError(
                f"{out} holds a run with {what}{detail}; resume it with its own settings "
                "(--resume with only --out), or use another --out to start a new run"
            )
        model.load_state_dict(state["model"])
        if head is not None:
            head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step, best = state["epoch"], state["step"], state["best"]
        if state.get("best_record"):
            summary["best"] = state["best_record"]
        rows = _read_csv(out / "log.csv", step)
        val_rows = _read_csv(out / "val.csv", step)
    write_json_atomic(out / "config.json", cfg.to_dict())
    emb_cache: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}
    end = cfg.epochs if stop_after is None else min(stop_after, cfg.epochs)
    for epoch in range(start_epoch, end):
        rng = np.random.default_rng([cfg.seed, epoch])
        loaders = source.epoch(epoch)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(loaders), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="image")
        for load in loaders:
            t0 = time.perf_counter()
            ex = load()
            percentiles = (0.5, 99.5)
            if cfg.augment and not cfg.caches_embeddings:
                ex, percentiles = augment(ex, rng)
            if not cfg.caches_embeddings:
                ex = _crop(ex, model.img_size / full_size, rng)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.warmup, g["peak"], cfg.min_lr_ratio)
            if cfg.caches_embeddings and ex.name in emb_cache:
                emb, isz = emb_cache[ex.name]
            else:
                x, isz = preprocess(ex.rgb(percentiles), model.img_size,
                                    model.pixel_mean.flatten().tolist(),
                                    model.pixel_std.flatten().tolist())  # fmt: skip
                with torch.set_grad_enabled(cfg.train_encoder != "none"):
                    emb = image_embedding(model, x[None].to(device), autocast)
                if cfg.caches_embeddings:
                    emb_cache[ex.name] = (emb.detach(), isz)
            mix = _far_mix(step / total, cfg.far_ramp)
            frame = None
            if model.img_size < full_size and cfg.input_frame == "full":  # anywhere in it
                frame = InputFrame.random(model, full_size, rng)
            res = interactive_loss(model, emb, isz, ex.labels, cfg.step, rng, mix, frame)
            if res is not None:
                loss, parts = res
                if head is not None:
                    aux = head.loss(emb, ex.labels, model.img_size, isz)
                    loss = loss + cfg.aux_weight * aux
                    parts["aux"] = float(aux.detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in opt.param_groups for p in g["params"]], cfg.grad_clip
                    )
                opt.step()
                rows.append(
                    {"step": step, "epoch": epoch, "loss": float(loss.detach()), **parts,
                     "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
                )  # fmt: skip
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{float(loss.detach()):.3f}",
                        miou=f"{parts['miou_first']:.2f}/{parts['miou']:.2f}",
                    )
            step += 1
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        last = epoch + 1 == end
        if held_out and ((epoch + 1) % cfg.eval_every == 0 or last):
            res = evaluate(
                _eval_model(cfg, model, device),
                (load() for load in held_out),
                points_per_side=cfg.eval_points_per_side or None,
                seed=cfg.seed,
            )
            score = _score(res)
            val_rows.append({"epoch": epoch, "step": step, "score": score, **res})
            if score > best or not math.isfinite(best):
                best = score
                save_student(model, out / "best.pt")
                summary["best"] = {"epoch": epoch, "step": step, **res}
        elif not held_out:
            save_student(model, out / "best.pt")
        save_student(model, out / "last.pt")
        write_text_atomic(out / "log.csv", _csv(LOG_FIELDS, rows))
        write_text_atomic(out / "val.csv", _csv(VAL_FIELDS, val_rows))
        with atomic_path(state_path) as tmp:
            torch.save(
                {"config": to_json(cfg.to_dict()), "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "epoch": epoch + 1, "step": step, "best": best,
                 "head": None if head is None else head.state_dict(),
                 "best_record": summary.get("best")},
                tmp,
            )  # fmt: skip
    summary.update(config=cfg.to_dict(), steps=step, epochs=cfg.epochs)
    if val_rows:
        summary["held_out"] = val_rows
    write_json_atomic(out / "run.json", summary)
    return summary
