"""Time ``set_image`` and a one-point ``predict``: our fast path vs the reference path.

Both run in the same process, interleaved, on the same image and weights:

- ours: ``load_model`` defaults (:func:`napari_mobilesam.accel.optimize`: BatchNorm
  folded, fused CPU kernels, channels-last encoder) and a ``Predictor`` that caches the
  prompt-independent decoder work, with the factorised token/image attention;
- baseline: the reference computation in this code base (``optimize=False``: the
  model's own modules, plain projection attention, decoder recomputed on every call),
  which follows the original MobileSAM step by step;
- original: the original code itself when it is installed (``benchmarks/original.py``
  says where it looks and what it builds): segment-anything's ``SamPredictor``.

``predict`` returns all three candidate masks at the image's size, as the original does;
a click in the viewer shows one, so it is also timed as the viewer runs it
(``Predictor.predict_low_res``, then the best candidate upsampled).

Usage::

    python benchmarks/bench_predictor.py [--weights PATH] [--repeats N] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    default_image,
    default_weights,
    interleaved,
    machine,
    summary,
    table,
    write_json,
)
from napari_mobilesam.build import load_model
from napari_mobilesam.predictor import Predictor, resolve_precision


def make_predictors(weights, device="cpu"):
    fast = Predictor(load_model("vit_t", weights, device=device))
    ref_model = load_model("vit_t", weights, device=device, optimize=False)
    ref = Predictor(ref_model, decoder_cache=False, factorized=False)
    return fast, ref


def _load_original(weights, device):
    """(the original pipeline or None, a description or the reason it is missing)."""
    from benchmarks import original

    if device != "cpu":
        return None, "timed on the CPU only"
    try:
        orig = original.load(weights)
    except original.OriginalUnavailable as exc:
        return None, str(exc)
    return orig, orig.describe()


def run(
    weights=None, image=None, repeats=5, threads=None, device="cpu", with_original=True
) -> dict:
    """Benchmark and return a JSON-able dict (also used by the tests at tiny sizes).

    ``result["original"]`` describes the original pipeline (or why it did not run);
    ``set_image`` / ``predict_1pt`` then also hold its timings under ``"original"``.
    On a CPU with bfloat16 units ``set_image`` also has ``"ours_bf16"``: our encoder
    at ``precision="bf16"`` (what ``precision="auto"`` picks there).
    """
    if threads:
        torch.set_num_threads(threads)
    image = default_image() if image is None else image
    weights = weights or default_weights()
    fast, ref = make_predictors(weights, device)
    orig, orig_info = _load_original(weights, device) if with_original else (None, "not asked")
    point = (np.array([[image.shape[1] * 0.6, image.shape[0] * 0.4]]), np.array([1]))
    encoders = {"ours": lambda: fast.set_image(image), "baseline": lambda: ref.set_image(image)}
    if resolve_precision("auto", device) == "bf16" and device == "cpu":
        # precision="auto" on a CPU with bfloat16 units: timed too (masks differ slightly)
        bf16 = Predictor(fast.model, precision="bf16")
        encoders["ours_bf16"] = lambda: bf16.set_image(image)
    decoders = {"ours": lambda: fast.predict(*point), "baseline": lambda: ref.predict(*point)}

    def click():  # as the viewer answers a click: only the best of the 3 masks upsampled
        scores, low_res, upsample = fast.predict_low_res(*point)
        best = int(np.argmax(scores))
        return upsample(low_res[best : best + 1])

    decoders["ours_click"] = click
    if orig is not None:
        encoders["original"] = lambda: orig.predictor.set_image(image)
        decoders["original"] = lambda: orig.predictor.predict(*point, multimask_output=True)
    with torch.inference_mode():
        enc = interleaved(encoders, repeats)
        dec = interleaved(decoders, repeats * 4)
        # the paths must agree, or the timing means nothing
        a, b = fast.predict(*point, return_logits=True), ref.predict(*point, return_logits=True)
        max_diff = float(np.abs(a[2] - b[2]).max())
        if orig is not None:
            c = orig.predictor.predict(*point, multimask_output=True)
            orig_diff = float(np.abs(a[2] - c[2]).max())
    result = {
        "benchmark": "predictor",
        "image_size": list(image.shape[:2]),
        "weights": str(weights),
        "machine": machine(),
        "set_image": {k: summary(v) for k, v in enc.items()},
        "predict_1pt": {k: summary(v) for k, v in dec.items()},
        "max_low_res_logit_diff": max_diff,
        "original": {"available": orig is not None, "what": orig_info},
    }
    if orig is not None:
        result["original"]["max_low_res_logit_diff"] = orig_diff
    return result


def report(result: dict) -> str:
    rows = [
        ("set_image (encoder)", result["set_image"]["ours"], result["set_image"]["baseline"]),
        (
            "predict, 1 point, 3 masks",
            result["predict_1pt"]["ours"],
            result["predict_1pt"]["baseline"],
        ),
        (
            "click (best mask upsampled)",
            result["predict_1pt"]["ours_click"],
            result["predict_1pt"]["baseline"],
        ),
    ]
    bf16 = result["set_image"].get("ours_bf16")
    if bf16:
        rows.insert(1, ("set_image, bf16 encoder", bf16, result["set_image"]["baseline"]))
    m = result["machine"]
    head = (
        f"MobileSAM predictor, image {result['image_size'][0]}x{result['image_size'][1]}, "
        f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}"
    )
    tail = (
        f"max |low-res logit difference| ours vs baseline: {result['max_low_res_logit_diff']:.2e}"
    )
    lines = [head, table(rows), tail]
    orig = result["original"]
    if orig["available"]:
        rows = [(what, result[key]["ours"], result[key]["original"])
                for what, key in (("set_image (encoder)", "set_image"),
                                  ("predict, 1 point, 3 masks", "predict_1pt"))]  # fmt: skip
        clicks = result["predict_1pt"]
        rows.append(("click (best mask upsampled)", clicks["ours_click"],
                     clicks["original"]))  # fmt: skip
        if bf16:
            rows.insert(1, ("set_image, bf16 encoder", bf16, result["set_image"]["original"]))
        lines += [f"against the original code ({orig['what']}):", table(rows),
                  f"max |low-res logit difference| ours vs original: "
                  f"{orig['max_low_res_logit_diff']:.2e}"]  # fmt: skip
    else:
        lines.append(f"original code not timed: {orig['what']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="checkpoint (default: the golden random checkpoint)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--no-original", action="store_true", help="do not time the original")
    args = parser.parse_args(argv)
    result = run(
        args.weights, repeats=args.repeats, threads=args.threads, with_original=not args.no_original
    )
    print(report(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
