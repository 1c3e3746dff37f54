"""glibc malloc settings that keep freed memory for the next image."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from napari_mobilesam.runtime import heap


class FakeLibc:
    def __init__(self, result: int = 1):
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


@pytest.fixture
def fresh(monkeypatch):
    """heap as in a new process, with a fake C library."""
    monkeypatch.setattr(heap, "_applied", None)
    monkeypatch.delenv(heap.ENV_VAR, raising=False)
    libc = FakeLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    return libc


def test_sets_both_thresholds_once(fresh):
    assert heap.keep_freed_memory() is True
    assert heap.keep_freed_memory() is True
    assert fresh.calls == [(-3, 32 * 2**20), (-1, 64 * 2**20)]  # M_MMAP_ / M_TRIM_THRESHOLD


@pytest.mark.parametrize("value", ["0", "false", "Off", " no "])
def test_environment_variable_leaves_malloc_alone(fresh, monkeypatch, value):
    monkeypatch.setenv(heap.ENV_VAR, value)
    assert heap.keep_freed_memory() is False
    assert fresh.calls == []


def test_other_c_libraries_are_left_alone(fresh, monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert heap.keep_freed_memory() is False


def test_refused_setting_is_reported(fresh):
    fresh.result = 0  # mallopt returns 0 on error
    assert heap.keep_freed_memory() is False


@pytest.mark.skipif(heap._glibc() is None, reason="glibc only")
@pytest.mark.slow
def test_freed_blocks_are_reused_without_page_faults():
    # three 20 MiB blocks allocated, touched and freed three times: glibc's adaptive
    # trim threshold (twice the largest block freed) releases the top of the heap each
    # round, so the next round faults its pages in again; pinned at 64 MiB, it keeps them
    script = textwrap.dedent(
        """
        import resource, sys
        import numpy as np
        from napari_mobilesam.runtime.heap import keep_freed_memory
        if sys.argv[1] == "1":
            assert keep_freed_memory()
        def churn():
            blocks = [np.ones(5 * 2**20, dtype=np.float32) for _ in range(3)]
            del blocks
        churn()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            churn()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        """
    )

    def faults(tuned: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != heap.ENV_VAR}
        out = subprocess.run([sys.executable, "-c", script, tuned], capture_output=True,
                             text=True, check=True, env=env)  # fmt: skip
        return int(out.stdout.split()[-1])

    default, tuned = faults("0"), faults("1")
    assert default > 1000  # 4 KiB pages faulted in again (about 3,500 on glibc 2.36)
    assert tuned < default / 20  # (0 there)


def test_predictor_on_cpu_applies_them(monkeypatch, tiny_model):
    from napari_mobilesam.predictor import Predictor

    calls = []
    monkeypatch.setattr(
        "napari_mobilesam.engine.registry.keep_freed_memory", lambda: calls.append(1)
    )
    Predictor(tiny_model)
    assert calls == [1]
