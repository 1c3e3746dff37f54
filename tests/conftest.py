"""Shared fixtures: the golden reference outputs and small models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Under pytest-xdist each worker gets an equal share of the cores for torch, OpenMP
# and onnxruntime (and the subprocesses tests start): workers that each spun up every
# core would wait on each other's threads. Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))
# A fixed thread count: with the adaptive policy (engine/threads.py), a busy machine would
# change the count between two runs that a test compares bit for bit (float sums in
# another order). tests/test_threads.py tests the policy with instances of its own.
os.environ.setdefault("MOBILESAM_ADAPTIVE_THREADS", "0")
# napari saves its settings on every change (the widgets add a reader preference): keep
# the tests' settings out of the user's napari configuration. Set before napari is imported.
os.environ.setdefault(
    "NAPARI_CONFIG",
    os.path.join(
        __import__("tempfile").gettempdir(),
        f"napari-mobilesam-tests-{os.getpid()}",
        "settings.yaml",
    ),
)

import numpy as np
import pytest
import torch

from napari_mobilesam.build import SamConfig, build_sam, load_model
from napari_mobilesam.model import TinyViTConfig

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("MOBILESAM_GOLDEN", ROOT.parent / "shared" / "golden"))
GOLDEN_CKPT = GOLDEN / "mobile_sam_random.pt"

requires_golden = pytest.mark.skipif(
    not GOLDEN_CKPT.exists(),
    reason=f"golden reference files not found at {GOLDEN} (../shared is absent)",
)

# A MobileSAM-shaped model small enough for unit tests: 128 px input, 8x8
# embedding of 32 channels, 32x32 low-res masks.
TINY_CONFIG = SamConfig(
    TinyViTConfig(
        img_size=128,
        embed_dims=(8, 16, 16, 24),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 3),
        window_sizes=(7, 7, 7, 7),
        out_chans=32,
        num_classes=10,
    ),
    prompt_embed_dim=32,
    mask_in_chans=8,
    decoder_mlp_dim=64,
    decoder_num_heads=2,
    iou_head_hidden_dim=32,
)


#: Test modules that take longest (seconds on a 2-core CI machine, 2026-12-07), run first:
#: pytest-xdist hands out whole modules (--dist loadscope) in collection order, so a long
#: module collected last would run alone at the end while the other worker idles.
LONGEST_MODULES = {
    "test_quality.py": 220,
    "test_quality_stacks.py": 110,
    "test_everything_golden.py": 250,
    "test_benchmarks.py": 200,
    "test_training_cli.py": 130,
    "test_distill_cli.py": 90,
    "test_batch_processes.py": 70,
    "test_interrupts.py": 40,
    "test_original.py": 35,
    "test_batch_link.py": 35,
    "test_backends.py": 30,
    "test_runtime.py": 25,
}


def pytest_collection_modifyitems(config, items):
    """The longest modules first (:data:`LONGEST_MODULES`); the rest, and the tests within
    each module, keep their order."""
    items.sort(key=lambda item: -LONGEST_MODULES.get(item.path.name, 0))


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere, BatchNorm statistics and LayerNorm affines included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
    return model


@pytest.fixture(scope="session")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    return _randomize(build_sam(TINY_CONFIG), seed=0).state_dict()


@pytest.fixture
def tiny_model(tiny_state_dict) -> torch.nn.Module:
    model = build_sam(TINY_CONFIG)
    model.load_state_dict(tiny_state_dict)
    return model.eval()


@pytest.fixture(scope="session")
def fused_tiny(tiny_state_dict) -> torch.nn.Module:
    """A tiny model optimised as load_model does (oneDNN kernels on the CPU); shared by the
    backend tests, which never change it."""
    from napari_mobilesam.accel import optimize

    model = build_sam(TINY_CONFIG)
    model.load_state_dict(tiny_state_dict)
    return optimize(model.eval())


@pytest.fixture(scope="session")
def tiny_export(fused_tiny, tmp_path_factory) -> dict:
    """One export (fp32 + int8) of :func:`fused_tiny`, with its state before (about 10 s,
    once per test process)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from napari_mobilesam.runtime import export_onnx

    root = tmp_path_factory.mktemp("export")
    before = {k: v.clone() for k, v in fused_tiny.state_dict().items()}
    layers = [type(m) for m in fused_tiny.modules()]
    source = {"checkpoint": "tiny.pt", "sha256": "0" * 64}
    meta = export_onnx(fused_tiny, root / "tiny", quantize="int8", source=source)
    return {
        "root": root,
        "dir": root / "tiny",
        "meta": meta,
        "before": before,
        "layers": layers,
        "source": source,
    }


@pytest.fixture(scope="session")
def golden_model():
    if not GOLDEN_CKPT.exists():
        pytest.skip(f"golden reference files not found at {GOLDEN}")
    return load_model("vit_t", GOLDEN_CKPT, device="cpu")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def golden_onnx_dir(tmp_path_factory):
    """The golden checkpoint exported once per session (fp32 and int8), as the CLI does."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    if not GOLDEN_CKPT.exists():
        pytest.skip(f"golden reference files not found at {GOLDEN}")
    from filelock import FileLock

    from napari_mobilesam.runtime import export_onnx
    from napari_mobilesam.weights import sha256_file

    # one export shared by all pytest-xdist workers of this run (their base temp
    # folders share a parent unique to the run); the first to take the lock writes it
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "golden-onnx"
    out = shared / "vit_t"
    with FileLock(str(shared) + ".lock"):
        if not (shared / "done").exists():
            unfused = load_model("vit_t", GOLDEN_CKPT, device="cpu", optimize=False)
            source = {"checkpoint": str(GOLDEN_CKPT), "sha256": sha256_file(GOLDEN_CKPT)}
            export_onnx(unfused, out, quantize="int8", source=source)
            (shared / "done").touch()
    return out


@pytest.fixture
def onnx_cache(golden_onnx_dir, tmp_path, monkeypatch):
    """A weights cache that already holds the golden export (so no test exports again)."""
    import shutil

    from napari_mobilesam.runtime import EXPORTER_VERSION
    from napari_mobilesam.weights import sha256_file

    cache = tmp_path / "cache"
    key = sha256_file(GOLDEN_CKPT)[:16]
    shutil.copytree(golden_onnx_dir, cache / "onnx" / f"{key}-v{EXPORTER_VERSION}")
    monkeypatch.setenv("MOBILESAM_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Benchmarks and some tests set torch's thread count; never let it leak into later
    tests (one leaked ``set_num_threads(1)`` made the rest of the suite ~1.6x slower)."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """One torch thread for the test (small models: a second thread only adds contention
    on a shared machine); :func:`_restore_torch_threads` restores the count after it."""
    torch.set_num_threads(1)


@pytest.fixture
def encoder_calls(monkeypatch) -> list[int]:
    """Images run through any engine's encoder, one entry (the batch size) per call."""
    from napari_mobilesam.engine.engine import Engine

    calls: list[int] = []
    real = Engine.embed

    def counted(self, frames, sizes):
        calls.append(len(frames))
        return real(self, frames, sizes)

    monkeypatch.setattr(Engine, "embed", counted)
    return calls


@pytest.fixture
def isolated():
    """Undo the sys.path entry and the modules that loading the original code adds.

    (``benchmarks/original.py`` imports torchvision with a stand-in NMS kernel; later
    tests, the ONNX exporter among them, must not see it.)
    """
    path, modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if name.split(".")[0] in ("torchvision", "segment_anything", "mobile_sam"):
            del sys.modules[name]


# -- widget tests (the module-level skip and waits: tests/widget_support.py) ------------


def _serve(predictor, monkeypatch):
    from napari_mobilesam._widgets import _common

    monkeypatch.setattr(_common, "get_predictor", lambda *a, **k: predictor)
    return predictor


@pytest.fixture
def tiny_predictor(tiny_model, monkeypatch):
    """The widgets' predictor: the tiny model (its point masks are empty)."""
    from napari_mobilesam.predictor import Predictor

    return _serve(Predictor(tiny_model), monkeypatch)


@pytest.fixture
def golden_predictor(golden_model, monkeypatch):
    """The widgets' predictor: the golden checkpoint (real size, random values; its point
    masks are not empty)."""
    from napari_mobilesam.predictor import Predictor

    return _serve(Predictor(golden_model), monkeypatch)


@pytest.fixture
def notes(monkeypatch):
    """The messages the widgets show with ``show_info``, in order."""
    from napari_mobilesam._widgets import (
        _commit,
        _common,
        _everything,
        _input,
        _multi,
        _prompt,
        _stacks,
    )

    shown: list[str] = []
    for module in (_common, _prompt, _commit, _everything, _stacks, _input, _multi):
        monkeypatch.setattr(module, "show_info", shown.append)
    return shown


@pytest.fixture
def embed_cli(tmp_path, tiny_model, monkeypatch):
    """``mobilesam embed`` with the tiny model; returns (run, encoder call counter)."""
    from napari_mobilesam import build
    from napari_mobilesam.cli import main
    from napari_mobilesam.predictor import Predictor

    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"tiny weights")
    tiny_model.model_name, tiny_model.checkpoint_path = "vit_t", weights
    calls = []

    def load_model(name, checkpoint, device=None):
        assert (name, checkpoint) == ("vit_t", weights)
        return tiny_model

    monkeypatch.setattr(build, "load_model", load_model)
    real = Predictor.embed_images

    def counted(self, images, batch_size=8, **kwargs):
        out = real(self, images, batch_size, **kwargs)
        calls.append(len(out))
        return out

    monkeypatch.setattr(Predictor, "embed_images", counted)

    def run(*args):
        return main(["embed", *map(str, args), "--weights", str(weights), "--device", "cpu"])

    return run, calls


@pytest.fixture
def tiny_cli(tiny_model, tmp_path, monkeypatch):
    """``mobilesam-everything`` in-process with the tiny model; returns run(args) -> exit
    status."""
    from mobilesam_batch import cli, segment

    monkeypatch.setattr(segment.ModelSpec, "load", lambda self: tiny_model)
    segment._SEGMENTERS.clear()
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"stand-in for the tiny model's weights")

    def run(args):
        return cli.main([*args, "--weights", str(weights), "--device", "cpu", "-q"])

    yield run
    segment._SEGMENTERS.clear()
