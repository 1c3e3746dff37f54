"""Large planes: tiled prompts vs the same model on a 1024 px crop; latency and memory.

A synthetic uint16 mosaic (``--size`` square, default 8192) is assembled from 2048 px
generator images (:func:`napari_mobilesam.synthetic.cells_2d`, one seed each, cells of
radius 8-20 px), and a :class:`~napari_mobilesam.interactive.PromptSession` tiles it
(1024 px tiles, 256 px overlap). With the stand-in model ``vit_t_synthetic_cells``:

- **quality**: for ``--cells`` cells of equivalent radius 10-14 px, one point (the cell's
  pixel farthest from its border) on the mosaic, and the same point on a 1024 px crop
  given to a plain ``Predictor`` as an image of its own (its own percentiles): the crop
  centred on the cell (inside the mosaic), and the crop of the tile that answered.
  Reported: IoU between the tiled mask and each crop's (target >= 0.8), and the IoU of
  each to the ground truth. The tile's crop differs from the tile only by normalisation
  (the plane's limits vs the crop's own); the centred crop also moves the cell within
  the model's input, which a model that is unsure of an object answers differently;
- **latency**: click to mask on the mosaic (tiles cached; a click in the same tile as the
  last, and one that moves to another tile) vs a click on a 1024 px image, interleaved,
  median of ``--repeats`` (target: within 1.5x);
- **memory** (``--memory``): peak resident memory of a fresh process that loads the
  model, opens the mosaic, embeds every tile and clicks (target <= 1.5 GB at 8192 px).

Usage::

    python benchmarks/bench_tiles.py [--size 8192] [--cells 40] [--repeats 20]
        [--memory] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import interleaved, machine, write_json

MODEL = "vit_t_synthetic_cells"
BLOCK = 2048


def mosaic(size: int, seed: int = 0, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """A (size, size) uint16 image and its uint32 labels from generator images of
    ``block`` px (one seed each; ids made unique)."""
    from napari_mobilesam.synthetic import cells_2d

    image = np.zeros((size, size), np.uint16)
    labels = np.zeros((size, size), np.uint32)
    offset, k = 0, 0
    for r in range(0, size, block):
        for c in range(0, size, block):
            h, w = min(block, size - r), min(block, size - c)
            s = cells_2d((h, w), seed=seed + k, radius=(8.0, 20.0), dtype="uint16")
            k += 1
            image[r : r + h, c : c + w] = s.image
            labels[r : r + h, c : c + w] = np.where(s.labels > 0, s.labels + offset, 0)
            offset += int(s.labels.max())
    return image, labels


def pick_cells(labels: np.ndarray, n: int, radius=(10.0, 14.0), seed: int = 0) -> list[tuple]:
    """``n`` cells of equivalent radius within ``radius``, each as (id, (row, col)) of its
    pixel farthest from its border; spread over the plane (a seeded random choice)."""
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    r_eq = np.sqrt(areas / np.pi)
    ok = ids[(r_eq >= radius[0]) & (r_eq <= radius[1])]
    chosen = np.random.default_rng(seed).choice(ok, size=min(n, len(ok)), replace=False)
    objects = ndimage.find_objects(labels)
    out = []
    for i in chosen:
        sl = objects[int(i) - 1]
        dist = ndimage.distance_transform_edt(labels[sl] == i)
        r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
        out.append((int(i), (sl[0].start + int(r), sl[1].start + int(c))))
    return out


def crop_window(point, shape_hw, size: int = 1024) -> tuple[int, int, int, int]:
    """The ``size`` px window centred on ``point`` (row, col), moved inside the plane."""
    r0 = min(max(point[0] - size // 2, 0), shape_hw[0] - size)
    c0 = min(max(point[1] - size // 2, 0), shape_hw[1] - size)
    return r0, c0, r0 + size, c0 + size


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def quality(predictor, image, labels, cells) -> dict:
    """Tiled mask vs the crop's mask for each cell (see the module docstring)."""
    from napari_mobilesam.interactive import PromptSession
    from napari_mobilesam.predictor import Predictor

    session = PromptSession(predictor, image)
    session.embed(())
    crop_predictor = Predictor(predictor.engine)
    rows = []
    for cell_id, (r, c) in cells:
        pred = session.predict([[r, c]])
        tiled = pred.mask
        r0, c0, r1, c1 = crop_window((r, c), image.shape)
        crop = _on_crop(crop_predictor, image, (r0, c0, r1, c1), (r, c))
        t0, tc0, t1, tc1 = pred.window
        tile_crop = _on_crop(crop_predictor, image, pred.window, (r, c))
        truth = labels[r0:r1, c0:c1] == cell_id
        rows.append(
            {
                "id": cell_id,
                "point_rc": [r, c],
                "iou_tiled_vs_crop": _iou(tiled[r0:r1, c0:c1], crop),
                "iou_tiled_vs_tile_crop": _iou(tiled[t0:t1, tc0:tc1], tile_crop),
                "outside_crop": int(tiled.sum() - tiled[r0:r1, c0:c1].sum()),
                "iou_tiled_truth": _iou(tiled[r0:r1, c0:c1], truth),
                "iou_crop_truth": _iou(crop, truth),
            }
        )

    def mean(key):
        return float(np.mean([row[key] for row in rows]))

    ious = np.array([row["iou_tiled_vs_crop"] for row in rows])
    tile_ious = np.array([row["iou_tiled_vs_tile_crop"] for row in rows])
    return {
        "cells": rows,
        "mean_iou_vs_crop": float(ious.mean()),
        "median_iou_vs_crop": float(np.median(ious)),
        "fraction_ge_0.8": float(np.mean(ious >= 0.8)),
        "mean_iou_vs_tile_crop": float(tile_ious.mean()),
        "tile_crop_fraction_ge_0.8": float(np.mean(tile_ious >= 0.8)),
        "mean_iou_tiled_truth": mean("iou_tiled_truth"),
        "mean_iou_crop_truth": mean("iou_crop_truth"),
        "n_tiles": len(session.tiles),
    }


def _on_crop(predictor, image, window, point_rc) -> np.ndarray:
    """The best of three masks for one point on ``image[window]`` as an image of its own."""
    r0, c0, r1, c1 = window
    predictor.set_image(image[r0:r1, c0:c1])
    xy = np.array([[point_rc[1] - c0, point_rc[0] - r0]])
    masks, scores, _ = predictor.predict(xy, np.array([1]))
    return masks[int(np.argmax(scores))]


def latency(predictor, image, cells, repeats: int) -> dict:
    """Click to mask: mosaic (same tile, other tile) vs a 1024 px image."""
    from napari_mobilesam.interactive import PromptSession

    big = PromptSession(predictor, image)
    big.embed(())
    grid = big.tiles
    a = cells[0][1]
    b = next(rc for _, rc in cells[1:] if grid.owner(*rc) != grid.owner(*a))
    big.predict([a]), big.predict([b])  # both tiles embedded
    r0, c0, r1, c1 = crop_window(a, image.shape)
    small = PromptSession(predictor, np.ascontiguousarray(image[r0:r1, c0:c1]))
    small.embed(())
    local = [a[0] - r0, a[1] - c0]
    state = {"flip": False}

    def other_tile():
        state["flip"] = not state["flip"]
        return big.predict([a if state["flip"] else b])

    funcs = {
        "1024 px image": lambda: small.predict([local]),
        "tiled, same tile": lambda: big.predict([a]),
        "tiled, other tile": other_tile,
    }
    # interleaved, so every mosaic click finds the predictor on the 1024 px image: each
    # one puts its tile's embedding back first (as a click after other work does)
    times = interleaved(funcs, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["1024 px image"]
    return {
        "median_s": med,
        "ratio_same_tile": med["tiled, same tile"] / base,
        "ratio_other_tile": med["tiled, other tile"] / base,
    }


_MEMORY_CHILD = """
import resource, sys, time, json
import numpy as np
sys.path.insert(0, {root!r})
from napari_mobilesam.interactive import PromptSession
from napari_mobilesam.predictor import Predictor
image = np.load({path!r})
t0 = time.perf_counter()
session = PromptSession(Predictor({model!r}, device="cpu"), image)
session.embed(())
n = session.precompute()
t1 = time.perf_counter()
for r, c in [(100, 100), ({size} // 2, {size} // 2), ({size} - 50, {size} - 70)]:
    session.predict([[r, c]])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"peak_bytes": peak, "tiles": n, "precompute_s": t1 - t0}}))
"""


def memory(image: np.ndarray) -> dict:
    """Peak RSS of a fresh process that reads ``image`` (saved to a temporary .npy),
    loads the model, embeds every tile and clicks three times."""
    root = str(Path(__file__).resolve().parents[1])
    size = image.shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "mosaic.npy")
        np.save(path, image)
        code = _MEMORY_CHILD.format(root=root, size=size, model=MODEL, path=path)
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_gb"] = result["peak_bytes"] / 1e9
    image_gb = size * size * 2 / 1e9
    result["image_gb"] = image_gb
    return result


def run(size=8192, n_cells=40, repeats=20, with_memory=False, model=MODEL) -> dict:
    """Everything in the module docstring; ``model`` a registry name or a loaded model."""
    from napari_mobilesam.predictor import Predictor

    t0 = time.perf_counter()
    image, labels = mosaic(size)
    made = time.perf_counter() - t0
    predictor = Predictor(model, device="cpu")
    cells = pick_cells(labels, n_cells)
    result = {
        "machine": machine(),
        "size": size,
        "mosaic_s": made,
        "quality": quality(predictor, image, labels, cells),
        "latency": latency(predictor, image, cells, repeats),
    }
    if with_memory:
        result["memory"] = memory(image)
    return result


def report(result: dict) -> str:
    q, lat = result["quality"], result["latency"]
    lines = [
        f"{result['size']} x {result['size']} uint16 mosaic, {q['n_tiles']} tiles "
        f"(1024 px, overlap 256); {len(q['cells'])} cells of radius 10-14 px",
        f"  IoU tiled vs 1024 px crop: mean {q['mean_iou_vs_crop']:.3f}, median "
        f"{q['median_iou_vs_crop']:.3f}, >= 0.8 for {q['fraction_ge_0.8']:.0%} (target >= 0.8)",
        f"  IoU tiled vs the tile's own crop: mean {q['mean_iou_vs_tile_crop']:.3f}, >= 0.8 "
        f"for {q['tile_crop_fraction_ge_0.8']:.0%}",
        f"  IoU to ground truth: tiled {q['mean_iou_tiled_truth']:.3f}, centred crop "
        f"{q['mean_iou_crop_truth']:.3f}",
        "  click to mask (median):",
    ]
    for name, t in lat["median_s"].items():
        lines.append(f"    {name:<20} {t * 1e3:7.1f} ms")
    lines.append(
        f"  ratio to 1024 px: same tile {lat['ratio_same_tile']:.2f}x, other tile "
        f"{lat['ratio_other_tile']:.2f}x (target <= 1.5x)"
    )
    if "memory" in result:
        m = result["memory"]
        lines.append(
            f"  peak memory, all {m['tiles']} tiles embedded: {m['peak_gb']:.2f} GB (image "
            f"{m['image_gb']:.2f} GB; target <= 1.5 GB); precompute {m['precompute_s']:.0f} s"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--cells", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--memory", action="store_true", help="also measure peak memory")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    result = run(args.size, args.cells, args.repeats, args.memory)
    print(report(result))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
