"""The synthetic ground-truth generator: determinism, geometry, appearance, files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from napari_mobilesam import synthetic
from napari_mobilesam.synthetic import Appearance


def test_same_seed_same_sample_other_seed_other_sample():
    a = synthetic.cells_2d((128, 128), seed=3)
    b = synthetic.cells_2d((128, 128), seed=3)
    c = synthetic.cells_2d((128, 128), seed=4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


def test_2d_labels_are_consecutive_connected_objects_of_the_asked_size():
    s = synthetic.cells_2d((256, 256), seed=0, radius=(8, 16), elongated=0.0)
    assert s.image.shape == s.labels.shape == (256, 256)
    assert s.image.dtype == np.uint16 and s.labels.dtype == np.uint32 and s.axes == "YX"
    ids = np.unique(s.labels)
    assert np.array_equal(ids, np.arange(ids.max() + 1))  # 0..N, none missing
    areas = np.bincount(s.labels.ravel())[1:]
    for i in range(1, ids.max() + 1):
        assert ndimage.label(s.labels == i)[1] == 1  # one connected piece each
    # round cells of radius 8-16 (clipped at the border, trimmed where they touch)
    assert areas.max() <= np.pi * (16 * 1.35**0.5) ** 2 + 10
    assert np.median(areas) > np.pi * 8**2 * 0.5


def test_cells_touch_but_never_overlap():
    s = synthetic.cells_2d((256, 256), seed=1, clustered=0.9, coverage=0.45)
    # touching: some foreground pixel has a 4-neighbour of another cell
    lab = s.labels
    right = (lab[:, :-1] > 0) & (lab[:, 1:] > 0) & (lab[:, :-1] != lab[:, 1:])
    down = (lab[:-1] > 0) & (lab[1:] > 0) & (lab[:-1] != lab[1:])
    assert right.any() or down.any()


def test_cells_are_brighter_than_background_and_rims_are_dimmer():
    s = synthetic.cells_2d((256, 256), seed=2, appearance=Appearance(illumination=0.0))
    inside = s.labels > 0
    assert s.image[inside].mean() > 3 * s.image[~inside].mean()
    from skimage.segmentation import find_boundaries

    rim = find_boundaries(s.labels, mode="inner") & inside
    core = inside & ~ndimage.binary_dilation(rim, iterations=3)
    assert s.image[rim].mean() < s.image[core].mean()


def test_uint8_dim_and_noise_options():
    s8 = synthetic.cells_2d((128, 128), seed=0, dtype="uint8")
    assert s8.image.dtype == np.uint8
    dim = synthetic.cells_2d((128, 128), seed=0, appearance=Appearance(photons=20))
    bright = synthetic.cells_2d((128, 128), seed=0, appearance=Appearance(photons=2000))
    assert np.array_equal(dim.labels, bright.labels)
    assert np.median(dim.image[dim.labels > 0]) < np.median(bright.image[bright.labels > 0]) / 10


def test_radius_range_4_to_60_works():
    small = synthetic.cells_2d((256, 256), seed=0, radius=(4, 5), elongated=0.0)
    large = synthetic.cells_2d((512, 512), seed=0, radius=(55, 60), elongated=0.0)
    assert np.median(np.bincount(small.labels.ravel())[1:]) < np.pi * 6**2
    assert np.median(np.bincount(large.labels.ravel())[1:]) > np.pi * 40**2


def test_3d_cells_span_several_planes():
    s = synthetic.cells_3d((16, 96, 96), seed=0, z_radius=(3, 5))
    assert s.axes == "ZYX" and s.image.shape == s.labels.shape == (16, 96, 96)
    spans = [
        np.ptp(np.nonzero((s.labels == i).any((1, 2)))[0]) + 1 for i in range(1, s.labels.max() + 1)
    ]
    assert np.median(spans) >= 4
    for i in range(1, s.labels.max() + 1):
        assert ndimage.label(s.labels == i)[1] == 1


def test_time_series_tracks_and_divisions():
    s = synthetic.cell_time_series(12, (128, 128), seed=0, divisions=2, speed=1.0)
    assert s.axes == "TYX" and s.labels.shape == (12, 128, 128)
    assert s.divisions, "no division happened"
    for parent, children in s.divisions.items():
        assert len(children) == 2
        last = max(t for t in range(12) if (s.labels[t] == parent).any())
        first = [min(t for t in range(12) if (s.labels[t] == c).any()) for c in children]
        assert first == [last + 1, last + 1]
        # the daughters start where the mother was
        mother = s.labels[last] == parent
        for c in children:
            d = s.labels[last + 1] == c
            assert (d & mother).sum() > 0.3 * d.sum()
    # a track present in two frames moved only a little
    for tid in np.unique(s.labels[0])[1:]:
        if (s.labels[1] == tid).any():
            a, b = (s.labels[0] == tid), (s.labels[1] == tid)
            assert (a & b).sum() > 0.3 * a.sum()


@pytest.mark.parametrize("seed", [17, 21, 29])
def test_a_dividing_cell_lies_wholly_in_view(seed):
    # a mother cut by the border divided into daughters that barely overlapped its
    # visible part (IoU 0.23-0.42 with their union): no tracker can see that division
    s = synthetic.cell_time_series(8, (12, 128, 128), seed=seed, coverage=0.08)
    assert s.divisions
    for parent in s.divisions:
        last = max(t for t in range(8) if (s.labels[t] == parent).any())
        yy, xx = np.nonzero((s.labels[last] == parent).any(0))
        assert yy.min() > 0 and xx.min() > 0 and yy.max() < 127 and xx.max() < 127


def test_time_series_of_stacks():
    s = synthetic.cell_time_series(3, (8, 64, 64), seed=1, n_cells=3, divisions=0)
    assert s.axes == "TZYX" and s.image.shape == (3, 8, 64, 64)
    assert set(s.parents.values()) == {0}


@pytest.mark.parametrize("layout", ["suffix", "folders"])
def test_write_dataset_layouts(tmp_path, layout):
    pairs = synthetic.write_dataset(tmp_path, 2, seed=5, layout=layout, shape=(64, 64))
    again = synthetic.write_dataset(tmp_path / "again", 1, seed=5, layout=layout, shape=(64, 64))
    for image, labels in pairs:
        assert image.is_file() and labels.is_file()
        assert tifffile.imread(image).shape == tifffile.imread(labels).shape == (64, 64)
    if layout == "suffix":
        assert pairs[0][1].name == "cells_000_labels.tif"
    else:
        assert pairs[0][0].parent.name == "images" and pairs[0][1].parent.name == "labels"
    # the first sample does not depend on how many were asked for
    assert np.array_equal(tifffile.imread(pairs[0][0]), tifffile.imread(again[0][0]))
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_time_series_writes_tracks(tmp_path):
    ((_image, labels),) = synthetic.write_dataset(
        tmp_path, 1, kind="timeseries", n_frames=6, shape=(64, 64), n_cells=2
    )
    tracks = labels.with_name(labels.stem + "_tracks.csv").read_text().splitlines()
    assert tracks[0] == "track_id,parent_id,first_frame,last_frame"
    assert tifffile.imread(labels).shape == (6, 64, 64)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: synthetic.cells_2d((8, 8)), "shape"),
        (lambda: synthetic.cells_2d((64, 64, 3)), "shape"),
        (lambda: synthetic.cells_2d(5), "shape"),
        (lambda: synthetic.cells_2d(radius=(5, 2)), "radius"),
        (lambda: synthetic.cells_2d(radius=3), "radius"),
        (lambda: synthetic.cells_2d(coverage=2), "coverage"),
        (lambda: synthetic.cells_2d(n_cells=-1), "n_cells"),
        (lambda: synthetic.cells_2d(dtype="float32"), "dtype"),
        (lambda: synthetic.cells_2d(dtype="uint8", appearance=Appearance()), "contradicts"),
        (lambda: synthetic.cells_2d(appearance="bright"), "Appearance"),
        (lambda: synthetic.cells_3d((16, 16)), "shape"),
        (lambda: synthetic.cells_3d(z_radius=(0.1, 1)), "z_radius"),
        (lambda: synthetic.cell_time_series(0), "n_frames"),
        (lambda: synthetic.cell_time_series(divisions=-1), "divisions"),
        (lambda: synthetic.cell_time_series(speed=float("nan")), "speed"),
        (lambda: synthetic.cell_time_series(shape=(4, 4)), "shape"),
        (lambda: Appearance(photons=0), "photons"),
        (lambda: Appearance(offset=-1), "offset"),
        (lambda: Appearance(psf_sigma=-1), "psf_sigma"),
        (lambda: Appearance(rim=2), "rim"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"kind": "4d"}, "kind"), ({"layout": "flat"}, "layout"), ({"n": 0}, "n must"),
     ({"prefix": "../x"}, "prefix")],
)  # fmt: skip
def test_write_dataset_bad_arguments(tmp_path, kwargs, match):
    args = {"n": 1, **kwargs}
    n = args.pop("n")
    with pytest.raises(ValueError, match=match):
        synthetic.write_dataset(tmp_path, n, **args)


def test_mobilesam_synthetic_command(tmp_path, capsys):
    from napari_mobilesam.cli import main

    assert main(["synthetic", str(tmp_path / "a"), "-n", "2", "--size", "64", "--seed", "3"]) == 0
    assert "wrote 2" in capsys.readouterr().out
    assert tifffile.imread(tmp_path / "a" / "cells_001_labels.tif").shape == (64, 64)
    argv = ["synthetic", str(tmp_path / "b"), "-n", "1", "--kind", "3d", "--planes", "4",
            "--size", "64", "--layout", "folders"]  # fmt: skip
    assert main(argv) == 0
    assert tifffile.imread(tmp_path / "b" / "images" / "cells_000.tif").shape == (4, 64, 64)
    argv = ["synthetic", str(tmp_path / "c"), "--kind", "timeseries", "--frames", "3",
            "--size", "48", "-n", "1"]  # fmt: skip
    assert main(argv) == 0
    assert tifffile.imread(tmp_path / "c" / "cells_000.tif").shape == (3, 48, 48)
    capsys.readouterr()
    assert main(["synthetic", str(tmp_path / "d"), "--planes", "3"]) == 1
    assert "--planes is for --kind 3d" in capsys.readouterr().err
    assert main(["synthetic", str(tmp_path / "d"), "--frames", "3"]) == 1
    assert "--frames is for --kind timeseries" in capsys.readouterr().err
    assert main(["synthetic", str(tmp_path / "d"), "-n", "0"]) == 1
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())
