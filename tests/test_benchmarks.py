"""The benchmark scripts run (tiny sizes, not timed) so they are always ready."""

from __future__ import annotations

import numpy as np
import pytest
from benchmarks import bench_predictor

from napari_mobilesam.predictor import cpu_has_bf16

from .conftest import GOLDEN, GOLDEN_CKPT, ROOT, requires_golden


@requires_golden
@pytest.mark.slow
def test_bench_predictor_runs(tmp_path, capsys):
    """The command line (run, report, json) once: each run embeds at 1024 px."""
    import json

    out = tmp_path / "r.json"
    # (the original is timed in test_original.py, which undoes its imports)
    argv = ["--repeats", "1", "--json", str(out), "--weights", str(GOLDEN_CKPT), "--no-original"]
    assert bench_predictor.main(argv) == 0
    text = capsys.readouterr().out
    assert "set_image" in text and "ours/baseline" in text
    result = json.loads(out.read_text())
    assert not result["original"]["available"]
    assert result["max_low_res_logit_diff"] < 5e-3  # fast and reference paths agree
    assert result["set_image"]["ours"]["n"] == 1
    for key in ("set_image", "predict_1pt"):
        assert result[key]["baseline"]["median"] > 0
    assert text.rstrip().endswith(bench_predictor.report(result).rstrip())


@requires_golden
@pytest.mark.slow
def test_bench_everything_runs():
    from benchmarks import bench_everything

    result = bench_everything.run(grids=(2,), large=200, large_grid=2, weights=GOLDEN_CKPT,
                                  with_original=False)  # fmt: skip
    row = result["rows"][0]
    assert row["fast"]["mode"] == "fast" and row["reference"]["mode"] == "reference"
    assert row["fast"]["peak_rss_mb"] > 0 and row["time_ratio"] > 0
    assert result["large"]["image_size"] == [200, 200]
    assert "fast/ref" in bench_everything.report(result)


@pytest.mark.slow  # the real-size model through every step of gpu.py and bench_distill.py
@requires_golden
def test_device_run_is_ready(tmp_path):
    """What a GPU machine runs (prepare_device.py here, device.sh there), on the CPU at
    test sizes and without time limits: the golden subset, gpu.py's checks and timings,
    the distill bench."""
    import json
    import subprocess
    import sys

    from benchmarks import prepare_device

    golden, out = tmp_path / "golden", tmp_path / "out"
    assert prepare_device.main(["--golden", str(GOLDEN), "--out", str(golden)]) == 0
    with np.load(golden / "sub_cases.npz") as cases:
        assert {k.split("/")[1] for k in cases.files} == set(prepare_device.CASES)
        assert cases["photo/features"].shape == (1, 256, 64, 64)
    env = {**__import__("os").environ, "QUICK": "1", "OUT": str(out), "GOLDEN": str(golden),
           "PYTHON": sys.executable}  # fmt: skip
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "device.sh")], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "bf16 encoder vs fp32" in run.stdout and "encoder bf16 " in run.stdout
    assert "golden predictor" in run.stdout and "-> OK" in run.stdout
    data = json.loads((out / "gpu.json").read_text())
    assert data["precision_check"]["bf16"]["mean_iou"] >= 0.98
    assert set(data["precision_timings"]) == {"fp32", "bf16"}
    assert data["predictor_check"]["ok"] and "timings" in data
    fp32 = data["precision_timings"]["fp32"]
    assert fp32["cuda_graphs"] is False and fp32["graph_max_abs_diff"] == 0.0  # CPU: eager
    assert fp32["batched_encoder_only"]["images_per_s"] > 0
    timings = data["timings"]
    everything = timings["everything_4x4_64px_default"]
    assert {"fast", "device_labels", "reference"} <= set(everything)
    assert "reference" in timings["everything_4x4_64px_all_pass"]  # the last stage
    if (ROOT / ".original" / "segment_anything").is_dir():  # .ci/run installs it
        assert (tmp_path / "original" / "segment_anything" / "__init__.py").is_file()
        assert timings["original"]["available"], timings["original"]
        assert "original" in everything and "original" in timings["predict_1pt"]
        assert "/ original" in run.stdout
    assert json.loads((out / "distill.json").read_text())["rows"]


def test_prepare_device_names_missing_files(tmp_path, capsys):
    from benchmarks import prepare_device

    assert prepare_device.main(["--golden", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "golden files not found" in err and "mobile_sam_random.pt" in err
    assert not (tmp_path / "o").exists()


@requires_golden
def test_gpu_script_compile_option(tmp_path, capsys, monkeypatch):
    """The --compile plumbing (torch.compile itself stubbed: compiling takes a minute; the
    golden checks stubbed: test_device_run_is_ready runs them)."""
    import torch
    from benchmarks import gpu

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode: compiled.append(mode) or fn)
    monkeypatch.setattr(gpu, "timings", lambda *a: {})
    monkeypatch.setattr(gpu, "all_pass_reference", lambda *a: {})
    # the golden checks and real timings: test_device_run_is_ready runs them
    passed = {"ok": True, "feature_max_abs": 0.0, "logit_max_abs": 0.0, "iou_max_abs": 0.0,
              "mask_mismatch": 0.0}  # fmt: skip
    monkeypatch.setattr(gpu, "precision_timings", lambda *a: {})
    monkeypatch.setattr(gpu, "check_resize", lambda *a: {"ok": True})
    for check in ("check_predictor", "check_everything"):
        monkeypatch.setattr(gpu, check, lambda *a: dict(passed))
    argv = ["--golden", str(GOLDEN), "--quick", "--device", "cpu", "--out", str(tmp_path),
            "--precisions", "--compile"]  # fmt: skip
    assert gpu.main(argv) == 0
    assert compiled == ["default"]  # on a CPU; CUDA adds reduce-overhead (CUDA graphs)
    data = __import__("json").loads((tmp_path / "gpu.json").read_text())
    row = data["compile"]["default"]
    assert row["max_abs_diff"] == 0.0 and row["compile_s"] >= 0 and row["median_ms"] > 0
    assert data["compile"]["precision"] in ("fp32", "bf16")
    assert "torch.compile, encoder batch 1" in capsys.readouterr().out


@requires_golden
@pytest.mark.slow
def test_bench_batch_runs():
    from benchmarks import bench_batch

    result = bench_batch.run(planes=2, size=128, points_per_side=2, baseline_planes=1,
                             stacks=(3, 6), stack_size=64, weights=GOLDEN_CKPT)  # fmt: skip
    rows = result["throughput"]["rows"]
    assert rows["ours"]["planes"] == 2 and rows["baseline"]["planes"] == 1
    assert all(r["planes_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows.values())
    assert [m["planes"] for m in result["memory"]] == [3, 6]
    text = bench_batch.report(result)
    assert "planes/s" in text and "growth 3 -> 6 planes" in text


@requires_golden
@pytest.mark.slow
def test_bench_batch_link_stacks_run():
    from benchmarks import bench_batch

    result = bench_batch.run(planes=0, stacks=(), link_stacks=(3, 5), stack_size=64,
                             link_cells=8, weights=GOLDEN_CKPT)  # fmt: skip
    assert result["memory"] == [] and [r["planes"] for r in result["linking"]] == [3, 5]
    for row in result["linking"]:
        plain, linked = row["plain"], row["linked"]
        assert plain["planes"] == linked["planes"] == row["planes"]
        assert plain["objects"] == linked["objects"] > 0  # the same synthetic planes
        assert plain["linked_objects"] is None and 0 < linked["linked_objects"] < linked["objects"]
        assert plain["peak_rss_mb"] > 0 and linked["peak_rss_mb"] > 0
    text = bench_batch.report(result)
    assert "(throughput not measured)" in text and "--link z" in text


def test_bench_batch_drifting_labels_are_per_plane_ids_of_moving_objects():
    from benchmarks import bench_batch

    from napari_mobilesam.linking import link_stack

    cells = bench_batch._population(20, (192, 256), 12, seed=1)
    planes = np.stack(
        [bench_batch.drifting_labels(cells, z, (192, 256), seed=1) for z in range(20)]
    )
    assert planes.shape == (20, 192, 256) and planes.dtype == np.uint32
    for plane in planes:  # ids 1..N, every one present
        assert np.array_equal(np.unique(plane), np.arange(plane.max() + 1))
    assert planes[0].max() > 4
    _, table = link_stack(planes, "z")
    per_plane = int(sum(int(p.max()) for p in planes))
    assert 0 < table.objects()["id"].size < per_plane / 3  # objects last several planes


@requires_golden
@pytest.mark.slow
def test_bench_backends_runs(onnx_cache):
    from benchmarks import bench_backends

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    result = bench_backends.run(GOLDEN_CKPT, threads=(1,), repeats=1, image=image)
    assert [r["backend"] for r in result["rows"]] == ["torch", "onnx", "onnx int8"]
    assert all(r["encoder"]["median"] > 0 and r["predict_ratio"] > 0 for r in result["rows"])
    assert "onnx int8" in bench_backends.report(result)


@requires_golden
@pytest.mark.slow
def test_bench_backends_int8_accuracy_covers_every_golden_call(onnx_cache):
    from benchmarks import bench_backends

    acc = bench_backends.int8_accuracy(GOLDEN_CKPT)
    # 2 images x (5 single-mask + 5 x 3 multimask + 1 refine + 4 batched boxes)
    assert acc["n_masks"] == 50
    assert {"photo/p0_mm1/refine", "micro/batch_boxes", "photo/p4_mm1"} <= set(acc["per_case"])
    assert 0.8 < acc["mean"] <= 1.0 and acc["min"] <= acc["median"] <= 1.0
    assert "golden-prompt masks" in bench_backends.report({**_fake_rows(), "int8_accuracy": acc})


def _fake_rows() -> dict:
    row = {"threads": 1, "backend": "torch", "encoder": {"median": 1.0}, "encoder_ratio": 1.0,
           "predict_1pt": {"median": 0.1}, "predict_ratio": 1.0}  # fmt: skip
    return {"image_size": [4, 4], "machine": {"cpu": "x"}, "rows": [row]}


@requires_golden
@pytest.mark.slow
def test_suite_runs_at_tiny_size(tmp_path, capsys, onnx_cache, isolated):
    import json

    from benchmarks import suite

    out = tmp_path / "all.json"
    assert (
        suite.main(
            ["--size", "tiny", "--only", "predictor", "backends", "distill", "--json", str(out)]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "encoder (set_image)" in text and "encoder, onnx int8, 1 thr" in text
    data = json.loads(out.read_text())
    predictor = data["results"]["predictor"]
    bf16 = {"encoder bf16 (set_image)"} if "ours_bf16" in predictor["set_image"] else set()
    assert bf16 == ({"encoder bf16 (set_image)"} if cpu_has_bf16() else set())
    assert {r["benchmark"] for r in data["rows"]} == {
        "encoder (set_image)", "predict, 1 point", "encoder, onnx, 1 thr",
        "encoder, onnx int8, 1 thr", "distill step, per image", *bf16,
    }  # fmt: skip
    if predictor["original"]["available"]:  # (when it is installed)
        n = sum(r["baseline_path"] == "original predictor" for r in data["rows"])
        assert n == 2 + len(bf16)
    for r in data["rows"]:
        assert r["ours"] > 0 and r["baseline"] > 0
        assert abs(r["ratio"] - r["ours"] / r["baseline"]) < 1e-12
    assert set(data["results"]) == {"predictor", "backends", "distill"}
    assert data["size"] == "tiny"


def test_suite_rejects_unknown_names():
    import pytest
    from benchmarks import suite

    with pytest.raises(ValueError, match="size must be one of"):
        suite.run_all("huge")
    with pytest.raises(ValueError, match=r"unknown benchmarks \['gpu'\]"):
        suite.run_all("tiny", only=["gpu"])


@requires_golden
@pytest.mark.slow
def test_bench_contention_runs():
    """benchmarks/bench_contention.py, quiet and beside one busy process (numbers unchecked)."""
    from benchmarks import bench_contention

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    result = bench_contention.run(
        (0, 1), repeats=1, grid=2, settle=0.3, weights=GOLDEN_CKPT, image=image,
        with_original=False,
    )  # fmt: skip
    assert set(result["loads"]) == {"0", "1"}
    busy = result["summary"]["1"]
    assert busy["encoder ours slowdown"] > 0 and busy["everything reference/fast"] > 0
    assert "busy competitor(s)" in bench_contention.report(result)
    from napari_mobilesam.engine.threads import ADAPTIVE

    assert ADAPTIVE.enabled is False  # as the suite set it (conftest), not switched on


@pytest.mark.slow  # three `mobilesam embed` processes and the stand-in model: ~1-2 min
def test_bench_store_killed_and_rerun_counts_agree():
    """benchmarks/bench_store.py through the suite at 4 small planes: the rerun runs the
    encoder on exactly the planes the killed run left, by all three counts; a click from
    the store runs none."""
    from benchmarks import bench_store, suite

    data = suite.run_all("tiny", only=["store"])
    result = data["results"]["store"]
    r = result["resume"]
    assert 2 <= r["done_at_kill"] < 4 and r["consistent"]
    left = 4 - r["done_at_kill"]
    assert r["full"]["encoder_images"] == 4 and r["full"]["reported_embedded"] == 4
    assert r["resumed"]["encoder_images"] == r["resumed"]["reported_embedded"] == left
    assert r["rerun_chunks_written"] == left and r["done_after"] == 4
    assert r["resumed"]["reported_already_done"] == r["kept_untouched"] == r["done_at_kill"]
    assert r["killed"]["encoder_images"] >= r["done_at_kill"]  # plus any in flight
    s = result["session"]
    assert (
        [c["plane"] for c in s["clicks"]["store"]]
        == [1]
        == [c["plane"] for c in s["clicks"]["encoder"]]
    )
    assert s["encoder_images"] == {"store": 0, "encoder": 1}
    assert s["store_loads"] == s["compared"] == 2  # (a warm-up plane too)
    assert s["max_low_res_diff"] < 1e-3  # the same embedding, up to float rounding
    text = bench_store.report(result)
    assert "counts agree: yes" in text and f"{left} planes embedded, " in text
    assert "same masks" in text and "encoder images = 4 - " in text
    assert [row["benchmark"] for row in data["rows"]] == [
        "embed 4 planes, rerun after kill",
        "new-plane click",
    ]
    for row in data["rows"]:
        assert row["ours"] > 0 and row["baseline"] > 0


def test_bench_store_names_what_went_wrong(tmp_path):
    import sys

    from benchmarks import bench_store

    with pytest.raises(ValueError, match=r"kill_after must be in 1\.\.3"):
        bench_store.run(planes=4, kill_after=4)
    with pytest.raises(ValueError, match="planes must be at least 3"):
        bench_store.run(planes=2)
    log = tmp_path / "log"
    failing = [sys.executable, "-c", "import sys; sys.exit('no such input')"]
    with pytest.raises(RuntimeError, match=r"failed \(exit 1\): no such input"):
        bench_store.run_embed(failing, log)
    with pytest.raises(RuntimeError, match="printed no summary line: 'hello'"):
        bench_store.run_embed([sys.executable, "-c", "print('hello')"], log)
    quick = [sys.executable, "-c", "pass"]
    with pytest.raises(RuntimeError, match="ended \\(exit 0\\) before 2 planes were done"):
        bench_store.run_killed(quick, tmp_path / "s.zarr", log, 2)
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(RuntimeError, match="0 of 2 planes done after 0 s; killed"):
        bench_store.run_killed(slow, tmp_path / "s.zarr", log, 2, timeout=0.2)
