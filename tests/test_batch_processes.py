"""``mobilesam-everything`` as a real process on the golden official-format checkpoint:
killed with SIGKILL and rerun, and on a dask LocalCluster, each against an
uninterrupted local run."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from mobilesam_batch.runner import WORK_DIR

from .batch_data import BAD, FAST, cells, make_dataset
from .conftest import GOLDEN_CKPT, requires_golden

# ------------------------------------------------------------- the real command, golden


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "mobilesam_batch.cli", *args]


def _golden_args(inp, out):
    return [str(inp), "-o", str(out), "--weights", str(GOLDEN_CKPT), "--device", "cpu", *FAST]


def _read_all(out: Path) -> dict[str, np.ndarray]:
    return {p.name: tifffile.imread(p) for p in sorted(out.glob("*_labels.tif"))}


@requires_golden
@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    rng = np.random.default_rng(7)
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(4):
        Image.fromarray(cells((96, 96), rng)).save(inp / f"img{i}.png")
    stack = np.stack([cells((80, 80), rng, dtype=np.uint16) for _ in range(3)])
    tifffile.imwrite(inp / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})

    ref = tmp_path / "ref"
    done = subprocess.run(_command(*_golden_args(inp, ref), "-q"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "out"
    proc = subprocess.Popen(_command(*_golden_args(inp, out), "--csv"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 900  # generous: the machine may be busy
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(out.glob("*_labels.json"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # whatever is visible is complete: every label image reads, every json parses
    for p in out.iterdir():
        if p.name.startswith("."):
            continue
        assert p.name.endswith(("_labels.tif", "_labels.json", "_objects.csv")), p.name
        if p.suffix == ".tif":
            tifffile.imread(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
    finished = len(list(out.glob("*_labels.json")))
    assert 2 <= finished < 5

    again = subprocess.run(_command(*_golden_args(inp, out), "--csv"), capture_output=True,
                           text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"{5 - finished} done, {finished} skipped, 0 failed" in again.stdout
    got, want = _read_all(out), _read_all(ref)
    assert got.keys() == want.keys() and len(got) == 5
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert not (out / WORK_DIR).exists()


@requires_golden
@pytest.mark.slow
def test_local_cluster_equals_local_run(tmp_path):
    pytest.importorskip("distributed")
    make_dataset(tmp_path / "in")
    local = tmp_path / "local"
    dask = tmp_path / "dask"
    args = _golden_args(tmp_path / "in", local)
    a = subprocess.run(_command(*args, "-q", "--csv"), capture_output=True, text=True)
    assert a.returncode == 1 and "5 done, 0 skipped, 2 failed" in a.stdout, a.stderr
    args = _golden_args(tmp_path / "in", dask)
    b = subprocess.run(_command(*args, "-q", "--csv", "--scheduler", "local", "--workers", "2"),
                       capture_output=True, text=True)  # fmt: skip
    assert b.returncode == 1 and "5 done, 0 skipped, 2 failed" in b.stdout, b.stderr
    assert "Traceback" not in b.stderr
    for bad in BAD:
        assert bad in b.stderr
    got, want = _read_all(dask), _read_all(local)
    assert got.keys() == want.keys() and len(got) == 5
    for name in want:  # label images identical (as docs/batch.md says)...
        np.testing.assert_array_equal(got[name], want[name])
    for csv_file in sorted(local.glob("*_objects.csv")):  # ...scores within float rounding
        rows_a = list(csv.DictReader(open(csv_file)))
        rows_b = list(csv.DictReader(open(dask / csv_file.name)))
        assert len(rows_a) == len(rows_b)
        for ra, rb in zip(rows_a, rows_b, strict=True):
            for col in ra:
                if col in ("predicted_iou", "stability_score"):
                    assert abs(float(ra[col]) - float(rb[col])) <= 1e-6, (col, ra, rb)
                else:
                    assert ra[col] == rb[col]
