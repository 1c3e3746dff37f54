"""Hostile inputs 8. Provenance over resumed runs, Ctrl-C at any moment, no empty work folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobilesam_batch import cli, segment
from mobilesam_batch import folder as folder_mod
from mobilesam_batch.folder import LOCK_NAME, WORK_DIR
from napari_mobilesam.predictor import resolve_precision

from ..conftest import ROOT
from .common import FAST, _assert_sets_complete, _image, _record, _stack, _visible

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
