"""Training a student encoder on stored teacher embeddings (mobilesam-distill, step 2)."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_mobilesam.build import build_sam, load_state_dict_checked, read_state_dict
from napari_mobilesam.distill import train as train_mod
from napari_mobilesam.distill.data import DataError
from napari_mobilesam.distill.embed import embed_images
from napari_mobilesam.distill.models import config_to_dict
from napari_mobilesam.distill.train import (
    TrainConfig,
    _epoch_indices,
    lr_at,
    param_groups,
    train,
)
from napari_mobilesam.weights import sha256_file

from .conftest import TINY_CONFIG
from .test_distill_store import write_images, write_teacher

# a flat schedule: the learning rate of a step does not depend on the total number
# of steps, so a run extended on resume must repeat the straight run exactly
FLAT = {"warmup_steps": 2, "min_lr_ratio": 1.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: threads only add contention on shared CI machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 images, a random tiny teacher, and its embedding store (not to be modified)."""
    root = tmp_path_factory.mktemp("distill")
    write_images(root / "images", n=6)
    config, weights = write_teacher(root / "teacher")
    embed_images(config, weights, root / "images", root / "emb", workers=0, progress=False)
    return SimpleNamespace(
        root=root, images=root / "images", config=config, weights=weights, emb=root / "emb"
    )


def make_cfg(data, out: Path, **kw) -> TrainConfig:
    base = {
        "embeddings": data.emb,
        "images": data.images,
        "out": out,
        "student": data.config,
        "epochs": 2,
        "batch_size": 2,
        "lr": 3e-3,
        "workers": 0,
    }
    return TrainConfig(**{**base, **kw})


def read_log(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=0, atol=1e-6)
    np.testing.assert_allclose([r["lr"] for r in a], [r["lr"] for r in b], rtol=1e-12)


def encoder_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["encoder"]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """Two epochs in one go with the flat schedule (3 steps per epoch)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    res = train(make_cfg(data, out, **FLAT), progress=False)
    return SimpleNamespace(out=out, res=res, rows=read_log(out / "log.csv"))


# ---------------------------------------------------------------------- training


def test_loss_decreases_and_run_folder(data, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(data, out, epochs=10)
    res = train(cfg, progress=False)
    rows = read_log(out / "log.csv")
    header = (out / "log.csv").read_text().splitlines()[0]
    assert header == "step,epoch,loss,lr,images_per_s,elapsed_s"
    losses = [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert [r["epoch"] for r in rows] == [e for e in range(1, 11) for _ in range(3)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # warmup 2 steps (5% of 30, rounded), then a cosine to lr / 100 at step 30
    want_lr = [lr_at(s, 30, 2, 3e-3, 0.01) for s in range(30)]
    np.testing.assert_allclose([r["lr"] for r in rows], want_lr, rtol=1e-12)
    assert rows[0]["lr"] == pytest.approx(1.5e-3) and rows[-1]["lr"] == pytest.approx(3e-5)
    assert all(r["images_per_s"] > 0 for r in rows)
    assert all(b["elapsed_s"] >= a["elapsed_s"] for a, b in itertools.pairwise(rows))
    assert res["steps"] == 30 and res["epochs"] == 10
    assert res["final_loss"] == pytest.approx(losses[-1], abs=1e-12)
    assert res["images_per_s"] > 0
    assert res["student"] == str(out / "student.pt") and res["log"] == str(out / "log.csv")

    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (30, 10, 0)
    assert ckpt["config"] == cfg.to_dict() and ckpt["world_size"] == 1
    assert ckpt["scheduler"] == {"step": 30, "total_steps": 30, "warmup_steps": 2}
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}

    run = json.loads((out / "run.json").read_text())
    assert run["config"] == cfg.to_dict() and run["world_size"] == 1
    assert run["images"] == run["images_used"] == 6
    assert run["teacher_sha256"] == sha256_file(data.weights)
    assert run["store"] == str(data.emb.resolve()) and run["device"] == "cpu"
    assert run["torch"] == torch.__version__ and run["napari_mobilesam"] == "0.1.0"
    assert run["start_time"] and run["resumed_at"] == []

    # student.pt: the complete model in the official format
    state = read_state_dict(out / "student.pt")
    assert "image_encoder.norm_head.weight" in state and "image_encoder.head.bias" in state
    model = build_sam(TINY_CONFIG)
    load_state_dict_checked(model, state, source="student.pt")
    teacher = read_state_dict(data.weights)
    for key, value in teacher.items():
        if not key.startswith("image_encoder."):
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    for key, value in ckpt["encoder"].items():
        torch.testing.assert_close(state[f"image_encoder.{key}"], value, rtol=0, atol=0)


def test_resume_after_whole_epoch_matches_straight_run(data, straight, tmp_path):
    out = tmp_path / "run"
    first = train(make_cfg(data, out, epochs=1, **FLAT), progress=False)
    assert (first["steps"], first["epochs"]) == (3, 1)
    assert len(read_log(out / "log.csv")) == 3
    res = train(make_cfg(data, out, epochs=2, resume=True, **FLAT), progress=False)
    assert (res["steps"], res["epochs"]) == (6, 2)
    rows = read_log(out / "log.csv")
    assert_same_rows(rows, straight.rows)
    assert res["final_loss"] == pytest.approx(straight.res["final_loss"], abs=1e-6)
    assert rows[3]["elapsed_s"] >= rows[2]["elapsed_s"]  # elapsed time continues
    got = encoder_state(out)
    for key, value in encoder_state(straight.out).items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
    run = json.loads((out / "run.json").read_text())
    assert len(run["resumed_at"]) == 1 and run["config"]["resume"] is True

    # settings that may change on resume take effect (the optimizer state keeps the old)
    res = train(
        make_cfg(data, out, epochs=3, resume=True, weight_decay=0.5, betas=(0.8, 0.99), **FLAT),
        progress=False,
    )
    groups = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert all(tuple(g["betas"]) == (0.8, 0.99) for g in groups)


def test_resume_mid_epoch_matches_straight_run(data, straight, tmp_path):
    out = tmp_path / "run"
    first = train(make_cfg(data, out, max_steps=4, **FLAT), progress=False)
    assert (first["steps"], first["epochs"]) == (4, 1)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (4, 1, 1)
    assert (out / "student.pt").is_file()
    res = train(make_cfg(data, out, resume=True, **FLAT), progress=False)
    assert (res["steps"], res["epochs"]) == (6, 2)
    assert_same_rows(read_log(out / "log.csv"), straight.rows)
    got = encoder_state(out)
    for key, value in encoder_state(straight.out).items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
    # nothing left to do: returns at once, log unchanged
    again = train(make_cfg(data, out, resume=True, **FLAT), progress=False)
    assert (again["steps"], again["epochs"]) == (6, 2)
    assert again["final_loss"] == pytest.approx(res["final_loss"], abs=0)
    assert len(read_log(out / "log.csv")) == 6


class _Crash(RuntimeError):
    pass


def test_crash_then_resume_with_cosine_schedule(data, tmp_path, monkeypatch):
    """A crash after the last checkpoint: resuming drops the extra log rows and
    repeats the straight run exactly (default warmup + cosine schedule)."""
    straight_out = tmp_path / "straight"
    train(make_cfg(data, straight_out, save_every=2), progress=False)
    want = read_log(straight_out / "log.csv")
    assert len({r["lr"] for r in want}) == 6

    out = tmp_path / "run"
    real = train_mod._DistillDataset.__getitem__
    calls = {"n": 0}

    def crashing(self, i):
        calls["n"] += 1
        if calls["n"] == 11:  # while loading the batch of step 6
            raise _Crash("power cut")
        return real(self, i)

    monkeypatch.setattr(train_mod._DistillDataset, "__getitem__", crashing)
    with pytest.raises(_Crash):
        train(make_cfg(data, out, save_every=2), progress=False)
    monkeypatch.setattr(train_mod._DistillDataset, "__getitem__", real)
    assert len(read_log(out / "log.csv")) == 5  # steps 1-5 logged ...
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (4, 1, 1)  # ... 4 saved
    train(make_cfg(data, out, save_every=2, resume=True), progress=False)
    assert_same_rows(read_log(out / "log.csv"), want)


def test_jsonl_log_and_truncation_on_resume(data, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(data, out, max_steps=2, log_format="jsonl", **FLAT), progress=False)
    rows = read_log(out / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and set(rows[0]) == set(train_mod.LOG_FIELDS)
    with open(out / "log.jsonl", "a") as fh:  # rows of a crashed continuation
        fh.write(json.dumps({**rows[1], "step": 3, "loss": 99.0}) + "\n")
        fh.write('{"step": 4, "lo')
    train(make_cfg(data, out, max_steps=3, log_format="jsonl", resume=True, **FLAT), progress=False)
    rows = read_log(out / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] != 99.0
    assert not (out / "log.csv").exists()


def test_init_from_a_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(data, out, init=data.weights, lr=1e-12, max_steps=1, grad_clip=None)
    train(cfg, progress=False)
    got = read_state_dict(out / "student.pt")
    teacher = read_state_dict(data.weights)
    weights = [k for k in teacher if k.startswith("image_encoder.") and k.endswith("weight")]
    assert len(weights) > 10
    for key in weights:
        torch.testing.assert_close(got[key], teacher[key], rtol=0, atol=1e-8)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        train(make_cfg(data, tmp_path / "r2", init=tmp_path / "nothing.pt"), progress=False)


def test_rows_without_embedding_are_skipped(data, tmp_path, caplog):
    emb = tmp_path / "emb"
    shutil.copytree(data.emb, emb)
    (emb / "done.log").write_text("".join(f"{r}\n" for r in (0, 1, 2, 3, 4)))
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="napari_mobilesam.distill.train"):
        res = train(make_cfg(data, out, embeddings=emb, epochs=1, **FLAT), progress=False)
    assert "1 of 6 images have no embedding" in caplog.text
    assert res["steps"] == 3  # 5 images in batches of 2
    assert json.loads((out / "run.json").read_text())["images_used"] == 5

    # the store changed since the checkpoint: the run cannot continue exactly
    with open(emb / "done.log", "a") as fh:
        fh.write("5\n")
    with pytest.raises(ValueError, match="finished embeddings of the store .5 images then"):
        train(make_cfg(data, out, embeddings=emb, epochs=2, resume=True, **FLAT), progress=False)


@pytest.mark.slow
def test_ddp_two_processes(data, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "ddp_train.py"
    script.write_text(
        "from napari_mobilesam.distill.train import TrainConfig, train\n"
        f"cfg = TrainConfig(embeddings={str(data.emb)!r}, images={str(data.images)!r},\n"
        f"    out={str(out)!r}, student={str(data.config)!r}, epochs=2, batch_size=2,\n"
        "    workers=0, device='cpu', lr=3e-3)\n"
        "res = train(cfg, progress=False)\n"
        "import json, os, pathlib\n"
        f"pathlib.Path({str(tmp_path)!r}, 'result_' + os.environ['RANK']).write_text(\n"
        "    json.dumps(res))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 6 images over 2 processes: 3 each, batches of 2 -> 2 steps per epoch
    for rank in (0, 1):
        res = json.loads((tmp_path / f"result_{rank}").read_text())
        assert (res["steps"], res["epochs"]) == (4, 2)
    rows = read_log(out / "log.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["epoch"] for r in rows] == [1, 1, 2, 2]
    assert (out / "log.csv").read_text().count("step,epoch") == 1  # rank 0 writes alone
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["images_used"] == 6
    model = build_sam(TINY_CONFIG)
    load_state_dict_checked(model, read_state_dict(out / "student.pt"), source="student.pt")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["world_size"] == 2


# ---------------------------------------------------------------------- errors


def test_train_needs_a_train_config():
    with pytest.raises(TypeError, match="cfg must be a TrainConfig, got dict"):
        train({"epochs": 1})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be an integer >= 1"),
        ("batch_size", 2.0, "batch_size must be an integer >= 1"),
        ("workers", -1, "workers must be an integer >= 0"),
        ("seed", -1, "seed must be an integer >= 0"),
        ("warmup_steps", -1, "warmup_steps must be an integer >= 0"),
        ("max_steps", 0, "max_steps must be an integer >= 1"),
        ("save_every", 0, "save_every must be an integer >= 1"),
        ("lr", 0.0, "lr must be a positive number"),
        ("lr", float("nan"), "lr must be a positive number"),
        ("weight_decay", -0.1, "weight_decay must be >= 0"),
        ("min_lr_ratio", 1.5, r"min_lr_ratio must be in \[0, 1\]"),
        ("betas", (0.9,), "betas must be two numbers"),
        ("betas", (0.9, 1.0), "betas must be two numbers"),
        ("grad_clip", 0.0, "grad_clip must be a positive number or None"),
        ("log_format", "xml", "log_format must be 'csv' or 'jsonl', got 'xml'"),
    ],
)
def test_train_config_validation(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(tmp_path, tmp_path, tmp_path, **{field: value})


def test_train_config_to_dict_is_json_able(tmp_path):
    cfg = TrainConfig(tmp_path / "e", "img", tmp_path / "o", student=TINY_CONFIG, init="x.pt")
    assert isinstance(cfg.images, Path) and isinstance(cfg.init, Path)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["student"] == {"config": config_to_dict(TINY_CONFIG)}
    assert d["images"] == "img" and d["betas"] == [0.9, 0.999] and d["teacher_weights"] is None


def test_student_must_match_the_store(data, tmp_path):
    enc = dataclasses.replace(TINY_CONFIG.encoder, out_chans=16)
    student = tmp_path / "s.json"
    student.write_text(json.dumps(config_to_dict(dataclasses.replace(TINY_CONFIG, encoder=enc))))
    with pytest.raises(ValueError, match=r"128 px inputs to \(16, 8, 8\).*\(32, 8, 8\) teacher"):
        train(make_cfg(data, tmp_path / "run", student=student), progress=False)
    with pytest.raises(ValueError, match="unknown model 'vit_q'"):
        train(make_cfg(data, tmp_path / "run", student="vit_q"), progress=False)
    assert not (tmp_path / "run").exists()


def test_teacher_weights_errors(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher weights .*gone.pt.*--teacher-weights"):
        train(make_cfg(data, tmp_path / "r", teacher_weights=tmp_path / "gone.pt"), progress=False)
    _, other = write_teacher(tmp_path / "other", seed=3)
    with pytest.raises(DataError, match="teacher weights .*teacher_3.pt.* not the ones"):
        train(make_cfg(data, tmp_path / "r", teacher_weights=other), progress=False)
    # a store that does not name its teacher weights
    emb = tmp_path / "emb"
    shutil.copytree(data.emb, emb)
    index = json.loads((emb / "index.json").read_text())
    del index["teacher_weights"]
    (emb / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not name its teacher weights"):
        train(make_cfg(data, tmp_path / "r", embeddings=emb), progress=False)
    # ... works when they are given
    res = train(
        make_cfg(data, tmp_path / "r", embeddings=emb, teacher_weights=data.weights, max_steps=1),
        progress=False,
    )
    assert res["steps"] == 1


def test_data_errors(data, tmp_path):
    with pytest.raises(DataError, match="is not an embedding store"):
        train(make_cfg(data, tmp_path / "r", embeddings=tmp_path), progress=False)
    emb = tmp_path / "emb"
    shutil.copytree(data.emb, emb)
    (emb / "done.log").write_text("")
    with pytest.raises(DataError, match="holds no embedding"):
        train(make_cfg(data, tmp_path / "r", embeddings=emb), progress=False)
    with pytest.raises(DataError, match="image folder .*nowhere.* does not exist"):
        train(make_cfg(data, tmp_path / "r", images=tmp_path / "nowhere"), progress=False)
    images = tmp_path / "images"
    shutil.copytree(data.images, images)
    (images / "sub" / "img_3.png").unlink()
    with pytest.raises(DataError, match="image .*img_3.png' of the store is missing"):
        train(make_cfg(data, tmp_path / "r", images=images), progress=False)
    assert not (tmp_path / "r").exists()


def test_run_folder_errors(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="nothing to resume"):
        train(make_cfg(data, out, resume=True), progress=False)
    train(make_cfg(data, out, max_steps=1), progress=False)
    with pytest.raises(ValueError, match="already holds a training run.*--resume or a new --out"):
        train(make_cfg(data, out, max_steps=2), progress=False)
    with pytest.raises(ValueError, match=r"batch_size \(2 then, 3 now\); seed \(0 then, 1 now\)"):
        train(make_cfg(data, out, batch_size=3, seed=1, resume=True), progress=False)
    other = tmp_path / "other.json"
    enc = dataclasses.replace(TINY_CONFIG.encoder, depths=(1, 1, 1, 1))
    other.write_text(json.dumps(config_to_dict(dataclasses.replace(TINY_CONFIG, encoder=enc))))
    with pytest.raises(ValueError, match="different the student architecture"):
        train(make_cfg(data, out, student=other, resume=True), progress=False)
    torch.save({"something": torch.zeros(1)}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="is not a mobilesam-distill training checkpoint"):
        train(make_cfg(data, out, resume=True), progress=False)
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="cannot read the training checkpoint .*checkpoint.pt"):
        train(make_cfg(data, out, resume=True), progress=False)


def test_world_size_change_is_refused(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(make_cfg(data, out, max_steps=1), progress=False)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["world_size"] = 2
    torch.save(ckpt, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"number of processes \(2 then, 1 now\)"):
        train(make_cfg(data, out, resume=True), progress=False)


# ---------------------------------------------------------------------- pieces


def test_lr_schedule():
    lrs = [lr_at(s, 100, 10, 1.0, 0.1) for s in range(100)]
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10)  # warmup, peak at step 9
    assert lrs[99] == pytest.approx(0.1)
    assert all(a > b for a, b in itertools.pairwise(lrs[9:]))  # the cosine decays at once
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 9) / 90)) for s in range(9, 100)]
    np.testing.assert_allclose(lrs[9:], cos)
    assert lr_at(150, 100, 10, 1.0, 0.1) == pytest.approx(0.1)  # held at the end
    assert lr_at(0, 1, 1, 2.0, 0.5) == 2.0
    assert lr_at(0, 10, 0, 1.0, 0.0) == 1.0 and lr_at(9, 10, 0, 1.0, 0.0) == pytest.approx(0)
    assert lr_at(3, 10, 0, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 9)))
    assert train_mod._default_warmup(30) == 2
    assert train_mod._default_warmup(10) == 1
    assert train_mod._default_warmup(100_000) == 500


@pytest.mark.parametrize(("n", "world"), [(6, 1), (6, 2), (7, 2), (5, 4), (2, 3)])
def test_epoch_indices_shard_a_permutation(n, world):
    shards = [_epoch_indices(n, 3, 0, world, r) for r in range(world)]
    per_rank = math.ceil(n / world)
    assert all(len(s) == per_rank for s in shards)
    merged = [shards[r][i] for i in range(per_rank) for r in range(world)]
    assert set(merged) == set(range(n))  # every image, padding repeats the first ones
    assert sorted(merged[:n]) == list(range(n))
    assert shards == [_epoch_indices(n, 3, 0, world, r) for r in range(world)]
    if n > 2:
        assert _epoch_indices(n, 4, 0, world, 0) != shards[0] or world > 1


def test_param_groups_exclude_biases_norms_and_attention_tables():
    encoder = build_sam(TINY_CONFIG).image_encoder
    decay, no_decay = param_groups(encoder, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in encoder.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert len(no) + len(yes) == len(names)
    assert any(n.endswith("attention_biases") for n in no)
    assert any(n.endswith(".bias") for n in no) and any("norm" in n for n in no)
    assert all(encoder.get_parameter(n).ndim > 1 for n in yes)
    assert not any(n.endswith("attention_biases") for n in yes)


def test_store_is_read_in_worker_processes(data, straight, tmp_path):
    """workers > 0 (persistent, two epochs): the dataset and its store travel into
    worker processes, and the run is the same as in-process loading."""
    out = tmp_path / "run"
    res = train(make_cfg(data, out, workers=2, **FLAT), progress=False)
    assert (res["steps"], res["epochs"]) == (6, 2)
    assert_same_rows(read_log(out / "log.csv"), straight.rows)
