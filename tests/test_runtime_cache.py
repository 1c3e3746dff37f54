"""Backends: get_onnx_backend, its export cache and its keys."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


from napari_mobilesam.accel import is_optimized
from napari_mobilesam.runtime import (
    DEFAULT_OPSET,
    EXPORTER_VERSION,
    get_onnx_backend,
    onnx_cache_dir,
)
from napari_mobilesam.runtime import cache as cache_mod
from napari_mobilesam.runtime import export as export_mod
from napari_mobilesam.weights import sha256_file

from .runtime_support import (
    FILES,
    image,
    tiny,
)

# --------------------------------------------------------------- get_onnx_backend


@pytest.mark.slow  # the tiny ONNX export fixture: ~10 s
def test_get_onnx_backend_folder_mode(tiny_export, tmp_path):
    out = tiny_export["dir"]
    b = get_onnx_backend(folder=out, threads=1)
    assert b.encoder_path == out / "encoder.onnx" and b.decoder_path == out / "decoder.onnx"
    q = get_onnx_backend(folder=str(out), quantize="int8", threads=1)
    assert q.encoder_path.name == "encoder.int8.onnx"
    assert q.decoder_path.name == "decoder.int8.onnx"
    with pytest.raises(FileNotFoundError, match="does not hold encoder.onnx and decoder.onnx"):
        get_onnx_backend(folder=tmp_path)
    for name in ("encoder.onnx", "decoder.onnx"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    get_onnx_backend(folder=tmp_path, threads=1)
    with pytest.raises(FileNotFoundError, match=r"encoder.int8.onnx and decoder.int8.onnx.*int8"):
        get_onnx_backend(folder=tmp_path, quantize="int8")
    (tmp_path / "decoder.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"does not hold decoder.onnx \("):
        get_onnx_backend(folder=tmp_path)


def test_get_onnx_backend_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="quantize must be None or 'int8', got 'fp16'"):
        get_onnx_backend(folder=tmp_path, quantize="fp16")
    with pytest.raises(TypeError, match="model must be a Sam model or None"):
        get_onnx_backend("vit_t")
    with pytest.raises(FileNotFoundError, match="checkpoint file .*missing.pt"):
        get_onnx_backend(checkpoint=tmp_path / "missing.pt")


def test_onnx_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILESAM_CACHE", str(tmp_path))
    assert onnx_cache_dir() == tmp_path / "onnx"


@pytest.mark.slow  # the tiny ONNX export fixture: ~10 s
def test_get_onnx_backend_exports_once(tiny_export, tiny_state_dict, tmp_path, monkeypatch):
    """First use exports into the cache; later calls reuse it; int8 is added in place.

    The torch exporter itself is replaced by a copy of ``tiny_export``'s graphs (it
    takes seconds; the real export of an unfused model is tested with vit_t).
    """
    monkeypatch.setenv("MOBILESAM_CACHE", str(tmp_path / "cache"))
    exported = []

    def fake_export_graphs(model, folder, opset):
        exported.append((model, opset))
        for name in ("encoder.onnx", "decoder.onnx"):
            (folder / name).write_bytes((tiny_export["dir"] / name).read_bytes())

    monkeypatch.setattr(export_mod, "_export_graphs", fake_export_graphs)
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_state_dict, ckpt)
    loads = []

    def fake_load_model(name, checkpoint, device=None, *, optimize=True, progress=True):
        loads.append((name, Path(checkpoint), device, optimize))
        return tiny(tiny_state_dict, optimized=optimize)

    import napari_mobilesam.build as build

    monkeypatch.setattr(build, "load_model", fake_load_model)
    backend = get_onnx_backend(checkpoint=ckpt, model_name="vit_t", threads=1)
    digest = sha256_file(ckpt)
    folder = onnx_cache_dir() / f"{digest[:16]}-v{EXPORTER_VERSION}"
    assert loads == [("vit_t", ckpt, "cpu", False)]
    assert len(exported) == 1 and exported[0][1] == DEFAULT_OPSET
    assert not is_optimized(exported[0][0])  # a plain copy
    assert backend.encoder_path == folder / "encoder.onnx"
    meta = json.loads((folder / "mobilesam_onnx.json").read_text())
    assert meta["source"] == {"checkpoint": str(ckpt), "sha256": digest}
    assert meta["quantize"] is None
    assert {p.name for p in folder.iterdir()} == {
        "encoder.onnx",
        "decoder.onnx",
        "mobilesam_onnx.json",
    }
    x = image(exported[0][0], seed=7)
    assert backend.encode(x).shape == (1, 32, 8, 8)

    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    time.sleep(0.01)

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(export_mod, "export_onnx", no_export)
    again = get_onnx_backend(checkpoint=ckpt, threads=1)
    assert again.encoder_path == backend.encoder_path
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert len(loads) == 1

    # int8 on top of the cached fp32 export: quantised in place, nothing re-exported
    q = get_onnx_backend(checkpoint=ckpt, quantize="int8", threads=1)
    assert q.encoder_path == folder / "encoder.int8.onnx"
    assert {p.name for p in folder.iterdir()} == FILES | {"mobilesam_onnx.json"}
    for name in ("encoder.onnx", "decoder.onnx"):
        assert (folder / name).stat().st_mtime_ns == mtimes[name]
    meta = json.loads((folder / "mobilesam_onnx.json").read_text())
    assert meta["quantize"] == "int8" and set(meta["files"]) == FILES
    assert set(meta["inputs"]) == FILES
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp dirs
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    get_onnx_backend(checkpoint=ckpt, quantize="int8", threads=1)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes

    # a damaged file or a JSON of another exporter version is exported again
    class Exported(Exception):
        pass

    def spy(model, out_dir, **kwargs):
        raise Exported(Path(out_dir).name, kwargs)

    monkeypatch.setattr(export_mod, "export_onnx", spy)
    (folder / "decoder.onnx").write_bytes(b"damaged")
    with pytest.raises(Exported):
        get_onnx_backend(checkpoint=ckpt)
    meta["exporter_version"] = EXPORTER_VERSION - 1
    (folder / "mobilesam_onnx.json").write_text(json.dumps(meta))
    with pytest.raises(Exported):
        get_onnx_backend(checkpoint=ckpt)


def test_get_onnx_backend_cache_keys(tiny_model, tiny_state_dict, tmp_path, monkeypatch):
    """Keyed by the checkpoint's sha256 (argument, model attribute, registry file), else
    by the state dict; the given model is the one exported."""
    monkeypatch.setenv("MOBILESAM_CACHE", str(tmp_path / "cache"))
    calls = []

    class Exported(Exception):
        pass

    def spy(model, out_dir, **kwargs):
        calls.append((model, Path(out_dir), kwargs))
        raise Exported

    monkeypatch.setattr(export_mod, "export_onnx", spy)
    ckpt = tmp_path / "w.pt"
    torch.save(tiny_state_dict, ckpt)
    digest = sha256_file(ckpt)

    with pytest.raises(Exported):
        get_onnx_backend(tiny_model, quantize="int8")
    model, out_dir, kwargs = calls[-1]
    key = cache_mod._state_dict_sha256(tiny_model)
    assert model is tiny_model
    assert out_dir == onnx_cache_dir() / f"{key[:16]}-v{EXPORTER_VERSION}"
    assert kwargs == {"quantize": "int8", "source": {"state_dict_sha256": key}}

    tiny_model.checkpoint_path = ckpt
    with pytest.raises(Exported):
        get_onnx_backend(tiny_model)
    assert calls[-1][1].name == f"{digest[:16]}-v{EXPORTER_VERSION}"
    assert calls[-1][2]["source"] == {"checkpoint": str(ckpt), "sha256": digest}

    import napari_mobilesam.weights as weights

    fetched = []
    monkeypatch.setattr(weights, "fetch", lambda name, **kw: fetched.append(name) or ckpt)
    monkeypatch.setattr(
        "napari_mobilesam.build.load_model", lambda *a, **k: calls.append(("load", a, k)) or None
    )
    with pytest.raises(Exported):
        get_onnx_backend(model_name="vit_t")
    assert fetched == ["vit_t"]
    assert calls[-2] == ("load", ("vit_t", ckpt), {"device": "cpu", "optimize": False})
    assert calls[-1][1].name == f"{digest[:16]}-v{EXPORTER_VERSION}"
