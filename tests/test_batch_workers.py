"""Parallelism over prompts (engine/workers.py): segment-everything's batches on worker
threads of one torch thread each, results in order and equal to the serial ones."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_mobilesam.engine import threads as th
from napari_mobilesam.engine import workers as wk
from napari_mobilesam.engine.policy import Policy
from napari_mobilesam.everything import MaskGenerator


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _where(x):
    return x, threading.current_thread().name, torch.get_num_threads()


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_map_in_order_keeps_the_order_and_runs_workers_on_one_thread(workers):
    items = list(range(11))
    got = list(wk.map_in_order(_where, items, workers))
    assert [g[0] for g in got] == items
    if workers <= 1:  # the calling thread, its own count
        assert {g[1] for g in got} == {threading.current_thread().name}
        assert {g[2] for g in got} == {torch.get_num_threads()}
    else:
        assert all(g[1].startswith("mobilesam-batch") for g in got)
        assert {g[2] for g in got} == {1}


def test_the_pool_leaves_the_thread_count_of_other_threads_alone():
    torch.set_num_threads(2)
    wk.worker_pool(5)  # a fresh pool: its workers set 1 for themselves
    seen = {}
    t = threading.Thread(target=lambda: seen.update(new=torch.get_num_threads()))
    t.start()
    t.join()
    assert torch.get_num_threads() == 2 and seen["new"] == 2


def test_an_error_is_raised_at_its_item_after_the_ones_before():
    def fn(x):
        if x == 4:
            raise KeyError("item 4")
        return x

    got = []
    with pytest.raises(KeyError, match="item 4"):
        for x in wk.map_in_order(fn, range(10), 2):
            got.append(x)
    assert got == [0, 1, 2, 3]


def test_a_pool_needs_two_workers():
    with pytest.raises(ValueError, match="at least 2 workers, got 1"):
        wk.worker_pool(1)


def test_a_pinned_thread_keeps_its_count_and_the_process_its_base():
    adaptive = th.AdaptiveThreads(enabled=True, watch=False)
    seen = {}

    def main():
        torch.set_num_threads(2)
        seen["main"] = adaptive.apply()

    def worker():
        adaptive.pin(1)
        seen["worker"] = (adaptive.apply(), torch.get_num_threads())

    def later():  # inherits the 1 the worker set last: not taken as the user's choice
        seen["later"] = (adaptive.apply(), adaptive.base())

    for target in (main, worker, later):
        t = threading.Thread(target=target)
        t.start()
        t.join()
    assert seen == {"main": 2, "worker": (1, 1), "later": (2, 2)}


def test_policy_batch_workers(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(th.ADAPTIVE, "enabled", False)
    torch.set_num_threads(2)
    assert Policy().batch_workers(cpu) == 2
    torch.set_num_threads(1)
    assert Policy().batch_workers(cpu) == 1
    assert Policy(cpu_batch_workers=False).batch_workers(cpu) == 1
    assert Policy().batch_workers(torch.device("meta")) == 1  # not a CPU: whole batches


def _disks(rng) -> np.ndarray:
    from skimage.draw import disk

    img = np.zeros((96, 128), np.uint8)
    for _ in range(8):
        rr, cc = disk(tuple(rng.integers(10, 86, 2)), rng.integers(5, 12), shape=img.shape)
        img[rr, cc] = rng.integers(100, 250)
    return img


def test_fast_mode_on_workers_equals_fast_mode_in_one_thread(tiny_model, rng, monkeypatch):
    """Both on one torch thread per batch: the same masks and scores, bit for bit."""
    torch.set_num_threads(1)
    image = _disks(rng)
    kw = dict(points_per_side=12, points_per_batch=16, pred_iou_thresh=0.0,
              stability_score_thresh=0.0, mode="fast")  # fmt: skip
    calls = []
    real = wk.map_in_order

    def spy(fn, items, workers):
        calls.append(workers)
        return real(fn, items, workers)

    monkeypatch.setattr("napari_mobilesam.everything.refine.map_in_order", spy)
    serial = MaskGenerator(tiny_model, **kw).generate(image)
    monkeypatch.setattr(Policy, "batch_workers", lambda self, device: 3)
    parallel = MaskGenerator(tiny_model, **kw).generate(image)
    # 144 points: 9 batches of 16 either way; then in one thread as 3 batches of 64
    kw["points_per_batch"] = 64
    monkeypatch.setattr(Policy, "batch_workers", lambda self, device: 1)
    other_batches = MaskGenerator(tiny_model, **kw).generate(image)
    assert calls == [1, 3, 1]
    for got in (parallel, other_batches):  # a batch's masks do not depend on its partners
        assert len(serial) == len(got) > 0
        for a, b in zip(serial, got, strict=True):
            np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
            assert a["predicted_iou"] == b["predicted_iou"]
            assert a["stability_score"] == b["stability_score"]
            assert a["point_coords"] == b["point_coords"]


def test_reference_mode_stays_in_the_calling_thread(tiny_model, monkeypatch):
    monkeypatch.setattr(Policy, "batch_workers", lambda self, device: 3)
    gen = MaskGenerator(tiny_model, points_per_side=4, mode="reference")
    assert gen.pipeline.batch_workers(100) == 1
    fast = MaskGenerator(tiny_model, points_per_side=4, mode="fast")
    # at most one worker per decoder call (4 prompts on a CPU)
    assert [fast.pipeline.batch_workers(n) for n in (100, 12, 5, 4, 1)] == [3, 3, 2, 1, 1]
    # describe() says so: the engine, the mode, and the workers of the first crop layer
    engine = fast.predictor.describe()
    assert gen.describe() == f"{engine}; reference mode"
    assert fast.describe() == f"{engine}; fast mode, prompt batches on 3 worker threads"
    monkeypatch.setattr(Policy, "batch_workers", lambda self, device: 1)
    assert fast.describe() == f"{engine}; fast mode"
    few = MaskGenerator(tiny_model, points_per_side=2, mode="fast")  # 4 prompts: one call
    monkeypatch.setattr(Policy, "batch_workers", lambda self, device: 3)
    assert few.describe() == f"{engine}; fast mode"
