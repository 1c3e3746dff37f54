"""Tests for mobilesam_batch.inputs: input discovery and lazy plane-by-plane reading."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from mobilesam_batch.inputs import (
    SUPPORTED_SUFFIXES,
    ImageSource,
    InputError,
    discover_inputs,
    open_source,
)

RNG = np.random.default_rng(0)


def _u8(*shape):
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def _touch_png(path: Path) -> Path:
    Image.fromarray(_u8(8, 8)).save(path)
    return path


def _write_zarr_array(path: Path, data: np.ndarray) -> Path:
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype)
    arr[:] = data
    return path


def _write_ome_zarr(path: Path, data: np.ndarray, names: list[str]) -> Path:
    group = zarr.open_group(str(path), mode="w")
    arr = group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=data.shape)
    arr[:] = data
    axes = [{"name": n, "type": "channel" if n == "c" else "space"} for n in names]
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": axes,
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1] * 4}]}
            ],
        }
    ]
    return path


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
    b = _touch_png(tmp_path / "b.png")
    a = _touch_png(tmp_path / "a.PNG")
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
    _touch_png(tmp_path / "sub" / "d.png")
    paths, errors = discover_inputs([tmp_path])
    assert [p.name for p in paths] == ["B.jpg", "a.npy", "c.tif"]
    assert errors == []


def test_discover_recursive_never_enters_zarr_or_hidden(tmp_path):
    _touch_png(tmp_path / "a.png")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    _touch_png(tmp_path / "sub" / "deeper" / "x.png")
    _touch_png(tmp_path / "sub" / "b.png")
    (tmp_path / ".git").mkdir()
    _touch_png(tmp_path / ".git" / "h.png")
    _write_zarr_array(tmp_path / "sub" / "s.zarr", np.zeros((4, 4), np.uint8))
    group = zarr.open_group(str(tmp_path / "g"), mode="w")  # zarr store without .zarr name
    group.create_array("0", shape=(4, 4), dtype="uint8")
    paths, errors = discover_inputs([tmp_path], recursive=True)
    rel = [p.relative_to(tmp_path).as_posix() for p in paths]
    assert rel == ["a.png", "g", "sub/b.png", "sub/deeper/x.png", "sub/s.zarr"]
    assert errors == []


def test_discover_zarr_dir_counted_once(tmp_path):
    store = _write_zarr_array(tmp_path / "s.zarr", np.zeros((4, 4), np.uint8))
    paths, errors = discover_inputs([store, tmp_path, str(tmp_path / "*")])
    assert paths == [store]
    assert errors == []


def test_discover_zarr_dir_by_marker_file(tmp_path):
    store = _write_zarr_array(tmp_path / "plain", np.zeros((4, 4), np.uint8))
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
    _touch_png(tmp_path / "x" / "y" / "deep.png")
    _touch_png(tmp_path / "top.png")
    _write_ome_zarr(tmp_path / "x" / "img.zarr", np.zeros((1, 1, 4, 4), np.uint8), list("czyx"))
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


# ----------------------------------------------------------------------------- PNG / JPEG


@pytest.mark.parametrize(
    ("mode", "data", "axes", "shape", "dtype"),
    [
        ("L", _u8(12, 10), "YX", (12, 10), np.uint8),
        ("RGB", _u8(12, 10, 3), "YXS", (12, 10, 3), np.uint8),
        ("RGBA", _u8(12, 10, 4), "YXS", (12, 10, 4), np.uint8),
        ("LA", _u8(12, 10, 2), "YXS", (12, 10, 2), np.uint8),
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
    Image.fromarray(_u8(16, 20, 3)).save(tmp_path / "a.jpg")
    Image.new("CMYK", (20, 16)).save(tmp_path / "c.jpeg")
    with open_source(tmp_path / "a.jpg") as src:
        assert (src.format, src.axes, src.shape) == ("jpeg", "YXS", (16, 20, 3))
        assert src.read_plane(()).shape == (16, 20, 3)
    with open_source(tmp_path / "c.jpeg") as src:
        assert src.shape == (16, 20, 3)  # CMYK is converted to RGB
        assert src.read_plane(()).shape == (16, 20, 3)


def test_unsupported_pillow_mode(tmp_path, monkeypatch):
    import PIL.Image

    path = _touch_png(tmp_path / "a.png")
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
    data = _u8(3, 16, 12)
    tifffile.imwrite(tmp_path / "s.tif", data, photometric="minisblack", metadata={"axes": "ZYX"})
    with open_source(tmp_path / "s.tif") as src:
        assert src.axes == "ZYX" and src.plane_axes == "Z"
        assert src.out_shape == (3, 16, 12) and src.out_axes == "ZYX"
        assert src.plane_indices() == [(0,), (1,), (2,)]
        plane = src.read_plane((1,))
        assert type(plane) is np.ndarray and plane.flags.c_contiguous
        np.testing.assert_array_equal(plane, data[1])


def test_tiff_stack_without_axes_metadata_uses_tifffile_letters(tmp_path):
    data = _u8(5, 8, 8)
    tifffile.imwrite(tmp_path / "s.tif", data, photometric="minisblack")
    with open_source(tmp_path / "s.tif") as src:
        assert src.axes == "QYX" and src.n_planes == 5
        np.testing.assert_array_equal(src.read_plane((4,)), data[4])


def test_tiff_rgb(tmp_path):
    data = _u8(2, 10, 12, 3)
    tifffile.imwrite(tmp_path / "rgb.tif", data, photometric="rgb")
    with open_source(tmp_path / "rgb.tif") as src:
        assert src.axes[-3:] == "YXS" and src.channel_axis == 3 and src.n_planes == 2
        np.testing.assert_array_equal(src.read_plane((1,)), data[1])


def test_imagej_hyperstack(tmp_path):
    data = _u8(2, 3, 2, 10, 12)
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
    data = _u8(3, 2, 10, 12)
    path = tmp_path / "a.ome.tif"
    tifffile.imwrite(path, data, photometric="minisblack", metadata={"axes": "ZCYX"})
    with open_source(path) as src:
        assert (src.format, src.axes, src.channel_axis) == ("ome-tiff", "ZCYX", 1)
        assert src.plane_axes == "Z" and src.out_shape == (3, 10, 12)
        np.testing.assert_array_equal(src.read_plane((2,)), np.moveaxis(data[2], 0, -1))


def test_ome_tiff_pyramid_reads_level_zero(tmp_path):
    data = _u8(2, 32, 32)
    path = tmp_path / "p.ome.tiff"
    with tifffile.TiffWriter(path) as tw:
        tw.write(data, subifds=1, photometric="minisblack", metadata={"axes": "CYX"})
        tw.write(data[:, ::2, ::2], subfiletype=1, photometric="minisblack")
    with open_source(path) as src:
        assert src.shape == (2, 32, 32) and src.axes == "CYX"
        np.testing.assert_array_equal(src.read_plane(()), np.moveaxis(data, 0, -1))


def test_tiff_size_one_channel_is_squeezed_by_tifffile(tmp_path):
    data = _u8(1, 10, 12, 3)
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
    data = _u8(2, 10, 12, 3)
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
    data = _u8(4, 10, 12)
    path = _write_zarr_array(tmp_path / "a.zarr", data)
    with open_source(path) as src:
        assert (src.format, src.axes, src.shape) == ("zarr", "ZYX", (4, 10, 12))
        np.testing.assert_array_equal(src.read_plane((3,)), data[3])


def test_zarr_v2_array(tmp_path):
    arr = zarr.create_array(str(tmp_path / "v2"), shape=(6, 5), dtype="float32", zarr_format=2)
    arr[:] = 1.5
    with open_source(tmp_path / "v2") as src:
        assert src.axes == "YX" and (src.read_plane(()) == 1.5).all()


def test_ome_zarr_group_v04(tmp_path):
    data = _u8(2, 3, 10, 12)
    path = _write_ome_zarr(tmp_path / "img.ome.zarr", data, ["c", "z", "y", "x"])
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


# ----------------------------------------------------------------------------- axes override


def test_axes_override_valid(tmp_path):
    data = _u8(10, 12, 2)
    np.save(tmp_path / "a.npy", data)
    with open_source(tmp_path / "a.npy", axes="yxc") as src:
        assert src.axes == "YXC" and src.channel_axis == 2 and src.plane_shape == ()
        np.testing.assert_array_equal(src.read_plane(()), data)
    with open_source(tmp_path / "a.npy", axes="XYZ") as src:  # Y and X need not be last
        assert (src.height, src.width, src.plane_axes) == (12, 10, "Z")
        np.testing.assert_array_equal(src.read_plane((1,)), data[:, :, 1].T)


@pytest.mark.parametrize(
    ("axes", "problem"),
    [
        ("YX", "needs 3 letters"),
        ("ZYXC", "needs 3 letters"),
        ("ZYW", "letters must be from 'TZCSYXQI'"),
        ("YYX", "letters must be unique"),
        ("ZTX", "must contain Y and X"),
    ],
)
def test_axes_override_invalid(tmp_path, axes, problem):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(
        ValueError, match=rf"axes '{axes}' do not fit .*a\.npy of shape \(2, 3, 4\)"
    ):
        open_source(tmp_path / "a.npy", axes=axes)
    with pytest.raises(ValueError, match=problem):
        open_source(tmp_path / "a.npy", axes=axes)


def test_axes_override_two_channel_letters_and_non_string(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"at most one channel letter \(C or S\)"):
        open_source(tmp_path / "a.npy", axes="CSYX")
    with pytest.raises(ValueError, match="axes must be a string like 'ZYX', got 4"):
        open_source(tmp_path / "a.npy", axes=4)


# ----------------------------------------------------------------------------- bad inputs


def test_open_missing_unsupported_and_empty(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        open_source(tmp_path / "nope.tif")
    (tmp_path / "a.bmp").write_bytes(b"x")
    with pytest.raises(InputError, match=r"unsupported file type '\.bmp'"):
        open_source(tmp_path / "a.bmp")
    for name in ["e.tif", "e.png", "e.npy"]:
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(InputError, match=r"empty file \(0 bytes\)") as info:
            open_source(tmp_path / name)
        assert info.value.path == tmp_path / name


@pytest.mark.parametrize(
    ("name", "label"),
    [("g.tif", "TIFF"), ("g.png", "PNG"), ("g.jpg", "JPEG"), ("g.npy", "npy")],
)
def test_garbage_bytes(tmp_path, name, label):
    (tmp_path / name).write_bytes(b"this is not an image at all" * 5)
    with pytest.raises(InputError, match=f"cannot read as {label}: ") as info:
        open_source(tmp_path / name)
    assert info.value.path == tmp_path / name


def test_truncated_tiff_fails_on_read(tmp_path):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, _u8(4, 64, 64), photometric="minisblack", metadata={"axes": "ZYX"})
    path.write_bytes(path.read_bytes()[: 64 * 64 * 2])
    with open_source(path) as src:
        src.read_plane((0,))
        with pytest.raises(InputError, match=r"cannot read plane \(3,\) as tiff: ") as info:
            src.read_plane((3,))
    assert info.value.path == path


def test_corrupt_compressed_tiff_strip(tmp_path):
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, _u8(2, 32, 32), photometric="minisblack", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[1].dataoffsets[0]
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 8] = b"\x13" * 8
    path.write_bytes(bytes(raw))
    with open_source(path) as src:
        src.read_plane((0,))
        with pytest.raises(InputError, match="cannot read plane"):
            src.read_plane((1,))


def test_truncated_png_fails_on_read(tmp_path):
    path = tmp_path / "t.png"
    Image.fromarray(RNG.integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with open_source(path) as src, pytest.raises(InputError, match="cannot read plane"):
        src.read_plane(())


def test_truncated_npy(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.zeros((10, 64, 64), np.uint16))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError, match="cannot read as npy: "):
        open_source(path)


def test_zero_size_image(tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((0, 5), np.uint8))
    with pytest.raises(InputError, match=r"image has no pixels \(shape \(0, 5\)\)"):
        open_source(tmp_path / "z.npy")
    _write_zarr_array(tmp_path / "z.zarr", np.zeros((3, 0, 4), np.uint8))
    with pytest.raises(InputError, match="image has no pixels"):
        open_source(tmp_path / "z.zarr")


@pytest.mark.parametrize("dtype", [np.complex64, object])
def test_unsupported_dtype(tmp_path, dtype):
    np.save(tmp_path / "c.npy", np.zeros((4, 5), dtype), allow_pickle=True)
    match = "unsupported data type complex64" if dtype is np.complex64 else "cannot read as npy"
    with pytest.raises(InputError, match=match):
        open_source(tmp_path / "c.npy")


@pytest.mark.parametrize(
    ("axes", "shape", "match"),
    [
        ("QQ", (4, 5), r"cannot tell the Y and X axes \(axes 'QQ'\); pass --axes"),
        ("YYX", (3, 4, 5), r"cannot tell the Y and X axes"),
        ("YXQ", (4, 5), r"axes 'YXQ' do not match shape \(4, 5\)"),
        ("CSYXS", (2, 2, 4, 5, 2), r"more than one channel axis \(C=2, S=2, S=2\)"),
    ],
)
def test_resolve_file_axes_errors(axes, shape, match):
    from mobilesam_batch.inputs import _resolve_file_axes

    with pytest.raises(InputError, match=match) as info:
        _resolve_file_axes(axes, shape, Path("f.tif"))
    assert info.value.path == Path("f.tif")


# ----------------------------------------------------------------------------- ImageSource


def test_read_plane_bad_index(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 4, 5), np.uint8))
    with open_source(tmp_path / "a.npy") as src:
        assert src.read_plane((np.int64(2),)).shape == (4, 5)
        for bad in [(3,), (-1,), (0, 0), (), ("a",), 1, (1.5,)]:
            with pytest.raises(ValueError, match=r"plane index .* out of range for plane shape"):
                src.read_plane(bad)


def test_close_and_context_manager(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", _u8(4, 5))
    src = open_source(tmp_path / "a.tif")
    tif = src._handles[1]
    with src as same:
        assert same is src
    assert tif.filehandle.closed
    with pytest.raises(ValueError, match="source is closed"):
        src.read_plane(())
    src.close()  # twice is fine


def test_reopen_from_path_and_axes(tmp_path):
    np.save(tmp_path / "a.npy", _u8(3, 4, 5))
    with open_source(tmp_path / "a.npy", axes="YXC") as first:
        again = open_source(first.path, first.axes)
    with again:
        assert (again.shape, again.axes, again.dtype) == (first.shape, first.axes, first.dtype)
        assert again.read_plane(()).shape == (3, 4, 5)


def test_describe_is_json_serialisable(tmp_path):
    tifffile.imwrite(
        tmp_path / "h.tif", _u8(2, 3, 2, 6, 7), imagej=True, metadata={"axes": "TZCYX"}
    )
    with open_source(tmp_path / "h.tif") as src:
        info = json.loads(json.dumps(src.describe()))
    assert info == {
        "format": "imagej-tiff",
        "shape": [2, 3, 2, 6, 7],
        "dtype": "uint8",
        "axes": "TZCYX",
        "channel_axis": 2,
        "plane_axes": "TZ",
        "n_planes": 6,
    }


def test_image_source_direct_construction():
    src = ImageSource(Path("x.npy"), "npy", (2, 3, 4), np.dtype(np.uint8), "ZYX")
    assert src.out_shape == (2, 3, 4) and src.n_channels == 1 and src.channel_axis is None


def test_tiff_without_series(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "a.tif", _u8(4, 5))
    monkeypatch.setattr(tifffile.TiffFile, "series", property(lambda self: []))
    with pytest.raises(InputError, match="TIFF file holds no image"):
        open_source(tmp_path / "a.tif")


def test_long_library_messages_are_shortened(tmp_path, monkeypatch):
    np.save(tmp_path / "a.npy", np.zeros((4, 5), np.uint8))

    def boom(*args, **kwargs):
        raise OSError("x" * 500 + "\nsecond line")

    monkeypatch.setattr(np, "load", boom)
    with pytest.raises(InputError) as info:
        open_source(tmp_path / "a.npy")
    assert info.value.reason == "cannot read as npy: " + "x" * 197 + "..."
