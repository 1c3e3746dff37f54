"""Encoder and one-point predict latency: torch vs onnxruntime (fp32, int8), 1 and 2 threads.

Also measures what int8 costs in accuracy: the full-resolution masks of every golden
predictor call (points, boxes, mask refinements, batched boxes, on both golden images)
from the int8 models against the fp32 onnx models, as mask IoU (``--no-accuracy`` skips
it; it needs ``../shared/golden``).

All backends run in one process on the same image and weights, interleaved (A B C A B C
...) so that a drifting machine affects them alike; ratios are to torch at the same
thread count. The ONNX models are exported into the cache on first use (not timed).

Usage::

    python benchmarks/bench_backends.py [--weights PATH] [--threads 1 2] [--repeats 5]
        [--json OUT] [--no-accuracy]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    GOLDEN,
    default_image,
    default_weights,
    interleaved,
    machine,
    summary,
    write_json,
)

BACKENDS = (("torch", None), ("onnx", None), ("onnx", "int8"))


def _label(backend: str, quantize: str | None) -> str:
    return backend + (f" {quantize}" if quantize else "")


def run(weights=None, *, threads=(1, 2), repeats: int = 5, image=None) -> dict:
    """Time every backend at every thread count; returns a JSON-able dict."""
    import torch

    from napari_mobilesam.build import load_model
    from napari_mobilesam.predictor import Predictor

    weights = Path(weights or default_weights())
    image = default_image() if image is None else image
    model = load_model("vit_t", weights, device="cpu")
    h, w = image.shape[:2]
    point = np.array([[w // 2, h // 2]])
    label = np.array([1])
    rows = []
    start = time.perf_counter()
    preds = {
        _label(b, q): Predictor(model, backend=b, quantize=q) for b, q in BACKENDS
    }  # exports happen here (first use), outside the timings
    export_s = time.perf_counter() - start
    for n in threads:
        torch.set_num_threads(n)
        for b, q in BACKENDS:
            if b == "onnx":
                preds[_label(b, q)] = Predictor(model, backend=b, quantize=q, threads=n)
        encode = {k: (lambda p=p: p.set_image(image)) for k, p in preds.items()}
        t_enc = interleaved(encode, repeats)
        decode = {k: (lambda p=p: p.predict(point, label)) for k, p in preds.items()}
        t_dec = interleaved(decode, repeats * 4)
        base_e = np.median(t_enc["torch"])
        base_d = np.median(t_dec["torch"])
        for k in preds:
            rows.append(
                {
                    "threads": n,
                    "backend": k,
                    "encoder": summary(t_enc[k]),
                    "predict_1pt": summary(t_dec[k]),
                    "encoder_ratio": float(np.median(t_enc[k]) / base_e),
                    "predict_ratio": float(np.median(t_dec[k]) / base_d),
                }
            )
    return {"machine": machine(), "weights": str(weights), "image_size": [h, w],
            "setup_seconds": export_s, "rows": rows}  # fmt: skip


def _golden_calls(npz: np.lib.npyio.NpzFile, name: str):
    """Keyword arguments of every predictor call of image ``name`` in a golden npz."""
    prefixes = sorted({k.rsplit("/", 1)[0] + "/" for k in npz.files if k.endswith("/masks")})
    for pre in prefixes:
        if not pre.startswith(f"{name}/"):
            continue
        if pre + "in_boxes" in npz.files:
            yield pre, "predict_batch", {"boxes": npz[pre + "in_boxes"], "multimask_output": False}
            continue
        parent = pre.split("refine/")[0]
        src = pre if pre + "in_point_coords" in npz.files else parent
        yield (
            pre,
            "predict",
            {
                "point_coords": npz.get(src + "in_point_coords"),
                "point_labels": npz.get(src + "in_point_labels"),
                "box": npz.get(pre + "in_box"),
                "mask_input": npz.get(pre + "in_mask_input"),
                "multimask_output": pre.rstrip("/").endswith("mm1"),
            },
        )


def int8_accuracy(weights=None, golden: Path = GOLDEN) -> dict:
    """Mask IoU of int8 onnx vs fp32 onnx over every golden predictor call.

    Returns ``{"n_masks", "mean", "median", "min", "per_case": {case: [iou, ...]}}``;
    masks are compared at the original image size, one IoU per returned mask. Two empty
    masks count as IoU 1.
    """
    from PIL import Image

    from napari_mobilesam.build import load_model
    from napari_mobilesam.predictor import Predictor

    weights = Path(weights or default_weights())
    model = load_model("vit_t", weights, device="cpu")
    fp32 = Predictor(model, backend="onnx")
    int8 = Predictor(model, backend="onnx", quantize="int8")
    per_case: dict[str, list[float]] = {}
    for path in sorted(golden.glob("*_cases.npz")):
        with np.load(path) as npz:
            names = sorted({k.split("/")[0] for k in npz.files})
            for name in names:
                files = sorted(golden.glob(f"images/*_{name}.png"))
                if not files:
                    continue
                image = np.asarray(Image.open(files[0]).convert("RGB"))
                fp32.set_image(image)
                int8.set_image(image)
                for pre, method, kwargs in _golden_calls(npz, name):
                    a = getattr(fp32, method)(**kwargs)[0].reshape(-1, *image.shape[:2])
                    b = getattr(int8, method)(**kwargs)[0].reshape(-1, *image.shape[:2])
                    per_case[pre.rstrip("/")] = [_iou(x, y) for x, y in zip(a, b, strict=True)]
    ious = [v for vs in per_case.values() for v in vs]
    return {"n_masks": len(ious), "mean": float(np.mean(ious)), "median": float(np.median(ious)),
            "min": float(np.min(ious)), "per_case": per_case}  # fmt: skip


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def report(result: dict) -> str:
    head = (
        f"{'threads':>7} {'backend':12} {'encoder (median)':>17} {'ratio':>6} "
        f"{'predict 1 pt':>13} {'ratio':>6}"
    )
    lines = [
        f"image {result['image_size'][0]}x{result['image_size'][1]}, {result['machine']['cpu']}",
        head,
        "-" * len(head),
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['threads']:7d} {r['backend']:12} {r['encoder']['median'] * 1e3:14.0f} ms "
            f"{r['encoder_ratio']:5.2f}x {r['predict_1pt']['median'] * 1e3:10.1f} ms "
            f"{r['predict_ratio']:5.2f}x"
        )
    lines.append("(ratios: to torch at the same thread count)")
    acc = result.get("int8_accuracy")
    if acc:
        lines.append(
            f"int8 vs fp32 onnx, {acc['n_masks']} golden-prompt masks: mask IoU mean "
            f"{acc['mean']:.3f}, median {acc['median']:.3f}, min {acc['min']:.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    p.add_argument("--no-accuracy", action="store_true", help="skip the int8 accuracy part")
    args = p.parse_args(argv)
    result = run(args.weights, threads=tuple(args.threads), repeats=args.repeats)
    if not args.no_accuracy and GOLDEN.joinpath("mobile_sam_random.pt").exists():
        result["int8_accuracy"] = int8_accuracy(args.weights)
    print(report(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
