"""Quality against ground truth: prompts, segment-everything per mode, dim cells, 3D.

On held-out images of :mod:`napari_mobilesam.synthetic` (seeds the stand-in model's
training never drew) with a trained model at default settings:

- point mIoU (a click at each cell's centre, best of 3) and box mIoU;
- segment-everything (32 x 32 grid, default thresholds) precision, recall, F1 at IoU
  0.5 and AP50 for ``mode`` reference, fast and device (device runs on the CPU too),
  with the time per image;
- the same in the default mode at :data:`STANDIN_THRESHOLDS` (lower score thresholds),
  and at the default thresholds with one round of box refinement (``refine_rounds=1``);
- the same in the default mode as the label image ``generate_labels`` gives (what
  ``mobilesam-everything`` and the everything widget write: overlaps resolved);
- fast vs reference: the share of reference mode's objects that fast mode finds at
  IoU >= 0.9 (and the other way round), and the F1 difference, for the masks and for the
  label images; the same for segment-anything's records (:data:`EVERY_MASK`: masks
  mostly inside better-scored ones kept), with reference mode's precision and recall;
- dim uint16 cells (30 photons at a cell's centre instead of 400): point, box, F1;
- propagation through 3D stacks: from each cell's middle plane (its true mask),
  ``PromptSession.propagate`` up and down; mean IoU per plane against the truth (a
  plane the walk did not reach counts 0) and the share of planes reached;
- the same stacks, every object of the middle plane propagated at once
  (``PromptSession.propagate_all``): mean IoU per plane;
- with ``--tracked-series N``: tracking accuracy of ``mobilesam-everything --link t`` on N
  synthetic time series (:func:`tracked`: the fraction of true links kept, division
  recall);
- with ``--linked-stacks N``: 3D AP50 of ``mobilesam-everything --link z`` on N
  synthetic 3D stacks (:func:`linked_3d`: 3D IoU >= 0.5, one-to-one); with ``--extend``
  also of ``--link z --link-extend``; with ``--max-upscale X`` the planes are shown to the
  model at most X times enlarged (``none``: no limit; without it, the model's default).

Usage::

    python benchmarks/bench_quality.py [--weights vit_t_synthetic_cells] [--images 8]
                                       [--grid 32] [--linked-stacks 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, write_json
from benchmarks._quality import (  # noqa: F401  (also the names tests use)
    PROMPT_FIGURES,
    SEED,
    STANDIN_THRESHOLDS,
    _load,
    held_out,
)
from benchmarks.quality_stacks import (
    linked_3d,
    propagation,
    propagation_many,
    tracked,
)


def _everything(
    model, examples, mode: str, grid: int, labels: bool = False, **options
) -> tuple[dict, list[list[np.ndarray]]]:
    """Segment-everything's figures in ``mode``: its masks as ``generate`` gives them
    (overlapping, as segment-anything's), or with ``labels`` the objects of the label image
    ``generate_labels`` gives (what ``mobilesam-everything`` and the everything widget
    write: overlaps resolved by predicted IoU, masks left mostly hidden dropped)."""
    from napari_mobilesam.everything import MaskGenerator
    from napari_mobilesam.training.metrics import average_precision, iou_matrix, match_counts

    gen = MaskGenerator(model, points_per_side=grid, mode=mode, **options)
    tp = n_pred = n_true = 0
    scored, masks, seconds = [], [], []
    for ex in examples:
        t0 = time.perf_counter()
        if labels:
            image, info = gen.generate_labels(ex.image, return_info=True)
            segs = [image == i for i in range(1, int(image.max()) + 1)]
            scores = info["predicted_iou"]
        else:
            records = gen.generate(ex.image)
            segs = [r["segmentation"] for r in records]
            scores = np.array([r["predicted_iou"] for r in records])
        seconds.append(time.perf_counter() - t0)
        masks.append(segs)
        ious = iou_matrix(segs, ex.labels)
        c = match_counts(ious)
        tp, n_pred, n_true = tp + c["tp"], n_pred + c["n_pred"], n_true + c["n_true"]
        scored.append((ious, scores))
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    res = {
        "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
        "ap50": average_precision(scored), "objects": n_pred, "truth": n_true,
        "seconds_per_image": float(np.median(seconds)),
        "mode": gen.mode,  # the one "auto" resolved to
    }  # fmt: skip
    return res, masks


def _mask_ious(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """(len(a), len(b)) IoU of every mask of ``a`` with every mask of ``b`` (same shape)."""
    fa = np.stack(a).reshape(len(a), -1).astype(np.float32)
    fb = np.stack(b).reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None] - inter
    return inter / np.maximum(union, 1)


def agreement(reference: list[list[np.ndarray]], fast: list[list[np.ndarray]]) -> float:
    """Share of reference objects that fast mode finds at IoU >= 0.9 (one-to-one)."""
    from scipy.optimize import linear_sum_assignment

    found = total = 0
    for ref, fst in zip(reference, fast, strict=True):
        total += len(ref)
        if not ref or not fst:
            continue
        ious = _mask_ious(ref, fst)
        rows, cols = linear_sum_assignment(-ious)
        found += int((ious[rows, cols] >= 0.9).sum())
    return found / total if total else 1.0


def duplicates(masks: list[list[np.ndarray]], iou: float = 0.7) -> int:
    """Objects that overlap an earlier object of their image's list with mask IoU >=
    ``iou`` (what fast mode's mask NMS removes; box NMS keeps a near-copy whose box a
    few stray pixels widen)."""
    count = 0
    for objs in masks:
        if len(objs) < 2:
            continue
        ious = np.triu(_mask_ious(objs, objs), k=1)
        count += int((ious >= iou).any(axis=0).sum())
    return count


MODES = ("reference", "fast", "device")
#: segment-anything's records: every mask that passes the filters and NMS, parts of an
#: object and near-copies included
EVERY_MASK = {"max_covered_fraction": 1.0}


def run(
    weights: str,
    n_images: int,
    grid: int,
    n_stacks: int = 2,
    modes: tuple[str, ...] = MODES,
    dim_everything: bool = True,
) -> dict:
    """Every figure of the benchmark, as a dict (segment-everything in ``modes``; the
    fast-vs-reference agreement when both are among them; segment-everything F1 and AP50
    on the dim uint16 images unless ``dim_everything`` is false)."""
    import torch

    from napari_mobilesam.synthetic import Appearance
    from napari_mobilesam.training.evaluate import evaluate

    model = _load(weights)
    out: dict = {"weights": str(weights), "images": n_images, "grid": grid}
    examples = held_out(n_images)
    with torch.inference_mode():
        prompts = evaluate(model, examples, points_per_side=None, max_objects=None)
        out["prompts"] = {k: prompts[k] for k in PROMPT_FIGURES}
        masks = {}
        for mode in modes:
            out[mode], masks[mode] = _everything(model, examples, mode, grid)
        # the label image the command and the widget write, in the default mode
        out["labels"], label_objects = _everything(model, examples, "auto", grid, labels=True)
        out["lower_thresholds"], _ = _everything(
            model, examples, "auto", grid, **STANDIN_THRESHOLDS
        )
        out["refined"], _ = _everything(model, examples, "auto", grid, refine_rounds=1)
        if "reference" in modes and "fast" in modes:
            # fast mode removes duplicates by mask IoU, reference mode by box IoU; with box
            # NMS fast mode must find every reference object
            _, box_nms = _everything(model, examples, "fast", grid, nms="box")
            out["fast_vs_reference"] = {
                "found_at_0.9": agreement(masks["reference"], masks["fast"]),
                "found_by_reference": agreement(masks["fast"], masks["reference"]),
                "found_at_0.9_box_nms": agreement(masks["reference"], box_nms),
                "f1_difference": out["fast"]["f1"] - out["reference"]["f1"],
            }
            # segment-anything's records (every mask kept, max_covered_fraction 1): the
            # near-copies that box NMS keeps and fast mode's mask NMS removes
            sam, sam_masks = _everything(model, examples, "reference", grid, **EVERY_MASK)
            sam_fast_res, sam_fast = _everything(model, examples, "fast", grid, **EVERY_MASK)
            out["every_mask"] = {
                "reference": sam,
                "fast_f1": sam_fast_res["f1"],
                "found_at_0.9": agreement(sam_masks, sam_fast),
                "reference_duplicates": duplicates(sam_masks),
            }
            # the same in the label images, where overlaps are resolved in both modes
            ref_labels, ref_objects = _everything(model, examples, "reference", grid, labels=True)
            if out["labels"]["mode"] == "fast":  # "auto" ran fast mode: the same labels
                fast_labels, fast_objects = out["labels"], label_objects
            else:
                fast_labels, fast_objects = _everything(model, examples, "fast", grid, labels=True)
            out["fast_vs_reference"]["labels"] = {
                "reference_f1": ref_labels["f1"],
                "fast_f1": fast_labels["f1"],
                "found_at_0.9": agreement(ref_objects, fast_objects),
            }
        dim = held_out(n_images, appearance=Appearance(photons=30))
        d = evaluate(model, dim, points_per_side=grid if dim_everything else None,
                     max_objects=None)  # fmt: skip
        keys = ("point_miou", "box_miou", "f1", "ap50")
        out["dim_uint16"] = {k: d[k] for k in keys if k in d}
        out["propagation_3d"] = propagation(model, n_stacks)
        out["propagation_many"] = propagation_many(model, n_stacks)
    return out


def _table(res: dict) -> str:
    lines = [
        f"point mIoU {res['prompts']['point_miou']:.3f}  (best of the 3 masks "
        f"{res['prompts']['point_oracle_miou']:.3f}, random point "
        f"{res['prompts']['random_point_miou']:.3f})   box mIoU {res['prompts']['box_miou']:.3f}",
        "",
        "| mode | precision | recall | F1 | AP50 | objects / truth | s per image |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in [m for m in MODES if m in res]:
        r = res[mode]
        lines.append(
            f"| {mode} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
            f"{r['ap50']:.3f} | {r['objects']} / {r['truth']} | {r['seconds_per_image']:.2f} |"
        )
    r = res["labels"]
    lines.append(
        f"| auto, as a label image | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
        f"{r['ap50']:.3f} | {r['objects']} / {r['truth']} | {r['seconds_per_image']:.2f} |"
    )
    low = (
        f"auto, IoU >= {STANDIN_THRESHOLDS['pred_iou_thresh']}, stability >= "
        f"{STANDIN_THRESHOLDS['stability_score_thresh']}"
    )
    for name, r in ((low, res["lower_thresholds"]), ("auto, refine_rounds=1", res["refined"])):
        lines.append(
            f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
            f"{r['ap50']:.3f} | {r['objects']} / {r['truth']} | {r['seconds_per_image']:.2f} |"
        )
    d, p = res["dim_uint16"], res["propagation_3d"]
    lines.append("")
    if "fast_vs_reference" in res:
        fr, ev = res["fast_vs_reference"], res["every_mask"]
        lines.append(
            f"fast vs reference: {fr['found_at_0.9']:.1%} of reference objects found at "
            f"IoU >= 0.9 by fast mode ({fr['found_at_0.9_box_nms']:.1%} with box NMS), "
            f"{fr['found_by_reference']:.1%} of fast mode's by reference mode; F1 difference "
            f"{fr['f1_difference']:+.3f}"
        )
        r = ev["reference"]
        lines.append(
            f"every mask kept (max_covered_fraction=1, segment-anything's records): reference "
            f"F1 {r['f1']:.3f} (precision {r['precision']:.3f}, recall {r['recall']:.3f}), "
            f"fast {ev['fast_f1']:.3f}; {ev['found_at_0.9']:.1%} of reference objects found "
            f"by fast mode; {ev['reference_duplicates']} reference objects are near-copies "
            "of another, which fast mode's mask NMS removes"
        )
        fl = fr["labels"]
        lines.append(
            f"in the label images: F1 reference {fl['reference_f1']:.3f}, fast "
            f"{fl['fast_f1']:.3f}; {fl['found_at_0.9']:.1%} of reference objects found at "
            "IoU >= 0.9"
        )
    everything = f", F1 {d['f1']:.3f}, AP50 {d['ap50']:.3f}" if "f1" in d else ""
    lines += [
        f"dim uint16 cells: point {d['point_miou']:.3f}, box {d['box_miou']:.3f}{everything}",
        f"3D propagation: mean IoU per plane {p['mean_iou_per_plane']:.3f}, "
        f"{p['planes_reached']:.1%} of {p['planes']} planes reached",
    ]
    if "propagation_many" in res:
        m = res["propagation_many"]
        lines.append(
            f"3D propagation of every object of the middle plane at once ({m['objects']} "
            f"objects): mean IoU per plane {m['mean_iou_per_plane']:.3f}, "
            f"{m['planes_reached']:.1%} of {m['planes']} planes reached"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="vit_t_synthetic_cells",
                    help="registry name or checkpoint file (vit_t architecture)")  # fmt: skip
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--stacks", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--linked-stacks", type=int, default=0, metavar="N",
                    help="also: 3D AP50 of mobilesam-everything --link z on N stacks")  # fmt: skip
    ap.add_argument("--extend", action="store_true",
                    help="with --linked-stacks: also with --link-extend")  # fmt: skip
    ap.add_argument("--max-upscale", metavar="X|none",
                    help="with --linked-stacks: mobilesam-everything --max-upscale X "
                    "[the model's default]")  # fmt: skip
    ap.add_argument("--tracked-series", type=int, default=0, metavar="N",
                    help="also: tracking accuracy of mobilesam-everything --link t on N "
                    "synthetic time series")  # fmt: skip
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    res = run(args.weights, args.images, args.grid, args.stacks, tuple(args.modes))
    res["machine"] = machine()
    print(_table(res))
    if args.linked_stacks:
        res["linked_3d"] = r = linked_3d(
            args.weights, args.linked_stacks, grid=args.grid, extend=args.extend,
            max_upscale=args.max_upscale,
        )  # fmt: skip
        for what, f in (("", r), (" --link-extend", r.get("extended"))):
            if f is not None:
                print(
                    f"--link z on {args.linked_stacks} 3D stacks{what}: 3D AP50 {f['ap50']:.3f}, "
                    f"precision {f['precision']:.3f}, recall {f['recall']:.3f}, F1 "
                    f"{f['f1']:.3f} ({f['objects']} objects / {f['truth']} cells)"
                )
    if args.tracked_series:
        res["tracked"] = t = tracked(args.weights, args.tracked_series, grid=args.grid)
        print(
            f"--link t on {args.tracked_series} time series ({t['frames']} frames): "
            f"{t['link_accuracy']:.3f} of {t['links']} links correct, divisions recalled "
            f"{t['divisions_found']} / {t['divisions']}, sections found "
            f"{t['detection_recall']:.3f} ({t['seconds']:.0f} s)"
        )
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
