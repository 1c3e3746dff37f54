"""The onnxruntime backend wired into Predictor, MaskGenerator and the command lines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_mobilesam import cli as mobilesam_cli
from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.predictor import Predictor

from .conftest import GOLDEN, GOLDEN_CKPT

pytest.importorskip("onnxruntime")


def test_predictor_backend_arguments(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="'torch' or 'onnx'"):
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


def test_mask_generator_backend_argument(tiny_model):
    with pytest.raises(ValueError, match="has its own"):
        MaskGenerator(Predictor(tiny_model), backend="onnx")


@pytest.fixture
def photo():
    path = GOLDEN / "images" / "public_photo.png"
    if not path.exists():
        pytest.skip("golden images not found")
    return np.asarray(Image.open(path).convert("RGB"))


def test_everything_onnx_equals_torch(golden_model, golden_onnx_dir, photo):
    params = {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    onnx = Predictor(golden_model, backend="onnx", onnx_folder=golden_onnx_dir)
    want = MaskGenerator(golden_model, **params).generate_labels(photo)
    got = MaskGenerator(onnx, **params).generate_labels(photo)
    assert want.max() > 0
    np.testing.assert_array_equal(got, want)
    ref = MaskGenerator(onnx, **params, mode="reference", nms="box")
    assert ref.predictor.backend is onnx.backend  # reference mode keeps the backend
    assert len(ref.generate(photo)) > 0


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
