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

    def calibrate(src, dest, *, device="auto", progress=True, settings=None):
        calls.append(("calibrate", src, dest, settings))
        shutil.copyfile(src, dest)
        return {"before": 0.5, "after": 0.1, "samples": 3}

    def write_data(out, images, *, progress=True):
        calls.append(("data", out, images))
        return out / "train", out / "val"

    monkeypatch.setattr(loop, "train", train)
    monkeypatch.setattr(standin, "calibrate", calibrate)
    monkeypatch.setattr(standin, "write_data", write_data)
    return calls


def test_the_recipe_runs_each_phase_from_the_last_ones_calibrated_half_weights(
    recorded, tmp_path, capsys
):
    run, dest = tmp_path / "run", tmp_path / "weights" / "standin.pt"
    assert standin.main([str(run), "--export", str(dest), "-q"]) == 0

    kinds = [c[0] for c in recorded]
    assert kinds == ["train", "calibrate", "train", "calibrate", "data", "train", "calibrate",
                     "data", "train", "calibrate", "data", "train", "calibrate",
                     "data", "train", "calibrate", "data", "train", "calibrate",
                     "data", "train", "calibrate"]  # fmt: skip
    (_, p1, stop), (_, src1, cal1, s1), (_, p2, _), (_, src2, cal2, s2) = recorded[:4]
    (_, data, images3), (_, p3, stop3), (_, src3, cal3, s3) = recorded[4:7]
    (_, data4, images4), (_, p4, stop4), (_, src4, cal4, s4) = recorded[7:10]
    (_, data5, images5), (_, p5, stop5), (_, src5, cal5, s5) = recorded[10:13]
    (_, data6, images6), (_, p6, stop6), (_, src6, cal6, s6) = recorded[13:16]
    (_, data7, images7), (_, p7, stop7), (_, src7, cal7, s7) = recorded[16:19]
    (_, data9, images9), (_, p9, stop9), (_, src9, final, scores) = recorded[19:22]
    assert p1.checkpoint is None and stop == standin.PHASE1_EPOCHS
    assert p1.step == standin.PHASE1["step"] and p2.step == standin.PHASE2["step"]
    assert p2.step.neighbour_weight > 1
    # phases 1 and 2 as they were run (each 512 px crop its own prompt frame); phase 3
    # trains the decoder at the full input on a folder of images
    assert p1.input_frame == p2.input_frame == "own" and p1.input_size == p2.input_size == 512
    assert p3.input_size is None and p3.train_encoder == "none" and p3.caches_embeddings
    assert (p3.data, p3.val_data) == (data / "train", data / "val")
    assert stop3 is None  # the whole schedule
    # phase 4 trains the decoder on at the full input, on new images
    assert p4.input_size is None and p4.train_encoder == "none" and p4.caches_embeddings
    assert (p4.data, p4.val_data) == (data4 / "train", data4 / "val") and data4 != data
    assert images3 == standin.PHASE3_IMAGES and images4 == standin.PHASE4_IMAGES
    assert images3[2] != images4[2]  # another seed: other images
    assert stop4 is None and p4.lr < p3.lr
    # phase 5: the decoder at the full input, its losses on 4x upsampled logits, new images
    assert p5.input_size is None and p5.train_encoder == "none" and p5.caches_embeddings
    assert p5.step.loss_upsample == 4 and p4.step.loss_upsample == 1
    assert p5.step.neighbour_weight == p4.step.neighbour_weight
    assert (p5.data, p5.val_data) == (data5 / "train", data5 / "val")
    assert images5 == standin.PHASE5_IMAGES and images5[2] not in (images3[2], images4[2])
    assert stop5 is None
    # phase 6: every part at the full input (the encoder slower than the decoder), phase
    # 5's losses, new images, nothing cached
    assert p6.input_size is None and p6.train_encoder == "all" and not p6.caches_embeddings
    assert p6.encoder_lr < p6.lr and p6.step == p5.step
    assert (p6.data, p6.val_data) == (data6 / "train", data6 / "val")
    assert images6 == standin.PHASE6_IMAGES
    assert images6[2] not in (images3[2], images4[2], images5[2])
    assert stop6 is None
    # phase 7: phase 6's settings on new images, some of them planes of small cells
    assert p7.train_encoder == "all" and p7.step == p6.step and p7.lr == p6.lr
    assert (p7.data, p7.val_data) == (data7 / "train", data7 / "val")
    assert images7 == standin.PHASE7_IMAGES and images7[4] > 0
    assert images7[2] not in (images3[2], images4[2], images5[2], images6[2])
    assert stop7 is None
    assert src1 == run / "phase1" / "best.pt"
    # each phase starts from the last one's calibrated weights as they are exported (float16)
    assert p2.checkpoint == run / "phase1_calibrated_fp16.pt"
    assert p3.checkpoint == run / "phase2_calibrated_fp16.pt"
    assert p4.checkpoint == run / "phase3_calibrated_fp16.pt"
    assert p5.checkpoint == run / "phase4_calibrated_fp16.pt"
    assert p6.checkpoint == run / "phase5_calibrated_fp16.pt"
    assert p7.checkpoint == run / "phase6_calibrated_fp16.pt"
    for ckpt, cal in ((p2.checkpoint, cal1), (p3.checkpoint, cal2), (p4.checkpoint, cal3),
                      (p5.checkpoint, cal4), (p6.checkpoint, cal5),
                      (p7.checkpoint, cal6)):  # fmt: skip
        start = torch.load(ckpt, weights_only=True)
        assert start["w"].dtype == torch.float16 and start["n"].dtype == torch.int64
        torch.testing.assert_close(start["w"], torch.load(cal, weights_only=True)["w"].half())
    assert src2 == run / "phase2" / "best.pt"
    assert src3 == run / "phase3" / "best.pt"
    assert src4 == run / "phase4" / "best.pt"
    assert src5 == run / "phase5" / "best.pt"
    assert src6 == run / "phase6" / "best.pt"
    assert src7 == run / "phase7" / "best.pt" and cal7 == run / "phase7_calibrated.pt"
    assert {s1, s2, s3, s4, s5, s6, s7} == {None}  # the IoU head's calibration
    # phase 9: the decoder alone from phase 7's calibrated model as it was bundled
    # (float16), its IoU loss weighed up, on new images; then the scores fitted to the
    # default thresholds on its best checkpoint
    assert p9.checkpoint == run / "phase7_calibrated_fp16.pt"
    assert torch.load(p9.checkpoint, weights_only=True)["w"].dtype == torch.float16
    assert p9.input_size is None and p9.train_encoder == "none" and p9.caches_embeddings
    assert p9.step.iou_weight > p7.step.iou_weight and p9.step.background > p7.step.background
    assert p9.step.loss_upsample == p7.step.loss_upsample
    assert p9.step.neighbour_weight == p7.step.neighbour_weight
    assert (p9.data, p9.val_data) == (data9 / "train", data9 / "val")
    assert images9 == standin.PHASE9_IMAGES and stop9 is None
    assert images9[2] not in (images3[2], images4[2], images5[2], images6[2], images7[2])
    assert src9 == run / "phase9" / "best.pt" and final == run / "standin.pt"
    assert scores is standin.SCORES and scores["quantile"] > 0.5 and scores["logit_scale"] > 1
    shipped = torch.load(dest, weights_only=True)
    assert shipped["w"].dtype == torch.float16
    first = torch.load(p2.checkpoint, weights_only=True)["w"].float()
    torch.testing.assert_close(shipped["w"].float(), first + 7, atol=4e-3, rtol=0)
    out = capsys.readouterr().out
    assert out.count("IoU head: mean squared error 0.5000 -> 0.1000 on 3 prompts") == 8
    assert f"{dest}: sha256 " in out


def test_phase_data_is_seeded_and_kept(tmp_path):
    import numpy as np
    import tifffile

    from napari_mobilesam.training.data import find_pairs
    from napari_mobilesam.training.sources import SyntheticSource, _seed

    train, val = standin.write_data(tmp_path, (2, 1, 7), progress=False)
    assert [p.image.name for p in find_pairs(train)] == ["t000.tif", "t001.tif"]
    assert [p.image.name for p in find_pairs(val)] == ["v000.tif"]
    want = SyntheticSource(2, seed=7).make(_seed(7, "t", 1))
    np.testing.assert_array_equal(tifffile.imread(train / "t001.tif"), want.image)
    np.testing.assert_array_equal(tifffile.imread(train / "t001_labels.tif"), want.labels)
    stamp = (train / "t000.tif").stat().st_mtime_ns
    standin.write_data(tmp_path, (2, 1, 7), progress=False)  # a rerun keeps finished files
    assert (train / "t000.tif").stat().st_mtime_ns == stamp


def test_phase_data_with_small_cell_planes(tmp_path, monkeypatch):
    import numpy as np
    import tifffile

    from napari_mobilesam.training import sources
    from napari_mobilesam.training.sources import SyntheticSource, _seed

    monkeypatch.setattr(sources, "SMALL_CELLS", ((96, 96), (3.0, 4.0)))
    train, _ = standin.write_data(tmp_path, (1, 0, 7, 0.0, 1.0), progress=False)
    want = SyntheticSource(1, seed=7, small=1.0).make(_seed(7, "t", 0))
    assert want.image.shape == (96, 96)
    np.testing.assert_array_equal(tifffile.imread(train / "t000.tif"), want.image)


def test_phase_data_with_planes_of_stacks(tmp_path):
    import numpy as np
    import tifffile

    from napari_mobilesam.training.sources import SyntheticSource, _seed

    train, _ = standin.write_data(tmp_path, (1, 0, 7, 1.0), progress=False)
    want = SyntheticSource(1, seed=7, planes=1.0).make(_seed(7, "t", 0))
    assert want.name.startswith("synthetic-plane")
    np.testing.assert_array_equal(tifffile.imread(train / "t000.tif"), want.image)
    np.testing.assert_array_equal(tifffile.imread(train / "t000_labels.tif"), want.labels)


@pytest.mark.parametrize("settings", [None, "SCORES"])
def test_calibrate_scales_the_logits_and_fits_the_quantile_of_its_settings(
    tiny_model, tmp_path, monkeypatch, settings
):
    from napari_mobilesam import build
    from napari_mobilesam.training import calibrate as cal
    from napari_mobilesam.training import sources

    cfg = standin.SCORES if settings == "SCORES" else standin.CALIBRATION
    hyper = tiny_model.mask_decoder.output_hypernetworks_mlps[0].layers[-1].weight.clone()
    seen = {}

    def samples(model, images, points_per_side):
        seen.update(grid=points_per_side, images=len(list(images)))
        return torch.zeros(2, 8), torch.zeros(2, 4)

    def fit(model, features, targets, **kw):
        seen.update(kw)
        return {"before": 0.5, "after": 0.1, "samples": 2}

    monkeypatch.setattr(build, "load_model", lambda *a, **k: tiny_model)
    monkeypatch.setattr(sources.SyntheticSource, "make", lambda self, seed: None)
    monkeypatch.setattr(cal, "iou_head_samples", samples)
    monkeypatch.setattr(cal, "calibrate_iou_head", fit)
    dest = tmp_path / "out.pt"
    standin.calibrate(tmp_path / "src.pt", dest, progress=False,
                      settings=None if settings is None else cfg)  # fmt: skip
    got = tiny_model.mask_decoder.output_hypernetworks_mlps[0].layers[-1].weight
    torch.testing.assert_close(got, hyper * cfg.get("logit_scale", 1.0))
    assert seen["quantile"] == cfg.get("quantile")
    assert (seen["grid"], seen["images"], seen["epochs"]) == (
        cfg["points_per_side"], cfg["images"], cfg["epochs"])  # fmt: skip
    assert dest.is_file()
