"""Linking: every error the package raises, `min_planes_lut`, and the linking benchmark."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mobilesam.linking import Linker, check_labels, id_mapping, link_stack

from .linking_support import paint

# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("labels", "exc", "match"),
    [
        (np.zeros((4, 4), np.float32), TypeError, "labels must be an integer label image"),
        (np.zeros((4, 4), bool), TypeError, "dtype bool"),
        (np.full((4, 4), -1, np.int16), ValueError, r"0\.\.4294967295"),
        (np.full((4, 4), 2**33, np.int64), ValueError, "uint32"),
        (np.zeros(4, np.uint8), ValueError, r"2D or 3D label image, got shape \(4,\)"),
    ],
)
def test_bad_labels(labels, exc, match):
    with pytest.raises(exc, match=match):
        Linker("t").push(labels)
    with pytest.raises(exc, match=match.replace("labels", "arr")):
        check_labels(labels, "arr")


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"axis": "y"}, ValueError, r"axis must be one of \('z', 't', 'zt'\), got 'y'"),
        ({"min_iou": 0}, ValueError, r"min_iou must lie in \(0, 1\], got 0"),
        ({"min_iou": 1.5}, ValueError, "min_iou must lie in"),
        ({"min_iou": "0.5"}, TypeError, "min_iou must be a number"),
        ({"min_cover_z": 0}, ValueError, r"min_cover_z must lie in \(0, 1\], got 0"),
        ({"min_cover_t": "x"}, TypeError, r"min_cover_t must be a number in \(0, 1\] or None"),
        ({"max_gap": -1}, ValueError, "max_gap must be a whole number >= 0"),
        ({"max_gap": 1.5}, ValueError, "max_gap"),
        ({"division_share": 0.6}, ValueError, r"division_share must lie in \(0, 0.5\]"),
        ({"axis": "zt"}, ValueError, "n_z .* must be an int >= 1, got None"),
        ({"axis": "z", "n_z": 3}, ValueError, "n_z is only for axis='zt'"),
    ],
)
def test_bad_linker_parameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Linker(**kwargs)


def test_plane_shape_mismatch():
    linker = Linker("z")
    linker.push(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"plane 1 has shape \(8, 9\).*first plane had \(8, 8\)"):
        linker.push(np.zeros((8, 9), np.uint8))


def test_zt_takes_2d_planes_only():
    with pytest.raises(ValueError, match=r"labels must be a 2D label image"):
        Linker("zt", n_z=2).push(np.zeros((2, 8, 8), np.uint8))


def test_bad_scores():
    plane = paint((16, 16), [(1, (8, 8), 3)])
    with pytest.raises(TypeError, match="scores must be a dict"):
        Linker("z").push(plane, [0.9])
    with pytest.raises(ValueError, match="scores names label 2, which is not in the plane"):
        Linker("z").push(plane, {2: 0.9})


def test_push_after_finish_and_incomplete_time_point():
    linker = Linker("z")
    linker.finish()
    with pytest.raises(RuntimeError, match="finished"):
        linker.push(np.zeros((4, 4), np.uint8))
    linker = Linker("zt", n_z=3)
    linker.push(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="ended after 1 of the n_z=3 planes"):
        linker.finish()


def test_link_stack_errors():
    labels = np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(ValueError, match=r"\(planes, Y, X\) stack for axis='z', got shape"):
        link_stack(labels[0], "z")
    with pytest.raises(ValueError, match=r"\(T, Z, Y, X\) stack for axis='zt'"):
        link_stack(labels, "zt")
    with pytest.raises(ValueError, match=r"out has shape \(2, 4, 5\)"):
        link_stack(labels, "z", out=np.zeros((2, 4, 5), np.uint32))
    with pytest.raises(ValueError, match="scores has 1 entries but labels has 2 planes"):
        link_stack(labels, "z", scores=[None])
    with pytest.raises(ValueError, match=r"scores\[0\] has 1 entries but a time point has 2"):
        link_stack(labels[None], "zt", scores=[[None]])


def test_id_mapping_errors():
    a = paint((10, 10), [(1, (5, 5), 3)])
    with pytest.raises(ValueError, match=r"before has shape \(10, 10\) but after has"):
        id_mapping(a, a[:5])
    with pytest.raises(ValueError, match="same foreground"):
        id_mapping(a, np.zeros_like(a))
    split = a.copy()
    split[:5][split[:5] > 0] = 2
    with pytest.raises(ValueError, match="an object has two ids"):
        id_mapping(a, split)


def test_too_many_objects_for_uint32():
    linker = Linker("z")
    linker._main.next_id = 2**32 - 1  # as if 4 billion objects had been seen
    with pytest.raises(OverflowError, match="2\\*\\*32 - 1 objects"):
        linker.push(paint((16, 16), [(1, (4, 4), 2), (2, (12, 12), 2)]))


def test_bench_linking_runs(tmp_path, capsys):
    from benchmarks import bench_linking

    result = bench_linking.run(stacks=(3, 6), size=32, cells=4, baseline_max=3)
    ours3, base3, ours6 = result["rows"]
    assert (ours3["kind"], base3["kind"], ours6["kind"]) == ("ours", "baseline", "ours")
    assert ours3["checksum"] == base3["checksum"] and ours3["rows"] == base3["rows"]
    assert ours6["planes"] == 6 and ours6["planes_per_s"] > 0 and ours6["peak_rss_mb"] > 0
    assert "3 -> 6 planes: peak RSS" in bench_linking.report(result)
    out = tmp_path / "r.json"
    argv = ["--stacks", "2", "--size", "24", "--cells", "3", "--axis", "t", "--baseline-max", "0"]
    argv += ["--json", str(out)]
    assert bench_linking.main(argv) == 0
    assert "linking (t)" in capsys.readouterr().out and out.exists()


def test_min_planes_lut_keeps_objects_in_enough_planes_in_order():
    from napari_mobilesam.linking import min_planes_lut

    lut = min_planes_lut(np.array([9, 3, 1, 5, 2, 3]), 3)  # seen[0], background, ignored
    assert lut.dtype == np.uint32 and lut.tolist() == [0, 1, 0, 2, 0, 3]
    assert min_planes_lut(np.array([0, 1, 1]), 1).tolist() == [0, 1, 2]
    assert min_planes_lut(np.array([0]), 2).tolist() == [0]
