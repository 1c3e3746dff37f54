"""``mobilesam-distill``: argument handling, errors, and an end-to-end run with the real vit_t."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from napari_mobilesam.build import load_model
from napari_mobilesam.distill.cli import main

from .conftest import GOLDEN, GOLDEN_CKPT, TINY_CONFIG, requires_golden


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("embed", "train", "evaluate", "finetune-decoder"):
        assert cmd in out
    assert main(["--version"]) == 0
    assert main([]) == 2
    assert main(["train", "--help"]) == 0
    assert "--resume" in capsys.readouterr().out


def test_module_entry_point_for_torchrun():
    out = subprocess.run([sys.executable, "-m", "napari_mobilesam.distill", "--help"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "finetune-decoder" in out.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["embed", "--teacher", "vit_t", "--teacher-weights", "{tmp}/none.pt", "--images",
          "{tmp}", "--out", "{tmp}/e"], "--teacher-weights .*none.pt: no such file"),
        (["embed", "--teacher", "{tmp}/cfg.json", "--images", "{tmp}", "--out", "{tmp}/e"],
         "--teacher-weights is needed for the model .*cfg.json"),
        (["embed", "--images", "{tmp}/nowhere", "--out", "{tmp}/e"],
         "--images .*nowhere: no such folder"),
        (["train", "--embeddings", "{tmp}/nowhere", "--images", "{tmp}", "--out", "{tmp}/r"],
         "--embeddings .*nowhere: no such folder"),
        (["train", "--embeddings", "{tmp}", "--images", "{tmp}/nowhere", "--out", "{tmp}/r"],
         "--images .*nowhere: no such folder"),
        (["train", "--embeddings", "{tmp}", "--images", "{tmp}", "--out", "{tmp}/r",
          "--teacher-weights", "{tmp}/none.pt"], "--teacher-weights .*none.pt: no such file"),
        (["evaluate", "--student", "{tmp}/none.pt", "--images", "{tmp}"],
         "--student .*none.pt: no such file"),
        (["evaluate", "--student", "{tmp}/cfg.json", "--images", "{tmp}/nowhere"],
         "--images .*nowhere: no such folder"),
        (["finetune-decoder", "--checkpoint", "{tmp}/none.pt", "--images", "{tmp}", "--out",
          "{tmp}/f"], "--checkpoint .*none.pt: no such file"),
        (["finetune-decoder", "--checkpoint", "{tmp}/cfg.json", "--images", "{tmp}/nowhere",
          "--out", "{tmp}/f"], "--images .*nowhere: no such folder"),
    ],
)  # fmt: skip
def test_usage_errors(argv, message, tmp_path, capsys):
    (tmp_path / "cfg.json").write_text("{}")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mobilesam-distill: error: ") and re.search(message, err), err


def test_failures_are_one_line_with_status_1(tmp_path, capsys):
    """Errors raised by the library (here: an empty image folder) become exit status 1."""
    (tmp_path / "images").mkdir()
    ckpt = tmp_path / "t.pt"
    from napari_mobilesam.build import build_sam

    torch.save(build_sam(TINY_CONFIG).state_dict(), ckpt)
    cfg = tmp_path / "tiny.json"
    from napari_mobilesam.distill.models import config_to_dict

    cfg.write_text(json.dumps(config_to_dict(TINY_CONFIG)))
    argv = ["embed", "--teacher", str(cfg), "--teacher-weights", str(ckpt), "--images",
            str(tmp_path / "images"), "--out", str(tmp_path / "emb"), "--quiet"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no images" in err and "Traceback" not in err


def _images(folder, n_synthetic=1):
    folder.mkdir()
    for name in ("photo", "micro"):
        shutil.copy(GOLDEN / "images" / f"public_{name}.png", folder / f"{name}.png")
    rng = np.random.default_rng(0)
    for i in range(n_synthetic):
        img = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"synthetic_{i}.jpg")
    return folder


@requires_golden
@pytest.mark.slow
def test_end_to_end_golden_teacher_vit_t_student(tmp_path, capsys):
    """The acceptance run: golden checkpoint as teacher, vit_t student, a handful of images."""
    images = _images(tmp_path / "images")
    emb, run = tmp_path / "emb", tmp_path / "run"
    teacher = ["--teacher", "vit_t", "--teacher-weights", str(GOLDEN_CKPT)]
    assert main(["embed", *teacher, "--images", str(images), "--out", str(emb),
                 "--workers", "0", "--quiet"]) == 0  # fmt: skip
    assert "3 embedded, 0 already done, 0 failed, of 3 images" in capsys.readouterr().out
    assert main(["embed", *teacher, "--images", str(images), "--out", str(emb),
                 "--workers", "0", "--quiet"]) == 0  # fmt: skip
    assert "0 embedded, 3 already done" in capsys.readouterr().out

    assert main(["train", "--embeddings", str(emb), "--images", str(images), "--student",
                 "vit_t", "--out", str(run), "--epochs", "2", "--batch-size", "2",
                 "--lr", "1e-3", "--workers", "0", "--quiet"]) == 0  # fmt: skip
    assert "4 steps, 2 epochs" in capsys.readouterr().out
    with open(run / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    student = load_model("vit_t", run / "student.pt", device="cpu")  # loads and predicts
    from napari_mobilesam.predictor import Predictor

    pred = Predictor(student)
    micro = np.asarray(Image.open(images / "micro.png").convert("RGB"))
    pred.set_image(micro)
    masks, iou, _ = pred.predict(np.array([[100, 100]]), np.array([1]))
    assert masks.shape == (3, *micro.shape[:2]) and np.isfinite(iou).all()

    out_json = tmp_path / "eval.json"
    assert main(["evaluate", "--student", str(run / "student.pt"), *teacher, "--images",
                 str(images), "--n", "4", "--json", str(out_json), "--quiet"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    miou = float(re.search(r"^mIoU: ([0-9.]+)", text, re.M).group(1))
    result = json.loads(out_json.read_text())
    assert result["n_images"] == 3 and result["n_prompts"] == 3 * 2 * 4
    assert 0 <= miou < 1 and result["embedding_mse"] > 0
    # the teacher evaluated as its own student: identical masks
    assert main(["evaluate", "--student", str(GOLDEN_CKPT), *teacher, "--images",
                 str(images), "--n", "2", "--limit", "1", "--quiet"]) == 0  # fmt: skip
    assert re.search(r"^mIoU: 1\.0+$", capsys.readouterr().out, re.M)
