"""Linking per-plane labels into 3D objects and tracks: known truth, invariants, the
table (errors: test_linking_errors.py; through z: test_linking_z.py)."""

from __future__ import annotations

import csv
import io
import tracemalloc

import numpy as np
import pytest

from napari_mobilesam import synthetic
from napari_mobilesam.linking import Linker, LinkTable, id_mapping, link_stack
from napari_mobilesam.linking.match import match_global

from .linking_support import bijection, concentric, iou_of, paint, per_plane_ids, random_stack

# ---------------------------------------------------------------- synthetic truth


def z_world():
    """12 planes: drifting, growing/shrinking, appearing, disappearing, touching objects,
    and object 3 missed in plane 5."""
    shape, planes = (96, 96), []
    for z in range(12):
        objs = [
            (1, (30, 15 + 2 * z), 8),
            (2, (30, 32 + 2 * z), 8),  # touches 1
            (4, (75, 75 - z), np.sqrt(max(0, 36 - (z - 6) ** 2)) if 3 <= z <= 9 else 0),
        ]
        if z != 5:
            objs.append((3, (72, 25), 7))
        if z <= 7:
            objs.append((5, (10, 80), 5))
        if z >= 6:
            objs.append((6, (55, 48 + z), 6))
        planes.append(paint(shape, objs))
    return np.stack(planes)


def t_world():
    """10 frames. 1 moves; 2 divides after t=3 into 7 and 8; 8 divides after t=7 into 9, 10;
    3 appears at t=2; 4 disappears after t=6; 5 is missed in frame 6; 6 moves fast."""
    shape, frames = (128, 128), []
    for t in range(10):
        objs = [(1, (20, 10 + 2 * t), 8), (6, (114, 12 + 3 * t), 10)]
        if t <= 3:
            objs.append((2, (64, 64), 10))
        else:
            objs.append((7, (64, 58 - (t - 4)), 7))
            if t <= 7:
                objs.append((8, (64, 70 + (t - 4)), 7))
            else:
                objs += [(9, (60, 74), 5), (10, (69, 74), 5)]
        if t >= 2:
            objs.append((3, (100, 100 - t), 6))
        if t <= 6:
            objs.append((4, (25, 100), 7))
        if t != 6:
            objs.append((5, (40, 40 + t), 6))
        frames.append(paint(shape, objs))
    return np.stack(frames), {7: 2, 8: 2, 9: 8, 10: 8}


def zt_world():
    """4 time points of 7 planes: moving spheres; 2 divides into 3 and 4 after t=1;
    sphere 1 is missed in plane (t=2, z=3)."""
    shape, out = (64, 64), np.zeros((4, 7, 64, 64), dtype=np.uint32)
    for t in range(4):
        for z in range(7):

            def r(big, z=z):  # the sphere's radius in plane z (flattened 2x in z)
                return np.sqrt(max(0.0, big**2 - 4 * (z - 3) ** 2))

            objs = [] if (t, z) == (2, 3) else [(1, (16, 12 + 2 * t), r(8))]
            if t <= 1:
                objs.append((2, (44, 40), r(11)))
            else:
                objs += [(3, (44, 36 - t), r(8)), (4, (44, 44 + t), r(8))]
            out[t, z] = paint(shape, objs)
    return out, {3: 2, 4: 2}


# ---------------------------------------------------------------- recovering the truth


def test_z_recovers_3d_objects_exactly():
    truth = z_world()
    linked, table = link_stack(per_plane_ids(truth), "z")
    ids = bijection(truth, linked)
    assert sorted(ids.values()) == list(range(1, 7))  # ids 1..N, no gaps
    objs = table.objects()
    first = dict(zip(objs["id"].tolist(), objs["first"].tolist(), strict=True))
    last = dict(zip(objs["id"].tolist(), objs["last"].tolist(), strict=True))
    assert (first[ids[4]], last[ids[4]]) == (3, 9)  # appears, disappears
    assert (first[ids[6]], last[ids[6]]) == (6, 11)
    assert (first[ids[3]], last[ids[3]]) == (0, 11)  # bridged over plane 5
    assert objs["planes"][objs["id"] == ids[3]][0] == 11
    assert table.parents == {} and not objs["parent"].any()


def test_t_recovers_tracks_and_divisions_exactly():
    truth, parents = t_world()
    linked, table = link_stack(per_plane_ids(truth, seed=1), "t")
    ids = bijection(truth, linked)
    assert table.parents == {ids[c]: ids[p] for c, p in parents.items()}
    assert table.graph() == {ids[c]: [ids[p]] for c, p in sorted(parents.items())}
    objs = table.objects()
    last = dict(zip(objs["id"].tolist(), objs["last"].tolist(), strict=True))
    first = dict(zip(objs["id"].tolist(), objs["first"].tolist(), strict=True))
    assert last[ids[2]] == 3 and first[ids[7]] == first[ids[8]] == 4
    assert last[ids[8]] == 7 and first[ids[9]] == 8
    assert (first[ids[5]], last[ids[5]]) == (0, 9)  # missed in frame 6, same track


def test_zt_links_z_within_time_points_and_tracks_across():
    truth, parents = zt_world()
    linked, table = link_stack(per_plane_ids(truth, seed=2), "zt")
    ids = bijection(truth, linked)  # one id per sphere through z and t
    assert table.parents == {ids[c]: ids[p] for c, p in parents.items()}
    data = table.tracks_data()
    assert data.shape == (4 + 2 + 2 + 2, 5)  # (track_id, t, z, y, x)
    one = data[data[:, 0] == ids[1]]
    np.testing.assert_allclose(one[:, 1], [0, 1, 2, 3])
    np.testing.assert_allclose(one[[0, 1, 3], 2], 3.0)  # centroid z of the sphere
    np.testing.assert_allclose(one[:, 3], 16.0)
    voxels = table.area[table.id == ids[2]]
    assert voxels.tolist() == [int((truth[t] == 2).sum()) for t in (0, 1)]


def test_matching_is_global_not_greedy():
    """Greedy (best pair first) would link A2-B1 (IoU 0.5) and leave A1 and B2 alone;
    the best total (0.33 + 0.33) links A1-B1 and A2-B2."""
    a, b = np.zeros((10, 40), np.uint32), np.zeros((10, 40), np.uint32)
    a[:, :10], a[:, 10:] = 1, 2
    b[:, :30], b[:, 30:] = 1, 2
    linked, table = link_stack(np.stack([a, b]), "z", min_iou=0.3)
    assert (linked[1][:, :30] == linked[0][0, 0]).all()
    assert (linked[1][:, 30:] == linked[0][0, -1]).all()
    assert table.objects()["id"].tolist() == [1, 2]
    rows, cols = match_global(np.array([1, 2, 2]), np.array([1, 1, 2]),
                              np.array([1 / 3, 0.5, 1 / 3]), 0.3)  # fmt: skip
    assert rows.tolist() == [1, 2] and cols.tolist() == [1, 2]


def test_min_iou_decides_what_is_the_same_object():
    a = paint((40, 40), [(1, (20, 15), 8)])
    b = paint((40, 40), [(1, (20, 19), 8)])  # moved 4 px
    assert 0.5 < iou_of(a, b) < 0.6
    assert link_stack(np.stack([a, b]), "z")[0][1].max() == 1
    assert link_stack(np.stack([a, b]), "z", min_iou=0.6)[0][1].max() == 2


@pytest.mark.parametrize(("missing", "max_gap", "same"),
                         [(1, 1, True), (2, 1, False), (2, 2, True), (1, 0, False)])  # fmt: skip
def test_gap_closing(missing, max_gap, same):
    planes = [paint((32, 32), [(1, (16, 16), 6)]) for _ in range(3 + missing)]
    for k in range(1, 1 + missing):
        planes[k][:] = 0
    linked, table = link_stack(np.stack(planes), "t", max_gap=max_gap)
    assert bool(linked[-1].max() == linked[0].max()) is same
    assert len(table.objects()["id"]) == (1 if same else 2)


def test_divided_parent_is_not_bridged_to_later_objects():
    """After dividing, a parent's id never returns, even if a cell reappears in its place."""
    parent = paint((48, 48), [(1, (24, 24), 10)])
    kids = paint((48, 48), [(1, (24, 18), 7), (2, (24, 30), 7)])
    back = paint((48, 48), [(1, (24, 24), 10)])
    linked, table = link_stack(np.stack([parent, kids, back]), "t")
    assert table.parents == {2: 1, 3: 1}
    assert 1 not in linked[2] and table.objects()["last"][0] == 0


def test_asymmetric_division_replaces_the_parents_own_match():
    parent = paint((48, 48), [(1, (24, 24), 10)])
    kids = paint((48, 48), [(1, (24, 22), 8.5), (2, (24, 30), 6)])
    assert iou_of(parent, kids == 1) >= 0.5  # the big child alone would continue the parent
    _, table = link_stack(np.stack([parent, kids]), "t")
    assert table.parents == {2: 1, 3: 1}
    _, no_div = link_stack(np.stack([parent, kids]), "t", divisions=False)
    assert no_div.parents == {} and no_div.objects()["last"].tolist() == [1, 1]


def test_a_neighbour_moving_into_the_vacated_space_is_no_division():
    before = paint((48, 48), [(1, (24, 20), 10)])
    after = paint((48, 48), [(1, (24, 25), 10), (2, (24, 12), 3)])  # cell moved, debris
    _, table = link_stack(np.stack([before, after]), "t")
    assert table.parents == {}
    assert table.objects()["last"].tolist() == [1, 1]


def test_z_does_not_look_for_divisions_by_default():
    parent = paint((48, 48), [(1, (24, 24), 10)])
    kids = paint((48, 48), [(1, (24, 18), 7), (2, (24, 30), 7)])
    _, table = link_stack(np.stack([parent, kids]), "z")
    assert table.parents == {}
    _, table = link_stack(np.stack([parent, kids]), "z", divisions=True)
    assert table.parents == {2: 1, 3: 1}


def test_a_cell_that_shrinks_keeps_its_track_through_containment():
    stack = concentric([10, 6, 6])
    assert iou_of(stack[0], stack[1]) < 0.5
    assert len(link_stack(stack, "t")[1].objects()["id"]) == 1
    assert len(link_stack(stack, "t", min_cover_t=None)[1].objects()["id"]) == 2


def test_motion_prediction_follows_an_accelerating_cell():
    xs = [12, 14, 18, 24, 32]  # steps of 2, 4, 6, 8 px; r = 8
    frames = np.stack([paint((40, 64), [(1, (20, x), 8)]) for x in xs])
    assert iou_of(frames[3], frames[4]) < 0.3  # where it was: no match
    linked, table = link_stack(frames, "t", min_cover_t=None)
    assert len(table.objects()["id"]) == 1 and np.array_equal(linked > 0, frames > 0)
    _, as_z = link_stack(frames, "z", min_cover_z=None)  # no motion model through z
    assert len(as_z.objects()["id"]) > 1


def test_a_neighbour_mostly_outside_the_parent_is_no_child():
    parent = paint((48, 64), [(1, (24, 24), 10)])
    after = paint((48, 64), [(1, (24, 19), 7), (2, (24, 38), 12)])  # 2 lies mostly outside
    inside = ((after == 2) & (parent > 0)).sum()
    assert inside >= 0.2 * (parent > 0).sum() and inside < 0.5 * (after == 2).sum()
    _, table = link_stack(np.stack([parent, after]), "t")
    assert table.parents == {}


# ---------------------------------------------------------------- the generator's stacks


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_generator_time_series_tracks_and_divisions_are_recovered_exactly(seed):
    sample = synthetic.cell_time_series(seed=seed)
    linked, table = link_stack(per_plane_ids(sample.labels, seed), "t")
    ids = bijection(sample.labels, linked)
    truth = {ids[c]: ids[p] for c, p in sample.parents.items() if p}
    assert truth and table.parents == truth
    assert table.graph() == {c: [p] for c, p in sorted(truth.items())}


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 17, 21, 29])
def test_generator_tzyx_series_3d_tracks_and_divisions_are_recovered_exactly(seed):
    sample = synthetic.cell_time_series(8, (12, 128, 128), seed=seed, coverage=0.08)
    linked, table = link_stack(per_plane_ids(sample.labels, seed), "zt")
    ids = bijection(sample.labels, linked)  # one id per cell through z and t
    truth = {ids[c]: ids[p] for c, p in sample.parents.items() if p}
    assert truth and table.parents == truth
    assert table.tracks_data().shape[1] == 5  # (track_id, t, z, y, x)


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("axis", ["z", "t"])
def test_invariants_on_random_stacks(seed, axis):
    labels = random_stack(seed)
    linked, table = link_stack(labels, axis, min_iou=0.3)
    assert linked.dtype == np.uint32
    assert np.array_equal(linked > 0, labels > 0)  # same foreground
    for p in range(len(labels)):  # every object keeps its mask, under one id of its own
        mapping = id_mapping(labels[p], linked[p])
        assert len(set(mapping.values())) == len(mapping)
    ids = table.objects()["id"]
    assert ids.tolist() == list(range(1, len(ids) + 1))
    assert np.all(np.diff(table.objects()["first"]) >= 0)  # numbered by first appearance
    for oid, idx, area in zip(table.id, table.index, table.area, strict=True):
        assert (linked[idx] == oid).sum() == area
    assert len(table.id) == sum(len(np.unique(p)) - 1 for p in labels)
    objs = table.objects()
    for child, parent in table.parents.items():
        assert objs["last"][parent - 1] + 1 == objs["first"][child - 1]
    assert all(n == 2 for n in np.bincount(list(table.parents.values()))[1:] if n)


def test_large_sparse_ids_and_many_objects_link_like_small_ones():
    grid = np.zeros((120, 120), np.uint32)
    for k, (r, c) in enumerate(np.ndindex(40, 40)):
        grid[3 * r : 3 * r + 2, 3 * c : 3 * c + 2] = k + 1
    big = np.where(grid > 0, grid.astype(np.uint64) * 2_000_000 + 7, 0).astype(np.uint32)
    rng = np.random.default_rng(0)
    shuffled = np.concatenate([[0], rng.permutation(1600) + 1]).astype(np.uint32)[grid]
    linked, table = link_stack(np.stack([grid, big, shuffled]), "z")
    assert np.array_equal(linked[0], linked[1]) and np.array_equal(linked[0], linked[2])
    assert len(table.objects()["id"]) == 1600


def test_push_streams_the_same_result_as_link_stack():
    truth, _ = t_world()
    labels = per_plane_ids(truth)
    whole, table = link_stack(labels, "t")
    linker = Linker("t")
    for i, plane in enumerate(labels):
        (out,) = linker.push(plane.astype(np.int64))  # any integer dtype
        assert np.array_equal(out, whole[i])  # final at once: no plane held back
    streamed = linker.finish()
    assert np.array_equal(streamed.id, table.id) and streamed.parents == table.parents


def test_zt_push_returns_a_time_point_when_complete():
    truth, _ = zt_world()
    labels = per_plane_ids(truth)
    whole, _ = link_stack(labels, "zt")
    linker, got = Linker("zt", n_z=7), []
    for t in range(4):
        for z in range(7):
            out = linker.push(labels[t, z])
            assert len(out) == (7 if z == 6 else 0)
            got += out
    assert np.array_equal(np.stack(got).reshape(whole.shape), whole)


def test_link_stack_reads_lazy_arrays_and_writes_into_out():
    da = pytest.importorskip("dask.array")
    labels = per_plane_ids(z_world())
    out = np.zeros(labels.shape, np.uint32)
    res, _ = link_stack(da.from_array(labels, chunks=(1, 96, 96)), "z", out=out)
    assert res is out and np.array_equal(out, link_stack(labels, "z")[0])


def test_memory_does_not_grow_with_the_number_of_planes():
    def peak(n):
        linker = Linker("t")
        tracemalloc.start()
        for k in range(n):
            linker.push(paint((256, 256), [(1, (60, 60 + k % 50), 20), (2, (180, 180), 30)]))
        linker.finish()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(10), peak(60)
    assert large < small * 1.15, (small, large)


def test_without_the_table_the_same_ids_and_memory_flat_in_objects_times_planes():
    truth, _ = t_world()
    labels = per_plane_ids(truth)
    whole, table = link_stack(labels, "t")
    linker = Linker("t", keep_table=False)
    for i, plane in enumerate(labels):
        (out,) = linker.push(plane)
        assert np.array_equal(out, whole[i])
    assert linker.n_objects == int(table.id.max()) == int(whole.max())
    bare = linker.finish()
    assert bare.id.size == 0 and bare.parents == table.parents and table.parents

    grid = np.zeros((240, 240), np.uint32)  # 400 objects per plane
    for k, (r, c) in enumerate(np.ndindex(20, 20)):
        grid[12 * r : 12 * r + 9, 12 * c : 12 * c + 9] = k + 1

    def peak(n, keep_table):
        linker = Linker("z", keep_table=keep_table)
        tracemalloc.start()
        for _ in range(n):
            linker.push(grid)
        linker.flush()
        linker.finish()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert linker.n_objects == 400
        return top

    assert peak(200, False) < peak(20, False) * 1.15
    assert peak(200, True) > peak(20, True) * 1.5  # the rows: the part keep_table=False saves


# ---------------------------------------------------------------- table, scores, exports


def test_scores_areas_and_centroids_in_the_table(tmp_path):
    a = paint((40, 40), [(3, (10, 10), 4), (9, (30, 30), 5)])
    b = paint((40, 40), [(1, (30, 31), 5), (2, (10, 10), 4)])
    linker = Linker("t")
    linker.push(a, {3: 0.9, 9: 0.8})
    linker.push(b, {2: 0.7})
    table = linker.finish()
    assert table.id.tolist() == [1, 1, 2, 2]
    np.testing.assert_allclose(table.predicted_iou, [0.9, 0.7, 0.8, np.nan])
    assert table.area.tolist() == [(a == 3).sum(), (b == 2).sum(), (a == 9).sum(), (b == 1).sum()]
    np.testing.assert_allclose(table.centroid[3], [30, 31])
    table.write_csv(tmp_path / "tracks.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "tracks.csv").read_text())))
    assert list(rows[0]) == ["track_id", "t", "y", "x", "area", "predicted_iou",
                             "parent_track_id", "first", "last"]  # fmt: skip
    assert rows[3]["predicted_iou"] == "" and rows[0]["predicted_iou"] == "0.9"
    assert [r["track_id"] for r in rows] == ["1", "1", "2", "2"]
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_csv_carries_the_lineage():
    truth, parents = t_world()
    linked, table = link_stack(per_plane_ids(truth), "t")
    ids = bijection(truth, linked)
    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    lineage = {int(r["track_id"]): int(r["parent_track_id"]) for r in rows}
    assert {c: p for c, p in lineage.items() if p} == {ids[c]: ids[p] for c, p in parents.items()}
    assert len(rows) == len(table.id) == len(table.tracks_data())


def test_zt_scores_are_area_weighted_over_z():
    vol = np.zeros((1, 2, 20, 20), np.uint32)
    vol[0, 0, :5, :4] = 1  # 20 px, score 0.5
    vol[0, 1, :5, :6] = 4  # 30 px, score 0.9
    _, table = link_stack(vol, "zt", scores=[[{1: 0.5}, {4: 0.9}]])
    np.testing.assert_allclose(table.predicted_iou, [(20 * 0.5 + 30 * 0.9) / 50])
    assert table.axis == "zt" and table.id_name == "track_id"


def test_empty_stack_and_empty_planes():
    table = Linker("z").finish()
    assert len(table.id) == 0 and table.tracks_data().shape == (0, 4)
    assert table.to_csv().startswith("object_id,z,y,x,")
    linked, table = link_stack(np.zeros((3, 8, 8), np.uint16), "t")
    assert not linked.any() and isinstance(table, LinkTable) and len(table.id) == 0


def test_id_mapping():
    before = paint((20, 20), [(1, (5, 5), 3), (2, (14, 14), 3)])
    after = np.where(before == 1, 7, np.where(before == 2, 3, 0)).astype(np.uint32)
    assert id_mapping(before, after) == {1: 7, 2: 3}
