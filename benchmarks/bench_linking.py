"""Linking per-plane labels into 3D objects: planes/s and peak memory vs stack length.

Each configuration runs in a fresh child process, so its time and peak RSS are its own:

- ``ours``: :class:`napari_mobilesam.linking.Linker` fed one plane at a time, as
  ``mobilesam-everything --link`` streams a stack (planes made on the fly, each
  relabelled plane dropped after use): memory must not grow with the stack;
- ``baseline``: the same stack held in memory and linked whole with
  :func:`~napari_mobilesam.linking.link_stack` into a new array, as one does when the
  stack fits (memory grows with it; run only up to ``--baseline-max`` planes).

The planes: ``--cells`` random disks (radius 6-14 px at 512 px, scaled with the size)
drifting 2 px a plane (rolled, so cells leave at one edge and enter at the other),
ids renumbered in a new random order in every plane.

Usage::

    python benchmarks/bench_linking.py [--stacks 50 500 2000] [--size 512] [--cells 150]
        [--axis z|t] [--baseline-max 500] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Planes:
    """``n`` label planes of ``size`` x ``size`` made on demand (see the module docstring)."""

    def __init__(self, n: int, size: int, cells: int, seed: int = 0):
        from skimage.draw import disk

        self.n, self.rng = n, np.random.default_rng(seed)
        self.template = np.zeros((size, size), dtype=np.uint32)
        scale = size / 512
        for k in range(cells):
            center = self.rng.uniform(0, size, 2)
            radius = self.rng.uniform(6, 14) * scale
            self.template[disk(center, max(radius, 1.5), shape=(size, size))] = k + 1
        self.count = int(self.template.max())

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n, *self.template.shape)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        lut = np.concatenate([[0], self.rng.permutation(self.count) + 1]).astype(np.uint32)
        return lut[np.roll(self.template, 2 * int(i), axis=1)]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _child(kind: str, n: int, size: int, cells: int, axis: str) -> dict:
    from napari_mobilesam.linking import Linker, link_stack

    planes = Planes(n, size, cells)
    base_mb = _peak_mb()
    if kind == "ours":
        linker = Linker(axis)
        t0, c0 = time.perf_counter(), _cpu_s()
        checksum = 0
        for i in range(n):
            for out in linker.push(planes[i]):
                checksum += int(out.max())
        for out in linker.flush():
            checksum += int(out.max())
        table = linker.finish()
    else:
        stack = np.stack([planes[i] for i in range(n)])  # the whole stack in memory
        t0, c0 = time.perf_counter(), _cpu_s()
        out, table = link_stack(stack, axis)
        checksum = int(out.max(axis=(1, 2)).sum())
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - c0
    return {
        "kind": kind, "planes": n, "size": size, "seconds": seconds, "cpu_seconds": cpu,
        "planes_per_s": n / seconds, "objects": int(table.objects()["id"].size),
        "rows": int(table.id.size), "checksum": checksum,
        "start_rss_mb": base_mb, "peak_rss_mb": _peak_mb(),
    }  # fmt: skip


def _run_child(kind: str, n: int, size: int, cells: int, axis: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--stacks", str(n), "--size", str(size),
           "--cells", str(cells), "--axis", axis]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(stacks=(50, 500, 2000), size=512, cells=150, axis="z", baseline_max=500) -> dict:
    """Both variants for every stack length; a JSON-able dict (see :func:`report`)."""
    rows = []
    for n in stacks:
        rows.append(_run_child("ours", n, size, cells, axis))
        if n <= baseline_max:
            rows.append(_run_child("baseline", n, size, cells, axis))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    machine = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    return {"machine": machine, "size": size, "cells": cells, "axis": axis, "rows": rows}


def report(result: dict) -> str:
    size = result["size"]
    lines = [
        f"linking ({result['axis']}) of {size}x{size} label planes, {result['cells']} cells "
        f"({result['machine']['cpu']}, {result['machine']['cores']} cores)",
        f"{'':10} {'planes':>7} {'seconds':>8} {'CPU s':>7} {'planes/s':>9} {'objects':>8} "
        f"{'peak RSS':>10}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['kind']:10} {r['planes']:7d} {r['seconds']:8.2f} {r['cpu_seconds']:7.2f} "
            f"{r['planes_per_s']:9.1f} {r['objects']:8d} {r['peak_rss_mb']:7.0f} MB"
        )
    ours = [r for r in result["rows"] if r["kind"] == "ours"]
    if len(ours) > 1:
        grew = (ours[-1]["planes"] - ours[0]["planes"]) * size * size * 4 / 2**20
        lines.append(
            f"ours, {ours[0]['planes']} -> {ours[-1]['planes']} planes: peak RSS "
            f"{ours[-1]['peak_rss_mb'] - ours[0]['peak_rss_mb']:+.0f} MB "
            f"(the uint32 stack grew by {grew:.0f} MB; the table by "
            f"{ours[-1]['rows'] - ours[0]['rows']} rows)"
        )
    lines.append("(CPU s: the process's CPU time, which a busy machine does not inflate)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stacks", type=int, nargs="+", default=[50, 500, 2000])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--cells", type=int, default=150)
    p.add_argument("--axis", choices=["z", "t"], default="z")
    p.add_argument("--baseline-max", type=int, default=500)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.stacks[0], args.size, args.cells, args.axis)))
        return 0
    result = run(args.stacks, args.size, args.cells, args.axis, args.baseline_max)
    print(report(result))
    if args.json:
        from napari_mobilesam.atomic import write_json_atomic

        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
