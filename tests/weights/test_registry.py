"""Tests of the weights registry (``weights/registry.json``) and of where the weights
cache lives."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from napari_mobilesam import weights as w

from .common import PAYLOAD, PAYLOAD_SHA, VIT_T

# ---------------------------------------------------------------------------- registry


def test_registry_lists_the_four_published_models_and_the_bundled_one():
    assert list(w.REGISTRY) == ["vit_t", "vit_b", "vit_l", "vit_h", "vit_t_synthetic_cells"]
    for name, info in w.REGISTRY.items():
        assert info.name == name
        if info.bundled:
            assert info.url == "" and info.network == "vit_t"
            continue
        assert info.license == "Apache-2.0"
        assert info.url.startswith("https://") and info.url.endswith("/" + info.filename)
        assert len(info.sha256) == 64 and info.size > 0 and info.description


def test_registry_vit_t_values_exactly():
    info = w.get_model_info("vit_t")
    assert {k: getattr(info, k) for k in VIT_T} == VIT_T


def test_registry_sam_values():
    assert w.REGISTRY["vit_b"].filename == "sam_vit_b_01ec64.pth"
    assert w.REGISTRY["vit_b"].size == 375042383
    assert w.REGISTRY["vit_l"].sha256.startswith("3adcc4315b64")
    assert w.REGISTRY["vit_h"].size == 2564550879


def test_model_info_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.REGISTRY["vit_t"].size = 1


def _write_registry(path: Path, models) -> Path:
    path.write_text(json.dumps({"schema_version": 1, "models": models}))
    return path


def test_load_registry_takes_the_first_existing_file(tmp_path):
    entry = {**VIT_T, "description": "d"}
    second = _write_registry(tmp_path / "b.json", {"x": entry})
    infos = w._load_registry([tmp_path / "missing.json", second])
    assert list(infos) == ["x"] and infos["x"].filename == "mobile_sam.pt"
    assert infos["x"].source == ""


def test_load_registry_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        w._load_registry([tmp_path / "missing.json"])


def test_load_registry_invalid_json(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        w._load_registry([path])


def test_load_registry_without_models(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="no 'models'"):
        w._load_registry([path])


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("a string", "expected an object"),
        ({"filename": "a.pt"}, "missing keys"),
        ({"size": 0}, "'size' must be a positive integer"),
        ({"size": "5"}, "'size' must be a positive integer"),
        ({"size": True}, "'size' must be a positive integer"),
        ({"sha256": "ABC"}, "'sha256' must be 64"),
        ({"filename": "sub/a.pt"}, "'filename' must be a bare file name"),
        ({"filename": ""}, "'filename' must be a bare file name"),
    ],
)
def test_load_registry_malformed_entry(tmp_path, entry, match):
    if isinstance(entry, dict) and "missing keys" not in match:
        entry = {**VIT_T, "description": "d", **entry}
    path = _write_registry(tmp_path / "r.json", {"bad": entry})
    with pytest.raises(ValueError, match=match) as exc:
        w._load_registry([path])
    assert "'bad'" in str(exc.value) and "r.json" in str(exc.value)


def test_get_model_info_unknown_name():
    with pytest.raises(ValueError, match="'vit_x'") as exc:
        w.get_model_info("vit_x")
    for name in ("vit_t", "vit_b", "vit_l", "vit_h"):
        assert name in str(exc.value)


def test_get_model_info_not_a_string():
    with pytest.raises(TypeError, match="must be a str"):
        w.get_model_info(3)


# ------------------------------------------------------------------------------- cache


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILESAM_CACHE", str(tmp_path / "here"))
    assert w.cache_dir() == tmp_path / "here"
    assert w.weight_path("vit_t") == tmp_path / "here" / "mobile_sam.pt"
    assert not (tmp_path / "here").exists()  # not created until a download


def test_cache_dir_env_expands_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MOBILESAM_CACHE", "~/weights")
    assert w.cache_dir() == tmp_path / "weights"


def test_cache_dir_checkout_local(monkeypatch, tmp_path):
    checkout = tmp_path / "checkout" / "weights"
    checkout.mkdir(parents=True)
    (checkout / "registry.json").write_text("{}")
    monkeypatch.setattr(w, "_CHECKOUT_WEIGHTS", checkout)
    monkeypatch.delenv("MOBILESAM_CACHE")
    assert w.cache_dir() == checkout
    monkeypatch.setenv("MOBILESAM_CACHE", "")  # empty counts as unset
    assert w.cache_dir() == checkout


def test_cache_dir_this_checkout(monkeypatch):
    monkeypatch.delenv("MOBILESAM_CACHE")
    if not (w._CHECKOUT_WEIGHTS / "registry.json").is_file():
        pytest.skip("not running from a source checkout")
    assert w.cache_dir() == Path(w.__file__).resolve().parents[2] / "weights"


def test_cache_dir_installed_uses_os_cache(monkeypatch, tmp_path):
    import pooch

    monkeypatch.setattr(w, "_CHECKOUT_WEIGHTS", tmp_path / "no-checkout")
    monkeypatch.delenv("MOBILESAM_CACHE")
    assert w.cache_dir() == Path(pooch.os_cache("napari-mobilesam")).absolute()


def test_download_url_mirror(monkeypatch):
    info = w.get_model_info("vit_b")
    assert w.download_url(info) == info.url
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", "https://mirror.example.org/sam/")
    assert w.download_url(info) == "https://mirror.example.org/sam/sam_vit_b_01ec64.pth"
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", "https://mirror.example.org/sam")
    assert w.download_url(info) == "https://mirror.example.org/sam/sam_vit_b_01ec64.pth"
    monkeypatch.setenv("MOBILESAM_WEIGHTS_MIRROR", "")
    assert w.download_url(info) == info.url


def test_sha256_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    assert w.sha256_file(path) == PAYLOAD_SHA
    assert w.sha256_file(path, chunk=100) == PAYLOAD_SHA
    with pytest.raises(ValueError, match="chunk"):
        w.sha256_file(path, chunk=0)
