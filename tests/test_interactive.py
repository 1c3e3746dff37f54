"""PromptSession and EmbeddingCache: the GUI-free logic behind the napari prompt widget."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.draw import disk

from napari_mobilesam.interactive import (
    EmbeddingCache,
    ObjectPrompt,
    Prediction,
    PromptSession,
    PropagationRule,
    mask_prompt,
    predictor_lock,
)
from napari_mobilesam.interactive.propagate import follow
from napari_mobilesam.predictor import ImageEmbedding, Predictor

H, W = 60, 80


def _disk_stack(n_planes: int, n_with_disk: int, dtype=np.uint16, value=1000) -> np.ndarray:
    """(n_planes, H, W): a bright disk moving right 2 px per plane; blank after n_with_disk."""
    stack = np.zeros((n_planes, H, W), dtype=dtype)
    for z in range(n_with_disk):
        rr, cc = disk((30, 30 + 2 * z), 12, shape=(H, W))
        stack[z, rr, cc] = value
    return stack


def _disk_mask(z: int = 0) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    rr, cc = disk((30, 30 + 2 * z), 12, shape=(H, W))
    mask[rr, cc] = True
    return mask


@pytest.fixture
def pred(tiny_model):
    return Predictor(tiny_model)


@pytest.fixture
def image2d(rng):
    return rng.integers(0, 4000, size=(H, W), dtype=np.uint16)


@pytest.fixture
def session2d(pred, image2d):
    s = PromptSession(pred, image2d, contrast_limits=(0, 4000))
    s.embed(())
    return s


@pytest.fixture
def direct(tiny_model, image2d):
    p = Predictor(tiny_model)
    p.set_image(image2d, contrast_limits=(0, 4000))
    return p


@pytest.fixture
def encoder_inputs(tiny_model):
    """Every (1, 3, S, S) tensor the tiny model's image encoder runs on, in order.

    The tiny random encoder's output hardly depends on its input (embeddings of
    unrelated images agree to 1e-7), so tests compare what goes *into* it.
    """
    seen: list[torch.Tensor] = []
    handle = tiny_model.image_encoder.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone())
    )
    yield seen
    handle.remove()


def _same_input(seen: list, ref: Predictor, image, **kwargs) -> None:
    """The encoder's last input equals what ``ref.set_image(image, **kwargs)`` feeds it."""
    got = seen[-1]
    ref.set_image(image, **kwargs)
    torch.testing.assert_close(got, seen.pop(), rtol=0, atol=0)


def _assert_same(prediction: Prediction, want) -> None:
    for got, exp in zip(
        (prediction.masks, prediction.scores, prediction.low_res), want, strict=True
    ):
        np.testing.assert_array_equal(got, exp)


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


# --------------------------------------------------------------------------- stacks


def test_zstack_uint16(pred, tiny_model, encoder_inputs):
    stack = _disk_stack(3, 3)
    s = PromptSession(pred, stack, contrast_limits=(0, 2000))
    assert s.plane_shape == (3,) and s.n_planes == 3 and s.shape_hw == (H, W)
    np.testing.assert_array_equal(s.plane((1,)), stack[1])
    np.testing.assert_array_equal(s.plane(1), stack[1])  # an int for one plane axis
    assert s.embed((1,)) is True
    _same_input(encoder_inputs, Predictor(tiny_model), stack[1], contrast_limits=(0, 2000))
    assert s.embed((0,)) is True and s.current == (0,)
    emb_0 = pred.get_embedding()
    _same_input(encoder_inputs, Predictor(tiny_model), stack[0], contrast_limits=(0, 2000))
    assert s.embed((0,)) is False  # already there
    assert s.embed((1,)) is False  # from the cache
    assert s.embed((0,)) is False and pred.features is emb_0.features
    assert len(encoder_inputs) == 2 and s.current == (0,)
    # other limits feed the encoder another image: the limits really reach it
    Predictor(tiny_model).set_image(stack[0])
    assert not torch.equal(encoder_inputs[-1], encoder_inputs[-2])


def test_rgb_stack(pred, tiny_model, rng, encoder_inputs):
    stack = rng.integers(0, 256, size=(2, H, W, 3), dtype=np.uint8)
    s = PromptSession(pred, stack, rgb=True)
    assert s.plane_shape == (2,) and s.shape_hw == (H, W)
    np.testing.assert_array_equal(s.plane((1,)), stack[1])
    assert s.embed((1,))
    _same_input(encoder_inputs, Predictor(tiny_model), stack[1])
    assert s.embed((0,)) and not s.embed((1,))
    assert len(encoder_inputs) == 2


def test_channel_axis_stack(pred, tiny_model, rng, encoder_inputs):
    stack = rng.integers(0, 1000, size=(2, 3, H, W), dtype=np.uint16)  # (C, Z, H, W)
    s = PromptSession(pred, stack, channel_axis=0, contrast_limits=(0, 1000))
    assert s.plane_shape == (3,) and s.n_planes == 3 and s.shape_hw == (H, W)
    plane = s.plane((2,))
    assert plane.shape == (H, W, 2)
    np.testing.assert_array_equal(plane, np.moveaxis(stack[:, 2], 0, -1))
    assert s.embed((2,)) and not s.embed((2,))
    # two channels fill R and G of the image the model sees
    ref_kwargs = {"channel_axis": 0, "channels": [0, 1], "contrast_limits": (0, 1000)}
    _same_input(encoder_inputs, Predictor(tiny_model), stack[:, 2], **ref_kwargs)
    s.embed((0,))
    assert not s.embed((2,)) and len(encoder_inputs) == 2


def test_channel_axis_layouts(pred, rng):
    stack = rng.integers(0, 9, size=(4, 5, 2, H, W), dtype=np.uint8)  # (T, Z, C, H, W)
    s = PromptSession(pred, stack, channel_axis=-3, channels=[1])
    assert s.plane_shape == (4, 5) and s.n_planes == 20
    np.testing.assert_array_equal(s.plane((3, 4)), np.moveaxis(stack[3, 4], 0, -1))
    s = PromptSession(pred, stack[0, 0], channel_axis=0)  # (C, H, W): a single plane
    assert s.plane_shape == () and s.n_planes == 1 and s.plane(()).shape == (H, W, 2)
    s = PromptSession(pred, rng.integers(0, 9, size=(2, 3, H, W, 4), dtype=np.uint8), rgb=True)
    assert s.plane_shape == (2, 3) and s.plane((1, 2)).shape == (H, W, 4)


def test_2d_and_dask(pred, tiny_model, image2d, encoder_inputs):
    da = pytest.importorskip("dask.array")
    stack = da.from_array(np.stack([image2d, image2d[::-1]]), chunks=(1, H, W))
    s = PromptSession(pred, stack)
    assert s.plane_shape == (2,)
    plane = s.plane((1,))
    assert isinstance(plane, np.ndarray)
    np.testing.assert_array_equal(plane, image2d[::-1])
    s.embed((1,))
    _same_input(encoder_inputs, Predictor(tiny_model), image2d[::-1])
    s2 = PromptSession(pred, image2d)
    assert s2.plane_shape == () and s2.n_planes == 1
    np.testing.assert_array_equal(s2.plane(()), image2d)
    s2.embed(())
    _same_input(encoder_inputs, Predictor(tiny_model), image2d)


def test_content_key_and_cache_key(pred, encoder_inputs):
    stack = _disk_stack(3, 1)  # planes 1 and 2 are identical (blank)
    calls = encoder_inputs
    cache = EmbeddingCache()
    s = PromptSession(pred, stack, cache=cache)
    assert s.embed((1,)) is True
    assert s.embed((2,)) is False  # same pixels: the content key finds it
    assert len(calls) == 1

    # with a cache_key, entries are per plane index and shared between sessions
    a = PromptSession(pred, stack, cache=cache, cache_key=("layer", "src"))
    b = PromptSession(pred, stack, cache=cache, cache_key=("layer", "src"))
    assert a.embed((0,)) is True and b.embed((0,)) is False
    assert a.embed((2,)) is True  # index-keyed: no content sharing
    # other contrast limits are another entry
    c = PromptSession(pred, stack, cache=cache, cache_key=("layer", "src"), contrast_limits=(0, 9))
    assert c.embed((0,)) is True
    assert len(calls) == 4


def test_cache_never_mixes_models(tiny_model):
    from napari_mobilesam.build import build_sam

    from .conftest import TINY_CONFIG, _randomize

    other = _randomize(build_sam(TINY_CONFIG), seed=1).eval()
    cache = EmbeddingCache()
    stack = _disk_stack(1, 1)
    a = PromptSession(Predictor(tiny_model), stack, cache=cache, cache_key="k")
    b = PromptSession(Predictor(other), stack, cache=cache, cache_key="k")
    assert a.embed((0,)) is True and b.embed((0,)) is True


def test_precompute(pred, encoder_inputs):
    stack = _disk_stack(4, 4)
    s = PromptSession(pred, stack, cache_key="stack")
    calls = encoder_inputs
    s.embed((2,))
    before = pred.get_image_embedding()
    seen = []
    assert s.precompute(progress=lambda done, total: seen.append((done, total))) == 3
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert s.current == (2,) and pred.get_image_embedding() is before
    assert s.precompute() == 0 and len(calls) == 4

    s = PromptSession(pred, stack, cache_key="stack2")
    assert s.precompute([(3,), 1]) == 2 and s.current is None
    stops = iter([False, True])
    assert s.precompute(should_stop=lambda: next(stops)) == 1  # plane 0, then stop
    with pytest.raises(TypeError, match="indices must be an iterable"):
        s.precompute(5)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        s.precompute(batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        s.precompute(batch_size=1.0)
    with pytest.raises(ValueError, match="index must be a plane index"):
        s.precompute([(9,)])


def test_precompute_in_batches(pred, encoder_inputs):
    """Batched precompute encodes only missing planes, each as set_image would."""
    stack = _disk_stack(5, 5)
    s = PromptSession(pred, stack, cache_key="stack", contrast_limits=(0, 1500))
    assert s.batch_size == 1  # on the CPU
    s.embed((2,))
    seen = []
    progress = lambda done, total: seen.append((done, total))  # noqa: E731
    assert s.precompute(progress=progress, batch_size=2) == 4
    assert seen == [(2, 5), (4, 5), (5, 5)]
    # one encoder call per batch, with the missing planes only: [0, 1], [3], [4]
    batches = encoder_inputs[1:]
    assert [len(b) for b in batches] == [2, 1, 1]
    ref = Predictor(pred.model)
    for got, z in zip([*batches[0], batches[1][0], batches[2][0]], (0, 1, 3, 4), strict=True):
        ref.set_image(stack[z], contrast_limits=(0, 1500))
        torch.testing.assert_close(got[None], encoder_inputs.pop(), rtol=0, atol=0)
    n = len(encoder_inputs)
    assert all(s.embed((z,)) is False for z in range(5)) and len(encoder_inputs) == n
    assert s.current == (4,)  # (embed moved it; precompute had left it on plane 2)


@pytest.mark.parametrize(
    ("image", "kwargs", "error", "match"),
    [
        ([[1, 2], [3, 4]], {}, TypeError, "image must be an array"),
        (np.zeros((4, 4), dtype=complex), {}, TypeError, "bool, integer or float dtype"),
        (np.zeros((4, 4), dtype=object), {}, TypeError, "bool, integer or float dtype"),
        (np.zeros(4), {}, ValueError, "at least 2 dimensions"),
        (np.zeros((4, 4)), {"rgb": True}, ValueError, "at least 3 dimensions"),
        (np.zeros((4, 4, 5)), {"rgb": True}, ValueError, "last axis of 3 or 4"),
        (np.zeros((2, 4, 4, 3)), {"rgb": True, "channel_axis": 0}, ValueError, "together"),
        (np.zeros((2, 4, 4)), {"channel_axis": 1}, ValueError, "channel_axis=1 must index"),
        (np.zeros((2, 4, 4)), {"channel_axis": -1}, ValueError, "channel_axis=-1 must index"),
        (np.zeros((2, 4, 4)), {"channel_axis": 3}, ValueError, "channel_axis=3 must index"),
        (np.zeros((2, 4, 4)), {"channel_axis": -4}, ValueError, "must index"),
        (np.zeros((2, 4, 4)), {"channel_axis": "0"}, TypeError, "channel_axis must be an int"),
        (np.zeros((2, 4, 4)), {"channel_axis": True}, TypeError, "channel_axis must be an int"),
        (np.zeros((0, 4)), {}, ValueError, "planes must not be empty"),
        (np.zeros((4, 4)), {"channels": [0]}, ValueError, "image is grayscale"),
        (np.zeros((2, 4, 4)), {"channel_axis": 0, "channels": [2]}, ValueError, r"in \[0, 2\)"),
        (np.zeros((2, 4, 4)), {"channel_axis": 0, "channels": []}, ValueError, "1 to 3"),
        (np.zeros((4, 4, 3)), {"rgb": True, "channels": [0, 1, 2, 0]}, ValueError, "1 to 3"),
        (np.zeros((4, 4, 3)), {"rgb": True, "channels": "01"}, TypeError, "sequence of ints"),
        (np.zeros((4, 4, 3)), {"rgb": True, "channels": [0.5]}, TypeError, "sequence of ints"),
        (np.zeros((4, 4, 3)), {"rgb": True, "channels": 1}, TypeError, "sequence of ints"),
        (np.zeros((4, 4)), {"contrast_limits": (5, 1)}, ValueError, "contrast_limits must be"),
        (np.zeros((4, 4)), {"contrast_limits": (0, np.nan)}, ValueError, "contrast_limits"),
        (np.zeros((4, 4)), {"contrast_limits": "ab"}, ValueError, "contrast_limits must be"),
        (np.zeros((4, 4)), {"contrast_limits": (1, 2, 3)}, ValueError, "contrast_limits"),
        (np.zeros((4, 4)), {"cache": {}}, TypeError, "cache must be an EmbeddingCache"),
        (np.zeros((4, 4)), {"cache_key": ["a"]}, TypeError, "cache_key must be hashable"),
    ],
)
def test_session_construction_errors(pred, image, kwargs, error, match):
    with pytest.raises(error, match=match):
        PromptSession(pred, image, **kwargs)


def test_session_needs_predictor(tiny_model):
    with pytest.raises(TypeError, match="predictor must be a Predictor"):
        PromptSession(tiny_model, np.zeros((4, 4)))


def test_per_channel_contrast_limits(pred, tiny_model, rng, encoder_inputs):
    stack = rng.integers(0, 1000, size=(2, H, W), dtype=np.uint16)
    limits = [(0, 500), (100, 1000)]
    s = PromptSession(pred, stack, channel_axis=0, contrast_limits=limits)
    assert s.contrast_limits == ((0.0, 500.0), (100.0, 1000.0))
    s.embed(())
    kwargs = {"channel_axis": 0, "channels": [0, 1], "contrast_limits": limits}
    _same_input(encoder_inputs, Predictor(tiny_model), stack, **kwargs)


@pytest.mark.parametrize(
    ("index", "error", "match"),
    [
        ((0, 0), ValueError, "plane index within"),
        ((), ValueError, "plane index within"),
        ((3,), ValueError, "plane index within"),
        ((-1,), ValueError, "plane index within"),
        ((0.0,), TypeError, "index must be a tuple of ints"),
        ((True,), TypeError, "index must be a tuple of ints"),
        ("0", TypeError, "index must be a tuple of ints"),
        (None, TypeError, "index must be a tuple of ints"),
    ],
)
def test_index_errors(pred, index, error, match):
    s = PromptSession(pred, np.zeros((3, 4, 4)))
    with pytest.raises(error, match=match):
        s.embed(index)
    with pytest.raises(error, match=match):
        s.plane(index)


# --------------------------------------------------------------------------- cache


def _emb(value: float, size=(H, W)) -> ImageEmbedding:
    return ImageEmbedding(torch.full((1, 32, 8, 8), value), size, (96, 128))


def test_cache_lru_order():
    cache = EmbeddingCache(max_items=2)
    a, b, c = _emb(1), _emb(2), _emb(3)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a is now the most recent
    cache.put("c", c)
    assert "b" not in cache and cache.get("b") is None
    assert cache.keys() == ["a", "c"] and len(cache) == 2
    cache.put("a", b)  # replacing refreshes too
    cache.put("d", a)
    assert cache.keys() == ["a", "d"] and cache.get("a") is b
    cache.clear()
    assert len(cache) == 0 and "a" not in cache
    assert cache.file_for("a") is None  # no folder


def test_cache_disk_round_trip(tmp_path, session2d, direct):
    folder = tmp_path / "emb"
    cache = EmbeddingCache(max_items=1, folder=folder)
    assert folder.is_dir()
    key = ("layer", "fingerprint", (0,), (0.0, 4000.0))
    cache.put(key, direct.get_embedding())
    cache.put("other", _emb(0.5))  # evicts key from memory
    assert key in cache and len(cache) == 1
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and all(n.startswith("emb-") and n.endswith(".pt") for n in names)

    fresh = EmbeddingCache(folder=str(folder))
    assert len(fresh) == 0 and key in fresh
    loaded = fresh.get(key)
    assert len(fresh) == 1 and fresh.keys() == [key]  # promoted to memory
    assert loaded.original_size == (H, W) and loaded.input_size == direct.input_size
    other = Predictor(direct.model)
    other.set_embedding(loaded)
    for got, want in zip(
        other.predict(np.array([[5.0, 9.0]]), np.array([1])),
        direct.predict(np.array([[5.0, 9.0]]), np.array([1])),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    assert fresh.get(("missing",)) is None

    # a session over a disk cache computes nothing when the files are there
    s = PromptSession(direct, session2d.image, contrast_limits=(0, 4000), cache=fresh)
    assert s.embed(()) is True
    s2 = PromptSession(
        direct, session2d.image, contrast_limits=(0, 4000), cache=EmbeddingCache(folder=folder)
    )
    assert s2.embed(()) is False

    (folder / "notes.txt").write_text("keep me")
    fresh.clear(memory_only=True)
    assert len(fresh) == 0 and key in fresh
    fresh.clear()
    assert key not in fresh and [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_cache_bad_files(tmp_path):
    cache = EmbeddingCache(folder=tmp_path)
    cache.put("a", _emb(1))
    path_a = cache.file_for("a")
    assert path_a.is_file() and path_a.parent == tmp_path
    # a file under another key's name (e.g. a hash collision) is a miss
    path_a.rename(cache.file_for("b"))
    assert EmbeddingCache(folder=tmp_path).get("b") is None
    cache.file_for("c").write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match="ignoring unreadable embedding cache file"):
        assert EmbeddingCache(folder=tmp_path).get("c") is None


def test_cache_write_failure_warns_and_leaves_no_temp(tmp_path, monkeypatch):
    cache = EmbeddingCache(folder=tmp_path)

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.warns(RuntimeWarning, match="could not write the embedding cache file"):
        cache.put("a", _emb(1))
    assert list(tmp_path.iterdir()) == []
    assert cache.get("a") is not None  # still in memory

    def interrupted_save(obj, f):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        cache.put("b", _emb(1))
    assert list(tmp_path.iterdir()) == []


def test_cache_errors(tmp_path):
    with pytest.raises(ValueError, match="max_items must be >= 1, got 0"):
        EmbeddingCache(max_items=0)
    with pytest.raises(TypeError, match="max_items must be an int"):
        EmbeddingCache(max_items="2")
    with pytest.raises(TypeError, match="max_items must be an int"):
        EmbeddingCache(max_items=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="folder must be a directory"):
        EmbeddingCache(folder=tmp_path / "file")
    cache = EmbeddingCache()
    with pytest.raises(TypeError, match="embedding must be an ImageEmbedding"):
        cache.put("a", torch.zeros(1))
    with pytest.raises(TypeError, match="unhashable"):
        cache.put(["a"], _emb(1))


# --------------------------------------------------------------------------- commit / undo


def test_commit_and_undo(pred):
    s = PromptSession(pred, np.zeros((4, 5)))
    labels = np.zeros((4, 5), dtype=np.uint32)
    a = np.zeros((4, 5), dtype=bool)
    a[:2, :3] = True
    b = np.zeros((4, 5), dtype=bool)
    b[1:3, 2:5] = True
    states = [labels.copy()]
    assert s.commit(labels, a) == 1
    states.append(labels.copy())
    assert s.commit(labels, b) == 2
    states.append(labels.copy())
    # only background was painted: the overlap keeps id 1
    assert labels[1, 2] == 1 and labels[2, 4] == 2 and (labels[~(a | b)] == 0).all()
    assert s.commit(labels, b, overwrite=True) == 3
    assert (labels[b] == 3).all() and labels[0, 0] == 1
    assert s.commit(labels, a, label_id=7, overwrite=True) == 7
    assert s.commit(labels, ~(a | b)) == 8
    assert s.can_undo
    assert s.undo() == [8] and s.undo() == [7] and s.undo() == [3]
    np.testing.assert_array_equal(labels, states[2])
    assert s.undo() == [2]
    np.testing.assert_array_equal(labels, states[1])
    assert s.undo() == [1]
    np.testing.assert_array_equal(labels, states[0])
    assert s.undo() is None and not s.can_undo


def test_commit_into_stack_view_and_undo_into_copy(pred):
    s = PromptSession(pred, np.zeros((3, 4, 5)))
    stack = np.zeros((3, 4, 5), dtype=np.int16)
    stack[1, 0, 0] = 5
    after = np.full((4, 5), 6, dtype=np.int16)
    after[0, 0] = 5
    mask = np.ones((4, 5), dtype=bool)
    assert s.commit(stack[1], mask) == 6  # max of the plane + 1
    np.testing.assert_array_equal(stack[1], after)
    assert stack[0].max() == 0 and stack[2].max() == 0
    copy = stack[1].copy()
    assert s.undo(copy) == [6]
    assert copy[0, 0] == 5 and copy.sum() == 5
    np.testing.assert_array_equal(stack[1], after)
    s.commit(stack[1], mask, overwrite=True, label_id=2)
    assert (stack[1] == 2).all()
    with pytest.raises(ValueError, match=r"labels must be an array of shape \(4, 5\)"):
        s.undo(np.zeros((2, 2), dtype=np.int16))
    assert s.undo() == [2]  # the failed undo left the step
    np.testing.assert_array_equal(stack[1], after)


def test_a_new_session_adopts_the_undo_steps(pred):
    old = PromptSession(pred, np.zeros((4, 5)))
    labels = np.zeros((4, 5), dtype=np.uint32)
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 1:3] = True
    assert old.commit(labels, mask) == 1
    new = PromptSession(pred, np.ones((4, 5)))  # e.g. the same image with another model
    assert not new.can_undo
    new.adopt_undo(old)
    assert new.can_undo and new.undo() == [1] and labels.max() == 0
    with pytest.raises(ValueError, match=r"planes \(4, 5\) into a session of planes \(2, 2\)"):
        PromptSession(pred, np.zeros((2, 2))).adopt_undo(old)


def test_undo_depth_is_bounded(pred, monkeypatch):
    s = PromptSession(pred, np.zeros((2, 2)))
    assert s.max_undo == 64
    monkeypatch.setattr(s, "max_undo", 2)
    labels = np.zeros((2, 2), dtype=np.uint8)
    for i in range(4):
        m = np.zeros((2, 2), dtype=bool)
        m.flat[i] = True
        s.commit(labels, m)
    assert s.undo() == [4] and s.undo() == [3] and s.undo() is None
    np.testing.assert_array_equal(labels, [[1, 2], [0, 0]])


@pytest.mark.parametrize(
    ("labels", "mask", "kwargs", "error", "match"),
    [
        ([[0, 0], [0, 0]], "ones", {}, TypeError, "labels must be a numpy array"),
        (np.zeros((2, 2), float), "ones", {}, ValueError, "labels must have an integer dtype"),
        (np.zeros((2, 2), bool), "ones", {}, ValueError, "labels must have an integer dtype"),
        (np.zeros((2, 3), np.uint8), "ones", {}, ValueError, r"labels must have shape \(2, 2\)"),
        (np.zeros((2, 2), np.uint8), np.ones((2, 3), bool), {}, ValueError, "mask must have shape"),
        (np.zeros((2, 2), np.uint8), np.ones((2, 2)), {}, TypeError, "mask must be a bool array"),
        (np.zeros((2, 2), np.uint8), np.zeros((2, 2), bool), {}, ValueError, "mask is empty"),
        (np.ones((2, 2), np.uint8), "ones", {}, ValueError, "overwrite=True"),
        (np.full((2, 2), 255, np.uint8), "ones", {}, ValueError, "largest uint8 id"),
        (np.zeros((2, 2), np.uint8), "ones", {"label_id": 0}, ValueError, r"in \[1, 255\]"),
        (np.zeros((2, 2), np.uint8), "ones", {"label_id": 256}, ValueError, "label_id must be"),
        (np.zeros((2, 2), np.uint8), "ones", {"label_id": 1.0}, TypeError, "label_id must be"),
        (np.zeros((2, 2), np.uint8), "ones", {"label_id": True}, TypeError, "label_id must be"),
    ],
)
def test_commit_errors(pred, labels, mask, kwargs, error, match):
    s = PromptSession(pred, np.zeros((2, 2)))
    if isinstance(mask, str):
        mask = np.ones((2, 2), dtype=bool)
    with pytest.raises(error, match=match):
        s.commit(labels, mask, **kwargs)
    assert not s.can_undo


def test_commit_min_free_refuses_masks_mostly_inside_objects(pred):
    s = PromptSession(pred, np.zeros((4, 4)))
    labels = np.zeros((4, 4), np.uint8)
    labels[:2, :3] = 7  # 6 of the mask's 8 pixels labelled
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    before = labels.copy()
    with pytest.raises(ValueError, match=r"mostly inside existing objects: 2 of its 8 pixels"):
        s.commit(labels, mask, min_free=0.5)
    np.testing.assert_array_equal(labels, before)
    assert not s.can_undo
    with pytest.raises(ValueError, match=r"masks\[1\] lies mostly inside"):
        s.commit_many(labels, [np.eye(4, dtype=bool), mask], min_free=0.3)
    with pytest.raises(ValueError, match=r"min_free must be in \[0, 1\]"):
        s.commit(labels, mask, min_free=1.5)
    assert s.commit(labels, mask, min_free=0.25) == 8  # 2 of 8 free: enough
    assert (labels == 8).sum() == 2
    assert s.commit(labels, mask, overwrite=True, min_free=1.0) == 9  # overwrite: no rule
    assert (labels[:2] == 9).all()


def test_commit_read_only(pred):
    s = PromptSession(pred, np.zeros((2, 2)))
    labels = np.zeros((2, 2), np.uint8)
    labels.flags.writeable = False
    with pytest.raises(ValueError, match="labels is read-only"):
        s.commit(labels, np.ones((2, 2), bool))


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
    import torch

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


def test_commit_many_is_one_undo_step(pred):
    s = PromptSession(pred, np.zeros((4, 5)))
    labels = np.zeros((4, 5), dtype=np.uint16)
    labels[0, 0] = 3
    a = np.zeros((4, 5), dtype=bool)
    a[:2, :2] = True
    b = np.zeros((4, 5), dtype=bool)
    b[1:, 1:] = True
    before = labels.copy()
    assert s.commit_many(labels, [a, b]) == [4, 5]
    assert labels[0, 0] == 3 and labels[1, 1] == 4  # the existing object and the first mask
    assert labels[3, 4] == 5 and (labels[~(a | b)] == 0).all()
    assert s.commit_many(labels, np.stack([b, a]), label_ids=[9, 8], overwrite=True) == [9, 8]
    assert labels[1, 1] == 9 and labels[0, 0] == 8
    assert s.undo() == [9, 8] and s.undo() == [4, 5]
    np.testing.assert_array_equal(labels, before)


@pytest.mark.parametrize(
    ("masks", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "masks is empty"),
        ("one", {}, ValueError, r"use commit\(labels, \[mask\]\)"),
        ("pair", {"label_ids": [5]}, ValueError, "label_ids must hold 2 distinct ids"),
        ("pair", {"label_ids": [5, 5]}, ValueError, "label_ids must hold 2 distinct ids"),
        ("pair", {"label_ids": [5, 1.0]}, TypeError, "label_id must be an int"),
        ("same", {}, ValueError, r"masks\[1\] covers only pixels that already have a label"),
        ("pair_empty", {}, ValueError, r"masks\[1\] is empty"),
        ("full", {}, ValueError, "2 new id"),
    ],
)
def test_commit_many_errors(pred, masks, kwargs, error, match):
    s = PromptSession(pred, np.zeros((2, 2)))
    labels = np.zeros((2, 2), np.uint8)
    one = np.array([[True, False], [False, False]])
    other = np.array([[False, True], [False, False]])
    if isinstance(masks, str):
        masks = {
            "one": one, "pair": [one, other], "same": [one, one],
            "pair_empty": [one, np.zeros((2, 2), bool)], "full": [one, other],
        }[masks]  # fmt: skip
    if kwargs == {} and match == "2 new id":
        labels[1, 1] = 254
    before = labels.copy()
    with pytest.raises(error, match=match):
        s.commit_many(labels, masks, **kwargs)
    np.testing.assert_array_equal(labels, before)  # nothing painted
    assert not s.can_undo


def test_max_undo_errors_and_zero(pred):
    s = PromptSession(pred, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="max_undo must be >= 0"):
        s.max_undo = -1
    s.max_undo = 0
    labels = np.zeros((2, 2), np.uint8)
    assert s.commit(labels, np.ones((2, 2), bool)) == 1
    assert not s.can_undo and s.undo() is None


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
