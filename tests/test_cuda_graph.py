"""CudaGraphEncoder: when it records and replays, and its fallbacks.

CUDA graphs need a GPU; here the recording is a stand-in (``record=``) that runs the
module on replay, on CPU inputs (``device_types=``), so the bookkeeping (keys, copies,
eviction, failure) is tested on the CPU. benchmarks/gpu.py checks the real recordings
against eager on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_mobilesam.engine.cuda_graphs import CudaGraphEncoder
from napari_mobilesam.predictor import Predictor


class _Recorder:
    """Stands in for record_cuda_graph: a "replay" runs the forward on the static input."""

    def __init__(self):
        self.shapes, self.replays = [], []

    def __call__(self, forward, static_in, warmup):
        static_out = torch.empty_like(forward(static_in))
        count = {"replays": 0}

        def replay():
            static_out.copy_(forward(static_in))
            count["replays"] += 1

        self.shapes.append(tuple(static_in.shape))
        self.replays.append(count)
        return replay, static_out


@pytest.fixture
def graphed():
    encoder = nn.Conv2d(3, 4, 2, stride=2).eval()
    recorder = _Recorder()
    wrapper = CudaGraphEncoder(encoder, max_graphs=2, record=recorder, device_types=("cpu",))
    return encoder, wrapper, recorder


def test_replays_one_recording_per_shape_and_returns_copies(graphed):
    encoder, wrapper, recorder = graphed
    a, b = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        out_a = wrapper(a)
        out_b = wrapper(b)
        torch.testing.assert_close(out_a, encoder(a))
        torch.testing.assert_close(out_b, encoder(b))
    assert recorder.shapes == [(1, 3, 8, 8)]  # recorded once, replayed for b
    assert out_a.data_ptr() != out_b.data_ptr()  # not the recording's buffer
    assert recorder.replays[0]["replays"] == 2


def test_new_recordings_for_batch_size_and_precision_oldest_dropped(graphed):
    _, wrapper, recorder = graphed
    with torch.no_grad():
        wrapper(torch.randn(1, 3, 8, 8))
        wrapper(torch.randn(2, 3, 8, 8))
        wrapper(torch.randn(1, 3, 8, 8), torch.bfloat16)  # another precision: recorded
    assert recorder.shapes == [(1, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    assert wrapper.n_graphs == 2  # max_graphs: the first one was dropped
    with torch.no_grad():
        wrapper(torch.randn(1, 3, 8, 8))
    assert len(recorder.shapes) == 4  # so it is recorded again


def test_moved_weights_make_a_new_recording(graphed):
    encoder, wrapper, recorder = graphed
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        wrapper(x)
        encoder.weight.data = encoder.weight.data.clone()  # new storage, as .to() gives
        torch.testing.assert_close(wrapper(x), encoder(x))
    assert len(recorder.shapes) == 2


def test_failed_recording_warns_once_and_stays_eager():
    encoder = nn.Conv2d(3, 4, 2, stride=2).eval()

    def broken(forward, static_in, warmup):
        raise RuntimeError("operation not permitted when stream is capturing")

    wrapper = CudaGraphEncoder(encoder, record=broken, device_types=("cpu",))
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


def test_large_batches_are_not_recorded():
    wrapper = CudaGraphEncoder(nn.Identity(), max_batch=4, device_types=("cpu",))
    x = torch.zeros(4, 3, 8, 8)
    with torch.no_grad():
        assert wrapper.applies(x)
        assert not wrapper.applies(torch.zeros(5, 3, 8, 8))  # eager: launches overlap work
        assert not CudaGraphEncoder(nn.Identity(), max_batch=2, device_types=("cpu",)).applies(x)


def test_predictor_uses_graphs_only_on_cuda(tiny_model):
    pred = Predictor(tiny_model)
    assert pred.engine.encoder.graphs is None and not pred.uses_cuda_graphs  # CPU model
    assert "CUDA graphs" not in pred.describe()
    assert not Predictor(tiny_model, cuda_graphs=False).uses_cuda_graphs
