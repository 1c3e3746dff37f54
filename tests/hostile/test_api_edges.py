"""Hostile inputs 6-7. Checkpoint errors never advise ``weights_only=False``; API edges: empty
prompt batches, extreme aspect ratios."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_mobilesam.predictor import Predictor
from napari_mobilesam.transforms import preprocess_shape

# -- 7. API edges ---------------------------------------------------------------------


@pytest.mark.parametrize("multimask, c", [(True, 3), (False, 1)])
@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize(
    "prompts",
    [
        {"boxes": np.zeros((0, 4))},
        {"point_coords": np.zeros((0, 2, 2)), "point_labels": np.zeros((0, 2))},
        {"point_coords": np.zeros((0, 1, 2)), "point_labels": np.zeros((0, 1)),
         "boxes": np.zeros((0, 4))},
    ],
)  # fmt: skip
def test_predict_batch_with_zero_prompts_gives_empty_arrays(
    tiny_model, prompts, multimask, c, logits
):
    predictor = Predictor(tiny_model)
    predictor.set_image(np.zeros((40, 60, 3), np.uint8))
    masks, scores, low_res = predictor.predict_batch(
        **prompts, multimask_output=multimask, return_logits=logits
    )
    low = tiny_model.prompt_encoder.mask_input_size
    assert masks.shape == (0, c, 40, 60)
    assert masks.dtype == (np.float32 if logits else bool)
    assert scores.shape == (0, c) and scores.dtype == np.float32
    assert low_res.shape == (0, c, *low) and low_res.dtype == np.float32
    # the same shapes as one prompt gives, less its row
    one = predictor.predict_batch(boxes=np.array([[0, 0, 9, 9.0]]), multimask_output=multimask)
    assert [a.shape[1:] for a in one] == [masks.shape[1:], scores.shape[1:], low_res.shape[1:]]


@pytest.mark.parametrize("shape", [(1, 20000), (20000, 1), (3, 800)])
def test_extreme_aspect_ratio_is_refused_naming_shape_and_limit(tiny_model, shape):
    predictor = Predictor(tiny_model)  # 128-pixel input: at most 256:1
    with pytest.raises(ValueError, match=rf"shape \({shape[0]}, {shape[1]}\).*limit of 256:1"):
        predictor.set_image(np.zeros(shape, np.uint8))


def test_aspect_ratio_limit_is_2048_to_1_for_1024_pixels():
    assert preprocess_shape(1, 2048, 1024) == (1, 1024)  # 2048:1 still fits
    with pytest.raises(ValueError, match=r"\(1, 2049\).*limit of 2048:1"):
        preprocess_shape(1, 2049, 1024)
    with pytest.raises(ValueError, match=r"\(20000, 1\).*limit of 2048:1"):
        preprocess_shape(20000, 1, 1024)


# -- 6. checkpoints: no advice to load unsafely ----------------------------------------


def _hostile_checkpoints(folder: Path) -> dict[str, Path]:
    """Files that torch.load(weights_only=True) refuses, each a different way."""
    folder.mkdir(parents=True, exist_ok=True)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo never run",))

    files = {
        "bad_opcode": b"\x80\x02}q\x00\xff\xfe",  # a pickle header, then garbage
        "garbage_pickle": b"\x80\x02garbage" * 10,
        "truncated_zip": None,
    }
    paths = {}
    for name, data in files.items():
        if data is not None:
            paths[name] = folder / f"{name}.pt"
            paths[name].write_bytes(data)
    good = folder / "good.pt"
    torch.save({"w": torch.zeros(3)}, good)
    paths["truncated_zip"] = folder / "truncated_zip.pt"
    paths["truncated_zip"].write_bytes(good.read_bytes()[:200])
    for legacy in (False, True):
        path = folder / f"code_{'legacy' if legacy else 'zip'}.pt"
        torch.save({"w": torch.zeros(2), "e": Evil()}, path,
                   _use_new_zipfile_serialization=not legacy)  # fmt: skip
        paths[path.stem] = path
    return paths


def test_checkpoint_errors_never_advise_weights_only_false(tmp_path):
    from napari_mobilesam.build import CheckpointError, read_state_dict

    for name, path in _hostile_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError) as exc:
            read_state_dict(path)
        message = str(exc.value)
        assert str(path) in message, name
        assert "weights_only=False" not in message.replace("`", "").replace(" set to ", "=")
        assert "weights_only` set to `False" not in message and "Re-running" not in message
    with pytest.raises(
        CheckpointError,
        match=r"not a PyTorch checkpoint: unreadable pickle data "
        r"\(Unsupported operand 255\)",
    ):
        read_state_dict(tmp_path / "bad_opcode.pt")


def test_an_unreadable_embedding_cache_file_warns_without_that_advice(tmp_path):
    from napari_mobilesam.interactive.cache import EmbeddingCache

    cache = EmbeddingCache(folder=tmp_path / "emb")
    key = ("layer", "pixels", 0)
    cache.file_for(key).write_bytes(b"\x80\x02garbage" * 10)  # a hostile file in its place
    with pytest.warns(RuntimeWarning, match="unreadable embedding cache file") as record:
        assert cache.get(key) is None
    message = str(record[0].message)
    assert "unreadable pickle data (Unsupported operand" in message
    assert "weights_only" not in message
