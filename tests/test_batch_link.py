"""``mobilesam-everything --link z|t|zt``: 3D objects and tracks from per-plane results.

Most tests replace the segmenter by a "perfect" one that returns the generator's
ground truth with ids restarting at 1 in every plane (in a random order), so the
linked outputs can be compared with the true 3D objects and tracks. The tiny random
model checks that linking only relabels what segmentation found; the LocalCluster
test runs the bundled stand-in model in worker processes.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from mobilesam_batch import cli, finish, segment
from mobilesam_batch.link import LinkOptions, link_layout
from mobilesam_batch.runner import WORK_DIR
from napari_mobilesam import synthetic
from napari_mobilesam.linking import RULE_VERSION

from .linking_support import bijection, per_plane_ids

FAST = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
        "--tile-size", "0"]  # fmt: skip


@pytest.fixture
def run_cli(tiny_model, tmp_path, monkeypatch):
    """The command in-process with the tiny model; returns run(args) -> exit status."""
    monkeypatch.setattr(segment.ModelSpec, "load", lambda self: tiny_model)
    segment._SEGMENTERS.clear()
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"stand-in for the tiny model's weights")

    def run(args):
        return cli.main([*args, "--weights", str(weights), "--device", "cpu", "-q", *FAST])

    yield run
    segment._SEGMENTERS.clear()


class Perfect:
    """A segmenter returning the true labels of each plane, ids 1..N restarting per plane
    in a random order, with random scores (the same for a plane whenever it is segmented);
    counts its calls. Install with :meth:`patch`."""

    def __init__(self, image: np.ndarray, truth: np.ndarray, seed: int = 0) -> None:
        flat_img = image.reshape(-1, *image.shape[-2:])
        flat_lab = per_plane_ids(truth, seed).reshape(-1, *truth.shape[-2:])
        self.by_plane = {p.tobytes(): lab for p, lab in zip(flat_img, flat_lab, strict=True)}
        self.seed = seed
        self.calls = 0
        self.interrupt_at: int | None = None

    def segment(self, plane: np.ndarray, index=()) -> segment.PlaneResult:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        labels = self.by_plane[np.ascontiguousarray(plane).tobytes()].astype(np.uint32)
        n = int(labels.max())
        rng = np.random.default_rng([self.seed, *index])
        scores = np.round(rng.uniform(0.5, 1.0, n), 3)
        return segment.PlaneResult(tuple(index), labels, scores, scores.copy(), 0.0)

    def patch(self, monkeypatch) -> Perfect:
        me = self
        monkeypatch.setattr(segment.PlaneSegmenter, "segment", lambda _, p, i=(): me.segment(p, i))
        return self


def _write(path: Path, sample) -> Path:
    tifffile.imwrite(path, sample.image, imagej=True, metadata={"axes": sample.axes})
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _truth_parents(sample, ids: dict[int, int]) -> dict[int, int]:
    return {ids[c]: ids[p] for c, p in sample.parents.items() if p}


def _csv_matches_labels(rows, labels, id_name: str, plane_shape) -> None:
    """Each CSV row's linked id is the label image's value at the object's centroid box."""
    assert rows
    for row in rows:
        plane = labels[np.unravel_index(int(row["plane"]), plane_shape)]
        x, y = int(row["bbox_x"]), int(row["bbox_y"])
        w, h = int(row["bbox_width"]), int(row["bbox_height"])
        values = np.unique(plane[y : y + h, x : x + w])
        assert int(row[id_name]) in values
        assert (plane == int(row[id_name])).sum() == int(row["area"])


# --------------------------------------------------------------- perfect segmentation


def test_link_z_recovers_the_true_3d_objects(run_cli, tmp_path, monkeypatch):
    sample = synthetic.cells_3d(seed=0)  # (24, 256, 256)
    Perfect(sample.image, sample.labels).patch(monkeypatch)
    out = tmp_path / "out"
    assert run_cli([str(_write(tmp_path / "s.tif", sample)), "-o", str(out), "--link", "z",
                    "--csv", "--coco"]) == 0  # fmt: skip
    labels = tifffile.imread(out / "s_labels.tif")
    ids = bijection(sample.labels, labels.astype(np.uint32))  # the same partition in 3D
    assert sorted(ids.values()) == list(range(1, len(ids) + 1))
    spans = [len(np.flatnonzero((labels == i).any(axis=(1, 2)))) for i in ids.values()]
    assert min(spans) >= 2 and np.median(spans) >= 5  # each id through several planes

    rows = _rows(out / "s_objects.csv")
    assert list(rows[0])[:3] == ["plane", "label", "object_id"]
    _csv_matches_labels(rows, labels, "object_id", labels.shape[:1])
    coco = json.loads((out / "s_coco.json").read_text())
    assert {a["object_id"] for a in coco["annotations"]} == set(ids.values())
    assert not (out / "s_tracks.csv").exists()  # tracks only for t and zt

    record = json.loads((out / "s_labels.json").read_text())
    assert record["parameters"]["link"] == {
        "axis": "z", "min_iou": 0.5, "max_gap": 1, "min_planes": 1, "min_cover_z": 0.8,
        "min_cover_t": 0.5, "divisions": False, "division_share": 0.2,
        "rules": f"napari_mobilesam.linking rules v{RULE_VERSION}",
    }  # fmt: skip
    assert record["linked"] == {"objects": len(ids), "divisions": 0, "dropped_short": 0}
    assert record["outputs"]["label_ids"].startswith("linked: one id per 3D object")


def test_link_min_planes_leaves_out_short_objects_everywhere(run_cli, tmp_path, monkeypatch):
    """Objects seen in fewer planes than --link-min-planes go from the label image, the
    CSV and the COCO file; the others keep their voxels, renumbered 1..N in order."""
    sample = synthetic.cells_3d((10, 96, 96), seed=3, radius=(8, 16), z_radius=(1, 4))
    truth = sample.labels
    Perfect(sample.image, truth).patch(monkeypatch)
    inp = str(_write(tmp_path / "s.tif", sample))
    args = ["--link", "z", "--csv", "--coco"]
    assert run_cli([inp, "-o", str(tmp_path / "all"), *args]) == 0
    everything = tifffile.imread(tmp_path / "all" / "s_labels.tif")
    ids = np.unique(everything)[1:]
    spans = {int(i): int((everything == i).any(axis=(1, 2)).sum()) for i in ids}
    n = int(np.median(list(spans.values())))
    short = {i for i, k in spans.items() if k < n}
    assert short and len(short) < len(spans)  # the sample has both kinds
    assert run_cli([inp, "-o", str(tmp_path / "long"), *args, "--link-min-planes", str(n)]) == 0
    out = tmp_path / "long"
    labels = tifffile.imread(out / "s_labels.tif")
    # the same voxels as the full linking, less the short objects, ids renumbered in order
    kept = sorted(set(spans) - short)
    expect = np.zeros_like(everything)
    for new, old in enumerate(kept, start=1):
        expect[everything == old] = new
    np.testing.assert_array_equal(labels, expect)
    rows = _rows(out / "s_objects.csv")
    _csv_matches_labels(rows, labels, "object_id", labels.shape[:1])
    assert {int(r["object_id"]) for r in rows} == set(range(1, len(kept) + 1))
    coco = json.loads((out / "s_coco.json").read_text())
    assert {a["object_id"] for a in coco["annotations"]} == set(range(1, len(kept) + 1))
    assert len(coco["annotations"]) == len(rows)
    record = json.loads((out / "s_labels.json").read_text())
    assert record["parameters"]["link"]["min_planes"] == n
    dropped = len(short)
    assert record["linked"] == {"objects": len(kept), "divisions": 0, "dropped_short": dropped}
    # a stack per time point (T with --link z): each one's short objects, ids unique overall
    tz = np.stack([sample.image, sample.image])
    tifffile.imwrite(tmp_path / "tz.tif", tz, imagej=True, metadata={"axes": "TZYX"})
    assert run_cli([str(tmp_path / "tz.tif"), "-o", str(out), "--link", "z",
                    "--link-min-planes", str(n)]) == 0  # fmt: skip
    both = tifffile.imread(out / "tz_labels.tif")
    np.testing.assert_array_equal(both[0], labels)
    np.testing.assert_array_equal(both[1], np.where(labels > 0, labels + len(kept), 0))


def test_link_t_recovers_tracks_and_divisions(run_cli, tmp_path, monkeypatch):
    sample = synthetic.cell_time_series(seed=0)  # (20, 256, 256), 3 divisions
    Perfect(sample.image, sample.labels).patch(monkeypatch)
    out = tmp_path / "out"
    inp = _write(tmp_path / "movie.tif", sample)
    assert run_cli([str(inp), "-o", str(out), "--link", "t", "--csv"]) == 0
    labels = tifffile.imread(out / "movie_labels.tif").astype(np.uint32)
    ids = bijection(sample.labels, labels)
    rows = _rows(out / "movie_tracks.csv")
    assert list(rows[0])[:4] == ["track_id", "t", "y", "x"]
    parents = {int(r["track_id"]): int(r["parent_track_id"]) for r in rows}
    truth = _truth_parents(sample, ids)
    assert truth and {c: p for c, p in parents.items() if p} == truth
    for r in rows:  # the centroid of each track at each time point is where its pixels are
        mask = labels[int(r["t"])] == int(r["track_id"])
        assert mask.sum() == int(r["area"])
        assert abs(np.nonzero(mask)[0].mean() - float(r["y"])) < 1e-3
    _csv_matches_labels(_rows(out / "movie_objects.csv"), labels, "track_id", labels.shape[:1])
    record = json.loads((out / "movie_labels.json").read_text())
    assert record["linked"] == {
        "objects": len(ids),
        "divisions": len(truth) // 2,
        "dropped_short": 0,
    }
    assert record["outputs"]["tracks"] == "movie_tracks.csv"


def test_link_zt_tracks_3d_objects(run_cli, tmp_path, monkeypatch):
    sample = synthetic.cell_time_series(8, (12, 128, 128), seed=0, coverage=0.08)
    Perfect(sample.image, sample.labels).patch(monkeypatch)
    out = tmp_path / "out"
    assert run_cli([str(_write(tmp_path / "v.tif", sample)), "-o", str(out), "--link", "zt"]) == 0
    labels = tifffile.imread(out / "v_labels.tif").astype(np.uint32)
    assert labels.shape == sample.labels.shape
    ids = bijection(sample.labels, labels)  # one id per cell through z and t
    rows = _rows(out / "v_tracks.csv")
    assert list(rows[0])[:5] == ["track_id", "t", "z", "y", "x"]
    parents = {int(r["track_id"]): int(r["parent_track_id"]) for r in rows}
    truth = _truth_parents(sample, ids)
    assert truth and {c: p for c, p in parents.items() if p} == truth


def test_link_z_on_a_time_series_of_stacks_links_each_time_point(run_cli, tmp_path, monkeypatch):
    sample = synthetic.cell_time_series(3, (10, 96, 96), seed=1, coverage=0.08, divisions=0)
    Perfect(sample.image, sample.labels).patch(monkeypatch)
    out = tmp_path / "out"
    assert run_cli([str(_write(tmp_path / "v.tif", sample)), "-o", str(out), "--link", "z"]) == 0
    labels = tifffile.imread(out / "v_labels.tif").astype(np.uint32)
    seen: set[int] = set()
    for t in range(3):  # each time point's 3D objects, ids unique over the whole output
        ids = set(bijection(sample.labels[t], labels[t]).values())
        assert not ids & seen
        seen |= ids
    assert sorted(seen) == list(range(1, len(seen) + 1))


# --------------------------------------------------------------- resume, parameters


def _outputs(out: Path, stem: str) -> dict[str, object]:
    """Every output's content (times of writing left out), and the provenance key."""
    got: dict[str, object] = {}
    for p in sorted(out.glob(f"{stem}_*")):
        if p.suffix == ".zarr":
            got[p.name] = zarr.open_group(p, mode="r")["0"][...].tobytes()
        elif p.name.endswith("_coco.json"):
            got[p.name] = {k: v for k, v in json.loads(p.read_text()).items() if k != "info"}
        elif p.suffix != ".json":
            got[p.name] = p.read_bytes()
    got["key"] = json.loads((out / f"{stem}_labels.json").read_text())["key"]
    return got


def test_interrupted_runs_resume_to_the_same_result(run_cli, tmp_path, monkeypatch):
    sample = synthetic.cell_time_series(12, (128, 128), seed=2, coverage=0.2)
    inp = _write(tmp_path / "m.tif", sample)
    args = [str(inp), "--link", "t", "--csv", "--coco", "--zarr"]
    perfect = Perfect(sample.image, sample.labels).patch(monkeypatch)
    assert run_cli([*args, "-o", str(tmp_path / "ref")]) == 0
    want = _outputs(tmp_path / "ref", "m")

    out = tmp_path / "out"
    perfect.calls, perfect.interrupt_at = 0, 5  # Ctrl-C while segmenting plane 5
    assert run_cli([*args, "-o", str(out)]) == 130
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]
    assert len(list((out / WORK_DIR).rglob("*.npz"))) == 4

    real = finish.link_planes

    def interrupted(*a, **k):  # then Ctrl-C while linking, once every plane is done
        raise KeyboardInterrupt

    perfect.calls, perfect.interrupt_at = 0, None
    monkeypatch.setattr(finish, "link_planes", interrupted)
    assert run_cli([*args, "-o", str(out)]) == 130
    assert perfect.calls == 8  # only the planes not saved before
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]  # nothing half-written

    monkeypatch.setattr(finish, "link_planes", real)
    perfect.calls = 0
    assert run_cli([*args, "-o", str(out)]) == 0
    assert perfect.calls == 0  # linked from the saved planes
    assert _outputs(out, "m") == want
    assert not (out / WORK_DIR).exists()


def test_changed_link_parameters_relink(run_cli, tmp_path, monkeypatch, capsys):
    sample = synthetic.cells_3d((10, 96, 96), seed=3, radius=(8, 16), z_radius=(2, 4))
    inp = str(_write(tmp_path / "s.tif", sample))
    perfect = Perfect(sample.image, sample.labels).patch(monkeypatch)
    out = str(tmp_path / "out")
    assert run_cli([inp, "-o", out, "--link", "z"]) == 0
    first = json.loads((tmp_path / "out" / "s_labels.json").read_text())
    capsys.readouterr()
    assert run_cli([inp, "-o", out, "--link", "z"]) == 0
    assert "0 done, 1 skipped" in capsys.readouterr().out
    assert run_cli([inp, "-o", out, "--link", "z", "--link-iou", "0.3", "--link-gap", "0"]) == 0
    assert "1 done, 0 skipped" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "s_labels.json").read_text())
    assert record["key"] != first["key"]
    assert (record["parameters"]["link"]["min_iou"], record["parameters"]["link"]["max_gap"]) == (
        0.3,
        0,
    )
    # planes an interrupted run saved are re-linked with new parameters, not segmented again
    perfect.calls, perfect.interrupt_at = 0, 10
    fresh = str(tmp_path / "fresh")
    assert run_cli([inp, "-o", fresh, "--link", "z"]) == 130
    perfect.calls, perfect.interrupt_at = 0, None
    assert run_cli([inp, "-o", fresh, "--link", "z", "--link-iou", "0.3", "--link-gap", "0"]) == 0
    assert perfect.calls == 1
    assert _outputs(Path(fresh), "s") == _outputs(tmp_path / "out", "s")
    # without --link the per-plane ids come back (and the key of a run without --link)
    assert run_cli([inp, "-o", out]) == 0
    plain = tifffile.imread(tmp_path / "out" / "s_labels.tif")
    assert plain.max() == max(int(p.max()) for p in per_plane_ids(sample.labels))
    assert "link" not in json.loads((tmp_path / "out" / "s_labels.json").read_text())["parameters"]


# --------------------------------------------------------------- the tiny model


def test_linking_only_relabels_the_planes(run_cli, tmp_path):
    sample = synthetic.cells_3d((6, 64, 64), seed=4, radius=(8, 14), z_radius=(2, 3))
    inp = str(_write(tmp_path / "s.tif", sample))
    assert run_cli([inp, "-o", str(tmp_path / "a"), "--csv"]) == 0
    assert run_cli([inp, "-o", str(tmp_path / "b"), "--csv", "--link", "z"]) == 0
    plain = tifffile.imread(tmp_path / "a" / "s_labels.tif").astype(np.uint32)
    linked = tifffile.imread(tmp_path / "b" / "s_labels.tif").astype(np.uint32)
    assert plain.max() > 0
    for z in range(len(plain)):  # per plane the same objects, only other ids
        bijection(plain[z][None], linked[z][None])
    rows_a, rows_b = (
        _rows(tmp_path / "a" / "s_objects.csv"),
        _rows(tmp_path / "b" / "s_objects.csv"),
    )
    assert [{k: v for k, v in r.items() if k != "object_id"} for r in rows_b] == rows_a
    _csv_matches_labels(rows_b, linked, "object_id", linked.shape[:1])


# --------------------------------------------------------------- errors


def test_inputs_that_cannot_be_linked_fail_by_name(run_cli, tmp_path, capsys):
    flat = synthetic.cells_2d((64, 64), seed=0)
    two_d = _write(tmp_path / "flat.tif", flat)
    z_stack = _write(tmp_path / "zs.tif", synthetic.cells_3d((4, 64, 64), seed=0))
    series = synthetic.cell_time_series(2, (3, 48, 48), seed=0, n_cells=2)
    tz = _write(tmp_path / "tz.tif", series)
    out = str(tmp_path / "out")
    cases = [
        (two_d, "z", "flat.tif: --link z: is a single 2D image"),
        (z_stack, "t", "zs.tif: --link t: has no T axis (its plane axes are 'Z')"),
        (z_stack, "zt", "zs.tif: --link zt: has no T axis"),
        (tz, "t", "tz.tif: --link t: has a Z axis too"),
    ]
    for path, axis, message in cases:
        assert run_cli([str(path), "-o", out, "--link", axis]) == 1
        err = capsys.readouterr().err
        assert message in err, err
    assert run_cli([str(two_d), "-o", out, "--link", "z", "--dry-run"]) == 1
    assert "is a single 2D image" in capsys.readouterr().err
    assert not [p for p in Path(out).iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--link", "z", "--link-iou", "0"], "--link-iou 0.0: must lie in (0, 1]"),
        (["--link", "z", "--link-iou", "1.5"], "--link-iou 1.5: must lie in (0, 1]"),
        (["--link", "z", "--link-iou", "nan"], "--link-iou nan: must lie in (0, 1]"),
        (["--link", "z", "--link-gap", "-1"], "--link-gap -1: must be a whole number >= 0"),
        (["--link-iou", "0.5"], "--link-iou needs --link z|t|zt"),
        (["--link-gap", "2"], "--link-gap needs --link z|t|zt"),
        (["--link-min-planes", "2"], "--link-min-planes needs --link z|t|zt"),
        (["--link", "z", "--link-min-planes", "0"], "--link-min-planes 0: must be a whole number"),
        (
            ["--link", "t", "--link-min-planes", "2"],
            "applies to 3D objects (--link z), not to --link t",
        ),
        (["--link", "zt", "--link-min-planes", "3"], "not to --link zt"),
    ],
)
def test_bad_link_flags_are_usage_errors(run_cli, tmp_path, capsys, args, message):
    assert run_cli([str(tmp_path / "none.tif"), "-o", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_link_options_and_layout_errors():
    with pytest.raises(ValueError, match="--link 'x': choose z, t or zt"):
        LinkOptions("x")
    with pytest.raises(ValueError, match="--link-iou True"):
        LinkOptions("z", min_iou=True)
    with pytest.raises(ValueError, match="--link-gap 1.5"):
        LinkOptions("z", max_gap=1.5)
    with pytest.raises(ValueError, match="--link-min-planes 2.0"):
        LinkOptions("z", min_planes=2.0)
    with pytest.raises(ValueError, match="--link-min-planes True"):
        LinkOptions("z", min_planes=True)
    assert LinkOptions("t", min_planes=1).min_planes == 1  # 1 (keep all) fits every axis
    layout = link_layout("QTZ", (2, 3, 4), LinkOptions("zt"))
    assert (layout.linked, layout.groups, layout.group_axes) == ((1, 2), (0,), "Q")
    stacks = list(layout.stacks())
    assert [g for g, _ in stacks] == [(0,), (1,)]
    assert stacks[1][1][:5] == [(1, 0, 0), (1, 0, 1), (1, 0, 2), (1, 0, 3), (1, 1, 0)]
    zt = link_layout("ZT", (4, 3), LinkOptions("zt"))  # T outer, Z inner, whatever the order
    assert next(zt.stacks())[1][:2] == [(0, 0), (1, 0)]


# --------------------------------------------------------------- dask


@pytest.mark.slow
def test_local_cluster_links_as_a_local_run(tmp_path):
    pytest.importorskip("distributed")
    sample = synthetic.cell_time_series(3, (256, 256), seed=0, coverage=0.2, divisions=1)
    inp = _write(tmp_path / "m.tif", sample)

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "mobilesam_batch.cli", str(inp), "-o", str(out),
                "--model", "vit_t_synthetic_cells", "--device", "cpu", "--points-per-side", "8",
                "--pred-iou-thresh", "0.6", "--stability-score-thresh", "0.8",
                "--link", "t", "--csv", "-q", *extra]  # fmt: skip

    a = subprocess.run(command(tmp_path / "local"), capture_output=True, text=True)
    assert a.returncode == 0, a.stderr
    b = subprocess.run(command(tmp_path / "dask", "--scheduler", "local", "--workers", "2"),
                       capture_output=True, text=True)  # fmt: skip
    assert b.returncode == 0, b.stderr
    local = tifffile.imread(tmp_path / "local" / "m_labels.tif")
    assert local.max() > 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "dask" / "m_labels.tif"), local)
    for name, exact in (("m_tracks.csv", ("track_id", "t", "y", "x", "area", "parent_track_id")),
                        ("m_objects.csv", ("plane", "label", "track_id", "area"))):  # fmt: skip
        ra, rb = _rows(tmp_path / "local" / name), _rows(tmp_path / "dask" / name)
        assert [[r[c] for c in exact] for r in ra] == [[r[c] for c in exact] for r in rb]
