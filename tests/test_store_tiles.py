"""Embedding stores of tiled planes: made tile by tile (resumably), read by a tiled
PromptSession instead of its encoder, refused when the tiles differ."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mobilesam import embed_command
from napari_mobilesam.interactive import ImagePlanes, PromptSession, tiles
from napari_mobilesam.interactive.tiles import TileGrid
from napari_mobilesam.predictor import Predictor
from napari_mobilesam.store import (
    EmbeddingStore,
    StoreCorruptError,
    StoreMismatchError,
    attach_store,
    embed_planes,
    open_for,
)

TILES = {"tile_threshold": 256, "tile_size": 128, "tile_overlap": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def stack() -> np.ndarray:
    """(2, 300, 340) uint16: bright disks on noise, different per plane."""
    rng = np.random.default_rng(5)
    data = rng.normal(800, 80, size=(2, 300, 340))
    yy, xx = np.mgrid[:300, :340]
    for z in range(2):
        for r, c in rng.integers(20, 280, size=(10, 2)):
            data[z][(yy - r) ** 2 + (xx - c) ** 2 < 150] += 2500
    return data.astype(np.uint16)


def _grid() -> TileGrid:
    return TileGrid((300, 340), TILES["tile_size"], TILES["tile_overlap"])


def _filled(path, stack, predictor) -> EmbeddingStore:
    store = open_for(path, ImagePlanes(stack), predictor, tiles=_grid())
    embed_planes(store, ImagePlanes(stack), predictor)
    return store


PROMPTS = [
    {"points_rc": [[150, 170]]},
    {"points_rc": [[20, 30], [60, 60]], "labels": [1, 0]},
    {"box_rc": [40, 50, 250, 300]},  # stitched over several tiles
]


@pytest.mark.parametrize("cache_key", [None, ("layer", "stack.tif")])
def test_a_tiled_session_reads_every_tile_from_the_store(
    tmp_path, stack, tiny_model, encoder_calls, cache_key
):
    predictor = Predictor(tiny_model)
    steps = []
    store = open_for(tmp_path / "s.zarr", ImagePlanes(stack), predictor, tiles=_grid())
    report = embed_planes(store, ImagePlanes(stack), predictor, progress=steps.append)
    assert store.n_tiles == 12 and report.computed == 24 and sum(steps) == 24
    assert store.meta["tiles"] == {"grid": [3, 4], "size": 128, "overlap": 32}
    assert store.done() == [(0,), (1,)]
    plain = PromptSession(Predictor(tiny_model), stack, cache_key=cache_key, **TILES)
    expected = {}
    for z in (0, 1):
        plain.embed((z,))
        expected[z] = [plain.predict(**p) for p in PROMPTS]
    encoder_calls.clear()
    session = PromptSession(Predictor(tiny_model), stack, cache_key=cache_key, **TILES)
    cache = attach_store(session, EmbeddingStore.open(store.path))
    for z in (1, 0):
        session.embed((z,))
        for p, want in zip(PROMPTS, expected[z], strict=True):
            got = session.predict(**p)
            np.testing.assert_array_equal(got.masks, want.masks)
            np.testing.assert_array_equal(got.scores, want.scores)
            assert got.window == want.window
    assert encoder_calls == [] and cache.loads > 0
    assert session.is_cached((0,)) and session.precompute() == 0 and encoder_calls == []


def test_tiled_embedding_resumes_tile_by_tile(tmp_path, stack, tiny_model, encoder_calls):
    predictor = Predictor(tiny_model)
    planes = ImagePlanes(stack)
    store = open_for(tmp_path / "s.zarr", planes, predictor, tiles=_grid())
    stops = iter([False] * 5 + [True])
    first = embed_planes(store, planes, predictor, should_stop=lambda: next(stops))
    assert first.computed == 5 and store.done() == []
    assert [store.is_tile_done((0,), t) for t in range(6)] == [True] * 5 + [False]
    again = open_for(store.path, planes, predictor, tiles=_grid())
    encoder_calls.clear()
    second = embed_planes(again, planes, predictor)
    assert (second.skipped, second.computed, len(encoder_calls)) == (5, 19, 19)
    assert again.done() == [(0,), (1,)] and again.verify() == []
    assert again.source_sha1((0,)) is None and again.find("0" * 40) is None  # tiled


def test_a_damaged_tile_is_named_and_recomputed(tmp_path, stack, tiny_model):
    predictor = Predictor(tiny_model)
    store = _filled(tmp_path / "s.zarr", stack, predictor)
    chunk = store.path / "features" / "1.5.0.0.0"
    assert store.chunk_name((1,), 5) == "features/1.5.0.0.0" and chunk.exists()
    chunk.write_bytes(chunk.read_bytes()[:100])
    (err,) = store.verify()
    assert (err.index, err.tile) == ((1,), 5) and "features/1.5.0.0.0" in str(err)
    with pytest.raises(StoreCorruptError, match="cannot be read"):
        store.read((1,), 5)
    with pytest.warns(RuntimeWarning, match="features/1.5.0.0.0"):
        report = embed_planes(store, ImagePlanes(stack), predictor)
    assert report.damaged == [(1,)] and report.computed == 1 and store.verify() == []


def test_tiles_must_match(tmp_path, stack, tiny_model):
    predictor = Predictor(tiny_model)
    store = _filled(tmp_path / "s.zarr", stack, predictor)
    untiled = PromptSession(predictor, stack, tile_threshold=None)
    with pytest.raises(StoreMismatchError, match=r"3x4 tiles of 128 px, overlap 32 != whole"):
        attach_store(untiled, store.path)
    other = PromptSession(predictor, stack, **{**TILES, "tile_overlap": 16})
    with pytest.raises(StoreMismatchError, match=r"--tile-threshold 0"):
        attach_store(other, store.path)
    with pytest.raises(StoreMismatchError, match="(tiles)"):
        open_for(store.path, ImagePlanes(stack), predictor)  # whole planes asked
    with pytest.raises(ValueError, match="tiles cover planes of"):
        open_for(tmp_path / "t.zarr", ImagePlanes(stack), predictor, tiles=TileGrid((10, 10)))
    with pytest.raises(TypeError, match="tiles must be a TileGrid"):
        open_for(tmp_path / "t.zarr", ImagePlanes(stack), predictor, tiles=(128, 32))
    with pytest.raises(ValueError, match="tile 12 is not one of the 12 tiles"):
        store.read((0,), 12)
    with pytest.raises(KeyError, match="tile 3 of plane"):
        open_for(tmp_path / "u.zarr", ImagePlanes(stack), predictor, tiles=_grid()).read((0,), 3)


def test_embed_command_tiles_large_planes(tmp_path, stack, tiny_model, monkeypatch, capsys):
    from napari_mobilesam import build
    from napari_mobilesam.cli import main

    monkeypatch.setattr(build, "load_model", lambda *a, **k: tiny_model)
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"the tiny model's stand-in")
    source = tmp_path / "big.npy"
    np.save(source, stack)
    out = tmp_path / "big.zarr"

    def run(*args):
        return main(["embed", str(source), "-o", str(out), "--weights", str(weights),
                     "--device", "cpu", "-q", *args])  # fmt: skip

    assert run("--tile-threshold", "256", "--tile-size", "128", "--tile-overlap", "32") == 0
    assert "24 tiles (12 per plane) embedded, 0 already done" in capsys.readouterr().out
    store = EmbeddingStore.open(out)
    assert store.n_tiles == 12 and store.done() == [(0,), (1,)]
    session = PromptSession(Predictor(tiny_model), stack, **TILES)
    attach_store(session, out)
    assert run("--tile-threshold", "0") == 1  # whole planes into the tiled store: refused
    assert "(tiles)" in capsys.readouterr().err
    assert run("--tile-threshold", "-1") == 2
    assert "--tile-threshold must be >= 0" in capsys.readouterr().err
    assert run("--tile-threshold", "100", "--tile-size", "128", "--tile-overlap", "128") == 2
    assert "overlap must be smaller than tile_size" in capsys.readouterr().err


def test_the_command_line_defaults_are_the_sessions():
    assert embed_command.DEFAULT_TILE_THRESHOLD == tiles.DEFAULT_TILE_THRESHOLD
    assert embed_command.DEFAULT_TILE_SIZE == tiles.DEFAULT_TILE_SIZE
    assert embed_command.DEFAULT_TILE_OVERLAP == tiles.DEFAULT_TILE_OVERLAP
