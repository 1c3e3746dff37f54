"""``mobilesam-everything --embeddings STORE``: a store made by ``mobilesam embed``'s API
is checked against the input, serves the planes it holds (no encoder run for them), and
the labels are bit for bit those of a run without it; mismatches and misuse are named.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from mobilesam_batch import segment
from mobilesam_batch.embeddings import plane_embedding, source_planes
from mobilesam_batch.inputs import open_source
from napari_mobilesam.build import build_sam
from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.predictor import Predictor
from napari_mobilesam.store import EmbeddingStore, embed_planes, open_for

from .conftest import TINY_CONFIG, _randomize

FAST = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _stack(seed: int = 0) -> np.ndarray:
    """(3, 64, 96) uint16: a few bright disks per plane on noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :96]
    out = rng.integers(200, 900, (3, 64, 96)).astype(np.uint16)
    for z in range(3):
        for _ in range(4):
            r, c, rad = rng.integers(12, 52), rng.integers(12, 84), rng.integers(5, 11)
            out[z][(yy - r) ** 2 + (xx - c) ** 2 < rad**2] += 20000
    return out


@pytest.fixture
def stack_tif(tmp_path) -> Path:
    path = tmp_path / "in" / "stack.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, _stack(), imagej=True, metadata={"axes": "ZYX"})
    return path


def _embed(image: Path, store: Path, model, *, limits=None, percentiles=(0.5, 99.5)) -> Path:
    """What ``mobilesam embed IMAGE -o STORE`` does, with ``model``."""
    with open_source(image, None) as src:
        planes = source_planes(src, None, limits)
        predictor = Predictor(model)
        filled = open_for(store, planes, predictor, percentiles)
        embed_planes(filled, planes, predictor, percentiles=percentiles)
    return store


def _labels(outdir: Path, stem: str = "stack") -> bytes:
    return tifffile.imread(outdir / f"{stem}_labels.tif").tobytes()


def _record(outdir: Path, stem: str = "stack") -> dict:
    return json.loads((outdir / f"{stem}_labels.json").read_text())


def test_labels_identical_and_no_encoder_run(tiny_cli, tiny_model, stack_tif, tmp_path,
                                             encoder_calls):  # fmt: skip
    store = _embed(stack_tif, tmp_path / "stack.embeddings.zarr", tiny_model)
    encoder_calls.clear()
    assert tiny_cli([str(stack_tif), "-o", str(tmp_path / "plain"), *FAST]) == 0
    assert sum(encoder_calls) == 3  # every plane embedded
    encoder_calls.clear()
    args = [str(stack_tif), "-o", str(tmp_path / "reused"), *FAST, "--embeddings", str(store)]
    assert tiny_cli(args) == 0
    assert encoder_calls == []  # every plane came from the store
    assert _labels(tmp_path / "reused") == _labels(tmp_path / "plain")
    assert _labels(tmp_path / "plain") != bytes(len(_labels(tmp_path / "plain")))  # objects

    record = _record(tmp_path / "reused")["embeddings"]
    assert record["path"] == str(store.resolve())
    assert record["planes_from_store"] == [[0], [1], [2]]
    assert record["planes_done"] == 3
    meta = EmbeddingStore.open(store).meta
    assert record["image"]["sample_sha256"] == meta["image"]["sample_sha256"]
    assert record["normalisation"] == meta["normalisation"]
    assert record["model"]["name"] is None  # the tiny model has no registry name
    assert "embeddings" not in _record(tmp_path / "plain")


def test_link_extend_reads_the_store_too(tiny_cli, tiny_model, stack_tif, tmp_path,
                                         encoder_calls, monkeypatch):  # fmt: skip
    """--link-extend prompts planes again: their embeddings come from the store as well."""
    store = _embed(stack_tif, tmp_path / "stack.embeddings.zarr", tiny_model)
    segment_plane = segment.PlaneSegmenter.segment

    def first_plane_only(self, plane, index=(), embeddings=None):
        result = segment_plane(self, plane, index, embeddings)
        if index != (0,):  # objects in plane 0 only: the extension prompts plane 1
            result.labels[...] = 0
        return result

    monkeypatch.setattr(segment.PlaneSegmenter, "segment", first_plane_only)
    link = ["--link", "z", "--link-extend"]
    encoder_calls.clear()
    assert tiny_cli([str(stack_tif), "-o", str(tmp_path / "plain"), *FAST, *link]) == 0
    plain = _record(tmp_path / "plain")["linked"]["extended"]
    assert plain["planes_prompted"] > 0 and plain["embeddings_from_store"] == 0
    assert sum(encoder_calls) == 3 + plain["encoder_runs"] == 3 + plain["planes_prompted"]
    encoder_calls.clear()
    args = [str(stack_tif), "-o", str(tmp_path / "reused"), *FAST, *link, "--embeddings",
            str(store)]  # fmt: skip
    assert tiny_cli(args) == 0
    assert encoder_calls == []
    reused = _record(tmp_path / "reused")["linked"]["extended"]
    assert reused["encoder_runs"] == 0
    assert reused["embeddings_from_store"] == plain["planes_prompted"]
    assert _labels(tmp_path / "reused") == _labels(tmp_path / "plain")


def test_missing_planes_are_computed(tiny_cli, tiny_model, stack_tif, tmp_path, encoder_calls):
    store = _embed(stack_tif, tmp_path / "s.zarr", tiny_model)
    EmbeddingStore.open(store, mode="r+").discard((1,))
    assert tiny_cli([str(stack_tif), "-o", str(tmp_path / "plain"), *FAST]) == 0
    encoder_calls.clear()
    args = [str(stack_tif), "-o", str(tmp_path / "part"), *FAST, "--embeddings", str(store)]
    assert tiny_cli(args) == 0
    assert encoder_calls == [1]  # plane 1 only
    assert _labels(tmp_path / "part") == _labels(tmp_path / "plain")
    assert _record(tmp_path / "part")["embeddings"]["planes_from_store"] == [[0], [2]]


def test_crops_use_the_store_for_the_whole_plane(tiny_cli, tiny_model, stack_tif, tmp_path,
                                                 encoder_calls):  # fmt: skip
    store = _embed(stack_tif, tmp_path / "s.zarr", tiny_model)
    crops = [*FAST, "--crop-n-layers", "1"]
    encoder_calls.clear()
    assert tiny_cli([str(stack_tif), "-o", str(tmp_path / "plain"), *crops]) == 0
    without = sum(encoder_calls)
    assert without == 3 * 5  # the whole plane and 4 crops, per plane
    encoder_calls.clear()
    args = [str(stack_tif), "-o", str(tmp_path / "reused"), *crops, "--embeddings", str(store)]
    assert tiny_cli(args) == 0
    assert sum(encoder_calls) == without - 3  # the crops only
    assert _labels(tmp_path / "reused") == _labels(tmp_path / "plain")


def test_another_normalisation_is_refused(tiny_cli, tiny_model, stack_tif, tmp_path, capsys):
    store = _embed(stack_tif, tmp_path / "s.zarr", tiny_model)
    out = tmp_path / "out"
    args = [str(stack_tif), "-o", str(out), *FAST, "--embeddings", str(store)]
    assert tiny_cli([*args, "--contrast-limits", "0,30000"]) == 1
    err = capsys.readouterr().err
    assert str(store) in err and "contrast_limits None != [[0.0, 30000.0]]" in err
    assert "(normalisation)" in err and not (out / "stack_labels.tif").exists()
    # embedded with the same limits, the store is accepted
    same = _embed(stack_tif, tmp_path / "limits.zarr", tiny_model, limits=(0, 30000))
    args = [str(stack_tif), "-o", str(out), *FAST, "--embeddings", str(same)]
    assert tiny_cli([*args, "--contrast-limits", "0,30000"]) == 0
    assert "note" not in capsys.readouterr().err
    # another precision is allowed, and said
    args = [*args, "--contrast-limits", "0,30000", "--precision", "bf16"]
    assert tiny_cli([*args, "-o", str(tmp_path / "bf16")]) == 0
    assert "embeddings were computed in fp32, this run embeds in bf16" in capsys.readouterr().err


def test_another_image_or_model_is_refused(tiny_cli, tiny_model, stack_tif, tmp_path, capsys):
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, _stack(seed=1), imagej=True, metadata={"axes": "ZYX"})
    store = _embed(other, tmp_path / "other.zarr", tiny_model)
    args = [str(stack_tif), "-o", str(tmp_path / "out"), *FAST, "--embeddings", str(store)]
    assert tiny_cli(args) == 1
    err = capsys.readouterr().err
    assert str(store) in err and "sample_sha256" in err and "(image)" in err

    another = _randomize(build_sam(TINY_CONFIG), seed=5).eval()
    store = _embed(stack_tif, tmp_path / "model.zarr", another)
    args = [str(stack_tif), "-o", str(tmp_path / "out"), *FAST, "--embeddings", str(store)]
    assert tiny_cli(args) == 1
    err = capsys.readouterr().err
    assert "weights fingerprint" in err and "(model)" in err


def test_misuse_is_named(tiny_cli, tiny_model, stack_tif, tmp_path, capsys):
    store = _embed(stack_tif, tmp_path / "s.zarr", tiny_model)
    out = str(tmp_path / "out")
    assert tiny_cli([str(stack_tif), str(stack_tif), "-o", out, "--embeddings", str(store)]) == 2
    assert "give one INPUT, not 2" in capsys.readouterr().err
    assert tiny_cli([str(stack_tif), "-o", out, "--embeddings", str(tmp_path / "none")]) == 2
    assert "no such store" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert tiny_cli([str(stack_tif), "-o", out, "--embeddings", str(tmp_path / "plain")]) == 1
    assert "is not an embedding store" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "in" / "second.tif", _stack(seed=2))
    folder = str(tmp_path / "in")
    assert tiny_cli([folder, "-o", out, *FAST, "--embeddings", str(store)]) == 1
    err = capsys.readouterr().err
    assert "2 input(s) failed" in err
    assert err.count("belongs to one image, and 2 inputs were found") == 4  # lines, summary
    assert not Path(out, "stack_labels.tif").exists()


def test_a_damaged_or_changed_plane_is_embedded_again(tiny_model, stack_tif, tmp_path):
    store = _embed(stack_tif, tmp_path / "s.zarr", tiny_model)
    image = _stack()
    assert plane_embedding(str(store), (0,), image[0]) is not None
    assert plane_embedding(str(store), (0,), image[0] + 1) is None  # other pixels
    chunk = store / "features" / "1.0.0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:-8] + bytes(8))
    with pytest.warns(RuntimeWarning, match=r"features/1\.0\.0\.0\.0"):
        assert plane_embedding(str(store), (1,), image[1]) is None


def test_generator_refuses_an_embedding_of_another_size(tiny_model):
    gen = MaskGenerator(tiny_model, points_per_side=4)
    rgb = np.zeros((40, 50, 3), dtype=np.uint8)
    other = Predictor(tiny_model).embed_images([np.zeros((30, 50, 3), dtype=np.uint8)])[0]
    with pytest.raises(ValueError, match=r"embedding is of a \(30, 50\) image"):
        gen.generate_labels(rgb, embedding=other)


def test_a_worker_reads_the_store_by_path(tiny_model, stack_tif, tmp_path, monkeypatch,
                                          encoder_calls):  # fmt: skip
    # what a dask worker runs: segment_plane with the store's path
    store = _embed(stack_tif, tmp_path / "s.zarr", tiny_model)
    monkeypatch.setattr(segment.ModelSpec, "load", lambda self: tiny_model)
    segment._SEGMENTERS.clear()
    spec = segment.ModelSpec(name="vit_t", weights="tiny.pt", device="cpu")
    options = segment.SegmentOptions(generator=(("points_per_side", 4),))
    encoder_calls.clear()
    used = segment.segment_plane(str(stack_tif), None, (2,), spec, options, str(store))
    assert used.extra["embedding"] == "store" and encoder_calls == []
    plain = segment.segment_plane(str(stack_tif), None, (2,), spec, options)
    assert plain.extra["embedding"] == "computed" and encoder_calls == [1]
    assert np.array_equal(used.labels, plain.labels)
    segment._SEGMENTERS.clear()


def test_a_tiled_store_is_refused(tiny_cli, tiny_model, stack_tif, tmp_path, capsys):
    from napari_mobilesam.store import describe

    with open_source(stack_tif, None) as src:
        meta = describe(source_planes(src), tiny_model)
    embedding = {"shape": meta["model"]["embedding_shape"], "dtype": "<f4", "precision": "fp32"}
    tiles = {"grid": [1, 2], "size": 64, "overlap": 16}
    store = tmp_path / "tiled.zarr"
    EmbeddingStore.create(store, {**meta, "embedding": embedding, "tiles": tiles})
    args = [str(stack_tif), "-o", str(tmp_path / "out"), *FAST, "--embeddings", str(store)]
    assert tiny_cli(args) == 1
    err = capsys.readouterr().err
    assert f"{store} holds tiles (1 x 2 per plane" in err and "--tile-threshold 0" in err
