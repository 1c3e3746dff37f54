"""Backends: ONNX export, onnxruntime parity and the ONNX backend (the torch backend:
test_runtime_torch.py; the export cache: test_runtime_cache.py)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import onnx

from napari_mobilesam.accel import is_optimized
from napari_mobilesam.accel.onednn import ConvGELU, OneDNNLinear
from napari_mobilesam.runtime import (
    DEFAULT_OPSET,
    EXPORTER_VERSION,
    OnnxBackend,
    TorchBackend,
    export_onnx,
    get_onnx_backend,
    plain_copy,
)
from napari_mobilesam.runtime import export as export_mod
from napari_mobilesam.runtime.onnx_backend import (
    import_onnxruntime,
    physical_cores,
)
from napari_mobilesam.transforms import apply_boxes, apply_coords
from napari_mobilesam.weights import sha256_file

from .conftest import GOLDEN, requires_golden
from .runtime_support import (
    FILES,
    HINT,
    assert_close,
    backend_prompts,
    image,
    mask_iou,
)

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
    x = image(fused_tiny, seed=3)
    emb_t, emb_o = ref.encode(x), ort_b.encode(x)
    assert emb_o.dtype == np.float32 and emb_o.shape == (1, 32, 8, 8)
    assert_close(emb_o, emb_t, 1e-5, "embedding")
    s = fused_tiny.img_size
    points = rng.uniform(0, s, (3, 1, 2)).astype(np.float32)
    boxes = np.sort(rng.uniform(0, s, (3, 2, 2)), axis=1).reshape(3, 4)
    masks = rng.normal(size=(3, 1, 32, 32)).astype(np.float32)
    cases = {
        "B=3 N=2": (*backend_prompts(points, [[1], [0], [1]]), None),
        "box": (*backend_prompts(boxes=boxes[:1]), None),
        "points+box+mask": (*backend_prompts(points, [[1], [1], [0]], boxes), masks),
        "mask only": (*backend_prompts(b=3), masks),
        "B=1 N=1": (*backend_prompts(b=1), None),
    }
    for name, (c, lab, m) in cases.items():
        want = ref.decode(emb_t, c, lab, m)
        got = ort_b.decode(emb_t, c, lab, m)
        assert got[0].shape == want[0].shape and got[1].shape == want[1].shape, name
        assert_close(got[0], want[0], 1e-4, f"{name} logits")
        assert_close(got[1], want[1], 1e-4, f"{name} iou")
    # has_mask_input is per prompt: rows with 0 ignore their mask
    c, lab = backend_prompts(points, [[1], [0], [1]])
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
        assert_close(low[i], src[0][i], 1e-4, f"row {i} logits")
        assert_close(iou[i], src[1][i], 1e-4, f"row {i} iou")


@pytest.mark.slow  # the tiny ONNX export fixture: ~10 s
def test_int8_models_run(tiny_export, fused_tiny):
    out = tiny_export["dir"]
    q = OnnxBackend(out / "encoder.int8.onnx", out / "decoder.int8.onnx", threads=1)
    x = image(fused_tiny, seed=5)
    emb = q.encode(x)
    assert emb.shape == (1, 32, 8, 8) and np.isfinite(emb).all()
    low, iou = q.decode(emb, *backend_prompts(np.full((2, 1, 2), 60.0), [[1], [0]]))
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
        c, lab = backend_prompts(
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
    low, iou = fp32.decode(feats, *backend_prompts(boxes=boxes))
    assert float(np.abs(low[:, :1] - cases["photo/batch_boxes/low_res_logits"]).max()) <= 5e-3
    assert float(np.abs(iou[:, :1] - cases["photo/batch_boxes/iou"]).max()) <= 1e-3

    # int8 end to end (encoder and decoder) against fp32, on points and boxes
    q = get_onnx_backend(folder=out, quantize="int8", threads=2)
    q_emb = q.encode(x)
    rng = np.random.default_rng(0)
    pts = rng.uniform(100, 900, (6, 1, 2)).astype(np.float32)
    bxs = np.sort(rng.uniform(100, 900, (6, 2, 2)), axis=1).reshape(6, 4)
    ious = []
    for c, lab in (backend_prompts(pts, np.ones((6, 1))), backend_prompts(boxes=bxs)):
        ref_low, _ = fp32.decode(emb, c, lab)
        q_low, q_iou = q.decode(q_emb, c, lab)
        assert np.isfinite(q_iou).all()
        ious += [
            mask_iou(a > 0, b > 0)
            for a, b in zip(q_low.reshape(-1, 256, 256), ref_low.reshape(-1, 256, 256), strict=True)
        ]
    mean_iou = float(np.mean(ious))
    print(f"int8 vs fp32 mean mask IoU over {len(ious)} masks: {mean_iou:.4f}")
    assert mean_iou > 0.8
