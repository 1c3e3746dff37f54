"""Tests for mobilesam_batch.inputs: the --axes override, and bad inputs (missing,
garbage, truncated, corrupt, empty, unsupported dtypes), each a named InputError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from mobilesam_batch.inputs import (
    ImageSource,
    InputError,
    open_source,
)

from .inputs_support import RNG, u8, write_zarr_array

# ----------------------------------------------------------------------------- axes override


def test_axes_override_valid(tmp_path):
    data = u8(10, 12, 2)
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
    tifffile.imwrite(path, u8(4, 64, 64), photometric="minisblack", metadata={"axes": "ZYX"})
    path.write_bytes(path.read_bytes()[: 64 * 64 * 2])
    with open_source(path) as src:
        src.read_plane((0,))
        with pytest.raises(InputError, match=r"cannot read plane \(3,\) as tiff: ") as info:
            src.read_plane((3,))
    assert info.value.path == path


def test_corrupt_compressed_tiff_strip(tmp_path):
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, u8(2, 32, 32), photometric="minisblack", compression="zlib")
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
    write_zarr_array(tmp_path / "z.zarr", np.zeros((3, 0, 4), np.uint8))
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
    tifffile.imwrite(tmp_path / "a.tif", u8(4, 5))
    src = open_source(tmp_path / "a.tif")
    tif = src._handles[1]
    with src as same:
        assert same is src
    assert tif.filehandle.closed
    with pytest.raises(ValueError, match="source is closed"):
        src.read_plane(())
    src.close()  # twice is fine


def test_reopen_from_path_and_axes(tmp_path):
    np.save(tmp_path / "a.npy", u8(3, 4, 5))
    with open_source(tmp_path / "a.npy", axes="YXC") as first:
        again = open_source(first.path, first.axes)
    with again:
        assert (again.shape, again.axes, again.dtype) == (first.shape, first.axes, first.dtype)
        assert again.read_plane(()).shape == (3, 4, 5)


def test_describe_is_json_serialisable(tmp_path):
    tifffile.imwrite(tmp_path / "h.tif", u8(2, 3, 2, 6, 7), imagej=True, metadata={"axes": "TZCYX"})
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
    tifffile.imwrite(tmp_path / "a.tif", u8(4, 5))
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
