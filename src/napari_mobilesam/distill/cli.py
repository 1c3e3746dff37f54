"""The ``mobilesam-distill`` command line: decoupled distillation, end to end.

Subcommands::

    mobilesam-distill embed     --teacher vit_h --images DIR --out EMBDIR
    mobilesam-distill train     --embeddings EMBDIR --images DIR --student vit_t --out RUN
    mobilesam-distill evaluate  --student RUN/student.pt --teacher vit_h --images DIR
    mobilesam-distill finetune-decoder --checkpoint RUN/student.pt --images DIR --out RUN2

Multi-GPU training: ``torchrun --nproc_per_node 4 -m napari_mobilesam.distill train ...``.

Models are registry names (``vit_t``, ``vit_b``, ``vit_l``, ``vit_h``) or JSON config
files (see :mod:`napari_mobilesam.distill.models`). Without ``--teacher-weights`` a
registry teacher's official weights are downloaded into the cache on first use.

Errors are one message on stderr and exit status 1 (2 for bad usage, 130 on Ctrl-C).
Torch is imported by the handlers, not at import time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..atomic import write_text_atomic
from ..cli import CommandError, run_command

PROG = "mobilesam-distill"


def _teacher_weights(teacher: str, weights: Path | None, flag: str = "--teacher-weights") -> Path:
    """The given weights file, or the registry download for a registry name."""
    if weights is not None:
        if not weights.is_file():
            raise CommandError(f"{flag} {weights}: no such file", status=2)
        return weights
    from ..build import model_names

    if teacher not in model_names():
        raise CommandError(f"{flag} is needed for the model {teacher!r}", status=2)
    from ..weights import fetch

    return fetch(teacher)


def _existing_dir(value: Path, flag: str) -> Path:
    if not value.is_dir():
        raise CommandError(f"{flag} {value}: no such folder", status=2)
    return value


def _embed(args: argparse.Namespace) -> int:
    _existing_dir(args.images, "--images")
    weights = _teacher_weights(args.teacher, args.teacher_weights)
    from .embed import embed_images

    summary = embed_images(
        args.teacher,
        weights,
        args.images,
        args.out,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        amp=args.amp,
        limit=args.limit,
        progress=not args.quiet,
    )
    print(
        f"{summary['computed']} embedded, {summary['skipped']} already done, "
        f"{summary['failed']} failed, of {summary['total']} images -> {summary['store']}"
    )
    return 1 if summary["failed"] else 0


def _train(args: argparse.Namespace) -> int:
    _existing_dir(args.embeddings, "--embeddings")
    _existing_dir(args.images, "--images")
    if args.teacher_weights is not None and not args.teacher_weights.is_file():
        raise CommandError(f"--teacher-weights {args.teacher_weights}: no such file", status=2)
    from .train import TrainConfig, train

    cfg = TrainConfig(
        embeddings=args.embeddings,
        images=args.images,
        out=args.out,
        student=args.student,
        teacher_weights=args.teacher_weights,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio,
        grad_clip=args.grad_clip if args.grad_clip > 0 else None,
        amp=args.amp,
        resume=args.resume,
        workers=args.workers,
        seed=args.seed,
        device=args.device,
        init=args.init,
        max_steps=args.max_steps,
        save_every=args.save_every,
        log_format=args.log_format,
    )
    summary = train(cfg, progress=not args.quiet)
    print(
        f"{summary['steps']} steps, {summary['epochs']} epochs, final loss "
        f"{summary['final_loss']:.6g}, {summary['images_per_s']:.2f} images/s -> "
        f"{summary['student']}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if not args.student.is_file():
        raise CommandError(f"--student {args.student}: no such file", status=2)
    _existing_dir(args.images, "--images")
    weights = _teacher_weights(args.teacher, args.teacher_weights)
    from .evaluate import evaluate, format_report

    result = evaluate(
        args.student,
        args.teacher,
        weights,
        args.images,
        student_model=args.student_model,
        prompts=args.prompts,
        n=args.n,
        seed=args.seed,
        device=args.device,
        embeddings=args.embeddings,
        limit=args.limit,
        progress=not args.quiet,
    )
    print(format_report(result))
    if args.json is not None:
        _write_json(args.json, result)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    if not args.checkpoint.is_file():
        raise CommandError(f"--checkpoint {args.checkpoint}: no such file", status=2)
    _existing_dir(args.images, "--images")
    from .finetune import finetune_decoder

    summary = finetune_decoder(
        args.checkpoint,
        args.images,
        args.out,
        model=args.model,
        epochs=args.epochs,
        lr=args.lr,
        masks_per_image=args.masks_per_image,
        seed=args.seed,
        device=args.device,
        limit=args.limit,
        progress=not args.quiet,
    )
    print(
        f"{summary['steps']} steps, loss {summary['first_loss']:.4g} -> "
        f"{summary['final_loss']:.4g} -> {summary['checkpoint']}"
    )
    return 0


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... [cuda when available]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mobilesam-distill`` (one subparser per command)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Decoupled distillation of a SAM image encoder (MobileSAM).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("embed", help="compute and store teacher embeddings of every image")
    p.add_argument("--teacher", default="vit_h", help="registry name or JSON config [vit_h]")
    p.add_argument("--teacher-weights", type=Path, help="[the registry's official weights]")
    p.add_argument("--images", type=Path, required=True, help="image folder (SA-1B layout)")
    p.add_argument("--out", type=Path, required=True, help="embedding store (resumable)")
    p.add_argument("--batch-size", type=int, default=1, help="images per batch [1]")
    p.add_argument("--workers", type=int, default=2, help="image loading processes [2]")
    p.add_argument("--amp", action="store_true", help="fp16/bf16 autocast on CUDA")
    p.add_argument("--limit", type=int, help="only the first N images (sorted)")
    _common(p)
    p.set_defaults(func=_embed)

    p = sub.add_parser("train", help="train a student encoder on stored teacher embeddings")
    p.add_argument("--embeddings", type=Path, required=True, help="store written by embed")
    p.add_argument("--images", type=Path, required=True, help="the images the store was made from")
    p.add_argument("--student", default="vit_t", help="registry name or JSON config [vit_t]")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--teacher-weights", type=Path, help="[the file recorded in the store]")
    p.add_argument("--epochs", type=int, default=8, help="[8]")
    p.add_argument("--batch-size", type=int, default=8, help="per process [8]")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate [1e-3]")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW [0.05]")
    p.add_argument("--warmup-steps", type=int, help="[min(500, 5%% of the steps)]")
    p.add_argument("--min-lr-ratio", type=float, default=0.01, help="cosine floor [0.01]")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm, 0 = off [1]")
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    p.add_argument("--resume", action="store_true", help="continue RUN from its checkpoint")
    p.add_argument("--workers", type=int, default=2, help="data loading processes [2]")
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument("--init", type=Path, help="initialise the student encoder from a checkpoint")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    p.add_argument("--save-every", type=int, help="also checkpoint every N steps")
    p.add_argument("--log-format", choices=("csv", "jsonl"), default="csv", help="[csv]")
    _common(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="mIoU of student vs teacher masks on random prompts")
    p.add_argument("--student", type=Path, required=True, help="student checkpoint")
    p.add_argument("--student-model", default="vit_t", help="its architecture [vit_t]")
    p.add_argument("--teacher", default="vit_h", help="registry name or JSON config [vit_h]")
    p.add_argument("--teacher-weights", type=Path, help="[the registry's official weights]")
    p.add_argument("--images", type=Path, required=True, help="image folder")
    p.add_argument("--prompts", choices=("points", "boxes", "both"), default="both")
    p.add_argument("--n", type=int, default=50, help="prompts of each kind per image [50]")
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument("--embeddings", type=Path, help="use the teacher embeddings of this store")
    p.add_argument("--limit", type=int, help="only the first N images (sorted)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    _common(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "finetune-decoder", help="fine-tune the mask decoder on annotated masks (focal + dice)"
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="complete checkpoint")
    p.add_argument("--model", default="vit_t", help="its architecture [vit_t]")
    p.add_argument("--images", type=Path, required=True, help="images with SA-1B *.json masks")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--epochs", type=int, default=1, help="[1]")
    p.add_argument("--lr", type=float, default=1e-4, help="[1e-4]")
    p.add_argument("--masks-per-image", type=int, default=16, help="[16]")
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument("--limit", type=int, help="only the first N images (sorted)")
    _common(p)
    p.set_defaults(func=_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mobilesam-distill``; returns the exit status (0, 1 failure, 2 usage, 130)."""

    def failures():
        from ..build import CheckpointError
        from ..weights import WeightsError
        from .data import DataError

        return (DataError, CheckpointError, WeightsError, FileNotFoundError, ValueError)

    return run_command(build_parser(), argv, PROG, failures,
                       "interrupted (completed work is kept; rerun to resume)")  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
