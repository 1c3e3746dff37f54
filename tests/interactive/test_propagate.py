"""PromptSession: propagating an object through a stack."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_mobilesam.interactive import (
    Prediction,
    PromptSession,
    PropagationRule,
    mask_prompt,
)
from napari_mobilesam.interactive.propagate import follow

from .common import H, W, _assert_same, _disk_mask, _disk_stack

# --------------------------------------------------------------------------- propagate


def test_mask_prompt():
    mask = _disk_mask(0)  # rows 19..41, cols 19..41: 23 px, widened by 2.3 per side
    box, point = mask_prompt(mask)
    np.testing.assert_allclose(box, [16.7, 16.7, 43.3, 43.3])
    np.testing.assert_array_equal(point, [30, 30])
    edge = np.zeros((10, 10), dtype=bool)
    edge[:4, 6:] = True  # touches the top and right borders
    box, point = mask_prompt(edge)
    np.testing.assert_allclose(box, [0, 5.6, 3.4, 9])
    np.testing.assert_array_equal(point, [1, 7])  # the border is no edge of the object


class _Scripted:
    """A ``segment`` callable for :func:`follow` returning scripted (area, score) per call."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = []

    def __call__(self, index, points_rc, box_rc, mask_input):
        self.calls.append((index, points_rc, box_rc, mask_input))
        area, score = self.script.pop(0)
        mask = np.zeros((H, W), dtype=bool)
        mask.flat[:area] = True
        low_res = np.full((1, 32, 32), float(len(self.calls)), dtype=np.float32)
        return Prediction(mask[None], np.array([score], np.float32), low_res, 0)


@pytest.fixture
def stack_session(pred):
    s = PromptSession(pred, _disk_stack(6, 4), cache_key="disks")
    s.precompute()
    return s


def test_follow_stop_rule():
    start_area = int(_disk_mask(2).sum())  # 437 px
    cases = [
        # (area, score) per plane going up from plane 2: planes 3, 4, 5
        ([(start_area, 0.9), (start_area, 0.9), (start_area, 0.9)], [3, 4, 5]),
        ([(start_area, 0.9), (start_area, 0.69)], [3]),  # score too low
        ([(start_area, 0.9), (0, 0.99)], [3]),  # empty
        ([(int(start_area * 0.29), 0.9)], []),  # shrank too much
        ([(int(start_area * 0.31), 0.9), (int(start_area * 0.31 / 0.29), 0.9)], [3]),  # grew
        ([(int(start_area * 0.31), 0.9), (start_area, 0.9)], [3, 4, 5]),  # 1 / 0.31 < 1 / 0.3
    ]
    rule = PropagationRule(direction=1)
    for script, want in cases:
        scripted = _Scripted(script + [(start_area, 0.9)] * 3)
        got = follow((2,), _disk_mask(2), 0, (6,), scripted, rule)
        assert [k[0] for k in got] == want, script
        assert all(m.dtype == np.bool_ and m.shape == (H, W) for m in got.values())
        # prompts: previous mask's box + interior point, no mask_input
        index, points_rc, box_rc, mask_input = scripted.calls[0]
        assert index == (3,)
        np.testing.assert_array_equal(points_rc, [[30, 34]])
        np.testing.assert_allclose(box_rc, [16.7, 20.7, 43.3, 47.3])
        assert mask_input is None


def test_follow_mask_input_option():
    scripted = _Scripted([(400, 0.9)] * 3)
    follow((2,), _disk_mask(2), 0, (6,), scripted, PropagationRule(1, use_mask_input=True))
    inputs = [c[3] for c in scripted.calls]
    assert inputs[0] is None
    assert inputs[1].shape == (1, 32, 32) and inputs[1][0, 0, 0] == 1  # from call 1
    assert inputs[2][0, 0, 0] == 2


def test_propagate_predicts_like_embed_and_predict(stack_session, pred):
    """Each accepted plane's mask is what embed + predict with the same prompt give."""
    kw = {"min_score": -math.inf, "min_area_ratio": 1e-6}
    stability = {}
    got = stack_session.propagate((2,), _disk_mask(2), 0, direction=1, stability=stability, **kw)
    assert got and list(got) == [(3,), (4,), (5,)][: len(got)]
    assert list(stability) == list(got)  # the accepted planes' stability scores
    other = PromptSession(pred, stack_session.image, cache_key="disks")
    prev = _disk_mask(2)
    for idx, m in got.items():
        other.embed(idx)
        box_rc, point_rc = mask_prompt(prev)
        want = other.predict(point_rc[None], None, box_rc, multimask=False)
        np.testing.assert_array_equal(m, want.mask)
        np.testing.assert_equal(stability[idx], want.stability)
        prev = m


def test_prediction_stability_is_segment_everythings():

    from napari_mobilesam.everything.stability import calculate_stability_score
    from napari_mobilesam.interactive import Prediction

    rng = np.random.default_rng(0)
    low_res = rng.normal(0, 3, (3, 16, 16)).astype(np.float32)
    for choice in range(3):
        pred = Prediction(low_res > 0, np.zeros(3, np.float32), low_res, choice)
        want = calculate_stability_score(torch.from_numpy(low_res[choice][None]), 0.0, 1.0)
        assert pred.stability == pytest.approx(float(want[0]), abs=1e-7)
    empty = Prediction(low_res > 99, np.zeros(3, np.float32), np.full_like(low_res, -5), 0)
    assert math.isnan(empty.stability)


def test_propagate_structure(stack_session, pred):
    mask = _disk_mask(2)
    kw = {"min_score": -math.inf, "min_area_ratio": 1e-6}
    stack_session.embed((2,))
    before = stack_session.predict([[30.0, 34.0]])

    def check_current_unchanged():
        assert stack_session.current == (2,)
        _assert_same(stack_session.predict([[30.0, 34.0]]), (before.masks, before.scores,
                                                              before.low_res))  # fmt: skip

    up = stack_session.propagate((2,), mask, 0, direction=1, **kw)
    check_current_unchanged()
    assert list(up) == [(3,), (4,), (5,)][: len(up)] and up
    for m in up.values():
        assert m.shape == (H, W) and m.dtype == np.bool_ and m.any()
    down = stack_session.propagate((2,), mask, 0, direction=-1, **kw)
    assert list(down) == [(1,), (0,)][: len(down)] and down
    both = stack_session.propagate((2,), mask, 0, direction=0, **kw)
    assert list(both) == list(up) + list(down)
    for k in both:
        np.testing.assert_array_equal(both[k], (up | down)[k])
    check_current_unchanged()

    assert list(stack_session.propagate((2,), mask, 0, max_planes=1, **kw)) == [(3,), (1,)]
    assert stack_session.propagate((2,), mask, 0, max_planes=0, **kw) == {}
    assert stack_session.propagate((5,), mask, 0, direction=1, **kw) == {}

    seen = []
    got = stack_session.propagate(
        (2,), mask, 0, progress=lambda idx, score: seen.append((idx, score)), **kw
    )
    assert [i for i, _ in seen] == list(got)
    assert all(isinstance(score, float) for _, score in seen)

    stops = iter([False, True, False, True])
    got = stack_session.propagate((2,), mask, 0, should_stop=lambda: next(stops), **kw)
    assert list(got) == [(3,), (1,)]
    check_current_unchanged()

    # a score nobody reaches: nothing accepted
    assert stack_session.propagate((2,), mask, 0, min_score=1.01) == {}
    check_current_unchanged()


class _FaultyStack:
    """A (Z, H, W) array whose plane ``bad`` cannot be read."""

    def __init__(self, data: np.ndarray, bad: int):
        self.data, self.bad = data, bad
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, key):
        if key[0] == self.bad:
            raise OSError(f"cannot read plane {self.bad}")
        return self.data[key]


def test_propagate_error_keeps_the_current_plane(pred):
    s = PromptSession(pred, _FaultyStack(_disk_stack(6, 4), bad=2))
    s.embed((1,))
    with pytest.raises(OSError, match="cannot read plane 2"):
        s.propagate((1,), _disk_mask(1), 0, min_score=-math.inf, min_area_ratio=1e-6)
    assert s.current == (1,)
    assert s.predict([[30.0, 32.0]]).masks.shape == (3, H, W)


def test_propagate_along_second_axis(pred):
    stack = np.stack([_disk_stack(3, 3), _disk_stack(3, 3)])  # (T=2, Z=3, H, W)
    s = PromptSession(pred, stack)
    kw = {"min_score": -math.inf, "min_area_ratio": 1e-6}
    got = s.propagate((1, 0), _disk_mask(0), 1, direction=1, **kw)
    assert list(got) == [(1, 1), (1, 2)][: len(got)] and got
    got = s.propagate((1, 0), _disk_mask(0), 0, direction=0, **kw)
    assert set(got) <= {(0, 0)}


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (((9,), "mask", 0), {}, ValueError, "plane index within"),
        (((2,), np.zeros((H, W), bool), 0), {}, ValueError, "mask is empty"),
        (((2,), "mask", 0), {"direction": 0.5}, ValueError, "direction must be 1, -1 or 0"),
        (((2,), np.ones((H, W)), 0), {}, TypeError, "mask must be a bool array"),
        (((2,), np.ones((4, 4), bool), 0), {}, ValueError, r"mask must have shape \(60, 80\)"),
        (((2,), "mask", 1), {}, ValueError, r"axis must index a plane axis in \[0, 1\)"),
        (((2,), "mask", -1), {}, ValueError, "axis must index a plane axis"),
        (((2,), "mask", 0.0), {}, TypeError, "axis must be an int"),
        (((2,), "mask", 0), {"direction": 2}, ValueError, "direction must be 1, -1 or 0"),
        (((2,), "mask", 0), {"direction": True}, ValueError, "direction must be"),
        (((2,), "mask", 0), {"min_area_ratio": 0}, ValueError, r"min_area_ratio must be in \(0"),
        (((2,), "mask", 0), {"min_area_ratio": 1.5}, ValueError, "min_area_ratio must be"),
        (((2,), "mask", 0), {"min_area_ratio": "0.5"}, TypeError, "min_area_ratio must be a"),
        (((2,), "mask", 0), {"min_score": None}, TypeError, "min_score must be a number"),
        (((2,), "mask", 0), {"min_score": math.nan}, ValueError, "min_score must be a number"),
        (((2,), "mask", 0), {"max_planes": -1}, ValueError, "max_planes must be >= 0"),
        (((2,), "mask", 0), {"max_planes": 1.5}, TypeError, "max_planes must be an int"),
    ],
)
def test_propagate_errors(pred, args, kwargs, error, match):
    s = PromptSession(pred, _disk_stack(6, 4))
    args = tuple(_disk_mask(2) if isinstance(a, str) else a for a in args)
    with pytest.raises(error, match=match):
        s.propagate(*args, **kwargs)
    assert s.current is None  # bad input is rejected before any work


def test_propagate_needs_a_plane_axis(pred, image2d):
    s = PromptSession(pred, image2d)
    with pytest.raises(ValueError, match=r"axis must index a plane axis in \[0, 0\)"):
        s.propagate((), np.ones((H, W), bool), 0)
