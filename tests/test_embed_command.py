"""``mobilesam embed``: what it checks before writing anything, unreadable planes, and the
lock that keeps two runs out of one store."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from mobilesam_batch.folder import OutputError, held


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "stack.npy"
    np.save(path, rng.integers(0, 4000, (3, 30, 40)).astype(np.uint16))
    return path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--percentiles", "99,1"], "--percentiles 99,1: give LO,HI with 0 <= LO < HI <= 100"),
        (["--percentiles", "0,101"], "0 <= LO < HI <= 100"),
        (["--percentiles", "5,5"], "0 <= LO < HI <= 100"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--max-upscale", "0.9"], "--max-upscale 0.9: give a finite number >= 1"),
        (["--max-upscale", "x"], "--max-upscale x: give a finite number >= 1, or none"),
    ],
)
def test_bad_settings_are_refused_before_the_store_exists(
    tmp_path, source, embed_cli, capsys, flags, message
):
    run, calls = embed_cli
    out = tmp_path / "s.zarr"
    assert run(source, "-o", out, *flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and calls == []
    assert run(source, "-o", out, "-q") == 0  # the corrected command is not blocked


def test_an_unreadable_plane_is_a_named_error(tmp_path, embed_cli, capsys):
    run, _ = embed_cli
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, np.random.default_rng(1).integers(0, 4000, (64, 64), np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # half of the pixel data is gone
    assert run(path, "-o", tmp_path / "cut.zarr", "-q") == 1
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err


def test_a_store_written_by_another_run_is_refused(tmp_path, source, embed_cli, capsys):
    run, calls = embed_cli
    out = tmp_path / "s.zarr"
    lock = tmp_path / "s.zarr.lock"
    with held(lock, lambda who: f"held by {who}"):  # another run holds it
        assert run(source, "-o", out, "-q") == 1
        err = capsys.readouterr().err
        assert "another mobilesam embed run is writing this store (pid" in err
        assert str(out) in err and "run this command again" in err
        assert not out.exists() and calls == []
    assert run(source, "-o", out, "-q") == 0
    assert out.is_dir() and not lock.exists()  # the lock goes with the run


def test_held_refuses_a_second_holder_with_its_message_and_cleans_up(tmp_path):
    lock = tmp_path / "x.lock"
    with held(lock, lambda who: f"busy: {who}") as previous:
        assert previous is None and lock.is_file()
        with pytest.raises(OutputError, match=r"busy: pid \d+ on host .*, started "):
            with held(lock, lambda who: f"busy: {who}"):
                pass
    assert not lock.exists()
