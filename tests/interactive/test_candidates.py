"""A click's candidate masks, upsampled only when read (CandidateMasks), and the predictor's
low-res path they come from (Predictor.predict_low_res, MaskUpsampler)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_mobilesam.interactive import PromptSession
from napari_mobilesam.interactive.candidates import CandidateMasks
from napari_mobilesam.predictor import MaskUpsampler, Predictor


def blobs(rng, size: int, k: int = 3) -> np.ndarray:
    """(k, size, size) float32 logits: smooth random fields, positive in a few blobs."""
    noise = rng.normal(size=(k, size, size))
    smooth = np.stack([ndimage.gaussian_filter(n, size / 40) for n in noise])
    return (smooth / smooth.std() * 8 - 12).astype(np.float32)


def extent(masks: np.ndarray):
    rows = np.flatnonzero(masks.any(axis=(0, 2)))
    cols = np.flatnonzero(masks.any(axis=(0, 1)))
    if not len(rows):
        return None
    return rows[0], cols[0], rows[-1] + 1, cols[-1] + 1


@pytest.fixture(params=[(60, 80), (1024, 1024), (700, 1000), (333, 95)])
def upsampler(request, tiny_model):
    """An upsampler for an image of that (H, W), as the predictor makes it."""
    p = Predictor(tiny_model)
    p.set_image(np.zeros((*request.param, 3), np.uint8))
    emb = p.get_embedding()
    return MaskUpsampler(p.engine.frames, emb.input_size, emb.original_size)


def low_size(upsampler) -> int:
    """The side of the model's low-res logits (256 for SAM, 32 for the tiny model)."""
    return upsampler.frames.model.prompt_encoder.mask_input_size[0]


def test_predict_low_res_upsampled_equals_predict_bit_for_bit(golden_model, rng):
    p = Predictor(golden_model)
    p.set_image(rng.integers(0, 255, size=(300, 420, 3), dtype=np.uint8))
    for point in ([[100, 80]], [[400, 290]], [[10, 5]]):
        masks, scores, low = p.predict(np.array(point), np.array([1]))
        s2, low2, upsample = p.predict_low_res(np.array(point), np.array([1]))
        np.testing.assert_array_equal(s2, scores)
        np.testing.assert_array_equal(low2, low)
        np.testing.assert_array_equal(upsample(low2), masks)  # all three at once
        for k in range(len(masks)):  # or one by one
            np.testing.assert_array_equal(upsample(low2[k : k + 1])[0], masks[k])
    assert upsample.original_size == (300, 420) and upsample.scale == 4.0


def test_the_upsampler_stays_bound_to_its_image(tiny_model, rng):
    p = Predictor(tiny_model)
    p.set_image(np.zeros((60, 80, 3), np.uint8))
    _, low, upsample = p.predict_low_res(np.array([[10, 10]]), np.array([1]))
    p.set_image(np.zeros((90, 50, 3), np.uint8))  # another image now
    assert upsample(low).shape == (3, 60, 80)


def test_session_predict_upsamples_only_the_candidates_read(golden_model, rng):
    image = rng.integers(0, 4000, size=(200, 260), dtype=np.uint16)
    session = PromptSession(Predictor(golden_model), image, contrast_limits=(0, 4000))
    session.embed(())
    pred = session.predict([[90, 120]])
    assert isinstance(pred.masks, CandidateMasks) and pred.masks.upsampled == 0
    mask = pred.mask
    assert pred.masks.upsampled == 1 and mask.shape == (200, 260) and mask.dtype == bool
    assert pred.mask is mask  # kept, not upsampled again
    direct = Predictor(golden_model)
    direct.set_image(image, contrast_limits=(0, 4000))
    masks, scores, _ = direct.predict(np.array([[120, 90]]), np.array([1]))
    np.testing.assert_array_equal(pred.scores, scores)
    np.testing.assert_array_equal(np.asarray(pred.masks), masks)
    assert pred.masks.upsampled == 3


def test_candidates_read_like_an_array(upsampler, rng):
    low = blobs(rng, low_size(upsampler))
    c = CandidateMasks(low, upsampler, upsampler.original_size, upsampler.input_size,
                       upsampler.scale)  # fmt: skip
    full = upsampler(low)
    assert len(c) == 3 and c.shape == full.shape and c.ndim == 3 and c.dtype == bool
    np.testing.assert_array_equal(c[-1], full[2])
    np.testing.assert_array_equal(c[1:], full[1:])
    np.testing.assert_array_equal(np.asarray(c, dtype=np.uint8), full.astype(np.uint8))
    assert [m.shape for m in c] == [full.shape[1:]] * 3
    with pytest.raises(IndexError):
        c[3]


def test_bounds_hold_every_candidate_pixel_and_little_more(upsampler, rng):
    per = upsampler.scale * upsampler.original_size[0] / upsampler.input_size[0]
    for seed in range(6):
        low = blobs(np.random.default_rng(seed), low_size(upsampler))
        c = CandidateMasks(low, upsampler, upsampler.original_size, upsampler.input_size,
                           upsampler.scale)  # fmt: skip
        true = extent(upsampler(low))
        got = c.bounds()
        assert c.upsampled == 0  # found from the low-res logits alone
        if true is None:
            continue
        assert got[0] <= true[0] and got[1] <= true[1]
        assert got[2] >= true[2] and got[3] >= true[3]
        slack = 4 * per + 2  # the reach, in mask pixels, on each side
        assert all(abs(g - t) <= slack for g, t in zip(got, true, strict=True))


def test_bounds_of_a_single_positive_logit(upsampler):
    """The tightest case: one positive logit among very negative ones."""
    h_in, w_in = upsampler.input_size
    n = low_size(upsampler)
    for r, c in ((0, 0), (h_in // 8, w_in // 8), ((h_in - 1) // 4, (w_in - 1) // 4)):
        low = np.full((1, n, n), -30.0, np.float32)
        low[0, r, c] = 30.0
        cm = CandidateMasks(low, upsampler, upsampler.original_size, upsampler.input_size,
                            upsampler.scale)  # fmt: skip
        true = extent(upsampler(low))
        got = cm.bounds()
        if true is not None:
            assert got[0] <= true[0] and got[1] <= true[1]
            assert got[2] >= true[2] and got[3] >= true[3]


def test_no_positive_logit_over_the_image_has_no_bounds(upsampler):
    n = low_size(upsampler)
    low = np.full((3, n, n), -5.0, np.float32)
    c = CandidateMasks(low, upsampler, upsampler.original_size, upsampler.input_size, 4.0)
    assert c.bounds() is None
    if upsampler.input_size[0] < upsampler.frames.model.img_size - 8:
        low[:, -1, :] = 5.0  # logits over the input frame's padding, below the image
        assert not upsampler(low).any() and c.bounds() is None


def test_candidates_refuse_logits_that_are_not_k_h_w():
    with pytest.raises(ValueError, match=r"low_res must be \(K, h, w\)"):
        CandidateMasks(np.zeros((256, 256)), lambda x: x, (10, 10), (10, 10), 4.0)


def test_threads_reading_a_candidate_get_one_mask(upsampler, rng):
    import threading

    calls = []

    def counting(low):
        calls.append(len(low))
        return upsampler(low)

    low = blobs(rng, low_size(upsampler))
    c = CandidateMasks(low, counting, upsampler.original_size, upsampler.input_size,
                       upsampler.scale)  # fmt: skip
    threads = [threading.Thread(target=lambda: c[0]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.upsampled == 1
    first = c[0]
    assert all(c[0] is first for _ in range(3))
    torch.testing.assert_close(torch.from_numpy(first), torch.from_numpy(upsampler(c._low[:1])[0]))


def test_predict_low_res_refuses_what_predict_refuses(tiny_model):
    p = Predictor(tiny_model)
    with pytest.raises(RuntimeError, match="no image is set"):
        p.predict_low_res(np.array([[1, 1]]), np.array([1]))
    p.set_image(np.zeros((60, 80, 3), np.uint8))
    with pytest.raises(ValueError, match="point_labels"):
        p.predict_low_res(np.array([[1, 1]]), np.array([2]))
