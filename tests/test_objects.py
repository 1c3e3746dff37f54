"""The object table and its edits (interactive.objects), without any GUI."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from napari_mobilesam.interactive.objects import (
    apply_scores,
    concat_tables,
    delete_objects,
    edit_indices,
    empty_table,
    features_from,
    merge_objects,
    object_table,
    plane_table,
    record_scores,
    scores_from,
    table_csv,
)


def _plane():
    labels = np.zeros((40, 50), np.uint32)
    labels[5:10, 20:30] = 4  # 5 x 10 rectangle
    labels[disk((25, 12), 6, shape=labels.shape)] = 2
    return labels


def test_plane_table_geometry_and_intensity():
    labels = _plane()
    image = np.where(labels == 4, 100.0, 10.0)
    image[7, 25] = 500.0
    t = plane_table(labels, image)
    assert list(t["id"]) == [2, 4]
    assert "plane_0" not in t
    row = 1
    assert t["area"][row] == 50
    box = [t[k][row] for k in ("bbox_min_row", "bbox_min_col", "bbox_max_row", "bbox_max_col")]
    assert box == [5, 20, 10, 30]
    assert (t["centroid_row"][row], t["centroid_col"][row]) == (7.0, 24.5)
    assert t["max_intensity"][row] == 500.0
    assert t["mean_intensity"][row] == pytest.approx((49 * 100 + 500) / 50)
    assert t["mean_intensity"][0] == 10.0
    assert np.isnan(t["predicted_iou"]).all() and np.isnan(t["stability_score"]).all()
    assert all(len(c) == 2 for c in t.values())


def test_plane_table_channels_scores_and_empty():
    labels = _plane()
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 1] = 7
    rgb[labels == 2, 2] = 200
    t = plane_table(labels, rgb, plane=(3,), scores={((3,), 4): (0.91, 0.97)})
    assert list(t["plane_0"]) == [3, 3]
    assert t["mean_intensity_2"].tolist() == [200.0, 0.0]
    assert t["max_intensity_1"].tolist() == [7.0, 7.0]
    assert np.isnan(t["predicted_iou"][0]) and t["predicted_iou"][1] == 0.91
    assert t["stability_score"][1] == 0.97
    empty = plane_table(np.zeros((4, 4), np.uint8), np.zeros((4, 4, 2)), plane=(1, 2))
    assert list(empty) == list(empty_table(2, 2))
    assert all(len(c) == 0 for c in empty.values())
    assert list(plane_table(labels)) == list(empty_table(0, None))


def test_object_table_stack_one_row_per_id_and_plane():
    stack = np.zeros((3, 40, 50), np.uint16)
    stack[0] = _plane()
    stack[2, 30:35, 30:40] = 4  # the same id on another plane (propagated)
    t = object_table(stack, stack.astype(np.float32))
    assert list(zip(t["plane_0"], t["id"], strict=True)) == [(0, 2), (0, 4), (2, 4)]
    assert list(t["area"]) == [int((stack[0] == 2).sum()), 50, 50]
    assert list(t["max_intensity"]) == [2.0, 4.0, 4.0]
    assert object_table(np.zeros((2, 3, 5, 5), np.int32))["plane_1"].dtype == np.int64


def test_object_table_lazy_image_planes():
    da = pytest.importorskip("dask.array")
    stack = np.zeros((2, 20, 20), np.uint32)
    stack[1, 2:6, 2:6] = 9
    image = da.from_array(np.ones((2, 20, 20, 2)), chunks=(1, 20, 20, 2))
    t = object_table(da.from_array(stack, chunks=(1, 20, 20)), image)
    assert list(t["id"]) == [9] and list(t["plane_0"]) == [1]
    assert t["mean_intensity_1"].tolist() == [1.0]


@pytest.mark.parametrize(
    "labels, image, error, match",
    [
        ([[1, 2], [3, 4]], None, TypeError, "must be an array"),
        (np.zeros((4, 4), np.float32), None, ValueError, "integer dtype"),
        (np.zeros(4, np.uint8), None, ValueError, "at least 2 axes"),
        (np.zeros((4, 4), np.uint8), np.zeros((4, 5)), ValueError, "labels' shape"),
        (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 2, 1)), ValueError, "labels' shape"),
    ],
)
def test_object_table_rejects(labels, image, error, match):
    with pytest.raises(error, match=match):
        object_table(labels, image)


def test_plane_table_rejects_a_stack():
    with pytest.raises(ValueError, match="one \\(H, W\\) plane"):
        plane_table(np.zeros((2, 4, 4), np.uint8))


def test_concat_tables():
    a = plane_table(_plane())
    both = concat_tables([a, a])
    assert list(both["id"]) == [2, 4, 2, 4]
    with pytest.raises(ValueError, match="tables is empty"):
        concat_tables([])
    with pytest.raises(ValueError, match="same columns"):
        concat_tables([a, empty_table(1)])


def test_scores_round_trip_through_features():
    f = record_scores({}, [3, 1], [0.5, 0.9], [0.8, 0.95], plane=(2,))
    assert list(f) == ["index", "plane_0", "predicted_iou", "stability_score"]
    assert list(f["index"]) == [1, 3]
    f = record_scores(f, [1], [0.7], [0.6], plane=(2,))  # replaces
    f = record_scores(f, [1], [0.4], [0.3], plane=(0,))
    assert scores_from(f, 1) == {((0,), 1): (0.4, 0.3), ((2,), 1): (0.7, 0.6),
                                 ((2,), 3): (0.5, 0.8)}  # fmt: skip
    f = record_scores(f, [5], [0.2], [0.1], plane=(2,), replace_plane=True)
    assert scores_from(f, 1) == {((0,), 1): (0.4, 0.3), ((2,), 5): (0.2, 0.1)}
    # features of a table: NaN scores are no scores; tables without the columns none
    t = plane_table(_plane(), scores={((), 2): (0.9, 0.99)})
    feats = features_from(t)
    assert next(iter(feats)) == "index" and "id" not in feats
    assert scores_from(feats) == {((), 2): (0.9, 0.99)}
    assert scores_from({"index": [1]}) == {} and scores_from(f, 2) == {}
    with pytest.raises(ValueError, match="one value per object"):
        record_scores({}, [1, 2], [0.5], [0.5])


def test_delete_and_merge_change_only_the_rows_objects():
    stack = np.zeros((2, 40, 50), np.uint32)
    stack[0] = _plane()
    stack[1] = _plane()
    stack[1, 30:35, 30:40] = 7
    before = stack.copy()
    assert delete_objects(stack, [((1,), 4)]) == 50
    assert not (stack[1] == 4).any() and (stack[0] == before[0]).all()
    assert (stack[1][before[1] != 4] == before[1][before[1] != 4]).all()
    assert merge_objects(stack, [((1,), 7), ((1,), 2)]) == 2
    assert (stack[1][before[1] == 7] == 2).all() and (stack[0] == before[0]).all()
    # merging across planes relabels each row on its own plane only
    assert merge_objects(stack, [((0,), 4), ((1,), 2)]) == 2
    assert (stack[0][before[0] == 4] == 2).all()
    indices, value = edit_indices(stack, [((0,), 99)], merge=False)
    assert value == 0 and all(len(i) == 0 for i in indices) and len(indices) == 3


def test_edit_indices_2d_gives_napari_indices():
    labels = _plane()
    indices, value = edit_indices(labels, [((), 4), ((), 2)], merge=True)
    assert value == 2 and len(indices) == 2 and (labels[indices] == 4).all()
    assert len(indices[0]) == 50


@pytest.mark.parametrize(
    "rows, merge, match",
    [
        ([], False, "rows is empty"),
        ([((0,), 2)], False, "does not index"),
        ([((5,), 2)], False, "does not index"),
        ([((0,), 0)], False, "must be >= 1"),
        ([((0,), 2), ((1,), 2)], True, "2 or more ids"),
    ],
)
def test_edit_indices_rejects(rows, merge, match):
    labels = np.zeros((2, 4, 4), np.uint32)
    if rows == [((0,), 2)]:
        labels = np.zeros((4, 4), np.uint32)  # a 2D image has no plane (0,)
    with pytest.raises(ValueError, match=match):
        edit_indices(labels, rows, merge=merge)


def test_apply_scores_and_csv():
    stack = np.zeros((2, 40, 50), np.uint32)
    stack[1] = _plane()
    t = apply_scores(object_table(stack), {((1,), 4): (0.5, 0.25), ((0,), 2): (0.9, 0.9)})
    assert np.isnan(t["predicted_iou"][0]) and t["predicted_iou"][1] == 0.5
    lines = table_csv(t, order=[1, 0]).splitlines()
    assert lines[0].split(",")[:3] == ["id", "plane_0", "area"]
    assert lines[1].split(",")[:3] == ["4", "1", "50"] and "0.5,0.25" in lines[1]
    assert ",,," not in lines[1] and lines[2].endswith(",,")  # NaN scores: empty cells
    assert len(table_csv(empty_table()).splitlines()) == 1
