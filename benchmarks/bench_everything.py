"""Segment everything: fast mode vs reference mode vs the original, time and peak memory.

Each configuration runs in a fresh child process (so its peak memory is its own)
on the same image and weights; the parent prints a table with ratios and
optionally writes JSON. Default thresholds unless ``--all-pass``. The original is
segment-anything's ``SamAutomaticMaskGenerator`` when it is installed (see
``benchmarks/original.py``); otherwise its column says why it is missing.

Usage::

    python benchmarks/bench_everything.py [--grids 16 32] [--large 4096] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import default_image, default_weights, machine, write_json


def _child(args: argparse.Namespace) -> dict:
    import torch

    from napari_mobilesam.build import load_model
    from napari_mobilesam.everything import MaskGenerator

    image = default_image()
    if args.size:
        reps = (-(-args.size // image.shape[0]), -(-args.size // image.shape[1]), 1)
        image = np.ascontiguousarray(np.tile(image, reps)[: args.size, : args.size])
    weights = args.weights or default_weights()
    params = {"points_per_side": args.grid}
    if args.all_pass:
        params.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    nms = "box" if args.mode in ("reference", "original") else args.nms
    if args.mode == "original":
        from benchmarks import original

        try:
            orig = original.load(weights)
        except original.OriginalUnavailable as exc:
            return {"mode": "original", "unavailable": str(exc)}
        gen = orig.generator(**params)
    else:
        model = load_model("vit_t", weights, device="cpu")
        gen = MaskGenerator(model, **params, mode=args.mode, nms=nms)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.inference_mode():
        records = gen.generate_labels(image) if args.labels else gen.generate(image)
    seconds = time.perf_counter() - t0
    n = int(records.max()) if args.labels else len(records)
    return {
        "mode": args.mode,
        **({"what": orig.describe()} if args.mode == "original" else {}),
        "nms": nms,
        "grid": args.grid,
        "image_size": list(image.shape[:2]),
        "seconds": seconds,
        "objects": n,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_generate_mb": rss_before / 1024,
    }


def run_case(mode: str, grid: int, *, weights=None, size=None, all_pass=False, nms="mask",
             labels=False, timeout=3600) -> dict:  # fmt: skip
    """One configuration in a child process; returns its result dict."""
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--grid", str(grid), "--nms", nms]
    if weights:
        cmd += ["--weights", str(weights)]
    if size:
        cmd += ["--size", str(size)]
    if all_pass:
        cmd.append("--all-pass")
    if labels:
        cmd.append("--labels")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(grids=(16, 32), large=4096, large_grid=8, weights=None, all_pass=False,
        with_original=True) -> dict:  # fmt: skip
    """Each grid in fast, reference and (when installed) original mode; see the module doc.

    Every row has ``fast``, ``reference``, ``time_ratio`` (fast / reference) and, with
    ``with_original``, ``original`` (its result, or ``{"unavailable": why}``) and, when
    it ran, ``original_ratio`` (fast / original).
    """
    rows = []
    for grid in grids:
        fast = run_case("fast", grid, weights=weights, all_pass=all_pass)
        ref = run_case("reference", grid, weights=weights, all_pass=all_pass)
        row = {"grid": grid, "fast": fast, "reference": ref,
               "time_ratio": fast["seconds"] / ref["seconds"]}  # fmt: skip
        if with_original:
            row["original"] = orig = run_case("original", grid, weights=weights, all_pass=all_pass)
            if "seconds" in orig:
                row["original_ratio"] = fast["seconds"] / orig["seconds"]
        rows.append(row)
    result = {"benchmark": "everything", "machine": machine(), "all_pass": all_pass, "rows": rows}
    if large:
        result["large"] = run_case("fast", large_grid, weights=weights, size=large, labels=True)
    return result


def report(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Segment everything, {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}"
        + (", all masks pass the filters" if result["all_pass"] else ", default thresholds"),
        f"{'grid':>6} {'image':>10} {'fast s':>8} {'ref s':>8} {'fast/ref':>9} "
        f"{'fast MB':>8} {'ref MB':>8} {'objects f/r':>12}",
    ]
    for r in result["rows"]:
        f, ref = r["fast"], r["reference"]
        size = "x".join(map(str, f["image_size"]))
        lines.append(
            f"{r['grid']:>4}^2 {size:>10} {f['seconds']:8.1f} {ref['seconds']:8.1f} "
            f"{r['time_ratio']:8.2f}x {f['peak_rss_mb']:8.0f} {ref['peak_rss_mb']:8.0f} "
            f"{f['objects']:>5}/{ref['objects']}"
        )
        orig = r.get("original")
        if orig and "seconds" in orig:
            lines.append(
                f"{'':>6} original ({orig['what']}): {orig['seconds']:.1f} s, "
                f"fast/original {r['original_ratio']:.2f}x, {orig['peak_rss_mb']:.0f} MB, "
                f"{orig['objects']} objects"
            )
        elif orig:
            lines.append(f"{'':>6} original not timed: {orig['unavailable']}")
    if "large" in result:
        g = result["large"]
        lines.append(
            f"large image {g['image_size'][0]}x{g['image_size'][1]} (fast, {g['grid']}^2 grid per "
            f"crop, label image): {g['seconds']:.1f} s, peak memory {g['peak_rss_mb']:.0f} MB "
            f"({g['rss_before_generate_mb']:.0f} MB before generate), {g['objects']} objects"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--large", type=int, default=4096, help="side of the large image (0: skip)")
    parser.add_argument("--large-grid", type=int, default=8)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--all-pass", action="store_true", help="thresholds 0: every mask passes")
    parser.add_argument("--no-original", action="store_true", help="do not time the original")
    parser.add_argument("--json", default=None)
    # internal: one configuration in this process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="fast", help=argparse.SUPPRESS)
    parser.add_argument("--grid", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--nms", default="mask", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--labels", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    result = run(
        args.grids,
        args.large,
        args.large_grid,
        args.weights,
        args.all_pass,
        with_original=not args.no_original,
    )
    print(report(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
