"""Hostile inputs 5. No silent waits or drops: no dask worker, inputs inside the output folder,
dangling symbolic links."""

from __future__ import annotations

import threading

import pytest

from .common import _assert_sets_complete, _image, _stack

# -- 5. no silent waits or drops -------------------------------------------------------------


def test_a_scheduler_without_workers_is_reported_not_waited_on(tool, tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    image = _image(tmp_path / "a.png")
    out = tmp_path / "out"
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None) as empty:
        code = tool(image, "-o", out, "--scheduler", empty.scheduler_address,
                    "--worker-timeout", "0.5")  # fmt: skip
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert code == 1 and "Traceback" not in err
    assert f"waiting for a dask worker to join the scheduler at {empty.scheduler_address}" in err
    assert "no dask worker joined the scheduler" in err and "--worker-timeout" in err
    assert "0 done, 0 skipped, 0 failed; stopped early" in captured.out
    _assert_sets_complete(out)


_LEAVING: dict = {}


def _plane_then_leave(*args, **kwargs):
    """The task on the (in-process) worker: segments, and after plane 0 the worker goes."""
    result = _LEAVING["real"](*args, **kwargs)
    if tuple(args[2]) == (0,):
        threading.Thread(target=_LEAVING["cluster"].scale, args=(0,)).start()
    return result


def test_workers_that_all_leave_are_reported(tool, tmp_path, capsys, monkeypatch):
    """The only worker leaves after the first plane: the run says what it waits for and
    stops after --worker-timeout."""
    distributed = pytest.importorskip("distributed")
    from mobilesam_batch import executors

    stack = _stack(tmp_path / "stack.tif", planes=3)
    out = tmp_path / "out"
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as lc:
        monkeypatch.setitem(_LEAVING, "real", executors.segment_plane)
        monkeypatch.setitem(_LEAVING, "cluster", lc)
        monkeypatch.setattr(executors, "segment_plane", _plane_then_leave)
        code = tool(stack, "-o", out, "--scheduler", lc.scheduler_address, "--worker-timeout", "1")
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert code == 1 and "Traceback" not in err
    assert "waiting for a dask worker: the scheduler at" in err and "has none left" in err
    assert "has had no worker for 1 s while planes were waiting" in err
    assert "stopped early" in captured.out


def test_an_input_inside_the_output_folder_is_reported(tool, tmp_path, capsys):
    out = tmp_path / "out"
    inside = _image(out / "old" / "x.png")
    for named in (inside, out / "old", str(out / "old" / "*.png")):
        assert tool(named, "-o", out) == 1
        captured = capsys.readouterr()
        assert "0 done, 0 skipped, 1 failed" in captured.out
        assert f"{inside}: is inside the output folder {out}" in " ".join(captured.err.split())
    # found by scanning a folder that holds the output folder: left out, and counted
    _image(tmp_path / "a.png")
    assert tool(tmp_path, "-r", "-o", out) == 0
    captured = capsys.readouterr().out
    assert "1 done, 0 skipped, 0 failed, 1 file(s) inside the output folder ignored" in captured


def test_dangling_symlinks_are_reported(tool, tmp_path, capsys):
    folder = tmp_path / "in"
    _image(folder / "good.png")
    (folder / "dead.png").symlink_to(folder / "gone.png")
    (folder / "dead.zarr").symlink_to(tmp_path / "no-store")
    (folder / ".hidden.png").symlink_to(folder / "gone.png")  # hidden: skipped, as files are
    (folder / "notes.txt").symlink_to(folder / "gone.txt")  # not an image name: skipped
    out = tmp_path / "out"
    for named in (folder, str(folder / "*"), folder / "dead.png"):
        code = tool(named, "-o", out)
        captured = capsys.readouterr()
        err = " ".join(captured.err.split())
        assert code == 1
        assert (
            f"{folder / 'dead.png'}: dangling symbolic link: its target {folder / 'gone.png'}"
            in err
        )
        if named != folder / "dead.png":
            assert f"{folder / 'dead.zarr'}: dangling symbolic link" in err
            assert "hidden" not in err and "notes.txt" not in err
            assert "2 failed" in captured.out
