"""The quality benchmark's stack figures on perfect segmentation (the segmenter replaced by
the generator's truth, as in test_batch_link.py): ``linked_3d`` (3D AP50 of ``--link z``) and
``tracked`` (tracking accuracy of ``--link t``) score 1 on it and less on a broken one."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from mobilesam_batch import segment
from napari_mobilesam import synthetic

from .test_batch_link import Perfect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_quality


@pytest.fixture
def tiny_weights(tiny_model, tmp_path, monkeypatch):
    """The command loads the tiny model; returns the file to pass as ``--weights``."""
    monkeypatch.setattr(segment.ModelSpec, "load", lambda self: tiny_model)
    segment._SEGMENTERS.clear()
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"stand-in")
    yield weights
    segment._SEGMENTERS.clear()


def test_bench_linked_3d_scores_perfect_segmentation_1(tiny_weights, tmp_path, monkeypatch):
    shape, seed = (10, 96, 96), 10_000
    samples = [synthetic.cells_3d(shape, seed=seed + k) for k in range(2)]
    image = np.concatenate([s.image for s in samples])
    truth = np.concatenate([s.labels for s in samples])
    Perfect(image, truth).patch(monkeypatch)
    weights = tiny_weights
    res = bench_quality.linked_3d(str(weights), 2, seed, shape, grid=4, folder=tmp_path / "w",
                                  extra=("--device", "cpu"), min_planes=1)  # fmt: skip
    segment._SEGMENTERS.clear()
    assert res["truth"] == res["objects"] == sum(int(s.labels.max()) for s in samples)
    assert res["ap50"] == res["f1"] == 1.0
    assert res["planes"] == 20
    # the benchmark's default --link-min-planes 3 leaves out the cells seen in fewer
    # planes (cut by the stacks' tops and bottoms): precision stays 1
    spans = [int((s.labels == i).any(axis=(1, 2)).sum()) for s in samples
             for i in range(1, int(s.labels.max()) + 1)]  # fmt: skip
    res = bench_quality.linked_3d(str(weights), 2, seed, shape, grid=4, folder=tmp_path / "v",
                                  extra=("--device", "cpu"))  # fmt: skip
    segment._SEGMENTERS.clear()
    assert res["objects"] == sum(n >= 3 for n in spans) and res["precision"] == 1.0
    # a cell the segmenter misses in every plane: recall and AP50 drop, precision stays
    broken = truth.copy()
    broken[: shape[0]][broken[: shape[0]] == 1] = 0
    Perfect(image, broken).patch(monkeypatch)
    res = bench_quality.linked_3d(str(weights), 2, seed, shape, grid=4, folder=tmp_path / "x",
                                  extra=("--device", "cpu"), min_planes=1)  # fmt: skip
    segment._SEGMENTERS.clear()
    assert res["precision"] == 1.0 and res["recall"] < 1.0 and res["ap50"] < 1.0


def test_bench_linked_3d_fails_when_the_command_fails(tmp_path):
    with pytest.raises(RuntimeError, match="exited with status 2"):
        bench_quality.linked_3d(str(tmp_path / "missing.pt"), 1, shape=(2, 32, 32), grid=4)


@pytest.mark.parametrize(
    "thresholds, expected",
    [("default", ["--pred-iou-thresh=0.6", "--stability-score-thresh=0.9"]), (None, []),
     ({"pred_iou_thresh": 0.7}, ["--pred-iou-thresh=0.7"])],
)  # fmt: skip
def test_bench_linked_3d_passes_its_thresholds(tmp_path, monkeypatch, thresholds, expected):
    from mobilesam_batch import cli

    seen = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(argv) or 1)
    kw = {} if thresholds == "default" else {"thresholds": thresholds}
    with pytest.raises(RuntimeError, match="exited with status 1"):
        bench_quality.linked_3d("vit_t_synthetic_cells", 1, shape=(2, 32, 32), grid=4,
                                folder=tmp_path, **kw)  # fmt: skip
    assert [a for a in seen[0] if "thresh" in a] == expected


def test_bench_tracked_scores_perfect_segmentation_1(tiny_weights, tmp_path, monkeypatch):
    frames, shape, seed = 6, (96, 96), 10_000
    samples = [synthetic.cell_time_series(frames, shape, seed=seed + k) for k in range(2)]
    image = np.concatenate([s.image for s in samples])
    truth = np.concatenate([s.labels for s in samples])
    Perfect(image, truth).patch(monkeypatch)
    weights = tiny_weights
    res = bench_quality.tracked(str(weights), 2, seed, frames, shape, grid=4,
                                folder=tmp_path / "w", extra=("--device", "cpu"))  # fmt: skip
    segment._SEGMENTERS.clear()
    assert res["frames"] == 12 and res["divisions"] == sum(len(s.divisions) for s in samples)
    assert res["link_accuracy"] == res["detection_recall"] == 1.0
    assert res["division_recall"] == 1.0 and res["links"] > 20
    # a cell the segmenter misses in one frame: the two links through it are lost
    broken = truth.copy()
    cell = int(broken[2][broken[2] > 0][0])
    broken[2][broken[2] == cell] = 0
    Perfect(image, broken).patch(monkeypatch)
    again = bench_quality.tracked(str(weights), 2, seed, frames, shape, grid=4,
                                  folder=tmp_path / "x", extra=("--device", "cpu"))  # fmt: skip
    segment._SEGMENTERS.clear()
    assert again["links_correct"] <= again["links"] - 2
    assert again["sections_matched"] == again["sections"] - 1


def test_bench_tracked_fails_when_the_command_fails(tmp_path):
    with pytest.raises(RuntimeError, match="exited with status 2"):
        bench_quality.tracked(str(tmp_path / "missing.pt"), 1, n_frames=2, shape=(32, 32), grid=4)
