"""Hostile inputs, each built here, so that the failures found by trying the tool as a
hostile user would stay fixed: numbered as in the issue "Reliability".

1. outputs of one input never silently replace another input's (``--on-clash``);
2. two runs into one output folder: the second refuses, naming the first;
3. a full disk or a permission error stops the run once, with a summary, and never
   leaves a label image without its provenance record; a rerun finishes;
4. an unusable output folder fails before the model loads, without a traceback;
5. no silent waits or drops: no dask worker, inputs inside the output folder,
   dangling symbolic links;
6. checkpoint errors never advise ``weights_only=False`` (the weights cache checks
   are in tests/test_weights.py);
7. API edges: empty prompt batches, extreme aspect ratios;
8. provenance over resumed runs, Ctrl-C at any moment, no empty work folders.

The batch tool runs in-process on the tiny model (``tool``), or as real processes
that build the same tiny model (``drivers``, and ``tiny_env`` for LocalCluster workers).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from skimage.draw import disk

from mobilesam_batch import cli, segment
from mobilesam_batch import folder as folder_mod
from mobilesam_batch.folder import LOCK_NAME, WORK_DIR, OutputFolder
from napari_mobilesam.predictor import Predictor, resolve_precision
from napari_mobilesam.transforms import preprocess_shape

from .conftest import ROOT

FAST = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _cells(shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full(shape, 20.0)
    for _ in range(4):
        r, c = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)
        img[disk((r, c), rng.integers(4, 8), shape=shape)] = rng.integers(90, 220)
    return np.clip(img + rng.normal(0, 3, shape), 0, 255).astype(np.uint8)


def _image(path: Path, seed: int = 0, shape=(48, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_cells(shape, seed)).save(path)
    return path


def _stack(path: Path, planes: int = 3, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.stack([_cells((40, 40), seed + i) for i in range(planes)])
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZYX"})
    return path


@pytest.fixture
def tool(tiny_model, tmp_path, monkeypatch):
    """``tool(*args) -> exit status``: the command in-process on the tiny model."""
    monkeypatch.setattr(segment.ModelSpec, "load", lambda self: tiny_model)
    segment._SEGMENTERS.clear()
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"stand-in for the tiny model's weights")

    def run(*args) -> int:
        argv = [str(a) for a in args]
        return cli.main([*argv, "--weights", str(weights), "--device", "cpu", "-q", *FAST])

    yield run
    segment._SEGMENTERS.clear()


def _visible(outdir: Path) -> dict[str, bytes]:
    """The outputs in ``outdir`` (hidden work files left out), name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(outdir.iterdir()) if not p.name.startswith(".")}


def _record(outdir: Path, stem: str) -> dict:
    return json.loads((outdir / f"{stem}_labels.json").read_text())


def _assert_sets_complete(outdir: Path) -> None:
    """Every label image has its provenance record, and nothing of a run is left."""
    for labels in outdir.glob("*_labels.tif"):
        assert labels.with_suffix(".json").exists(), f"{labels.name} without its record"
    assert not (outdir / LOCK_NAME).exists() and not (outdir / WORK_DIR).exists()


# -- 1. clashes across runs -------------------------------------------------------------


def _plates(tmp_path: Path) -> tuple[Path, Path]:
    """plate1/well.png and plate2/well.png: different images, one name."""
    for i, plate in enumerate(("plate1", "plate2")):
        _image(tmp_path / plate / "well.png", seed=i)
    return tmp_path / "plate1", tmp_path / "plate2"


def test_a_clash_across_runs_is_refused_naming_both_inputs(tool, tmp_path, capsys):
    plate1, plate2 = _plates(tmp_path)
    out = tmp_path / "out"
    assert tool(plate1, "-o", out) == 0
    before = _visible(out)
    capsys.readouterr()
    assert tool(plate2, "-o", out) == 1
    captured = capsys.readouterr()
    assert "0 done, 0 skipped, 1 failed" in captured.out
    err = " ".join(captured.err.split())
    assert f"{plate2 / 'well.png'}: well_labels.tif in {out} was written for " in err
    assert str((plate1 / "well.png").resolve()) in err and "--on-clash suffix" in err
    assert _visible(out) == before  # plate1's outputs untouched
    _assert_sets_complete(out)


def test_on_clash_suffix_writes_beside_and_resumes(tool, tmp_path, capsys):
    plate1, plate2 = _plates(tmp_path)
    out = tmp_path / "out"
    assert tool(plate1, "-o", out) == 0
    first = _visible(out)
    assert tool(plate2, "-o", out, "--on-clash", "suffix") == 0
    assert _record(out, "well-2")["input"]["path"] == str((plate2 / "well.png").resolve())
    assert {k: v for k, v in _visible(out).items() if k.startswith("well_")} == first
    capsys.readouterr()
    # reruns find their own outputs: plate2's under the suffix, plate1's under the name
    assert tool(plate2, "-o", out, "--on-clash", "suffix") == 0
    assert "0 done, 1 skipped, 0 failed" in capsys.readouterr().out
    assert tool(plate1, "-o", out) == 0
    assert "0 done, 1 skipped, 0 failed" in capsys.readouterr().out
    _assert_sets_complete(out)


def test_on_clash_overwrite_replaces_and_says_so(tool, tmp_path, capsys):
    plate1, plate2 = _plates(tmp_path)
    out = tmp_path / "out"
    assert tool(plate1, "-o", out) == 0
    capsys.readouterr()
    assert tool(plate2, "-o", out, "--on-clash", "overwrite") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "--on-clash overwrite: replacing them" in err and str(plate1.resolve()) in err
    assert _record(out, "well")["input"]["path"] == str((plate2 / "well.png").resolve())
    assert sorted(_visible(out)) == ["well_labels.json", "well_labels.tif"]


def test_same_name_twice_in_one_run_with_suffix(tool, tmp_path, capsys):
    plate1, plate2 = _plates(tmp_path)
    out = tmp_path / "out"
    assert tool(plate1, plate2, "-o", out) == 1  # refused by default, naming both
    assert "same name 'well'" in capsys.readouterr().err
    shutil.rmtree(out)
    assert tool(plate1, plate2, "-o", out, "--on-clash", "suffix") == 0
    assert _record(out, "well-2")["input"]["path"] == str((plate2 / "well.png").resolve())


def test_a_moved_input_folder_still_resumes(tool, tmp_path, capsys):
    _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert tool(tmp_path / "in", "-o", out) == 0
    (tmp_path / "in").rename(tmp_path / "moved")
    capsys.readouterr()
    assert tool(tmp_path / "moved", "-o", out) == 0
    assert "0 done, 1 skipped, 0 failed" in capsys.readouterr().out


def test_files_this_tool_did_not_write_are_not_replaced(tool, tmp_path, capsys):
    _image(tmp_path / "in" / "well.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "well_labels.tif").write_bytes(b"somebody's own labels")
    assert tool(tmp_path / "in", "-o", out) == 1
    assert "without a provenance record of this tool" in capsys.readouterr().err
    assert (out / "well_labels.tif").read_bytes() == b"somebody's own labels"


def test_a_set_without_its_record_is_completed_by_the_rerun(tool, tmp_path, capsys):
    """A label image whose provenance record was never written (a run stopped between
    them) is this input's by its own metadata: the rerun redoes the set."""
    image = _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert tool(image, "-o", out, "--csv") == 0
    (out / "a_labels.json").unlink()
    (out / "a_objects.csv").unlink()
    capsys.readouterr()
    assert tool(image, "-o", out, "--csv") == 0
    assert "1 done, 0 skipped, 0 failed" in capsys.readouterr().out
    assert sorted(_visible(out)) == ["a_labels.json", "a_labels.tif", "a_objects.csv"]


# -- 7. API edges ---------------------------------------------------------------------


@pytest.mark.parametrize("multimask, c", [(True, 3), (False, 1)])
@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize(
    "prompts",
    [
        {"boxes": np.zeros((0, 4))},
        {"point_coords": np.zeros((0, 2, 2)), "point_labels": np.zeros((0, 2))},
        {"point_coords": np.zeros((0, 1, 2)), "point_labels": np.zeros((0, 1)),
         "boxes": np.zeros((0, 4))},
    ],
)  # fmt: skip
def test_predict_batch_with_zero_prompts_gives_empty_arrays(
    tiny_model, prompts, multimask, c, logits
):
    predictor = Predictor(tiny_model)
    predictor.set_image(np.zeros((40, 60, 3), np.uint8))
    masks, scores, low_res = predictor.predict_batch(
        **prompts, multimask_output=multimask, return_logits=logits
    )
    low = tiny_model.prompt_encoder.mask_input_size
    assert masks.shape == (0, c, 40, 60)
    assert masks.dtype == (np.float32 if logits else bool)
    assert scores.shape == (0, c) and scores.dtype == np.float32
    assert low_res.shape == (0, c, *low) and low_res.dtype == np.float32
    # the same shapes as one prompt gives, less its row
    one = predictor.predict_batch(boxes=np.array([[0, 0, 9, 9.0]]), multimask_output=multimask)
    assert [a.shape[1:] for a in one] == [masks.shape[1:], scores.shape[1:], low_res.shape[1:]]


@pytest.mark.parametrize("shape", [(1, 20000), (20000, 1), (3, 800)])
def test_extreme_aspect_ratio_is_refused_naming_shape_and_limit(tiny_model, shape):
    predictor = Predictor(tiny_model)  # 128-pixel input: at most 256:1
    with pytest.raises(ValueError, match=rf"shape \({shape[0]}, {shape[1]}\).*limit of 256:1"):
        predictor.set_image(np.zeros(shape, np.uint8))


def test_aspect_ratio_limit_is_2048_to_1_for_1024_pixels():
    assert preprocess_shape(1, 2048, 1024) == (1, 1024)  # 2048:1 still fits
    with pytest.raises(ValueError, match=r"\(1, 2049\).*limit of 2048:1"):
        preprocess_shape(1, 2049, 1024)
    with pytest.raises(ValueError, match=r"\(20000, 1\).*limit of 2048:1"):
        preprocess_shape(20000, 1, 1024)


# -- 6. checkpoints: no advice to load unsafely ----------------------------------------


def _hostile_checkpoints(folder: Path) -> dict[str, Path]:
    """Files that torch.load(weights_only=True) refuses, each a different way."""
    folder.mkdir(parents=True, exist_ok=True)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo never run",))

    files = {
        "bad_opcode": b"\x80\x02}q\x00\xff\xfe",  # a pickle header, then garbage
        "garbage_pickle": b"\x80\x02garbage" * 10,
        "truncated_zip": None,
    }
    paths = {}
    for name, data in files.items():
        if data is not None:
            paths[name] = folder / f"{name}.pt"
            paths[name].write_bytes(data)
    good = folder / "good.pt"
    torch.save({"w": torch.zeros(3)}, good)
    paths["truncated_zip"] = folder / "truncated_zip.pt"
    paths["truncated_zip"].write_bytes(good.read_bytes()[:200])
    for legacy in (False, True):
        path = folder / f"code_{'legacy' if legacy else 'zip'}.pt"
        torch.save({"w": torch.zeros(2), "e": Evil()}, path,
                   _use_new_zipfile_serialization=not legacy)  # fmt: skip
        paths[path.stem] = path
    return paths


def test_checkpoint_errors_never_advise_weights_only_false(tmp_path):
    from napari_mobilesam.build import CheckpointError, read_state_dict

    for name, path in _hostile_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError) as exc:
            read_state_dict(path)
        message = str(exc.value)
        assert str(path) in message, name
        assert "weights_only=False" not in message.replace("`", "").replace(" set to ", "=")
        assert "weights_only` set to `False" not in message and "Re-running" not in message
    with pytest.raises(
        CheckpointError,
        match=r"not a PyTorch checkpoint: unreadable pickle data "
        r"\(Unsupported operand 255\)",
    ):
        read_state_dict(tmp_path / "bad_opcode.pt")


def test_an_unreadable_embedding_cache_file_warns_without_that_advice(tmp_path):
    from napari_mobilesam.interactive.cache import EmbeddingCache

    cache = EmbeddingCache(folder=tmp_path / "emb")
    key = ("layer", "pixels", 0)
    cache.file_for(key).write_bytes(b"\x80\x02garbage" * 10)  # a hostile file in its place
    with pytest.warns(RuntimeWarning, match="unreadable embedding cache file") as record:
        assert cache.get(key) is None
    message = str(record[0].message)
    assert "unreadable pickle data (Unsupported operand" in message
    assert "weights_only" not in message


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


# -- 3. a full disk, a permission error ----------------------------------------------------


def _fail_on_call(n: int, err: int, real):
    """A stand-in for ``real`` that raises OSError(err) on its ``n``-th call."""
    calls = []

    def stand_in(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    return stand_in


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
@pytest.mark.parametrize("where", ["saving a plane", "writing the outputs"])
def test_a_write_error_stops_the_run_once_with_a_summary(
    tool, tmp_path, capsys, monkeypatch, err, where
):
    from mobilesam_batch import finish, planes

    inputs = [_image(tmp_path / "in" / f"{c}.png", seed=i) for i, c in enumerate("abcd")]
    out = tmp_path / "out"
    # the second input's plane, or its CSV (written after its label image)
    target, name = (planes.np, "savez_compressed") if "plane" in where else (
        finish, "write_objects_csv")  # fmt: skip
    real = getattr(target, name)
    monkeypatch.setattr(target, name, _fail_on_call(2, err, real))
    assert tool(*inputs, "-o", out, "--csv") == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.count(os.strerror(err)) == 1  # caught once, named once
    assert f"mobilesam-everything: error: cannot write in {out}: {os.strerror(err)}" in captured.err
    assert "stopped early (see the error above): run the same command again" in captured.out
    assert "1 done, 0 skipped, 0 failed" in captured.out
    _assert_complete_sets_only(out)
    monkeypatch.setattr(target, name, real)  # space freed, permission fixed
    assert tool(*inputs, "-o", out, "--csv") == 0
    assert "3 done, 1 skipped, 0 failed" in capsys.readouterr().out
    assert sorted(_visible(out)) == sorted(
        f"{c}_{kind}" for c in "abcd" for kind in ("labels.tif", "labels.json", "objects.csv")
    )
    _assert_sets_complete(out)


def _assert_complete_sets_only(out: Path) -> None:
    """Whatever is visible is a whole set: label image, CSV and provenance together."""
    stems = {p.name.split("_")[0] for p in out.iterdir() if not p.name.startswith(".")}
    for stem in stems:
        names = {p.name for p in out.glob(f"{stem}_*")}
        assert names == {f"{stem}_labels.tif", f"{stem}_labels.json", f"{stem}_objects.csv"}


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only; CI runs as root)."""
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_tmpfs_stops_with_a_summary_and_the_rerun_completes(
    tool, small_tmpfs, tmp_path, capsys
):
    inputs = [_image(tmp_path / "in" / f"img{i}.png", seed=i, shape=(96, 96)) for i in range(8)]
    out = small_tmpfs / "out"
    filler = small_tmpfs / "filler"
    free = os.statvfs(small_tmpfs)
    with open(filler, "wb") as f:  # leave 20 pages: room for a few sets, not for 8
        f.write(b"\0" * ((free.f_bavail - 20) * free.f_frsize))
    assert tool(*inputs, "-o", out, "--csv", "--coco") == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.count("No space left on device") == 1
    assert "stopped early" in captured.out and " 0 failed" in captured.out
    done = int(captured.out.split(" done")[0].split()[-1])
    assert done < len(inputs)
    for labels in out.glob("*_labels.tif"):  # no label image without its record
        assert labels.with_suffix(".json").exists()
    filler.unlink()
    assert tool(*inputs, "-o", out, "--csv", "--coco") == 0
    assert f"{len(inputs) - done} done, {done} skipped, 0 failed" in capsys.readouterr().out
    assert len(list(out.glob("*_labels.json"))) == len(inputs)
    _assert_sets_complete(out)


# -- 4. an unusable output folder ----------------------------------------------------------


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder that cannot be written: a read-only tmpfs as root (root ignores modes),
    else a folder with mode 0o555."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if IS_ROOT:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.strip()}")
        yield ro
        subprocess.run(["umount", "-l", str(ro)], check=True)
    else:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)


def _unusable(case: str, tmp_path: Path, read_only: Path | None) -> tuple[Path, str]:
    """An output folder that cannot be used, and what the message says."""
    if case == "a file":
        out = tmp_path / "out"
        out.write_text("a file")
        return out, f"-o {out}: is a file, not a folder"
    if case == "below a file":
        (tmp_path / "f").write_text("a file")
        out = tmp_path / "f" / "out"
        return out, f"-o {out}: cannot create the folder: Not a directory"
    if case == "read-only, new":
        out = read_only / "out"
        return out, f"-o {out}: cannot create the folder"
    return read_only, f"-o {read_only}: cannot write in this folder"  # read-only, existing


@pytest.mark.parametrize(
    "case", ["a file", "below a file", "read-only, new", "read-only, existing"]
)
def test_an_unusable_output_folder_fails_before_the_model_loads(
    tiny_model, tmp_path, capsys, monkeypatch, request, case
):
    loads = []
    monkeypatch.setattr(segment.ModelSpec, "load", lambda self: loads.append(1) or tiny_model)
    segment._SEGMENTERS.clear()
    read_only = request.getfixturevalue("read_only_folder") if "read-only" in case else None
    out, message = _unusable(case, tmp_path, read_only)
    image = _image(tmp_path / "in" / "a.png")
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    argv = [str(image), "-o", str(out), "--weights", str(weights), "--device", "cpu", "-q"]
    try:
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert loads == [], "the model was loaded before the output folder was checked"
        assert message in err and "Traceback" not in err
        assert cli.main([*argv, "--dry-run"]) == 1  # the dry run checks too, writing nothing
        assert f"-o {out}" in capsys.readouterr().err
    finally:
        segment._SEGMENTERS.clear()


# -- 5. no silent waits or drops -------------------------------------------------------------


def test_a_scheduler_without_workers_is_reported_not_waited_on(tool, tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    image = _image(tmp_path / "a.png")
    out = tmp_path / "out"
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None) as empty:
        code = tool(image, "-o", out, "--scheduler", empty.scheduler_address,
                    "--worker-timeout", "0.5")  # fmt: skip
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert code == 1 and "Traceback" not in err
    assert f"waiting for a dask worker to join the scheduler at {empty.scheduler_address}" in err
    assert "no dask worker joined the scheduler" in err and "--worker-timeout" in err
    assert "0 done, 0 skipped, 0 failed; stopped early" in captured.out
    _assert_sets_complete(out)


_LEAVING: dict = {}


def _plane_then_leave(*args, **kwargs):
    """The task on the (in-process) worker: segments, and after plane 0 the worker goes."""
    result = _LEAVING["real"](*args, **kwargs)
    if tuple(args[2]) == (0,):
        threading.Thread(target=_LEAVING["cluster"].scale, args=(0,)).start()
    return result


def test_workers_that_all_leave_are_reported(tool, tmp_path, capsys, monkeypatch):
    """The only worker leaves after the first plane: the run says what it waits for and
    stops after --worker-timeout."""
    distributed = pytest.importorskip("distributed")
    from mobilesam_batch import executors

    stack = _stack(tmp_path / "stack.tif", planes=3)
    out = tmp_path / "out"
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as lc:
        monkeypatch.setitem(_LEAVING, "real", executors.segment_plane)
        monkeypatch.setitem(_LEAVING, "cluster", lc)
        monkeypatch.setattr(executors, "segment_plane", _plane_then_leave)
        code = tool(stack, "-o", out, "--scheduler", lc.scheduler_address, "--worker-timeout", "1")
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert code == 1 and "Traceback" not in err
    assert "waiting for a dask worker: the scheduler at" in err and "has none left" in err
    assert "has had no worker for 1 s while planes were waiting" in err
    assert "stopped early" in captured.out


def test_an_input_inside_the_output_folder_is_reported(tool, tmp_path, capsys):
    out = tmp_path / "out"
    inside = _image(out / "old" / "x.png")
    for named in (inside, out / "old", str(out / "old" / "*.png")):
        assert tool(named, "-o", out) == 1
        captured = capsys.readouterr()
        assert "0 done, 0 skipped, 1 failed" in captured.out
        assert f"{inside}: is inside the output folder {out}" in " ".join(captured.err.split())
    # found by scanning a folder that holds the output folder: left out, and counted
    _image(tmp_path / "a.png")
    assert tool(tmp_path, "-r", "-o", out) == 0
    captured = capsys.readouterr().out
    assert "1 done, 0 skipped, 0 failed, 1 file(s) inside the output folder ignored" in captured


def test_dangling_symlinks_are_reported(tool, tmp_path, capsys):
    folder = tmp_path / "in"
    _image(folder / "good.png")
    (folder / "dead.png").symlink_to(folder / "gone.png")
    (folder / "dead.zarr").symlink_to(tmp_path / "no-store")
    (folder / ".hidden.png").symlink_to(folder / "gone.png")  # hidden: skipped, as files are
    (folder / "notes.txt").symlink_to(folder / "gone.txt")  # not an image name: skipped
    out = tmp_path / "out"
    for named in (folder, str(folder / "*"), folder / "dead.png"):
        code = tool(named, "-o", out)
        captured = capsys.readouterr()
        err = " ".join(captured.err.split())
        assert code == 1
        assert (
            f"{folder / 'dead.png'}: dangling symbolic link: its target {folder / 'gone.png'}"
            in err
        )
        if named != folder / "dead.png":
            assert f"{folder / 'dead.zarr'}: dangling symbolic link" in err
            assert "hidden" not in err and "notes.txt" not in err
            assert "2 failed" in captured.out


# -- 8. provenance over resumed runs, Ctrl-C, work folders -----------------------------------


def _interrupt_at(monkeypatch, n: int) -> None:
    """Ctrl-C when the ``n``-th plane is about to be segmented."""
    real = segment.PlaneSegmenter.segment
    calls = []

    def segment_(self, plane, index=()):
        calls.append(index)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(self, plane, index)

    monkeypatch.setattr(segment.PlaneSegmenter, "segment", segment_)


def test_ran_on_covers_every_run_that_computed_planes(tool, tmp_path, capsys, monkeypatch):
    stack = _stack(tmp_path / "stack.tif", planes=3)
    out = tmp_path / "out"
    real = segment.PlaneSegmenter.segment
    monkeypatch.setattr(segment, "_HOST", "node-a")
    _interrupt_at(monkeypatch, 3)
    assert tool(stack, "-o", out) == 130
    monkeypatch.setattr(segment.PlaneSegmenter, "segment", real)
    monkeypatch.setattr(segment, "_HOST", "node-b")
    assert tool(stack, "-o", out) == 0
    ran_on = _record(out, "stack")["model"]["ran_on"]
    assert sorted(r["host"] for r in ran_on) == ["node-a", "node-b"]
    for r in ran_on:  # what ran, "auto" resolved
        assert (r["mode"], r["nms"], r["precision"]) == ("fast", "mask", "fp32")


def test_ran_on_when_every_plane_came_from_an_earlier_run(tool, tmp_path, capsys, monkeypatch):
    from mobilesam_batch import finish

    stack = _stack(tmp_path / "stack.tif", planes=2)
    out = tmp_path / "out"
    monkeypatch.setattr(segment, "_HOST", "node-a")
    real = finish._write_outputs

    def interrupted(*args):
        raise KeyboardInterrupt  # all planes saved, outputs not yet written

    monkeypatch.setattr(finish, "_write_outputs", interrupted)
    assert tool(stack, "-o", out) == 130
    monkeypatch.setattr(finish, "_write_outputs", real)
    monkeypatch.setattr(segment, "_HOST", "node-b")
    capsys.readouterr()
    assert tool(stack, "-o", out) == 0
    assert "(0 planes in" in capsys.readouterr().out
    assert [r["host"] for r in _record(out, "stack")["model"]["ran_on"]] == ["node-a"]


def test_saved_planes_computed_otherwise_are_computed_again(tool, tmp_path, capsys, monkeypatch):
    """--precision auto resolves where the planes run: a resumed run does not mix the
    planes another machine computed in another precision into one output."""
    stack = _stack(tmp_path / "stack.tif", planes=3)
    out = tmp_path / "out"
    real = segment.PlaneSegmenter.segment
    _interrupt_at(monkeypatch, 2)
    assert tool(stack, "-o", out, "--precision", "auto") == 130
    (saved,) = (out / WORK_DIR).rglob("*.npz")
    here = resolve_precision("auto", "cpu")
    elsewhere = "bf16" if here == "fp32" else "fp32"
    with np.load(saved) as z:
        arrays = {k: z[k] for k in z.files}
    where = json.loads(str(arrays["where"]))
    assert where["precision"] == here
    arrays["where"] = np.array(json.dumps({**where, "precision": elsewhere, "host": "other"}))
    with open(saved, "wb") as f:
        np.savez_compressed(f, **arrays)
    monkeypatch.setattr(segment.PlaneSegmenter, "segment", real)
    capsys.readouterr()
    assert tool(stack, "-o", out, "--precision", "auto") == 0
    assert "(3 planes in" in capsys.readouterr().out  # the saved plane was computed again
    ran_on = _record(out, "stack")["model"]["ran_on"]
    assert {r["precision"] for r in ran_on} == {here} and "other" not in str(ran_on)


@pytest.mark.parametrize(
    "moment",
    ["reading the flags", "holding the folder", "fetching weights", "loading the model", "planning",
     "segmenting", "saving a plane", "writing outputs"],
)  # fmt: skip
def test_ctrl_c_at_any_moment_is_clean(tool, tmp_path, capsys, monkeypatch, moment):
    from mobilesam_batch import finish, flags, jobs, planes

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    target, name = {
        "reading the flags": (flags, "generator_defaults"),
        "holding the folder": (folder_mod, "_clear_temporaries"),
        "fetching weights": (cli, "_sha"),
        "loading the model": (segment.ModelSpec, "load"),
        "planning": (jobs, "open_source"),
        "segmenting": (segment.PlaneSegmenter, "segment"),
        "saving a plane": (planes.np, "savez_compressed"),
        "writing outputs": (finish, "write_labels_tiff"),
    }[moment]
    monkeypatch.setattr(target, name, ctrl_c)
    image = _image(tmp_path / "a.png")
    out = tmp_path / "out"
    assert tool(image, "-o", out) == 130
    captured = capsys.readouterr()
    assert "interrupted" in captured.out + captured.err and "Traceback" not in captured.err
    assert not (out / LOCK_NAME).exists() and not list(out.glob(f"{WORK_DIR}/tmp-*"))


def test_no_work_folder_is_left_for_a_failed_input(tool, tmp_path, capsys, monkeypatch):
    good, bad = _image(tmp_path / "good.png"), _image(tmp_path / "bad.png", seed=1)
    real = segment.PlaneSegmenter.segment
    bad_pixels = np.asarray(Image.open(bad))

    def fails_on_bad(self, plane, index=()):
        if plane.shape == bad_pixels.shape and np.array_equal(plane, bad_pixels):
            raise ValueError("this plane cannot be segmented")
        return real(self, plane, index)

    monkeypatch.setattr(segment.PlaneSegmenter, "segment", fails_on_bad)
    out = tmp_path / "out"
    assert tool(bad, good, "-o", out) == 1
    assert "1 done, 0 skipped, 1 failed" in capsys.readouterr().out
    assert sorted(_visible(out)) == ["good_labels.json", "good_labels.tif"]
    _assert_sets_complete(out)  # no .mobilesam-work/bad-<key>/ left behind


# Real processes for real signals: this sitecustomize makes every Python process started
# with it on PYTHONPATH (the command and its LocalCluster workers) load the tiny model.
_SITECUSTOMIZE = """
import importlib.abc, importlib.util, sys

ROOT = {root!r}


class _TinyModel(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "mobilesam_batch.segment":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            sys.path.insert(0, ROOT)
            from tests.conftest import TINY_CONFIG, _randomize  # imported with the module,
            from napari_mobilesam.build import build_sam  # as the real load's imports are

            def load(spec_):
                return _randomize(build_sam(TINY_CONFIG), seed=0).eval()

            module.ModelSpec.load = load

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _TinyModel())
"""


@pytest.fixture
def tiny_env(tmp_path):
    """Environment under which ``python -m mobilesam_batch.cli`` runs the tiny model."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(root=str(ROOT)))
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"stand-in")
    return {**os.environ, "PYTHONPATH": path}, weights


def _ctrl_c_after(argv: list[str], env: dict, out: Path, delays: list[float]) -> tuple:
    """Run the command in a session of its own and press Ctrl-C (SIGINT to the whole
    process group, as a terminal does) after each of ``delays``, counted from the moment
    the command holds ``out`` (its first act: the interpreter's own start-up, before any
    of this package runs, is no business of it); returns (status, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mobilesam_batch.cli", *argv], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    while proc.poll() is None and not (out / LOCK_NAME).exists():
        time.sleep(0.01)
    for delay in delays:
        time.sleep(delay)
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            break
    stdout, stderr = proc.communicate()
    return proc.returncode, stdout, stderr


@pytest.mark.slow
def test_ctrl_c_with_a_local_cluster_prints_no_traceback(tiny_env, tmp_path):
    """Ctrl-C at moments from the first instant to the cluster's shutdown (a second
    Ctrl-C during it): never a traceback, from the command or its workers."""
    pytest.importorskip("distributed")
    env, weights = tiny_env
    inp = tmp_path / "in"
    for i in range(6):
        _image(inp / f"img{i}.png", seed=i)
    # the first instant, the cluster starting, its workers running, and a second Ctrl-C
    # while it shuts down (early and late)
    for i, delays in enumerate([[0.0], [1.0], [4.0], [2.0, 0.3], [4.0, 0.5]]):
        out = tmp_path / f"out{i}"
        argv = [str(inp), "-o", str(out), "--weights", str(weights), "--device", "cpu", "-q",
                "--scheduler", "local", "--workers", "2", *FAST]  # fmt: skip
        code, stdout, err = _ctrl_c_after(argv, env, out, delays)
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, (delays, err)
        # a Ctrl-C while the interpreter itself winds down (the run over, its signal
        # handlers already reset) ends the process by the signal, silently: a shell shows
        # status 130 for it as for an exit with 130
        assert code in (0, 130, -signal.SIGINT), (delays, code, err)
        if code == 130:
            assert "interrupted" in stdout + err or "stopping now" in err
        for labels in out.glob("*_labels.tif") if out.exists() else []:
            assert labels.with_suffix(".json").exists()


def test_the_local_cluster_claim_in_the_docs_matches_the_test():
    """docs/batch.md says what test_local_cluster_equals_local_run shows: identical
    labels, scores within float rounding (not "identical outputs")."""
    text = " ".join((ROOT / "docs" / "batch.md").read_text().split())
    assert "Outputs are identical" not in text
    assert "label images are identical" in text and "1e-6" in text
