"""Quality on stacks of the bundled stand-in model, pinned with a margin: 3D objects of
``mobilesam-everything --link z``, tracks of ``--link t``, propagation with an upscale
limit (``benchmarks/quality_stacks.py``; docs/quality.md has the full tables). The 2D
figures and propagation at SAM's resize are pinned in ``test_quality.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_quality

pytestmark = pytest.mark.slow


#: bench_quality.linked_3d("vit_t_synthetic_cells", 1, shape=LINKED_SHAPE, grid=LINKED_GRID,
#: extra=("--link-extend",), max_upscale=2, thresholds=None): ``mobilesam-everything --link z
#: --link-min-planes 3 --link-extend --max-upscale 2`` at the default score thresholds on one
#: small synthetic stack (18 cells; its 192 px planes shown 2x, not 5.3x); (measured, margin)
#: of its 3D AP50, 2026-12-07 with the phase-9 model (0.643 at the thresholds 0.6 / 0.9, where
#: the phase-8 model scored 0.767 and the phase-7 model 0.606; docs/quality.md has the 2-stack
#: figures).
LINKED_SHAPE, LINKED_GRID, LINKED_AP50 = (12, 192, 192), 12, (0.658, 0.08)


def test_linked_3d_ap50_with_extend_is_at_least_the_pinned_one(tmp_path):
    res = bench_quality.linked_3d("vit_t_synthetic_cells", 1, shape=LINKED_SHAPE,
                                  grid=LINKED_GRID, folder=tmp_path,
                                  extra=("--link-extend",), max_upscale=2,
                                  thresholds=None)  # fmt: skip
    measured, margin = LINKED_AP50
    assert res["truth"] == 18
    assert res["ap50"] >= measured - margin, f"3D AP50 {res['ap50']:.3f} < {measured} - {margin}"
    record = json.loads((tmp_path / "labels" / "stack0_labels.json").read_text())
    assert record["linked"]["extended"]["sections_added"] > 0
    assert record["parameters"]["max_upscale"] == 2


#: bench_quality.propagation(model, 1, max_upscale=2): propagation through the 256 px planes
#: of one synthetic stack shown 2x (``Predictor(max_upscale=2)``); (measured, margin) of its
#: mean IoU per plane, 2026-12-07 with the phase-9 model (0.535 shown 4x, as the fixture's
#: figure above; the phase-8 model: 0.690, and 0.568 shown 4x; the phase-7 model: 0.684, and
#: 0.518 shown 4x).
PROPAGATION_UPSCALED = (0.619, 0.05)


def test_propagation_with_an_upscale_limit_is_at_least_the_pinned_one():
    import torch

    from napari_mobilesam.build import load_model

    with torch.inference_mode():
        res = bench_quality.propagation(load_model("vit_t_synthetic_cells"), 1, max_upscale=2)
    measured, margin = PROPAGATION_UPSCALED
    got = res["mean_iou_per_plane"]
    assert got >= measured - margin, f"propagation {got:.3f} < {measured} - {margin}"


#: bench_quality.tracked("vit_t_synthetic_cells", 1, n_frames=TRACKED_FRAMES,
#: shape=TRACKED_SHAPE, grid=TRACKED_GRID): ``mobilesam-everything --link t`` with every
#: other default on one small synthetic time series (one division); (measured, margin) of
#: the fraction of true links kept and of the cells found per frame.
TRACKED_FRAMES, TRACKED_SHAPE, TRACKED_GRID = 5, (128, 128), 12
TRACKED = {"link_accuracy": (1.0, 0.1), "detection_recall": (1.0, 0.1)}


def test_tracking_accuracy_is_at_least_the_pinned_one(tmp_path):
    res = bench_quality.tracked("vit_t_synthetic_cells", 1, n_frames=TRACKED_FRAMES,
                                shape=TRACKED_SHAPE, grid=TRACKED_GRID,
                                folder=tmp_path)  # fmt: skip
    assert res["links"] >= 15 and res["divisions"] == 1
    for figure, (measured, margin) in TRACKED.items():
        assert res[figure] >= measured - margin, f"{figure} {res[figure]:.3f}"
    record = json.loads((tmp_path / "tracks" / "series0_labels.json").read_text())
    assert record["parameters"]["link"]["axis"] == "t"
    assert record["linked"]["divisions"] >= res["divisions_found"]
