"""Output files of mobilesam-everything: atomic writes, TIFF/OME-Zarr stacks, tables, COCO."""

from __future__ import annotations

import csv
import json
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from skimage import draw, measure

from mobilesam_batch.outputs import (
    OBJECT_COLUMNS,
    atomic_path,
    coco_annotations,
    imagej_axes,
    labels_dtype,
    ngff_attrs,
    object_table,
    write_coco_json,
    write_json_atomic,
    write_labels_tiff,
    write_labels_zarr,
    write_objects_csv,
    write_text_atomic,
)
from napari_mobilesam import atomic
from napari_mobilesam.everything.rle import coco_to_rle, rle_to_mask


def leftovers(folder: Path) -> list[str]:
    """Hidden temporaries (or moved-aside old versions) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def random_stack(shape: tuple[int, ...], high: int, dtype, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=shape).astype(dtype)


def planes_of(stack: np.ndarray):
    """A one-shot generator over the (H, W) planes of ``stack``."""
    return (p for p in stack.reshape(-1, *stack.shape[-2:]))


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


# --------------------------------------------------------------------------- labels_dtype


@pytest.mark.parametrize(
    ("max_id", "dtype"),
    [(0, np.uint16), (65535, np.uint16), (65536, np.uint32), (2**32 - 1, np.uint32)],
)
def test_labels_dtype(max_id, dtype):
    assert labels_dtype(max_id) == np.dtype(dtype)
    assert labels_dtype(np.int64(max_id)) == np.dtype(dtype)


@pytest.mark.parametrize("max_id", [-1, 2**32])
def test_labels_dtype_out_of_range(max_id):
    with pytest.raises(ValueError, match="max_id"):
        labels_dtype(max_id)


@pytest.mark.parametrize("max_id", [1.5, True, "3"])
def test_labels_dtype_not_an_int(max_id):
    with pytest.raises(TypeError, match="max_id"):
        labels_dtype(max_id)


# --------------------------------------------------------------------------- TIFF


@pytest.mark.parametrize(
    ("axes", "expected"),
    [
        ("YX", "YX"),
        ("ZYX", "ZYX"),
        ("TYX", "TYX"),
        ("CYX", "CYX"),
        ("QYX", "TYX"),
        ("IYX", "TYX"),
        ("TZYX", "TZYX"),
        ("ZCYX", "ZCYX"),
        ("CZYX", "TZYX"),
        ("ZQYX", "ZCYX"),
        ("QIYX", "TZYX"),
        ("TZCYX", "TZCYX"),
        ("ZTYX", None),
        ("QTZCYX", None),
    ],
)
def test_imagej_axes(axes, expected):
    assert imagej_axes(axes) == expected


def assert_deflate(path: Path) -> None:
    with tifffile.TiffFile(path) as tif:
        assert all(p.compression == tifffile.COMPRESSION.ADOBE_DEFLATE for p in tif.pages)


def test_tiff_2d_uint16(tmp_path):
    dest = tmp_path / "a_labels.tif"
    data = random_stack((33, 47), 1000, np.uint32)
    write_labels_tiff(dest, [data], data.shape, "YX", np.uint16)
    out = tifffile.imread(dest)
    assert out.shape == (33, 47) and out.dtype == np.uint16
    np.testing.assert_array_equal(out, data)
    with tifffile.TiffFile(dest) as tif:
        assert tif.is_imagej
    assert_deflate(dest)
    assert leftovers(tmp_path) == []


def test_tiff_zyx_uint16_is_imagej_hyperstack(tmp_path):
    dest = tmp_path / "a_labels.tif"
    data = random_stack((3, 20, 30), 65536, np.uint16)
    write_labels_tiff(
        dest, planes_of(data), data.shape, "ZYX", "uint16", description={"model": "vit_t"}
    )
    out = tifffile.imread(dest)
    assert out.shape == data.shape and out.dtype == np.uint16
    np.testing.assert_array_equal(out, data)
    with tifffile.TiffFile(dest) as tif:
        assert tif.is_imagej
        assert tif.series[0].axes == "ZYX"
        assert tif.imagej_metadata["slices"] == 3
        assert json.loads(tif.imagej_metadata["Info"]) == {
            "axes": "ZYX",
            "mobilesam": {"model": "vit_t"},
        }
    assert_deflate(dest)


def test_tiff_uint32_stack_is_plain_shaped_tiff(tmp_path):
    dest = tmp_path / "a_labels.tif"
    data = random_stack((4, 16, 24), 2**32, np.uint32)
    data[0, 0, 0] = 2**32 - 1
    write_labels_tiff(dest, planes_of(data), data.shape, "ZYX", np.uint32, description={"n": 4})
    out = tifffile.imread(dest)
    assert out.shape == data.shape and out.dtype == np.uint32
    np.testing.assert_array_equal(out, data)
    assert out.max() > 65535
    with tifffile.TiffFile(dest) as tif:
        assert not tif.is_imagej
        assert tif.series[0].axes == "ZYX"
        meta = tif.shaped_metadata[0]
        assert meta["axes"] == "ZYX" and meta["mobilesam"] == {"n": 4}
    assert_deflate(dest)


def test_tiff_tzyx_uint16(tmp_path):
    dest = tmp_path / "a_labels.tif"
    data = random_stack((2, 3, 10, 12), 300, np.uint16)
    write_labels_tiff(dest, planes_of(data), data.shape, "TZYX", np.uint16)
    np.testing.assert_array_equal(tifffile.imread(dest), data)
    with tifffile.TiffFile(dest) as tif:
        assert tif.is_imagej and tif.series[0].axes == "TZYX"
        assert (tif.imagej_metadata["frames"], tif.imagej_metadata["slices"]) == (2, 3)


@pytest.mark.parametrize("axes", ["QYX", "IYX"])
def test_tiff_other_plane_axis_becomes_imagej_frames(tmp_path, axes):
    dest = tmp_path / "a_labels.tif"
    data = random_stack((5, 8, 9), 50, np.uint16)
    write_labels_tiff(dest, planes_of(data), data.shape, axes, np.uint16)
    out = tifffile.imread(dest)
    assert out.shape == (5, 8, 9) and out.dtype == np.uint16
    np.testing.assert_array_equal(out, data)
    with tifffile.TiffFile(dest) as tif:
        assert tif.is_imagej and tif.series[0].axes == "TYX"
        assert json.loads(tif.imagej_metadata["Info"])["axes"] == axes


def test_tiff_unmappable_axes_plain_uint16(tmp_path):
    dest = tmp_path / "a_labels.tif"
    data = random_stack((2, 3, 8, 9), 50, np.uint16)
    write_labels_tiff(dest, planes_of(data), data.shape, "ZTYX", np.uint16)
    np.testing.assert_array_equal(tifffile.imread(dest), data)
    with tifffile.TiffFile(dest) as tif:
        assert not tif.is_imagej and tif.series[0].axes == "ZTYX"


def test_tiff_overwrites_existing(tmp_path):
    dest = tmp_path / "a_labels.tif"
    write_labels_tiff(dest, [np.ones((4, 4), np.uint16)], (4, 4), "YX", np.uint16)
    write_labels_tiff(dest, [np.full((5, 6), 2, np.uint8)], (5, 6), "YX", np.uint16)
    np.testing.assert_array_equal(tifffile.imread(dest), np.full((5, 6), 2))


@pytest.mark.parametrize(
    ("n_planes", "plane_shape", "match"),
    [
        (2, (10, 12), "gave 2 planes, expected 3"),
        (4, (10, 12), "more than the 3 planes"),
        (3, (12, 10), r"plane 0 has shape \(12, 10\), expected \(10, 12\)"),
    ],
)
@pytest.mark.parametrize("writer", ["tiff", "zarr"])
def test_wrong_planes_write_nothing(tmp_path, writer, n_planes, plane_shape, match):
    dest = tmp_path / ("a_labels.tif" if writer == "tiff" else "a_labels.zarr")
    write = write_labels_tiff if writer == "tiff" else write_labels_zarr
    planes = (np.ones(plane_shape, np.uint16) for _ in range(n_planes))
    with pytest.raises(ValueError, match=match):
        write(dest, planes, (3, 10, 12), "ZYX", np.uint16)
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_wrong_planes_keep_existing_destination(tmp_path):
    dest = tmp_path / "a_labels.tif"
    write_labels_tiff(dest, [np.full((4, 4), 9, np.uint16)], (4, 4), "YX", np.uint16)
    with pytest.raises(ValueError, match="expected 2"):
        write_labels_tiff(dest, [np.ones((4, 4), np.uint16)], (2, 4, 4), "ZYX", np.uint16)
    np.testing.assert_array_equal(tifffile.imread(dest), np.full((4, 4), 9))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("writer", [write_labels_tiff, write_labels_zarr])
def test_plane_values_must_fit(tmp_path, writer):
    dest = tmp_path / "out"
    too_big = np.full((4, 4), 65536, np.uint32)
    with pytest.raises(ValueError, match="values up to 65536, which do not fit dtype uint16"):
        writer(dest, [too_big], (4, 4), "YX", np.uint16)
    negative = np.full((4, 4), -1, np.int32)
    with pytest.raises(ValueError, match="negative"):
        writer(dest, [negative], (4, 4), "YX", np.uint16)
    with pytest.raises(TypeError, match="integer dtype"):
        writer(dest, [np.zeros((4, 4), np.float32)], (4, 4), "YX", np.uint16)
    assert not dest.exists() and leftovers(tmp_path) == []


def test_plane_values_cast_when_they_fit(tmp_path):
    dest = tmp_path / "a.tif"
    plane = np.full((4, 4), 65535, np.int64)
    write_labels_tiff(dest, [plane], (4, 4), "YX", np.uint16)
    out = tifffile.imread(dest)
    assert out.dtype == np.uint16 and (out == 65535).all()


@pytest.mark.parametrize(
    ("shape", "axes", "dtype", "match"),
    [
        ((4, 4), "ZYX", np.uint16, "axes must be 2 distinct"),
        ((2, 4, 4), "YXZ", np.uint16, "ending in 'YX'"),
        ((2, 4, 4), "zyx", np.uint16, "upper-case"),
        ((2, 2, 4, 4), "ZZYX", np.uint16, "distinct"),
        ((4,), "X", np.uint16, "shape must be"),
        ((0, 4, 4), "ZYX", np.uint16, "shape must be"),
        (None, "YX", np.uint16, "shape must be a tuple of ints"),
        ((4, 4), "YX", np.int32, "dtype must be uint8, uint16 or uint32"),
        ((4, 4), "YX", np.float32, "dtype must be"),
        ((4, 4), "YX", "no-such-dtype", "dtype must be"),
    ],
)
@pytest.mark.parametrize("writer", [write_labels_tiff, write_labels_zarr])
def test_bad_stack_description(tmp_path, writer, shape, axes, dtype, match):
    with pytest.raises(ValueError, match=match):
        writer(tmp_path / "out", [np.zeros((4, 4), np.uint16)], shape, axes, dtype)
    assert list(tmp_path.iterdir()) == []


def test_tiff_description_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_labels_tiff(
            tmp_path / "a.tif",
            [np.zeros((4, 4), np.uint16)],
            (4, 4),
            "YX",
            np.uint16,
            description={"x": object()},
        )
    assert list(tmp_path.iterdir()) == []


def test_tiff_streaming_memory_stays_flat(tmp_path):
    """40 planes of 2 MiB: tifffile may buffer a few, never the whole 80 MiB stack."""
    n, h, w = 40, 1024, 1024

    def planes():
        for i in range(n):
            yield np.full((h, w), i, np.uint16)

    tracemalloc.start()
    try:
        write_labels_tiff(tmp_path / "big.tif", planes(), (n, h, w), "ZYX", np.uint16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        assert tif.series[0].shape == (n, h, w)
        assert int(tif.pages[n - 1].asarray()[0, 0]) == n - 1


# --------------------------------------------------------------------------- OME-Zarr


def test_zarr_round_trip_and_metadata(tmp_path):
    dest = tmp_path / "a_labels.zarr"
    data = random_stack((2, 3, 50, 70), 2**20, np.uint32)
    write_labels_zarr(
        dest, planes_of(data), data.shape, "TQYX", np.uint32, chunk_yx=32, attrs={"n": np.int64(6)}
    )
    root = zarr.open_group(dest, mode="r")
    arr = root["0"]
    assert arr.shape == data.shape and arr.dtype == np.uint32
    assert arr.chunks == (1, 1, 32, 32)
    np.testing.assert_array_equal(arr[:], data)
    attrs = root.attrs.asdict()
    (ms,) = attrs["multiscales"]
    assert ms["version"] == "0.4"
    assert ms["axes"] == [
        {"name": "t", "type": "time"},
        {"name": "q"},
        {"name": "y", "type": "space"},
        {"name": "x", "type": "space"},
    ]
    assert ms["datasets"] == [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * 4}]}
    ]
    assert attrs["image-label"] == {"version": "0.4"}
    assert attrs["mobilesam"] == {"n": 6}
    zarray = json.loads((dest / "0" / ".zarray").read_text())
    assert zarray["zarr_format"] == 2 and zarray["dimension_separator"] == "/"
    assert zarray["compressor"] is not None
    assert leftovers(tmp_path) == []


def test_zarr_2d_chunks_clip_to_image(tmp_path):
    dest = tmp_path / "b.zarr"
    data = random_stack((40, 30), 100, np.uint16)
    write_labels_zarr(dest, [data], data.shape, "YX", np.uint16)
    arr = zarr.open_group(dest)["0"]
    assert arr.chunks == (40, 30)
    np.testing.assert_array_equal(arr[:], data)
    assert zarr.open_group(dest).attrs["multiscales"][0]["axes"][0] == {
        "name": "y",
        "type": "space",
    }


def test_zarr_overwrites_existing(tmp_path):
    dest = tmp_path / "a_labels.zarr"
    write_labels_zarr(dest, [np.ones((8, 8), np.uint16)] * 2, (2, 8, 8), "ZYX", np.uint16)
    (dest / "stray.txt").write_text("x")
    new = random_stack((6, 5), 9, np.uint16)
    write_labels_zarr(dest, [new], (6, 5), "YX", np.uint16)
    assert not (dest / "stray.txt").exists()
    np.testing.assert_array_equal(zarr.open_group(dest)["0"][:], new)
    assert leftovers(tmp_path) == []


def test_zarr_failure_keeps_existing(tmp_path):
    dest = tmp_path / "a_labels.zarr"
    old = np.full((8, 8), 3, np.uint16)
    write_labels_zarr(dest, [old], (8, 8), "YX", np.uint16)
    with pytest.raises(ValueError, match="expected 2"):
        write_labels_zarr(dest, [old], (2, 8, 8), "ZYX", np.uint16)
    np.testing.assert_array_equal(zarr.open_group(dest)["0"][:], old)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("chunk_yx", [0, -5, 2.5, True])
def test_zarr_bad_chunk_yx(tmp_path, chunk_yx):
    with pytest.raises(ValueError, match="chunk_yx"):
        write_labels_zarr(
            tmp_path / "a.zarr",
            [np.zeros((4, 4), np.uint16)],
            (4, 4),
            "YX",
            np.uint16,
            chunk_yx=chunk_yx,
        )


def test_ngff_attrs_axis_count():
    assert len(ngff_attrs("TCZYX")["multiscales"][0]["axes"]) == 5
    assert "name" not in ngff_attrs("YX")["multiscales"][0]
    assert ngff_attrs("YX", name="a")["multiscales"][0]["name"] == "a"
    with pytest.raises(ValueError, match="2 to 5 axes"):
        ngff_attrs("QTZCYX")


def test_zarr_rejects_six_axes(tmp_path):
    with pytest.raises(ValueError, match="2 to 5 axes"):
        write_labels_zarr(tmp_path / "a.zarr", [], (1, 1, 1, 1, 4, 4), "QTZCYX", np.uint16)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- object table


@pytest.fixture
def label_image() -> np.ndarray:
    """Labels 1, 3, 4, 5 (2 absent): a disk, two rectangles at the corners, a ring."""
    labels = np.zeros((60, 80), np.uint32)
    rr, cc = draw.disk((20, 30), 8, shape=labels.shape)
    labels[rr, cc] = 1
    labels[0:5, 0:7] = 3  # top-left corner, 35 px
    labels[52:60, 71:80] = 4  # bottom-right corner, 72 px
    rr, cc = draw.disk((42, 55), 9, shape=labels.shape)
    labels[rr, cc] = 5
    rr, cc = draw.disk((42, 55), 5, shape=labels.shape)
    labels[rr, cc] = 0
    return labels


SCORES = {1: {"predicted_iou": 0.9, "stability_score": np.float32(0.95)}, 4: {"predicted_iou": 0.5}}


def test_object_table_matches_regionprops(label_image):
    rows = object_table(label_image, SCORES)
    props = measure.regionprops(label_image.astype(np.int64))
    assert [r["label"] for r in rows] == [p.label for p in props] == [1, 3, 4, 5]
    for row, prop in zip(rows, props, strict=True):
        y0, x0, y1, x1 = prop.bbox  # exclusive end
        assert row["area"] == prop.area
        assert (row["bbox_x"], row["bbox_y"]) == (x0, y0)
        assert (row["bbox_width"], row["bbox_height"]) == (x1 - x0, y1 - y0)
        assert row["centroid_y"] == pytest.approx(prop.centroid[0], abs=0.005)
        assert row["centroid_x"] == pytest.approx(prop.centroid[1], abs=0.005)
        assert set(row) == set(OBJECT_COLUMNS) - {"plane"}
    by_label = {r["label"]: r for r in rows}
    assert by_label[3] == {
        "label": 3,
        "area": 35,
        "bbox_x": 0,
        "bbox_y": 0,
        "bbox_width": 7,
        "bbox_height": 5,
        "centroid_y": 2.0,
        "centroid_x": 3.0,
        "predicted_iou": None,
        "stability_score": None,
    }
    assert by_label[4]["area"] == 72 and by_label[4]["centroid_y"] == 55.5
    assert by_label[1]["predicted_iou"] == 0.9
    assert by_label[1]["stability_score"] == float(np.float32(0.95))
    assert type(by_label[1]["stability_score"]) is float
    assert (by_label[4]["predicted_iou"], by_label[4]["stability_score"]) == (0.5, None)
    assert (by_label[5]["centroid_y"], by_label[5]["centroid_x"]) == (42.0, 55.0)
    assert label_image[42, 55] == 0  # the ring's hole


def test_object_table_empty_and_rounding():
    assert object_table(np.zeros((5, 5), np.uint16)) == []
    labels = np.zeros((5, 5), np.int32)
    labels[0, 0] = labels[0, 1] = labels[1, 0] = 2  # centroid (1/3, 1/3)
    (row,) = object_table(labels)
    assert (row["centroid_y"], row["centroid_x"]) == (0.33, 0.33)
    assert row["label"] == 2 and type(row["area"]) is int


def test_object_table_bad_input():
    with pytest.raises(ValueError, match=r"\(H, W\) label image"):
        object_table(np.zeros((2, 5, 5), np.uint16))
    with pytest.raises(TypeError, match="integer dtype"):
        object_table(np.zeros((5, 5), np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        object_table(np.full((5, 5), -1, np.int16))


def many_labels(n: int = 1000, size: int = 2048, seed: int = 0) -> np.ndarray:
    labels = np.zeros((size, size), np.uint32)
    rng = np.random.default_rng(seed)
    for i in range(1, n + 1):
        y, x = rng.integers(0, size - 40, 2)
        labels[y : y + int(rng.integers(5, 40)), x : x + int(rng.integers(5, 40))] = i
    return labels


def test_object_table_is_fast():
    labels = many_labels()
    start = time.perf_counter()
    rows = object_table(labels)
    elapsed = time.perf_counter() - start
    assert len(rows) == len(np.unique(labels)) - 1
    assert elapsed < 1.0, f"object_table took {elapsed:.2f} s"


# --------------------------------------------------------------------------- CSV


def test_objects_csv_round_trip(tmp_path, label_image):
    dest = tmp_path / "a_objects.csv"
    rows = [{"plane": 7, **r} for r in object_table(label_image, SCORES)]
    rows.append({"plane": 8, "label": 1, "predicted_iou": 1 / 3})  # sparse row
    write_objects_csv(dest, iter(rows))
    with open(dest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == OBJECT_COLUMNS
        back = list(reader)
    assert len(back) == len(rows)
    for row, got in zip(rows, back, strict=True):
        for key in OBJECT_COLUMNS:
            value = row.get(key)
            if value is None:
                assert got[key] == ""
            elif isinstance(value, float):
                assert float(got[key]) == value  # repr precision round-trips exactly
            else:
                assert got[key] == str(value)
    assert back[-1]["area"] == "" and float(back[-1]["predicted_iou"]) == 1 / 3
    assert leftovers(tmp_path) == []


def test_objects_csv_unknown_column(tmp_path):
    dest = tmp_path / "a_objects.csv"
    with pytest.raises(ValueError, match="not in fieldnames"):
        write_objects_csv(dest, [{"label": 1, "colour": "red"}])
    assert not dest.exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- COCO


def test_coco_annotations_decode_to_labels(label_image):
    anns = coco_annotations(label_image, image_id=4, first_id=10, scores=SCORES)
    table = object_table(label_image, SCORES)
    assert [a["id"] for a in anns] == [10, 11, 12, 13]
    assert [a["label"] for a in anns] == [1, 3, 4, 5]
    for ann, row in zip(anns, table, strict=True):
        seg = ann["segmentation"]
        assert seg["size"] == [60, 80] and isinstance(seg["counts"], str)
        mask = rle_to_mask(coco_to_rle(seg))
        np.testing.assert_array_equal(mask, label_image == ann["label"])
        assert ann["area"] == row["area"] and type(ann["area"]) is int
        assert ann["bbox"] == [
            float(row["bbox_x"]),
            float(row["bbox_y"]),
            float(row["bbox_width"]),
            float(row["bbox_height"]),
        ]
        assert all(type(v) is float for v in ann["bbox"])
        assert (ann["image_id"], ann["category_id"], ann["iscrowd"]) == (4, 1, 0)
        assert ann["predicted_iou"] == row["predicted_iou"]
        assert ann["stability_score"] == row["stability_score"]


def test_coco_annotations_full_image_label():
    labels = np.ones((3, 4), np.uint16)
    (ann,) = coco_annotations(labels, 0, 1)
    assert ann["bbox"] == [0.0, 0.0, 4.0, 3.0] and ann["area"] == 12
    assert rle_to_mask(coco_to_rle(ann["segmentation"])).all()
    assert coco_annotations(np.zeros((3, 4), np.uint8), 0, 1) == []


def test_coco_annotations_bad_input():
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        coco_annotations(np.zeros(5, np.uint16), 0, 1)


def test_write_coco_json_streams(tmp_path, label_image):
    images = [
        {"id": 0, "file_name": "a.tif", "height": 60, "width": 80, "plane": 0},
        {"id": 1, "file_name": "a.tif", "height": 60, "width": 80, "plane": 1},
    ]
    first = coco_annotations(label_image, 0, 1, SCORES)
    second = coco_annotations(label_image, 1, len(first) + 1)
    dest = tmp_path / "a_coco.json"
    n = write_coco_json(dest, images, iter(first + second), info={"description": "test"})
    doc = json.loads(dest.read_text())
    assert n == 8 and set(doc) == {"info", "images", "annotations", "categories"}
    assert doc["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    assert doc["info"] == {"description": "test"} and doc["images"] == images
    assert [a["id"] for a in doc["annotations"]] == list(range(1, 9))
    assert doc["annotations"] == json.loads(json.dumps(first + second))
    assert write_coco_json(dest, [], []) == 0
    assert json.loads(dest.read_text()) == {
        "info": {}, "images": [], "categories": doc["categories"], "annotations": [],
    }  # fmt: skip


def test_write_coco_json_failure_keeps_old_file(tmp_path):
    dest = tmp_path / "a_coco.json"
    dest.write_text("old")

    def broken():
        yield {"id": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_coco_json(dest, [], broken(), tmp_dir=tmp_path)
    assert dest.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [dest.name]


# ------------------------------------------------------------- background writer


def test_writer_keeps_order_and_bounds_the_queue():
    import threading

    from mobilesam_batch.planes import Writer

    done, gate = [], threading.Event()
    writer = Writer(limit=2)

    def slow(i):
        gate.wait(5)
        done.append(i)

    writer.submit(slow, 0)
    writer.submit(slow, 1)
    assert done == []  # both queued behind the gate, the caller not blocked
    gate.set()
    for i in range(2, 6):
        writer.submit(slow, i)
        assert len(writer._pending) <= 2
    writer.close()
    assert done == [0, 1, 2, 3, 4, 5]


def test_writer_raises_write_errors_in_the_caller():
    import threading

    from mobilesam_batch.planes import Writer

    gate = threading.Event()

    def fail():
        gate.wait(5)
        raise OSError("No space left on device")

    gate.set()
    writer = Writer(limit=0)  # every submit waits for the write
    with pytest.raises(OSError, match="No space left"):
        writer.submit(fail)
    gate.clear()
    writer = Writer()
    writer.submit(fail)  # not done yet: the error comes at close
    gate.set()
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    gate.clear()
    writer = Writer()
    writer.submit(fail)
    gate.set()
    writer.close(raise_errors=False)  # waits, quietly (while another error is handled)
    assert not writer._pending
