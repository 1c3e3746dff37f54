"""The embedding store: layout, checks, errors, resume, and PromptSession reading it."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import zarr

from napari_mobilesam.build import build_sam
from napari_mobilesam.interactive import ImagePlanes, PromptSession
from napari_mobilesam.predictor import Predictor
from napari_mobilesam.store import (
    EmbeddingStore,
    StoreCache,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
    StoreWriteError,
    attach_store,
    embed_planes,
    image_fingerprint,
    open_for,
)
from napari_mobilesam.store.zarr_store import FORMAT_VERSION

from .conftest import GOLDEN_CKPT, TINY_CONFIG, _randomize, requires_golden

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def stack() -> np.ndarray:
    """A (4, 40, 50) uint16 stack with a bright square per plane."""
    rng = np.random.default_rng(3)
    data = rng.integers(100, 600, (4, 40, 50)).astype(np.uint16)
    for z in range(4):
        data[z, 10 + z : 25 + z, 12:30] += 3000
    return data


@pytest.fixture
def predictor(tiny_model) -> Predictor:
    return Predictor(tiny_model)


@pytest.fixture
def filled(tmp_path, stack, predictor) -> EmbeddingStore:
    store = open_for(tmp_path / "s.zarr", ImagePlanes(stack), predictor)
    embed_planes(store, ImagePlanes(stack), predictor)
    return store


PROMPTS = [
    {"points_rc": [[17, 20]]},
    {"points_rc": [[17, 20], [5, 5]], "labels": [1, 0]},
    {"box_rc": [8, 10, 30, 32]},
]


def _results(session, index):
    session.embed(index)
    return [session.predict(**p) for p in PROMPTS]


# -- the store itself ------------------------------------------------------------------


def test_layout_attributes_and_chunks(filled, stack, tiny_model):
    group = zarr.open_group(str(filled.path), mode="r")
    meta = group.attrs["napari_mobilesam_embeddings"]
    assert meta["version"] == FORMAT_VERSION and meta["tiles"]["grid"] == [1, 1]
    assert meta["image"] == image_fingerprint(ImagePlanes(stack))
    assert meta["image"]["plane_shape"] == [4] and meta["image"]["dtype"] == "<u2"
    assert meta["normalisation"] == {
        "channels": None, "contrast_limits": None, "percentiles": [0.5, 99.5],
    }  # fmt: skip
    assert meta["model"]["embedding_shape"] == [32, 8, 8]
    features = group["features"]
    assert features.shape == (4, 1, 32, 8, 8) and features.chunks == (1, 1, 32, 8, 8)
    assert filled.done() == [(0,), (1,), (2,), (3,)]
    embedding = filled.read((2,))
    assert embedding.original_size == (40, 50) and embedding.input_size == (102, 128)
    assert embedding.features.shape == (1, 32, 8, 8)


def test_a_single_image_is_one_plane(tmp_path, stack, predictor):
    planes = ImagePlanes(stack[0])
    store = open_for(tmp_path / "one.zarr", planes, predictor)
    assert store.done() == [] and not store.is_done(())
    assert embed_planes(store, planes, predictor).computed == 1
    assert store.done() == [()] and store.read(()).original_size == (40, 50)


def test_embeddings_are_the_sessions(filled, stack, predictor):
    """What the store holds is what PromptSession computes for the same plane."""
    session = PromptSession(predictor, stack)
    session.embed((1,))
    stored = filled.read((1,))
    assert torch.equal(stored.features, session.predictor.get_embedding().features.cpu())


def test_open_errors(tmp_path, filled):
    with pytest.raises(FileNotFoundError, match="no embedding store"):
        EmbeddingStore.open(tmp_path / "missing.zarr")
    with pytest.raises(ValueError, match="mode must be"):
        EmbeddingStore.open(filled.path, mode="w")
    (tmp_path / "other").mkdir()
    with pytest.raises(StoreMismatchError, match="is not an embedding store"):
        EmbeddingStore.open(tmp_path / "other")
    with pytest.raises(FileExistsError, match="exists"):
        EmbeddingStore.create(filled.path, dict(filled.meta))
    group = zarr.open_group(str(filled.path), mode="r+")
    group.attrs["napari_mobilesam_embeddings"] = {**filled.meta, "version": 99}
    with pytest.raises(StoreMismatchError, match="version 99"):
        EmbeddingStore.open(filled.path)


def test_plane_errors(tmp_path, stack, predictor, filled):
    with pytest.raises(ValueError, match="is not a plane"):
        filled.read((4,))
    with pytest.raises(TypeError, match="index"):
        filled.read(("a",))
    with pytest.raises(ValueError, match="batch_size"):
        embed_planes(filled, ImagePlanes(stack), predictor, batch_size=0)
    store = open_for(tmp_path / "new.zarr", ImagePlanes(stack), predictor)
    with pytest.raises(KeyError, match="not done"):
        store.read((0,))
    read_only = EmbeddingStore.open(filled.path)
    with pytest.raises(StoreError, match="read-only"):
        read_only.write((0,), filled.read((0,)), "0" * 40)


# -- PromptSession with a store --------------------------------------------------------


def test_session_results_equal_with_and_without_store(filled, stack, predictor):
    plain = PromptSession(predictor, stack)
    stored = PromptSession(predictor, stack)
    cache = attach_store(stored, filled)
    for index in [(0,), (3,)]:
        assert plain.embed(index) is True
        expected = _results(plain, index)
        assert stored.embed(index) is False  # loaded, no encoder run
        for got, want in zip(_results(stored, index), expected, strict=True):
            assert np.array_equal(got.masks, want.masks)
            assert np.array_equal(got.scores, want.scores)
            assert np.array_equal(got.mask_input, want.mask_input)
    assert cache.loads == 2
    assert stored.precompute() == 0  # every plane is in the store


def test_session_with_cache_key_reads_by_plane_index(filled, stack, predictor):
    session = PromptSession(predictor, stack, cache_key=("layer", "stack.tif"))
    cache = attach_store(session, filled.path)  # a path is opened read-only
    assert session.is_cached((2,)) and session.embed((2,)) is False
    assert cache.loads == 1


def test_session_computes_planes_the_store_lacks(tmp_path, stack, predictor):
    planes = ImagePlanes(stack)
    store = open_for(tmp_path / "part.zarr", planes, predictor)
    embed_planes(store, planes, predictor, should_stop=iter([False, True]).__next__)
    assert store.done() == [(0,)]
    session = PromptSession(predictor, stack)
    attach_store(session, store)
    assert session.embed((0,)) is False and session.embed((1,)) is True


def test_other_normalisation_keys_never_read_the_store(filled, stack, predictor):
    """Contrast limits make other embeddings: such a session is refused the store."""
    session = PromptSession(predictor, stack, contrast_limits=(0, 4000))
    with pytest.raises(StoreMismatchError, match=r"contrast_limits None != \[\[0\.0, 4000\.0\]\]"):
        attach_store(session, filled)
    with pytest.raises(TypeError, match="planes must be an ImagePlanes"):
        StoreCache(filled, stack, predictor.model)


def test_store_from_another_model(filled, stack, tiny_state_dict):
    other = _randomize(build_sam(TINY_CONFIG), seed=1).eval()
    session = PromptSession(Predictor(other), stack)
    with pytest.raises(StoreMismatchError) as info:
        attach_store(session, filled)
    message = str(info.value)
    assert str(filled.path) in message and "another model" in message
    assert "weights fingerprint" in message


def test_store_from_another_checkpoint(tmp_path, stack, tiny_model):
    """With checkpoints on both sides their sha256 decides, and the names must agree."""
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"weights a")
    second.write_bytes(b"weights b")
    tiny_model.model_name, tiny_model.checkpoint_path = "vit_t", first
    planes = ImagePlanes(stack)
    store = open_for(tmp_path / "s.zarr", planes, Predictor(tiny_model))
    assert store.meta["model"]["name"] == "vit_t"
    tiny_model.checkpoint_path = second
    with pytest.raises(StoreMismatchError, match=r"checkpoint sha256 .* \(model\)"):
        attach_store(PromptSession(Predictor(tiny_model), stack), store)
    tiny_model.model_name, tiny_model.checkpoint_path = "vit_b", first
    with pytest.raises(StoreMismatchError, match="model name 'vit_t' != 'vit_b'"):
        attach_store(PromptSession(Predictor(tiny_model), stack), store)


def test_store_from_another_image(filled, stack, predictor):
    changed = stack.copy()
    changed[-1, 0, 0] += 1  # the last plane's first row is sampled
    with pytest.raises(StoreMismatchError, match=r"another image: sample_sha256 .* \(image\)"):
        attach_store(PromptSession(predictor, changed), filled)
    with pytest.raises(StoreMismatchError, match=r"plane_shape \[4\] != \[3\]"):
        attach_store(PromptSession(predictor, stack[:3]), filled)
    with pytest.raises(StoreMismatchError, match="dtype '<u2' != '<f4'"):
        attach_store(PromptSession(predictor, stack.astype(np.float32)), filled)


def test_unsampled_pixel_changes_are_a_miss_not_a_wrong_embedding(filled, stack, predictor):
    """Pixels outside the fingerprint's sample: the per-plane sha1 does not match."""
    changed = stack.copy()
    changed[1, 1, 1] += 1  # plane 1 is not sampled (first, middle = 2, last)
    session = PromptSession(predictor, changed)
    cache = attach_store(session, filled)
    assert session.embed((1,)) is True and session.embed((2,)) is False
    assert cache.loads == 1


def test_threads_share_a_store_cache(filled, stack, predictor):
    session = PromptSession(predictor, stack)
    cache = attach_store(session, filled)
    barrier = threading.Barrier(2)

    def work(index):
        barrier.wait()
        return [session.embed(index), session.predict(points_rc=[[17, 20]]).scores]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(work, [(0,), (3,)]))
    assert [r[0] for r in results] == [False, False] and cache.loads == 2


# -- damage, disk full, resume ---------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "reason"), [("flip", "fails its sha256"), ("truncate", "cannot be read")]
)
def test_damaged_chunk_is_named_and_recomputed(filled, stack, predictor, damage, reason):
    chunk = filled.path / filled.chunk_name((2,))
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[100] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=r"features/2\.0\.0\.0\.0 of plane \(2,\)") as info:
        filled.read((2,))
    assert reason in str(info.value) and info.value.index == (2,)
    session = PromptSession(predictor, stack)
    attach_store(session, filled)
    with pytest.warns(RuntimeWarning, match=r"features/2\.0\.0\.0\.0.*computing the plane"):
        assert session.embed((2,)) is True
    with pytest.warns(RuntimeWarning, match="recomputing it now"):
        report = embed_planes(filled, ImagePlanes(stack), predictor)
    assert report.damaged == [(2,)] and report.computed == 1 and report.skipped == 3
    assert filled.verify() == []


def test_a_damaged_done_marker_means_not_done(filled, stack, predictor):
    marker = filled.path / "checksum" / "1.0.0"
    marker.write_bytes(marker.read_bytes()[:7])
    assert filled.done() == [(0,), (2,), (3,)] and not filled.is_done((1,))
    report = embed_planes(filled, ImagePlanes(stack), predictor)
    assert (report.computed, report.skipped) == (1, 3) and filled.verify() == []
    assert len(filled.done()) == 4


def test_disk_full_marks_nothing_done_and_resumes(tmp_path, stack, predictor, monkeypatch):
    planes = ImagePlanes(stack)
    store = open_for(tmp_path / "full.zarr", planes, predictor)
    real_set = zarr.storage.LocalStore.set

    async def full_at_plane_2(self, key, value):
        if key.startswith("features/2."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full_at_plane_2)
    with pytest.raises(StoreWriteError, match=r"plane \(2,\) .* the disk is full") as info:
        embed_planes(store, planes, predictor)
    assert info.value.errno == errno.ENOSPC and info.value.index == (2,)
    assert store.done() == [(0,), (1,)]
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    report = embed_planes(store, planes, predictor)
    assert (report.computed, report.skipped) == (2, 2)
    assert store.done() == [(0,), (1,), (2,), (3,)] and store.verify() == []


def test_reopening_for_another_image_is_refused(tmp_path, filled, stack, predictor):
    with pytest.raises(StoreMismatchError, match=str(filled.path)):
        open_for(filled.path, ImagePlanes(stack[:2]), predictor)
    with pytest.raises(StoreMismatchError, match=r"percentiles .* \(normalisation\)"):
        open_for(filled.path, ImagePlanes(stack), predictor, percentiles=(1, 99))


# -- mobilesam embed --------------------------------------------------------------------


def test_embed_command_resumes_and_the_session_reads_it(
    tmp_path, stack, embed_cli, tiny_model, capsys, monkeypatch
):
    run, calls = embed_cli
    source = tmp_path / "stack.npy"
    np.save(source, stack)
    out = tmp_path / "stack.emb.zarr"
    real_set = zarr.storage.LocalStore.set

    async def full_at_plane_3(self, key, value):
        if key.startswith("features/3."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full_at_plane_3)
    assert run(source, "-o", out, "-q") == 1
    assert "the disk is full" in capsys.readouterr().err and sum(calls) == 4
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    calls.clear()
    assert run(source, "-o", out, "-q") == 0
    assert "1 planes embedded, 3 already done" in capsys.readouterr().out
    assert calls == [1]  # only the missing plane went through the encoder
    store = EmbeddingStore.open(out)
    assert store.meta["model"]["checkpoint_sha256"] is not None
    plain, stored = (
        PromptSession(Predictor(tiny_model), stack),
        PromptSession(Predictor(tiny_model), stack),
    )
    attach_store(stored, store)
    calls.clear()
    expected = _results(plain, (3,))
    assert stored.embed((3,)) is False
    for got, want in zip(_results(stored, (3,)), expected, strict=True):
        assert np.array_equal(got.masks, want.masks) and np.array_equal(got.scores, want.scores)


def test_embed_command_channels_and_limits(tmp_path, embed_cli, tiny_model, capsys):
    """A (Z, C, Y, X) input: the picked channel and limits are recorded and match a
    session given the same channel and limits."""
    run, _ = embed_cli
    rng = np.random.default_rng(0)
    data = rng.integers(0, 5000, (2, 3, 30, 40)).astype(np.uint16)
    source = tmp_path / "zcyx.npy"
    np.save(source, data)
    out = tmp_path / "zcyx.zarr"
    assert run(source, "-o", out, "--axes", "ZCYX", "--channels", "1",
               "--contrast-limits", "10,4000", "-q") == 0  # fmt: skip
    store = EmbeddingStore.open(out)
    assert store.meta["normalisation"]["channels"] == [1]
    assert store.meta["normalisation"]["contrast_limits"] == [[10.0, 4000.0]]
    session = PromptSession(
        Predictor(tiny_model), data, channel_axis=1, channels=[1], contrast_limits=(10, 4000)
    )
    attach_store(session, store)
    assert session.embed((1,)) is False
    capsys.readouterr()
    assert run(source, "-o", out, "--axes", "ZCYX", "--channels", "2", "-q") == 1
    err = capsys.readouterr().err
    assert "another normalisation" in err and str(out) in err


def test_embed_command_errors(tmp_path, stack, embed_cli, capsys):
    run, _ = embed_cli
    source = tmp_path / "stack.npy"
    np.save(source, stack)
    not_a_store = tmp_path / "results"
    not_a_store.mkdir()
    (not_a_store / "keep.txt").write_text("mine")
    assert run(source, "-o", not_a_store) == 1
    assert "is not an embedding store" in capsys.readouterr().err
    assert (not_a_store / "keep.txt").read_text() == "mine"
    assert os.listdir(not_a_store) == ["keep.txt"]  # nothing written into it
    out = tmp_path / "o.zarr"
    assert run(source, "-o", out, "--contrast-limits", "1,2", "--percentiles", "1,99") == 2
    assert "not both" in capsys.readouterr().err
    assert run(source, "-o", out, "--contrast-limits", "1") == 2
    assert "--contrast-limits '1': give 2 comma-separated numbers" in capsys.readouterr().err
    assert run(source, "-o", out, "--channels", "a") == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert run(tmp_path / "missing.tif", "-o", out) == 1
    assert "no such file" in capsys.readouterr().err
    from napari_mobilesam.cli import main

    assert main(["embed", str(source), "-o", str(out), "--weights", "nope.pt"]) == 2
    assert "--weights nope.pt: no such file" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "a_file").write_text("mine")
    assert run(source, "-o", tmp_path / "a_file" / "s.zarr") == 1
    err = capsys.readouterr().err
    assert "a_file/s.zarr: cannot make the folder" in err and "to hold it" in err
    assert (tmp_path / "a_file").read_text() == "mine"
    nested = tmp_path / "new" / "deeper" / "s.zarr"  # missing folders are made
    assert run(source, "-o", nested) == 0 and nested.is_dir()


@requires_golden
@pytest.mark.slow
def test_embed_killed_and_rerun_keeps_finished_planes(tmp_path, stack):
    """A real ``mobilesam embed`` process, SIGKILLed after two planes, then rerun."""
    source = tmp_path / "stack.npy"
    np.save(source, np.concatenate([stack, stack[:2] // 2]))  # 6 planes
    out = tmp_path / "stack.emb.zarr"
    command = [sys.executable, "-m", "napari_mobilesam.cli", "embed", str(source), "-o",
               str(out), "--weights", str(GOLDEN_CKPT), "--device", "cpu", "-q"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 900  # generous: the machine may be busy
    done: list = []
    while time.monotonic() < deadline and proc.poll() is None and len(done) < 2:
        done = EmbeddingStore.open(out).done() if out.exists() else []
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    store = EmbeddingStore.open(out)
    before = {idx: store.read(idx).features for idx in store.done()}
    assert 2 <= len(before) < 6
    rerun = subprocess.run(command, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{6 - len(before)} planes embedded, {len(before)} already done" in rerun.stdout
    store = EmbeddingStore.open(out)
    assert len(store.done()) == 6 and store.verify() == []
    for idx, features in before.items():  # kept, not recomputed
        assert torch.equal(store.read(idx).features, features)


def test_embed_command_rgb_image_serves_an_rgb_session(tmp_path, embed_cli, tiny_model):
    """A PNG's colour channels, embedded by the command, match napari's ``rgb=True`` layer."""
    from PIL import Image

    run, _ = embed_cli
    rgb = np.random.default_rng(5).integers(0, 256, (36, 48, 3), dtype=np.uint8)
    source = tmp_path / "photo.png"
    Image.fromarray(rgb).save(source)
    out = tmp_path / "photo.zarr"
    assert run(source, "-o", out, "-q") == 0
    store = EmbeddingStore.open(out)
    assert store.meta["normalisation"]["channels"] == [0, 1, 2] and store.done() == [()]
    session = PromptSession(Predictor(tiny_model), rgb, rgb=True)
    cache = attach_store(session, store)
    assert session.embed(()) is False and cache.loads == 1
