"""The stand-in model's recipe (``napari_mobilesam.training.standin``): the order of its
steps and what each starts from. Training and calibration themselves are tested in
``test_training*.py``; here they are replaced by light stand-ins
that record their calls and write small checkpoints."""

from __future__ import annotations

import shutil

import pytest
import torch

from napari_mobilesam.training import loop, standin


@pytest.fixture
def recorded(monkeypatch):
    calls = []

    def train(cfg, *, resume=False, progress=True, stop_after=None):
        if cfg.checkpoint is None:
            state = {"w": torch.full((3,), 1.0 / 3), "n": torch.tensor(7)}
        else:
            state = {k: v.float() if v.is_floating_point() else v
                     for k, v in torch.load(cfg.checkpoint, weights_only=True).items()}  # fmt: skip
            state["w"] = state["w"] + 1
        cfg.out.mkdir(parents=True, exist_ok=True)
        torch.save(state, cfg.out / "best.pt")
        calls.append(("train", cfg, stop_after))
        return {}

    def calibrate(src, dest, *, device="auto", progress=True):
        calls.append(("calibrate", src, dest))
        shutil.copyfile(src, dest)
        return {"before": 0.5, "after": 0.1, "samples": 3}

    monkeypatch.setattr(loop, "train", train)
    monkeypatch.setattr(standin, "calibrate", calibrate)
    return calls


def test_the_recipe_runs_phase_2_from_phase_1s_calibrated_half_weights(recorded, tmp_path, capsys):
    run, dest = tmp_path / "run", tmp_path / "weights" / "standin.pt"
    assert standin.main([str(run), "--export", str(dest), "-q"]) == 0

    kinds = [c[0] for c in recorded]
    assert kinds == ["train", "calibrate", "train", "calibrate"]
    (_, p1, stop), (_, src1, cal1), (_, p2, _), (_, src2, final) = recorded
    assert p1.checkpoint is None and stop == standin.PHASE1_EPOCHS
    assert p1.step == standin.PHASE1["step"] and p2.step == standin.PHASE2["step"]
    assert p2.step.neighbour_weight > 1
    assert src1 == run / "phase1" / "best.pt"
    # phase 2 starts from phase 1's calibrated weights as they are exported (float16)
    assert p2.checkpoint == run / "phase1_calibrated_fp16.pt"
    start = torch.load(p2.checkpoint, weights_only=True)
    assert start["w"].dtype == torch.float16 and start["n"].dtype == torch.int64
    torch.testing.assert_close(start["w"], torch.load(cal1, weights_only=True)["w"].half())
    # the final calibration fits phase 2's best checkpoint; the export is it in float16
    assert src2 == run / "phase2" / "best.pt" and final == run / "standin.pt"
    shipped = torch.load(dest, weights_only=True)
    assert shipped["w"].dtype == torch.float16
    torch.testing.assert_close(shipped["w"].float(), start["w"].float() + 1, atol=1e-3, rtol=0)
    out = capsys.readouterr().out
    assert out.count("IoU head: mean squared error 0.5000 -> 0.1000 on 3 prompts") == 2
    assert f"{dest}: sha256 " in out
