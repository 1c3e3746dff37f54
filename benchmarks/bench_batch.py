"""``mobilesam-everything`` throughput and memory, side by side with a naive loop.

Two measurements, each configuration in a fresh child process (so its time and
peak memory are its own):

1. **Throughput**: planes/s on a synthetic stack (default 20 planes of 1024 x 1024
   uint16) with the real vit_t model, for

   - ``ours``: the ``mobilesam-everything`` command (fast mode, labels + provenance);
   - ``baseline``: what one writes with the original code: read the whole stack,
     for each plane run the reference-mode generator (segment-anything's
     computation) and paint its binary masks into a label image by area, write
     the stack at the end. It runs on ``--baseline-planes`` planes (the rate is per
     plane, so fewer planes keep it short).

2. **Memory**: peak RSS of the command on stacks of growing length (default 50,
   200 and 500 planes of 512 x 512), with a tiny random model so that the numbers
   show the pipeline (reading, saving planes, writing outputs), not the model. It
   must stay flat as the stack grows.

3. **Memory with linking** (``--link-stacks``, off by default): the same stacks run
   twice with ``--csv``, without and with ``--link z``, each in a fresh child
   process. In the child only, each plane's segmentation is replaced by about
   ``--link-cells`` synthetic objects (:func:`drifting_labels`: disks that drift,
   are born and die, ids 1..N in a new random order in every plane), so the
   linker has real work; the tiny model is loaded but not run. Reported: peak RSS
   of both runs and the number of 3D objects.

Usage::

    python benchmarks/bench_batch.py [--planes 20] [--size 1024] [--points-per-side 16]
        [--baseline-planes 3] [--stacks 50 200 500] [--cluster]
        [--link-stacks 50 500 2000] [--link-cells 150] [--json OUT]

The linking table of docs/batch.md::

    python benchmarks/bench_batch.py --planes 0 --stacks --link-stacks 50 500 2000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import default_weights, machine, write_json


def make_stack(path: Path, n: int, size: int, seed: int = 0) -> Path:
    """Write an ``(n, size, size)`` uint16 ImageJ stack of bright disks, one plane at a time."""
    import tifffile
    from skimage.draw import disk

    rng = np.random.default_rng(seed)

    def planes():
        for _ in range(n):
            img = rng.normal(2000, 150, (size, size))
            for _ in range(max(4, size // 40)):
                r, c = rng.integers(20, size - 20, 2)
                img[disk((r, c), rng.integers(8, max(9, size // 25)), shape=img.shape)] += (
                    rng.integers(4000, 30000)
                )
            yield np.clip(img, 0, 65535).astype(np.uint16)

    tifffile.imwrite(
        path, planes(), shape=(n, size, size), dtype=np.uint16, imagej=True,
        photometric="minisblack", metadata={"axes": "ZYX"},
    )  # fmt: skip
    return path


def _tiny_model():
    """A small random MobileSAM-shaped model (128 px input) for pipeline-only runs."""
    import torch

    from napari_mobilesam.build import SamConfig, build_sam
    from napari_mobilesam.model import TinyViTConfig

    cfg = SamConfig(
        TinyViTConfig(
            img_size=128, embed_dims=(8, 16, 16, 24), depths=(1, 1, 2, 1),
            num_heads=(1, 2, 2, 3), window_sizes=(7, 7, 7, 7), out_chans=32, num_classes=10,
        ),
        prompt_embed_dim=32, mask_in_chans=8, decoder_mlp_dim=64, decoder_num_heads=2,
        iou_head_hidden_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return build_sam(cfg).eval()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#: synthetic objects for the linking runs: life in planes, drift in px per plane (at 512 px)
LIFE, DRIFT = (5, 45), (0.5, 2.0)


def _population(n: int, shape: tuple[int, int], cells: int, seed: int) -> dict:
    """Cells of an ``n``-plane stack: about ``cells`` alive in every plane (see
    :func:`drifting_labels`). Each entry is an array with one value per cell."""
    rng = np.random.default_rng(seed)
    scale = min(shape) / 512  # radii and drift as at 512 px, scaled with the plane
    rate = cells / np.mean(LIFE)  # births per plane, so that ``cells`` live at once
    count = round(rate * (n + LIFE[1]))
    angle = rng.uniform(0, 2 * np.pi, count)
    speed = rng.uniform(*DRIFT, count)
    return {
        "birth": rng.uniform(-LIFE[1], n, count),
        "life": rng.uniform(*LIFE, count),
        "center": rng.uniform((0, 0), shape, (count, 2)),
        "velocity": np.stack([np.sin(angle), np.cos(angle)], axis=1) * (speed * scale)[:, None],
        "radius": rng.uniform(6, 14, count) * scale,
    }


def drifting_labels(cells: dict, z: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Plane ``z`` of a synthetic per-plane segmentation.

    Parameters
    ----------
    cells : dict
        From :func:`_population`: per cell its ``birth`` plane, ``life`` (planes),
        ``center`` (row, col) at birth, ``velocity`` (rows, cols per plane) and
        ``radius`` (px). A cell is drawn in the planes ``birth <= z < birth + life``,
        as a disk (clipped at the plane's edge) that moves by ``velocity`` each plane;
        later cells cover earlier ones where they overlap.
    z : int
        The plane.
    shape : (int, int)
        (H, W) of the plane.
    seed : int
        Seeds the plane's random id order (with ``z``).

    Returns
    -------
    (H, W) uint32
        0 background, ids 1..N (N: cells visible in the plane) in a random order
        that changes from plane to plane, as segment-everything's ids do.
    """
    from skimage.draw import disk

    painted = np.zeros(shape, dtype=np.uint32)
    alive = np.flatnonzero((cells["birth"] <= z) & (z < cells["birth"] + cells["life"]))
    for k in alive:
        age = z - cells["birth"][k]
        center = cells["center"][k] + cells["velocity"][k] * age
        painted[disk(center, max(cells["radius"][k], 1.5), shape=shape)] = k + 1
    present = np.flatnonzero(np.bincount(painted.ravel()))
    present = present[present > 0]
    lut = np.zeros(int(painted.max()) + 1, dtype=np.uint32)
    lut[present] = np.random.default_rng((seed, z)).permutation(present.size) + 1
    return lut[painted]


def _drifting_segmenter(n: int, cells: int, seed: int = 0) -> None:
    """Make :meth:`mobilesam_batch.segment.PlaneSegmenter.segment` (in this process
    only) return :func:`drifting_labels` for an ``n``-plane stack instead of running
    the model."""
    from mobilesam_batch import segment

    populations: dict = {}

    def fake_segment(self, plane, index=(), embeddings=None):
        start = time.perf_counter()
        shape = tuple(plane.shape[:2])
        if shape not in populations:
            populations[shape] = _population(n, shape, cells, seed)
        z = int(index[-1]) if index else 0
        labels = drifting_labels(populations[shape], z, shape, seed)
        count = int(labels.max())
        scores = np.linspace(0.99, 0.88, count)  # ids 1..N by decreasing predicted IoU
        return segment.PlaneResult(
            index=tuple(index), labels=labels, predicted_iou=scores,
            stability_score=scores.copy(), seconds=time.perf_counter() - start,
            extra={**self.where(), "embedding": "computed"},
        )  # fmt: skip

    segment.PlaneSegmenter.segment = fake_segment


def _child_tool(args) -> dict:
    from mobilesam_batch import cli, segment

    if args.tiny:
        model = _tiny_model()
        segment.ModelSpec.load = lambda self: model
    if args.drift_cells:
        _drifting_segmenter(args.drift_planes, args.drift_cells)
    argv = [args.input, "-o", args.out, "--weights", str(args.weights), "--device", "cpu", "-q"]
    argv += ["--points-per-side", str(args.points_per_side), *args.extra]
    t0 = time.perf_counter()
    code = cli.main(argv)
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"mobilesam-everything exited with {code}")
    prov = json.loads(next(Path(args.out).glob("*_labels.json")).read_text())
    compute = sum(p["seconds"] for p in prov["planes"])
    return {
        "planes": len(prov["planes"]),
        "objects": prov["objects"],
        "linked_objects": prov.get("linked", {}).get("objects"),
        "seconds": seconds,
        "plane_seconds": compute,
        "peak_rss_mb": _peak_mb(),
    }


def _child_baseline(args) -> dict:
    import tifffile
    import torch

    from napari_mobilesam.build import load_model
    from napari_mobilesam.everything import MaskGenerator
    from napari_mobilesam.normalize import to_rgb_uint8

    t0 = time.perf_counter()
    model = load_model("vit_t", args.weights, device="cpu", optimize=False)
    gen = MaskGenerator(model, points_per_side=args.points_per_side, mode="reference", nms="box")
    stack = tifffile.imread(args.input)[: args.limit]  # the whole stack in memory
    out = np.zeros(stack.shape, dtype=np.uint32)
    objects = 0
    with torch.inference_mode():
        for z, plane in enumerate(stack):
            records = gen.generate(to_rgb_uint8(plane))
            for i, rec in enumerate(sorted(records, key=lambda r: -r["area"])):
                out[z][rec["segmentation"]] = i + 1
            objects += len(records)
    tifffile.imwrite(Path(args.out) / "labels.tif", out)
    return {
        "planes": len(stack),
        "objects": objects,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": _peak_mb(),
    }


def _run_child(kind: str, input_path: Path, weights: Path, points: int, *, tiny=False,
               limit=None, extra=(), drift=None, timeout=7200) -> dict:  # fmt: skip
    """Run one configuration in a fresh process; ``drift``: ``(planes, cells)`` of
    the synthetic segmentation that replaces the model (:func:`_drifting_segmenter`)."""
    with tempfile.TemporaryDirectory(prefix="bench-batch-out-") as out:
        cmd = [sys.executable, __file__, "--child", kind, "--input", str(input_path)]
        cmd += ["--out", out, "--weights", str(weights), "--points-per-side", str(points)]
        if tiny:
            cmd.append("--tiny")
        if drift:
            cmd += ["--drift-planes", str(drift[0]), "--drift-cells", str(drift[1])]
        if limit:
            cmd += ["--limit", str(limit)]
        cmd += [f"--extra={e}" for e in extra]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"benchmark child failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])


def run(*, planes=20, size=1024, points_per_side=16, baseline_planes=3, stacks=(50, 200, 500),
        stack_size=512, cluster=False, weights=None, link_stacks=(),
        link_cells=150) -> dict:  # fmt: skip
    """Run the measurements; returns a JSON-able dict (see :func:`report`).

    ``planes=0`` skips the throughput part, empty ``stacks`` the memory part and
    empty ``link_stacks`` (the default) the memory part with linking."""
    weights = Path(weights or default_weights() or _fetch())
    result: dict = {"machine": machine(), "weights": str(weights)}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        tmp = Path(tmp)
        rows = {}
        if planes:
            stack = make_stack(tmp / "stack.tif", planes, size)
            rows["ours"] = _run_child("tool", stack, weights, points_per_side)
        if planes and cluster:
            rows["ours, LocalCluster 2 workers"] = _run_child(
                "tool", stack, weights, points_per_side,
                extra=("--scheduler", "local", "--workers", "2"),
            )  # fmt: skip
        if planes and baseline_planes:
            rows["baseline"] = _run_child(
                "baseline", stack, weights, points_per_side, limit=baseline_planes
            )
        for row in rows.values():
            row["planes_per_s"] = row["planes"] / row["seconds"]
        result["throughput"] = {
            "planes": planes, "size": size, "points_per_side": points_per_side, "rows": rows,
        }  # fmt: skip

        memory = []
        for n in stacks:
            path = make_stack(tmp / f"mem{n}.tif", n, stack_size, seed=n)
            # tiles off: the tiny model's 128 px input would tile a 512 px plane
            row = _run_child("tool", path, weights, 4, tiny=True, extra=("--tile-size", "0"))
            memory.append({"planes": n, "size": stack_size, **row})
            path.unlink()
        result["memory"] = memory

        linking = []
        for n in link_stacks:
            path = make_stack(tmp / f"link{n}.tif", n, stack_size, seed=n)
            row = {"planes": n, "size": stack_size, "cells": link_cells}
            for name, link in (("plain", ()), ("linked", ("--link", "z"))):
                row[name] = _run_child(
                    "tool", path, weights, 4, tiny=True, drift=(n, link_cells),
                    extra=("--tile-size", "0", "--csv", *link),
                )  # fmt: skip
            linking.append(row)
            path.unlink()
        result["linking"] = linking
    return result


def _fetch() -> Path:
    from napari_mobilesam.weights import fetch

    return fetch("vit_t")


def report(result: dict) -> str:
    tp = result["throughput"]
    lines = [
        f"mobilesam-everything on {tp['planes']} planes of {tp['size']}x{tp['size']} uint16, "
        f"{tp['points_per_side']}x{tp['points_per_side']} grid, default thresholds "
        f"({result['machine']['cpu']}, {result['machine']['cores']} cores)",
        f"{'':32} {'planes':>6} {'seconds':>9} {'planes/s':>9} {'peak RSS':>10} {'ratio':>7}",
    ]
    rows = tp["rows"]
    base = rows.get("baseline")
    for name, row in rows.items():
        ratio = row["planes_per_s"] / base["planes_per_s"] if base else float("nan")
        lines.append(
            f"{name:32} {row['planes']:6d} {row['seconds']:9.1f} {row['planes_per_s']:9.3f} "
            f"{row['peak_rss_mb']:7.0f} MB {ratio:6.2f}x"
        )
    lines.append("(ratio: planes/s over the baseline's; the baseline reads the whole stack and "
                 "runs the reference computation)")  # fmt: skip
    if not rows:
        lines = ["(throughput not measured)"]
    if result["memory"]:
        lines += ["", "peak memory vs stack length (tiny model: pipeline only)"]
        lines.append(f"{'planes':>8} {'size':>6} {'seconds':>9} {'peak RSS':>10}")
    for row in result["memory"]:
        n, size, seconds, peak = row["planes"], row["size"], row["seconds"], row["peak_rss_mb"]
        lines.append(f"{n:8d} {size:6d} {seconds:9.1f} {peak:7.0f} MB")
    if len(result["memory"]) > 1:
        first, last = result["memory"][0], result["memory"][-1]
        grew = (last["planes"] - first["planes"]) * last["size"] ** 2 * 2 / 2**20
        lines.append(
            f"growth {first['planes']} -> {last['planes']} planes: "
            f"{last['peak_rss_mb'] - first['peak_rss_mb']:+.0f} MB (stack data grew {grew:.0f} MB)"
        )
    if result.get("linking"):
        lines += ["", "peak memory vs stack length, --csv without and with --link z "
                  "(synthetic drifting objects in place of the model)"]  # fmt: skip
        lines.append(f"{'planes':>8} {'size':>6} {'objects':>9} {'3D objects':>10} "
                     f"{'plain':>10} {'--link z':>10} {'s plain':>8} {'s link':>8}")  # fmt: skip
        for row in result["linking"]:
            plain, linked = row["plain"], row["linked"]
            lines.append(
                f"{row['planes']:8d} {row['size']:6d} {linked['objects']:9d} "
                f"{linked['linked_objects']:10d} {plain['peak_rss_mb']:7.0f} MB "
                f"{linked['peak_rss_mb']:7.0f} MB {plain['seconds']:8.1f} {linked['seconds']:8.1f}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--planes", type=int, default=20, help="0 skips the throughput part")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--points-per-side", type=int, default=16)
    p.add_argument("--baseline-planes", type=int, default=3)
    p.add_argument("--stacks", type=int, nargs="*", default=[50, 200, 500])
    p.add_argument("--stack-size", type=int, default=512)
    p.add_argument("--cluster", action="store_true", help="also time --scheduler local --workers 2")
    p.add_argument(
        "--link-stacks",
        type=int,
        nargs="*",
        default=[],
        help="stack lengths for peak memory with --csv, without and with --link z",
    )
    p.add_argument("--link-cells", type=int, default=150,
                   help="synthetic objects per plane in the --link-stacks runs")  # fmt: skip
    p.add_argument("--weights", type=Path)
    p.add_argument("--json", type=Path)
    # child mode
    p.add_argument("--child", choices=["tool", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    p.add_argument("--extra", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--drift-planes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--drift-cells", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        out = _child_tool(args) if args.child == "tool" else _child_baseline(args)
        print(json.dumps(out))
        return 0
    result = run(
        planes=args.planes, size=args.size, points_per_side=args.points_per_side,
        baseline_planes=args.baseline_planes, stacks=tuple(args.stacks),
        stack_size=args.stack_size, cluster=args.cluster, weights=args.weights,
        link_stacks=tuple(args.link_stacks), link_cells=args.link_cells,
    )  # fmt: skip
    print(report(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
