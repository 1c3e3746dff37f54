"""PromptSession on stacks and channels, and EmbeddingCache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mobilesam.interactive import (
    EmbeddingCache,
    PromptSession,
)
from napari_mobilesam.predictor import ImageEmbedding, Predictor

from .common import H, W, _disk_stack, _same_input

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

    from ..conftest import TINY_CONFIG, _randomize

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
