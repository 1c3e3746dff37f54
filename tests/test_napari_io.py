"""Reader, writer and sample data of the napari plugin (no napari or display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_mobilesam import napari_io


def test_reader_writer_round_trip(tmp_path):
    import json

    labels = np.zeros((3, 20, 30), np.uint32)
    labels[1, 5:10, 5:12] = 7
    labels[2, 1:3, 1:3] = 70000
    (path,) = napari_io.write_labels(str(tmp_path / "x_labels"), labels, {})
    assert path.endswith("x_labels.tif")
    (tmp_path / "x_labels.json").write_text(json.dumps({"tool": "mobilesam-everything"}))
    reader = napari_io.get_reader(path)
    assert reader is not None and napari_io.get_reader(str(tmp_path / "other.tif")) is None
    ((data, kwargs, kind),) = reader(path)
    assert kind == "labels" and kwargs["name"] == "x_labels"
    np.testing.assert_array_equal(np.asarray(data), labels)
    assert kwargs["metadata"]["mobilesam"]["tool"] == "mobilesam-everything"
    small = labels.clip(0, 100).astype(np.uint16)
    (path,) = napari_io.write_labels(str(tmp_path / "y_labels.tif"), small, {})
    np.testing.assert_array_equal(np.asarray(napari_io.read_labels(path)[0][0]), small)
    with pytest.raises(TypeError, match="integers"):
        napari_io.write_labels(str(tmp_path / "z.tif"), np.zeros((4, 4), float), {})
    with pytest.raises(ValueError, match="2 dimensions"):
        napari_io.write_labels(str(tmp_path / "z.tif"), np.zeros(4, np.uint8), {})
    with pytest.raises(ValueError, match="negative"):
        napari_io.write_labels(str(tmp_path / "z.tif"), -np.ones((4, 4), np.int32), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "x_labels.json", "x_labels.tif", "y_labels.json", "y_labels.tif",
    ]  # fmt: skip


def test_reader_opens_any_labels_tif(tmp_path):
    """Files named *_labels.tif from other tools: integer ones are labels (no provenance),
    others an image; other names and missing files are not claimed."""
    import tifffile

    tifffile.imwrite(tmp_path / "a_labels.tif", np.arange(12, dtype=np.int32).reshape(3, 4))
    tifffile.imwrite(tmp_path / "b_labels.tiff", np.ones((3, 4), np.float32))
    ((data, kwargs, kind),) = napari_io.get_reader(str(tmp_path / "a_labels.tif"))(
        str(tmp_path / "a_labels.tif")
    )
    assert kind == "labels" and "mobilesam" not in kwargs["metadata"] and data.shape == (3, 4)
    layers = napari_io.get_reader([str(tmp_path / "b_labels.tiff")])(
        [str(tmp_path / "b_labels.tiff")]
    )
    assert [kind for _, _, kind in layers] == ["image"]
    assert napari_io.get_reader(str(tmp_path / "missing_labels.tif")) is None
    assert napari_io.get_reader([str(tmp_path / "a_labels.tif"), str(tmp_path / "c.tif")]) is None
    assert napari_io.get_reader([]) is None


@pytest.mark.parametrize(
    ("shape", "axis_labels", "axes", "imagej"),
    [
        ((3, 8, 9), None, "ZYX", True),  # Fiji shows a z-stack, not channels
        ((2, 3, 8, 9), ("-4", "-3", "-2", "-1"), "TZYX", True),  # napari's default labels
        ((2, 3, 8, 9), ("t", "c", "y", "x"), "TCYX", True),  # the layer's own letters
        ((2, 2, 2, 2, 8, 9), None, "VWTZYX", False),  # more plane axes than ImageJ holds
    ],
)
def test_writer_names_the_axes(tmp_path, shape, axis_labels, axes, imagej):
    import tifffile

    labels = np.arange(np.prod(shape), dtype=np.int64).reshape(shape) % 300
    meta = {} if axis_labels is None else {"axis_labels": axis_labels}
    (path,) = napari_io.write_labels(str(tmp_path / "a.tif"), labels, meta)
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == axes and tif.is_imagej == imagej
        np.testing.assert_array_equal(tif.series[0].asarray(), labels)
        assert tif.series[0].dtype == np.uint16


def test_writer_refuses_labels_a_tiff_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="do not fit"):
        napari_io.write_labels(str(tmp_path / "a.tif"), np.full((2, 2), 2**32, np.int64), {})
    with pytest.raises(ValueError, match="empty dimension"):
        napari_io.write_labels(str(tmp_path / "a.tif"), np.zeros((0, 4, 4), np.uint8), {})
    assert not list(tmp_path.iterdir())
    big = np.zeros((2, 5, 5), np.int64)
    big[1, 2, 2] = 2**32 - 1
    (path,) = napari_io.write_labels(str(tmp_path / "b.tif"), big, {})
    np.testing.assert_array_equal(napari_io.read_labels(path)[0][0], big)


def test_reader_opens_large_stacks_lazily_and_editable(tmp_path, monkeypatch):
    """Over LAZY_BYTES a stack opens at once as ChunkedLabels over the file: edits go
    to its own store (the file is never written), the rest reads from the file."""
    from napari_mobilesam.chunked_labels import ChunkedLabels

    labels = np.arange(4 * 16 * 16, dtype=np.uint16).reshape(4, 16, 16)
    (path,) = napari_io.write_labels(str(tmp_path / "big_labels.tif"), labels, {})
    before = Path(path).read_bytes()
    monkeypatch.setattr(napari_io, "LAZY_BYTES", 100)
    data = napari_io.read_labels(path)[0][0]
    assert isinstance(data, ChunkedLabels) and data.shape == labels.shape
    np.testing.assert_array_equal(np.asarray(data), labels)
    assert data.max() == labels.max()
    data[2, 3:5, 3:5] = 9000
    labels[2, 3:5, 3:5] = 9000
    np.testing.assert_array_equal(np.asarray(data), labels)
    assert data.max() == 9000 and Path(path).read_bytes() == before
    (again,) = napari_io.write_labels(str(tmp_path / "again_labels.tif"), data, {})
    np.testing.assert_array_equal(napari_io.read_labels(again)[0][0][...], labels)
    data.close()


def test_reader_keeps_single_planes_and_non_integer_stacks_as_before(tmp_path, monkeypatch):
    import tifffile

    monkeypatch.setattr(napari_io, "LAZY_BYTES", 100)
    plane = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    (path,) = napari_io.write_labels(str(tmp_path / "one_labels.tif"), plane, {})
    data = napari_io.read_labels(path)[0][0]
    assert isinstance(data, np.ndarray)  # napari holds a shown plane densely anyway
    np.testing.assert_array_equal(data, plane)
    floats = np.linspace(0, 1, 4 * 16 * 16, dtype=np.float32).reshape(4, 16, 16)
    tifffile.imwrite(tmp_path / "f_labels.tif", floats)
    ((data, _, kind),) = napari_io.read_labels(str(tmp_path / "f_labels.tif"))
    assert kind == "image" and type(data).__module__.startswith("dask")
    np.testing.assert_array_equal(data.compute(), floats)


def test_sample_data_functions():
    ((cells, _, kind),) = napari_io.sample_cells()
    assert kind == "image" and cells.shape == (512, 512) and cells.dtype == np.uint16
    assert cells.max() > 2000 > np.median(cells)  # bright cells on a dim background
    ((stack, _, _),) = napari_io.sample_cell_stack()
    assert stack.shape == (12, 256, 256)
    ((movie, meta, _),) = napari_io.sample_cell_movie()
    assert movie.shape == (20, 256, 256) and meta["name"] == "synthetic cell movie"
    ((coins, _, _),) = napari_io.sample_coins()
    assert coins.ndim == 2


def test_manifest_lists_existing_callables():
    import importlib
    from pathlib import Path

    yaml = pytest.importorskip("yaml")

    root = Path(__file__).resolve().parents[1]
    manifest = yaml.safe_load((root / "napari.yaml").read_text())
    assert (root / "src" / "napari_mobilesam" / "napari.yaml").resolve() == (
        root / "napari.yaml"
    ).resolve()
    for cmd in manifest["contributions"]["commands"]:
        module, _, attr = cmd["python_name"].partition(":")
        if "_widgets" in module:
            continue  # imports napari; checked by the widget tests and npe2 validate
        assert callable(getattr(importlib.import_module(module), attr)), cmd["id"]
