"""``mobilesam-everything`` end to end in-process: outputs, provenance, resume, failures,
usage errors.

The tests run the command in-process with the tiny random model (patched in as the
loaded model); the kill and LocalCluster tests, which run the real command on the golden
checkpoint, are in ``test_batch_processes.py``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image

from mobilesam_batch import cli, segment
from mobilesam_batch.runner import WORK_DIR, output_stem
from napari_mobilesam.engine.policy import Policy
from napari_mobilesam.everything.rle import coco_to_rle, rle_to_mask
from napari_mobilesam.predictor import resolve_precision

from .batch_data import BAD, FAST, cells, make_dataset


def _visible(outdir: Path) -> list[str]:
    return sorted(p.name for p in outdir.iterdir() if not p.name.startswith("."))


# ----------------------------------------------------------------------------- outputs


def test_folder_run_outputs(tiny_cli, tmp_path, capsys):
    expected = make_dataset(tmp_path / "in")
    out = tmp_path / "out"
    code = tiny_cli([str(tmp_path / "in"), "-o", str(out), *FAST, "--csv", "--coco", "--zarr"])
    captured = capsys.readouterr()
    assert code == 1  # corrupt and empty inputs fail the run...
    assert "5 done, 0 skipped, 2 failed" in captured.out  # ...after the others are done
    for bad in BAD:
        assert bad in captured.err
    assert "empty file" in captured.err
    assert not (out / WORK_DIR).exists()

    names = _visible(out)
    for stem, shape in expected.items():
        for suffix in ("_labels.tif", "_labels.json", "_objects.csv", "_coco.json", "_labels.zarr"):
            assert stem + suffix in names
        labels = tifffile.imread(out / f"{stem}_labels.tif")
        assert labels.shape == shape and labels.dtype == np.uint16
        z = zarr.open_group(out / f"{stem}_labels.zarr", mode="r")
        np.testing.assert_array_equal(z["0"][...], labels)

        prov = json.loads((out / f"{stem}_labels.json").read_text())
        assert prov["tool"] == "mobilesam-everything" and prov["version"]
        assert prov["model"]["sha256"] and prov["model"]["name"] == "vit_t"
        assert [r["device"] for r in prov["model"]["ran_on"]] == ["cpu"]
        ran = prov["model"]["ran_on"][0]  # what was chosen, recorded
        assert ran["backend"] == "torch" and ran["threads"] >= 1
        assert (ran["mode"], ran["nms"]) == ("fast", "mask")  # mode/nms "auto" on a CPU
        assert prov["parameters"]["points_per_side"] == 4
        assert prov["parameters"]["box_nms_thresh"] == 0.7  # default, recorded
        assert prov["input"]["size"] == (tmp_path / "in" / _input_name(stem)).stat().st_size
        assert "mtime" in prov["input"]
        planes = prov["planes"]
        assert len(planes) == (shape[0] if len(shape) == 3 else 1)
        for i, plane in enumerate(planes):
            plane_labels = labels[i] if labels.ndim == 3 else labels
            assert plane["objects"] == plane_labels.max()
            assert plane["seconds"] >= 0
        assert prov["objects"] == sum(p["objects"] for p in planes)

        rows = list(csv.DictReader(open(out / f"{stem}_objects.csv")))
        assert len(rows) == prov["objects"]
        coco = json.loads((out / f"{stem}_coco.json").read_text())
        assert len(coco["images"]) == len(planes)
        assert len(coco["annotations"]) == prov["objects"]
        for ann, row in zip(coco["annotations"], rows, strict=True):
            image = coco["images"][ann["image_id"] - 1]
            plane_labels = labels[tuple(image["plane"])]
            mask = rle_to_mask(coco_to_rle(ann["segmentation"]))
            np.testing.assert_array_equal(mask, plane_labels == ann["label"])
            assert int(row["label"]) == ann["label"] and int(row["area"]) == ann["area"]
    assert "e_chan_labels.tif" in names and "f_corrupt_labels.tif" not in names


def _input_name(stem):
    return {
        "a_rgb": "a_rgb.png",
        "b_gray": "b_gray.jpg",
        "c_u16": "c_u16.tif",
        "d_stack": "d_stack.tif",
        "e_chan": "e_chan.ome.tif",
    }[stem]


def test_reports_the_automatic_choices(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(segment.ModelSpec, "load", lambda self: tiny_model)
    segment._SEGMENTERS.clear()
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"stand-in for the tiny model's weights")
    image = tmp_path / "cells.tif"
    tifffile.imwrite(image, cells((64, 64), np.random.default_rng(0)))
    argv = [str(image), "-o", str(tmp_path / "out"), *FAST, "--weights", str(weights)]
    try:
        assert cli.main([*argv, "--device", "cpu"]) == 0
    finally:
        segment._SEGMENTERS.clear()
    # backend and threads as chosen, before the first plane
    out = capsys.readouterr().out
    threads = Policy().describe_threads(torch.device("cpu"))  # "N threads[ (adaptive)]"
    workers = min(4, Policy().batch_workers(torch.device("cpu")))  # 16 prompts: 4 calls
    tail = f", prompt batches on {workers} worker threads" if workers > 1 else ""
    assert out.startswith(f"model: vit_t on cpu: torch, {threads}, fp32; fast mode{tail}\n")


def test_labels_match_the_library(tiny_cli, tiny_model, tmp_path):
    """Each plane's labels are MaskGenerator.generate_labels of that plane."""
    from napari_mobilesam.everything import MaskGenerator
    from napari_mobilesam.normalize import to_rgb_uint8

    expected = make_dataset(tmp_path / "in")
    out = tmp_path / "out"
    tiny_cli([str(tmp_path / "in" / "d_stack.tif"), str(tmp_path / "in" / "a_rgb.png"),
              "-o", str(out), *FAST])  # fmt: skip
    gen = MaskGenerator(tiny_model, points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0)
    stack = tifffile.imread(tmp_path / "in" / "d_stack.tif")
    got = tifffile.imread(out / "d_stack_labels.tif")
    assert got.shape == expected["d_stack"]
    for z in range(3):
        np.testing.assert_array_equal(got[z], gen.generate_labels(to_rgb_uint8(stack[z])))
    rgb = np.asarray(Image.open(tmp_path / "in" / "a_rgb.png"))
    np.testing.assert_array_equal(
        tifffile.imread(out / "a_rgb_labels.tif"), gen.generate_labels(rgb)
    )


def test_channels_axes_and_contrast(tiny_cli, tmp_path, capsys):
    rng = np.random.default_rng(3)
    two = np.stack([cells((64, 64), rng, dtype=np.uint16) for _ in range(2)])  # (C, Y, X)
    np.save(tmp_path / "two.npy", two)
    out = tmp_path / "out"
    # a (2, 64, 64) array reads as two planes by default
    assert tiny_cli([str(tmp_path / "two.npy"), "-o", str(out), *FAST]) == 0
    assert tifffile.imread(out / "two_labels.tif").shape == (2, 64, 64)
    # as channels it needs --channels
    code = tiny_cli([str(tmp_path / "two.npy"), "-o", str(out / "c"), "--axes", "CYX", *FAST])
    assert code == 1 and "--channels" in capsys.readouterr().err
    code = tiny_cli([str(tmp_path / "two.npy"), "-o", str(out / "c"), "--axes", "cyx",
                     "--channels", "1,0", "--contrast-limits", "0,40000", *FAST])  # fmt: skip
    assert code == 0
    assert tifffile.imread(out / "c" / "two_labels.tif").shape == (64, 64)
    prov = json.loads((out / "c" / "two_labels.json").read_text())
    assert prov["parameters"]["channels"] == [1, 0]
    assert prov["parameters"]["contrast_limits"] == [0.0, 40000.0]
    assert prov["parameters"]["axes"] == "CYX"
    code = tiny_cli([str(tmp_path / "two.npy"), "-o", str(out / "d"), "--axes", "CYX",
                     "--channels", "5", *FAST])  # fmt: skip
    assert code == 1 and "out of range" in capsys.readouterr().err


def test_zarr_input_and_4d(tiny_cli, tmp_path):
    rng = np.random.default_rng(5)
    data = np.stack([np.stack([cells((48, 56), rng) for _ in range(3)]) for _ in range(2)])
    arr = zarr.create_array(tmp_path / "movie.zarr", shape=data.shape, chunks=(1, 1, 48, 56),
                            dtype=data.dtype)  # fmt: skip
    arr[...] = data
    out = tmp_path / "out"
    assert tiny_cli([str(tmp_path / "movie.zarr"), "-o", str(out), *FAST, "--csv"]) == 0
    labels = tifffile.imread(out / "movie_labels.tif")
    assert labels.shape == (2, 3, 48, 56)
    planes = {int(r["plane"]) for r in csv.DictReader(open(out / "movie_objects.csv"))}
    assert planes <= set(range(6)) and len(planes) > 1


# ----------------------------------------------------------------------- resume, reruns


def test_rerun_skips_and_changes_redo(tiny_cli, tmp_path, capsys):
    make_dataset(tmp_path / "in")
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "-o", str(out), *FAST]
    assert tiny_cli(args) == 1
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert tiny_cli(args) == 1
    assert "0 done, 5 skipped, 2 failed" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # a changed input is redone; the others are still skipped
    img = tmp_path / "in" / "c_u16.tif"
    tifffile.imwrite(img, np.zeros((90, 110), np.uint16) + 7)
    assert tiny_cli(args) == 1
    assert "1 done, 4 skipped, 2 failed" in capsys.readouterr().out
    # a changed parameter redoes everything
    assert tiny_cli([*args, "--box-nms-thresh", "0.5"]) == 1
    assert "5 done, 0 skipped" in capsys.readouterr().out
    # asking for an extra output redoes what lacks it; --overwrite redoes all
    assert tiny_cli([*args, "--box-nms-thresh", "0.5", "--csv"]) == 1
    assert "5 done" in capsys.readouterr().out
    assert tiny_cli([*args, "--box-nms-thresh", "0.5", "--csv", "--overwrite"]) == 1
    assert "5 done, 0 skipped" in capsys.readouterr().out
    # a deleted output is redone
    (out / "a_rgb_objects.csv").unlink()
    assert tiny_cli([*args, "--box-nms-thresh", "0.5", "--csv"]) == 1
    assert "1 done, 4 skipped" in capsys.readouterr().out
    # another encoder precision is another result: redone, and recorded
    assert tiny_cli([*args, "--box-nms-thresh", "0.5", "--csv", "--precision", "bf16"]) == 1
    assert "5 done, 0 skipped" in capsys.readouterr().out
    record = json.loads((out / "a_rgb_labels.json").read_text())
    assert record["model"]["precision"] == "bf16"
    assert {r["precision"] for r in record["model"]["ran_on"]} == {"bf16"}
    # "auto" is recorded as asked, and as resolved where the planes ran
    assert tiny_cli([*args, "--box-nms-thresh", "0.5", "--csv", "--precision", "auto"]) == 1
    assert "5 done, 0 skipped" in capsys.readouterr().out
    record = json.loads((out / "a_rgb_labels.json").read_text())
    assert record["model"]["precision"] == "auto"
    resolved = {r["precision"] for r in record["model"]["ran_on"]}
    assert resolved == {resolve_precision("auto", "cpu")}


def test_dry_run_touches_nothing(tiny_cli, tmp_path, capsys, monkeypatch):
    make_dataset(tmp_path / "in")
    out = tmp_path / "out"
    monkeypatch.setattr(segment, "get_segmenter", _forbidden)
    code = tiny_cli([str(tmp_path / "in"), "-o", str(out), "--dry-run"])
    captured = capsys.readouterr()
    assert code == 1 and "5 to do, 0 up to date, 2 failed (dry run)" in captured.out
    assert not out.exists()  # not even created


def _forbidden(*args, **kwargs):
    raise AssertionError("the model must not be loaded")


def test_interrupt_leaves_no_partial_files_and_resumes(tiny_cli, tmp_path, monkeypatch, capsys):
    make_dataset(tmp_path / "in")
    out = tmp_path / "out"
    args = [str(tmp_path / "in" / "d_stack.tif"), str(tmp_path / "in" / "a_rgb.png"),
            "-o", str(out), *FAST, "--csv"]  # fmt: skip
    real = segment.PlaneSegmenter.segment
    calls = []

    def interrupted(self, plane, index=()):
        calls.append(index)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, plane, index)

    monkeypatch.setattr(segment.PlaneSegmenter, "segment", interrupted)
    assert tiny_cli(args) == 130
    assert "interrupted" in capsys.readouterr().out
    assert _visible(out) == []  # the stack had one of three planes: nothing written yet
    saved = list((out / WORK_DIR).rglob("*.npz"))
    assert len(saved) == 1  # the finished plane is kept for the rerun

    monkeypatch.setattr(segment.PlaneSegmenter, "segment", real)
    calls.clear()
    assert tiny_cli(args) == 0
    assert "2 done" in capsys.readouterr().out
    assert tifffile.imread(out / "d_stack_labels.tif").shape == (3, 64, 96)
    assert not (out / WORK_DIR).exists()


def test_planes_left_after_the_record_are_cleared_on_rerun(tiny_cli, tmp_path, capsys):
    # a run killed after writing an input's provenance record but before removing its
    # saved planes: the rerun skips the input and clears what was left
    make_dataset(tmp_path / "in")
    out = tmp_path / "out"
    args = [str(tmp_path / "in" / "a_rgb.png"), "-o", str(out), *FAST]
    assert tiny_cli(args) == 0
    key = json.loads((out / "a_rgb_labels.json").read_text())["key"]
    left = out / WORK_DIR / f"a_rgb-{key[:16]}"
    left.mkdir(parents=True)
    (left / "0.npz").write_bytes(b"saved plane")
    capsys.readouterr()
    assert tiny_cli(args) == 0
    assert "0 done, 1 skipped" in capsys.readouterr().out
    assert not (out / WORK_DIR).exists()


def test_failures_are_named(tiny_cli, tmp_path, capsys):
    make_dataset(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = tiny_cli([str(tmp_path / "in" / "a_rgb.png"), str(tmp_path / "missing.tif"),
                     str(tmp_path / "in" / "notes.txt"), str(tmp_path / "in" / "f_corrupt.tif"),
                     str(tmp_path / "nothing*.png"), "-o", str(out), *FAST])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert "1 done, 0 skipped, 4 failed" in captured.out
    for name in ("missing.tif", "notes.txt", "f_corrupt.tif", "nothing*.png"):
        assert name in captured.err


def test_same_stem_twice_is_refused(tiny_cli, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for sub in ("x", "y"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        Image.fromarray(cells((40, 40), rng)).save(tmp_path / "in" / sub / "img.png")
    code = tiny_cli([str(tmp_path / "in"), "-r", "-o", str(tmp_path / "out"), *FAST])
    captured = capsys.readouterr()
    assert code == 1 and "1 done" in captured.out and "same name" in captured.err


def test_outputs_inside_the_input_folder_are_not_inputs(tiny_cli, tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    Image.fromarray(cells((40, 40), rng)).save(tmp_path / "in" / "img.png")
    out = tmp_path / "in" / "labels"
    assert tiny_cli([str(tmp_path / "in"), "-r", "-o", str(out), *FAST]) == 0
    assert tiny_cli([str(tmp_path / "in"), "-r", "-o", str(out), *FAST]) == 0
    assert "0 done, 1 skipped, 0 failed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--contrast-limits", "5"], "expected 2 values"),
        (["--contrast-limits", "9,1"], "LO must be <= HI"),
        (["--percentiles", "50,10"], "0 <= LO < HI <= 100"),
        (["--channels", "a"], "comma-separated ints"),
        (["--channels", "0,1,2,3"], "1 to 3"),
        (["--axes", "ZZYX"], "each letter once"),
        (["--axes", "ZY"], "including Y and X"),
        (["--workers", "0", "--scheduler", "local"], "at least 1"),
        (["--workers", "3"], "needs --scheduler local"),
        (["--threads", "0"], "at least 1"),
        (["--precision", "bf16", "--backend", "onnx"], "--precision bf16 needs --backend torch"),
        (["--precision", "fp16", "--backend", "onnx"], "--precision fp16 needs --backend torch"),
        (["--points-per-side", "0"], "points_per_side"),
        (["--points-per-side", "100000"], "points_per_side must be in [1, 1024]"),
        (["--nms", "other"], "invalid choice"),
        (["--max-upscale", "0.5"], "--max-upscale 0.5: give a finite number >= 1"),
        (["--max-upscale", "nan"], "--max-upscale nan: give a finite number >= 1"),
        (["--max-upscale", "inf"], "--max-upscale inf: give a finite number >= 1"),
        (["--max-upscale", "two"], "--max-upscale two: give a finite number >= 1, or none"),
    ],
)
def test_usage_errors(tiny_cli, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) if "invalid choice" in message else _nullcontext():
        code = tiny_cli([str(tmp_path), "-o", str(tmp_path / "out"), *args])
        assert code == 2
    assert message in capsys.readouterr().err


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_zarr_output_needs_at_most_five_axes(tiny_cli, tmp_path, capsys):
    np.save(tmp_path / "six.npy", np.zeros((1, 1, 1, 2, 32, 32), np.uint8))
    code = tiny_cli([str(tmp_path / "six.npy"), "-o", str(tmp_path / "out"), "--axes", "QITZYX",
                     "--zarr", *FAST])  # fmt: skip
    assert code == 1 and "2 to 5 axes" in capsys.readouterr().err
    assert _visible(tmp_path / "out") == []


def test_unreachable_scheduler(tiny_cli, tmp_path, capsys, monkeypatch):
    pytest.importorskip("distributed")
    from mobilesam_batch import executors

    monkeypatch.setattr(executors, "CONNECT_TIMEOUT", "1s")
    make_dataset(tmp_path / "in")
    code = tiny_cli([str(tmp_path / "in" / "a_rgb.png"), "-o", str(tmp_path / "out"),
                     "--scheduler", "tcp://127.0.0.1:9", *FAST])  # fmt: skip
    assert code == 1 and "cannot reach the dask scheduler" in capsys.readouterr().err
    assert _visible(tmp_path / "out") == []


def test_missing_weights_file(tmp_path, capsys):
    code = cli.main([str(tmp_path), "-o", str(tmp_path / "o"), "--weights", str(tmp_path / "x.pt")])
    assert code == 2 and "no such file" in capsys.readouterr().err


def test_each_process_loads_the_model_once(tiny_model, monkeypatch):
    loads = []

    def load(self):
        loads.append(self)
        return tiny_model

    monkeypatch.setattr(segment.ModelSpec, "load", load)
    segment._SEGMENTERS.clear()
    spec = segment.ModelSpec("vit_t", "w.pt", device="cpu")
    opts = segment.SegmentOptions(generator=(("points_per_side", 2),))
    first = segment.get_segmenter(spec, opts)
    assert segment.get_segmenter(spec, opts) is first and len(loads) == 1
    other = segment.SegmentOptions(generator=(("points_per_side", 3),))
    assert segment.get_segmenter(spec, other) is not first and len(loads) == 2
    segment._SEGMENTERS.clear()


def test_output_stem():
    assert output_stem(Path("a/b.ome.tif")) == "b"
    assert output_stem(Path("a/b.OME.TIFF")) == "b"
    assert output_stem(Path("a/movie.zarr")) == "movie"
    assert output_stem(Path("x.y.png")) == "x.y"


def test_every_generator_parameter_is_a_flag():
    """The flags are declared (mobilesam_batch.flags), and the declaration covers every
    MaskGenerator keyword: a new library parameter fails here until it is declared."""
    import inspect

    from mobilesam_batch.flags import GENERATOR_FLAGS, NOT_FLAGS, generator_defaults
    from napari_mobilesam.everything import MaskGenerator

    parser, names = cli.build_parser()
    params = inspect.signature(MaskGenerator.__init__).parameters
    declared = {f.name for f in GENERATOR_FLAGS}
    assert set(params) - {"self"} == declared | set(NOT_FLAGS)
    assert not declared & set(NOT_FLAGS) and names == [f.name for f in GENERATOR_FLAGS]
    assert generator_defaults() == {n: params[n].default for n in declared}
    for flag in GENERATOR_FLAGS:  # types as declared
        default = params[flag.name].default
        assert default is None or isinstance(default, flag.kind), flag.name
        if flag.choices:
            assert default in flag.choices
    help_text = " ".join(parser.format_help().split())
    assert "--points-per-side N" in help_text and "--min-mask-region-area N" in help_text
    assert "{auto,mask,box}" in help_text and "--tile-size N" in help_text
    assert "60% of its free memory" in help_text  # a % survives argparse
    assert "[0.341333]" in help_text  # crop_overlap_ratio's default, 512/1500


def test_generator_flags_reach_the_generator(tiny_cli, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(cells((48, 48), rng)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = [str(tmp_path / "a.png"), "-o", str(out), *FAST, "--crop-overlap-ratio", "0.25",
            "--nms", "box", "--tile-size", "0", "--min-mask-region-area", "3"]  # fmt: skip
    assert tiny_cli(args) == 0
    params = json.loads((out / "a_labels.json").read_text())["parameters"]
    assert params["crop_overlap_ratio"] == 0.25 and params["nms"] == "box"
    assert params["tile_size"] == 0 and params["min_mask_region_area"] == 3
    assert params["points_per_batch"] == 64  # left out: the library default, recorded
    seg = next(iter(segment._SEGMENTERS.values()))
    assert (seg.generator.nms, seg.generator.crop_overlap_ratio) == ("box", 0.25)
