"""The thread policy for busy machines: readings of /proc/stat and cgroup quotas, and the
thread counts decided from them (decisions only; nothing here is timed)."""

from __future__ import annotations

import threading

import pytest
import torch

from napari_mobilesam.engine import threads as th
from napari_mobilesam.engine.policy import Policy
from napari_mobilesam.predictor import Predictor

HZ = th.os.sysconf("SC_CLK_TCK")


@pytest.fixture(autouse=True)
def _restore_threads():
    """torch's thread count, which new threads inherit, as it was before each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


STAT = """cpu  100 0 50 1000 5 0 0 0 0 0
cpu0 {a} 0 {a} 500 2 0 0 0 0 0
cpu1 {b} 0 0 500 3 0 0 {b} 0 0
intr 12345
"""


def test_parse_proc_stat_sums_the_watched_cpus():
    text = STAT.format(a=10, b=20)
    busy, total = th.parse_proc_stat(text, None)
    assert busy == pytest.approx((20 + 40) / HZ) and total == pytest.approx((60 + 1005) / HZ)
    busy0, _ = th.parse_proc_stat(text, {0})
    assert busy0 == pytest.approx(20 / HZ)
    assert th.parse_proc_stat(text, {7}) is None
    assert th.parse_proc_stat("intr 1\n", None) is None


def test_cgroup_quota_v2_v1_and_none(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert th.cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert th.cgroup_cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert th.cgroup_cpu_quota(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert th.cgroup_cpu_quota(v1) is None
    assert th.cgroup_cpu_quota(tmp_path / "missing") is None


class Machine:
    """Readings of a 2-CPU machine: busy CPU seconds of everyone, and of this process."""

    def __init__(self):
        self.now = self.busy = self.own = 0.0

    def run(self, seconds, others, own=0.0):
        self.now += seconds
        self.busy += (others + own) * seconds
        self.own += own * seconds

    def stat(self):
        ticks = round(self.busy * HZ / 2)
        return f"cpu0 {ticks} 0 0 100 0 0 0 0\ncpu1 {ticks} 0 0 100 0 0 0 0\n"

    def monitor(self, **kwargs):
        return th.CpuMonitor(self.stat, lambda: self.own, lambda: self.now, {0, 1}, **kwargs)


def test_monitor_counts_other_processes_not_this_one():
    m = Machine()
    monitor = m.monitor()
    assert monitor.n_cpus == 2 and monitor.sample() is None  # one reading: no rate yet
    m.run(1.0, others=0.0, own=2.0)  # our two threads busy: not contention
    assert monitor.sample() == pytest.approx(0.0, abs=0.02)
    for _ in range(8):  # a competitor keeps one CPU busy
        m.run(0.25, others=1.0, own=1.0)
        monitor.sample()
    assert monitor.others_busy() == pytest.approx(1.0, abs=0.05)
    assert th.CpuMonitor(lambda: None).sample() is None
    assert m.monitor(quota=1.5).n_cpus == 1.5


def test_decisions_follow_the_load():
    m = Machine()
    monitor = m.monitor()
    policy = th.AdaptiveThreads(monitor, enabled=True, watch=False)
    assert policy.decide(2) == 2  # no reading yet: the base
    monitor.sample()
    m.run(1.0, others=1.0)
    monitor.sample()
    assert policy.decide(2) == 1 and policy.decide(1) == 1
    assert policy.decide(8) == 1  # a 2-CPU affinity caps it too
    for _ in range(10):
        m.run(0.25, others=0.2)
        monitor.sample()
    assert policy.decide(2) == 2  # a fifth of a CPU taken: keep both
    assert th.AdaptiveThreads(monitor, enabled=False).decide(2) == 2


def test_apply_sets_the_calling_threads_count_and_respects_the_user():
    m = Machine()
    monitor = m.monitor()
    policy = th.AdaptiveThreads(monitor, enabled=True, watch=False)
    seen = {}

    def work():
        torch.set_num_threads(2)
        monitor.sample()
        m.run(1.0, others=1.0)
        monitor.sample()
        seen["busy"] = (policy.apply(), torch.get_num_threads())
        for _ in range(20):
            m.run(0.25, others=0.0)
            monitor.sample()
        seen["quiet"] = (policy.apply(), torch.get_num_threads())
        torch.set_num_threads(1)  # the user's choice
        seen["user"] = (policy.apply(), policy.base())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == {"busy": (1, 1), "quiet": (2, 2), "user": (1, 1)}


def test_a_new_thread_does_not_inherit_a_reduction():
    m = Machine()
    monitor = m.monitor()
    policy = th.AdaptiveThreads(monitor, enabled=True, watch=False)
    seen = {}

    def busy():
        torch.set_num_threads(2)
        monitor.sample()
        m.run(1.0, others=1.0)
        monitor.sample()
        seen["busy"] = policy.apply()

    def later():  # a new worker thread once the machine is quiet again
        seen["inherited"] = torch.get_num_threads()  # torch's last setting: ours, 1
        seen["quiet"] = (policy.apply(), policy.base())

    for target in (busy, lambda: None):
        t = threading.Thread(target=target)
        t.start()
        t.join()
    for _ in range(20):
        m.run(0.25, others=0.0)
        monitor.sample()
    t = threading.Thread(target=later)
    t.start()
    t.join()
    assert seen == {"busy": 1, "inherited": 1, "quiet": (2, 2)}


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("MOBILESAM_ADAPTIVE_THREADS", "0")
    policy = th.AdaptiveThreads()
    assert not policy.enabled and policy.apply() == torch.get_num_threads()
    assert policy.describe() == f"{torch.get_num_threads()} threads"


def test_engines_apply_and_describe_the_policy(tiny_model, monkeypatch):
    m = Machine()
    monitor = m.monitor()
    adaptive = th.AdaptiveThreads(monitor, enabled=True, watch=False)
    monkeypatch.setattr("napari_mobilesam.engine.policy.ADAPTIVE", adaptive)
    seen = {}

    def work():
        torch.set_num_threads(2)
        predictor = Predictor(tiny_model)
        seen["quiet"] = predictor.describe()
        monitor.sample()
        m.run(1.0, others=1.0)
        monitor.sample()
        predictor.set_image(torch.zeros(40, 50, 3, dtype=torch.uint8).numpy())
        seen["threads"] = torch.get_num_threads()
        seen["busy"] = predictor.describe()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["quiet"] == "cpu: torch, 2 threads (adaptive), fp32"
    assert seen["threads"] == 1
    assert seen["busy"] == "cpu: torch, 1 of 2 threads (other processes busy), fp32"
    fixed = Policy(adaptive_threads=False)
    assert fixed.apply_threads(torch.device("cpu")) == torch.get_num_threads()
    assert fixed.describe_threads(torch.device("cpu")).endswith(" threads")
    assert Policy().apply_threads(torch.device("meta")) == torch.get_num_threads()


def test_batch_threads_option_turns_the_policy_off(monkeypatch, tiny_model):
    from mobilesam_batch import segment
    from napari_mobilesam import build

    monkeypatch.setattr(th.ADAPTIVE, "enabled", True)
    monkeypatch.setattr(build, "load_model", lambda *a, **k: tiny_model)
    segment.ModelSpec(name="vit_t", weights=None, threads=1).load()
    assert th.ADAPTIVE.enabled is False and torch.get_num_threads() == 1
