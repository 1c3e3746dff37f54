"""Hostile inputs 3-4. A full disk or a permission error stops the run once, with a summary,
and never leaves a label image without its provenance record; an unusable output folder
fails before the model loads."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from mobilesam_batch import cli, segment

from .common import IS_ROOT, _assert_sets_complete, _image, _visible

# -- 3. a full disk, a permission error ----------------------------------------------------


def _fail_on_call(n: int, err: int, real):
    """A stand-in for ``real`` that raises OSError(err) on its ``n``-th call."""
    calls = []

    def stand_in(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    return stand_in


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
@pytest.mark.parametrize("where", ["saving a plane", "writing the outputs"])
def test_a_write_error_stops_the_run_once_with_a_summary(
    tool, tmp_path, capsys, monkeypatch, err, where
):
    from mobilesam_batch import finish, planes

    inputs = [_image(tmp_path / "in" / f"{c}.png", seed=i) for i, c in enumerate("abcd")]
    out = tmp_path / "out"
    # the second input's plane, or its CSV (written after its label image)
    target, name = (planes.np, "savez_compressed") if "plane" in where else (
        finish, "write_objects_csv")  # fmt: skip
    real = getattr(target, name)
    monkeypatch.setattr(target, name, _fail_on_call(2, err, real))
    assert tool(*inputs, "-o", out, "--csv") == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.count(os.strerror(err)) == 1  # caught once, named once
    assert f"mobilesam-everything: error: cannot write in {out}: {os.strerror(err)}" in captured.err
    assert "stopped early (see the error above): run the same command again" in captured.out
    assert "1 done, 0 skipped, 0 failed" in captured.out
    _assert_complete_sets_only(out)
    monkeypatch.setattr(target, name, real)  # space freed, permission fixed
    assert tool(*inputs, "-o", out, "--csv") == 0
    assert "3 done, 1 skipped, 0 failed" in capsys.readouterr().out
    assert sorted(_visible(out)) == sorted(
        f"{c}_{kind}" for c in "abcd" for kind in ("labels.tif", "labels.json", "objects.csv")
    )
    _assert_sets_complete(out)


def _assert_complete_sets_only(out: Path) -> None:
    """Whatever is visible is a whole set: label image, CSV and provenance together."""
    stems = {p.name.split("_")[0] for p in out.iterdir() if not p.name.startswith(".")}
    for stem in stems:
        names = {p.name for p in out.glob(f"{stem}_*")}
        assert names == {f"{stem}_labels.tif", f"{stem}_labels.json", f"{stem}_objects.csv"}


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only; CI runs as root)."""
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_tmpfs_stops_with_a_summary_and_the_rerun_completes(
    tool, small_tmpfs, tmp_path, capsys
):
    inputs = [_image(tmp_path / "in" / f"img{i}.png", seed=i, shape=(96, 96)) for i in range(8)]
    out = small_tmpfs / "out"
    filler = small_tmpfs / "filler"
    free = os.statvfs(small_tmpfs)
    with open(filler, "wb") as f:  # leave 20 pages: room for a few sets, not for 8
        f.write(b"\0" * ((free.f_bavail - 20) * free.f_frsize))
    assert tool(*inputs, "-o", out, "--csv", "--coco") == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.count("No space left on device") == 1
    assert "stopped early" in captured.out and " 0 failed" in captured.out
    done = int(captured.out.split(" done")[0].split()[-1])
    assert done < len(inputs)
    for labels in out.glob("*_labels.tif"):  # no label image without its record
        assert labels.with_suffix(".json").exists()
    filler.unlink()
    assert tool(*inputs, "-o", out, "--csv", "--coco") == 0
    assert f"{len(inputs) - done} done, {done} skipped, 0 failed" in capsys.readouterr().out
    assert len(list(out.glob("*_labels.json"))) == len(inputs)
    _assert_sets_complete(out)


# -- 4. an unusable output folder ----------------------------------------------------------


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder that cannot be written: a read-only tmpfs as root (root ignores modes),
    else a folder with mode 0o555."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if IS_ROOT:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.strip()}")
        yield ro
        subprocess.run(["umount", "-l", str(ro)], check=True)
    else:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)


def _unusable(case: str, tmp_path: Path, read_only: Path | None) -> tuple[Path, str]:
    """An output folder that cannot be used, and what the message says."""
    if case == "a file":
        out = tmp_path / "out"
        out.write_text("a file")
        return out, f"-o {out}: is a file, not a folder"
    if case == "below a file":
        (tmp_path / "f").write_text("a file")
        out = tmp_path / "f" / "out"
        return out, f"-o {out}: cannot create the folder: Not a directory"
    if case == "read-only, new":
        out = read_only / "out"
        return out, f"-o {out}: cannot create the folder"
    return read_only, f"-o {read_only}: cannot write in this folder"  # read-only, existing


@pytest.mark.parametrize(
    "case", ["a file", "below a file", "read-only, new", "read-only, existing"]
)
def test_an_unusable_output_folder_fails_before_the_model_loads(
    tiny_model, tmp_path, capsys, monkeypatch, request, case
):
    loads = []
    monkeypatch.setattr(segment.ModelSpec, "load", lambda self: loads.append(1) or tiny_model)
    segment._SEGMENTERS.clear()
    read_only = request.getfixturevalue("read_only_folder") if "read-only" in case else None
    out, message = _unusable(case, tmp_path, read_only)
    image = _image(tmp_path / "in" / "a.png")
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    argv = [str(image), "-o", str(out), "--weights", str(weights), "--device", "cpu", "-q"]
    try:
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert loads == [], "the model was loaded before the output folder was checked"
        assert message in err and "Traceback" not in err
        assert cli.main([*argv, "--dry-run"]) == 1  # the dry run checks too, writing nothing
        assert f"-o {out}" in capsys.readouterr().err
    finally:
        segment._SEGMENTERS.clear()
