"""linking.track_accuracy: the fraction of correct links and division recall."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_mobilesam import synthetic
from napari_mobilesam.linking import link_stack, track_accuracy

from .linking_support import per_plane_ids


@pytest.fixture(scope="module")
def series():
    return synthetic.cell_time_series(8, (96, 96), seed=3, coverage=0.2, divisions=2)


def _links(sample) -> int:
    """Continuation links plus one link per daughter, counted from the truth directly."""
    lab = sample.labels
    n = sum(
        len(set(np.unique(lab[t])) & set(np.unique(lab[t + 1])) - {0}) for t in range(len(lab) - 1)
    )
    return n + sum(1 for p in sample.parents.values() if p)


def test_the_truth_scores_one(series):
    res = track_accuracy(series.labels, series.parents, series.labels, series.parents)
    assert res["divisions"] == len(series.divisions) > 0
    assert res["links"] == _links(series)
    assert res["link_accuracy"] == res["division_recall"] == res["detection_recall"] == 1.0


@pytest.mark.parametrize("axis", ["t", "zt"])
def test_linked_ground_truth_scores_one(axis):
    if axis == "t":
        s = synthetic.cell_time_series(seed=1)
    else:
        s = synthetic.cell_time_series(8, (12, 128, 128), seed=1, coverage=0.08)
    linked, table = link_stack(per_plane_ids(s.labels, 1), axis)
    res = track_accuracy(linked, table.parents, s.labels, s.parents)
    assert res["link_accuracy"] == 1.0 and res["division_recall"] == 1.0


def test_a_swap_of_two_cells_costs_four_links(series):
    lab = series.labels.copy()
    t = 3
    a, b = [int(i) for i in np.unique(lab[t]) if i and (lab[t + 1] == i).any()
            and (lab[t - 1] == i).any()][:2]  # fmt: skip
    frame = lab[t].copy()
    frame[lab[t] == a], frame[lab[t] == b] = b, a
    lab[t] = frame
    res = track_accuracy(lab, series.parents, series.labels, series.parents)
    assert res["links_correct"] == res["links"] - 4
    assert res["detection_recall"] == 1.0


def test_a_missed_section_costs_the_links_through_it(series):
    lab = series.labels.copy()
    t = 2
    cell = next(int(i) for i in np.unique(lab[t]) if i and (lab[t - 1] == i).any()
                and (lab[t + 1] == i).any())  # fmt: skip
    lab[t][lab[t] == cell] = 0
    res = track_accuracy(lab, series.parents, series.labels, series.parents)
    assert res["links_correct"] == res["links"] - 2
    assert res["sections_matched"] == res["sections"] - 1


def test_a_lost_lineage_loses_every_division(series):
    res = track_accuracy(series.labels, {}, series.labels, series.parents)
    assert res["divisions_found"] == 0 and res["division_recall"] == 0.0
    assert res["links_correct"] == res["links"] - 2 * res["divisions"]
    # one daughter with the wrong parent: that division is not recalled
    child = next(c for c, p in series.parents.items() if p)
    wrong = {**series.parents, child: 999}
    res = track_accuracy(series.labels, wrong, series.labels, series.parents)
    assert res["divisions_found"] == res["divisions"] - 1


def test_objects_below_the_iou_do_not_match(series):
    shrunk = series.labels.copy()
    shrunk[:, :, 1::2] = 0  # every object keeps about half its pixels: IoU about 0.5
    res = track_accuracy(shrunk, series.parents, series.labels, series.parents, min_iou=0.7)
    assert res["sections_matched"] == 0 and res["links_correct"] == 0
    res = track_accuracy(shrunk, series.parents, series.labels, series.parents, min_iou=0.3)
    assert res["detection_recall"] == 1.0


def test_a_single_frame_has_no_links():
    frame = np.zeros((1, 8, 8), np.uint16)
    frame[0, 2:4, 2:4] = 1
    res = track_accuracy(frame, {}, frame, {})
    assert res["links"] == 0 and math.isnan(res["link_accuracy"])
    assert math.isnan(res["division_recall"]) and res["detection_recall"] == 1.0


@pytest.mark.parametrize(
    ("labels", "truth", "kwargs", "error", "match"),
    [
        (np.zeros((2, 4, 4), np.int32), np.zeros((2, 4, 5), np.int32), {}, ValueError,
         "differ in shape"),
        (np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), np.int32), {}, TypeError,
         "labels must be an integer array"),
        (np.zeros((2, 4, 4), np.int32), np.zeros((2, 4, 4), bool), {}, TypeError,
         "truth must be an integer array"),
        (np.zeros((4, 4), np.int32), np.zeros((4, 4), np.int32), {}, ValueError,
         r"\(T, Y, X\) or \(T, Z, Y, X\)"),
        (np.zeros((2, 4, 4), np.int32), np.zeros((2, 4, 4), np.int32), {"min_iou": 0},
         ValueError, "min_iou must lie in"),
    ],
)  # fmt: skip
def test_bad_input_is_named(labels, truth, kwargs, error, match):
    with pytest.raises(error, match=match):
        track_accuracy(labels, {}, truth, {}, **kwargs)
