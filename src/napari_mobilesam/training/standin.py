"""The recipe of ``vit_t_synthetic_cells``, the project's trained stand-in model.

The official MobileSAM weights cannot be used everywhere (machines without internet,
tests, demonstrations), and random weights segment nothing. The stand-in model is a
MobileSAM (TinyViT encoder, SAM's prompt encoder and mask decoder) trained from a
fresh initialisation, by this project's ``mobilesam-train``, on images of
:mod:`napari_mobilesam.synthetic` only. It is a demonstration and test model for
synthetic fluorescent cells, not a general segmentation model.

One seeded command makes it (about 2.5 hours on 2 CPU cores; a GPU with
``--device cuda`` takes minutes)::

    python -m napari_mobilesam.training.standin runs/standin \
        --export weights/vit_t_synthetic_cells.pt

It runs two ``mobilesam-train`` phases on fresh synthetic images every epoch:

1. :data:`PHASE1`: every part trained at a 512 px model input (4x cheaper per step;
   crops keep cells at their full-size scale), with the dense auxiliary loss on the
   encoder and the focal loss moving from balanced-around-the-object to full-mask
   between 50% and 80% of the run;
2. :data:`PHASE2`: from phase 1's best checkpoint, every part at the full 1024 px
   input, full-mask focal loss, a lower learning rate;

and with ``--export`` writes phase 2's best checkpoint in float16 (half the size, the
same masks to rounding) and prints its sha256 and size for ``weights/registry.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..atomic import atomic_path
from .config import TrainConfig
from .step import StepConfig

__all__ = ["PHASE1", "PHASE2", "export_half", "make_standin"]

#: Phase 1: fresh model, 512 px input, ~3000 steps.
PHASE1 = dict(
    synthetic=100, epochs=30, checkpoint=None, train_encoder="all", input_size=512,
    lr=3e-4, warmup=50, aux_weight=1.0, far_ramp=(0.5, 0.8), step=StepConfig(objects=12),
    eval_points_per_side=16, val_images=4, eval_every=3, seed=0,
)  # fmt: skip
#: Phase 2: phase 1's best weights at the full 1024 px input.
PHASE2 = dict(
    synthetic=60, epochs=5, train_encoder="all", lr=1e-4, warmup=20, aux_weight=1.0,
    step=StepConfig(objects=12), eval_points_per_side=32, val_images=4, eval_every=1, seed=1,
)  # fmt: skip


def export_half(src: str | Path, dest: str | Path) -> tuple[str, int]:
    """Write checkpoint ``src`` with its floating-point tensors in float16.

    Returns
    -------
    (sha256, size in bytes) of ``dest``
    """
    from ..weights import sha256_file

    state = torch.load(src, map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        torch.save(half, tmp)
    return sha256_file(dest), dest.stat().st_size


def make_standin(
    out: Path, *, device: str = "auto", resume: bool = True, progress: bool = True
) -> Path:
    """Run both phases into ``out/phase1`` and ``out/phase2``; returns phase 2's best.pt."""
    from .loop import train

    p1 = TrainConfig(out=out / "phase1", device=device, **PHASE1)
    train(p1, resume=resume, progress=progress)
    p2 = TrainConfig(
        out=out / "phase2", device=device, checkpoint=str(out / "phase1" / "best.pt"), **PHASE2
    )
    train(p2, resume=resume, progress=progress)
    return out / "phase2" / "best.pt"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m napari_mobilesam.training.standin",
        description="Train the vit_t_synthetic_cells stand-in model (two seeded phases).",
    )
    ap.add_argument("out", type=Path, help="run folder (resumed if it holds a run)")
    ap.add_argument("--export", type=Path, help="write the float16 weights here")
    ap.add_argument("--device", default="auto")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    best = make_standin(args.out, device=args.device, progress=not args.quiet)
    if args.export:
        digest, size = export_half(best, args.export)
        print(f"{args.export}: sha256 {digest}, {size} bytes")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
