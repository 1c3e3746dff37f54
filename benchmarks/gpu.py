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

The checks live in ``benchmarks/gpu_checks.py``. Runs on CPU too (small sizes with
``--quick``), which is how the tests keep it working::

    python benchmarks/gpu.py --golden DIR [--device cuda] [--quick] [--out DIR]
        [--precisions bf16 fp16] [--batch 16] [--compile [MODE ...]]

``DIR`` holds ``mobile_sam_random.pt``, ``images/public_*.png``, a
``*_cases.npz`` in the golden format and ``*_amg*_*.json`` cases.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from benchmarks._common import machine, write_json
from benchmarks.gpu_checks import (
    check_everything,
    check_precision,
    check_predictor,
    check_resize,
    golden_image,
    sync,
    time_fn,
)
from napari_mobilesam.build import load_model
from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.predictor import Predictor, resolve_precision


def precision_timings(golden: Path, model, device, precisions, batch: int, quick: bool) -> dict:
    """Encoder latency at batch 1 and batched images/s, per precision (fp32 first).

    ``batch1`` is the predictor's default path (CUDA graphs on a GPU), ``batch1_eager``
    the same without graphs, and ``graph_max_abs_diff`` the largest difference
    between their embeddings.
    """
    photo = golden_image(golden, "photo")
    if quick:
        photo = photo[:64, :64]
    reps, warm = (1, 0) if quick else (20, 2)
    out = {}
    for precision in ("fp32", *precisions):
        pred = Predictor(model, precision=precision)
        eager = Predictor(model, precision=precision, cuda_graphs=False)
        x = model.preprocess(
            torch.tensor(pred.transform.apply_image(photo), device=device)
            .permute(2, 0, 1)[None].float()
        )  # fmt: skip
        row = {
            "batch1": time_fn(lambda pred=pred, x=x: pred.encode(x), device, reps, warm),
            "cuda_graphs": pred.uses_cuda_graphs,
        }
        if pred.uses_cuda_graphs:
            row["batch1_eager"] = time_fn(lambda p=eager, x=x: p.encode(x), device, reps, warm)
            row["graph_max_abs_diff"] = float((pred.encode(x) - eager.encode(x)).abs().max())
        else:  # no graphs (CPU): the default path is the eager one, timed once
            row["batch1_eager"], row["graph_max_abs_diff"] = row["batch1"], 0.0
        images = [photo] * batch
        if quick and batch == 1:  # (tests) embed_images of one image: the batch1 encode
            t = row["batch1"]  # plus preprocessing; a bf16 CPU encode costs 15-30 s
        else:
            t = time_fn(lambda pred=pred, im=images: pred.embed_images(im, batch_size=batch),
                        device, 1 if quick else 5, warm)  # fmt: skip
        row["batched"] = {**t, "batch": batch, "images_per_s": batch / (t["median_ms"] / 1e3)}
        if batch == 1:  # the encoder alone at batch 1 is what batch1 timed
            t = row["batch1"]
        else:
            xb = x.expand(batch, -1, -1, -1).contiguous()
            t = time_fn(lambda pred=pred, xb=xb: pred.encode(xb), device, 1 if quick else 10, warm)
        row["batched_encoder_only"] = {**t, "batch": batch,
                                       "images_per_s": batch / (t["median_ms"] / 1e3)}  # fmt: skip
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
            "eager": time_fn(eager, device, reps, warmup=0 if quick else 2),
        }
        for mode in modes:
            torch._dynamo.reset()
            compiled = under_autocast(torch.compile(encoder, mode=mode))
            t0 = time.perf_counter()
            first = compiled()
            sync(device)
            row = {"compile_s": time.perf_counter() - t0,
                   "max_abs_diff": float((first - ref).abs().max())}  # fmt: skip
            row.update(time_fn(compiled, device, reps, warmup=0 if quick else 2))
            row["ratio_to_eager"] = row["median_ms"] / out["eager"]["median_ms"]
            out[mode] = row
    return out


def _original(weights: Path, device):
    """The original pipeline on ``device`` (``benchmarks/original.py``), or the reason not."""
    from benchmarks import original

    try:
        orig = original.load(weights)
    except original.OriginalUnavailable as exc:
        return None, str(exc)
    orig.sam.to(device)
    return orig, orig.describe()


def timings(golden: Path, device, quick: bool, out: dict, save=lambda: None) -> dict:
    """Ours vs the reference mode (and the original code where it imports), into ``out``.

    ``save`` is called after each row, so a run cut short keeps the rows it finished.
    """
    weights = golden / "mobile_sam_random.pt"
    fast_model = load_model("vit_t", weights, device=device)
    ref_model = load_model("vit_t", weights, device=device, optimize=False)
    orig, what = _original(weights, device)
    out["original"] = {"available": orig is not None, "what": what}
    photo = golden_image(golden, "photo")
    reps = 1 if quick else 20

    def row(name, r):
        out[name] = r
        save()

    image, grid, name_of = _everything_case(golden, quick)
    with torch.inference_mode():
        if not quick:
            x = torch.randn(1, 3, 1024, 1024, device=device)
            ours = Predictor(fast_model)
            r = {
                "ours": time_fn(lambda: ours.encode(x), device, reps),
                "reference": time_fn(lambda: ref_model.image_encoder(x), device, reps),
            }
            if orig is not None:
                r["original"] = time_fn(lambda: orig.sam.image_encoder(x), device, reps)
            row("encoder_b1", r)
        fast = Predictor(fast_model)
        ref = Predictor(ref_model, decoder_cache=False, factorized=False, cuda_graphs=False)
        fast.set_image(photo)
        ref.set_image(photo)
        pt = (np.array([[400.0, 300.0]]), np.array([1]))
        r = {"ours": time_fn(lambda: fast.predict(*pt), device, reps * 3),
             "reference": time_fn(lambda: ref.predict(*pt), device, reps * 3)}  # fmt: skip
        if orig is not None:
            orig.predictor.set_image(photo)
            r["original"] = time_fn(lambda: orig.predictor.predict(*pt), device, reps * 3)
            r["original_set_image"] = time_fn(lambda: orig.predictor.set_image(photo), device, reps)
            r["ours_set_image"] = time_fn(lambda: fast.set_image(photo), device, reps)
        row("predict_1pt", r)
        cases = (
            ("default", {}, "mask", 3),
            ("all_pass", ALL_PASS, "box", 1),
        )
        for label, params, fast_nms, reps_everything in cases:
            n_reps = 1 if quick else reps_everything
            warm = 1 if reps_everything > 1 and not quick else 0
            name = name_of(label)

            def timed(fn, count, n_reps=n_reps, warm=warm):
                n: list[int] = []
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t = time_fn(lambda: n.append(count(fn())), device, n_reps, warmup=warm)
                if device.type == "cuda":
                    t["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                return {**t, "objects": n[-1]}

            r = {}
            precisions = ("fp32", resolve_precision("auto", device))
            for precision in dict.fromkeys(precisions):
                gen = MaskGenerator(fast_model, points_per_side=grid, mode="fast", nms=fast_nms,
                                    precision=precision, **params)  # fmt: skip
                key = "fast" if precision == "fp32" else f"fast_{precision}"
                r[key] = {**timed(lambda gen=gen: gen.generate(image), len), "nms": fast_nms}
                # device mode's label image (the GPU path)
                gen = MaskGenerator(fast_model, points_per_side=grid, mode="device", nms="box",
                                    precision=precision, **params)  # fmt: skip
                r[key.replace("fast", "device_labels")] = timed(
                    lambda gen=gen: gen.generate_labels(image), lambda lab: int(lab.max())
                )
                row(name, r)
            # the library's defaults (mode="auto", nms="auto") at precision="auto"
            gen = MaskGenerator(fast_model, points_per_side=grid, precision="auto", **params)
            r["defaults_auto_precision"] = {
                **timed(lambda gen=gen: gen.generate_labels(image), lambda lab: int(lab.max())),
                "mode": gen.mode, "nms": gen.nms,
            }  # fmt: skip
            row(name, r)
            if orig is not None and label == "default":  # all-pass: 109 s (issue 8)
                gen = orig.generator(points_per_side=grid, **params)
                r["original"] = timed(lambda gen=gen: gen.generate(image), len)
                row(name, r)
            if label == "default":  # all-pass: its own last stage (slow, unknown time)
                r["reference"] = _reference_everything(fast_model, image, grid, params, device)
                row(name, r)
    return out


def _everything_case(golden: Path, quick: bool):
    """(image, grid, name of a case's row): 1024 px and 32x32 (64 px and 4x4 quick)."""
    side, grid = (64, 4) if quick else (1024, 32)
    image = np.ascontiguousarray(np.resize(golden_image(golden, "photo"), (side, side, 3)))
    return image, grid, lambda label: f"everything_{grid}x{grid}_{side}px_{label}"


ALL_PASS = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def _reference_everything(model, image, grid, params, device) -> dict:
    gen = MaskGenerator(model, points_per_side=grid, mode="reference", nms="box", **params)
    n: list[int] = []
    t = time_fn(lambda: n.append(len(gen.generate(image))), device, 1, warmup=0)
    return {**t, "objects": n[-1], "nms": "box"}


def all_pass_reference(golden: Path, device, quick: bool, out: dict) -> dict:
    """The reference mode's all-pass row (every mask kept: the slowest run, so last)."""
    model = load_model("vit_t", golden / "mobile_sam_random.pt", device=device)
    image, grid, name_of = _everything_case(golden, quick)
    with torch.inference_mode():
        row = out.setdefault(name_of("all_pass"), {})
        row["reference"] = _reference_everything(model, image, grid, ALL_PASS, device)
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
            f"fast {r['fast']['count']} (matched {r['fast']['nonempty_matched_095']:.2f}); "
            f"auto precision vs fp32 fast: {r['auto_precision_vs_fp32']['count']} masks, "
            f"matched {r['auto_precision_vs_fp32']['matched_095']:.2f}"
        )
    r = result.get("resize_check")
    if r and "sizes" in r:
        lines.append(
            f"device resize vs Pillow {r['pillow']}: {r['sizes']} sizes (passes: vertical "
            f"first {r['vertical_first']}, horizontal first {r['horizontal_first']}, Pillow "
            f"only {r['pillow_only']}), mismatched {r['mismatched']} -> "
            f"{'OK' if r['ok'] else 'FAIL'}"
        )
    for prec, r in result.get("precision_check", {}).items():
        lines.append(
            f"{prec} encoder vs fp32, {r['n_masks']} golden masks: mean IoU {r['mean_iou']:.4f}, "
            f"min {r['min_iou']:.4f} -> {'OK' if r['ok'] else 'FAIL'}"
        )
    for prec, r in result.get("precision_timings", {}).items():
        b, e = r["batched"], r["batched_encoder_only"]
        graphs = "CUDA graphs" if r["cuda_graphs"] else "eager"
        lines.append(
            f"encoder {prec:5}: batch 1 {r['batch1']['median_ms']:.2f} ms ({graphs}; eager "
            f"{r['batch1_eager']['median_ms']:.2f} ms, max |diff| {r['graph_max_abs_diff']:.1e}); "
            f"batch {b['batch']} {b['images_per_s']:.1f} images/s incl. resize + normalise, "
            f"{e['images_per_s']:.1f} encoder only"
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
    t = result.get("timings", {})
    if "original" in t:
        lines.append(f"original code: {t['original']['what']}")
    lines.append(f"{'':52} {'ms':>9} {'/ reference':>12} {'/ original':>11}")
    for name, r in t.items():
        if name == "original":
            continue
        ref, orig = r.get("reference"), r.get("original")
        for key, v in r.items():
            if not isinstance(v, dict) or "median_ms" not in v or key == "reference":
                continue
            set_image = key.endswith("set_image")
            to_ref = None if key.startswith("original") or set_image else ref
            to_orig = r.get("original_set_image") if key == "ours_set_image" else orig
            to_orig = None if key.startswith("original") else to_orig
            ratios = "".join(
                f"{v['median_ms'] / b['median_ms']:11.2f}x" if b else f"{'':12}"
                for b in (to_ref, to_orig)
            )
            lines.append(f"{name + ' ' + key:52} {v['median_ms']:9.1f} {ratios}")
        if ref:
            lines.append(f"{name + ' reference':52} {ref['median_ms']:9.1f}")
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
    stage("resize_check", lambda: check_resize(device, args.quick))
    stage("precision_check",
          lambda: {p: check_precision(args.golden, model, p, max_images=1 if args.quick else None)
                   for p in precisions})  # fmt: skip
    batch, quick = (1 if args.quick else args.batch), args.quick

    def timed_precisions():
        return precision_timings(args.golden, model, device, precisions, batch, quick)

    stage("precision_timings", timed_precisions)

    def save() -> None:
        if args.out:
            write_json(args.out / "gpu.json", result)

    timed = result.setdefault("timings", {})
    stage("timings", lambda: timings(args.golden, device, args.quick, timed, save))
    stage("everything_check",
          lambda: {} if args.quick else check_everything(args.golden, model))  # fmt: skip
    if args.compile is not None:
        modes = args.compile or (
            ["default", "reduce-overhead"] if device.type == "cuda" else ["default"]
        )
        precision = resolve_precision("auto", device)
        stage("compile", lambda: compile_timings(model, device, precision, modes, args.quick))
    # last: the original all-pass generator is the slowest stage by far
    stage("timings", lambda: all_pass_reference(args.golden, device, args.quick, timed))
    print(report(result), flush=True)
    ok = (
        result["predictor_check"]["ok"]
        and result["resize_check"]["ok"]
        and all(r["ok"] for r in result["precision_check"].values())
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
