"""The GPU paths that run on a CPU too: the device resize, the 16-bit grid decoder and
the memory-sized decoder passes (benchmarks/gpu.py measures them on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mobilesam import predictor as P
from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.everything import generator as G
from napari_mobilesam.predictor import Predictor


def _image(rng, size=(90, 61)):
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def test_device_resize_gives_the_same_embedding(tiny_model, rng, monkeypatch):
    image = _image(rng)
    host = Predictor(tiny_model)
    host.set_image(image)
    monkeypatch.setattr(P, "_DEVICE_RESIZE", ("cpu",))  # what CUDA devices do
    calls = []
    real = P.resize_longest_side_torch
    monkeypatch.setattr(P, "resize_longest_side_torch", lambda *a: calls.append(1) or real(*a))
    dev = Predictor(tiny_model)
    dev.set_image(image)
    assert calls and dev.input_size == host.input_size
    torch.testing.assert_close(dev.features, host.features, rtol=0, atol=0)
    # very large images stay with Pillow on the host
    monkeypatch.setattr(P, "_DEVICE_RESIZE_PIXELS", 100)
    dev.set_image(image)
    assert len(calls) == 1


def _grid(n=16):
    side = int(np.sqrt(n))
    xy = torch.stack(torch.meshgrid(torch.linspace(4, 60, side), torch.linspace(4, 60, side),
                                    indexing="xy"), -1).reshape(-1, 1, 2)  # fmt: skip
    return xy, torch.ones(len(xy), 1, dtype=torch.int64)


def test_reduced_decoder_only_with_reduced_precision(tiny_model):
    assert Predictor(tiny_model).reduced_decoder() == (None, None)
    with pytest.warns(RuntimeWarning, match="fp16"):
        fp16 = Predictor(tiny_model, precision="fp16")
    dec, dtype = Predictor(tiny_model, precision="bf16").reduced_decoder()
    assert dtype == torch.bfloat16  # on a CPU, also for fp16 (no fast fp16 kernels)
    assert next(dec.parameters()).dtype == torch.bfloat16
    assert fp16.reduced_decoder()[1] == torch.bfloat16
    assert fp16.reduced_decoder()[0] is fp16.reduced_decoder()[0]  # made once


def test_grid_decoded_in_16_bits_is_close_to_float32(tiny_model, rng):
    image = _image(rng, (64, 64))
    fp32, bf16 = Predictor(tiny_model), Predictor(tiny_model, precision="bf16")
    for pred in (fp32, bf16):
        pred.set_image(image)
    bf16.features = fp32.features  # the same embedding: compare the decoders alone
    bf16._decoder_caches.clear()
    coords, labels = _grid()
    with torch.inference_mode():
        ref, ref_iou, ref_rows = G._decode(fp32, coords, labels, None)
        low, iou, rows = G._decode(bf16, coords, labels, None)
    assert low.dtype == iou.dtype == torch.float32
    assert torch.equal(rows, ref_rows)
    scale = ref.abs().max()
    assert (low - ref).abs().max() <= 0.05 * scale
    assert (iou - ref_iou).abs().max() <= 0.05


def test_overflowing_16_bit_decoder_falls_back_to_float32(tiny_model, rng, monkeypatch):
    image = _image(rng, (64, 64))
    pred = Predictor(tiny_model, precision="bf16")
    pred.set_image(image)
    fp32 = Predictor(tiny_model)
    fp32.features, fp32.original_size, fp32.input_size = (
        pred.features, pred.original_size, pred.input_size)  # fmt: skip
    fp32.is_image_set = True
    dec = pred.reduced_decoder()[0]
    with torch.no_grad():
        dec.output_upscaling[0].weight.fill_(float("inf"))  # every mask logit overflows
    coords, labels = _grid()
    with torch.inference_mode():
        low, iou, rows = G._decode(pred, coords, labels, 0.0)
        ref, ref_iou, ref_rows = G._decode(fp32, coords, labels, 0.0)
    torch.testing.assert_close(low, ref)
    torch.testing.assert_close(iou, ref_iou)
    assert torch.equal(rows, ref_rows)


def test_prompts_per_pass_follow_free_gpu_memory(tiny_model, monkeypatch):
    gen = MaskGenerator(tiny_model, points_per_side=32, points_per_batch=64, mode="device",
                        nms="box")  # fmt: skip
    assert gen._prompts_per_pass(1024) == 64  # a CPU: points_per_batch
    monkeypatch.setattr(Predictor, "device", property(lambda self: torch.device("cuda")))
    free = {"bytes": 10 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 0))
    expect = int(0.6 * free["bytes"]) // G.PROMPT_BYTES_FP32
    assert gen._prompts_per_pass(1024) == expect  # 128 on 10 GiB
    assert gen._prompts_per_pass(100) == 100  # never more than the grid
    free["bytes"] = 2**30
    assert gen._prompts_per_pass(1024) == 64  # never fewer than points_per_batch
    free["bytes"] = 200 * 2**30
    assert gen._prompts_per_pass(1024) == 1024  # a large card: one pass
    low = MaskGenerator(tiny_model, points_per_side=32, mode="fast", precision="bf16")
    free["bytes"] = 10 * 2**30
    assert low._prompts_per_pass(1024) == 2 * expect  # 16-bit decoding: half the memory
    ref = MaskGenerator(tiny_model, points_per_side=32, mode="reference", nms="box")
    assert ref._prompts_per_pass(1024) == 64


def test_auto_mode_picks_the_gpu_path_on_a_gpu(tiny_model, monkeypatch):
    cpu = MaskGenerator(tiny_model)
    assert (cpu.mode, cpu.nms) == ("fast", "mask")
    assert MaskGenerator(tiny_model, nms="box").mode == "fast"
    assert MaskGenerator(tiny_model, mode="reference").nms == "box"
    monkeypatch.setattr(Predictor, "device", property(lambda self: torch.device("cuda")))
    gpu = MaskGenerator(tiny_model)
    assert (gpu.mode, gpu.nms) == ("device", "box")
    assert MaskGenerator(tiny_model, nms="mask").mode == "fast"  # only fast mode has mask NMS
    assert MaskGenerator(tiny_model, mode="fast").nms == "mask"
