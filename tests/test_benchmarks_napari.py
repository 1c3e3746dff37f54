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
    assert set(result["block_ms"]) == {"dock open", "start", "clicks", "propagation", "precompute"}
    assert all(ms >= 0 for ms in result["block_ms"].values())
    # the runs really happened: the object committed before propagating, every plane embedded
    assert result["stack_objects"] == 1 and result["planes_embedded"] == 3
    assert (viewer.layers["stack_labels"].data[1] == 1).any()  # the middle plane
    text = bench_napari.report(result)
    assert "click-to-preview, median" in text and "longest GUI block, precompute" in text


@pytest.mark.slow  # a viewer, two Starts and four clicks
def test_bench_store_widget_clicks_run(make_napari_viewer, tiny_predictor, tmp_path):
    """bench_store.widget_clicks: clicks on new planes from the store run no encoder, the
    same clicks on a layer without a store run it once each."""
    import numpy as np
    from benchmarks import bench_store

    from napari_mobilesam.interactive import ImagePlanes
    from napari_mobilesam.store import embed_planes, open_for
    from napari_mobilesam.synthetic import cells_3d

    sample = cells_3d((3, 64, 64), seed=2, dtype="uint16")
    limits = (100.0, 3000.0)
    planes = ImagePlanes(sample.image, contrast_limits=limits)
    store = tmp_path / "stack.embeddings.zarr"
    embed_planes(open_for(store, planes, tiny_predictor), planes, tiny_predictor)
    viewer = make_napari_viewer()
    result = bench_store.widget_clicks(viewer, sample.image, sample.labels, limits, store, [1, 2])
    assert [c["plane"] for c in result["clicks"]["store"]] == [1, 2]
    assert result["encoder_images"] == {"store": 0, "encoder": 2}
    assert result["store_loads"] == 3  # Start's plane 0 and the two clicks
    assert result["status"]["store"] == "embeddings from stack.embeddings.zarr: 3 planes"
    assert all(c["s"] > 0 for rows in result["clicks"].values() for c in rows)
    assert result["ratio"] > 0 and np.isfinite(result["ratio"])


@pytest.mark.slow  # two children, each a viewer and the stand-in model
def test_bench_labels_runs():
    """bench_labels: numpy and chunked labels of a small stack, every step measured, the
    same objects committed either way."""
    from benchmarks import bench_labels

    result = bench_labels.run(size=384, planes=(2,), clicks=1)
    numpy_case, chunked_case = result["cases"]
    assert (numpy_case["kind"], chunked_case["kind"]) == ("numpy", "chunked")
    steps = ["image", "start", "clicks", "everything", "commit", "browse", "save"]
    for case in result["cases"]:
        assert [row["step"] for row in case["steps"]] == steps
        assert all(row["rss"] > 0 and row["peak"] > 0 for row in case["steps"])
    assert numpy_case["committed"] == chunked_case["committed"] > 0
    assert numpy_case["count"] == chunked_case["count"]
    assert "2, chunked" in bench_labels.report(result)
