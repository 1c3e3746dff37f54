"""Propagating N objects at once vs one object, over the same planes (CPU by default).

A synthetic stack (:func:`napari_mobilesam.synthetic.cells_3d`), the stand-in model
``vit_t_synthetic_cells``; the objects are the largest ground-truth cells of the middle
plane, walked both ways with a rule that accepts every non-empty mask and at most
``--max-planes`` planes per direction, so that one object and N objects go over the same
planes. Timed, interleaved, median of ``--repeats``:

- ``cold``: the propagation embeds every plane it visits (a fresh embedding cache per
  run), as in the viewer without *precompute*. The target: N = 10 objects cost less than
  3x one object, because the objects share each plane's embedding;
- ``warm``: every plane's embedding precomputed, so only the decoder runs; also N
  objects one after the other (``PromptSession.propagate`` per object) as the baseline
  of the batched walk (``PromptSession.propagate_all``).

Usage::

    python benchmarks/bench_propagate_many.py [--planes 12] [--size 256] [--objects 10]
        [--max-planes 4] [--repeats 3] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import interleaved, machine, write_json


def _largest(labels: np.ndarray, n: int) -> list[int]:
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    return [int(i) for i in ids[np.argsort(-areas, kind="stable")[:n]]]


def run(
    planes: int = 12,
    size: int = 256,
    n_objects: int = 10,
    max_planes: int = 4,
    repeats: int = 3,
    model="vit_t_synthetic_cells",
    threads: int | None = None,
) -> dict:
    """Time one object vs ``n_objects`` (see the module docstring).

    Parameters
    ----------
    model : str or torch.nn.Module
        A registry name for :func:`~napari_mobilesam.build.load_model`, or a model.

    Returns
    -------
    dict
        ``seconds`` (run name -> seconds per run), ``object_planes`` (run name -> masks
        accepted), ``ratio_cold`` and ``ratio_warm`` (N objects over one, medians), and
        the sizes and machine.
    """
    from napari_mobilesam.build import load_model
    from napari_mobilesam.interactive import EmbeddingCache, PromptSession
    from napari_mobilesam.predictor import Predictor
    from napari_mobilesam.synthetic import cells_3d

    if threads is not None:
        torch.set_num_threads(threads)
    net = load_model(model) if isinstance(model, str) else model
    predictor = Predictor(net)
    sample = cells_3d((planes, size, size), seed=1)
    start = (planes // 2,)
    labels = sample.labels[start].astype(np.uint32)
    ids = _largest(labels, n_objects)
    if not ids:
        raise ValueError(f"the stack's plane {start[0]} has no cell; use a larger --size")
    rule = {"min_score": -math.inf, "min_area_ratio": 1e-6, "max_planes": max_planes}

    def session(cache=None) -> PromptSession:
        cache = cache if cache is not None else EmbeddingCache(max_items=planes + 1)
        return PromptSession(predictor, sample.image, cache=cache, cache_key="bench")

    warm = session()
    warm.precompute()
    found: dict[str, int] = {}

    def walk(name: str, s: PromptSession, chosen: list[int]):
        def f():
            result = s.propagate_all(start, labels, 0, ids=chosen, **rule)
            found[name] = sum(len(p) for p in result.masks.values())

        return f

    def one_by_one():
        found["warm, N one by one"] = sum(
            len(warm.propagate(start, labels == i, 0, **rule)) for i in ids
        )

    funcs = {
        "cold, 1 object": lambda: walk("cold, 1 object", session(), ids[:1])(),
        "cold, N objects": lambda: walk("cold, N objects", session(), ids)(),
        "warm, 1 object": walk("warm, 1 object", warm, ids[:1]),
        "warm, N objects": walk("warm, N objects", warm, ids),
        "warm, N one by one": one_by_one,
    }
    times = interleaved(funcs, repeats, warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "planes": planes,
        "size": size,
        "objects": len(ids),
        "max_planes": max_planes,
        "device": predictor.describe(),
        "seconds": times,
        "median_s": med,
        "object_planes": found,
        "ratio_cold": med["cold, N objects"] / med["cold, 1 object"],
        "ratio_warm": med["warm, N objects"] / med["warm, 1 object"],
        "batched_vs_one_by_one": med["warm, N objects"] / med["warm, N one by one"],
        "machine": machine(),
    }


def report(result: dict) -> str:
    n = result["objects"]
    lines = [
        f"propagating 1 vs {n} objects: {result['planes']} planes of {result['size']} px, "
        f"at most {result['max_planes']} planes per direction, on {result['device']}",
        f"{'run':<22}{'median s':>10}{'object planes':>15}",
    ]
    for name, t in result["median_s"].items():
        lines.append(f"{name:<22}{t:>10.3f}{result['object_planes'].get(name, 0):>15}")
    lines.append(
        f"ratio {n} objects / 1 object: cold {result['ratio_cold']:.2f}x (target < 3x), "
        f"warm (decoder only) {result['ratio_warm']:.2f}x"
    )
    lines.append(
        f"batched / one by one ({n} objects, warm): {result['batched_vs_one_by_one']:.2f}x"
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--planes", type=int, default=12)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--objects", type=int, default=10)
    ap.add_argument("--max-planes", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="vit_t_synthetic_cells")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    result = run(
        args.planes, args.size, args.objects, args.max_planes, args.repeats, args.model,
        args.threads,
    )  # fmt: skip
    print(report(result))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
