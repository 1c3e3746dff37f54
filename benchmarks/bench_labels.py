"""Memory of the widgets' labels layers on large planes and stacks: numpy vs chunked.

Each case runs in a fresh process with a shown napari viewer (it needs a display;
``xvfb-run`` works). The image is a synthetic uint16 mosaic of ``--size`` px
(:func:`benchmarks.bench_tiles.mosaic`), one plane or ``--planes`` planes (the mosaic
shifted sideways on each), made by the parent and loaded by the child. Steps:

1. ``image``: the viewer and the image layer;
2. ``start``: the prompt widget started on it with the stand-in model (its layers
   added, ``<image>_labels`` among them);
3. ``clicks``: ``--clicks`` cells of the shown plane clicked and committed (their tiles
   embedded on demand; each commit timed on the GUI thread), the last one undone (timed);
4. ``everything``: the ``<image> everything`` layer made as the everything widget makes
   it and every plane written into it as a run writes it (``result.data[plane] = ...``),
   the mosaic's ground-truth cells standing in for the model's (about 3,000 per 8192 px
   plane: segment everything on such a plane is not what is measured);
5. ``commit``: the everything widget's *Commit to labels* over the whole stack, into
   ``<image>_labels``;
6. ``browse``: every plane shown in turn (stacks);
7. ``save``: ``<image>_labels`` written with the plugin's writer
   (:func:`~napari_mobilesam.napari_io.write_labels`, plane by plane).

For each step: the process's resident memory (RSS) at its end, its peak during the step
(the kernel's high-water mark, reset before each step), and its wall time (noisy on a
shared machine). Labels are ``numpy`` (what a plane or a small stack gets) or
``chunked`` (:class:`~napari_mobilesam.chunked_labels.ChunkedLabels`, what a stack over
``MOBILESAM_CHUNKED_LABELS_MB`` gets; for one plane it is forced by adding both layers
before Start).

Usage::

    xvfb-run -a python benchmarks/bench_labels.py [--size 8192] [--planes 1 5]
        [--clicks 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, write_json

MODEL = "vit_t_synthetic_cells"
SHIFT = 97  # px each plane of a stack is shifted by


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    """The high-water mark of RSS since the last :func:`_reset_peak` (bytes)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pragma: no cover


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark (Linux)
    except OSError:  # pragma: no cover (then peaks are since the process started)
        pass


def case(
    image_path: str, truth_path: str, kind: str, clicks: int, model: str = MODEL
) -> list[dict]:
    """One case in this process (the ``--child`` entry); returns a row per step."""
    from benchmarks.bench_napari import wait_until
    from benchmarks.bench_tiles import pick_cells

    os.environ["MOBILESAM_CHUNKED_LABELS_MB"] = "0" if kind == "chunked" else "off"
    import napari

    from napari_mobilesam._widgets import EverythingWidget, PromptWidget
    from napari_mobilesam._widgets._chunked import add_labels
    from napari_mobilesam.chunked_labels import ChunkedLabels
    from napari_mobilesam.napari_io import write_labels

    rows: list[dict] = []
    clock = [time.perf_counter()]

    def mark(step: str) -> None:
        now = time.perf_counter()
        rows.append({"step": step, "rss": _rss(), "peak": _peak(), "s": now - clock[0]})
        _reset_peak()
        clock[0] = now

    truth = np.load(truth_path, mmap_mode="r")  # (H, W): read a plane's worth at a time
    cells = pick_cells(np.asarray(truth), clicks)
    image = np.load(image_path)
    lead = image.shape[:-2]
    _reset_peak()
    clock[0] = time.perf_counter()
    viewer = napari.Viewer(show=True)
    viewer.add_image(image, name="mosaic", contrast_limits=(0, int(image.max())))
    if kind == "chunked" and not lead:  # one plane is never chunked by itself
        for name in ("mosaic_labels", "mosaic everything"):
            viewer.add_labels(ChunkedLabels(image.shape), name=name)
    wait_until(lambda: True)
    mark("image")

    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.model.name.setCurrentText(model)
    w.image_combo.setCurrentText("mosaic")
    w.start()
    wait_until(lambda: not w.runner.busy)
    state = w.state
    layer = state.labels
    assert isinstance(layer.data, ChunkedLabels) == (kind == "chunked"), type(layer.data)
    mark("start")

    shown = tuple(int(i) for i in viewer.dims.current_step[: len(lead)])
    commit_ms = []
    for _, (r, c) in cells:
        state.points.add(np.array([[*shown, r, c]], float))
        wait_until(lambda: not w.runner.busy and w.prediction is not None)
        t0 = time.perf_counter()
        w.commit()  # on the GUI thread: labels written and redrawn
        commit_ms.append(1000 * (time.perf_counter() - t0))
    t0 = time.perf_counter()
    w.undo()  # the last object
    undo_ms = 1000 * (time.perf_counter() - t0)
    mark("clicks")

    e = EverythingWidget(viewer)
    viewer.window.add_dock_widget(e)
    e.image_combo.setCurrentText("mosaic")
    if "mosaic everything" in viewer.layers:
        result = viewer.layers["mosaic everything"]
    else:  # as a run makes it
        result = add_labels(viewer, image.shape, name="mosaic everything")
    for k, index in enumerate(np.ndindex(*lead)):  # as a run writes each plane
        result.data[index] = np.roll(truth, SHIFT * k, 1)
        result.refresh()
    wait_until(lambda: True)
    assert isinstance(result.data, ChunkedLabels) == (kind == "chunked")
    mark("everything")

    e.scope.setCurrentIndex(1)  # the whole stack
    ids = e.commit_to_labels()
    wait_until(lambda: True)
    mark("commit")

    for k in range(lead[0] if lead else 0):
        viewer.dims.set_current_step(0, k)
        wait_until(lambda: True)
    mark("browse")

    with tempfile.TemporaryDirectory() as tmp:
        write_labels(str(Path(tmp) / "mosaic_labels.tif"), layer.data, {"name": layer.name})
    mark("save")
    count = int(np.max(layer.data))
    for each in list(viewer.layers):  # the child leaves with os._exit: no clean-up then
        if isinstance(each.data, ChunkedLabels):
            each.data.close()
    rows.append({
        "step": "objects", "count": count, "committed": len(ids),
        "commit_ms": commit_ms, "undo_ms": undo_ms,
    })  # fmt: skip
    return rows


def run(size: int = 8192, planes=(1, 5), clicks: int = 3, model: str = MODEL) -> dict:
    """Every case (planes x numpy/chunked), each in a fresh child process."""
    from benchmarks.bench_tiles import mosaic

    plane, truth = mosaic(size)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        truth_path = str(Path(tmp) / "truth.npy")
        np.save(truth_path, truth)
        for n in planes:
            image_path = str(Path(tmp) / f"image{n}.npy")
            stack = [np.roll(plane, SHIFT * k, 1) for k in range(n)]
            np.save(image_path, stack[0] if n == 1 else np.stack(stack))
            del stack
            for kind in ("numpy", "chunked"):
                spec = {"image_path": image_path, "truth_path": truth_path, "kind": kind,
                        "clicks": clicks, "model": model}  # fmt: skip
                out = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
                rows = json.loads(out.strip().splitlines()[-1])
                cases.append({"planes": n, "kind": kind, "steps": rows[:-1], **rows[-1]})
    return {"machine": machine(), "size": size, "clicks": clicks, "cases": cases}


def report(result: dict) -> str:
    size = result["size"]
    lines = [f"{size} x {size} uint16 mosaic; RSS at the end / peak during each step, GB"]
    steps = [row["step"] for row in result["cases"][0]["steps"]]
    lines.append(f"  {'planes, labels':<18}" + "".join(f"{s:>18}" for s in steps))
    for c in result["cases"]:
        cells = "".join(
            f"{row['rss'] / 1e9:>12.2f} /{row['peak'] / 1e9:5.2f}" for row in c["steps"]
        )
        lines.append(f"  {str(c['planes']) + ', ' + c['kind']:<18}{cells}")
    lines.append("on the GUI thread, ms (noisy): commit (each click), undo (the last)")
    for c in result["cases"]:
        each = ", ".join(f"{ms:.0f}" for ms in c["commit_ms"])
        lines.append(f"  {str(c['planes']) + ', ' + c['kind']:<18}{each}; undo {c['undo_ms']:.0f}")
    lines.append("step times, s (noisy):")
    for c in result["cases"]:
        times = "".join(f"{row['s']:>18.1f}" for row in c["steps"])
        lines.append(f"  {str(c['planes']) + ', ' + c['kind']:<18}{times}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--planes", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--clicks", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # then leave at once: no viewer teardown beside the widget's threads
        print(json.dumps(case(**json.loads(args.child))), flush=True)
        os._exit(0)
    result = run(args.size, args.planes, args.clicks)
    print(report(result))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
