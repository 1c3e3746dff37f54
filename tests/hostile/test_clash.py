"""Hostile inputs 1. Outputs of one input never silently replace another input's (``--on-
clash``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from .common import _assert_sets_complete, _image, _record, _visible

# -- 1. clashes across runs -------------------------------------------------------------


def _plates(tmp_path: Path) -> tuple[Path, Path]:
    """plate1/well.png and plate2/well.png: different images, one name."""
    for i, plate in enumerate(("plate1", "plate2")):
        _image(tmp_path / plate / "well.png", seed=i)
    return tmp_path / "plate1", tmp_path / "plate2"


def test_a_clash_across_runs_is_refused_naming_both_inputs(tool, tmp_path, capsys):
    plate1, plate2 = _plates(tmp_path)
    out = tmp_path / "out"
    assert tool(plate1, "-o", out) == 0
    before = _visible(out)
    capsys.readouterr()
    assert tool(plate2, "-o", out) == 1
    captured = capsys.readouterr()
    assert "0 done, 0 skipped, 1 failed" in captured.out
    err = " ".join(captured.err.split())
    assert f"{plate2 / 'well.png'}: well_labels.tif in {out} was written for " in err
    assert str((plate1 / "well.png").resolve()) in err and "--on-clash suffix" in err
    assert _visible(out) == before  # plate1's outputs untouched
    _assert_sets_complete(out)


def test_on_clash_suffix_writes_beside_and_resumes(tool, tmp_path, capsys):
    plate1, plate2 = _plates(tmp_path)
    out = tmp_path / "out"
    assert tool(plate1, "-o", out) == 0
    first = _visible(out)
    assert tool(plate2, "-o", out, "--on-clash", "suffix") == 0
    assert _record(out, "well-2")["input"]["path"] == str((plate2 / "well.png").resolve())
    assert {k: v for k, v in _visible(out).items() if k.startswith("well_")} == first
    capsys.readouterr()
    # reruns find their own outputs: plate2's under the suffix, plate1's under the name
    assert tool(plate2, "-o", out, "--on-clash", "suffix") == 0
    assert "0 done, 1 skipped, 0 failed" in capsys.readouterr().out
    assert tool(plate1, "-o", out) == 0
    assert "0 done, 1 skipped, 0 failed" in capsys.readouterr().out
    _assert_sets_complete(out)


def test_on_clash_overwrite_replaces_and_says_so(tool, tmp_path, capsys):
    plate1, plate2 = _plates(tmp_path)
    out = tmp_path / "out"
    assert tool(plate1, "-o", out) == 0
    capsys.readouterr()
    assert tool(plate2, "-o", out, "--on-clash", "overwrite") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "--on-clash overwrite: replacing them" in err and str(plate1.resolve()) in err
    assert _record(out, "well")["input"]["path"] == str((plate2 / "well.png").resolve())
    assert sorted(_visible(out)) == ["well_labels.json", "well_labels.tif"]


def test_same_name_twice_in_one_run_with_suffix(tool, tmp_path, capsys):
    plate1, plate2 = _plates(tmp_path)
    out = tmp_path / "out"
    assert tool(plate1, plate2, "-o", out) == 1  # refused by default, naming both
    assert "same name 'well'" in capsys.readouterr().err
    shutil.rmtree(out)
    assert tool(plate1, plate2, "-o", out, "--on-clash", "suffix") == 0
    assert _record(out, "well-2")["input"]["path"] == str((plate2 / "well.png").resolve())


def test_a_moved_input_folder_still_resumes(tool, tmp_path, capsys):
    _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert tool(tmp_path / "in", "-o", out) == 0
    (tmp_path / "in").rename(tmp_path / "moved")
    capsys.readouterr()
    assert tool(tmp_path / "moved", "-o", out) == 0
    assert "0 done, 1 skipped, 0 failed" in capsys.readouterr().out


def test_files_this_tool_did_not_write_are_not_replaced(tool, tmp_path, capsys):
    _image(tmp_path / "in" / "well.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "well_labels.tif").write_bytes(b"somebody's own labels")
    assert tool(tmp_path / "in", "-o", out) == 1
    assert "without a provenance record of this tool" in capsys.readouterr().err
    assert (out / "well_labels.tif").read_bytes() == b"somebody's own labels"


def test_a_set_without_its_record_is_completed_by_the_rerun(tool, tmp_path, capsys):
    """A label image whose provenance record was never written (a run stopped between
    them) is this input's by its own metadata: the rerun redoes the set."""
    image = _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert tool(image, "-o", out, "--csv") == 0
    (out / "a_labels.json").unlink()
    (out / "a_objects.csv").unlink()
    capsys.readouterr()
    assert tool(image, "-o", out, "--csv") == 0
    assert "1 done, 0 skipped, 0 failed" in capsys.readouterr().out
    assert sorted(_visible(out)) == ["a_labels.json", "a_labels.tif", "a_objects.csv"]
