"""``benchmarks/bench_distill.py`` runs (tiny models, not timed) so it is always ready."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from benchmarks import bench_distill

from napari_mobilesam.build import build_sam
from napari_mobilesam.distill.models import config_to_dict

from .conftest import TINY_CONFIG

# a student smaller than the teacher, with the same 32 x 8 x 8 embedding
SMALL_STUDENT = dataclasses.replace(
    TINY_CONFIG,
    encoder=dataclasses.replace(TINY_CONFIG.encoder, embed_dims=(8, 8, 16, 12)),
)


def test_run_times_both_paths(tmp_path):
    teacher_ckpt = tmp_path / "teacher.pt"
    torch.save(build_sam(TINY_CONFIG).state_dict(), teacher_ckpt)
    result = bench_distill.run(
        TINY_CONFIG, teacher_ckpt, SMALL_STUDENT, batch_size=2, steps=1, device="cpu"
    )
    assert [r["path"] for r in result["rows"]] == ["ours", "baseline"]
    for row in result["rows"]:
        assert row["images_per_s"] > 0 and row["step_s"]["n"] == 1
        assert row["images_per_s"] == pytest.approx(2 / row["step_s"]["median"])
        assert row["last_loss"] > 0
    base = result["rows"][1]
    assert base["ratio"] == 1.0
    assert result["rows"][0]["ratio"] == pytest.approx(
        result["rows"][0]["images_per_s"] / base["images_per_s"]
    )
    assert result["embed_shape"] == [32, 8, 8] and result["image_size"] == 128
    assert result["teacher_weights"] == str(teacher_ckpt) and result["amp"] is None
    text = bench_distill.report(result)
    assert "images/s" in text and "online: teacher encoder every step" in text


def test_both_paths_train_towards_the_same_targets():
    """Precomputed (fp16) and online targets are the teacher's embedding: same losses."""
    result = bench_distill.run(TINY_CONFIG, None, TINY_CONFIG, batch_size=1, steps=2)
    ours, base = (r["last_loss"] for r in result["rows"])
    assert ours == pytest.approx(base, rel=1e-2)
    assert result["teacher_weights"] is None  # a config teacher: random initialisation


def test_image_size_override_and_main(tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(config_to_dict(TINY_CONFIG)))
    out = tmp_path / "r.json"
    argv = ["--teacher", str(cfg), "--student", str(cfg), "--steps", "1", "--batch-size", "1",
            "--device", "cpu", "--image-size", "64", "--json", str(out)]  # fmt: skip
    assert bench_distill.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["image_size"] == 64 and data["embed_shape"] == [32, 4, 4]
    assert [r["path"] for r in data["rows"]] == ["ours", "baseline"]
    assert "vs baseline" in capsys.readouterr().out


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="batch_size and steps"):
        bench_distill.run(TINY_CONFIG, None, TINY_CONFIG, steps=0)
    with pytest.raises(ValueError, match="image_size needs a randomly initialised teacher"):
        bench_distill.run(TINY_CONFIG, tmp_path / "t.pt", TINY_CONFIG, image_size=64)
