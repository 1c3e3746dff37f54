"""The onnxruntime backend wired into Predictor, MaskGenerator and the command lines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from napari_mobilesam import cli as mobilesam_cli
from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.predictor import Predictor

from .conftest import GOLDEN, GOLDEN_CKPT

pytest.importorskip("onnxruntime")


def test_predictor_backend_arguments(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="'torch', 'onnx' or 'auto'"):
        Predictor(tiny_model, backend="tensorrt")
    with pytest.raises(ValueError, match="need backend='onnx'"):
        Predictor(tiny_model, onnx_folder=tmp_path)
    with pytest.raises(ValueError, match="need backend='onnx'"):
        Predictor(tiny_model, quantize="int8")
    with pytest.raises(TypeError, match="backend"):
        Predictor(tiny_model, backend=3)
    with pytest.raises(FileNotFoundError):
        Predictor(tiny_model, backend="onnx", onnx_folder=tmp_path / "missing")


def test_predictor_takes_a_backend_object(tiny_model, rng):
    from napari_mobilesam.runtime import TorchBackend

    image = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    ours, ref = Predictor(tiny_model, backend=TorchBackend(tiny_model)), Predictor(tiny_model)
    ours.set_image(image)
    ref.set_image(image)
    for kw in (
        {"point_coords": np.array([[30, 20]]), "point_labels": np.array([1])},
        {"box": np.array([10, 5, 50, 40])},
        {"point_coords": np.array([[30, 20], [5, 5]]), "point_labels": np.array([1, 0]),
         "box": np.array([10, 5, 50, 40]), "multimask_output": False},
    ):  # fmt: skip
        for got, want in zip(ours.predict(**kw), ref.predict(**kw), strict=True):
            np.testing.assert_allclose(got.astype(float), want.astype(float), atol=1e-4)


@pytest.mark.slow
def test_auto_backend_on_cpu_is_onnx_encoder_torch_decoder(
    golden_model, onnx_cache, golden_onnx_dir, rng
):
    """backend='auto' with ONNX models asked for: onnxruntime's encoder features, our
    torch decoder's masks; in float32 without a folder, plain torch (as fast, no export)."""
    image = rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)
    assert Predictor(golden_model, backend="auto").backend_name == "torch"
    auto = Predictor(golden_model, backend="auto", onnx_folder=golden_onnx_dir)
    onnx_pred, torch_pred = (Predictor(golden_model, backend=b) for b in ("onnx", "torch"))
    assert auto.backend_name == "onnx encoder + torch decoder"
    assert onnx_pred.backend_name == "onnx" and torch_pred.backend_name == "torch"
    assert auto.engine.decoder.name == "torch"  # decoding: torch with its per-image cache
    for p in (auto, onnx_pred, torch_pred):
        p.set_image(image)
    assert torch.equal(auto.features, onnx_pred.features)
    torch.testing.assert_close(auto.features, torch_pred.features, rtol=0, atol=1e-4)
    pt = (np.array([[40, 50]]), np.array([1]))
    torch_pred.set_embedding(auto.get_embedding())  # same embedding -> same decoder output
    for got, want in zip(auto.predict(*pt), torch_pred.predict(*pt), strict=True):
        np.testing.assert_array_equal(got, want)
    embs = auto.embed_images([image, image[:60]], batch_size=2)
    assert torch.equal(embs[0].features, auto.features)
    q = Predictor(golden_model, backend="auto", quantize="int8")
    assert q.backend_name == "onnx int8 encoder + torch decoder"
    gen = MaskGenerator(golden_model, points_per_side=2, backend="auto")
    assert gen.predictor.backend_name == "torch"


def test_auto_backend_falls_back_to_torch(tiny_model, monkeypatch):
    import napari_mobilesam.runtime as runtime
    import napari_mobilesam.runtime.onnx_backend as ob

    # reduced precision: the torch encoder under autocast
    pred = Predictor(tiny_model, backend="auto", precision="bf16")
    assert pred.backend_name == "torch" and pred.precision == "bf16"

    # export failure: a warning, then torch
    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(runtime, "get_onnx_backend", broken)
    with pytest.warns(RuntimeWarning, match="exporter exploded.*using torch"):
        assert Predictor(tiny_model, backend="auto", quantize="int8").backend_name == "torch"

    # onnxruntime not installed: torch, silently
    def missing():
        raise ImportError("no onnxruntime")

    monkeypatch.setattr(ob, "import_onnxruntime", missing)
    assert Predictor(tiny_model, backend="auto", quantize="int8").backend_name == "torch"


def test_mask_generator_backend_argument(tiny_model):
    with pytest.raises(ValueError, match="has its own"):
        MaskGenerator(Predictor(tiny_model), backend="onnx")


@pytest.fixture
def photo():
    path = GOLDEN / "images" / "public_photo.png"
    if not path.exists():
        pytest.skip("golden images not found")
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
def test_everything_onnx_equals_torch(golden_model, golden_onnx_dir, photo):
    params = {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    onnx = Predictor(golden_model, backend="onnx", onnx_folder=golden_onnx_dir)
    want = MaskGenerator(golden_model, **params).generate_labels(photo)
    got = MaskGenerator(onnx, **params).generate_labels(photo)
    assert want.max() > 0
    np.testing.assert_array_equal(got, want)
    ref = MaskGenerator(onnx, **params, mode="reference", nms="box")
    assert ref.pipeline.decoder is onnx.engine.decoder  # reference mode keeps the backend
    assert len(ref.generate(photo)) > 0


@pytest.mark.slow
def test_batch_tool_onnx_backend(onnx_cache, tmp_path, photo):
    from mobilesam_batch import cli, segment

    tifffile.imwrite(tmp_path / "in.tif", photo[:300, :400, 0])
    args = [str(tmp_path / "in.tif"), "--weights", str(GOLDEN_CKPT), "--device", "cpu", "-q"]
    args += ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
    segment._SEGMENTERS.clear()
    try:
        assert cli.main([*args, "-o", str(tmp_path / "torch")]) == 0
        assert cli.main([*args, "-o", str(tmp_path / "onnx"), "--backend", "onnx"]) == 0
    finally:
        segment._SEGMENTERS.clear()
    want = tifffile.imread(tmp_path / "torch" / "in_labels.tif")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "onnx" / "in_labels.tif"), want)
    prov = json.loads((tmp_path / "onnx" / "in_labels.json").read_text())
    assert prov["model"]["backend"] == "onnx"
    assert not list((onnx_cache / "onnx").glob("*/.*"))  # nothing re-exported or half-written


def test_export_onnx_command(tmp_path, monkeypatch, capsys):
    from napari_mobilesam import runtime

    calls = []

    def fake_export(model, out_dir, *, opset, quantize, source):
        calls.append((model.model_name, opset, quantize, source["sha256"]))
        out_dir.mkdir(parents=True)
        return {"files": {"encoder.onnx": "x", "decoder.onnx": "y"}}

    monkeypatch.setattr(runtime, "export_onnx", fake_export)
    if not GOLDEN_CKPT.exists():
        pytest.skip("golden checkpoint not found")
    out = tmp_path / "onnx"
    code = mobilesam_cli.main(["export-onnx", "--weights", str(GOLDEN_CKPT), "-o", str(out),
                               "--quantize", "int8", "--opset", "17"])  # fmt: skip
    assert code == 0 and calls[0][:3] == ("vit_t", 17, "int8") and len(calls[0][3]) == 64
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "decoder.onnx"), str(out / "encoder.onnx")]


def test_export_onnx_command_errors(tmp_path, capsys):
    code = mobilesam_cli.main(["export-onnx", "--weights", str(tmp_path / "x.pt"), "-o", "o"])
    assert code == 2 and "no such file" in capsys.readouterr().err
    code = mobilesam_cli.main(["export-onnx", "--model", "vit_q", "-o", str(tmp_path)])
    assert code == 2 and "vit_q" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code = mobilesam_cli.main(["export-onnx", "--weights", str(bad), "-o", str(tmp_path / "o")])
    assert code == 1 and "bad.pt" in capsys.readouterr().err
