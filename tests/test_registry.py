"""Registry entries for trained weights of a known architecture, and bundled weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from napari_mobilesam import build, registry
from napari_mobilesam import weights as w
from napari_mobilesam.registry import ModelInfo
from napari_mobilesam.weights import WeightsError

PAYLOAD = b"bundled weights" * 100


def _entry(**kw) -> dict:
    entry = {
        "filename": "cells.pt",
        "url": "",
        "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
        "size": len(PAYLOAD),
        "license": "Apache-2.0",
        "description": "trained on synthetic cells",
        "architecture": "vit_t",
        "bundled": True,
    }
    entry.update(kw)
    return entry


def _registry(tmp_path: Path, **entries) -> Path:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"schema_version": 1, "models": entries}))
    return path


def test_architecture_and_bundled_are_read(tmp_path):
    infos = registry._load_registry([_registry(tmp_path, cells=_entry(), plain=_entry(
        bundled=False, architecture="", url="https://x/cells.pt"))])  # fmt: skip
    assert infos["cells"].bundled and infos["cells"].network == "vit_t"
    assert not infos["plain"].bundled and infos["plain"].network == "plain"
    assert infos["cells"].max_upscale is None  # absent: enlarge to the input, as SAM does


def test_a_default_upscale_limit_is_read(tmp_path):
    infos = registry._load_registry([_registry(tmp_path, cells=_entry(max_upscale=2))])
    assert infos["cells"].max_upscale == 2.0 and isinstance(infos["cells"].max_upscale, float)


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"bundled": "yes"}, "'bundled' must be true or false"),
     ({"architecture": 3}, "'architecture' must be a model name"),
     ({"max_upscale": 0.5}, "'max_upscale' must be a finite number >= 1, got 0.5"),
     ({"max_upscale": "2"}, "'max_upscale' must be a finite number >= 1"),
     ({"max_upscale": True}, "'max_upscale' must be a finite number >= 1"),
     ({"max_upscale": float("inf")}, "'max_upscale' must be a finite number >= 1")],
)  # fmt: skip
def test_malformed_optional_keys(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match) as exc:
        registry._load_registry([_registry(tmp_path, cells=_entry(**kw))])
    assert "'cells'" in str(exc.value)


@pytest.fixture
def bundled(monkeypatch, tmp_path):
    """Model 'cells', bundled, found in a fake package-data folder."""
    data = tmp_path / "_data"
    data.mkdir()
    monkeypatch.setattr(registry, "PACKAGE_DATA", data)
    monkeypatch.setattr(registry, "CHECKOUT_WEIGHTS", tmp_path / "checkout")
    info = ModelInfo(name="cells", **{k: v for k, v in _entry().items() if k != "filename"},
                     filename="cells.pt")  # fmt: skip
    monkeypatch.setitem(w.REGISTRY, "cells", info)
    monkeypatch.setenv("MOBILESAM_CACHE", str(tmp_path / "cache"))
    return data / "cells.pt"


def test_fetch_returns_the_bundled_file_without_a_download(bundled):
    bundled.write_bytes(PAYLOAD)
    assert w.fetch("cells") == bundled
    assert not (bundled.parents[1] / "cache").exists()


def test_bundled_file_in_a_checkout(bundled, tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "cells.pt").write_bytes(PAYLOAD)
    assert w.fetch("cells") == checkout / "cells.pt"


def test_a_missing_bundled_file_says_reinstall(bundled):
    with pytest.raises(WeightsError, match="ship with napari-mobilesam") as exc:
        w.fetch("cells")
    assert "missing" in str(exc.value) and "reinstall" in str(exc.value)


def test_a_damaged_bundled_file_says_reinstall(bundled):
    bundled.write_bytes(PAYLOAD[:-1])
    with pytest.raises(WeightsError, match="damaged"):
        w.fetch("cells")
    bundled.write_bytes(PAYLOAD[:-1] + b"?")  # right size, wrong contents
    with pytest.raises(WeightsError, match="ships with napari-mobilesam: reinstall"):
        w.fetch("cells")


def test_trained_weights_resolve_to_their_architecture(bundled):
    assert build.get_config("cells") is build.MODEL_CONFIGS["vit_t"]
    assert build.model_names()[: len(build.MODEL_CONFIGS)] == list(build.MODEL_CONFIGS)
    assert "cells" in build.model_names()
    with pytest.raises(ValueError, match="known models: vit_t, .*cells"):
        build.get_config("nope")


def test_the_stand_in_model_is_registered_and_shipped():
    info = w.get_model_info("vit_t_synthetic_cells")
    assert info.bundled and info.network == "vit_t" and info.size < 26_000_000
    assert info.max_upscale == 2.0  # trained on cells at the size a 512 px image shows them
    assert all(w.REGISTRY[n].max_upscale is None for n in ("vit_t", "vit_b", "vit_l", "vit_h"))
    assert w.default_max_upscale("vit_t_synthetic_cells") == 2.0
    assert w.default_max_upscale("vit_t") is None and w.default_max_upscale("nope") is None
    path = w.fetch("vit_t_synthetic_cells")  # verified against the registry's sha256
    assert path.stat().st_size == info.size


def test_the_wheel_ships_the_bundled_weights():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for info in w.REGISTRY.values():
        if info.bundled:
            assert f'"weights/{info.filename}" = "napari_mobilesam/_data/{info.filename}"' in text
