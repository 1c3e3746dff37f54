"""Hostile inputs 1b. A rerun with other settings never replaces or removes outputs the
user edited since the run that wrote them (the provenance record keeps their SHA-256)."""

from __future__ import annotations

import pytest
import tifffile

from mobilesam_batch import finish
from mobilesam_batch.provenance import changed_outputs, file_digest

from .common import _assert_sets_complete, _image, _record, _visible

OTHER = ("--box-nms-thresh", "0.5")  # other settings: the outputs would be redone


def _edit_labels(path) -> None:
    """What a user does in napari or Fiji: paint an object, save over the file."""
    labels = tifffile.imread(path)
    labels[:5, :5] = labels.max() + 1
    tifffile.imwrite(path, labels)


@pytest.fixture
def edited(tool, tmp_path):
    """One input, its outputs (labels and CSV) written, then its label image edited."""
    image = _image(tmp_path / "in" / "well.png")
    out = tmp_path / "out"
    assert tool(image, "-o", out, "--csv") == 0
    record = _record(out, "well")
    assert set(record["outputs"]["sha256"]) == {"labels", "csv"}
    assert record["outputs"]["sha256"]["labels"] == file_digest(out / "well_labels.tif")
    _edit_labels(out / "well_labels.tif")
    return image, out


def test_an_edited_label_image_is_not_replaced_by_a_rerun(tool, edited, capsys):
    image, out = edited
    before = _visible(out)
    capsys.readouterr()
    assert tool(image, "-o", out, "--csv", *OTHER) == 1
    captured = capsys.readouterr()
    assert "0 done, 0 skipped, 1 failed" in captured.out
    err = " ".join(captured.err.split())
    assert f"well_labels.tif in {out} changed since mobilesam-everything wrote it" in err
    assert "--on-clash suffix" in err and "--on-clash overwrite" in err
    assert _visible(out) == before
    # --overwrite (recompute up-to-date inputs) does not replace it either
    assert tool(image, "-o", out, "--csv", "--overwrite") == 1
    assert _visible(out) == before
    # the same settings as the run that wrote it: up to date, skipped, kept as it is
    capsys.readouterr()
    assert tool(image, "-o", out, "--csv") == 0
    assert "0 done, 1 skipped, 0 failed" in capsys.readouterr().out
    assert _visible(out) == before
    _assert_sets_complete(out)


def test_a_table_of_an_edited_set_is_not_removed(tool, edited, capsys):
    """Without --csv the rerun would remove the earlier table; the set was edited, so it
    is refused as a whole, the table included."""
    image, out = edited
    assert tool(image, "-o", out, *OTHER) == 1
    assert (out / "well_objects.csv").is_file()


def test_on_clash_suffix_writes_beside_an_edited_set(tool, edited, capsys):
    image, out = edited
    before = _visible(out)
    assert tool(image, "-o", out, "--csv", "--on-clash", "suffix", *OTHER) == 0
    assert {k: v for k, v in _visible(out).items() if k.startswith("well_")} == before
    assert _record(out, "well-2")["input"]["path"] == str(image.resolve())


def test_on_clash_overwrite_replaces_an_edited_set_and_says_so(tool, edited, capsys):
    image, out = edited
    edited_bytes = (out / "well_labels.tif").read_bytes()
    capsys.readouterr()
    assert tool(image, "-o", out, "--on-clash", "overwrite", *OTHER) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "--on-clash overwrite: replacing them (well_labels.tif" in err
    assert (out / "well_labels.tif").read_bytes() != edited_bytes
    assert not (out / "well_objects.csv").exists()  # not asked for this time: removed
    _assert_sets_complete(out)


def test_a_set_edited_while_the_run_runs_is_kept(tool, tmp_path, monkeypatch, capsys):
    """Planning found the set unedited; the user saves an edit before the new set is
    moved into place: the input fails, the edit stays, and nothing is half-replaced."""
    image = _image(tmp_path / "in" / "well.png")
    out = tmp_path / "out"
    assert tool(image, "-o", out) == 0
    write = finish._write_outputs

    def write_then_edit(job, config, stage, *more):
        record = write(job, config, stage, *more)
        _edit_labels(out / "well_labels.tif")
        return record

    monkeypatch.setattr(finish, "_write_outputs", write_then_edit)
    capsys.readouterr()
    assert tool(image, "-o", out, *OTHER) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "well_labels.tif" in err and "changed while this run was running" in err
    monkeypatch.setattr(finish, "_write_outputs", write)
    kept = _visible(out)
    assert tool(image, "-o", out, *OTHER) == 1  # the rerun refuses it too
    assert _visible(out) == kept
    assert changed_outputs(_record(out, "well"), out) == ["well_labels.tif"]


def test_file_digest_of_a_folder_covers_names_and_bytes(tmp_path):
    store = tmp_path / "a.zarr"
    (store / "0").mkdir(parents=True)
    (store / "0" / "c").write_bytes(b"xy")
    first = file_digest(store)
    (store / "0" / "c").write_bytes(b"xz")
    second = file_digest(store)
    (store / "0" / "c").rename(store / "0" / "d")
    assert len({first, second, file_digest(store)}) == 3


def test_changed_outputs_trusts_only_plain_names_with_digests(tmp_path):
    (tmp_path / "a_labels.tif").write_bytes(b"one")
    outputs = {"labels": "a_labels.tif", "csv": "a_objects.csv"}
    assert changed_outputs({"outputs": outputs}, tmp_path) == []  # an older record
    assert changed_outputs(None, tmp_path) == []
    digests = {"labels": file_digest(tmp_path / "a_labels.tif"), "csv": "0" * 64}
    record = {"outputs": {**outputs, "sha256": digests}}
    assert changed_outputs(record, tmp_path) == []  # the CSV is gone: nothing to keep
    (tmp_path / "a_labels.tif").write_bytes(b"two")
    assert changed_outputs(record, tmp_path) == ["a_labels.tif"]
    sneaky = {"outputs": {"labels": "../x.tif", "sha256": {"labels": "0" * 64}}}
    (tmp_path.parent / "x.tif").write_bytes(b"")
    assert changed_outputs(sneaky, tmp_path) == []  # only names in the folder itself
