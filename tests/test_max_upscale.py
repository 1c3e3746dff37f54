"""``Predictor(max_upscale=)``: small images shown to the model at most X times their size.

The embedding must be the encoder's output on the image resized to the shorter side and
padded with its background colour, prompts and masks stay in the image's pixels, and
images the limit does not touch give the same bytes as without it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mobilesam.engine.frames import Frames, background_colour
from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.predictor import Predictor
from napari_mobilesam.transforms import (
    apply_boxes,
    apply_coords,
    check_max_upscale,
    input_long_side,
    max_upscale_option,
    resize_longest_side,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: dark noise with a few bright disks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = rng.integers(5, 30, (h, w)).astype(np.uint8)
    for _ in range(4):
        r, c, rad = rng.integers(8, h - 8), rng.integers(8, w - 8), rng.integers(4, 9)
        out[(yy - r) ** 2 + (xx - c) ** 2 < rad**2] = 220
    return np.repeat(out[..., None], 3, axis=2)


@pytest.mark.parametrize(
    ("size", "limit", "expected"),
    [((256, 200), None, 1024), ((256, 200), 2, 512), ((256, 200), 1, 256),
     ((600, 300), 2, 1024), ((100, 333), 1.5, 500), ((2000, 10), 2, 1024)],
)  # fmt: skip
def test_input_long_side(size, limit, expected):
    assert input_long_side(*size, 1024, limit) == expected


@pytest.mark.parametrize("bad", [0.5, 0, -2, float("nan"), float("inf"), "2", True])
def test_bad_limits_raise(bad):
    with pytest.raises(ValueError, match="max_upscale must be a number >= 1"):
        check_max_upscale(bad)


def test_predictor_rejects_a_bad_limit(tiny_model):
    with pytest.raises(ValueError, match="max_upscale"):
        Predictor(tiny_model, max_upscale=0.5)


def test_background_colour_is_the_border_median():
    frames = torch.zeros(2, 3, 6, 5)
    frames[0, :, 0, :] = 10.0  # top row of image 0 bright: 5 of its 18 border pixels
    frames[1, 1] = 7.0
    frames[1, :, 2:4, 1:4] = 200.0  # an inner object: not border
    colour = background_colour(frames)
    assert colour.tolist() == [[0.0, 0.0, 0.0], [0.0, 7.0, 0.0]]


def test_embedding_is_the_padded_resized_image(tiny_model):
    """A 48x40 image with limit 2 (tiny model input: 128 px) is the encoder's output on
    the image resized to 96x80 and padded with its border median."""
    rgb = _image(48, 40)
    pred = Predictor(tiny_model, max_upscale=2)
    pred.set_image(rgb)
    emb = pred.get_embedding()
    assert emb.original_size == (48, 40) and emb.input_size == (96, 80)

    resized = torch.tensor(resize_longest_side(rgb, 96)).permute(2, 0, 1).float()[None]
    fill = torch.tensor(np.median(np.concatenate(
        [rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]]), axis=0), dtype=torch.float32
    )  # fmt: skip
    canvas = fill.view(1, 3, 1, 1).repeat(1, 1, 128, 128)
    canvas[..., :96, :80] = resized
    with torch.no_grad():
        expected = tiny_model.image_encoder((canvas - tiny_model.pixel_mean) / tiny_model.pixel_std)
    torch.testing.assert_close(emb.features, expected, rtol=0, atol=1e-5)


def test_prompts_and_masks_stay_in_image_pixels(tiny_model):
    """Point and box prompts in the image's pixels give the model's own output with
    coordinates scaled by the image's input side, and masks of the image's size."""
    rgb = _image(48, 40, seed=1)
    pred = Predictor(tiny_model, max_upscale=2)
    pred.set_image(rgb)
    point, box = np.array([[20.0, 30.0]]), np.array([5.0, 8.0, 30.0, 40.0])
    masks, scores, low = pred.predict(point, np.array([1]), box=box)
    assert masks.shape == (3, 48, 40)

    feats = pred.get_embedding().features
    m = tiny_model
    with torch.no_grad():
        coords = torch.tensor(apply_coords(point, (48, 40), 96), dtype=torch.float32)[None]
        boxes = torch.tensor(apply_boxes(box, (48, 40), 96), dtype=torch.float32)[None]
        sparse, dense = m.prompt_encoder(
            points=(coords, torch.ones(1, 1, dtype=torch.int64)), boxes=boxes, masks=None
        )
        lr, iou = m.mask_decoder(feats, m.prompt_encoder.get_dense_pe(), sparse, dense, True)
        up = m.postprocess_masks(lr, (96, 80), (48, 40))
    np.testing.assert_allclose(low, lr[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(scores, iou[0].numpy(), atol=1e-5)
    agree = (masks == (up[0].numpy() > 0)).mean()
    assert agree > 0.999


def test_images_the_limit_does_not_touch_are_unchanged(tiny_model):
    """A 100x120 image enlarged 1.07x (tiny model: 128 px) is under a limit of 2: the
    same bytes as without a limit."""
    rgb = _image(100, 120, seed=2)
    plain, limited = Predictor(tiny_model), Predictor(tiny_model, max_upscale=2)
    for p in (plain, limited):
        p.set_image(rgb)
    assert torch.equal(plain.get_embedding().features, limited.get_embedding().features)
    a = plain.predict(np.array([[50.0, 40.0]]), np.array([1]))
    b = limited.predict(np.array([[50.0, 40.0]]), np.array([1]))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_frames_keep_zero_padding_for_full_size_frames(tiny_model):
    """SAM's own padding (zeros after normalisation) for frames whose longer side is
    the input size, limit or not."""
    frames = Frames(tiny_model, max_upscale=2)
    frame, size = frames.frame(_image(64, 128))
    assert size == (64, 128) and tuple(frame.shape[-2:]) == (64, 128)
    x = frames.preprocess(frame)
    assert torch.equal(x[..., 64:, :], torch.zeros_like(x[..., 64:, :]))


@pytest.mark.parametrize("mode", ["fast", "device"])
def test_generator_modes_agree_with_reference(tiny_model, mode):
    """Segment-everything on a small image with the limit: the point grid covers the
    image (not the padding), masks are of the image's size, and fast and device modes
    give reference mode's masks (box NMS in all three, as in test_everything.py)."""
    rgb = _image(48, 40, seed=3)
    kwargs = dict(points_per_side=6, pred_iou_thresh=0, stability_score_thresh=0, nms="box")
    ref = MaskGenerator(Predictor(tiny_model, max_upscale=2), mode="reference", **kwargs)
    other = MaskGenerator(Predictor(tiny_model, max_upscale=2), mode=mode, **kwargs)
    a = [r for r in ref.generate(rgb) if r["area"] > 0]
    b = [r for r in other.generate(rgb) if r["area"] > 0]
    assert len(a) > 0 and len(a) == len(b)
    for r, o in zip(a, b, strict=True):
        assert r["segmentation"].shape == o["segmentation"].shape == (48, 40)
        x, y = r["point_coords"][0]
        assert 0 <= x < 40 and 0 <= y < 48  # the grid covers the image only
        inter = np.count_nonzero(r["segmentation"] & o["segmentation"])
        union = np.count_nonzero(r["segmentation"] | o["segmentation"])
        assert inter / union > 0.99
    labels = other.generate_labels(rgb)
    assert labels.shape == (48, 40) and labels.max() > 0


def test_describe_names_the_limit(tiny_model):
    assert "small images enlarged at most 2x" in Predictor(tiny_model, max_upscale=2).describe()
    assert "enlarged" not in Predictor(tiny_model).describe()


def _stack() -> np.ndarray:
    """(3, 40, 50) uint16: a bright square per plane on noise."""
    rng = np.random.default_rng(3)
    data = rng.integers(100, 600, (3, 40, 50)).astype(np.uint16)
    for z in range(3):
        data[z, 10 + z : 25 + z, 12:30] += 3000
    return data


def test_session_and_store_follow_the_predictor(tiny_model, tmp_path):
    """A PromptSession over a limited predictor embeds small planes at the limit, loads
    them from a store made with the same limit, and refuses a store made without."""
    from napari_mobilesam.interactive import PromptSession
    from napari_mobilesam.interactive.planes import ImagePlanes
    from napari_mobilesam.store import StoreMismatchError, attach_store, embed_planes, open_for

    stack = _stack()
    limited = Predictor(tiny_model, max_upscale=2)
    session = PromptSession(limited, stack)
    assert session.embed((1,)) is True
    plain = session.predict(points_rc=[[17, 20]])
    assert plain.masks.shape[-2:] == (40, 50)

    planes = ImagePlanes(stack)
    store = open_for(tmp_path / "s.zarr", planes, limited)
    embed_planes(store, planes, limited)
    assert store.read((1,)).input_size == (80, 100)
    stored = PromptSession(limited, stack)
    cache = attach_store(stored, store)
    assert stored.embed((1,)) is False and cache.loads == 1  # no encoder run
    got = stored.predict(points_rc=[[17, 20]])
    np.testing.assert_array_equal(np.asarray(got.masks), np.asarray(plain.masks))

    with pytest.raises(StoreMismatchError, match=r"max_upscale 2.0 != None \(normalisation\)"):
        attach_store(PromptSession(Predictor(tiny_model), stack), store)


def test_session_cache_keys_differ_with_the_limit(tiny_model):
    """Embeddings made with one limit are never answered for another from a shared cache."""
    from napari_mobilesam.interactive import EmbeddingCache, PromptSession

    stack, cache = _stack(), EmbeddingCache()
    a = PromptSession(Predictor(tiny_model, max_upscale=2), stack, cache=cache)
    b = PromptSession(Predictor(tiny_model), stack, cache=cache)
    assert a.embed((0,)) is True
    assert b.embed((0,)) is True  # computed again, not taken from a's entry
    assert a.embed((0,)) is False


@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (3, 90), (1, 200), (16, 16)])
@pytest.mark.parametrize("limit", [1, 3.7])
def test_tiny_and_thin_images(tiny_model, shape, limit):
    """Images of a pixel or two, and thin ones, predict and segment at their own size."""
    rgb = np.random.default_rng(0).integers(0, 255, (*shape, 3)).astype(np.uint8)
    pred = Predictor(tiny_model, max_upscale=limit)
    pred.set_image(rgb)
    h, w = pred.get_embedding().input_size
    assert max(h, w) == input_long_side(*shape, 128, limit)
    masks, _, _ = pred.predict(np.array([[0.0, 0.0]]), np.array([1]))
    assert masks.shape == (3, *shape)
    gen = MaskGenerator(pred, points_per_side=2, pred_iou_thresh=0, stability_score_thresh=0)
    assert gen.generate_labels(rgb).shape == shape


@pytest.mark.parametrize(("text", "default", "expected"), [
    (None, 2.0, 2.0),  # not given: the model's default
    (None, None, None),
    ("none", 2.0, None),  # no limit, whatever the model's default
    (" None ", 2.0, None),
    ("1.5", None, 1.5),
    ("3", 2.0, 3.0),
])  # fmt: skip
def test_the_command_line_option(text, default, expected):
    assert max_upscale_option(text, default) == expected


@pytest.mark.parametrize("text", ["0.5", "0", "-2", "nan", "inf", "two", ""])
def test_a_bad_command_line_option_is_refused(text):
    with pytest.raises(ValueError, match=r"give a finite number >= 1, or none \(no limit\)"):
        max_upscale_option(text, 2.0)
