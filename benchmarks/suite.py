"""Every benchmark at one chosen size, one summary table of ours vs baseline, one JSON.

Each benchmark compares our path with a baseline path measured in the same run
(interleaved or in sibling child processes, see each script's docstring):

=============== ================================= =====================================
benchmark       ours                              baseline
=============== ================================= =====================================
predictor       fused encoder, cached decoder      the reference computation (unfused,
                                                   plain attention, no decoder cache),
                                                   and the original code when installed
everything      fast mode                          reference mode (the original's steps),
                                                   and the original code when installed
backends        onnxruntime fp32 / int8            our torch backend
batch           ``mobilesam-everything``           a naive per-plane reference loop
distill         precomputed teacher embeddings     teacher run on every batch (coupled)
store           ``mobilesam embed`` rerun after    the same command uninterrupted from
                a SIGKILL; a new-plane click       scratch; the click through the
                from the embedding store           encoder
=============== ================================= =====================================

"The original code" is segment-anything's predictor and generator around MobileSAM's
TinyViT (``benchmarks/original.py``: where it looks, how to install it); its rows are
missing, and ``results`` says why, when it is not installed.

Sizes: ``tiny`` (seconds; what the tests run, numbers meaningless), ``small`` (a few
minutes on 2 CPU cores: the real vit_t, one 16x16 everything grid, a 4-plane batch),
``full`` (the README's numbers: tens of minutes on a CPU).

Usage::

    python -m benchmarks [--size tiny|small|full] [--only predictor everything ...]
        [--weights PATH] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import default_weights, machine, write_json

BENCHMARKS = ("predictor", "everything", "backends", "batch", "distill", "store")
SIZES = ("tiny", "small", "full")


def _tiny_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(64, 48, 3), dtype=np.uint8)


def _predictor(size: str, weights) -> tuple[dict, list[dict]]:
    from benchmarks import bench_predictor

    if size == "tiny":
        res = bench_predictor.run(weights, image=_tiny_image(), repeats=1)
    else:
        res = bench_predictor.run(weights, repeats=3 if size == "small" else 7)
    rows = [
        _row("encoder (set_image)", res["set_image"]["ours"]["median"],
             res["set_image"]["baseline"]["median"], "s", "reference path"),
        _row("predict, 1 point", res["predict_1pt"]["ours"]["median"],
             res["predict_1pt"]["baseline"]["median"], "s", "reference path"),
    ]  # fmt: skip
    enc = res["set_image"]
    if "ours_bf16" in enc:  # precision="auto" on a CPU with bfloat16 units
        rows.append(_row("encoder bf16 (set_image)", enc["ours_bf16"]["median"],
                         enc["baseline"]["median"], "s", "reference path"))  # fmt: skip
    if res["original"]["available"]:
        if "ours_bf16" in enc:
            rows.append(_row("encoder bf16 (set_image)", enc["ours_bf16"]["median"],
                             enc["original"]["median"], "s", "original predictor"))  # fmt: skip
        rows += [
            _row("encoder (set_image)", res["set_image"]["ours"]["median"],
                 res["set_image"]["original"]["median"], "s", "original predictor"),
            _row("predict, 1 point", res["predict_1pt"]["ours"]["median"],
                 res["predict_1pt"]["original"]["median"], "s", "original predictor"),
        ]  # fmt: skip
    return res, rows


def _everything(size: str, weights) -> tuple[dict, list[dict]]:
    from benchmarks import bench_everything

    grids, large = {"tiny": ((2,), 0), "small": ((16,), 0), "full": ((16, 32), 4096)}[size]
    res = bench_everything.run(grids=grids, large=large, large_grid=8, weights=weights)
    rows = [
        _row(f"segment everything {r['grid']}x{r['grid']}", r["fast"]["seconds"],
             r["reference"]["seconds"], "s", "reference mode")
        for r in res["rows"]
    ]  # fmt: skip
    rows += [
        _row(f"segment everything {r['grid']}x{r['grid']}", r["fast"]["seconds"],
             r["original"]["seconds"], "s", "original generator")
        for r in res["rows"] if "original_ratio" in r
    ]  # fmt: skip
    return res, rows


def _backends(size: str, weights) -> tuple[dict, list[dict]]:
    from benchmarks import bench_backends

    if size == "tiny":
        res = bench_backends.run(weights, threads=(1,), repeats=1, image=_tiny_image())
    else:
        threads = (2,) if size == "small" else (1, 2)
        res = bench_backends.run(weights, threads=threads, repeats=3 if size == "small" else 7)
    torch_rows = {r["threads"]: r for r in res["rows"] if r["backend"] == "torch"}
    rows = [
        _row(f"encoder, {r['backend']}, {r['threads']} thr", r["encoder"]["median"],
             torch_rows[r["threads"]]["encoder"]["median"], "s", "our torch")
        for r in res["rows"] if r["backend"] != "torch"
    ]  # fmt: skip
    return res, rows


def _batch(size: str, weights) -> tuple[dict, list[dict]]:
    from benchmarks import bench_batch

    kw = {
        "tiny": {"planes": 2, "size": 128, "points_per_side": 2, "baseline_planes": 1,
                 "stacks": ()},
        "small": {"planes": 4, "size": 512, "points_per_side": 16, "baseline_planes": 2,
                  "stacks": ()},
        "full": {},
    }[size]  # fmt: skip
    res = bench_batch.run(weights=weights, **kw)
    tp = res["throughput"]["rows"]
    # planes/s: ratio = baseline time per plane / ours, expressed as time per plane
    rows = [_row(f"batch, {res['throughput']['size']} px planes", 1 / tp["ours"]["planes_per_s"],
                 1 / tp["baseline"]["planes_per_s"], "s/plane", "naive loop")]  # fmt: skip
    return res, rows


def _distill(size: str, weights) -> tuple[dict, list[dict]]:
    from benchmarks import bench_distill

    if size == "tiny":  # the real architectures at 128 px, random teacher
        res = bench_distill.run(batch_size=1, steps=1, image_size=128)
    else:
        res = bench_distill.run(teacher_weights=weights, steps=2 if size == "small" else 5)
    by_path = {r["path"]: r for r in res["rows"]}
    ours, base = by_path["ours"], by_path["baseline"]
    rows = [_row("distill step, per image", 1 / ours["images_per_s"], 1 / base["images_per_s"],
                 "s/image", "teacher run each step")]  # fmt: skip
    return res, rows


def _store(size: str, weights) -> tuple[dict, list[dict]]:
    from benchmarks import bench_store

    kw = {
        "tiny": {"planes": 4, "size": 64, "kill_after": 2, "clicks": 1},
        "small": {"planes": 12, "size": 256, "kill_after": 5, "clicks": 4},
        "full": {},
    }[size]  # (``weights`` unused: the command runs the bundled stand-in model)
    res = bench_store.run(**kw)
    r, s = res["resume"], res["session"]
    rows = [
        _row(f"embed {r['planes']} planes, rerun after kill", r["resumed"]["wall_s"],
             r["full"]["wall_s"], "s", "uninterrupted run"),
        _row("new-plane click", s["median_s"]["store"], s["median_s"]["encoder"], "s",
             "encoder (no store)"),
    ]  # fmt: skip
    return res, rows


_RUNNERS = {
    "predictor": _predictor,
    "everything": _everything,
    "backends": _backends,
    "batch": _batch,
    "distill": _distill,
    "store": _store,
}


def _row(name: str, ours: float, baseline: float, unit: str, baseline_name: str) -> dict:
    return {"benchmark": name, "ours": float(ours), "baseline": float(baseline), "unit": unit,
            "baseline_path": baseline_name, "ratio": float(ours) / float(baseline)}  # fmt: skip


def run_all(size: str = "small", only=None, weights=None) -> dict:
    """Run the chosen benchmarks; returns {"machine", "size", "rows", "results", "seconds"}.

    ``rows``: one summary row per measurement (``benchmark``, ``ours``, ``baseline``,
    ``unit``, ``baseline_path``, ``ratio`` = ours / baseline, below 1 is faster);
    ``results``: each benchmark's own full result dict.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    names = list(only or BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}")
    weights = weights or default_weights()
    out = {"machine": machine(), "size": size, "rows": [], "results": {}}
    start = time.perf_counter()
    for name in names:
        res, rows = _RUNNERS[name](size, weights)
        out["results"][name] = res
        out["rows"] += rows
    out["seconds"] = time.perf_counter() - start
    return out


def _fmt(value: float, unit: str) -> str:
    if unit.startswith("s") and value < 1:
        return f"{value * 1e3:.1f} ms{unit[1:]}"
    return f"{value:.2f} {unit}"


def report(result: dict) -> str:
    """The summary table (ratios below 1 mean ours is faster)."""
    m = result["machine"]
    head = f"{'benchmark':34} {'ours':>14} {'baseline':>14} {'ratio':>7}  baseline path"
    lines = [
        f"benchmarks at size {result['size']!r} on {m['cpu']} ({m['cores']} cores"
        + (f", {m['gpu']}" if m.get("gpu") else "")
        + f"), torch {m['torch']}",
        head,
        "-" * len(head),
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['benchmark']:34} {_fmt(r['ours'], r['unit']):>14} "
            f"{_fmt(r['baseline'], r['unit']):>14} {r['ratio']:6.2f}x  {r['baseline_path']}"
        )
    lines.append(f"(ratio = ours / baseline; {result['seconds']:.0f} s in all)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="small", help="[small]")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="[all]")
    p.add_argument("--weights", type=Path, help="[the golden checkpoint]")
    p.add_argument("--json", type=Path, help="also write everything as JSON")
    args = p.parse_args(argv)
    result = run_all(args.size, args.only, args.weights)
    print(report(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
