"""The GPU paths that run on a CPU too: the device resize, the 16-bit grid decoder and
the memory-sized decoder passes (benchmarks/gpu.py measures them on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mobilesam.engine import Engine, EngineOptions, Prompts, frames, make_engine
from napari_mobilesam.engine.reduced import ReducedDecoder
from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.predictor import Predictor


def _image(rng, size=(90, 61)):
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def test_device_resize_gives_the_same_embedding(tiny_model, rng, monkeypatch):
    image = _image(rng)
    host = Predictor(tiny_model)
    host.set_image(image)
    assert host.engine.frames.resize is None  # a CPU: Pillow on the host
    engine = make_engine(tiny_model, options=EngineOptions(device_resize=True))  # as on CUDA
    calls = []
    resize = engine.frames.resize
    monkeypatch.setattr(engine.frames, "resize", lambda t: calls.append(1) or resize(t))
    dev = Predictor(engine)
    dev.set_image(image)
    assert calls and dev.input_size == host.input_size
    torch.testing.assert_close(dev.features, host.features, rtol=0, atol=0)
    # very large images stay with Pillow on the host
    monkeypatch.setattr(frames, "DEVICE_RESIZE_PIXELS", 100)
    dev.set_image(image)
    assert len(calls) == 1


def _grid(n=16):
    side = int(np.sqrt(n))
    xy = torch.stack(torch.meshgrid(torch.linspace(4, 60, side), torch.linspace(4, 60, side),
                                    indexing="xy"), -1).reshape(-1, 1, 2)  # fmt: skip
    return Prompts(xy, torch.ones(len(xy), 1, dtype=torch.int64))


def test_grid_decoder_is_16_bits_only_with_reduced_precision(tiny_model):
    assert not isinstance(Predictor(tiny_model).engine.grid_decoder, ReducedDecoder)
    with pytest.warns(RuntimeWarning, match="fp16"):
        fp16 = Predictor(tiny_model, precision="fp16").engine.grid_decoder
    bf16 = Predictor(tiny_model, precision="bf16").engine.grid_decoder
    assert bf16.dtype == torch.bfloat16 and bf16.bits == 16  # on a CPU, also for fp16
    assert next(bf16.reduced().parameters()).dtype == torch.bfloat16
    assert fp16.dtype == torch.bfloat16
    assert fp16.reduced() is fp16.reduced()  # made once


def test_grid_decoded_in_16_bits_is_close_to_float32(tiny_model, rng):
    fp32 = Predictor(tiny_model)
    fp32.set_image(_image(rng, (64, 64)))
    features = fp32.features  # the same embedding: compare the decoders alone
    low = Predictor(tiny_model, precision="bf16").engine.grid_decoder
    ref_dec = fp32.engine.grid_decoder
    with torch.inference_mode():
        ref = ref_dec.decode(ref_dec.prepare(features), _grid())
        got = low.decode(low.prepare(features), _grid())
    assert got.low_res.dtype == got.iou.dtype == torch.float32
    assert torch.equal(got.rows, ref.rows)
    scale = ref.low_res.abs().max()
    assert (got.low_res - ref.low_res).abs().max() <= 0.05 * scale
    assert (got.iou - ref.iou).abs().max() <= 0.05


def test_overflowing_16_bit_decoder_falls_back_to_float32(tiny_model, rng):
    fp32 = Predictor(tiny_model)
    fp32.set_image(_image(rng, (64, 64)))
    low = Predictor(tiny_model, precision="bf16").engine.grid_decoder
    with torch.no_grad():
        low.reduced().output_upscaling[0].weight.fill_(float("inf"))  # every logit overflows
    ref_dec = fp32.engine.grid_decoder
    with torch.inference_mode():
        got = low.decode(low.prepare(fp32.features), _grid(), min_iou=0.0)
        ref = ref_dec.decode(ref_dec.prepare(fp32.features), _grid(), min_iou=0.0)
    torch.testing.assert_close(got.low_res, ref.low_res)
    torch.testing.assert_close(got.iou, ref.iou)
    assert torch.equal(got.rows, ref.rows)


def test_prompts_per_pass_follow_free_gpu_memory(tiny_model, monkeypatch):
    gen = MaskGenerator(tiny_model, points_per_side=32, points_per_batch=64, mode="device",
                        nms="box")  # fmt: skip
    assert gen.pipeline.prompts_per_pass(1024) == 64  # a CPU: points_per_batch
    monkeypatch.setattr(Engine, "device", property(lambda self: torch.device("cuda")))
    free = {"bytes": 10 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 0))
    policy = gen.pipeline.engine.policy
    expect = int(policy.gpu_memory_fraction * free["bytes"]) // policy.gpu_prompt_bytes
    assert gen.pipeline.prompts_per_pass(1024) == expect  # 128 on 10 GiB
    assert gen.pipeline.prompts_per_pass(100) == 100  # never more than the grid
    free["bytes"] = 2**30
    assert gen.pipeline.prompts_per_pass(1024) == 64  # never fewer than points_per_batch
    free["bytes"] = 200 * 2**30
    assert gen.pipeline.prompts_per_pass(1024) == 1024  # a large card: one pass
    low = MaskGenerator(tiny_model, points_per_side=32, mode="fast", precision="bf16")
    free["bytes"] = 10 * 2**30
    assert low.pipeline.prompts_per_pass(1024) == 2 * expect  # 16-bit decoding: half the memory
    ref = MaskGenerator(tiny_model, points_per_side=32, mode="reference", nms="box")
    assert ref.pipeline.prompts_per_pass(1024) == 64


def test_auto_mode_picks_the_gpu_path_on_a_gpu(tiny_model, monkeypatch):
    cpu = MaskGenerator(tiny_model)
    assert (cpu.mode, cpu.nms) == ("fast", "mask")
    assert MaskGenerator(tiny_model, nms="box").mode == "fast"
    assert MaskGenerator(tiny_model, mode="reference").nms == "box"
    monkeypatch.setattr(Engine, "device", property(lambda self: torch.device("cuda")))
    gpu = MaskGenerator(tiny_model)
    assert (gpu.mode, gpu.nms) == ("device", "box")
    assert MaskGenerator(tiny_model, nms="mask").mode == "fast"  # only fast mode has mask NMS
    assert MaskGenerator(tiny_model, mode="fast").nms == "mask"
