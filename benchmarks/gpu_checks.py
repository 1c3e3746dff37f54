"""The correctness half of ``benchmarks/gpu.py``: fast paths against the golden outputs.

On the chosen device: predictor logits/IoU/masks against the golden cases, the device
resize against Pillow, segment-everything masks against the golden AMG cases, and the
reduced-precision encoder's masks against float32. Also the timing helpers both halves use.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.everything.rle import rle_to_mask
from napari_mobilesam.predictor import Predictor


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "n": repeats}


def golden_image(golden: Path, name: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(golden / "images" / f"public_{name}.png").convert("RGB"))


def check_predictor(golden: Path, model, device) -> dict:
    """Golden predictor cases on ``device``: worst differences over all cases."""
    worst = {"feature_max_abs": 0.0, "logit_max_abs": 0.0, "iou_max_abs": 0.0, "mask_mismatch": 0.0}
    pred = Predictor(model)
    for npz in sorted(golden.glob("*_cases.npz")):
        with np.load(npz) as z:
            for name in sorted({k.split("/")[0] for k in z.files}):
                pred.set_image(golden_image(golden, name))
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


def check_resize(device, quick: bool) -> dict:
    """The device resize (set_image on GPUs) against Pillow, byte for byte: each size
    twice (the first call learns Pillow's pass order, the second runs on the device)."""
    import PIL

    from napari_mobilesam import transforms
    from napari_mobilesam.accel.resize import PillowResize

    rng = np.random.default_rng(0)
    resize = PillowResize(1024)
    sizes = [(770, 769), (3000, 200), (2001, 1000), (2048, 1536), (97, 1203), (1677, 7)]
    sizes += [tuple(int(v) for v in rng.integers(1, 2500, 2)) for _ in range(4 if quick else 40)]
    bad = []
    for size in sizes:
        img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        expected = transforms.resize_longest_side(img, 1024)
        for _ in range(2):
            ours = resize(torch.from_numpy(img).to(device).permute(2, 0, 1))
            if not np.array_equal(ours.permute(1, 2, 0).cpu().numpy(), expected):
                bad.append(list(size))
    orders = list(resize.pass_order.values())
    return {"pillow": PIL.__version__, "sizes": len(sizes), "mismatched": bad, "ok": not bad,
            "vertical_first": orders.count(True), "horizontal_first": orders.count(False),
            "pillow_only": orders.count(None)}  # fmt: skip


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
        fast = {"mode": "fast", "nms": "box", "output_mode": "uncompressed_rle"}
        fp32 = MaskGenerator(model, **case["params"], **fast).generate(image)
        low = MaskGenerator(model, **case["params"], **fast, precision="auto").generate(image)
        res["auto_precision_vs_fp32"] = {
            "count": [len(low), len(fp32)],
            "matched_095": _match_fraction(low, fp32, 0.95),
        }
        res["reference_count_equal"] = res["reference"]["count"] == len(case["annotations"])
        out[path.stem] = res
    return out


def check_precision(golden: Path, model, precision: str, max_images: int | None = None) -> dict:
    """Mask IoU of the ``precision`` encoder against float32 over every golden call.

    ``max_images`` limits the golden images used (the quick run: one, as a bf16 encoder on a
    CPU without bfloat16 units takes about 15 s per image).
    """
    from benchmarks.bench_backends import _golden_calls, _iou

    fp32, low = Predictor(model), Predictor(model, precision=precision)
    ious, done = [], set()
    for npz_path in sorted(golden.glob("*_cases.npz")):
        with np.load(npz_path) as npz:
            for name in sorted({k.split("/")[0] for k in npz.files}):
                if not (golden / "images" / f"public_{name}.png").exists():
                    continue
                if max_images is not None and name not in done and len(done) >= max_images:
                    continue
                done.add(name)
                image = golden_image(golden, name)
                fp32.set_image(image)
                low.set_image(image)
                for _, method, kwargs in _golden_calls(npz, name):
                    a = getattr(fp32, method)(**kwargs)[0]
                    b = getattr(low, method)(**kwargs)[0]
                    a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
                    ious += [_iou(x, y) for x, y in zip(a, b, strict=True)]
    return {"n_masks": len(ious), "mean_iou": float(np.mean(ious)),
            "min_iou": float(np.min(ious)), "ok": bool(np.mean(ious) >= 0.98)}  # fmt: skip
