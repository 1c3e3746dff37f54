"""Hostile inputs 2. Two runs into one output folder: the second refuses, naming the first."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from mobilesam_batch import folder as folder_mod
from mobilesam_batch import segment
from mobilesam_batch.folder import LOCK_NAME, WORK_DIR, OutputFolder

from ..conftest import ROOT
from .common import FAST, _assert_sets_complete, _image, _stack, _visible

# -- 2. two runs into one output folder --------------------------------------------------


def test_a_held_output_folder_is_refused_naming_the_holder(tool, tmp_path, capsys):
    image = _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    held = OutputFolder.open(out, command=["another", "run"])
    try:
        assert tool(image, "-o", out) == 1
    finally:
        held.close()
    err = " ".join(capsys.readouterr().err.split())
    assert "another mobilesam-everything run is writing there" in err
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started 20" in err
    assert not (out / "a_labels.tif").exists()
    assert tool(image, "-o", out) == 0  # released: the next run goes ahead
    _assert_sets_complete(out)


def test_a_run_started_during_another_refuses_and_the_first_finishes(
    tool, tmp_path, capsys, monkeypatch
):
    """The second run starts while the first is segmenting its first plane (here: in the
    same process, from inside that plane, so the overlap is certain)."""
    inputs = [_image(tmp_path / "in" / f"{c}.png", seed=i) for i, c in enumerate("abc")]
    out = tmp_path / "out"
    real = segment.PlaneSegmenter.segment
    second = []

    def segment_and_start_another(self, plane, index=()):
        if not second:
            second.append(None)
            second[0] = tool(*inputs, "-o", out)
        return real(self, plane, index)

    monkeypatch.setattr(segment.PlaneSegmenter, "segment", segment_and_start_another)
    assert tool(*inputs, "-o", out) == 0
    assert second == [1]
    captured = capsys.readouterr()
    assert f"another mobilesam-everything run is writing there (pid {os.getpid()}" in " ".join(
        captured.err.split()
    )
    assert "3 done, 0 skipped, 0 failed" in captured.out
    assert sorted(_visible(out)) == sorted(
        f"{c}_labels.{e}" for c in "abc" for e in ("json", "tif")
    )
    _assert_sets_complete(out)


def test_a_lock_left_by_a_killed_run_is_taken_over(tool, tmp_path, capsys):
    image = _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from mobilesam_batch.folder import OutputFolder\n"
        "OutputFolder.open(Path(sys.argv[1]), command=['killed'])\n"
        "print('holding', flush=True)\n"
        "time.sleep(3600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "holding\n"
        assert tool(image, "-o", out) == 1  # alive: refused
        assert f"(pid {proc.pid} on host" in capsys.readouterr().err
    finally:
        proc.kill()  # SIGKILL: no cleanup, its lock file and temporary folder stay
        proc.wait()
    assert (out / LOCK_NAME).exists() and list((out / WORK_DIR).glob("tmp-*"))
    assert tool(image, "-o", out) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"was left locked by a run that ended (pid {proc.pid} on host" in err
    _assert_sets_complete(out)  # its temporary folder went too


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_without_flock_the_lock_file_decides(tool, tmp_path, capsys, monkeypatch):
    """Where the filesystem cannot lock (e.g. Lustre without flock), the holder's record
    decides: alive here or elsewhere refuses, ended here is taken over."""

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(folder_mod.fcntl, "flock", no_flock)
    image = _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    here = socket.gethostname()
    holders = [
        ({"pid": os.getppid(), "host": here, "started": "t0"}, 1, f"pid {os.getppid()}"),
        ({"pid": 42, "host": "elsewhere", "started": "t1"}, 1, f"if it has ended, delete {lock}"),
        ({"pid": _dead_pid(), "host": here, "started": "t2"}, 0, "left locked by a run that ended"),
    ]  # fmt: skip
    for holder, status, message in holders:
        lock.write_text(json.dumps(holder))
        assert tool(image, "-o", out) == status
        assert message in " ".join(capsys.readouterr().err.split())
    _assert_sets_complete(out)


def test_an_unlockable_lock_file_is_an_error(tool, tmp_path, capsys, monkeypatch):
    def broken(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(folder_mod.fcntl, "flock", broken)
    assert tool(_image(tmp_path / "a.png"), "-o", tmp_path / "out") == 1
    assert f"-o {tmp_path / 'out'}: cannot lock it: Bad file descriptor" in capsys.readouterr().err


# Two real processes, each building the tiny model once and then running the command on
# request (so that 20 runs do not pay 20 torch imports).
_DRIVER = """
import contextlib, io, json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
from tests.conftest import TINY_CONFIG, _randomize
from napari_mobilesam.build import build_sam
from mobilesam_batch import cli, segment
torch.set_num_threads(1)
model = _randomize(build_sam(TINY_CONFIG), seed=0).eval()
segment.ModelSpec.load = lambda self: model
print(json.dumps({"pid": os.getpid()}), flush=True)
for line in sys.stdin:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(json.loads(line))
    print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue()}), flush=True)
"""


class _Driver:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, str(ROOT)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.pid = json.loads(self.proc.stdout.readline())["pid"]

    def start(self, argv: list[str]) -> None:
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the driver process ended"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


@pytest.fixture(scope="module")
def drivers():
    pair = [_Driver(), _Driver()]
    yield pair
    for d in pair:
        d.close()


@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_two_concurrent_runs_ten_times(drivers, tmp_path, delay):
    """Two runs on the same inputs and output folder, started ``delay`` s apart, 10 times:
    each either finishes with outputs identical to a lone run's, or refuses, naming the
    other; never a traceback, never a damaged or half-written output."""
    inp = tmp_path / "in"
    for i in range(3):
        _image(inp / f"img{i}.png", seed=i)
    _stack(inp / "stack.tif", planes=3)
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"stand-in")

    def argv(out: Path) -> list[str]:
        return [str(inp), "-o", str(out), "--weights", str(weights), "--device", "cpu", "-q",
                "--csv", *FAST]  # fmt: skip

    a, b = drivers
    a.start(argv(tmp_path / "ref"))
    assert a.result()["code"] == 0
    reference = _visible(tmp_path / "ref")
    for round_ in range(10):
        out = tmp_path / f"out{round_}"
        a.start(argv(out))
        time.sleep(delay)
        b.start(argv(out))
        results = {a.pid: a.result(), b.pid: b.result()}
        finished = 0
        for pid, r in results.items():
            other = b.pid if pid == a.pid else a.pid
            assert "Traceback" not in r["err"], r["err"]
            if r["code"] == 0:
                finished += 1
                assert " 0 failed" in r["out"], r
            else:
                assert r["code"] == 1, r
                err = " ".join(r["err"].split())
                assert f"another mobilesam-everything run is writing there (pid {other} " in err
        assert finished >= 1
        got = _visible(out)
        assert sorted(got) == sorted(reference)
        for name, data in reference.items():
            if name.endswith(".tif"):
                np.testing.assert_array_equal(
                    tifffile.imread(out / name), tifffile.imread(tmp_path / "ref" / name)
                )
            elif name.endswith(".csv"):
                assert got[name] == data
        _assert_sets_complete(out)
