"""``tool``: mobilesam-everything in-process on the tiny model."""

from __future__ import annotations

import pytest

from mobilesam_batch import cli, segment

from .common import FAST


@pytest.fixture
def tool(tiny_model, tmp_path, monkeypatch):
    """``tool(*args) -> exit status``: the command in-process on the tiny model."""
    monkeypatch.setattr(segment.ModelSpec, "load", lambda self: tiny_model)
    segment._SEGMENTERS.clear()
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"stand-in for the tiny model's weights")

    def run(*args) -> int:
        argv = [str(a) for a in args]
        return cli.main([*argv, "--weights", str(weights), "--device", "cpu", "-q", *FAST])

    yield run
    segment._SEGMENTERS.clear()
