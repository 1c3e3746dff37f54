"""benchmarks/bench_napari.py runs (tiny sizes; its numbers are not checked, they are
timings) on a real viewer."""

from __future__ import annotations

import os
import shutil

import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")
if shutil.which("Xvfb") is None and not os.environ.get("DISPLAY"):
    pytest.skip("no display: install Xvfb (see tests/test_widgets.py)", allow_module_level=True)

from benchmarks import bench_napari  # noqa: E402


@pytest.mark.slow  # ~7 s: the benchmark end to end
def test_bench_napari_runs(make_napari_viewer):
    viewer = make_napari_viewer()
    result = bench_napari.run(viewer, size=160, clicks=3, planes=3)
    assert len(result["click_ms"]) == 3 and all(ms > 0 for ms in result["click_ms"])
    assert set(result["block_ms"]) == {"start", "clicks", "propagation", "precompute"}
    assert all(ms >= 0 for ms in result["block_ms"].values())
    # the runs really happened: the object committed before propagating, every plane embedded
    assert result["stack_objects"] == 1 and result["planes_embedded"] == 3
    assert (viewer.layers["stack_labels"].data[1] == 1).any()  # the middle plane
    text = bench_napari.report(result)
    assert "click-to-preview, median" in text and "longest GUI block, precompute" in text
