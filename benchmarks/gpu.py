"""One prepared GPU run: correctness against the golden outputs, then timings.

Checks, on the chosen device, that the fast paths reproduce the reference (golden
features, predictor logits/IoU/masks, segment-everything masks), then times our
path against the reference-mode path in the same run: encoder at batch 1,
a one-point predict, and segment-everything (32x32 grid, 1024x1024 image) with
default thresholds and with every mask passing, in fast mode and as ``mode="device"``
label images (the on-device path). With ``--precisions bf16 fp16``
(the default on CUDA) it also measures the reduced-precision encoder: mask IoU
against float32 on every golden prompt, latency at batch 1, and images/s batched
(``Predictor.embed_images``). With ``--compile`` it times ``torch.compile``'d
encoders (default mode, and CUDA graphs via ``reduce-overhead`` on CUDA) against
eager at the device's ``precision="auto"``. Prints a table and writes JSON.

Runs on CPU too (small sizes with ``--quick``), which is how the tests keep it
working::

    python benchmarks/gpu.py --golden DIR [--device cuda] [--quick] [--out DIR]
        [--precisions bf16 fp16] [--batch 16] [--compile [MODE ...]]

``DIR`` holds ``mobile_sam_random.pt``, ``images/public_*.png``, a
``*_cases.npz`` in the golden format and ``*_amg*_*.json`` cases.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from benchmarks._common import machine, write_json
from napari_mobilesam.build import load_model
from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.everything.rle import rle_to_mask
from napari_mobilesam.predictor import Predictor, resolve_precision


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "n": repeats}


def _image(golden: Path, name: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(golden / "images" / f"public_{name}.png").convert("RGB"))


def check_predictor(golden: Path, model, device) -> dict:
    """Golden predictor cases on ``device``: worst differences over all cases."""
    worst = {"feature_max_abs": 0.0, "logit_max_abs": 0.0, "iou_max_abs": 0.0, "mask_mismatch": 0.0}
    pred = Predictor(model)
    for npz in sorted(golden.glob("*_cases.npz")):
        with np.load(npz) as z:
            for name in sorted({k.split("/")[0] for k in z.files}):
                pred.set_image(_image(golden, name))
                if f"{name}/features" in z.files:
                    ref = torch.from_numpy(z[f"{name}/features"]).to(device)
                    diff = (pred.features - ref).abs().max().item()
                    worst["feature_max_abs"] = max(worst["feature_max_abs"], diff)
                cases = sorted(
                    {
                        k.rsplit("/", 1)[0] + "/"
                        for k in z.files
                        if k.startswith(f"{name}/p") or k.startswith(f"{name}/batch")
                    }
                )
                for pre in cases:

                    def opt(key, pre=pre):
                        return z[pre + key] if pre + key in z.files else None

                    if opt("low_res_logits") is None:
                        continue
                    if opt("in_boxes") is not None:
                        masks, iou, low = pred.predict_batch(
                            boxes=opt("in_boxes"), multimask_output=False
                        )
                    else:
                        parent = pre.split("refine/")[0]
                        coords = opt("in_point_coords")
                        labels = opt("in_point_labels")
                        if coords is None and parent != pre:
                            coords, labels = (
                                z.get(parent + "in_point_coords"),
                                z.get(parent + "in_point_labels"),
                            )
                        masks, iou, low = pred.predict(
                            coords, labels, opt("in_box"), opt("in_mask_input"),
                            multimask_output=pre.rstrip("/").endswith("mm1"),
                        )  # fmt: skip
                    worst["logit_max_abs"] = max(
                        worst["logit_max_abs"], float(np.abs(low - z[pre + "low_res_logits"]).max())
                    )
                    worst["iou_max_abs"] = max(
                        worst["iou_max_abs"], float(np.abs(iou - z[pre + "iou"]).max())
                    )
                    worst["mask_mismatch"] = max(
                        worst["mask_mismatch"], float((masks != z[pre + "masks"]).mean())
                    )
    worst["ok"] = (
        worst["feature_max_abs"] <= 1e-3
        and worst["logit_max_abs"] <= 5e-3
        and worst["iou_max_abs"] <= 1e-3
        and worst["mask_mismatch"] <= 1e-3
    )
    return worst


def _match_fraction(ours, ref, min_iou) -> float:
    ref = [r for r in ref if r["area"] > 0]
    if not ref:
        return 1.0
    om = [rle_to_mask(o["segmentation"]) for o in ours]
    hits = 0
    for r in ref:
        rm = rle_to_mask(r["segmentation"])
        best = max(((m & rm).sum() / max((m | rm).sum(), 1) for m in om), default=0.0)
        hits += best >= min_iou
    return hits / len(ref)


def check_everything(golden: Path, model) -> dict:
    out = {}
    for path in sorted(golden.glob("*_amg*_*.json")):
        case = json.loads(path.read_text())
        image = np.asarray(
            __import__("PIL.Image").Image.open(golden / case["image"]).convert("RGB")
        )
        res = {}
        for mode in ("reference", "fast"):
            gen = MaskGenerator(
                model, **case["params"], mode=mode, nms="box", output_mode="uncompressed_rle"
            )
            recs = gen.generate(image)
            res[mode] = {
                "count": len(recs),
                "nonempty_matched_099": _match_fraction(recs, case["annotations"], 0.99),
                "nonempty_matched_095": _match_fraction(recs, case["annotations"], 0.95),
            }
        res["reference_count_equal"] = res["reference"]["count"] == len(case["annotations"])
        out[path.stem] = res
    return out


def check_precision(golden: Path, model, precision: str) -> dict:
    """Mask IoU of the ``precision`` encoder against float32 over every golden call."""
    from benchmarks.bench_backends import _golden_calls, _iou

    fp32, low = Predictor(model), Predictor(model, precision=precision)
    ious = []
    for npz_path in sorted(golden.glob("*_cases.npz")):
        with np.load(npz_path) as npz:
            for name in sorted({k.split("/")[0] for k in npz.files}):
                if not (golden / "images" / f"public_{name}.png").exists():
                    continue
                image = _image(golden, name)
                fp32.set_image(image)
                low.set_image(image)
                for _, method, kwargs in _golden_calls(npz, name):
                    a = getattr(fp32, method)(**kwargs)[0]
                    b = getattr(low, method)(**kwargs)[0]
                    a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
                    ious += [_iou(x, y) for x, y in zip(a, b, strict=True)]
    return {"n_masks": len(ious), "mean_iou": float(np.mean(ious)),
            "min_iou": float(np.min(ious)), "ok": bool(np.mean(ious) >= 0.98)}  # fmt: skip


def precision_timings(golden: Path, model, device, precisions, batch: int, quick: bool) -> dict:
    """Encoder latency at batch 1 and batched images/s, per precision (fp32 first)."""
    photo = _image(golden, "photo")
    if quick:
        photo = photo[:64, :64]
    reps = 2 if quick else 20
    out = {}
    for precision in ("fp32", *precisions):
        pred = Predictor(model, precision=precision)
        x = model.preprocess(
            torch.tensor(pred.transform.apply_image(photo), device=device)
            .permute(2, 0, 1)[None].float()
        )  # fmt: skip
        row = {"batch1": _time(lambda pred=pred, x=x: pred.encode(x), device, reps)}
        images = [photo] * batch
        t = _time(lambda pred=pred, im=images: pred.embed_images(im, batch_size=batch),
                  device, 1 if quick else 5)  # fmt: skip
        row["batched"] = {**t, "batch": batch, "images_per_s": batch / (t["median_ms"] / 1e3)}
        out[precision] = row
    return out


def compile_timings(model, device, precision: str, modes, quick: bool) -> dict:
    """Eager vs ``torch.compile`` encoder at batch 1 (the "where do they pay" question).

    For each mode (``"default"``; ``"reduce-overhead"`` adds CUDA graphs; ``"max-autotune"``)
    the compile time (first call), the median latency and the largest difference
    from the eager embedding, under the same autocast precision.
    """
    size = model.image_encoder.img_size
    x = torch.randn(1, 3, size, size, device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    reps = 1 if quick else 30

    def under_autocast(fn):
        def run():
            if dtype is None:
                return fn(x)
            with torch.autocast(device.type, dtype=dtype):
                return fn(x).float()

        return run

    encoder = model.image_encoder
    eager = under_autocast(encoder)
    with torch.inference_mode():
        ref = eager()
        out = {
            "precision": precision,
            "eager": _time(eager, device, reps, warmup=0 if quick else 2),
        }
        for mode in modes:
            torch._dynamo.reset()
            compiled = under_autocast(torch.compile(encoder, mode=mode))
            t0 = time.perf_counter()
            first = compiled()
            _sync(device)
            row = {"compile_s": time.perf_counter() - t0,
                   "max_abs_diff": float((first - ref).abs().max())}  # fmt: skip
            row.update(_time(compiled, device, reps, warmup=0 if quick else 2))
            row["ratio_to_eager"] = row["median_ms"] / out["eager"]["median_ms"]
            out[mode] = row
    return out


def timings(golden: Path, device, quick: bool) -> dict:
    weights = golden / "mobile_sam_random.pt"
    fast_model = load_model("vit_t", weights, device=device)
    ref_model = load_model("vit_t", weights, device=device, fuse=False)
    photo = _image(golden, "photo")
    reps = 3 if quick else 20
    out = {}
    x = torch.randn(1, 3, 1024, 1024, device=device) if not quick else None
    with torch.inference_mode():
        if x is not None:
            out["encoder_b1"] = {
                "ours": _time(lambda: fast_model.image_encoder(x), device, reps),
                "reference": _time(lambda: ref_model.image_encoder(x), device, reps),
            }
        fast = Predictor(fast_model)
        ref = Predictor(ref_model, decoder_cache=False, factorized=False)
        fast.set_image(photo)
        ref.set_image(photo)
        pt = (np.array([[400.0, 300.0]]), np.array([1]))
        out["predict_1pt"] = {
            "ours": _time(lambda: fast.predict(*pt), device, reps * 3),
            "reference": _time(lambda: ref.predict(*pt), device, reps * 3),
        }
        side = 64 if quick else 1024
        grid = 4 if quick else 32
        image = np.ascontiguousarray(np.resize(photo, (side, side, 3)))
        cases = (
            ("default", {}, "mask", 3),
            ("all_pass", {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}, "box", 1),
        )
        for label, params, fast_nms, reps_everything in cases:
            row = {}
            for mode, nms in (("fast", fast_nms), ("reference", "box")):
                gen = MaskGenerator(fast_model, points_per_side=grid, mode=mode, nms=nms, **params)
                n: list[int] = []
                row[mode] = _time(
                    lambda gen=gen, n=n: n.append(len(gen.generate(image))),
                    device,
                    1 if quick else reps_everything,
                    warmup=1 if reps_everything > 1 and not quick else 0,
                )
                row[mode]["objects"] = n[-1]
                row[mode]["nms"] = nms
            out[f"everything_{grid}x{grid}_{side}px_{label}"] = row
            # device mode's label image (the GPU path) against reference mode's records
            gen = MaskGenerator(fast_model, points_per_side=grid, mode="device", nms="box",
                                **params)  # fmt: skip
            n = []
            dev_row = {
                "ours": _time(
                    lambda gen=gen, n=n: n.append(int(gen.generate_labels(image).max())),
                    device, 1 if quick else reps_everything,
                    warmup=1 if reps_everything > 1 and not quick else 0,
                ),
                "reference": row["reference"],
            }  # fmt: skip
            dev_row["ours"]["objects"] = n[-1]
            out[f"everything_{grid}x{grid}_{side}px_{label}_device_labels"] = dev_row
    return out


def report(result: dict) -> str:
    lines = [
        f"device: {result['device']} | {result['machine'].get('gpu', result['machine']['cpu'])}"
    ]
    p = result["predictor_check"]
    lines.append(
        f"golden predictor: features {p['feature_max_abs']:.1e}, logits {p['logit_max_abs']:.1e}, "
        f"iou {p['iou_max_abs']:.1e}, masks {p['mask_mismatch']:.1e} "
        f"-> {'OK' if p['ok'] else 'FAIL'}"
    )
    for name, r in result["everything_check"].items():
        lines.append(
            f"golden {name}: reference {r['reference']['count']} masks (equal count: "
            f"{r['reference_count_equal']}, matched {r['reference']['nonempty_matched_099']:.2f}), "
            f"fast {r['fast']['count']} (matched {r['fast']['nonempty_matched_095']:.2f})"
        )
    for prec, r in result.get("precision_check", {}).items():
        lines.append(
            f"{prec} encoder vs fp32, {r['n_masks']} golden masks: mean IoU {r['mean_iou']:.4f}, "
            f"min {r['min_iou']:.4f} -> {'OK' if r['ok'] else 'FAIL'}"
        )
    for prec, r in result.get("precision_timings", {}).items():
        b = r["batched"]
        lines.append(
            f"encoder {prec:5}: batch 1 {r['batch1']['median_ms']:.2f} ms, batch {b['batch']} "
            f"{b['images_per_s']:.1f} images/s (incl. resize + normalise)"
        )
    comp = result.get("compile")
    if comp:
        lines.append(
            f"torch.compile, encoder batch 1, {comp['precision']}: eager "
            f"{comp['eager']['median_ms']:.2f} ms"
        )
        for mode, r in comp.items():
            if isinstance(r, dict) and "compile_s" in r:
                lines.append(
                    f"  {mode:16} {r['median_ms']:.2f} ms ({r['ratio_to_eager']:.2f}x eager), "
                    f"compiled in {r['compile_s']:.0f} s, max |diff| {r['max_abs_diff']:.1e}"
                )
    lines.append(f"{'':44} {'ours ms':>10} {'reference ms':>13} {'ratio':>7}")
    for name, r in result["timings"].items():
        ours = r.get("ours", r.get("fast"))
        lines.append(
            f"{name:44} {ours['median_ms']:10.1f} {r['reference']['median_ms']:13.1f} "
            f"{ours['median_ms'] / r['reference']['median_ms']:6.2f}x"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", required=True, type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu.json")
    parser.add_argument("--precisions", nargs="*", choices=["bf16", "fp16"], default=None,
                        help="reduced precisions to check and time [CUDA: bf16 fp16]")  # fmt: skip
    parser.add_argument("--batch", type=int, default=16, help="batched encoder size [16]")
    parser.add_argument("--compile", nargs="*", default=None, metavar="MODE",
                        choices=["default", "reduce-overhead", "max-autotune"],
                        help="also time torch.compile'd encoders in these modes [none; with no "
                        "MODE: default and reduce-overhead (CUDA graphs) on CUDA, default on "
                        "CPU]")  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = load_model("vit_t", args.golden / "mobile_sam_random.pt", device=device)
    result = {"device": str(device), "machine": machine()}
    precisions = args.precisions
    if precisions is None:
        precisions = ["bf16", "fp16"] if device.type == "cuda" else []
    start = time.perf_counter()

    def stage(name: str, fn) -> None:
        """Run one part and save what is done so far (a run cut short keeps its results)."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            result[name] = fn()
        took, total = time.perf_counter() - t0, time.perf_counter() - start
        print(f"[gpu.py] {name}: {took:.0f} s ({total:.0f} s in all)", file=sys.stderr, flush=True)
        if args.out:
            write_json(args.out / "gpu.json", result)

    # correctness first, then the targets' timings, then the optional compile study
    stage("predictor_check", lambda: check_predictor(args.golden, model, device))
    stage("precision_check",
          lambda: {p: check_precision(args.golden, model, p) for p in precisions})  # fmt: skip
    batch, quick = (2 if args.quick else args.batch), args.quick

    def timed_precisions():
        return precision_timings(args.golden, model, device, precisions, batch, quick)

    stage("precision_timings", timed_precisions)
    stage("timings", lambda: timings(args.golden, device, args.quick))
    stage("everything_check",
          lambda: {} if args.quick else check_everything(args.golden, model))  # fmt: skip
    if args.compile is not None:
        modes = args.compile or (
            ["default", "reduce-overhead"] if device.type == "cuda" else ["default"]
        )
        precision = resolve_precision("auto", device)
        stage("compile", lambda: compile_timings(model, device, precision, modes, args.quick))
    print(report(result), flush=True)
    ok = result["predictor_check"]["ok"] and all(
        r["ok"] for r in result["precision_check"].values()
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
