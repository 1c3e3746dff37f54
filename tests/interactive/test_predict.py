"""PromptSession: predicting from prompts, several objects at once, the real-size model,
threads (the GUI-free logic behind the napari prompt widget)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_mobilesam.interactive import (
    EmbeddingCache,
    ObjectPrompt,
    PromptSession,
    predictor_lock,
)
from napari_mobilesam.predictor import Predictor

from .common import H, W, _assert_same, _disk_mask, _disk_stack

# --------------------------------------------------------------------------- predict


def test_point_rc_equals_predictor_xy(session2d, direct):
    got = session2d.predict([[12.0, 50.0]])
    _assert_same(got, direct.predict(np.array([[50.0, 12.0]]), np.array([1])))
    assert got.masks.shape == (3, H, W) and got.masks.dtype == np.bool_
    assert got.choice == int(np.argmax(got.scores))
    np.testing.assert_array_equal(got.mask, got.masks[got.choice])
    assert got.score == pytest.approx(float(got.scores.max()))
    assert got.mask_input.shape == (1, 32, 32)


@pytest.mark.parametrize(
    "box_rc",
    [
        (10, 20, 40, 70),
        (40, 70, 10, 20),
        (10, 70, 40, 20),
        [[10, 20], [10, 70], [40, 70], [40, 20]],  # a napari rectangle
    ],
)
def test_box_corners_any_order(session2d, direct, box_rc):
    got = session2d.predict(box_rc=box_rc)
    _assert_same(got, direct.predict(box=np.array([20.0, 10.0, 70.0, 40.0])))
    assert got.masks.shape[0] == 3  # a box alone is a single prompt


def test_several_prompts_give_one_mask(session2d, direct):
    pts_rc = np.array([[12.0, 50.0], [30.0, 10.0]])
    got = session2d.predict(pts_rc, [1, 0])
    want = direct.predict(pts_rc[:, ::-1], np.array([1, 0]), multimask_output=False)
    _assert_same(got, want)
    assert got.masks.shape == (1, H, W) and got.choice == 0

    got = session2d.predict([[12.0, 50.0]], [0], (10, 20, 40, 70))
    want = direct.predict(
        np.array([[50.0, 12.0]]), np.array([0]), np.array([20, 10, 70, 40]), multimask_output=False
    )
    _assert_same(got, want)

    single = session2d.predict([[12.0, 50.0]], multimask=False)
    _assert_same(
        single, direct.predict(np.array([[50.0, 12.0]]), np.array([1]), multimask_output=False)
    )


def test_choice_cycles(session2d):
    best = session2d.predict([[12.0, 50.0]])
    for k in range(7):
        p = session2d.predict([[12.0, 50.0]], choice=k)
        assert p.choice == k % 3
        np.testing.assert_array_equal(p.masks, best.masks)
    assert session2d.predict([[12.0, 50.0]], choice=np.int64(-1)).choice == 2


def test_mask_input_refinement(session2d, direct):
    first = session2d.predict([[12.0, 50.0]])
    got = session2d.predict([[12.0, 50.0]], mask_input=first.mask_input, multimask=False)
    want = direct.predict(
        np.array([[50.0, 12.0]]),
        np.array([1]),
        mask_input=first.mask_input,
        multimask_output=False,
    )
    _assert_same(got, want)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "needs a prompt"),
        ({"labels": [1]}, ValueError, "labels given without points_rc"),
        ({"points_rc": [1.0, 2.0]}, ValueError, r"points_rc must have shape \(N, 2\)"),
        ({"points_rc": np.zeros((0, 2))}, ValueError, "points_rc must have shape"),
        ({"points_rc": [[1, 2]], "labels": [1, 1]}, ValueError, r"labels must have shape \(1,\)"),
        ({"points_rc": [[1, 2]], "labels": [2]}, ValueError, "labels must be 1 .* or 0"),
        ({"points_rc": [[np.nan, 2]]}, ValueError, "points_rc contains NaN"),
        ({"points_rc": [["a", "b"]]}, ValueError, "points_rc must be numeric"),
        ({"box_rc": (1, 2, 3)}, ValueError, r"box_rc must have shape \(4,\)"),
        ({"box_rc": [[1, 2]]}, ValueError, "box_rc must have shape"),
        ({"box_rc": (1, 2, np.inf, 4)}, ValueError, "box_rc contains NaN or infinite"),
        ({"box_rc": (1, 2, 3, 4), "choice": "worst"}, TypeError, "choice must be 'best' or an int"),
        ({"box_rc": (1, 2, 3, 4), "choice": 1.0}, TypeError, "choice must be"),
        ({"box_rc": (1, 2, 3, 4), "choice": True}, TypeError, "choice must be"),
        ({"box_rc": (1, 2, 3, 4), "mask_input": np.zeros((5, 5))}, ValueError, "mask_input"),
    ],
)
def test_predict_errors(session2d, kwargs, error, match):
    with pytest.raises(error, match=match):
        session2d.predict(**kwargs)


def test_predict_before_embed(pred, image2d):
    s = PromptSession(pred, image2d)
    assert s.current is None
    with pytest.raises(RuntimeError, match=r"call embed\(index\)"):
        s.predict([[1.0, 2.0]])


def test_sessions_sharing_a_predictor(pred, image2d, direct):
    a = PromptSession(pred, image2d, contrast_limits=(0, 4000))
    b = PromptSession(pred, np.zeros((H, W), dtype=np.uint8))
    a.embed(())
    emb_a = pred.get_embedding()
    b.embed(())
    assert pred.features is not emb_a.features
    # a puts its own embedding back before decoding
    _assert_same(a.predict([[12.0, 50.0]]), direct.predict(np.array([[50.0, 12.0]]), [1]))
    assert pred.features is emb_a.features
    pred.reset_image()
    _assert_same(a.predict([[12.0, 50.0]]), direct.predict(np.array([[50.0, 12.0]]), [1]))
    assert pred.features is emb_a.features


# --------------------------------------------------------------------------- real size


@pytest.fixture(scope="module")
def golden_session(golden_model):
    """A (3, H, W) stack: the disk on planes 0 and 1, plane 2 blank; all embedded."""
    predictor = Predictor(golden_model)
    s = PromptSession(predictor, _disk_stack(3, 2), cache_key="golden-disks")
    assert s.precompute() == 3
    return s


def test_golden_point_rc_equals_xy(golden_session):
    s = golden_session
    s.embed((1,))
    got = s.predict([[30.0, 33.0]], box_rc=(44, 48, 16, 18))
    want = s.predictor.predict(
        np.array([[33.0, 30.0]]), np.array([1]), np.array([18, 16, 48, 44]), multimask_output=False
    )
    _assert_same(got, want)
    assert got.masks.shape == (1, H, W) and got.low_res.shape == (1, 256, 256)


def test_golden_propagate(golden_session):
    s = golden_session
    s.embed((1,))
    mask = _disk_mask(1)
    assert all(s.is_cached(z) for z in range(3))
    got = s.propagate((1,), mask, 0, direction=0, min_score=-math.inf, min_area_ratio=1e-6)
    assert list(got) == [(2,), (0,)]  # up first, then down; plane 2 is blank
    for m in got.values():
        assert m.shape == (H, W) and m.dtype == np.bool_ and m.any()
    assert s.current == (1,)
    assert s.propagate((1,), mask, 0, min_score=1.01) == {}
    assert s.propagate((0,), mask, 0, direction=-1, min_score=-math.inf) == {}


# --------------------------------------------------------------------------- several objects


def test_predict_many_equals_one_by_one(session2d, direct):
    prompts = [
        ObjectPrompt(box_rc=(10, 20, 40, 70)),
        ObjectPrompt(points_rc=[[12.0, 50.0]], box_rc=(5, 5, 30, 30)),
        ObjectPrompt(box_rc=(30, 40, 55, 75)),
        ObjectPrompt(points_rc=[[12.0, 50.0], [30.0, 10.0]], labels=[1, 0]),
    ]
    got = session2d.predict_many(prompts)
    assert len(got) == 4
    for p, g in zip(prompts, got, strict=True):
        want = session2d.predict(p.points_rc, p.labels, p.box_rc, multimask=False)
        np.testing.assert_array_equal(g.masks, want.masks)
        np.testing.assert_allclose(g.scores, want.scores, atol=1e-5)
        assert g.masks.shape == (1, H, W) and g.choice == 0
    # a single prompt per object may ask for three candidates, the best chosen
    many = session2d.predict_many(prompts[:1], multimask=True)
    one = session2d.predict(box_rc=(10, 20, 40, 70))
    np.testing.assert_array_equal(many[0].masks, one.masks)
    assert many[0].choice == one.choice
    assert session2d.predict_many([]) == []


@pytest.mark.parametrize(
    ("prompts", "error", "match"),
    [
        (ObjectPrompt(box_rc=(1, 2, 3, 4)), TypeError, "prompts must be a sequence"),
        ([(1, 2, 3, 4)], TypeError, r"prompts\[0\] must be an ObjectPrompt"),
        ([ObjectPrompt()], ValueError, "needs a prompt"),
        ([ObjectPrompt(box_rc=(1, 2, 3))], ValueError, "box_rc must have shape"),
    ],
)
def test_predict_many_errors(session2d, prompts, error, match):
    with pytest.raises(error, match=match):
        session2d.predict_many(prompts)


def test_predict_many_before_embed(pred, image2d):
    with pytest.raises(RuntimeError, match=r"call embed\(index\)"):
        PromptSession(pred, image2d).predict_many([ObjectPrompt(box_rc=(1, 2, 3, 4))])


# --------------------------------------------------------------------------- keys and threads


def test_content_key_sees_changed_pixels(pred, encoder_inputs):
    """The same array object, edited in place, is another image to the cache."""
    image = _disk_stack(1, 1)
    cache = EmbeddingCache()
    s = PromptSession(pred, image, cache=cache)
    assert not s.is_cached(0)
    assert s.embed((0,)) is True and s.is_cached(0)
    image[0, :5] = 7
    s2 = PromptSession(pred, image, cache=cache)
    assert not s2.is_cached(0) and s2.embed((0,)) is True
    assert len(encoder_inputs) == 2


def test_predictor_lock_is_one_per_predictor(tiny_model):
    a, b = Predictor(tiny_model), Predictor(tiny_model)
    assert predictor_lock(a) is predictor_lock(a)
    assert predictor_lock(a) is not predictor_lock(b)


def test_sessions_on_one_predictor_from_many_threads(pred):
    """Two images, several threads each embedding and predicting on one shared predictor
    (and a third thread setting other images under its lock): every result equals the
    single-threaded one."""
    import threading

    stacks = [_disk_stack(3, 3), _disk_stack(3, 3, value=300)[:, ::-1]]
    sessions = [PromptSession(pred, s, contrast_limits=(0, 1000)) for s in stacks]
    points = [[[30.0, 30.0 + 2 * z]] for z in range(3)]
    want = {}
    for i, s in enumerate(sessions):
        for z in range(3):
            s.embed((z,))
            want[i, z] = s.predict(points[z])
    errors, mismatches = [], []
    other = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)

    def prompts(i, rounds=4):
        try:
            for r in range(rounds):
                z = (r + i) % 3
                sessions[i].embed((z,))
                got = sessions[i].predict(points[z])
                if not np.array_equal(got.masks, want[i, z].masks):
                    mismatches.append((i, z))
        except Exception as err:  # reported below
            errors.append(err)

    def intruder():
        for _ in range(4):
            with predictor_lock(pred):
                pred.set_image(other)
                pred.predict(np.array([[5.0, 5.0]]), np.array([1]))

    threads = [threading.Thread(target=prompts, args=(i % 2,)) for i in range(4)]
    threads.append(threading.Thread(target=intruder))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches


def test_commits_from_many_threads_keep_ids_unique(pred):
    import threading

    s = PromptSession(pred, np.zeros((8, 8)))
    labels = np.zeros((8, 8), np.uint16)
    masks = []
    for i in range(8):
        m = np.zeros((8, 8), bool)
        m[i] = True
        masks.append(m)
    threads = [threading.Thread(target=s.commit, args=(labels, m)) for m in masks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(np.unique(labels[:, 0]).tolist()) == list(range(1, 9))
    assert all(len(np.unique(labels[i])) == 1 for i in range(8))
