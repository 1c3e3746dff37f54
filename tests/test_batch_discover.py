"""Tests for mobilesam_batch.inputs: finding the inputs (files, folders, globs, zarr stores)
and the InputError they raise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from mobilesam_batch.inputs import (
    SUPPORTED_SUFFIXES,
    InputError,
    discover_inputs,
)

from .inputs_support import touch_png, write_ome_zarr, write_zarr_array

# ----------------------------------------------------------------------------- errors


def test_input_error_str_and_attributes(tmp_path):
    err = InputError(tmp_path / "a.tif", "broken")
    assert err.path == tmp_path / "a.tif"
    assert err.reason == "broken"
    assert str(err) == f"{tmp_path / 'a.tif'}: broken"


def test_supported_suffixes():
    assert set(SUPPORTED_SUFFIXES) == {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".zarr"}


# ----------------------------------------------------------------------------- discovery


def test_discover_files_keep_spec_order_and_dedupe(tmp_path):
    b = touch_png(tmp_path / "b.png")
    a = touch_png(tmp_path / "a.PNG")
    (tmp_path / "sub").mkdir()
    paths, errors = discover_inputs([b, str(a), tmp_path / "sub" / ".." / "b.png", tmp_path])
    assert paths == [b, a]
    assert errors == []


def test_discover_unsupported_and_missing(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    paths, errors = discover_inputs([tmp_path / "notes.txt", tmp_path / "nope.png"])
    assert paths == []
    assert [e.path for e in errors] == [tmp_path / "notes.txt", tmp_path / "nope.png"]
    assert "unsupported file type '.txt' (supported: .png, .jpg" in errors[0].reason
    assert errors[1].reason == "no such file or directory"


def test_discover_folder_sorted_skips_unsupported_hidden_and_subfolders(tmp_path):
    for name in ["c.tif", "a.npy", "B.jpg", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "readme.md").write_text("x")
    (tmp_path / "sub").mkdir()
    touch_png(tmp_path / "sub" / "d.png")
    paths, errors = discover_inputs([tmp_path])
    assert [p.name for p in paths] == ["B.jpg", "a.npy", "c.tif"]
    assert errors == []


def test_discover_recursive_never_enters_zarr_or_hidden(tmp_path):
    touch_png(tmp_path / "a.png")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    touch_png(tmp_path / "sub" / "deeper" / "x.png")
    touch_png(tmp_path / "sub" / "b.png")
    (tmp_path / ".git").mkdir()
    touch_png(tmp_path / ".git" / "h.png")
    write_zarr_array(tmp_path / "sub" / "s.zarr", np.zeros((4, 4), np.uint8))
    group = zarr.open_group(str(tmp_path / "g"), mode="w")  # zarr store without .zarr name
    group.create_array("0", shape=(4, 4), dtype="uint8")
    paths, errors = discover_inputs([tmp_path], recursive=True)
    rel = [p.relative_to(tmp_path).as_posix() for p in paths]
    assert rel == ["a.png", "g", "sub/b.png", "sub/deeper/x.png", "sub/s.zarr"]
    assert errors == []


def test_discover_zarr_dir_counted_once(tmp_path):
    store = write_zarr_array(tmp_path / "s.zarr", np.zeros((4, 4), np.uint8))
    paths, errors = discover_inputs([store, tmp_path, str(tmp_path / "*")])
    assert paths == [store]
    assert errors == []


def test_discover_zarr_dir_by_marker_file(tmp_path):
    store = write_zarr_array(tmp_path / "plain", np.zeros((4, 4), np.uint8))
    assert discover_inputs([store]) == ([store], [])


def test_discover_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    paths, errors = discover_inputs([tmp_path / "empty"])
    assert paths == []
    assert errors[0].path == tmp_path / "empty"
    assert errors[0].reason == "no supported images in folder"


def test_discover_glob(tmp_path):
    for name in ["b.tif", "a.tif", "c.png", "d.txt"]:
        (tmp_path / name).write_bytes(b"x")
    paths, errors = discover_inputs([str(tmp_path / "*.tif"), str(tmp_path / "?.*")])
    assert [p.name for p in paths] == ["a.tif", "b.tif", "c.png"]
    assert errors == []


def test_discover_recursive_glob_skips_zarr_internals(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    touch_png(tmp_path / "x" / "y" / "deep.png")
    touch_png(tmp_path / "top.png")
    write_ome_zarr(tmp_path / "x" / "img.zarr", np.zeros((1, 1, 4, 4), np.uint8), list("czyx"))
    paths, errors = discover_inputs([str(tmp_path / "**" / "*")])
    rel = [p.relative_to(tmp_path).as_posix() for p in paths]
    assert rel == ["top.png", "x/img.zarr", "x/y/deep.png"]
    assert errors == []


def test_discover_glob_into_named_zarr_group(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    for name in "ab":
        group.create_array(name, shape=(4, 4), dtype="uint8")
    paths, _ = discover_inputs([str(tmp_path / "g.zarr" / "*")])
    assert [p.name for p in paths] == ["a", "b"]


def test_discover_glob_without_match(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    paths, errors = discover_inputs([str(tmp_path / "*.tif"), str(tmp_path / "*.txt")])
    assert paths == []
    assert errors[0].reason == "no file matches this pattern"
    assert errors[0].path == tmp_path / "*.tif"
    assert errors[1].reason == "no supported images match this pattern"


def test_discover_unreadable_folder(tmp_path, monkeypatch):
    def boom(self):
        raise PermissionError("denied")

    (tmp_path / "f").mkdir()
    monkeypatch.setattr(Path, "iterdir", boom)
    _, errors = discover_inputs([tmp_path / "f"])
    assert errors[0].reason == "cannot list folder: denied"
