"""``mobilesam-train``: train SAM-style models on images with instance labels.

Examples::

    # fine-tune MobileSAM's decoder on your annotations (img.tif + img_labels.tif)
    mobilesam-train annotated/ --out runs/mine
    # also train the encoder's last stage, 20 epochs, on a GPU
    mobilesam-train annotated/ --out runs/mine --train-encoder last --epochs 20 --device cuda
    # continue an interrupted run with its stored settings (runs/mine/config.json)
    mobilesam-train --out runs/mine --resume

Errors are one message on stderr and exit status 1 (2 for bad usage, 130 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..cli import CommandError, run_command
from .config import ENCODER_MODES

PROG = "mobilesam-train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Train the mask decoder (and optionally the image encoder) of a SAM-style model "
            "on images with instance label images, with SAM's interactive recipe: a point or "
            "box per object, then corrective clicks; focal + dice + IoU-head loss. The "
            "best checkpoint on a held-out split is kept in the official format."
        ),
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "data", type=Path, nargs="?",
        help="folder of img.tif + img_labels.tif pairs, images/ + labels/ folders, or SA-1B "
        "img.jpg + img.json",
    )  # fmt: skip
    p.add_argument("-o", "--out", type=Path, required=True, help="run folder (created)")
    p.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out (given alone: with the settings stored in the run)",
    )  # fmt: skip
    p.add_argument("--val", type=Path, help="held-out folder (default: --val-fraction of data)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument(
        "--synthetic", type=int, default=0, metavar="N",
        help="train on N fresh synthetic cell images per epoch (napari_mobilesam.synthetic) "
        "instead of a folder",
    )  # fmt: skip
    p.add_argument("--val-images", type=int, default=8, help="held-out synthetic images")
    p.add_argument(
        "--model", default="vit_t", help="architecture: a registry name or a JSON config file"
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--checkpoint", default=None,
        help="starting weights: a file or a registry name (default: the official weights of "
        "--model)",
    )  # fmt: skip
    start.add_argument(
        "--from-scratch", action="store_true", help="start from a fresh initialisation"
    )
    p.add_argument(
        "--train-encoder", choices=ENCODER_MODES, default="none",
        help="none: decoder only, embeddings cached (fastest); last: also the encoder's last "
        "stage and neck; all: the whole encoder",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--stop-after", type=int, metavar="EPOCHS",
                   help="stop after this many epochs of the schedule (resumable)")  # fmt: skip
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--encoder-lr", type=float)
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    p.add_argument("--objects", type=int, default=12, help="objects prompted per image")
    p.add_argument("--rounds", type=int, default=2, help="1 + corrective clicks per object")
    p.add_argument("--background", type=int, default=2, help="'no object' points per image")
    p.add_argument("--box-fraction", type=float, default=0.5)
    p.add_argument("--focal-weight", type=float, default=1.0)
    p.add_argument(
        "--iou-weight", type=float, default=1.0,
        help="weight of the IoU head's loss against the mask losses (e.g. 8 for a model whose "
        "segment-everything scores cannot tell good masks from mediocre ones; default 1)",
    )  # fmt: skip
    p.add_argument(
        "--neighbour-weight", type=float, default=1.0,
        help="how many times the pixels of other labelled objects count in an object's focal "
        "loss (e.g. 4 for a model that merges touching cells; default 1)",
    )  # fmt: skip
    p.add_argument(
        "--loss-upsample", type=int, default=4, metavar="N",
        help="compute the mask losses on the decoder's logits upsampled N times (as "
        "inference upsamples them) against the labels at that resolution: 4 (default) = the "
        "model's full input, so boundaries are learnt where they are, not at the nearest "
        "low-res pixel edge; 1 = at the decoder's resolution, as SAM's recipe",
    )  # fmt: skip
    p.add_argument(
        "--far-ramp", type=float, nargs=2, default=(0.0, 0.0), metavar=("START", "END"),
        help="fractions of the run between which the focal loss goes from balanced around "
        "each object to full-mask (e.g. 0.5 0.8 for a fresh decoder; default: full-mask)",
    )  # fmt: skip
    p.add_argument(
        "--aux-weight", type=float, default=0.0,
        help="weight of a dense foreground/boundary loss on the encoder (for encoders trained "
        "from scratch; 0: off)",
    )  # fmt: skip
    p.add_argument("--no-augment", action="store_true", help="no flips, rotations, contrast")
    p.add_argument(
        "--eval-points-per-side", type=int, default=32,
        help="segment-everything grid of the held-out scores (0: skip)",
    )  # fmt: skip
    p.add_argument("--eval-every", type=int, default=1, help="epochs between held-out scores")
    p.add_argument(
        "--input-size", type=int,
        help="train at this model input size (e.g. 512 for a 1024 model, ~4x cheaper), on "
        "crops that keep objects at their full-size scale",
    )  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)
    return p


def _train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .loop import train
    from .step import StepConfig

    stored = args.out / "config.json"
    if args.resume and args.data is None and args.synthetic == 0 and stored.is_file():
        cfg = _stored_config(stored, args)
        summary = train(cfg, resume=True, progress=not args.quiet, stop_after=args.stop_after)
        return _report(summary, args.out)
    if args.resume and args.data is None and args.synthetic == 0:
        raise CommandError(
            f"--resume: {args.out} holds no run to resume (no config.json); start one with "
            "a data folder or --synthetic N",
            status=2,
        )
    if (args.data is None) == (args.synthetic == 0):
        raise CommandError("give a data folder or --synthetic N (not both)", status=2)
    if args.data is not None and not args.data.is_dir():
        raise CommandError(f"data folder {args.data}: no such folder", status=2)
    checkpoint = None if args.from_scratch else (args.checkpoint or args.model)
    if checkpoint is not None and Path(checkpoint).suffix and not Path(checkpoint).is_file():
        raise CommandError(f"--checkpoint {checkpoint}: no such file", status=2)
    cfg = TrainConfig(
        out=args.out,
        data=args.data,
        synthetic=args.synthetic,
        val_data=args.val,
        val_fraction=args.val_fraction,
        val_images=args.val_images,
        model=args.model,
        checkpoint=checkpoint,
        train_encoder=args.train_encoder,
        epochs=args.epochs,
        lr=args.lr,
        encoder_lr=args.encoder_lr,
        warmup=args.warmup,
        step=StepConfig(
            objects=args.objects,
            rounds=args.rounds,
            background=args.background,
            box_fraction=args.box_fraction,
            focal_weight=args.focal_weight,
            iou_weight=args.iou_weight,
            neighbour_weight=args.neighbour_weight,
            loss_upsample=args.loss_upsample,
        ),
        far_ramp=tuple(args.far_ramp),
        aux_weight=args.aux_weight,
        augment=not args.no_augment,
        eval_points_per_side=args.eval_points_per_side,
        eval_every=args.eval_every,
        device=args.device,
        input_size=args.input_size,
        precision=args.precision,
        seed=args.seed,
    )
    summary = train(cfg, resume=args.resume, progress=not args.quiet, stop_after=args.stop_after)
    return _report(summary, args.out)


def _stored_config(path: Path, args: argparse.Namespace):
    """The settings of the run being resumed, with its folder as ``out``."""
    import dataclasses
    import json

    from .config import TrainConfig

    try:
        data = json.loads(path.read_text())
        return dataclasses.replace(TrainConfig.from_dict(data), out=args.out)
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        raise CommandError(f"{path}: cannot read the run's settings ({exc})") from None


def _report(summary: dict, out: Path) -> int:
    best = summary.get("best")
    if best:
        scores = ", ".join(
            f"{k} {best[k]:.3f}" for k in ("point_miou", "box_miou", "f1") if k in best
        )
        print(f"best checkpoint (epoch {best['epoch'] + 1}): {scores} -> {out / 'best.pt'}")
    else:
        print(f"trained {summary['steps']} steps -> {out / 'best.pt'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mobilesam-train``; returns the exit status (0, 1 failure, 2 usage, 130)."""

    def failures():
        from ..build import CheckpointError
        from ..weights import WeightsError
        from .data import DataError

        return (DataError, CheckpointError, WeightsError, FileExistsError, ValueError)

    return run_command(build_parser(), argv, PROG, failures,
                       "interrupted (finished epochs are kept; rerun with --resume)")  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
