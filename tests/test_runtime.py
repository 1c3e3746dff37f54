"""Backends: the torch reference, ONNX export and onnxruntime parity, the export cache."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import onnx

from napari_mobilesam.accel import is_optimized, optimize
from napari_mobilesam.accel.onednn import ConvGELU, OneDNNLinear
from napari_mobilesam.build import build_sam
from napari_mobilesam.predictor import Predictor
from napari_mobilesam.runtime import (
    DEFAULT_OPSET,
    EXPORTER_VERSION,
    EncoderDecoderBackend,
    OnnxBackend,
    TorchBackend,
    export_onnx,
    get_onnx_backend,
    onnx_cache_dir,
    plain_copy,
)
from napari_mobilesam.runtime import cache as cache_mod
from napari_mobilesam.runtime import export as export_mod
from napari_mobilesam.runtime.onnx_backend import (
    import_onnxruntime,
    physical_cores,
)
from napari_mobilesam.transforms import apply_boxes, apply_coords
from napari_mobilesam.weights import sha256_file

from .conftest import GOLDEN, TINY_CONFIG, requires_golden

HINT = re.escape('pip install "napari-mobilesam[onnx]"')
FILES = {"encoder.onnx", "decoder.onnx", "encoder.int8.onnx", "decoder.int8.onnx"}


# ---------------------------------------------------------------------------- helpers


def _tiny(state_dict, optimized: bool):
    model = build_sam(TINY_CONFIG)
    model.load_state_dict(state_dict)
    model.eval()
    return optimize(model) if optimized else model  # as load_model does


def _image(model, seed: int = 0) -> np.ndarray:
    """A preprocessed (1, 3, S, S) float32 image with bottom/right padding."""
    gen = torch.Generator().manual_seed(seed)
    s = model.img_size
    img = torch.rand(1, 3, s, s * 3 // 4, generator=gen) * 255
    return model.preprocess(img).numpy()


def _backend_prompts(points=None, labels=None, boxes=None, b=1):
    """The backend convention: boxes as corners 2 / 3, else one padding point appended."""
    coords, labs = [], []
    if points is not None:
        coords.append(np.asarray(points, np.float32))
        labs.append(np.asarray(labels, np.float32))
        b = len(points)
    if boxes is not None:
        boxes = np.asarray(boxes, np.float32)
        coords.append(boxes.reshape(-1, 2, 2))
        labs.append(np.tile(np.float32([2, 3]), (len(boxes), 1)))
    else:
        coords.append(np.zeros((b, 1, 2), np.float32))
        labs.append(np.full((b, 1), -1, np.float32))
    return np.concatenate(coords, axis=1), np.concatenate(labs, axis=1)


@torch.no_grad()
def _sam_reference(model, emb, points=None, labels=None, boxes=None, masks=None):
    """Sam's own prompt encoder + mask decoder, single-mask and multimask outputs joined."""
    t = torch.as_tensor
    pts = None if points is None else (t(points).float(), t(labels).long())
    sparse, dense = model.prompt_encoder(
        pts,
        None if boxes is None else t(boxes).float(),
        None if masks is None else t(masks).float(),
    )
    pe = model.prompt_encoder.get_dense_pe()
    out = [model.mask_decoder(t(emb), pe, sparse, dense, mm) for mm in (False, True)]
    low = torch.cat([out[0][0], out[1][0]], dim=1).numpy()
    iou = torch.cat([out[0][1], out[1][1]], dim=1).numpy()
    return low, iou


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _assert_close(got, want, tol, what):
    err = float(np.abs(got - want).max())
    scale = max(1.0, float(np.abs(want).max()))
    assert err <= tol * scale, f"{what}: max abs diff {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fused_tiny(tiny_state_dict):
    """A tiny model optimised as load_model does (oneDNN kernels on the CPU)."""
    return _tiny(tiny_state_dict, optimized=True)


@pytest.fixture(scope="module")
def tiny_export(fused_tiny, tmp_path_factory):
    """One export (fp32 + int8) of the fused tiny model, with its state before."""
    root = tmp_path_factory.mktemp("export")
    before = {k: v.clone() for k, v in fused_tiny.state_dict().items()}
    layers = [type(m) for m in fused_tiny.modules()]
    source = {"checkpoint": "tiny.pt", "sha256": "0" * 64}
    meta = export_onnx(fused_tiny, root / "tiny", quantize="int8", source=source)
    return {
        "root": root,
        "dir": root / "tiny",
        "meta": meta,
        "before": before,
        "layers": layers,
        "source": source,
    }


# --------------------------------------------------------------------- torch backend


def test_torch_backend_encode_equals_model(tiny_model):
    backend = TorchBackend(tiny_model)
    assert isinstance(backend, EncoderDecoderBackend)
    assert backend.name == "torch"
    assert backend.img_size == 128 and backend.embed_shape == (32, 8, 8)
    assert backend.mask_input_size == (32, 32)
    x = _image(tiny_model)
    with torch.no_grad():
        want = tiny_model.image_encoder(torch.from_numpy(x)).numpy()
    got = backend.encode(x)
    assert got.dtype == np.float32 and got.shape == (1, 32, 8, 8)
    np.testing.assert_array_equal(got, want)
    assert "TorchBackend" in repr(backend)


def test_torch_backend_decode_equals_sam(tiny_model, rng):
    backend = TorchBackend(tiny_model)
    emb = backend.encode(_image(tiny_model))
    s = tiny_model.img_size
    points = rng.uniform(0, s, (3, 2, 2)).astype(np.float32)
    labels = np.array([[1, 0], [1, 1], [0, 1]])
    boxes = np.sort(rng.uniform(0, s, (3, 2, 2)), axis=1).reshape(3, 4).astype(np.float32)
    masks = rng.normal(size=(3, 1, 32, 32)).astype(np.float32)
    cases = {
        "points": dict(points=points, labels=labels),
        "box": dict(boxes=boxes),
        "points+box": dict(points=points, labels=labels, boxes=boxes),
        "points+mask": dict(points=points, labels=labels, masks=masks),
        "box+mask": dict(boxes=boxes, masks=masks),
    }
    for name, case in cases.items():
        want_low, want_iou = _sam_reference(tiny_model, emb, **case)
        coords, labs = _backend_prompts(case.get("points"), case.get("labels"), case.get("boxes"))
        low, iou = backend.decode(emb, coords, labs, case.get("masks"))
        assert low.shape == (3, 4, 32, 32) and iou.shape == (3, 4), name
        assert low.dtype == np.float32 and iou.dtype == np.float32
        _assert_close(low, want_low, 1e-5, f"{name} logits")
        _assert_close(iou, want_iou, 1e-5, f"{name} iou")


def test_torch_backend_equals_predictor(tiny_model, rng):
    """The numbers the Predictor gives for one click (its fast paths included)."""
    pred = Predictor(tiny_model)
    image = (rng.uniform(size=(96, 80, 3)) * 255).astype(np.uint8)
    pred.set_image(image)
    backend = TorchBackend(tiny_model)
    emb = pred.get_image_embedding().numpy()
    pt = np.array([[30.0, 40.0]])
    _, scores, low = pred.predict(pt, np.array([1]), multimask_output=True)
    coords = pred.transform.apply_coords(pt, pred.original_size)[None].astype(np.float32)
    c, lab = _backend_prompts(coords, [[1]])
    got_low, got_iou = backend.decode(emb, c, lab)
    _assert_close(got_low[0, 1:], low, 1e-4, "logits")
    _assert_close(got_iou[0, 1:], scores, 1e-4, "iou")


def test_backend_argument_errors(tiny_model):
    backend = TorchBackend(tiny_model)
    emb = np.zeros((1, 32, 8, 8), np.float32)
    c, lab = _backend_prompts(np.zeros((1, 1, 2)), [[1]])
    with pytest.raises(TypeError, match="model must be a Sam"):
        TorchBackend("vit_t")
    with pytest.raises(ValueError, match=r"x must have shape \(1, 3, 128, 128\)"):
        backend.encode(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(TypeError, match="x must be a numpy array"):
        backend.encode(torch.zeros(1, 3, 128, 128))
    with pytest.raises(TypeError, match="embedding must be a numeric array"):
        backend.decode(emb.astype(bool), c, lab)
    with pytest.raises(ValueError, match=r"embedding must have shape \(1, 32, 8, 8\)"):
        backend.decode(emb[:, :16], c, lab)
    with pytest.raises(ValueError, match=r"coords must have shape \(B, N, 2\)"):
        backend.decode(emb, c[0], lab)
    with pytest.raises(ValueError, match=r"labels must have shape \(B, N\)"):
        backend.decode(emb, c, lab[:, :1])
    with pytest.raises(ValueError, match=r"labels must be -1, 0, 1, 2 or 3, got \[4.0\]"):
        backend.decode(emb, c, np.where(lab == 1, 4, lab))
    with pytest.raises(ValueError, match=r"mask_input must have shape \(1, 1, 32, 32\)"):
        backend.decode(emb, c, lab, np.zeros((1, 1, 64, 64), np.float32))


# ------------------------------------------------------------------------- export


def test_plain_copy_uses_standard_ops(fused_tiny):
    plain = plain_copy(fused_tiny)
    assert is_optimized(fused_tiny) and not is_optimized(plain)
    assert not any(isinstance(m, ConvGELU | OneDNNLinear) for m in plain.modules())
    assert plain.image_encoder is not fused_tiny.image_encoder
    with pytest.raises(TypeError, match="model must be a Sam"):
        plain_copy(torch.nn.Linear(2, 2))


@pytest.mark.slow  # the tiny ONNX export fixture: ~10 s
def test_export_writes_single_files_and_json(tiny_export):
    out, meta = tiny_export["dir"], tiny_export["meta"]
    assert {p.name for p in out.iterdir()} == FILES | {"mobilesam_onnx.json"}
    assert not list(out.glob("*.data")) and not list(out.rglob("*.data"))
    # atomic: the temporary folder next to out_dir is gone
    assert [p.name for p in tiny_export["root"].iterdir()] == ["tiny"]
    on_disk = json.loads((out / "mobilesam_onnx.json").read_text())
    assert on_disk == meta
    assert meta["exporter_version"] == EXPORTER_VERSION
    assert meta["opset"] == DEFAULT_OPSET == 20
    assert meta["model_name"] is None  # built, not loaded: no model_name attribute
    assert meta["source"] == tiny_export["source"]
    assert meta["img_size"] == 128 and meta["embed_shape"] == [32, 8, 8]
    assert meta["quantize"] == "int8"
    assert set(meta["files"]) == FILES
    for name, digest in meta["files"].items():
        assert sha256_file(out / name) == digest
    for name in ("encoder.onnx", "encoder.int8.onnx"):
        assert meta["inputs"][name] == [
            {"name": "image", "shape": [1, 3, 128, 128], "dtype": "float32"}
        ]
        assert meta["outputs"][name] == [
            {"name": "image_embeddings", "shape": [1, 32, 8, 8], "dtype": "float32"}
        ]
    for name in ("decoder.onnx", "decoder.int8.onnx"):
        ins = {d["name"]: d["shape"] for d in meta["inputs"][name]}
        assert list(ins) == list(export_mod.DECODER_INPUTS)
        assert ins["image_embeddings"] == [1, 32, 8, 8]
        b, n = ins["point_coords"][:2]
        assert isinstance(b, str) and isinstance(n, str)
        assert ins["point_coords"] == [b, n, 2] and ins["point_labels"] == [b, n]
        assert ins["mask_input"] == [b, 1, 32, 32] and ins["has_mask_input"] == [b]
        outs = {d["name"]: d["shape"] for d in meta["outputs"][name]}
        assert outs == {"low_res_masks": [b, 4, 32, 32], "iou_predictions": [b, 4]}
        assert {d["dtype"] for d in meta["inputs"][name] + meta["outputs"][name]} == {"float32"}
    for name in FILES:
        proto = onnx.load(str(out / name))
        onnx.checker.check_model(proto)
        # standard operators only: nothing of oneDNN / aten leaked into the graph
        assert {node.domain for node in proto.graph.node} <= {""}, name
    int8_ops = {node.op_type for node in onnx.load(str(out / "decoder.int8.onnx")).graph.node}
    assert "MatMulInteger" in int8_ops and "ConvInteger" not in int8_ops


@pytest.mark.slow  # the tiny ONNX export fixture: ~10 s
def test_export_leaves_model_unchanged(tiny_export, fused_tiny):
    after = fused_tiny.state_dict()
    assert after.keys() == tiny_export["before"].keys()
    for k, v in tiny_export["before"].items():
        assert torch.equal(after[k], v), k
    assert [type(m) for m in fused_tiny.modules()] == tiny_export["layers"]  # still optimised
    assert is_optimized(fused_tiny)
    assert not fused_tiny.training


@pytest.mark.slow  # the tiny ONNX export fixture: ~10 s
def test_onnx_matches_torch_tiny(tiny_export, fused_tiny, rng):
    out = tiny_export["dir"]
    ort_b = OnnxBackend(out / "encoder.onnx", out / "decoder.onnx", threads=1)
    ref = TorchBackend(fused_tiny)
    assert ort_b.name == "onnx" and ort_b.threads == 1
    assert ort_b.img_size == 128 and ort_b.embed_shape == (32, 8, 8)
    x = _image(fused_tiny, seed=3)
    emb_t, emb_o = ref.encode(x), ort_b.encode(x)
    assert emb_o.dtype == np.float32 and emb_o.shape == (1, 32, 8, 8)
    _assert_close(emb_o, emb_t, 1e-5, "embedding")
    s = fused_tiny.img_size
    points = rng.uniform(0, s, (3, 1, 2)).astype(np.float32)
    boxes = np.sort(rng.uniform(0, s, (3, 2, 2)), axis=1).reshape(3, 4)
    masks = rng.normal(size=(3, 1, 32, 32)).astype(np.float32)
    cases = {
        "B=3 N=2": (*_backend_prompts(points, [[1], [0], [1]]), None),
        "box": (*_backend_prompts(boxes=boxes[:1]), None),
        "points+box+mask": (*_backend_prompts(points, [[1], [1], [0]], boxes), masks),
        "mask only": (*_backend_prompts(b=3), masks),
        "B=1 N=1": (*_backend_prompts(b=1), None),
    }
    for name, (c, lab, m) in cases.items():
        want = ref.decode(emb_t, c, lab, m)
        got = ort_b.decode(emb_t, c, lab, m)
        assert got[0].shape == want[0].shape and got[1].shape == want[1].shape, name
        _assert_close(got[0], want[0], 1e-4, f"{name} logits")
        _assert_close(got[1], want[1], 1e-4, f"{name} iou")
    # has_mask_input is per prompt: rows with 0 ignore their mask
    c, lab = _backend_prompts(points, [[1], [0], [1]])
    low, iou = ort_b.decoder.run(
        None,
        {
            "image_embeddings": emb_t,
            "point_coords": c,
            "point_labels": lab,
            "mask_input": masks,
            "has_mask_input": np.float32([1, 0, 1]),
        },
    )
    with_mask = ref.decode(emb_t, c, lab, masks)
    without = ref.decode(emb_t, c, lab)
    for i, src in enumerate((with_mask, without, with_mask)):
        _assert_close(low[i], src[0][i], 1e-4, f"row {i} logits")
        _assert_close(iou[i], src[1][i], 1e-4, f"row {i} iou")


@pytest.mark.slow  # the tiny ONNX export fixture: ~10 s
def test_int8_models_run(tiny_export, fused_tiny):
    out = tiny_export["dir"]
    q = OnnxBackend(out / "encoder.int8.onnx", out / "decoder.int8.onnx", threads=1)
    x = _image(fused_tiny, seed=5)
    emb = q.encode(x)
    assert emb.shape == (1, 32, 8, 8) and np.isfinite(emb).all()
    low, iou = q.decode(emb, *_backend_prompts(np.full((2, 1, 2), 60.0), [[1], [0]]))
    assert low.shape == (2, 4, 32, 32) and iou.shape == (2, 4)
    assert np.isfinite(low).all() and np.isfinite(iou).all()


def test_export_is_atomic_on_failure(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "models"
    out.mkdir()
    (out / "encoder.onnx").write_bytes(b"old")

    def crash(model, folder, opset):
        (folder / "encoder.onnx").write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(export_mod, "_export_graphs", crash)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_onnx(tiny_model, out)
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # no temp folder left
    assert [p.name for p in out.iterdir()] == ["encoder.onnx"]
    assert (out / "encoder.onnx").read_bytes() == b"old"


def test_export_argument_errors(tiny_model, tmp_path):
    with pytest.raises(TypeError, match="model must be a Sam"):
        export_onnx("vit_t", tmp_path)
    with pytest.raises(TypeError, match="opset must be an int"):
        export_onnx(tiny_model, tmp_path, opset="18")
    with pytest.raises(TypeError, match="opset must be an int"):
        export_onnx(tiny_model, tmp_path, opset=True)
    with pytest.raises(ValueError, match="opset must be at least 17, got 13"):
        export_onnx(tiny_model, tmp_path, opset=13)
    with pytest.raises(ValueError, match="quantize must be None or 'int8', got 'int4'"):
        export_onnx(tiny_model, tmp_path, quantize="int4")
    with pytest.raises(TypeError, match="source must be a dict"):
        export_onnx(tiny_model, tmp_path, source="x.pt")
    assert not list(tmp_path.iterdir())


# -------------------------------------------------------------------- onnx backend


@pytest.mark.slow  # the tiny ONNX export fixture: ~10 s
def test_onnx_backend_errors(tiny_export, tmp_path):
    out = tiny_export["dir"]
    enc, dec = out / "encoder.onnx", out / "decoder.onnx"
    with pytest.raises(FileNotFoundError, match="encoder_path: ONNX model file .*nope.onnx"):
        OnnxBackend(tmp_path / "nope.onnx", dec)
    with pytest.raises(FileNotFoundError, match="decoder_path: ONNX model file .*nope.onnx"):
        OnnxBackend(enc, tmp_path / "nope.onnx")
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        OnnxBackend(enc, dec, threads=0)
    with pytest.raises(TypeError, match="threads must be an int or None"):
        OnnxBackend(enc, dec, threads="2")
    with pytest.raises(TypeError, match="threads must be an int or None"):
        OnnxBackend(enc, dec, threads=True)


@pytest.mark.slow  # the tiny ONNX export fixture: ~10 s
def test_onnx_backend_session_options(tiny_export):
    import onnxruntime as ort

    out = tiny_export["dir"]
    b = OnnxBackend(out / "encoder.onnx", out / "decoder.onnx")
    assert b.threads == physical_cores()
    assert b.providers == ["CPUExecutionProvider"]
    opts = b.encoder.get_session_options()
    assert opts.intra_op_num_threads == physical_cores()
    assert opts.inter_op_num_threads == 1
    assert opts.enable_mem_pattern
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert b.encoder.get_providers() == ["CPUExecutionProvider"]


def test_physical_cores_without_psutil(monkeypatch):
    assert physical_cores() >= 1
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert physical_cores() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert physical_cores() == 1


@pytest.mark.slow  # the tiny ONNX export fixture: ~10 s
def test_missing_onnxruntime_gives_install_hint(monkeypatch, tiny_export, tiny_model, tmp_path):
    out = tiny_export["dir"]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="needs onnxruntime, which is not installed: " + HINT):
        import_onnxruntime()
    with pytest.raises(ImportError, match=HINT):
        OnnxBackend(out / "encoder.onnx", out / "decoder.onnx")
    with pytest.raises(ImportError, match=HINT):
        get_onnx_backend(folder=out)
    with pytest.raises(ImportError, match=HINT):
        get_onnx_backend(tiny_model)
    with pytest.raises(ImportError, match=HINT):
        export_onnx(tiny_model, tmp_path / "x", quantize="int8")
    assert not list(tmp_path.iterdir())


def test_missing_onnxscript_gives_install_hint(monkeypatch, tiny_model, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(
        ImportError, match="needs onnx and onnxscript, which are not installed: " + HINT
    ):
        export_onnx(tiny_model, tmp_path / "x")


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
        return _tiny(tiny_state_dict, optimized=optimize)

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
    x = _image(exported[0][0], seed=7)
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


# ------------------------------------------------------------------------- golden


@requires_golden
@pytest.mark.slow
def test_golden_export_uses_one_gelu_operator(golden_onnx_dir):
    """At the default opset every GELU is one ``Gelu`` node (3x faster in onnxruntime than
    the ``Div, Erf, Add, Mul, Mul`` chain of opset < 20), in the encoder and the decoder."""
    for name in ("encoder.onnx", "decoder.onnx", "encoder.int8.onnx"):
        ops = [n.op_type for n in onnx.load(golden_onnx_dir / name).graph.node]
        assert "Erf" not in ops, name
        assert ops.count("Gelu") == {"decoder.onnx": 4}.get(name, 23), name


@requires_golden
@pytest.mark.slow
def test_golden_onnx_parity_and_int8(golden_model, golden_onnx_dir):
    """The real vit_t graph: ORT fp32 against the reference outputs; int8 mask IoU.

    Exported from an unfused model, as ``mobilesam export-onnx`` and the cache do
    (the fused path is tested with the tiny model).
    """
    out = golden_onnx_dir
    meta = json.loads((out / "mobilesam_onnx.json").read_text())
    assert meta["model_name"] == "vit_t" and meta["img_size"] == 1024
    assert meta["embed_shape"] == [256, 64, 64]
    fp32 = get_onnx_backend(folder=out, threads=2)
    cases = np.load(GOLDEN / "public_cases.npz")

    img = torch.from_numpy(cases["photo/resized_uint8"]).permute(2, 0, 1)[None].float()
    x = golden_model.preprocess(img).numpy()
    feats = cases["photo/features"]
    emb = fp32.encode(x)
    assert float(np.abs(emb - feats).max()) <= 1e-3
    assert np.linalg.norm(emb - feats) / np.linalg.norm(feats) <= 1e-4

    torch_b = TorchBackend(golden_model)
    size = cases["photo/p0_mm1/masks"].shape[-2:]
    near = total = 0
    for case in ("p0_mm1", "p1_mm0", "p2_mm1", "p3_mm1", "p4_mm0", "p0_mm1/refine"):
        pre = f"photo/{case}/"
        pts = cases.get(pre + "in_point_coords")
        box = cases.get(pre + "in_box")
        if case.endswith("refine"):
            pts = cases["photo/p0_mm1/in_point_coords"]
            labels = cases["photo/p0_mm1/in_point_labels"]
        else:
            labels = cases.get(pre + "in_point_labels")
        mask = cases.get(pre + "in_mask_input")
        c, lab = _backend_prompts(
            None if pts is None else apply_coords(pts, size, 1024)[None],
            None if labels is None else labels[None],
            None if box is None else apply_boxes(box[None], size, 1024),
        )
        m = None if mask is None else mask[None].astype(np.float32)
        low, iou = fp32.decode(feats, c, lab, m)
        tokens = slice(1, 4) if case.endswith("mm1") else slice(0, 1)
        want = cases[pre + "low_res_logits"]
        assert float(np.abs(low[0, tokens] - want).max()) <= 5e-3, case
        assert float(np.abs(iou[0, tokens] - cases[pre + "iou"]).max()) <= 1e-3, case
        differ = (low[0, tokens] > 0) != (want > 0)
        assert not (differ & (np.abs(want) >= 1e-2)).any(), case
        near += int(differ.sum())
        total += differ.size
        t_low, t_iou = torch_b.decode(feats, c, lab, m)
        assert float(np.abs(low - t_low).max()) <= 5e-3, case
        assert float(np.abs(iou - t_iou).max()) <= 1e-3, case
    assert near / total < 1e-3

    boxes = apply_boxes(cases["photo/batch_boxes/in_boxes"], size, 1024)
    low, iou = fp32.decode(feats, *_backend_prompts(boxes=boxes))
    assert float(np.abs(low[:, :1] - cases["photo/batch_boxes/low_res_logits"]).max()) <= 5e-3
    assert float(np.abs(iou[:, :1] - cases["photo/batch_boxes/iou"]).max()) <= 1e-3

    # int8 end to end (encoder and decoder) against fp32, on points and boxes
    q = get_onnx_backend(folder=out, quantize="int8", threads=2)
    q_emb = q.encode(x)
    rng = np.random.default_rng(0)
    pts = rng.uniform(100, 900, (6, 1, 2)).astype(np.float32)
    bxs = np.sort(rng.uniform(100, 900, (6, 2, 2)), axis=1).reshape(6, 4)
    ious = []
    for c, lab in (_backend_prompts(pts, np.ones((6, 1))), _backend_prompts(boxes=bxs)):
        ref_low, _ = fp32.decode(emb, c, lab)
        q_low, q_iou = q.decode(q_emb, c, lab)
        assert np.isfinite(q_iou).all()
        ious += [
            _mask_iou(a > 0, b > 0)
            for a, b in zip(q_low.reshape(-1, 256, 256), ref_low.reshape(-1, 256, 256), strict=True)
        ]
    mean_iou = float(np.mean(ious))
    print(f"int8 vs fp32 mean mask IoU over {len(ious)} masks: {mean_iou:.4f}")
    assert mean_iou > 0.8
