"""The teacher-embedding store and ``embed_images`` (mobilesam-distill, step 1)."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_mobilesam.build import build_sam
from napari_mobilesam.distill import embed as embed_mod
from napari_mobilesam.distill.data import DataError, load_image, preprocess
from napari_mobilesam.distill.embed import embed_images
from napari_mobilesam.distill.models import config_to_dict
from napari_mobilesam.distill.store import EmbeddingStore

from .conftest import TINY_CONFIG, _randomize

SHAPE = (4, 2, 3)


# ---------------------------------------------------------------------- helpers
# (also used by test_distill_train.py)


def write_images(folder: Path, n: int = 6, seed: int = 0) -> list[str]:
    """``n`` synthetic RGB images of 64-128 px (jpg and png, some in a subfolder).

    Returns their relative posix paths in sorted order (the store's row order).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(64, 129, size=2))
        yy, xx = np.mgrid[:h, :w]
        img = np.stack([(xx * 255) // w, (yy * 255) // h, np.full_like(xx, 40 * i)], -1)
        img = (img + rng.integers(0, 30, size=img.shape)).clip(0, 255).astype(np.uint8)
        name = f"sa_{i}.jpg" if i % 2 == 0 else f"sub/img_{i}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / name)
        names.append(name)
    (folder / "sa_0.json").write_text(json.dumps({"annotations": []}))  # ignored
    return sorted(names)


def write_teacher(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A random TINY_CONFIG teacher: (JSON config path, weights path)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny.json"
    config.write_text(json.dumps(config_to_dict(TINY_CONFIG)))
    weights = folder / f"teacher_{seed}.pt"
    torch.save(_randomize(build_sam(TINY_CONFIG), seed=seed).state_dict(), weights)
    return config, weights


def expected_embeddings(weights: Path, paths: list[Path]) -> list[np.ndarray]:
    """The teacher encoder's float32 (C, h, w) output for each image, one at a time."""
    model = build_sam(TINY_CONFIG)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    out = []
    for path in paths:
        x, _ = preprocess(load_image(path), TINY_CONFIG.image_size)
        with torch.inference_mode():
            out.append(model.image_encoder(x[None])[0].numpy())
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: threads only add contention on shared CI machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def teacher(tmp_path):
    return write_teacher(tmp_path / "teacher")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    write_images(folder)
    return folder


# ---------------------------------------------------------------------- store


def _store(tmp_path, n=5, meta=None) -> EmbeddingStore:
    names = [f"im_{i}.jpg" for i in range(n)]
    return EmbeddingStore.create(tmp_path / "store", names, SHAPE, meta or {"teacher": "t"})


def test_store_round_trip(tmp_path):
    store = _store(tmp_path)
    assert len(store) == 5 and store.embed_shape == SHAPE
    assert not store.done().any() and store.failed() == {}
    data = torch.randn(2, *SHAPE, dtype=torch.float64)
    store.write([3, 1], data)
    store.mark_failed(4, "cannot read\nit")
    np.testing.assert_array_equal(store.done(), [False, True, False, True, False])
    for i, row in enumerate([3, 1]):
        got = store.read(row)
        assert got.dtype == np.float16 and got.shape == SHAPE
        np.testing.assert_array_equal(got, data[i].numpy().astype(np.float16))
    assert store.failed() == {4: "cannot read it"}

    again = EmbeddingStore.open(tmp_path / "store")
    assert again.images == store.images and again.embed_shape == SHAPE
    assert again.meta == {"teacher": "t"}
    np.testing.assert_array_equal(again.done(), store.done())
    assert again.failed() == {4: "cannot read it"}
    np.testing.assert_array_equal(again.read(1), store.read(1))
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    assert index["format"] == "mobilesam-embeddings" and index["version"] == 1
    assert index["dtype"] == "float16" and index["embed_shape"] == list(SHAPE)
    assert index["teacher"] == "t"

    # a failed row written later is no longer failed; numpy float32 input works
    again.write([4], np.ones((1, *SHAPE), np.float32))
    assert again.failed() == {}
    assert EmbeddingStore.open(tmp_path / "store").failed() == {}
    np.testing.assert_array_equal(again.read(4), np.ones(SHAPE, np.float16))


def test_store_zarr_layout(tmp_path):
    import zarr

    store = _store(tmp_path)
    store.write([0], np.zeros((1, *SHAPE)))  # all-zero chunks are stored too
    arr = zarr.open_array(str(tmp_path / "store" / "embeddings.zarr"), mode="r")
    assert arr.shape == (5, *SHAPE) and arr.chunks == (1, *SHAPE) and arr.dtype == np.float16
    assert (tmp_path / "store" / "embeddings.zarr" / "c" / "0" / "0" / "0" / "0").is_file()


def test_store_pickles_for_worker_processes(tmp_path):
    store = _store(tmp_path)
    store.write([2], torch.full((1, *SHAPE), 0.5))
    store.read(2)  # opens the array
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.read(2), np.full(SHAPE, 0.5, np.float16))


def test_truncated_log_lines_are_ignored_and_repaired(tmp_path):
    store = _store(tmp_path, n=20)
    store.write([0, 2], np.ones((2, *SHAPE)))
    store.mark_failed(5, "bad")
    folder = tmp_path / "store"
    with open(folder / "done.log", "a") as fh:
        fh.write("1")  # interrupted while appending "12\n"
    with open(folder / "failed.log", "a") as fh:
        fh.write("7\tinterr")
    again = EmbeddingStore.open(folder)
    assert again.done().nonzero()[0].tolist() == [0, 2]
    assert again.failed() == {5: "bad"}
    with pytest.raises(DataError, match="row 1 .* not been written"):
        again.read(1)
    # the next append first cuts the partial line: "1" must not become row 1 or 13
    again.write([3], np.ones((1, *SHAPE)))
    again.mark_failed(8, "worse")
    assert (folder / "done.log").read_text() == "0\n2\n3\n"
    third = EmbeddingStore.open(folder)
    assert third.done().nonzero()[0].tolist() == [0, 2, 3]
    assert third.failed() == {5: "bad", 8: "worse"}


def test_create_refuses_an_existing_store(tmp_path):
    _store(tmp_path)
    with pytest.raises(DataError, match="already holds an embedding store"):
        _store(tmp_path)


def test_create_replaces_an_interrupted_create(tmp_path):
    store = _store(tmp_path)
    store.write([1], np.ones((1, *SHAPE)))
    (tmp_path / "store" / "index.json").unlink()  # crash before the index was written
    fresh = _store(tmp_path, n=3)
    assert len(fresh) == 3 and not fresh.done().any()
    assert not EmbeddingStore.open(tmp_path / "store").done().any()


@pytest.mark.parametrize(
    ("images", "shape", "meta", "message"),
    [
        ([], SHAPE, {}, "at least one image"),
        (["a.jpg", "a.jpg"], SHAPE, {}, "'a.jpg' more than once"),
        (["a.jpg"], (4, 2), {}, "three positive integers"),
        (["a.jpg"], (4, 0, 2), {}, "three positive integers"),
        (["a.jpg"], (4, 2.5, 2), {}, "three positive integers"),
        (["a.jpg"], SHAPE, {"images": 1}, "reserved keys"),
        (["a.jpg"], SHAPE, {"x": object()}, "not JSON-able"),
    ],
)
def test_create_argument_errors(tmp_path, images, shape, meta, message):
    with pytest.raises(ValueError, match=message):
        EmbeddingStore.create(tmp_path / "s", images, shape, meta)
    assert not (tmp_path / "s" / "index.json").exists()


def _edit_index(folder: Path, **changes) -> None:
    index = json.loads((folder / "index.json").read_text())
    index.update(changes)
    (folder / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: shutil.rmtree(f), "is not an embedding store .no index.json"),
        (lambda f: (f / "index.json").write_text("{oops"), "cannot read .*index.json"),
        (lambda f: _edit_index(f, format="other"), "does not describe an embedding store"),
        (lambda f: (f / "index.json").write_text("[1]"), "does not describe an embedding store"),
        (lambda f: _edit_index(f, version=2), "has version 2"),
        (lambda f: _edit_index(f, images="a.jpg"), "'images' is not a list"),
        (lambda f: _edit_index(f, embed_shape=[4, 2]), "three positive integers"),
        (lambda f: shutil.rmtree(f / "embeddings.zarr"), "cannot open embeddings.zarr"),
        (lambda f: _edit_index(f, embed_shape=[4, 2, 2]), r"shape \(5, 4, 2, 3\)"),
        # more images than rows (fewer is an interrupted extend(), see below)
        (lambda f: _edit_index(f, images=[f"{i}.jpg" for i in range(6)]), r"shape \(5, 4, 2, 3\)"),
    ],
)
def test_open_errors_name_the_store(tmp_path, damage, message):
    _store(tmp_path)
    folder = tmp_path / "store"
    damage(folder)
    with pytest.raises(DataError, match=message) as info:
        EmbeddingStore.open(folder)
    assert str(folder) in str(info.value)


def test_write_and_read_errors(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 2, 3\) for 2 rows"):
        store.write([0, 1], np.zeros((1, *SHAPE)))
    with pytest.raises(ValueError, match="must not repeat"):
        store.write([0, 0], np.zeros((2, *SHAPE)))
    with pytest.raises(ValueError, match="row 5 is out of range"):
        store.write([5], np.zeros((1, *SHAPE)))
    with pytest.raises(TypeError, match="row must be an integer"):
        store.read(1.0)
    with pytest.raises(TypeError, match="floating point"):
        store.write([0], np.zeros((1, *SHAPE), np.int32))
    with pytest.raises(TypeError, match="floating point"):
        store.write([0], torch.zeros((1, *SHAPE), dtype=torch.int32))
    with pytest.raises(DataError, match="row 0 .'im_0.jpg'. has not been written"):
        store.read(0)
    assert not store.done().any()
    store.write([], np.zeros((0, *SHAPE)))  # nothing to do
    assert (tmp_path / "store" / "done.log").read_text() == ""


# ---------------------------------------------------------------------- embed


def test_embed_stores_the_teacher_encoder_output(tmp_path, teacher, images):
    config, weights = teacher
    out = tmp_path / "emb"
    res = embed_images(config, weights, images, out, batch_size=2, workers=0, progress=False)
    assert res["total"] == res["computed"] == 6
    assert res["skipped"] == res["failed"] == 0 and res["store"] == str(out)
    assert res["seconds"] >= 0
    store = EmbeddingStore.open(out)
    assert store.images == write_images(tmp_path / "again")  # sorted relative posix paths
    assert store.embed_shape == (32, 8, 8) and store.done().all()
    from napari_mobilesam.weights import sha256_file

    meta = store.meta
    assert meta["teacher"] == str(config)
    assert meta["teacher_sha256"] == sha256_file(weights)
    assert meta["teacher_weights"] == str(weights.resolve())
    assert meta["img_size"] == 128
    np.testing.assert_allclose(meta["pixel_mean"], TINY_CONFIG.pixel_mean, rtol=1e-6)
    np.testing.assert_allclose(meta["pixel_std"], TINY_CONFIG.pixel_std, rtol=1e-6)
    assert meta["teacher_config"] == config_to_dict(TINY_CONFIG)
    wants = expected_embeddings(weights, [images / rel for rel in store.images])
    for row, want in enumerate(wants):
        got = store.read(row).astype(np.float32)
        assert np.abs(want).max() > 0.01
        # float16 rounding (relative 2**-11) plus float32 batch-size noise
        np.testing.assert_allclose(got, want, rtol=2**-10, atol=1e-5)


def test_embed_with_worker_processes_and_sam_config(tmp_path, teacher, images):
    _, weights = teacher
    a = embed_images(TINY_CONFIG, weights, images, tmp_path / "a", workers=0, progress=False)
    b = embed_images(
        TINY_CONFIG, weights, images, tmp_path / "b", batch_size=4, workers=2, progress=False
    )
    assert a["computed"] == b["computed"] == 6
    sa, sb = EmbeddingStore.open(tmp_path / "a"), EmbeddingStore.open(tmp_path / "b")
    assert sa.meta["teacher"] == "custom"
    for row in range(6):
        np.testing.assert_allclose(
            sa.read(row).astype(np.float32), sb.read(row).astype(np.float32), rtol=2**-9, atol=1e-5
        )


def _count_calls(monkeypatch):
    """Record the images read and the batch sizes the encoder sees."""
    seen = {"read": [], "encoded": 0, "loads": 0}
    real_load_image, real_load_sam = embed_mod.load_image, embed_mod.load_sam

    def load_image(path):
        seen["read"].append(Path(path).name)
        return real_load_image(path)

    def load_sam(*args, **kwargs):
        seen["loads"] += 1
        model = real_load_sam(*args, **kwargs)
        forward = model.image_encoder.forward

        def counted(x):
            seen["encoded"] += x.shape[0]
            return forward(x)

        model.image_encoder.forward = counted
        return model

    monkeypatch.setattr(embed_mod, "load_image", load_image)
    monkeypatch.setattr(embed_mod, "load_sam", load_sam)
    return seen


def test_embed_resumes_skipping_done_rows(tmp_path, teacher, images, monkeypatch):
    config, weights = teacher
    out = tmp_path / "emb"
    embed_images(config, weights, images, out, workers=0, progress=False)
    before = EmbeddingStore.open(out)
    first = [before.read(r) for r in range(6)]
    # forget rows 1 and 4, as if the run had stopped before writing them
    (out / "done.log").write_text("".join(f"{r}\n" for r in (0, 2, 3, 5)))
    seen = _count_calls(monkeypatch)
    res = embed_images(config, weights, images, out, batch_size=2, workers=0, progress=False)
    assert (res["computed"], res["skipped"], res["failed"], res["total"]) == (2, 4, 0, 6)
    assert seen["encoded"] == 2
    assert sorted(seen["read"]) == sorted(Path(before.images[r]).name for r in (1, 4))
    after = EmbeddingStore.open(out)
    assert after.done().all()
    for r in range(6):
        np.testing.assert_allclose(after.read(r), first[r], rtol=2**-9, atol=1e-5)

    # everything done: nothing is read, the model is not even loaded
    res = embed_images(config, weights, images, out, workers=0, progress=False)
    assert (res["computed"], res["skipped"]) == (0, 6)
    assert seen["loads"] == 1 and seen["encoded"] == 2


def test_embed_grows_the_store_with_new_images(tmp_path, teacher, images, monkeypatch):
    """A larger --limit, or images added to the folder later: only they are embedded."""
    config, weights = teacher
    out = tmp_path / "emb"
    embed_images(config, weights, images, out, workers=0, limit=3, progress=False)
    first = EmbeddingStore.open(out)
    kept = [first.read(r) for r in range(3)]
    (images / "sub/img_5.png").rename(images / "a_new.png")  # sorts first now
    seen = _count_calls(monkeypatch)
    res = embed_images(config, weights, images, out, batch_size=2, workers=0, progress=False)
    assert (res["total"], res["computed"], res["skipped"]) == (6, 3, 3)
    assert sorted(seen["read"]) == ["a_new.png", "img_1.png", "img_3.png"]
    store = EmbeddingStore.open(out)
    assert first.images == ["sa_0.jpg", "sa_2.jpg", "sa_4.jpg"]
    assert store.images == [*first.images, "a_new.png", "sub/img_1.png", "sub/img_3.png"]
    assert store.done().all()
    for r in range(3):
        np.testing.assert_array_equal(store.read(r), kept[r])  # not recomputed
    wants = expected_embeddings(weights, [images / rel for rel in store.images[3:]])
    for row, want in zip(range(3, 6), wants, strict=True):
        np.testing.assert_allclose(store.read(row).astype(np.float32), want, rtol=2**-10,
                                   atol=1e-5)  # fmt: skip
    # a smaller --limit again: nothing to do, nothing lost
    res = embed_images(config, weights, images, out, workers=0, limit=2, progress=False)
    assert (res["total"], res["computed"], res["skipped"]) == (2, 0, 2)
    assert len(EmbeddingStore.open(out)) == 6


def test_store_extend_survives_an_interruption(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.write([0], np.ones((1, *SHAPE)))

    def interrupted(self, images):  # the array grows, then the run dies before the index
        self._array(write=True).resize((len(self) + 7, *self.embed_shape))
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(EmbeddingStore, "extend", interrupted)
        with pytest.raises(KeyboardInterrupt):
            store.extend(["x.jpg"])
    again = EmbeddingStore.open(tmp_path / "store")
    assert again.images == store.images and again.done()[0] and not again.done()[1:].any()
    assert again.extend(["im_1.jpg", "x.jpg", "y.jpg"]) == 2  # im_1 is there already
    again.write([len(again) - 1], np.full((1, *SHAPE), 2.0))
    reopened = EmbeddingStore.open(tmp_path / "store")
    assert reopened.images[-2:] == ["x.jpg", "y.jpg"] and reopened.done()[[0, -1]].all()
    np.testing.assert_array_equal(reopened.read(len(reopened) - 1), np.full(SHAPE, 2.0))
    np.testing.assert_array_equal(reopened.read(0), np.ones(SHAPE))
    with pytest.raises(ValueError, match="more than once"):
        reopened.extend(["z.jpg", "z.jpg"])


def test_embed_resume_refuses_other_images_or_teacher(tmp_path, teacher, images):
    config, weights = teacher
    out = tmp_path / "emb"
    embed_images(config, weights, images, out, workers=0, limit=3, progress=False)
    (images / "sa_0.jpg").rename(images / "sa_00.jpg")
    with pytest.raises(DataError, match="no longer has .'sa_0.jpg'.; use a new --out"):
        embed_images(config, weights, images, out, workers=0, limit=3, progress=False)
    (images / "sa_00.jpg").rename(images / "sa_0.jpg")
    _, other = write_teacher(tmp_path / "other", seed=1)
    with pytest.raises(DataError, match="teacher weights of sha256 .*--out"):
        embed_images(config, other, images, out, workers=0, limit=3, progress=False)
    import dataclasses

    small = dataclasses.replace(
        TINY_CONFIG, encoder=dataclasses.replace(TINY_CONFIG.encoder, img_size=64)
    )
    with pytest.raises(DataError, match=r"holds 128 px -> \(32, 8, 8\).* makes 64 px"):
        embed_images(small, weights, images, out, workers=0, limit=3, progress=False)


def test_embed_records_unreadable_images_and_retries_them(tmp_path, teacher, images):
    config, weights = teacher
    good = (images / "sa_2.jpg").read_bytes()
    (images / "sa_2.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "emb"
    with pytest.warns(UserWarning, match="unreadable image.*sa_2.jpg"):
        res = embed_images(config, weights, images, out, batch_size=4, workers=0, progress=False)
    assert (res["computed"], res["failed"]) == (5, 1)
    store = EmbeddingStore.open(out)
    row = store.images.index("sa_2.jpg")
    assert list(store.failed()) == [row] and "sa_2.jpg" in store.failed()[row]
    assert store.done().sum() == 5 and not store.done()[row]

    (images / "sa_2.jpg").write_bytes(good)  # fixed: retried on resume
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = embed_images(config, weights, images, out, workers=0, progress=False)
    assert (res["computed"], res["skipped"], res["failed"]) == (1, 5, 0)
    store = EmbeddingStore.open(out)
    assert store.done().all() and store.failed() == {}
    (want,) = expected_embeddings(weights, [images / "sa_2.jpg"])
    np.testing.assert_allclose(store.read(row).astype(np.float32), want, rtol=2**-10, atol=1e-5)


def test_embed_limit_takes_the_first_images(tmp_path, teacher, images):
    config, weights = teacher
    res = embed_images(config, weights, images, tmp_path / "emb", limit=2, workers=0,
                       progress=False)  # fmt: skip
    assert res["total"] == res["computed"] == 2
    assert EmbeddingStore.open(tmp_path / "emb").images == write_images(tmp_path / "x")[:2]


def test_embed_argument_errors(tmp_path, teacher, images):
    config, weights = teacher
    out = tmp_path / "emb"
    for kwargs, message in [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"workers": -1}, "workers must be a non-negative integer"),
        ({"limit": 0}, "limit must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            embed_images(config, weights, images, out, progress=False, **kwargs)
    with pytest.raises(ValueError, match="unknown model 'vit_q'"):
        embed_images("vit_q", weights, images, out, progress=False)
    with pytest.raises(FileNotFoundError, match="teacher weights .*missing.pt"):
        embed_images(config, tmp_path / "missing.pt", images, out, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        embed_images(config, weights, tmp_path / "empty", out, progress=False)
    assert not out.exists()


def test_embed_checks_the_encoder_output_shape(tmp_path, teacher, images, monkeypatch):
    config, weights = teacher
    real = embed_mod.load_sam

    def wrong(*args, **kwargs):
        model = real(*args, **kwargs)
        forward = model.image_encoder.forward
        model.image_encoder.forward = lambda x: forward(x)[:, :16]
        return model

    monkeypatch.setattr(embed_mod, "load_sam", wrong)
    with pytest.raises(ValueError, match=r"shape \(16, 8, 8\), the store expects \(32, 8, 8\)"):
        embed_images(config, weights, images, tmp_path / "emb", workers=0, progress=False)
