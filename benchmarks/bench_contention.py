"""Speed on a busy machine: ours and the original, quiet and beside busy processes.

One process, one run, the same image and weights (the golden checkpoint and photo). For
each load in ``--competitors`` (default 0 and 1: quiet, then one ``yes > /dev/null``
per competitor, started ``--settle`` seconds before timing so the thread policy has
seen them), interleaved, medians:

- encoder (``set_image``) and a one-point ``predict``: ours with the adaptive thread
  policy (:mod:`napari_mobilesam.engine.threads`, the default), ours as the viewer
  answers a click (``predict_low_res``, the best of the 3 masks upsampled), ours with a
  fixed thread count (the policy off: every torch thread, whatever the load), the original
  (segment-anything's ``SamPredictor``, ``benchmarks/original.py``);
- segment everything (a ``--grid`` x ``--grid`` point grid, default thresholds): our fast
  mode (adaptive threads, prompt batches on worker threads: :mod:`napari_mobilesam.engine.workers`),
  fast mode with its batches in the calling thread (as before the workers), fast mode with a
  fixed thread count, our reference mode, the original ``SamAutomaticMaskGenerator``.

Printed: each time, its slowdown from the quiet run, and the ratios the performance
targets are stated in (ours / original; fast vs reference mode).

Usage::

    python benchmarks/bench_contention.py [--competitors 0,1] [--repeats 5] [--grid 8]
        [--settle 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import default_image, default_weights, interleaved, machine, write_json


@contextmanager
def competitors(n: int, settle: float):
    """``n`` busy processes (``yes > /dev/null``) for the duration of the block."""
    procs = [
        subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(n)
    ]
    try:
        time.sleep(settle if n else 0.0)
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        time.sleep(settle if n else 0.0)  # the policy sees the machine quiet again


@contextmanager
def fixed_threads():
    """The adaptive policy off: every torch thread the process had."""
    from napari_mobilesam.engine import threads

    adaptive = threads.ADAPTIVE
    base, enabled = adaptive.base(), adaptive.enabled
    adaptive.enabled = False
    torch.set_num_threads(base)
    try:
        yield
    finally:
        adaptive.enabled = enabled


@contextmanager
def serial_batches(generator):
    """Segment-everything's prompt batches in the calling thread, on its torch threads
    (``Policy.cpu_batch_workers`` off: how fast mode ran before batch workers)."""
    import dataclasses

    engine = generator.pipeline.engine
    before = engine.policy
    engine.policy = dataclasses.replace(before, cpu_batch_workers=False)
    try:
        yield
    finally:
        engine.policy = before


def _timed_serial(generator, image):
    def run():
        with serial_batches(generator):
            return generator.generate(image)

    return run


def _timed_fixed(f):
    def run():
        with fixed_threads():
            return f()

    return run


def run(
    competitor_counts=(0, 1),
    repeats=5,
    grid=8,
    settle=2.0,
    weights=None,
    image=None,
    with_original=True,
):
    """Time every case under every load; JSON-able result (tests run it tiny, without
    the original, whose imports they keep out of the test process)."""
    from benchmarks import original
    from napari_mobilesam.build import load_model
    from napari_mobilesam.engine import threads
    from napari_mobilesam.everything import MaskGenerator
    from napari_mobilesam.predictor import Predictor

    image = default_image() if image is None else image
    weights = weights or default_weights()
    model = load_model("vit_t", weights, device="cpu")
    ours = Predictor(model)
    ours.set_image(image)
    orig, orig_info = None, "not asked"
    if with_original:
        try:
            orig = original.load(weights)
            orig.predictor.set_image(image)
            orig_info = orig.describe()
        except original.OriginalUnavailable as exc:
            orig_info = str(exc)
    point = (np.array([[image.shape[1] * 0.6, image.shape[0] * 0.4]]), np.array([1]))
    fast = MaskGenerator(model, points_per_side=grid, mode="fast")
    reference = MaskGenerator(model, points_per_side=grid, mode="reference", nms="box")
    encoders = {
        "ours": lambda: ours.set_image(image),
        "ours, fixed threads": _timed_fixed(lambda: ours.set_image(image)),
    }
    predicts = {
        "ours": lambda: ours.predict(*point),
        "ours, click": lambda: _click(ours, point),
        "ours, fixed threads": _timed_fixed(lambda: ours.predict(*point)),
    }
    everything = {
        "ours fast": lambda: fast.generate(image),
        "ours fast, batches in one thread": _timed_serial(fast, image),
        "ours fast, fixed threads": _timed_fixed(lambda: fast.generate(image)),
        "ours reference mode": lambda: reference.generate(image),
    }
    if orig is not None:
        gen = orig.generator(points_per_side=grid)
        encoders["original"] = lambda: orig.predictor.set_image(image)
        predicts["original"] = lambda: orig.predictor.predict(*point, multimask_output=True)
        everything["original"] = lambda: gen.generate(image)
    loads = {}
    for n in competitor_counts:
        with competitors(n, settle), torch.inference_mode():
            ours.predict(*point)  # a call under this load: the policy applies it
            seen = threads.ADAPTIVE.monitor.others_busy()
            times = {
                "encoder": interleaved(encoders, repeats),
                "predict": interleaved(predicts, repeats * 4),
                "everything": interleaved(everything, max(1, repeats // 2), warmup=0),
            }
            threads_now = torch.get_num_threads()
        loads[str(n)] = {
            "competitors": n,
            "others_busy_seen": seen,
            "threads": threads_now,
            "median_s": {
                case: {k: statistics.median(v) for k, v in t.items()} for case, t in times.items()
            },
            "times_s": times,
        }
    return {
        "benchmark": "contention",
        "machine": machine(),
        "image_size": list(image.shape[:2]),
        "grid": grid,
        "original": orig_info if orig is None else f"available: {orig_info}",
        "loads": loads,
        "summary": summarise(loads),
    }


def _click(predictor, point):
    """A click as the viewer answers it: the three candidates decoded, the best one
    upsampled (``predict`` upsamples all three, as the original does)."""
    scores, low_res, upsample = predictor.predict_low_res(*point)
    best = int(np.argmax(scores))
    return upsample(low_res[best : best + 1])


def summarise(loads: dict) -> dict:
    """Slowdowns from the quiet run and the target ratios, per load."""
    quiet = loads.get("0")
    out = {}
    for key, load in loads.items():
        med = load["median_s"]
        row: dict[str, float] = {}
        for case, times in med.items():
            for name, t in times.items():
                if quiet is not None:
                    row[f"{case} {name} slowdown"] = t / quiet["median_s"][case][name]
            if "original" in times:
                main = "ours fast" if case == "everything" else "ours"
                row[f"{case} ours/original"] = times[main] / times["original"]
        ev = med["everything"]
        row["everything reference/fast"] = ev["ours reference mode"] / ev["ours fast"]
        out[key] = row
    return out


def report(result: dict) -> str:
    lines = [f"image {result['image_size']}, everything {result['grid']}x{result['grid']}; "
             f"original: {result['original']}"]  # fmt: skip
    for key, load in result["loads"].items():
        seen = load["others_busy_seen"]
        seen_text = "n/a" if seen is None else f"{seen:.2f}"
        lines.append(
            f"\n{load['competitors']} busy competitor(s): policy saw {seen_text} CPUs busy, "
            f"ran {load['threads']} thread(s)"
        )
        summary = result["summary"][key]
        for case, times in load["median_s"].items():
            unit, scale = ("s", 1.0) if case == "everything" else ("ms", 1e3)
            for name, t in times.items():
                slow = summary.get(f"{case} {name} slowdown")
                slow_text = "" if slow is None else f"  ({slow:.2f}x quiet)"
                lines.append(f"  {case:10} {name:26} {t * scale:9.1f} {unit}{slow_text}")
        for name, value in summary.items():
            if "/" in name:
                lines.append(f"  {name:38} {value:6.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--competitors", default="0,1", help="busy processes per run [0,1]")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--grid", type=int, default=8, help="everything's points per side [8]")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds before timing [2]")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    counts = tuple(int(c) for c in args.competitors.split(","))
    result = run(counts, args.repeats, args.grid, args.settle)
    print(report(result))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
