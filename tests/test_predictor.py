"""Predictor contract on a tiny random model: shapes, errors, batching, caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mobilesam.engine import frames
from napari_mobilesam.engine import precision as precision_module
from napari_mobilesam.engine.policy import Policy
from napari_mobilesam.predictor import ImageEmbedding, Predictor, resolve_precision

from .conftest import GOLDEN, requires_golden


@pytest.fixture
def image(rng):
    return rng.integers(0, 256, size=(90, 70, 3), dtype=np.uint8)


@pytest.fixture
def pred(tiny_model, image):
    p = Predictor(tiny_model)
    p.set_image(image)
    return p


POINTS = np.array([[10.0, 20.0], [40.5, 60.0]])
LABELS = np.array([1, 0])
BOX = np.array([5.0, 8.0, 50.0, 80.0])


def test_shapes_and_dtypes(pred):
    masks, scores, low_res = pred.predict(POINTS, LABELS)
    assert masks.shape == (3, 90, 70) and masks.dtype == np.bool_
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert low_res.shape == (3, 32, 32) and low_res.dtype == np.float32
    masks, scores, low_res = pred.predict(box=BOX, multimask_output=False)
    assert masks.shape == (1, 90, 70) and scores.shape == (1,)
    logits, _, _ = pred.predict(POINTS, LABELS, return_logits=True)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits > 0, pred.predict(POINTS, LABELS)[0])


def test_no_prompt_is_allowed(pred):
    masks, _, _ = pred.predict()
    assert masks.shape == (3, 90, 70)


def test_before_set_image(tiny_model):
    p = Predictor(tiny_model)
    for call in (
        lambda: p.predict(POINTS, LABELS),
        lambda: p.predict_batch(boxes=BOX[None]),
        lambda: p.predict_torch(None, None),
        p.get_image_embedding,
        p.get_embedding,
    ):
        with pytest.raises(RuntimeError, match="call set_image"):
            call()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"point_coords": POINTS}, "point_coords given without point_labels"),
        ({"point_labels": LABELS}, "point_labels given without point_coords"),
        (
            {"point_coords": POINTS[0], "point_labels": LABELS},
            r"point_coords must have shape \(N, 2\)",
        ),
        ({"point_coords": np.zeros((0, 2)), "point_labels": np.zeros(0)}, "point_coords must"),
        ({"point_coords": POINTS, "point_labels": [1]}, "point_labels must have shape"),
        (
            {"point_coords": POINTS, "point_labels": [1, 2]},
            r"point_labels must be 1 .* got \[2\.0\]",
        ),
        ({"point_coords": POINTS, "point_labels": [1, -1]}, "point_labels must be 1"),
        ({"point_coords": [[np.nan, 1.0]], "point_labels": [1]}, "point_coords contains NaN"),
        ({"point_coords": [["a", "b"]], "point_labels": [1]}, "point_coords must be numeric"),
        ({"box": [10, 10, 5, 20]}, r"box must be XYXY with x1 >= x0 and y1 >= y0"),
        ({"box": [10, 30, 20, 20]}, "box must be XYXY"),
        ({"box": [0, 0, 10]}, r"box must have shape \(4,\)"),
        ({"box": [0, 0, np.inf, 10]}, "box contains NaN or infinite"),
        ({"mask_input": np.zeros((32, 32))}, r"mask_input must have shape \(1, 32, 32\)"),
        ({"mask_input": np.zeros((1, 256, 256))}, "mask_input must have shape"),
        ({"mask_input": np.full((1, 32, 32), np.nan)}, "mask_input contains NaN"),
    ],
)
def test_malformed_prompts(pred, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pred.predict(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"point_coords": POINTS, "point_labels": LABELS}, r"shape \(B, N, 2\)"),
        ({"boxes": BOX}, r"boxes must have shape \(B, 4\)"),
        ({"boxes": np.array([[5.0, 5.0, 1.0, 9.0]])}, "boxes must be XYXY"),
        (
            {
                "boxes": np.stack([BOX] * 3),
                "point_coords": np.stack([POINTS] * 2),
                "point_labels": np.stack([LABELS] * 2),
            },
            "prompt batch sizes differ",
        ),
        ({"mask_input": np.zeros((2, 32, 32))}, r"mask_input must have shape \(B, 1, 32, 32\)"),
        ({"mask_input": np.zeros((0, 1, 32, 32))}, "mask_input must have shape"),
    ],
)
def test_malformed_batch_prompts(pred, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pred.predict_batch(**kwargs)


def test_bad_arguments(tiny_model, image):
    with pytest.raises(TypeError, match="Sam model, a registry name or an Engine"):
        Predictor(object())
    with pytest.raises(ValueError, match="an Engine comes with its device, backend"):
        Predictor(Predictor(tiny_model).engine, precision="bf16")
    p = Predictor(tiny_model)
    with pytest.raises(ValueError, match="image_format must be 'RGB' or 'BGR'"):
        p.set_image(image, image_format="RGBA")
    with pytest.raises(ValueError, match=r"\(1, 3, h, w\) tensor with max\(h, w\) = 128"):
        p.set_torch_image(torch.zeros(1, 3, 64, 64), (64, 64))
    with pytest.raises(TypeError, match="must be an ImageEmbedding"):
        p.set_embedding(torch.zeros(1, 32, 8, 8))
    with pytest.raises(ValueError, match=r"needs \(1, C, 8, 8\)"):
        p.set_embedding(ImageEmbedding(torch.zeros(1, 32, 4, 4), (10, 10), (128, 128)))


def test_bgr_equals_reversed_rgb(tiny_model, image):
    a, b = Predictor(tiny_model), Predictor(tiny_model)
    a.set_image(image)
    b.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    torch.testing.assert_close(a.get_image_embedding(), b.get_image_embedding(), rtol=0, atol=0)


def test_embedding_round_trip(pred, tiny_model):
    emb = pred.get_embedding()
    assert emb.original_size == (90, 70) and emb.input_size == (128, 100)
    other = Predictor(tiny_model)
    other.set_embedding(emb.to("cpu"))
    for a, b in zip(pred.predict(POINTS, LABELS), other.predict(POINTS, LABELS), strict=True):
        np.testing.assert_array_equal(a, b)
    pred.reset_image()
    assert not pred.is_image_set


def _one_by_one(pred, coords=None, labels=None, boxes=None, masks_in=None, multimask=True):
    n = next(len(a) for a in (coords, boxes, masks_in) if a is not None)
    outs = [
        pred.predict(
            None if coords is None else coords[i],
            None if labels is None else labels[i],
            None if boxes is None else boxes[i],
            None if masks_in is None else masks_in[i],
            multimask_output=multimask,
            return_logits=True,
        )
        for i in range(n)
    ]
    return [np.stack(x) for x in zip(*outs, strict=True)]


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", ["points", "boxes", "points+boxes", "boxes+masks"])
def test_batch_equals_one_by_one(pred, rng, kind, multimask):
    b = 5
    coords = rng.uniform(0, 70, size=(b, 3, 2)) if "points" in kind else None
    labels = rng.integers(0, 2, size=(b, 3)) if "points" in kind else None
    xy = rng.uniform(0, 40, size=(b, 2))
    boxes = (
        np.concatenate([xy, xy + rng.uniform(5, 30, size=(b, 2))], 1) if "boxes" in kind else None
    )
    masks_in = rng.normal(size=(b, 1, 32, 32)) if "masks" in kind else None
    batch = pred.predict_batch(coords, labels, boxes, masks_in, multimask, return_logits=True)
    single = _one_by_one(pred, coords, labels, boxes, masks_in, multimask)
    for got, want in zip(batch, single, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shared_embedding_equals_per_prompt_copy(pred, rng):
    """The broadcast (no copy) decoder path equals the reference's repeat path."""
    model = pred.model
    coords = torch.as_tensor(rng.uniform(0, 100, size=(4, 2, 2)), dtype=torch.float32)
    labels = torch.ones(4, 2, dtype=torch.int64)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder((coords, labels), None, None)
        assert dense.shape[0] == 1  # no per-prompt copy of the "no mask" embedding
        pe = model.prompt_encoder.get_dense_pe()
        shared = model.mask_decoder(pred.features, pe, sparse, dense, True)
        copied = model.mask_decoder(
            pred.features.repeat(4, 1, 1, 1), pe, sparse, dense.repeat(4, 1, 1, 1), True
        )
    for a, b in zip(shared, copied, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_postprocess_chunking(pred, rng, monkeypatch):
    boxes = np.array([[0, 0, 30, 30], [10, 10, 60, 80], [5, 5, 6, 6]], dtype=float)
    want = pred.predict_batch(boxes=boxes, return_logits=True)[0]
    monkeypatch.setattr(frames, "POSTPROCESS_CHUNK", 1)
    got = pred.predict_batch(boxes=boxes, return_logits=True)[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(5, 3), (1, 200), (128, 128), (300, 40)])
def test_any_image_size(tiny_model, rng, shape):
    p = Predictor(tiny_model)
    p.set_image(rng.integers(0, 65535, size=shape, dtype=np.uint16))
    masks, _, _ = p.predict(np.array([[0.0, 0.0]]), np.array([1]))
    assert masks.shape == (3, *shape)


def test_decoder_cache_equals_recompute(pred, tiny_model, rng):
    plain = Predictor(tiny_model, decoder_cache=False)
    plain.set_embedding(pred.get_embedding())
    coords = rng.uniform(0, 70, size=(4, 2, 2))
    labels = rng.integers(0, 2, size=(4, 2))
    for got, want in zip(
        pred.predict_batch(coords, labels, return_logits=True),
        plain.predict_batch(coords, labels, return_logits=True),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# -- precision and batched embedding -------------------------------------------------


def test_precision_argument_checks(tiny_model):
    with pytest.raises(
        ValueError, match=r"precision must be one of \['auto', 'bf16', 'fp16', 'fp32'\]"
    ):
        Predictor(tiny_model, precision="int4")
    with pytest.raises(ValueError, match=r"precision must be one of"):
        resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="precision='bf16' needs backend='torch'"):
        Predictor(tiny_model, precision="bf16", backend="onnx")


def test_precision_auto_resolves_per_device(tiny_model, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: True)
    assert Predictor(tiny_model, precision="auto").precision == "bf16"
    assert Predictor(tiny_model, precision="auto", backend="auto").precision == "bf16"
    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: False)
    assert Predictor(tiny_model, precision="auto").precision == "fp32"
    assert resolve_precision("auto", "mps") == "fp32"
    assert resolve_precision("fp16", "cpu") == "fp16"
    for bf16, want in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert resolve_precision("auto", "cuda:0") == want


def test_precision_auto_with_a_numpy_backend_is_fp32(tiny_model, monkeypatch):
    from napari_mobilesam.runtime import TorchBackend

    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: True)
    pred = Predictor(tiny_model, precision="auto", backend=TorchBackend(tiny_model))
    assert pred.precision == "fp32"
    with pytest.raises(ValueError, match="precision='bf16' needs backend='torch'"):
        Predictor(tiny_model, precision="bf16", backend=TorchBackend(tiny_model))


def test_cpu_has_bf16_reads_the_flags(tmp_path):
    from napari_mobilesam.predictor import cpu_has_bf16

    read = cpu_has_bf16.__wrapped__  # (the real one is cached per process)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert read(str(info)) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_tile amx_bf16\n")
    assert read(str(info)) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw\n")
    assert read(str(info)) is False
    info.write_text("processor\t: 0\n")  # no flags line (not x86)
    assert read(str(info)) is False
    assert read(str(tmp_path / "missing")) is False  # not Linux
    assert isinstance(cpu_has_bf16(), bool)


def test_describe_says_what_runs(tiny_model):
    threads = Policy().describe_threads(torch.device("cpu"))  # "N threads[ (adaptive)]"
    assert threads.startswith(f"{torch.get_num_threads()} threads")
    assert Predictor(tiny_model).describe() == f"cpu: torch, {threads}, fp32"
    pred = Predictor(tiny_model, precision="bf16")
    assert pred.describe() == f"cpu: torch, {threads}, bf16"


def test_fp16_on_a_cpu_warns(tiny_model):
    with pytest.warns(RuntimeWarning, match="fp16' on a CPU is very slow"):
        pred = Predictor(tiny_model, precision="fp16")
    assert pred.precision == "fp16"


def test_bf16_on_a_cpu_without_bf16_units_warns(tiny_model, monkeypatch):
    import warnings

    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="without bfloat16 units .* much slower"):
        pred = Predictor(tiny_model, precision="bf16")
    assert pred.precision == "bf16"
    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Predictor(tiny_model, precision="bf16")


@pytest.mark.slow
def test_embed_images_batched_equals_one_by_one(golden_model, rng):
    """Batches through the encoder (a full one and a partial one) give each image's own
    embedding and sizes; conversion options apply to every image, as in set_image."""
    rgb = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    gray = rng.integers(0, 4000, (50, 80), dtype=np.uint16)  # grayscale uint16
    images = [rgb, gray, np.ascontiguousarray(rgb[..., ::-1])]
    pred = Predictor(golden_model)
    embs = pred.embed_images(iter(images), batch_size=2)
    assert len(embs) == 3 and not pred.is_image_set
    for image, emb in zip(images, embs, strict=True):
        pred.set_image(image)
        assert emb.original_size == pred.original_size and emb.input_size == pred.input_size
        assert emb.features.shape == pred.features.shape and emb.features.dtype == torch.float32
        torch.testing.assert_close(emb.features, pred.features, rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        pred.embed_images(images, batch_size=0)
    (emb,) = pred.embed_images([rgb], image_format="BGR")  # the channels reversed
    torch.testing.assert_close(emb.features, embs[2].features, rtol=1e-4, atol=2e-5)
    (emb,) = pred.embed_images([gray], contrast_limits=(100, 900))
    pred.set_image(gray, contrast_limits=(100, 900))
    torch.testing.assert_close(emb.features, pred.features, rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="image_format must be 'RGB' or 'BGR'"):
        pred.embed_images(images, image_format="RGBA")


@pytest.mark.slow
@requires_golden
def test_bf16_encoder_keeps_golden_masks(golden_model):
    """Issue 8's accuracy bar for reduced precision: mask IoU >= 0.98 against float32 on
    every golden prompt (bf16 autocast on the CPU here; fp16 is checked by
    benchmarks/gpu.py on a GPU, measured 0.9998 mean on the CPU)."""
    import sys
    from pathlib import Path

    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_backends import _golden_calls, _iou

    fp32, bf16 = Predictor(golden_model), Predictor(golden_model, precision="bf16")
    ious = []
    with np.load(GOLDEN / "public_cases.npz") as npz:
        for name in ("photo", "micro"):
            image = np.asarray(Image.open(GOLDEN / f"images/public_{name}.png").convert("RGB"))
            fp32.set_image(image)
            bf16.set_image(image)
            assert bf16.features.dtype == torch.float32
            assert not torch.equal(bf16.features, fp32.features)  # autocast did something
            for _, method, kwargs in _golden_calls(npz, name):
                a = getattr(fp32, method)(**kwargs)[0]
                b = getattr(bf16, method)(**kwargs)[0]
                a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
                ious += [_iou(x, y) for x, y in zip(a, b, strict=True)]
    assert len(ious) == 50
    assert np.mean(ious) >= 0.98 and min(ious) >= 0.95, (np.mean(ious), min(ious))
