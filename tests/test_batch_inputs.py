"""Tests for mobilesam_batch.inputs: reading each format lazily, plane by plane
(discovery: test_batch_discover.py; bad inputs and --axes: test_batch_bad_inputs.py)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from mobilesam_batch.inputs import (
    InputError,
    open_source,
)

from .inputs_support import RNG, touch_png, u8, write_ome_zarr, write_zarr_array

# ----------------------------------------------------------------------------- PNG / JPEG


@pytest.mark.parametrize(
    ("mode", "data", "axes", "shape", "dtype"),
    [
        ("L", u8(12, 10), "YX", (12, 10), np.uint8),
        ("RGB", u8(12, 10, 3), "YXS", (12, 10, 3), np.uint8),
        ("RGBA", u8(12, 10, 4), "YXS", (12, 10, 4), np.uint8),
        ("LA", u8(12, 10, 2), "YXS", (12, 10, 2), np.uint8),
        ("I;16", RNG.integers(0, 65536, (12, 10), dtype=np.uint16), "YX", (12, 10), np.uint16),
    ],
)
def test_png_modes(tmp_path, mode, data, axes, shape, dtype):
    path = tmp_path / "img.png"
    image = Image.fromarray(data)
    assert image.mode == mode
    image.save(path)
    with open_source(path) as src:
        assert (src.format, src.axes, src.shape, src.dtype) == ("png", axes, shape, dtype)
        assert src.plane_shape == () and src.n_planes == 1 and src.plane_indices() == [()]
        assert src.out_shape == (12, 10) and src.out_axes == "YX"
        assert (src.height, src.width) == (12, 10)
        assert src.n_channels == (shape[2] if len(shape) == 3 else 1)
        plane = src.read_plane(())
    assert plane.dtype == dtype
    np.testing.assert_array_equal(plane, data)


def test_png_palette_and_bilevel(tmp_path):
    pal = Image.new("P", (6, 4))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "p.png")
    pal.save(tmp_path / "pt.png", transparency=0)
    Image.new("1", (6, 4), 1).save(tmp_path / "b.png")
    with open_source(tmp_path / "p.png") as src:
        assert src.shape == (4, 6, 3) and src.channel_axis == 2
        assert src.read_plane(())[1, 1].tolist() == [255, 0, 0]
    with open_source(tmp_path / "pt.png") as src:
        assert src.shape == (4, 6, 4)
        assert src.read_plane(())[0, 0, 3] == 0
    with open_source(tmp_path / "b.png") as src:
        assert src.dtype == bool and src.axes == "YX"
        assert src.read_plane(()).all()


def test_jpeg(tmp_path):
    Image.fromarray(u8(16, 20, 3)).save(tmp_path / "a.jpg")
    Image.new("CMYK", (20, 16)).save(tmp_path / "c.jpeg")
    with open_source(tmp_path / "a.jpg") as src:
        assert (src.format, src.axes, src.shape) == ("jpeg", "YXS", (16, 20, 3))
        assert src.read_plane(()).shape == (16, 20, 3)
    with open_source(tmp_path / "c.jpeg") as src:
        assert src.shape == (16, 20, 3)  # CMYK is converted to RGB
        assert src.read_plane(()).shape == (16, 20, 3)


def test_unsupported_pillow_mode(tmp_path, monkeypatch):
    import PIL.Image

    path = touch_png(tmp_path / "a.png")
    real_open = PIL.Image.open

    def fake_open(fp, *args, **kwargs):
        image = real_open(fp, *args, **kwargs)
        image._mode = "HSV-ish"
        return image

    monkeypatch.setattr(PIL.Image, "open", fake_open)
    with pytest.raises(InputError, match="unsupported image mode 'HSV-ish'"):
        open_source(path)


# ----------------------------------------------------------------------------- TIFF


def test_tiff_2d_uint16_and_float32(tmp_path):
    data16 = RNG.integers(0, 65536, (20, 30), dtype=np.uint16)
    data32 = RNG.random((20, 30), dtype=np.float32)
    tifffile.imwrite(tmp_path / "a.tif", data16)
    tifffile.imwrite(tmp_path / "b.TIFF", data32)
    with open_source(tmp_path / "a.tif") as src:
        assert (src.format, src.axes, src.dtype, src.out_shape) == (
            "tiff",
            "YX",
            "uint16",
            (20, 30),
        )
        np.testing.assert_array_equal(src.read_plane(()), data16)
    with open_source(tmp_path / "b.TIFF") as src:
        assert src.dtype == np.float32
        np.testing.assert_array_equal(src.read_plane(()), data32)


def test_tiff_stack_zyx(tmp_path):
    data = u8(3, 16, 12)
    tifffile.imwrite(tmp_path / "s.tif", data, photometric="minisblack", metadata={"axes": "ZYX"})
    with open_source(tmp_path / "s.tif") as src:
        assert src.axes == "ZYX" and src.plane_axes == "Z"
        assert src.out_shape == (3, 16, 12) and src.out_axes == "ZYX"
        assert src.plane_indices() == [(0,), (1,), (2,)]
        plane = src.read_plane((1,))
        assert type(plane) is np.ndarray and plane.flags.c_contiguous
        np.testing.assert_array_equal(plane, data[1])


def test_tiff_stack_without_axes_metadata_uses_tifffile_letters(tmp_path):
    data = u8(5, 8, 8)
    tifffile.imwrite(tmp_path / "s.tif", data, photometric="minisblack")
    with open_source(tmp_path / "s.tif") as src:
        assert src.axes == "QYX" and src.n_planes == 5
        np.testing.assert_array_equal(src.read_plane((4,)), data[4])


def test_tiff_rgb(tmp_path):
    data = u8(2, 10, 12, 3)
    tifffile.imwrite(tmp_path / "rgb.tif", data, photometric="rgb")
    with open_source(tmp_path / "rgb.tif") as src:
        assert src.axes[-3:] == "YXS" and src.channel_axis == 3 and src.n_planes == 2
        np.testing.assert_array_equal(src.read_plane((1,)), data[1])


def test_imagej_hyperstack(tmp_path):
    data = u8(2, 3, 2, 10, 12)
    tifffile.imwrite(tmp_path / "h.tif", data, imagej=True, metadata={"axes": "TZCYX"})
    with open_source(tmp_path / "h.tif") as src:
        assert (src.format, src.axes) == ("imagej-tiff", "TZCYX")
        assert src.plane_axes == "TZ" and src.plane_shape == (2, 3) and src.n_channels == 2
        assert src.out_shape == (2, 3, 10, 12) and src.out_axes == "TZYX"
        assert src.plane_indices()[:3] == [(0, 0), (0, 1), (0, 2)]
        plane = src.read_plane((1, 2))
        assert plane.shape == (10, 12, 2)
        np.testing.assert_array_equal(plane, np.moveaxis(data[1, 2], 0, -1))


def test_ome_tiff_channels(tmp_path):
    data = u8(3, 2, 10, 12)
    path = tmp_path / "a.ome.tif"
    tifffile.imwrite(path, data, photometric="minisblack", metadata={"axes": "ZCYX"})
    with open_source(path) as src:
        assert (src.format, src.axes, src.channel_axis) == ("ome-tiff", "ZCYX", 1)
        assert src.plane_axes == "Z" and src.out_shape == (3, 10, 12)
        np.testing.assert_array_equal(src.read_plane((2,)), np.moveaxis(data[2], 0, -1))


def test_ome_tiff_pyramid_reads_level_zero(tmp_path):
    data = u8(2, 32, 32)
    path = tmp_path / "p.ome.tiff"
    with tifffile.TiffWriter(path) as tw:
        tw.write(data, subifds=1, photometric="minisblack", metadata={"axes": "CYX"})
        tw.write(data[:, ::2, ::2], subfiletype=1, photometric="minisblack")
    with open_source(path) as src:
        assert src.shape == (2, 32, 32) and src.axes == "CYX"
        np.testing.assert_array_equal(src.read_plane(()), np.moveaxis(data, 0, -1))


def test_tiff_size_one_channel_is_squeezed_by_tifffile(tmp_path):
    data = u8(1, 10, 12, 3)
    path = tmp_path / "c.ome.tif"
    tifffile.imwrite(path, data, photometric="rgb", metadata={"axes": "CYXS"})
    with open_source(path) as src:
        assert src.axes == "YXS" and src.plane_shape == () and src.n_channels == 3
        np.testing.assert_array_equal(src.read_plane(()), data[0])


@pytest.mark.parametrize(
    ("axes", "shape", "expected"),
    [
        ("CYXS", (1, 10, 12, 3), "QYXS"),
        ("ZCYXS", (2, 3, 10, 12, 1), "ZCYXQ"),
        ("CYXS", (1, 10, 12, 1), "QYXS"),
        ("ZYX", (2, 10, 12), "ZYX"),
    ],
)
def test_resolve_file_axes_size_one_channel_becomes_plane_axis(axes, shape, expected):
    from mobilesam_batch.inputs import _resolve_file_axes

    assert _resolve_file_axes(axes, shape, Path("f.tif")) == expected


def test_tiff_two_channel_axes_need_axes(tmp_path):
    data = u8(2, 10, 12, 3)
    path = tmp_path / "c.ome.tif"
    tifffile.imwrite(path, data, photometric="rgb", metadata={"axes": "CYXS"})
    with pytest.raises(InputError, match=r"more than one channel axis \(C=2, S=3\); pass --axes"):
        open_source(path)
    with open_source(path, axes="ZYXC") as src:
        assert src.plane_axes == "Z" and src.n_channels == 3


def test_large_tiff_stack_is_read_one_plane_at_a_time(tmp_path):
    data = np.zeros((200, 256, 256), np.uint16)  # 26 MB
    data[123] = 7
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, data, photometric="minisblack", metadata={"axes": "ZYX"})
    del data
    tracemalloc.start()
    try:
        with open_source(path) as src:
            plane = src.read_plane((123,))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plane.shape == (256, 256) and (plane == 7).all()
    assert peak < 5_000_000, f"peak {peak / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- npy


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((6, 7), "YX"),
        ((6, 7, 3), "YXS"),
        ((6, 7, 4), "YXS"),
        ((3, 6, 7), "ZYX"),
        ((4, 6, 3), "ZYX"),  # first dim too small for an RGB image
        ((5, 6, 7), "ZYX"),
        ((2, 6, 7, 3), "ZYXS"),
        ((2, 3, 6, 7), "TZYX"),
        ((2, 3, 2, 6, 7), "TZCYX"),
    ],
)
def test_npy_axes_inference(tmp_path, shape, axes):
    data = RNG.integers(0, 1000, shape).astype(np.int16)
    np.save(tmp_path / "a.npy", data)
    with open_source(tmp_path / "a.npy") as src:
        assert (src.format, src.axes, src.shape, src.dtype) == ("npy", axes, shape, np.int16)
        index = src.plane_indices()[-1]
        plane = src.read_plane(index)
    expected = data[tuple(index[:2] if axes == "TZCYX" else index)]
    if axes == "TZCYX":
        expected = np.moveaxis(expected, 0, -1)
    np.testing.assert_array_equal(plane, expected)


def test_npy_is_memory_mapped_and_plane_is_in_memory(tmp_path):
    np.save(tmp_path / "m.npy", np.ones((64, 128, 128), np.float32))
    with open_source(tmp_path / "m.npy") as src:
        assert isinstance(src._array, np.memmap)
        plane = src.read_plane((5,))
    assert type(plane) is np.ndarray and plane.base is None and plane.shape == (128, 128)


@pytest.mark.parametrize("shape", [(5,), (2, 2, 2, 2, 3, 3)])
def test_npy_uninferable_axes(tmp_path, shape):
    np.save(tmp_path / "a.npy", np.zeros(shape, np.uint8))
    with pytest.raises(InputError, match=rf"cannot infer the axes of a {len(shape)}-D.*--axes"):
        open_source(tmp_path / "a.npy")


def test_npy_6d_with_axes_override(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 1, 2, 3, 4, 5), np.uint8))
    with open_source(tmp_path / "a.npy", axes="itzcyx") as src:
        assert src.axes == "ITZCYX" and src.plane_shape == (2, 1, 2)
        assert src.read_plane((1, 0, 1)).shape == (4, 5, 3)


# ----------------------------------------------------------------------------- zarr


def test_zarr_array(tmp_path):
    data = u8(4, 10, 12)
    path = write_zarr_array(tmp_path / "a.zarr", data)
    with open_source(path) as src:
        assert (src.format, src.axes, src.shape) == ("zarr", "ZYX", (4, 10, 12))
        np.testing.assert_array_equal(src.read_plane((3,)), data[3])


def test_zarr_v2_array(tmp_path):
    arr = zarr.create_array(str(tmp_path / "v2"), shape=(6, 5), dtype="float32", zarr_format=2)
    arr[:] = 1.5
    with open_source(tmp_path / "v2") as src:
        assert src.axes == "YX" and (src.read_plane(()) == 1.5).all()


def test_ome_zarr_group_v04(tmp_path):
    data = u8(2, 3, 10, 12)
    path = write_ome_zarr(tmp_path / "img.ome.zarr", data, ["c", "z", "y", "x"])
    with open_source(path) as src:
        assert (src.format, src.axes, src.channel_axis) == ("ome-zarr", "CZYX", 0)
        assert src.plane_axes == "Z" and src.out_shape == (3, 10, 12)
        np.testing.assert_array_equal(src.read_plane((1,)), np.moveaxis(data[:, 1], 0, -1))


def test_ome_zarr_v05_and_unknown_axis_name(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("s0", shape=(2, 6, 7), dtype="uint8")
    multiscales = [{"axes": [{"name": "angle"}, "y", "x"], "datasets": [{"path": "s0"}]}]
    group.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
    with open_source(tmp_path / "g.zarr") as src:
        assert (src.format, src.axes) == ("ome-zarr", "QYX")


def test_ome_zarr_malformed_metadata(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("0", shape=(6, 7), dtype="uint8")
    group.attrs["multiscales"] = [{"datasets": []}]
    with pytest.raises(InputError, match="malformed OME-NGFF multiscales metadata"):
        open_source(tmp_path / "g.zarr")


def test_zarr_group_with_one_array(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("only", shape=(6, 7), dtype="uint16")
    with open_source(tmp_path / "g.zarr") as src:
        assert (src.format, src.axes, src.dtype) == ("zarr", "YX", np.uint16)


def test_zarr_group_with_many_arrays(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    for name in "ab":
        group.create_array(name, shape=(6, 7), dtype="uint16")
    with pytest.raises(InputError, match="holds 2 arrays and no OME-NGFF"):
        open_source(tmp_path / "g.zarr")
    with open_source(tmp_path / "g.zarr" / "b") as src:
        assert src.shape == (6, 7)


def test_zarr_folder_without_store(tmp_path):
    (tmp_path / "e.zarr").mkdir()
    with pytest.raises(InputError, match="cannot read as zarr: "):
        open_source(tmp_path / "e.zarr")
    with pytest.raises(InputError, match="is a folder, not a zarr store or an image"):
        open_source(tmp_path)
