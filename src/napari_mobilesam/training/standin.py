"""The recipe of ``vit_t_synthetic_cells``, the project's trained stand-in model.

The official MobileSAM weights cannot be used everywhere (machines without internet,
tests, demonstrations), and random weights segment nothing. The stand-in model is a
MobileSAM (TinyViT encoder, SAM's prompt encoder and mask decoder) trained from a
fresh initialisation, by this project's ``mobilesam-train``, on images of
:mod:`napari_mobilesam.synthetic` only. It is a demonstration and test model for
synthetic fluorescent cells, not a general segmentation model.

One seeded command makes it (on 2 CPU cores about 6.5 hours; a GPU with
``--device cuda`` takes minutes)::

    python -m napari_mobilesam.training.standin runs/standin \
        --export weights/vit_t_synthetic_cells.pt

Eight training phases on fresh synthetic images
(:class:`~napari_mobilesam.training.sources.SyntheticSource`, varied sizes, densities,
brightness and shapes), each followed by a calibration, then a calibration of the scores:

1. :data:`PHASE1`, ``mobilesam-train`` from a fresh initialisation, every part trained at
   a 512 px model input (4x cheaper per step than 1024; crops keep cells at the scale a
   1024 px input gives them), with the dense auxiliary loss on the encoder and the focal
   loss moving from balanced-around-the-object to full-mask between 50% and 80% of the
   schedule; all :data:`PHASE1_EPOCHS` epochs of its schedule, keeping the best
   checkpoint on held-out images (epoch 21 of 30, step 2100);
2. :data:`CALIBRATION`: the IoU head alone fitted to the real IoU of the masks of
   segment-everything's grid points (:mod:`napari_mobilesam.training.calibrate`), so
   that the default ``pred_iou_thresh`` keeps the good masks; the result, exported in
   float16, was the first bundled model;
3. :data:`PHASE2`, from that float16 model: every part fine-tuned at a low learning
   rate on new images, the focal loss balanced around each object and weighing the
   pixels of touching cells 4 times (``neighbour_weight``): the first model merged a
   cell with its neighbours for 43% of centre clicks;
4. the calibration again, on phase 2's best checkpoint (the model bundled until phase 3);
5. :data:`PHASE3`, from that model in float16: phases 1 and 2 encoded each 512 px crop's
   prompts in a 512 px frame of their own (``input_frame="own"``, see
   :class:`~napari_mobilesam.training.decoder.InputFrame`), so their decoder learnt
   distances on twice the scale a 1024 px input shows; the decoder alone is trained at
   the full 1024 px input on :data:`PHASE3_IMAGES` images written to a folder
   (embeddings cached);
6. the calibration again, on phase 3's best checkpoint (the model bundled until phase 4);
7. :data:`PHASE4`, from that model in float16: the decoder alone trained on at the full
   input for 3 more epochs on :data:`PHASE4_IMAGES` new images, at half phase 3's
   learning rate (phase 3's held-out score still rose at its last epoch);
8. the calibration again, on phase 4's best checkpoint (the model bundled until phase 5);
9. :data:`PHASE5`, from that model in float16: the decoder alone at the full input, 2
   epochs on :data:`PHASE5_IMAGES` new images, its mask losses computed on the logits
   upsampled to the input's resolution (``loss_upsample=4``) instead of against labels
   thresholded at the decoder's 256 x 256, which round every boundary to a low-res pixel;
10. the calibration again, on phase 5's best checkpoint (the model bundled until phase 6);
11. :data:`PHASE6`, from that model in float16: every part trained at the full input (the
    encoder too, at a lower learning rate than the decoder; phases 3-5 trained the
    decoder alone on features the encoder had learnt at a 512 px input), 2 epochs on
    :data:`PHASE6_IMAGES` new images, phase 5's losses;
12. the calibration again, on phase 6's best checkpoint (the model bundled until phase 7);
13. :data:`PHASE7`, from that model in float16: phase 6's settings on
    :data:`PHASE7_IMAGES` new images, 30% of them 1024 px planes of small cells shown at
    native size (:attr:`SyntheticSource.small
    <napari_mobilesam.training.sources.SyntheticSource>`: the cells of a large plane's
    tiles, and the small faint sections of a 3D stack's cells);
14. the calibration again, on phase 7's best checkpoint (the model bundled until phase 8;
    phase 8, bundled until phase 9, was this model with step 16 and no phase 9);
15. :data:`PHASE9`, from that model in float16: the decoder alone at the full input, 2
    epochs on :data:`PHASE9_IMAGES` new images (30% planes of small cells, as phase 7's),
    its IoU loss weighed 8 times (1 before), 4 background points per image (2 before) and
    70% of first prompts points (50% before). Phase 8 showed that segment-everything at
    its default thresholds was held back by the IoU head, which could not tell a mask of
    real IoU 0.95 from one of 0.7 (the IoU token's features, not the head's fit: an MLP of
    any width on them separated masks of IoU >= 0.9 from the rest no better, AUC 0.96);
    the transformer that makes those features is trained here to tell them apart;
16. :data:`SCORES` on phase 9's best checkpoint, no training: segment-everything's scores
    fitted to its default thresholds (0.88 predicted IoU, 0.95 stability). The mask
    logits made twice as steep (:func:`~napari_mobilesam.training.calibrate.scale_mask_logits`:
    the same masks, a stability score nearer 1 for a good mask), and the IoU head fitted
    to the 0.8-quantile of the real IoU instead of its mean (the calibration's images
    and grid); phase 7's head, fitted to the mean, scored masks of real IoU 0.9 or more
    0.83 on average, and the defaults kept 41% of the cells;

and with ``--export`` writes the result in float16 (half the size, the same masks to
rounding) and prints its sha256 and size for ``weights/registry.json``.
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

__all__ = ["CALIBRATION", "PHASE1", "PHASE1_EPOCHS", "PHASE2", "PHASE3", "PHASE3_IMAGES",
           "PHASE4", "PHASE4_IMAGES", "PHASE5", "PHASE5_IMAGES", "PHASE6", "PHASE6_IMAGES",
           "PHASE7", "PHASE7_IMAGES", "PHASE9", "PHASE9_IMAGES", "SCORES", "calibrate",
           "export_half", "make_standin", "write_data"]  # fmt: skip

#: Phase 1: fresh model, 512 px input, a 30-epoch schedule of 100 images each.
PHASE1 = dict(
    synthetic=100, epochs=30, checkpoint=None, train_encoder="all", input_size=512,
    lr=3e-4, warmup=50, aux_weight=1.0, far_ramp=(0.5, 0.8), step=StepConfig(objects=12),
    eval_points_per_side=16, val_images=4, eval_every=3, seed=0, input_frame="own",
)  # fmt: skip
#: Epochs of phase 1's schedule that are run.
PHASE1_EPOCHS = 30
#: Phase 2: from phase 1's calibrated model (in float16, as exported), every part
#: fine-tuned on new images with the focal loss balanced around each object (far_ramp
#: (1, 1) keeps far_mix at 0: a full-mask loss here made masks 2-3 times too large
#: within 200 steps) and weighing the pixels of touching cells 4 times, which teaches
#: the model to stop at a neighbour instead of merging with it. 60 steps, the learning
#: rate decaying to 5%: longer runs (200-300 steps at 3e-5 to 1e-4) scored lower.
PHASE2 = dict(
    synthetic=60, epochs=1, train_encoder="all", input_size=512, lr=3e-5, warmup=5,
    aux_weight=0.0, far_ramp=(1.0, 1.0), step=StepConfig(objects=12, neighbour_weight=4.0),
    eval_points_per_side=0, val_images=1, eval_every=1, seed=2, input_frame="own",
)  # fmt: skip
#: Phase 3: phases 1 and 2 placed each 512 px training crop in a 512 px prompt frame of
#: its own (``input_frame="own"``), so their decoder learnt distances twice as long as a
#: 1024 px input shows them, and its masks spilled into touching cells (the same cells
#: scored point / box mIoU 0.85 / 0.89 in that frame, 0.65 / 0.74 at 1024 px). From phase
#: 2's calibrated model (in float16, as exported), the decoder alone is trained at the full
#: 1024 px input on :data:`PHASE3_IMAGES` synthetic images written to a folder (their
#: embeddings computed once and cached), the focal loss balanced around each object and
#: weighing touching cells 4 times as in phase 2.
PHASE3 = dict(
    epochs=6, train_encoder="none", lr=1e-4, warmup=20, far_ramp=(1.0, 1.0),
    step=StepConfig(objects=12, neighbour_weight=4.0), eval_points_per_side=0,
    eval_every=1, augment=False, seed=3,
)  # fmt: skip
#: Phase 3's data: (training images, held-out images, source seed); image i is
#: ``SyntheticSource(n, seed).make(_seed(seed, "t", i))`` (held-out: ``"v"``).
PHASE3_IMAGES = (150, 4, 7)
#: Phase 4: phase 3's held-out score still rose at its last epoch; from phase 3's
#: calibrated model (in float16, as exported), the decoder alone trained on for 3 more
#: epochs at the full input, on :data:`PHASE4_IMAGES` new images, at half phase 3's
#: learning rate. (Training the encoder too at a 512 px input, 1 epoch at 3e-5, and the
#: decoder alone at a 512 px input scored no better on held-out images; see training.md.)
PHASE4 = dict(PHASE3, epochs=3, lr=5e-5, seed=4)
#: Phase 4's data, as :data:`PHASE3_IMAGES`.
PHASE4_IMAGES = (300, 4, 8)
#: Phase 5: phases 1-4 computed the mask losses against labels thresholded at the
#: decoder's 256 x 256 resolution, which moves every cell's boundary to the nearest
#: low-res pixel edge (a decoder reproducing those targets exactly reaches IoU 0.94 on
#: the quality benchmark's images); from phase 4's calibrated model (in float16, as
#: exported), the decoder alone trained for 2 epochs at the full input with the losses
#: on its logits upsampled 4 times (``loss_upsample=4``: the 1024 px input's resolution),
#: at phase 3's learning rate.
PHASE5 = dict(
    PHASE4, epochs=2, lr=1e-4, seed=5,
    step=StepConfig(objects=12, neighbour_weight=4.0, loss_upsample=4),
)  # fmt: skip
#: Phase 5's data, as :data:`PHASE3_IMAGES`.
PHASE5_IMAGES = (200, 4, 10)
#: Phase 6: phases 3-5 trained the decoder alone at the full input, on an encoder trained
#: only at a 512 px input (phases 1-2); the decoder had stopped improving (40 more steps
#: from phase 5 lowered its held-out scores). From phase 5's calibrated model (in float16,
#: as exported), every part trained at the full 1024 px input for 2 epochs, the encoder at
#: 2e-5 and the decoder at 5e-5, with phase 5's losses (on 4x upsampled logits, touching
#: cells counted 4 times). No embeddings are cached: each step runs the encoder (4.3 s per
#: image on 2 CPU cores, against 3.4 s for the decoder alone).
PHASE6 = dict(PHASE5, epochs=2, lr=5e-5, train_encoder="all", encoder_lr=2e-5, seed=7)
#: Phase 6's data, as :data:`PHASE3_IMAGES`.
PHASE6_IMAGES = (200, 4, 12)
#: Phase 7: phase 6's settings (every part at the full input), from phase 6's calibrated
#: model (in float16, as exported), on new images of which 30% are 1024 px planes of
#: small cells at native size (smallest radius 5-12 px at the model's input), which the
#: earlier phases' images rarely showed. (The same small cells in a decoder-only phase
#: of their own cost 3D propagation half its score, training.md.)
PHASE7 = dict(PHASE6, seed=10)
#: Phase 7's data: (training images, held-out images, source seed, fraction of planes of
#: 3D stacks, fraction of small-cell planes); see :func:`write_data`.
PHASE7_IMAGES = (200, 6, 15, 0.0, 0.3)
#: Phase 9: from phase 7's calibrated model (in float16, as exported), the decoder alone at
#: the full input (embeddings cached) with phase 5's losses, its IoU loss weighed 8 times,
#: 4 background points per image and 30% of first prompts boxes: segment-everything's grid
#: prompts are points, many of them on the background, and its default thresholds need an
#: IoU head that tells a good mask from a mediocre one (training.md, phase 9).
PHASE9 = dict(
    PHASE5, lr=5e-5, seed=11,
    step=StepConfig(objects=12, neighbour_weight=4.0, loss_upsample=4, iou_weight=8.0,
                    background=4, box_fraction=0.3),
)  # fmt: skip
#: Phase 9's data, as :data:`PHASE7_IMAGES`.
PHASE9_IMAGES = (200, 6, 16, 0.0, 0.3)
#: IoU-head calibration: images (varied synthetic), grid, fitting.
CALIBRATION = dict(images=12, points_per_side=16, epochs=200, lr=1e-3, seed=0)
#: Phase 8 (on phase 7's model) and the last step (on phase 9's best checkpoint): the
#: scores fitted to segment-everything's default thresholds: the mask logits
#: ``logit_scale`` times steeper, then the IoU head fitted to the ``quantile`` of the real
#: IoU (pinball loss) of the masks of a ``points_per_side`` grid, on the calibration's
#: images (:func:`~napari_mobilesam.training.calibrate.calibrate_iou_head`).
SCORES = dict(CALIBRATION, logit_scale=2.0, quantile=0.8)


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


def calibrate(
    src: Path,
    dest: Path,
    *,
    device: str = "auto",
    progress: bool = True,
    settings: dict | None = None,
) -> dict:
    """Fit the IoU head of checkpoint ``src`` (``settings``: :data:`CALIBRATION` by
    default, or :data:`SCORES`, which also scales the mask logits first and fits a
    quantile); writes ``dest``."""
    from ..build import load_model
    from ..distill.models import save_student
    from .calibrate import calibrate_iou_head, iou_head_samples, scale_mask_logits
    from .sources import SyntheticSource, _seed

    cfg = CALIBRATION if settings is None else settings
    model = load_model("vit_t", src, device=device, optimize=False, progress=False)
    scale_mask_logits(model, cfg.get("logit_scale", 1.0))  # 1: the weights as they are
    source = SyntheticSource(cfg["images"], seed=cfg["seed"])
    images = (source.make(_seed(cfg["seed"], "calibrate", i)) for i in range(cfg["images"]))
    if progress:
        from tqdm.auto import tqdm

        images = tqdm(images, total=cfg["images"], desc="calibrating the IoU head", unit="image")
    feats, targets = iou_head_samples(model, images, points_per_side=cfg["points_per_side"])
    res = calibrate_iou_head(model, feats, targets, epochs=cfg["epochs"], lr=cfg["lr"],
                             seed=cfg["seed"], quantile=cfg.get("quantile"))  # fmt: skip
    save_student(model, dest)
    return res


def write_data(out: Path, images: tuple, *, progress: bool = True) -> tuple[Path, Path]:
    """Write a phase's training and held-out images (``images``: training images,
    held-out images, source seed, as :data:`PHASE3_IMAGES`, and optionally the fraction
    of them that are planes of 3D stacks and the fraction of small-cell planes,
    :attr:`SyntheticSource.planes <napari_mobilesam.training.sources.SyntheticSource>`
    and ``small``) as ``tNNN.tif`` +
    ``tNNN_labels.tif`` (``vNNN`` held out); returns the two folders. Files already
    written are kept (the images are seeded)."""
    from .. import synthetic
    from .sources import SyntheticSource, _seed

    n_train, n_val, seed, *kinds = images
    planes, small = [*kinds, 0.0, 0.0][:2]
    source = SyntheticSource(n_train, seed=seed, planes=planes, small=small)
    jobs = [(out / "train", "t", i) for i in range(n_train)]
    jobs += [(out / "val", "v", i) for i in range(n_val)]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc=f"images of {out.name}", unit="image")
    for folder, tag, i in jobs:
        image, labels = folder / f"{tag}{i:03d}.tif", folder / f"{tag}{i:03d}_labels.tif"
        if image.exists() and labels.exists():
            continue
        ex = source.make(_seed(seed, tag, i))
        synthetic.write_sample(synthetic.Sample(ex.image, ex.labels, "YX"), image, labels)
    return out / "train", out / "val"


def make_standin(
    out: Path, *, device: str = "auto", resume: bool = True, progress: bool = True
) -> Path:
    """Run phases 1-7, each followed by a calibration of the IoU head, phase 9, and the
    calibration of the scores (:data:`SCORES`) on phase 9's best checkpoint into ``out``;
    returns ``out/standin.pt``."""
    from .loop import train

    p1 = TrainConfig(out=out / "phase1", device=device, **PHASE1)
    train(p1, resume=resume, progress=progress, stop_after=PHASE1_EPOCHS)
    first = out / "phase1_calibrated.pt"
    res = calibrate(out / "phase1" / "best.pt", first, device=device, progress=progress)
    _report(res)
    start = out / "phase1_calibrated_fp16.pt"
    export_half(first, start)  # phase 2 starts from the weights as they were shipped
    p2 = TrainConfig(out=out / "phase2", device=device, checkpoint=start, **PHASE2)
    train(p2, resume=resume, progress=progress)
    second = out / "phase2_calibrated.pt"
    res = calibrate(out / "phase2" / "best.pt", second, device=device, progress=progress)
    _report(res)
    start = out / "phase2_calibrated_fp16.pt"
    export_half(second, start)  # the model bundled before phase 3
    third = out / "phase3_calibrated.pt"
    _on_folder(out, "phase3", PHASE3_IMAGES, PHASE3, start, third, device, resume, progress)
    export_half(third, out / "phase3_calibrated_fp16.pt")  # the model bundled before phase 4
    start = out / "phase3_calibrated_fp16.pt"
    fourth = out / "phase4_calibrated.pt"
    _on_folder(out, "phase4", PHASE4_IMAGES, PHASE4, start, fourth, device, resume, progress)
    export_half(fourth, out / "phase4_calibrated_fp16.pt")  # the model bundled before phase 5
    start = out / "phase4_calibrated_fp16.pt"
    fifth = out / "phase5_calibrated.pt"
    _on_folder(out, "phase5", PHASE5_IMAGES, PHASE5, start, fifth, device, resume, progress)
    export_half(fifth, out / "phase5_calibrated_fp16.pt")  # the model bundled before phase 6
    start = out / "phase5_calibrated_fp16.pt"
    sixth = out / "phase6_calibrated.pt"
    _on_folder(out, "phase6", PHASE6_IMAGES, PHASE6, start, sixth, device, resume, progress)
    export_half(sixth, out / "phase6_calibrated_fp16.pt")  # the model bundled before phase 7
    start = out / "phase6_calibrated_fp16.pt"
    seventh = out / "phase7_calibrated.pt"
    _on_folder(out, "phase7", PHASE7_IMAGES, PHASE7, start, seventh, device, resume, progress)
    export_half(seventh, out / "phase7_calibrated_fp16.pt")  # phase 8 scored this one
    start = out / "phase7_calibrated_fp16.pt"
    train_dir, val_dir = write_data(out / "phase9_data", PHASE9_IMAGES, progress=progress)
    p9 = TrainConfig(out=out / "phase9", device=device, checkpoint=start, data=train_dir,
                     val_data=val_dir, **PHASE9)  # fmt: skip
    train(p9, resume=resume, progress=progress)
    final = out / "standin.pt"
    res = calibrate(out / "phase9" / "best.pt", final, device=device, progress=progress,
                    settings=SCORES)  # fmt: skip
    _report(res)
    return final


def _on_folder(
    out: Path,
    phase: str,
    images: tuple,
    settings: dict,
    start: Path,
    dest: Path,
    device: str,
    resume: bool,
    progress: bool,
) -> Path:
    """Write ``images`` (:func:`write_data`) to ``out/<phase>_data``, train ``settings``
    on them from ``start`` into ``out/<phase>``, calibrate its best checkpoint into
    ``dest``; returns ``dest``."""
    from .loop import train

    train_dir, val_dir = write_data(out / f"{phase}_data", images, progress=progress)
    cfg = TrainConfig(out=out / phase, device=device, checkpoint=start, data=train_dir,
                      val_data=val_dir, **settings)  # fmt: skip
    train(cfg, resume=resume, progress=progress)
    _report(calibrate(out / phase / "best.pt", dest, device=device, progress=progress))
    return dest


def _report(res: dict) -> None:
    bias = f", mean bias {res['bias']:+.3f}" if "bias" in res else ""
    print(f"IoU head: mean squared error {res['before']:.4f} -> {res['after']:.4f}{bias} "
          f"on {res['samples']} prompts")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m napari_mobilesam.training.standin",
        description="Train the vit_t_synthetic_cells stand-in model (seeded phases).",
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
