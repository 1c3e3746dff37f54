"""``mobilesam-everything --max-upscale X`` and ``mobilesam embed --max-upscale X``: small
planes shown to the model at most X times their size, the same labels as the library's,
recorded in the provenance record and run key, and embedding stores checked for it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from mobilesam_batch.embeddings import source_planes
from mobilesam_batch.inputs import open_source
from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.normalize import to_rgb_uint8
from napari_mobilesam.predictor import Predictor
from napari_mobilesam.store import EmbeddingStore, embed_planes, open_for

from .test_batch_embeddings import FAST, _stack

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def stack_tif(tmp_path) -> Path:
    """(3, 64, 96) planes: shorter than the tiny model's 128 px input."""
    path = tmp_path / "in" / "stack.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, _stack(), imagej=True, metadata={"axes": "ZYX"})
    return path


def _record(outdir: Path) -> dict:
    return json.loads((outdir / "stack_labels.json").read_text())


def _embed(image: Path, store: Path, model, max_upscale=None) -> Path:
    """What ``mobilesam embed IMAGE -o STORE [--max-upscale X]`` does, with ``model``."""
    with open_source(image, None) as src:
        planes = source_planes(src, None, None)
        predictor = Predictor(model, max_upscale=max_upscale)
        embed_planes(open_for(store, planes, predictor), planes, predictor)
    return store


def test_labels_are_the_library_s(tiny_cli, tiny_model, stack_tif, tmp_path):
    out = tmp_path / "out"
    assert tiny_cli([str(stack_tif), "-o", str(out), *FAST, "--max-upscale", "1"]) == 0
    labels = tifffile.imread(out / "stack_labels.tif")
    gen = MaskGenerator(
        Predictor(tiny_model, max_upscale=1), points_per_side=4, pred_iou_thresh=0,
        stability_score_thresh=0,
    )  # fmt: skip
    for z, plane in enumerate(_stack()):
        expected = gen.generate_labels(to_rgb_uint8(plane, percentiles=(0.5, 99.5)))
        np.testing.assert_array_equal(labels[z], expected)
    assert _record(out)["parameters"]["max_upscale"] == 1.0
    # without the flag: other labels (the planes enlarged 1.33x), no such parameter
    assert tiny_cli([str(stack_tif), "-o", str(tmp_path / "plain"), *FAST]) == 0
    assert "max_upscale" not in _record(tmp_path / "plain")["parameters"]
    assert not np.array_equal(tifffile.imread(tmp_path / "plain" / "stack_labels.tif"), labels)


def test_another_limit_redoes_the_input(tiny_cli, stack_tif, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(stack_tif), "-o", str(out), *FAST]
    assert tiny_cli([*args, "--max-upscale", "1"]) == 0
    assert tiny_cli([*args, "--max-upscale", "1"]) == 0
    assert "0 done, 1 skipped" in capsys.readouterr().out
    assert tiny_cli([*args, "--max-upscale", "1.2", "--on-clash", "overwrite"]) == 0
    assert "1 done, 0 skipped" in capsys.readouterr().out
    assert _record(out)["parameters"]["max_upscale"] == 1.2


def test_a_store_made_with_the_limit_serves_the_run(tiny_cli, tiny_model, stack_tif, tmp_path,
                                                    encoder_calls):  # fmt: skip
    store = _embed(stack_tif, tmp_path / "s.zarr", tiny_model, max_upscale=1)
    assert EmbeddingStore.open(store).meta["normalisation"]["max_upscale"] == 1.0
    args = [str(stack_tif), *FAST, "--max-upscale", "1"]
    assert tiny_cli([*args, "-o", str(tmp_path / "plain")]) == 0
    encoder_calls.clear()
    assert tiny_cli([*args, "-o", str(tmp_path / "reused"), "--embeddings", str(store)]) == 0
    assert encoder_calls == []
    plain = tifffile.imread(tmp_path / "plain" / "stack_labels.tif")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "reused" / "stack_labels.tif"), plain)


@pytest.mark.parametrize(("made", "run", "text"), [
    (None, ["--max-upscale", "1"], "max_upscale None != 1.0 (normalisation)"),
    (1, [], "max_upscale 1.0 != None (normalisation)"),
])  # fmt: skip
def test_a_store_made_otherwise_is_refused(tiny_cli, tiny_model, stack_tif, tmp_path, capsys,
                                           made, run, text):  # fmt: skip
    store = _embed(stack_tif, tmp_path / "s.zarr", tiny_model, max_upscale=made)
    out = tmp_path / "out"
    args = [str(stack_tif), "-o", str(out), *FAST, *run, "--embeddings", str(store)]
    assert tiny_cli(args) == 1
    err = capsys.readouterr().err
    assert str(store) in err and text in err
    assert not (out / "stack_labels.tif").exists()


def test_a_plane_embedded_at_another_size_is_named(tiny_model, stack_tif, tmp_path):
    """The per-plane check behind the store's record: an embedding of another input size
    (a store whose record was edited, say) is refused by name."""
    from mobilesam_batch.embeddings import plane_embedding
    from napari_mobilesam.store import StoreMismatchError

    store = _embed(stack_tif, tmp_path / "s.zarr", tiny_model)
    plane = _stack()[0]
    assert plane_embedding(str(store), (0,), plane, (85, 128)).input_size == (85, 128)
    with pytest.raises(StoreMismatchError, match=r"plane \(0,\) to the model at 128x85 px, "
                       r"this run at 96x64 px"):  # fmt: skip
        plane_embedding(str(store), (0,), plane, (64, 96))


def test_the_model_s_default_limit_applies_unless_none(tiny_cli, stack_tif, tmp_path):
    """A model whose registry entry has ``max_upscale`` (the stand-in model: 2) gets it
    without the flag; ``--max-upscale none`` lifts it; other models have none."""
    cells = ["--model", "vit_t_synthetic_cells"]
    assert tiny_cli([str(stack_tif), "-o", str(tmp_path / "a"), *FAST, *cells]) == 0
    assert _record(tmp_path / "a")["parameters"]["max_upscale"] == 2.0
    none = ["--max-upscale", "none"]
    assert tiny_cli([str(stack_tif), "-o", str(tmp_path / "b"), *FAST, *cells, *none]) == 0
    assert "max_upscale" not in _record(tmp_path / "b")["parameters"]
    assert tiny_cli([str(stack_tif), "-o", str(tmp_path / "c"), *FAST, *cells, "--max-upscale",
                     "1"]) == 0  # fmt: skip
    assert _record(tmp_path / "c")["parameters"]["max_upscale"] == 1.0


def test_embed_uses_the_model_s_default_limit(tiny_model, stack_tif, tmp_path, monkeypatch):
    """``mobilesam embed`` resolves the limit as mobilesam-everything does, so that the
    store it makes for the stand-in model serves that model's runs."""
    from napari_mobilesam import build
    from napari_mobilesam.cli import main

    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"tiny weights")
    monkeypatch.setattr(build, "load_model", lambda name, checkpoint, device=None: tiny_model)
    common = ["--weights", str(weights), "--device", "cpu", "-q"]
    for name, flags, expected in [
        ("vit_t_synthetic_cells", [], 2.0),
        ("vit_t_synthetic_cells", ["--max-upscale", "none"], None),
        ("vit_t", [], None),
    ]:
        store = tmp_path / f"{name}{len(flags)}.zarr"
        args = ["embed", str(stack_tif), "-o", str(store), "--model", name, *flags, *common]
        assert main(args) == 0
        assert EmbeddingStore.open(store).meta["normalisation"].get("max_upscale") == expected
