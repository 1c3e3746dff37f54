"""Model registry, building and checkpoint loading (every error path)."""

from __future__ import annotations

import pickle

import pytest
import torch

from napari_mobilesam.accel import is_optimized
from napari_mobilesam.build import (
    MODEL_CONFIGS,
    CheckpointError,
    build_sam,
    detect_model_name,
    get_config,
    load_model,
    load_state_dict_checked,
    read_state_dict,
    resolve_device,
)

from .conftest import GOLDEN_CKPT, TINY_CONFIG, requires_golden


def test_registry_names():
    assert set(MODEL_CONFIGS) == {"vit_t", "vit_b", "vit_l", "vit_h"}
    for cfg in MODEL_CONFIGS.values():
        assert cfg.image_embedding_size == 64  # 1024 / 16, computed


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown model name 'vit_x'.*vit_t"):
        get_config("vit_x")


@pytest.mark.parametrize(
    ("name", "n_params"),
    # encoder parameters: vit_t as in mobile_sam.pt (without the classifier head);
    # vit_b/l/h counted by hand from the published architectures (91M/308M/636M models)
    [("vit_t", 5_743_892), ("vit_b", 89_670_912), ("vit_l", 308_278_272), ("vit_h", 637_026_048)],
)
def test_encoder_sizes(name, n_params):
    with torch.device("meta"):
        model = build_sam(name)
    assert sum(p.numel() for p in model.image_encoder.parameters()) == n_params


@requires_golden
def test_load_official_format_with_head_keys(tmp_path):
    state = read_state_dict(GOLDEN_CKPT)
    assert any(k.startswith("image_encoder.head.") for k in state)  # present, ignored
    model = load_model("vit_t", GOLDEN_CKPT, device="cpu", optimize=False)
    assert not model.training and not is_optimized(model)
    assert model.model_name == "vit_t" and model.checkpoint_path == GOLDEN_CKPT
    own = model.state_dict()
    for k, v in own.items():
        assert torch.equal(v, state[k]), k
    assert detect_model_name(state) == "vit_t"


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a file"):
        read_state_dict(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pt.*empty \(0 bytes\)"):
        read_state_dict(tmp_path / "empty.pt")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(CheckpointError, match="image.png.*not a PyTorch checkpoint"):
        read_state_dict(path)


def test_truncated(tmp_path, tiny_state_dict):
    full = _save(tiny_state_dict, tmp_path / "full.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError, match="cut.pt.*truncated"):
        read_state_dict(path)


class Custom:
    """Stands for arbitrary pickled Python objects in a checkpoint."""


def test_pickled_objects_refused(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"x": torch.zeros(1), "obj": Custom()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="obj.pt.*Python objects.*weights_only"):
        read_state_dict(path)


def test_corrupt_zip(tmp_path, tiny_state_dict):
    data = bytearray(_save(tiny_state_dict, tmp_path / "full.pt").read_bytes())
    data[200:400] = bytes(200)  # damage a member, keep the archive's directory
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged.pt"):
        read_state_dict(path)


def test_corrupt_legacy_pickle(tmp_path):
    path = tmp_path / "legacy.pt"
    path.write_bytes(b"\x80\x02" + bytes(50))
    with pytest.raises(CheckpointError, match="legacy.pt.*not a PyTorch checkpoint"):
        read_state_dict(path)


def test_not_a_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        read_state_dict(_save([torch.zeros(1)], tmp_path / "list.pt"))
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(_save({"a": torch.zeros(1), "b": 3}, tmp_path / "mixed.pt"))


def test_wrapped_state_dict(tmp_path, tiny_state_dict):
    path = _save({"model": tiny_state_dict, "epoch": 3}, tmp_path / "wrapped.pt")
    assert read_state_dict(path).keys() == tiny_state_dict.keys()


def test_wrong_architecture_lists_keys(tmp_path, tiny_state_dict):
    sd = dict(tiny_state_dict)
    del sd["mask_decoder.iou_token.weight"]
    sd["extra.weight"] = torch.zeros(1)
    key = "prompt_encoder.no_mask_embed.weight"
    sd[key] = torch.zeros(1, 5)
    model = build_sam(TINY_CONFIG)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_checked(model, sd, source="checkpoint 'x.pt'")
    msg = str(info.value)
    assert "checkpoint 'x.pt'" in msg
    assert "1 missing keys: mask_decoder.iou_token.weight" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert f"{key}: checkpoint (1, 5) vs model (1, 32)" in msg


@requires_golden
def test_wrong_model_name_suggests_the_right_one():
    # a vit_t checkpoint loaded as vit_b: the error names the file and the fix
    with pytest.raises(CheckpointError) as info:
        load_model("vit_b", GOLDEN_CKPT, device="cpu")
    msg = str(info.value)
    assert str(GOLDEN_CKPT) in msg and "missing keys" in msg and "name='vit_t'" in msg


def test_long_key_lists_are_shortened(tiny_state_dict):
    with pytest.raises(CheckpointError, match=r"more\)"):
        load_state_dict_checked(build_sam(TINY_CONFIG), {})


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="invalid device 'banana'"):
        resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@requires_golden
def test_load_model_optimizes_by_default_and_fuse_is_deprecated():
    assert is_optimized(load_model("vit_t", GOLDEN_CKPT, device="cpu"))
    with pytest.warns(DeprecationWarning, match="use optimize="):
        assert not is_optimized(load_model("vit_t", GOLDEN_CKPT, device="cpu", fuse=False))
