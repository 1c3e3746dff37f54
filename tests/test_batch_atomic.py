"""Output files of mobilesam-everything: atomic writes of files, folders, text and JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mobilesam_batch.outputs import (
    atomic_path,
    write_json_atomic,
    write_text_atomic,
)
from napari_mobilesam import atomic

from .outputs_support import leftovers

# --------------------------------------------------------------------------- atomic_path


def test_atomic_path_writes_and_renames(tmp_path):
    dest = tmp_path / "out.txt"
    with atomic_path(dest) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".out.txt.") and tmp.name.endswith(".tmp")
        assert tmp.is_file() and not dest.exists()
        tmp.write_text("hello")
    assert dest.read_text() == "hello"
    assert leftovers(tmp_path) == []


def test_atomic_path_file_mode_follows_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_atomic_path_exception_keeps_old_destination(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(dest) as tmp:
        tmp.write_text("new")
        raise RuntimeError("boom")
    assert dest.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_path_uses_tmp_dir(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    dest = tmp_path / "out.txt"
    with atomic_path(dest, scratch) as tmp:
        assert tmp.parent == scratch
        tmp.write_text("x")
    assert dest.read_text() == "x"
    assert list(scratch.iterdir()) == []


def test_atomic_path_missing_tmp_dir(tmp_path):
    with (
        pytest.raises(FileNotFoundError, match="tmp_dir"),
        atomic_path(tmp_path / "a", tmp_path / "nope"),
    ):
        pass
    with (
        pytest.raises(FileNotFoundError, match="destination's folder"),
        atomic_path(tmp_path / "nope" / "a"),
    ):
        pass


def test_atomic_path_file_onto_directory_fails_cleanly(tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(IsADirectoryError), atomic_path(dest) as tmp:
        tmp.write_text("x")
    assert dest.is_dir() and leftovers(tmp_path) == []


def test_atomic_path_directory_replaces_existing(tmp_path):
    dest = tmp_path / "out.zarr"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with atomic_path(dest, is_dir=True) as tmp:
        assert tmp.is_dir() and list(tmp.iterdir()) == []
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_path_directory_exception_keeps_old(tmp_path):
    dest = tmp_path / "out.zarr"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(ValueError, match="bad"), atomic_path(dest, is_dir=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
        raise ValueError("bad")
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_path_directory_rename_failure_restores_old(tmp_path, monkeypatch):
    dest = tmp_path / "out.zarr"
    dest.mkdir()
    (dest / "old.txt").write_text("old")

    def fail(src, dst):
        raise OSError("replace failed")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="replace failed"), atomic_path(dest, is_dir=True) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_path_warns_when_old_directory_cannot_be_deleted(tmp_path, monkeypatch):
    dest = tmp_path / "out.zarr"
    dest.mkdir()
    (dest / "old.txt").write_text("old")

    def fail(path, *args, **kwargs):
        raise OSError("busy")

    monkeypatch.setattr(atomic.shutil, "rmtree", fail)
    with (
        pytest.warns(RuntimeWarning, match="could not delete its old version"),
        atomic_path(dest, is_dir=True) as tmp,
    ):
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    (old,) = leftovers(tmp_path)
    assert old.startswith(".out.zarr.") and old.endswith(".old")


# --------------------------------------------------------------------------- text / JSON


def test_write_text_atomic(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "line 1\nline 2\n")
    assert (tmp_path / "a.txt").read_bytes() == b"line 1\nline 2\n"


def test_write_json_atomic_numpy_values(tmp_path):
    dest = tmp_path / "a.json"
    obj = {
        "i": np.int64(3),
        "f": np.float32(0.5),
        "b": np.bool_(True),
        "a": np.arange(3, dtype=np.uint16),
        "p": Path("x") / "y.tif",
        "nested": [{"u": np.uint32(7)}],
    }
    write_json_atomic(dest, obj)
    text = dest.read_text()
    assert text.endswith("}\n") and text.startswith('{\n  "i": 3')
    assert json.loads(text) == {
        "i": 3,
        "f": 0.5,
        "b": True,
        "a": [0, 1, 2],
        "p": str(Path("x") / "y.tif"),
        "nested": [{"u": 7}],
    }


def test_write_json_atomic_rejects_unserialisable(tmp_path):
    dest = tmp_path / "a.json"
    dest.write_text("{}\n")
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic(dest, {"x": object()})
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json_atomic(dest, {"x": float("nan")})
    assert dest.read_text() == "{}\n" and leftovers(tmp_path) == []
