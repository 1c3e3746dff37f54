"""Embedding stores: ``mobilesam embed`` killed and rerun; new-plane clicks from the store.

A synthetic (``--planes``, ``--size``, ``--size``) uint16 stack
(:func:`napari_mobilesam.synthetic.cells_3d`) is written as a TIFF and embedded with the
stand-in model ``vit_t_synthetic_cells`` and fixed contrast limits (the stack's 0.5 / 99.5
percentiles, as a napari layer would be set), in three runs of ``mobilesam embed``, each a
process of its own:

- **full**: from scratch into a store of its own, uninterrupted (the baseline);
- **killed**: into a second store, SIGKILLed as soon as ``--kill-after`` planes are done
  (the store is polled, not a fixed sleep);
- **resumed**: the same command again on the second store, to the end.

Each process counts the images its encoder runs on: a wrapper around ``Engine.embed``
appends one line per call to a log file (line-buffered, so a killed run's count
survives). The resumed run's work is counted three ways, which must agree with
``planes - done at the kill``: that log, the command's own summary line
(``N planes embedded, M already done``), and the store's chunk files (the ``features``
chunks rewritten since the kill; the planes done at the kill must keep their files and
checksums untouched).

Then a click on a plane not visited before (move to the plane, one point at the interior of
its largest cell, the mask back), through
:class:`~napari_mobilesam.interactive.PromptSession` with the store attached
(:func:`~napari_mobilesam.store.attach_store`) and without it, interleaved over
``--clicks`` planes, with the encoder images each click ran; the low-res logits of the two
are compared. ``--widget`` does the same in the napari prompt widget (the store opened with
*Embeddings…*, a second layer of the same stack without one; needs a display, e.g.
``xvfb-run``).

Usage::

    python benchmarks/bench_store.py [--planes 50] [--size 256] [--kill-after 20]
        [--clicks 10] [--widget] [--json OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, write_json

MODEL = "vit_t_synthetic_cells"
#: the summary line of ``mobilesam embed`` on a store of whole planes
SUMMARY = re.compile(r"(\d+) planes embedded, (\d+) already done")

# `mobilesam embed` (napari_mobilesam.cli.main, what the console script runs) with a
# counter of encoder images: one line "time images" per Engine.embed call, written
# before the encoder runs and flushed at once
_CHILD = """
import sys, time
from napari_mobilesam.engine.engine import Engine
log = open(sys.argv[1], "a", buffering=1)
real = Engine.embed
def counted(self, frames, sizes):
    log.write(f"{time.time()!r} {len(frames)}\\n")
    return real(self, frames, sizes)
Engine.embed = counted
from napari_mobilesam.cli import main
sys.exit(main(sys.argv[2:]))
"""


def make_stack(folder: Path, planes: int, size: int, seed: int = 0):
    """A (planes, size, size) uint16 stack of cells written to ``folder/stack.tif``.

    Returns
    -------
    path : Path
        The TIFF (axes ZYX; its labels beside it as ``stack_labels.tif``).
    image : np.ndarray
        (Z, Y, X) uint16.
    labels : np.ndarray
        (Z, Y, X) uint32, the cells' ids.
    limits : (float, float)
        The stack's 0.5 and 99.5 percentiles, the contrast limits every run uses.
    """
    from napari_mobilesam.synthetic import cells_3d, write_sample

    sample = cells_3d((planes, size, size), seed=seed, dtype="uint16")
    path = folder / "stack.tif"
    write_sample(sample, path, folder / "stack_labels.tif")
    lo, hi = np.percentile(sample.image, (0.5, 99.5))
    return path, sample.image, sample.labels, (float(np.floor(lo)), float(np.ceil(hi)))


def embed_command(source: Path, store: Path, log: Path, limits, model: str = MODEL) -> list[str]:
    """The ``mobilesam embed`` command line (in a fresh Python, its encoder counted)."""
    return [
        sys.executable, "-c", _CHILD, str(log), "embed", str(source), "-o", str(store),
        "--model", model, "--device", "cpu", "--contrast-limits", f"{limits[0]},{limits[1]}",
        "-q",
    ]  # fmt: skip


def _encoder_log(log: Path, launched: float) -> dict:
    """Encoder calls and images from a child's log; seconds from launch to the first call,
    and the median seconds between calls (a plane's encoder time and write)."""
    rows = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    times = [float(t) for t, _ in rows]
    return {
        "encoder_calls": len(rows),
        "encoder_images": sum(int(n) for _, n in rows),
        "startup_s": times[0] - launched if times else None,
        "call_interval_s": statistics.median(np.diff(times)) if len(times) > 1 else None,
    }


def _finished(proc: subprocess.Popen, launched: float) -> dict:
    out, err = proc.communicate()
    wall = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(
            f"mobilesam embed failed (exit {proc.returncode}): {err.strip()[-2000:]}"
        )
    found = SUMMARY.search(out)
    if found is None:
        raise RuntimeError(f"mobilesam embed printed no summary line: {out.strip()!r}")
    return {"wall_s": wall, "stdout": out.strip(), "reported_embedded": int(found[1]),
            "reported_already_done": int(found[2])}  # fmt: skip


def run_embed(command: list[str], log: Path) -> dict:
    """Run ``command`` to the end: its wall time, summary line and encoder counts.

    Raises
    ------
    RuntimeError
        When the command fails (its stderr in the message) or prints no summary line.
    """
    launched = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = _finished(proc, launched)
    return {**result, **_encoder_log(log, launched)}


def run_killed(command: list[str], store: Path, log: Path, kill_after: int,
               timeout: float = 3600.0) -> dict:  # fmt: skip
    """Start ``command`` and SIGKILL it once ``store`` has ``kill_after`` done planes.

    Raises
    ------
    RuntimeError
        When the run ends by itself first (or fails), or is not that far after
        ``timeout`` seconds.
    """
    from napari_mobilesam.store import EmbeddingStore

    launched = time.time()
    stderr = log.with_name(log.name + ".stderr")  # a file: a pipe nobody reads could fill
    with open(stderr, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    done, opened = 0, None
    while proc.poll() is None and done < kill_after and time.time() - launched < timeout:
        if opened is None and store.exists():  # (created whole, by a rename)
            opened = EmbeddingStore.open(store)
        done = 0 if opened is None else len(opened.done())  # rereads the checksums
        time.sleep(0.05)
    if proc.poll() is not None:
        raise RuntimeError(
            f"mobilesam embed ended (exit {proc.returncode}) before {kill_after} planes were "
            f"done, so it could not be killed: give more planes or a smaller kill_after. "
            f"{stderr.read_text().strip()[-2000:]}"
        )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if done < kill_after:
        raise RuntimeError(f"{done} of {kill_after} planes done after {timeout:.0f} s; killed")
    return {"wall_s": time.time() - launched, "signal": "SIGKILL", **_encoder_log(log, launched)}


def _chunk_records(store_path: Path) -> dict:
    """Per plane of the store: (features chunk mtime_ns or None, checksum hex, done)."""
    from napari_mobilesam.store import EmbeddingStore

    store = EmbeddingStore.open(store_path)
    done = set(store.done())
    out = {}
    for idx in np.ndindex(*store.plane_shape):
        chunk = store_path / store.chunk_name(idx)
        mtime = chunk.stat().st_mtime_ns if chunk.exists() else None
        digest = None
        if idx in done:  # (read() checks the stored sha256)
            digest = hashlib.sha256(store.read(idx).features.numpy().tobytes()).hexdigest()
        out[idx] = (mtime, digest, idx in done)
    return out


def resume(source: Path, folder: Path, planes: int, kill_after: int, limits,
           model: str = MODEL) -> dict:  # fmt: skip
    """The three runs of the module docstring and the resumed run's counts."""
    full_store, store = folder / "full.zarr", folder / "resumed.zarr"
    logs = {name: folder / f"{name}.log" for name in ("full", "killed", "resumed")}
    full = run_embed(embed_command(source, full_store, logs["full"], limits, model), logs["full"])
    command = embed_command(source, store, logs["killed"], limits, model)
    killed = run_killed(command, store, logs["killed"], kill_after)
    at_kill = _chunk_records(store)
    done_at_kill = sum(done for _, _, done in at_kill.values())
    command = embed_command(source, store, logs["resumed"], limits, model)
    resumed = run_embed(command, logs["resumed"])
    after = _chunk_records(store)
    rewritten = [idx for idx in after if after[idx][0] != at_kill[idx][0]]
    kept = [idx for idx, rec in at_kill.items() if rec[2] and after[idx][:2] == rec[:2]]
    return {
        "planes": planes,
        "kill_after": kill_after,
        "full": full,
        "killed": killed,
        "resumed": resumed,
        "done_at_kill": done_at_kill,
        "in_flight_at_kill": killed["encoder_images"] - done_at_kill,
        "rerun_chunks_written": len(rewritten),
        "kept_untouched": len(kept),
        "done_after": sum(done for _, _, done in after.values()),
        "consistent": (
            resumed["encoder_images"]
            == planes - done_at_kill
            == resumed["reported_embedded"]
            == len(rewritten)
            and resumed["reported_already_done"] == done_at_kill == len(kept)
            and full["encoder_images"] == planes
            and sum(done for _, _, done in after.values()) == planes
        ),
        "time_ratio": resumed["wall_s"] / full["wall_s"],
        "store": str(store),
    }


def click_points(labels: np.ndarray, indices) -> dict:
    """For each plane index, (row, col) of the pixel farthest inside its largest cell."""
    from scipy.ndimage import distance_transform_edt

    out = {}
    for z in indices:
        plane = labels[z]
        ids, areas = np.unique(plane[plane > 0], return_counts=True)
        if ids.size == 0:
            out[z] = (plane.shape[0] // 2, plane.shape[1] // 2)
            continue
        depth = distance_transform_edt(np.pad(plane == ids[np.argmax(areas)], 1))[1:-1, 1:-1]
        out[z] = tuple(int(v) for v in np.unravel_index(int(np.argmax(depth)), plane.shape))
    return out


class EncoderCounter:
    """Counts the images an engine's encoder runs on (wraps ``engine.embed`` of that
    engine object only; :meth:`close` restores it)."""

    def __init__(self, engine):
        self.engine, self.images = engine, 0
        real = engine.embed

        def counted(frames, sizes):
            self.images += len(frames)
            return real(frames, sizes)

        engine.embed = counted

    def close(self) -> None:
        del self.engine.embed


def session_clicks(stack, labels, limits, store: Path, indices, model=MODEL) -> dict:
    """A click on each new plane of ``indices`` with the store and without, interleaved."""
    from napari_mobilesam.interactive import PromptSession
    from napari_mobilesam.predictor import Predictor
    from napari_mobilesam.store import attach_store
    from napari_mobilesam.weights import default_max_upscale

    # the model's own upscale limit, as the widget's "model default" and mobilesam embed use
    engine = Predictor(model, device="cpu", max_upscale=default_max_upscale(model)).engine
    counter = EncoderCounter(engine)
    try:
        plain = PromptSession(Predictor(engine), stack, contrast_limits=limits)
        stored = PromptSession(Predictor(engine), stack, contrast_limits=limits)
        t0 = time.perf_counter()
        cache = attach_store(stored, store)
        attach_s = time.perf_counter() - t0
        warm = [z for z in range(len(stack)) if z not in set(indices)][:1]
        points = click_points(labels, [*warm, *indices])
        rows: dict[str, list] = {"store": [], "encoder": []}
        diffs, same = [], 0
        for k, z in enumerate([*warm, *indices]):
            order = [("store", stored), ("encoder", plain)]
            preds = {}
            for name, session in order if k % 2 == 0 else order[::-1]:
                before = counter.images
                t0 = time.perf_counter()
                session.embed((z,))
                preds[name] = session.predict([points[z]])
                seconds = time.perf_counter() - t0
                if z not in warm:
                    rows[name].append(
                        {"plane": z, "s": seconds, "encoder_images": counter.images - before}
                    )
            a, b = preds["store"], preds["encoder"]
            diffs.append(float(np.abs(a.low_res - b.low_res).max()))
            same += bool(np.array_equal(a.masks, b.masks))
    finally:
        counter.close()
    return _summary(rows, {"attach_s": attach_s, "store_loads": cache.loads,
                           "max_low_res_diff": max(diffs), "same_masks": same,
                           "compared": len(diffs)})  # fmt: skip


def _summary(rows: dict, extra: dict) -> dict:
    med = {name: statistics.median(r["s"] for r in rs) for name, rs in rows.items()}
    return {
        "clicks": rows,
        "median_s": med,
        "encoder_images": {name: sum(r["encoder_images"] for r in rs) for name, rs in rows.items()},
        "ratio": med["store"] / med["encoder"],
        **extra,
    }


def widget_clicks(viewer, stack, labels, limits, store: Path, indices, model=MODEL,
                  timeout: float = 600.0) -> dict:  # fmt: skip
    """The prompt widget: a click on each new plane of ``indices``, on a layer with the
    store opened (*Embeddings…*), then on a layer of the same stack without one.

    A click is timed from moving the viewer to the plane to the preview's prediction."""
    from benchmarks.bench_napari import wait_until
    from napari_mobilesam._widgets import PromptWidget

    w = PromptWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.model.name.setCurrentText(model)
    points = click_points(labels, indices)
    rows: dict[str, list] = {"store": [], "encoder": []}
    status = {}

    def idle():
        wait_until(lambda: not w.runner.busy, timeout)

    for name in ("store", "encoder"):
        layer = viewer.add_image(stack, name=f"stack ({name})", contrast_limits=limits)
        w.image_combo.setCurrentText(layer.name)
        viewer.dims.current_step = (0, 0, 0)
        if name == "store":
            w.open_store(store)
        w.start()
        idle()
        status[name] = w.status.text()
        state = w.state
        counter = EncoderCounter(w.session.predictor.engine)
        try:
            for z in indices:
                w.clear()
                before, images = state.prediction, counter.images
                t0 = time.perf_counter()
                viewer.dims.current_step = (z, 0, 0)
                state.points.add(np.array([[z, *points[z]]], dtype=float))
                wait_until(lambda b=before, s=state: s.prediction is not b, timeout)
                seconds = time.perf_counter() - t0
                idle()
                rows[name].append({"plane": z, "s": seconds,
                                   "encoder_images": counter.images - images})  # fmt: skip
        finally:
            counter.close()
    loads = w.session_of(viewer.layers["stack (store)"]).session.cache.loads
    return _summary(rows, {"status": status, "store_loads": loads})


def run(planes: int = 50, size: int = 256, kill_after: int | None = None, clicks: int = 10,
        widget=False, model: str = MODEL, folder=None) -> dict:  # fmt: skip
    """Everything in the module docstring.

    ``widget``: False, or a napari viewer for :func:`widget_clicks` (True: a new one).
    ``folder``: where the TIFF and stores go (default: a temporary folder, removed).
    """
    if planes < 3:
        raise ValueError(f"planes must be at least 3, got {planes}")
    kill_after = planes * 2 // 5 if kill_after is None else kill_after
    if not 1 <= kill_after < planes:
        raise ValueError(f"kill_after must be in 1..{planes - 1} (planes - 1), got {kill_after}")
    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run(planes, size, kill_after, clicks, widget, model, Path(tmp))
    folder = Path(folder)
    source, image, labels, limits = make_stack(folder, planes, size)
    result = {"machine": machine(), "size": size, "model": model, "contrast_limits": limits,
              "load_before": os.getloadavg()[0]}  # fmt: skip
    result["resume"] = resume(source, folder, planes, kill_after, limits, model)
    store = Path(result["resume"]["store"])
    step = max(1, (planes - 1) // max(1, clicks))
    indices = list(range(1, planes, step))[:clicks]
    result["session"] = session_clicks(image, labels, limits, store, indices, model)
    if widget is not False:
        import napari

        viewer = napari.Viewer(show=False) if widget is True else widget
        try:
            result["widget"] = widget_clicks(viewer, image, labels, limits, store, indices, model)
        finally:
            if widget is True:
                viewer.close()
    result["load_after"] = os.getloadavg()[0]
    return result


def _pace(run: dict) -> str:
    """Start-up and seconds per encoder call of one run, as text."""
    text = f"start-up {run['startup_s']:.1f} s" if run["startup_s"] is not None else "no encoder"
    if run["call_interval_s"] is not None:
        text += f", {run['call_interval_s']:.2f} s/plane"
    return text


def report(result: dict) -> str:
    r = result["resume"]
    full, killed, resumed = r["full"], r["killed"], r["resumed"]
    n, left = r["planes"], r["planes"] - r["done_at_kill"]
    lines = [
        f"mobilesam embed, {n} planes of {result['size']} x {result['size']} uint16, "
        f"{result['model']} on the CPU (load average {result['load_before']:.2f} -> "
        f"{result['load_after']:.2f})",
        f"  full run, from scratch:  {full['wall_s']:7.1f} s, {full['encoder_images']} encoder "
        f"images ({_pace(full)})",
        f"  killed (SIGKILL) run:    {killed['wall_s']:7.1f} s, {r['done_at_kill']} planes done, "
        f"{killed['encoder_images']} encoder images ({r['in_flight_at_kill']} lost in flight)",
        f"  resumed run:             {resumed['wall_s']:7.1f} s, {resumed['encoder_images']} "
        f"encoder images = {n} - {r['done_at_kill']} ({_pace(resumed)})",
        f"    command says: {SUMMARY.search(resumed['stdout'])[0]}",
        f"    store: {r['rerun_chunks_written']} chunks written by the rerun, "
        f"{r['kept_untouched']} of {r['done_at_kill']} done planes untouched, "
        f"{r['done_after']} of {n} done",
        f"    counts agree: {'yes' if r['consistent'] else 'NO'}; resumed / full time "
        f"{r['time_ratio']:.2f}x (planes left {left / n:.2f})",
    ]
    for key, what in (("session", "PromptSession"), ("widget", "prompt widget")):
        if key not in result:
            continue
        s = result[key]
        lines.append(f"  new-plane click, {what} (median of {len(s['clicks']['store'])}):")
        for name, label in (("store", "from the store"), ("encoder", "encoder")):
            lines.append(
                f"    {label:<16} {s['median_s'][name] * 1e3:8.1f} ms, "
                f"{s['encoder_images'][name]} encoder images"
            )
        extra = ""
        if "max_low_res_diff" in s:
            extra = (
                f"; same masks {s['same_masks']} of {s['compared']}, low-res logits within "
                f"{s['max_low_res_diff']:.1e}"
            )
        lines.append(
            f"    store / encoder {s['ratio']:.2f}x; {s['store_loads']} planes read{extra}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--planes", type=int, default=50)
    ap.add_argument("--size", type=int, default=256, help="plane side, px [256]")
    ap.add_argument("--kill-after", type=int, help="planes done at the kill [2/5 of them]")
    ap.add_argument("--clicks", type=int, default=10, help="new planes clicked [10]")
    ap.add_argument("--widget", action="store_true", help="also in the napari widget")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    app = None
    if args.widget:
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance() or QApplication(sys.argv[:1])
    result = run(args.planes, args.size, args.kill_after, args.clicks, args.widget)
    print(report(result))
    write_json(args.json, result)
    del app
    return 0


if __name__ == "__main__":
    sys.exit(main())
