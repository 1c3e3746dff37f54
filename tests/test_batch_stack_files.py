"""Output files of mobilesam-everything: label dtypes, TIFF and OME-Zarr label stacks."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from mobilesam_batch.outputs import (
    imagej_axes,
    labels_dtype,
    ngff_attrs,
    write_labels_tiff,
    write_labels_zarr,
)

from .outputs_support import leftovers, planes_of, random_stack

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
