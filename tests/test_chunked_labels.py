"""Chunked labels on disk: reading and writing regions, the running largest id, commits,
undo and merges that give what the same edits give on a numpy array, saving plane by
plane, and the clean-up of the temporary folder."""

from __future__ import annotations

import gc
import subprocess
import sys

import numpy as np
import pytest

from napari_mobilesam.chunked_labels import (
    THRESHOLD_ENV,
    ChunkedLabels,
    LabelPlane,
    chunked_threshold,
    label_plane,
    new_labels,
    remove_stale,
    use_chunked,
)
from napari_mobilesam.interactive import LabelEditor, add_objects
from napari_mobilesam.napari_io import read_labels, write_labels


@pytest.fixture
def labels(tmp_path):
    out = ChunkedLabels((3, 50, 70), chunk=16, folder=tmp_path)
    yield out
    out.close()


def test_threshold_from_the_environment(monkeypatch):
    monkeypatch.delenv(THRESHOLD_ENV, raising=False)
    assert chunked_threshold() == 1024 * 2**20
    monkeypatch.setenv(THRESHOLD_ENV, "0.5")
    assert chunked_threshold() == 2**19
    monkeypatch.setenv(THRESHOLD_ENV, "OFF")
    assert chunked_threshold() is None
    assert not use_chunked((100, 8192, 8192))
    for bad in ("-1", "nan", "lots"):
        monkeypatch.setenv(THRESHOLD_ENV, bad)
        with pytest.raises(ValueError, match=THRESHOLD_ENV):
            chunked_threshold()


def test_stacks_over_the_threshold_are_chunked_single_planes_never(tmp_path):
    assert use_chunked((2, 64, 64), threshold=1000)  # 32 KiB of uint32
    assert not use_chunked((2, 64, 64), threshold=40_000)
    assert not use_chunked((2, 64, 64), threshold=None)
    assert not use_chunked((64, 64), threshold=0)  # one plane: napari holds it anyway
    assert not use_chunked((1, 1, 64, 64), threshold=0)
    assert use_chunked((2, 64, 64), np.uint8, threshold=8000)
    assert not use_chunked((2, 64, 64), np.uint8, threshold=9000)
    dense = new_labels((2, 64, 64), threshold=40_000)
    assert isinstance(dense, np.ndarray) and dense.dtype == np.uint32 and not dense.any()
    chunked = new_labels((2, 64, 64), threshold=0)
    assert isinstance(chunked, ChunkedLabels)
    assert chunked.shape == (2, 64, 64) and chunked.dtype == np.uint32
    assert chunked.max() == 0
    chunked.close()


def test_reads_and_writes_like_numpy(labels):
    dense = np.zeros(labels.shape, np.uint32)
    assert labels.chunks == (1, 16, 16) and labels.ndim == 3 and len(labels) == 3
    assert labels.size == dense.size and labels.nbytes == dense.nbytes
    rng = np.random.default_rng(0)
    edits = [
        (1, slice(3, 40), slice(10, 69)),  # a region
        (-1, 5, slice(None)),  # a row, from the end
        (Ellipsis, 0),  # a column through every plane
        (2,),  # a whole plane
    ]
    for key in edits:
        value = rng.integers(0, 1000, dense[key].shape, dtype=np.uint32)
        labels[key] = value
        dense[key] = value
        np.testing.assert_array_equal(labels[key], dense[key])
    # fancy indexing (napari's brush), a boolean mask, a scalar over everything
    where = (np.array([0, 1, 2]), np.array([0, 49, 20]), np.array([69, 0, 33]))
    labels[where] = np.array([7, 8, 9], np.uint32)
    dense[where] = [7, 8, 9]
    np.testing.assert_array_equal(labels[where], [7, 8, 9])
    mask = dense > 900
    labels[mask] = 1
    dense[mask] = 1
    np.testing.assert_array_equal(np.asarray(labels), dense)
    assert np.max(labels) == dense.max() and np.min(labels) == dense.min()
    np.testing.assert_array_equal(np.max(labels, axis=0), dense.max(axis=0))
    np.testing.assert_array_equal(labels.min(axis=(1, 2)), dense.min(axis=(1, 2)))
    labels[...] = 0
    assert labels.max() == 0 and not np.asarray(labels).any()
    assert "ChunkedLabels(shape=(3, 50, 70)" in repr(labels)


@pytest.mark.parametrize("kind", ["numpy", "zarr"])
def test_from_array_reads_the_source_and_copies_only_written_chunks(tmp_path, kind):
    """Edits give what numpy gives; the source is never written; only chunks written
    (or read together with written ones) are copied into the store."""
    import zarr

    rng = np.random.default_rng(1)
    dense = rng.integers(0, 50, (3, 50, 70)).astype(np.uint16)
    original = dense.copy()
    if kind == "numpy":
        source = dense.copy()
    else:
        source = zarr.create_array(str(tmp_path / "src.zarr"), shape=dense.shape,
                                   chunks=(1, 20, 20), dtype=dense.dtype)  # fmt: skip
        source[...] = dense
    labels = ChunkedLabels.from_array(source, chunk=16, folder=tmp_path / "store")
    assert labels.dtype == np.uint16 and labels.shape == dense.shape

    def stored() -> int:
        return sum(1 for p in labels.path.rglob("c/*/*/*") if p.is_file())

    np.testing.assert_array_equal(labels[1, 5:30], dense[1, 5:30])
    assert labels.max() == dense.max() and labels.min() == dense.min() and stored() == 0
    labels[1, 3:5, 3:5] = 77  # one chunk
    dense[1, 3:5, 3:5] = 77
    assert stored() == 1 and labels.max() == 77
    np.testing.assert_array_equal(labels[1, :16, :16], dense[1, :16, :16])
    np.testing.assert_array_equal(labels[2], dense[2])  # untouched plane: from the source
    assert stored() == 1
    where = (np.array([0, 2]), np.array([49, 0]), np.array([0, 69]))  # napari's brush
    labels[where] = np.array([90, 91], np.uint16)
    dense[where] = [90, 91]
    twin = labels.__deepcopy__({})
    mask = dense == 3  # a boolean mask: every chunk
    labels[mask] = 0
    dense[mask] = 0
    np.testing.assert_array_equal(np.asarray(labels), dense)
    assert labels.max() == 91 and labels._source is None  # all copied: source let go
    twin_dense = dense.copy()
    twin_dense[mask] = 3
    np.testing.assert_array_equal(np.asarray(twin), twin_dense)  # the copy kept its source
    np.testing.assert_array_equal(np.asarray(source[...]), original)  # never written
    labels.close()
    twin.close()


def test_largest_id_follows_every_write(labels):
    labels[1, 10:12, 10:12] = 40
    labels[2, 45, 60] = 12
    assert labels.max() == 40
    assert labels.plane((2,)).max() == 12 and labels.plane((0,)).max() == 0
    labels[1, 10:12, 10:12] = 0  # undone: the largest id goes down again
    assert labels.max() == 12 and np.max(labels) == 12
    labels[(np.array([0]), np.array([3]), np.array([4]))] = 99
    assert labels.max() == 99 and labels.min() == 0
    labels[0] = 5
    assert labels.min() == 0 and labels.plane((0,)).max() == 99 - 94
    assert isinstance(labels.max(), np.uint32)


def test_plane_reads_and_writes_its_own_plane(labels):
    plane = labels.plane((1,))
    assert isinstance(plane, LabelPlane) and plane.shape == (50, 70) and plane.ndim == 2
    plane[2:5, 3:9] = 6
    plane[7, 8] = 2
    assert plane[2, 3] == 6 and labels[1, 7, 8] == 2 and not labels[0].any()
    np.testing.assert_array_equal(np.asarray(plane), labels[1])
    assert np.max(plane) == 6 and plane.dtype == np.uint32
    np.testing.assert_array_equal(plane.max(axis=0), labels[1].max(axis=0))
    assert label_plane(labels, (1,)).index == (1,)
    with pytest.raises(IndexError, match=r"plane \(3,\) is not a plane"):
        labels.plane((3,))
    with pytest.raises(IndexError, match="is not a plane"):
        labels.plane(())


def test_label_plane_of_each_kind(labels):
    dense = np.zeros((2, 4, 4), np.uint16)
    view = label_plane(dense, (1,))
    view[0, 0] = 3
    assert dense[1, 0, 0] == 3
    da = pytest.importorskip("dask.array")
    with pytest.raises(TypeError, match="cannot be written in place"):
        label_plane(da.zeros((2, 4, 4), dtype=np.uint16), (0,))


def test_a_copy_has_its_own_folder(labels):
    import copy

    labels[1, 5:30, 7:50] = 3
    labels[2, 40, 60] = 8
    twin = copy.deepcopy(labels)  # napari's Duplicate layer
    assert twin.path != labels.path and twin.chunks == labels.chunks
    np.testing.assert_array_equal(np.asarray(twin), np.asarray(labels))
    assert twin.max() == 8
    twin[2, 40, 60] = 0
    assert twin.max() == 3 and labels.max() == 8  # independent
    labels.close()
    np.testing.assert_array_equal(twin[1, 5:30, 7:50], 3)  # its chunks are its own
    shallow = copy.copy(twin)
    assert shallow.path != twin.path and shallow.max() == 3
    for out in (twin, shallow):
        out.close()


def test_refuses_what_is_not_a_label_array(tmp_path):
    with pytest.raises(TypeError, match="integer dtype"):
        ChunkedLabels((4, 4), np.float32, folder=tmp_path)
    with pytest.raises(ValueError, match="no empty axis"):
        ChunkedLabels((0, 4), folder=tmp_path)
    with pytest.raises(ValueError, match="no empty axis"):
        ChunkedLabels((4,), folder=tmp_path)


def test_folder_removed_on_close_on_collection_and_after_a_crash(tmp_path):
    a = ChunkedLabels((2, 8, 8), folder=tmp_path)
    a[0, 1, 1] = 3
    assert a.path.is_dir() and a.path.parent == tmp_path
    a.close()
    assert a.closed and not a.path.exists()
    for use in (lambda: a[0], lambda: a.__setitem__(0, 1), a.max):
        with pytest.raises(ValueError, match="closed"):
            use()
    b = ChunkedLabels((2, 8, 8), folder=tmp_path)
    path = b.path
    del b
    gc.collect()
    assert not path.exists()
    # a process that dies without cleaning up leaves its folder; the next array made in
    # the same folder removes it, and never a folder of a process that runs
    code = (
        "import os, sys; from napari_mobilesam.chunked_labels import ChunkedLabels; "
        f"c = ChunkedLabels((2, 8, 8), folder={str(tmp_path)!r}); c[0, 0, 0] = 1; "
        "print(c.path, flush=True); os._exit(0)"
    )
    left = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    stale = tmp_path / left.stdout.strip().split("/")[-1]
    assert stale.is_dir()
    mine = ChunkedLabels((2, 8, 8), folder=tmp_path)
    assert not stale.exists() and mine.path.is_dir()
    assert remove_stale(tmp_path) == [] and mine.path.is_dir()
    mine.close()


def _masks(rng, shape, n):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = []
    for _ in range(n):
        r, c, rad = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(3, 12)
        out.append((yy - r) ** 2 + (xx - c) ** 2 <= rad**2)
    return out


@pytest.mark.parametrize("overwrite", [False, True])
def test_commit_and_undo_give_what_numpy_gives(labels, overwrite):
    rng = np.random.default_rng(1)
    dense = np.zeros(labels.shape, np.uint32)
    chunked_editor, dense_editor = LabelEditor((50, 70)), LabelEditor((50, 70))
    for step in range(8):
        plane = (step % 3,)
        masks = _masks(rng, (50, 70), 1 + step % 2)
        ids = [int(dense.max()) + 1 + k for k in range(len(masks))]
        try:
            expected = dense_editor.commit(dense[plane], masks, label_ids=ids, overwrite=overwrite)
        except ValueError:
            with pytest.raises(ValueError):
                chunked_editor.commit(labels.plane(plane), masks, label_ids=ids)
            continue
        got = chunked_editor.commit(
            label_plane(labels, plane), masks, label_ids=ids, overwrite=overwrite
        )
        assert got == expected
        np.testing.assert_array_equal(np.asarray(labels), dense)
    while dense_editor.can_undo:
        assert chunked_editor.undo() == dense_editor.undo()
        np.testing.assert_array_equal(np.asarray(labels), dense)
    assert not chunked_editor.can_undo and labels.max() == 0


def test_undo_into_another_plane_and_errors(labels, tmp_path):
    editor = LabelEditor((50, 70))
    mask = np.zeros((50, 70), bool)
    mask[10:20, 30:40] = True
    labels[0, 40, 60] = 6
    labels[1, 0, 0] = 9  # another plane: not counted
    assert editor.commit(labels.plane((0,)), [mask]) == [7]  # the plane's largest + 1
    labels[0, 40, 60] = 0
    labels[1, 0, 0] = 0
    assert labels.max() == 7
    other = ChunkedLabels((1, 50, 70), folder=tmp_path)
    other[0, 10:20, 30:40] = 7
    with pytest.raises(ValueError, match=r"array of shape \(50, 70\) to undo into"):
        editor.undo(other.plane((0,))[0:5])
    assert editor.undo(other.plane((0,))) == [7]
    assert other.max() == 0 and labels.max() == 7  # the copy was reverted, not the labels
    other.close()
    with pytest.raises(TypeError, match="written through indexing"):
        editor.commit([[0] * 70] * 50, [mask])


class _FullDisk:
    """A chunked plane on a disk that fills up: write ``i`` writes the top ``parts[i]``
    of its region's rows (the chunks stored before the disk filled), then raises ENOSPC;
    writes after the last part succeed."""

    def __init__(self, plane: LabelPlane, parts: list[float]):
        self.plane, self.parts = plane, list(parts)
        self.shape, self.dtype, self.max = plane.shape, plane.dtype, plane.max

    def __getitem__(self, key):
        return self.plane[key]

    def __setitem__(self, key, value):
        if self.parts:
            rows, cols = key
            n = int((rows.stop - rows.start) * self.parts.pop(0))
            self.plane[rows.start : rows.start + n, cols] = np.asarray(value)[:n]
            raise OSError(28, "No space left on device")
        self.plane[key] = value


def test_a_full_disk_during_a_commit_leaves_nothing_or_an_undo_step(labels):
    mask = np.zeros((50, 70), bool)
    mask[10:30, 20:40] = True
    labels[0, 12, 22] = 5
    editor = LabelEditor((50, 70))
    before = np.asarray(labels)
    # the write fails, putting the region back works: nothing painted, no undo step
    with pytest.raises(OSError, match="No space left on device.*nothing was painted") as err:
        editor.commit(_FullDisk(labels.plane((0,)), [0.5]), [mask])
    assert err.value.errno == 28 and not editor.can_undo and editor.next_undo() is None
    np.testing.assert_array_equal(np.asarray(labels), before)
    # putting it back fails too: partly written, and Undo reverts it once there is room
    with pytest.raises(OSError, match="partly written: Undo reverts it"):
        editor.commit(_FullDisk(labels.plane((0,)), [0.5, 0.0]), [mask])
    assert editor.can_undo and (np.asarray(labels) == 6).any()
    plane, box = editor.next_undo()  # what Undo reverts: the plane given, the masks' box
    assert plane.plane.index == (0,) and box == (slice(10, 30), slice(20, 40))
    assert editor.undo() == [6]
    np.testing.assert_array_equal(np.asarray(labels), before)
    assert labels.max() == 5


def test_add_objects_gives_what_numpy_gives(labels):
    rng = np.random.default_rng(2)
    dense = np.zeros(labels.shape, np.uint32)
    for plane in range(3):
        for k, m in enumerate(_masks(rng, (50, 70), 4)):
            dense[plane][m & (dense[plane] == 0)] = 10 * plane + k + 1
    labels[...] = dense
    objects = np.zeros(labels.shape, np.uint32)
    for plane in range(3):
        for k, m in enumerate(_masks(rng, (50, 70), 6)):
            objects[plane][m] = 5 + k + 2 * plane
    with pytest.raises(ValueError, match="do not fit"):  # nothing painted
        add_objects(labels, objects, start=2**32 - 2)
    np.testing.assert_array_equal(np.asarray(labels), dense)
    expected = add_objects(dense, objects)
    assert add_objects(labels, objects) == expected and len(expected) > 3
    np.testing.assert_array_equal(np.asarray(labels), dense)
    # one plane with a given start, and objects that are chunked themselves
    chunked_objects = ChunkedLabels(labels.shape, folder=labels.path.parent)
    chunked_objects[...] = objects[::-1]
    expected = add_objects(dense[1], objects[::-1][1], start=500)
    assert add_objects(labels.plane((1,)), chunked_objects.plane((1,)), start=500) == expected
    np.testing.assert_array_equal(np.asarray(labels), dense)
    chunked_objects.close()
    with pytest.raises(ValueError, match="labels' shape"):
        add_objects(labels, objects[0])


class _Recorded(ChunkedLabels):
    """Records the size of every read."""

    reads: list[int]

    def __getitem__(self, key):
        out = super().__getitem__(key)
        self.reads = [*getattr(self, "reads", []), out.size]
        return out


def test_saved_plane_by_plane_and_read_back(tmp_path):
    labels = _Recorded((4, 2, 30, 40), folder=tmp_path)
    rng = np.random.default_rng(3)
    dense = rng.integers(0, 70_000, labels.shape, dtype=np.uint32)
    dense[0, 0] = 0
    labels[...] = dense
    labels.reads = []
    out = write_labels(str(tmp_path / "stack_labels.tif"), labels, {"name": "stack_labels"})
    assert max(labels.reads) == 30 * 40  # never more than one plane in memory
    ((data, meta, kind),) = read_labels(out[0])
    assert kind == "labels" and meta["metadata"]["mobilesam"]["max_id"] == int(dense.max())
    np.testing.assert_array_equal(np.asarray(data), dense)
    labels.close()
