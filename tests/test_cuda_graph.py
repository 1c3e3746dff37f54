"""CudaGraphEncoder: when it records and replays, and its fallbacks.

CUDA graphs need a GPU; here the recording is replaced by a stand-in that runs the
module on replay, so the bookkeeping (keys, copies, eviction, failure) is tested on
the CPU. benchmarks/gpu.py checks the real recordings against eager on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_mobilesam.predictor import Predictor
from napari_mobilesam.runtime import CudaGraphEncoder


class _Replay:
    """Stands in for torch.cuda.CUDAGraph: replay() runs the module on the static input."""

    def __init__(self, fn, static_in, static_out):
        self.fn, self.static_in, self.static_out = fn, static_in, static_out
        self.replays = 0

    def replay(self):
        self.static_out.copy_(self.fn(self.static_in))
        self.replays += 1


@pytest.fixture
def graphed(monkeypatch):
    encoder = nn.Conv2d(3, 4, 2, stride=2).eval()
    wrapper = CudaGraphEncoder(encoder, max_graphs=2)
    records = []

    def record(x, dtype):
        with torch.inference_mode():
            static_in = x.clone()
            static_out = torch.empty_like(wrapper._eager(static_in, dtype))
        entry = (_Replay(lambda t: wrapper._eager(t, dtype), static_in, static_out),
                 static_in, static_out)  # fmt: skip
        records.append((tuple(x.shape), dtype))
        return entry

    monkeypatch.setattr(wrapper, "_record", record)
    monkeypatch.setattr(wrapper, "applies", lambda x: True)
    return encoder, wrapper, records


def test_replays_one_recording_per_shape_and_returns_copies(graphed):
    encoder, wrapper, records = graphed
    a, b = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        out_a = wrapper(a)
        out_b = wrapper(b)
        torch.testing.assert_close(out_a, encoder(a))
        torch.testing.assert_close(out_b, encoder(b))
    assert records == [((1, 3, 8, 8), None)]  # recorded once, replayed for b
    assert out_a.data_ptr() != out_b.data_ptr()  # not the recording's buffer
    graph = next(iter(wrapper._graphs.values()))[0]
    assert graph.replays == 2


def test_new_recordings_for_batch_size_and_precision_oldest_dropped(graphed):
    _, wrapper, records = graphed
    with torch.no_grad():
        wrapper(torch.randn(1, 3, 8, 8))
        wrapper(torch.randn(2, 3, 8, 8))
        wrapper(torch.randn(1, 3, 8, 8), torch.bfloat16)
    assert [r for r in records] == [((1, 3, 8, 8), None), ((2, 3, 8, 8), None),
                                    ((1, 3, 8, 8), torch.bfloat16)]  # fmt: skip
    assert wrapper.n_graphs == 2  # max_graphs: the first one was dropped
    with torch.no_grad():
        wrapper(torch.randn(1, 3, 8, 8))
    assert len(records) == 4  # so it is recorded again


def test_moved_weights_make_a_new_recording(graphed):
    encoder, wrapper, records = graphed
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        wrapper(x)
        encoder.weight.data = encoder.weight.data.clone()  # new storage, as .to() gives
        torch.testing.assert_close(wrapper(x), encoder(x))
    assert len(records) == 2


def test_failed_recording_warns_once_and_stays_eager(monkeypatch):
    encoder = nn.Conv2d(3, 4, 2, stride=2).eval()
    wrapper = CudaGraphEncoder(encoder)

    def broken(x, dtype):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(wrapper, "_record", broken)
    monkeypatch.setattr(wrapper, "applies", lambda x: wrapper.failed is None)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="recording .* failed"):
        out = wrapper(x)
    torch.testing.assert_close(out, encoder(x))
    assert "not permitted" in wrapper.failed
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), encoder(x))  # no second warning (pytest
    assert wrapper.n_graphs == 0  # turns warnings into errors only when configured)


def test_cpu_and_autograd_run_eagerly():
    encoder = nn.Conv2d(3, 4, 2, stride=2).eval()
    wrapper = CudaGraphEncoder(encoder)
    x = torch.randn(1, 3, 8, 8)
    assert not wrapper.applies(x)  # a CPU tensor
    out = wrapper(x, torch.bfloat16)
    assert out.dtype == torch.float32 and out.requires_grad  # autograd kept
    assert wrapper.n_graphs == 0


@pytest.mark.parametrize("name", ["max_graphs", "max_batch"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_limits_must_be_positive_ints(name, bad):
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        CudaGraphEncoder(nn.Identity(), **{name: bad})


def test_large_batches_are_not_recorded(monkeypatch):
    wrapper = CudaGraphEncoder(nn.Identity(), max_batch=4)
    x = torch.zeros(4, 3, 8, 8)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with torch.no_grad():
        assert wrapper.applies(x)
        assert not wrapper.applies(torch.zeros(5, 3, 8, 8))  # eager: launches overlap work
        assert not CudaGraphEncoder(nn.Identity(), max_batch=2).applies(x)


def test_predictor_uses_graphs_only_on_cuda(tiny_model):
    pred = Predictor(tiny_model)
    assert pred._graphed is not None and not pred.uses_cuda_graphs  # CPU model
    assert "CUDA graphs" not in pred.describe()
    assert Predictor(tiny_model, cuda_graphs=False)._graphed is None
