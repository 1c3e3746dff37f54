"""Axes read from files: a stack whose file does not say what its axes are is refused when
it is opened (with the --axes hint), not after its planes were segmented."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from mobilesam_batch.inputs import InputError, open_source


@pytest.mark.parametrize(
    ("shape", "example"), [((2, 5, 16, 16), "TZYX"), ((2, 2, 2, 16, 16), "TZCYX")]
)
def test_a_tiff_without_axes_metadata_asks_for_axes(tmp_path, shape, example):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros(shape, np.uint16))  # tifffile reads it as Q...QYX
    with pytest.raises(InputError, match=rf"does not say what its axes are .*--axes {example}"):
        open_source(path, None)
    with open_source(path, "TZYX" if len(shape) == 4 else "TZCYX") as source:
        assert source.shape == shape


def test_a_3d_tiff_without_axes_metadata_is_still_a_stack_of_planes(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 16, 16), np.uint16))
    with open_source(path, None) as source:
        assert source.axes.endswith("YX") and len(source.axes) == 3


def test_the_batch_tool_refuses_it_before_segmenting(tmp_path, capsys):
    from mobilesam_batch import cli

    path = tmp_path / "f4.tif"
    tifffile.imwrite(path, np.zeros((2, 2, 32, 32), np.uint16))
    code = cli.main([str(path), "-o", str(tmp_path / "out"), "--dry-run"])
    captured = capsys.readouterr()
    assert code == 1
    assert "does not say what its axes are" in captured.out + captured.err
