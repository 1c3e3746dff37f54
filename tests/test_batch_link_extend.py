"""``mobilesam-everything --link z|zt --link-extend``: linked 3D objects prompted into the
planes where segmentation missed them, streamed plane by plane, with the same result as
:func:`napari_mobilesam.linking.extend.extend_objects` on the whole linked stack.

A "perfect" segmenter returns the generator's truth less each cell's end sections, and
an oracle stands in for the prompted model: the true section under each box's centre.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

import napari_mobilesam.linking.extend as library
from mobilesam_batch import extend as batch_extend
from mobilesam_batch.link import EXTEND_THRESHOLDS, LinkOptions
from napari_mobilesam import synthetic

from .extend_support import oracle, without_ends
from .test_batch_link import FAST, Perfect, _csv_matches_labels, _rows, _write


def _patch_model(monkeypatch, image: np.ndarray, truth: np.ndarray) -> list[int]:
    """The command's prompted model answered by the oracle (planes are recognised by
    their pixels); returns the list of planes prompted, filled as they are."""
    flat_img = image.reshape(-1, *image.shape[-2:])
    flat_truth = truth.reshape(-1, *truth.shape[-2:])
    by_plane = {p.tobytes(): t for p, t in zip(flat_img, flat_truth, strict=True)}
    prompted: list[int] = []

    def prompter(predictor, plane, rgb, store, out):
        def predict(z, boxes):
            prompted.append(z)
            out.embedded += 1
            _, raw = plane(z)
            truth = by_plane[np.ascontiguousarray(raw).tobytes()]
            return oracle(lambda _: truth)(z, boxes)

        return predict

    monkeypatch.setattr(batch_extend, "_prompter", prompter)
    return prompted


@pytest.mark.parametrize("axes", ["ZYX", "TZYX"])
def test_link_extend_adds_the_missed_sections_as_the_library_does(
    tiny_cli, tmp_path, monkeypatch, axes
):
    if axes == "ZYX":
        sample = synthetic.cells_3d((10, 96, 96), seed=3, radius=(8, 16), z_radius=(2, 4))
        link = "z"
    else:
        sample = synthetic.cell_time_series(2, (8, 96, 96), seed=1, coverage=0.1, divisions=0)
        link = "zt"
    truth = sample.labels

    def run_cli(args):
        return tiny_cli([*args, *FAST])

    Perfect(sample.image, without_ends(truth)).patch(monkeypatch)
    prompted = _patch_model(monkeypatch, sample.image, truth)
    inp = str(_write(tmp_path / "s.tif", sample))
    args = [inp, "--link", link, "--csv", "--coco"]
    assert run_cli([*args, "-o", str(tmp_path / "plain")]) == 0
    plain = tifffile.imread(tmp_path / "plain" / "s_labels.tif")
    assert not prompted
    assert run_cli([*args, "-o", str(tmp_path / "ext"), "--link-extend"]) == 0
    out = tmp_path / "ext"
    labels = tifffile.imread(out / "s_labels.tif")

    # the library on the whole linked stack, one z-stack at a time
    stacks = plain.reshape(-1, *plain.shape[-3:])
    truths = truth.reshape(-1, *truth.shape[-3:])
    expected = [
        library.extend_objects(s, oracle(lambda z, t=t: t[z]), **EXTEND_THRESHOLDS)
        for s, t in zip(stacks, truths, strict=True)
    ]
    np.testing.assert_array_equal(
        labels, np.stack([e.labels for e in expected]).reshape(labels.shape)
    )
    added = sum(len(e.added) for e in expected)
    assert added > 0 and (labels > 0).sum() > (plain > 0).sum()
    assert len(prompted) == sum(e.planes_prompted for e in expected)

    rows = _rows(out / "s_objects.csv")
    id_name = "object_id" if link == "z" else "track_id"
    _csv_matches_labels(rows, labels, id_name, labels.shape[:-2])
    new_rows = [r for r in rows if r["stability_score"] == ""]  # the added sections
    assert len(new_rows) == added and {r["predicted_iou"] for r in new_rows} == {"0.9"}
    coco = json.loads((out / "s_coco.json").read_text())
    assert len(coco["annotations"]) == len(rows)

    record = json.loads((out / "s_labels.json").read_text())
    assert record["parameters"]["link"]["extend"] == EXTEND_THRESHOLDS
    ext = record["linked"]["extended"]
    assert ext["sections_added"] == added and ext["planes_prompted"] == len(prompted)
    assert ext["objects_extended"] == len({i for e in expected for _, i, _, _ in e.added})
    plain_record = json.loads((tmp_path / "plain" / "s_labels.json").read_text())
    assert "extend" not in plain_record["parameters"]["link"]
    assert plain_record["key"] != record["key"]
    # the saved planes of the segmentation were not changed: a rerun is up to date
    assert not (out / ".mobilesam-work").exists()
    assert run_cli([*args, "-o", str(out), "--link-extend"]) == 0
    np.testing.assert_array_equal(tifffile.imread(out / "s_labels.tif"), labels)


def test_link_extend_flag_errors(tiny_cli, tmp_path, capsys):
    for args, message in (
        (["--link-extend"], "--link-extend needs --link z or zt"),
        (["--link", "t", "--link-extend"], "not tracks of 2D frames (--link t)"),
    ):
        assert tiny_cli([str(tmp_path / "none.tif"), "-o", str(tmp_path / "out"), *args]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="--link-extend"):
        LinkOptions("t", extend=True)
    assert LinkOptions("zt", extend=True).record()["extend"] == EXTEND_THRESHOLDS


def test_link_extend_reports_its_progress_by_tenths(tmp_path):
    from types import SimpleNamespace

    from mobilesam_batch.extend import _Steps

    lines: list[str] = []
    now = [0.0]
    job = SimpleNamespace(path=tmp_path / "s.tif")
    steps = _Steps(job, 30, lines.append, interval=10.0, clock=lambda: now[0])
    for k in range(30):
        now[0] = 6.0 * (k + 1)  # 6 s per step: a line at every tenth (18 s apart)
        steps(1)
    assert lines[0] == (
        f"extend {tmp_path / 's.tif'}: prompting the linked 3D objects into the planes where "
        "they were missed (30 plane steps)"
    )
    name = tmp_path / "s.tif"
    assert lines[1:] == [f"extend {name}: {p}0% ({3 * p} of 30)" for p in range(1, 10)]
    lines.clear()
    fast = _Steps(job, 30, lines.append, interval=10.0, clock=lambda: now[0])
    for _ in range(30):  # 1 s per step: at most a line per 10 s
        now[0] += 1.0
        fast(1)
    assert [line.split(": ")[1] for line in lines[1:]] == ["30% (10 of 30)", "60% (20 of 30)"]
    lines.clear()
    quiet = _Steps(job, 0, lines.append)  # a one-plane stack: nothing to say
    quiet(1)
    assert lines == []


class _Unreadable:
    """An input source whose planes cannot be read (a file whose permissions changed)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_plane(self, index):
        raise PermissionError(13, "Permission denied")


@pytest.mark.parametrize("failure", ["gone", "unreadable"])
def test_an_input_unreadable_at_the_extension_fails_alone(
    tiny_cli, tmp_path, monkeypatch, capsys, failure
):
    """The extension reads the planes again: an input that went or became unreadable since
    it was segmented fails by name (not as a full output folder), the run goes on, and its
    saved planes stay for a rerun."""
    from mobilesam_batch.inputs import InputError

    sample = synthetic.cells_3d((6, 64, 64), seed=3, radius=(8, 12), z_radius=(2, 3))
    Perfect(sample.image, without_ends(sample.labels)).patch(monkeypatch)

    def open_again(path, axes):
        if failure == "gone":
            raise InputError(path, "no such file")
        return _Unreadable()

    monkeypatch.setattr(batch_extend, "open_source", open_again)
    inp = _write(tmp_path / "s.tif", sample)
    out = tmp_path / "out"
    assert tiny_cli([str(inp), "-o", str(out), "--link", "z", "--link-extend", *FAST]) == 1
    err = " ".join(capsys.readouterr().err.split())
    reason = "no such file" if failure == "gone" else "Permission denied"
    assert f"FAILED {inp}: cannot write outputs: --link-extend: cannot read the input again:" in err
    assert reason in err and "cannot write in" not in err
    assert not (out / "s_labels.tif").exists()
    assert any((out / ".mobilesam-work").glob("s-*/plane_*.npz"))  # kept for a rerun
