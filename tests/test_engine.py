"""napari_mobilesam.engine: the registry, a backend added from outside, one engine shared
by predictors and generators, and every public call from two threads at once."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from napari_mobilesam.engine import (
    Decoded,
    Decoder,
    Encoder,
    Engine,
    EngineOptions,
    Prompts,
    backend_names,
    make_engine,
    register_backend,
    unregister_backend,
)
from napari_mobilesam.everything import MaskGenerator
from napari_mobilesam.predictor import Predictor

# -- a backend added by a test: float64 copies of the model's own modules ----------------


class Float64Encoder(Encoder):
    """The image encoder of a float64 copy of the model."""

    name = "float64"

    def __init__(self, model):
        self.model = model
        self.calls = 0

    @torch.no_grad()
    def encode(self, x):
        self.calls += 1
        return self.model.image_encoder(x.double()).float()


class Float64Decoder(Decoder):
    """The prompt encoder and mask decoder of a float64 copy of the model."""

    name = "float64"

    def __init__(self, model):
        self.model = model

    def prepare(self, features):
        return features.double()

    @torch.no_grad()
    def decode(self, image, prompts, *, multimask=True, min_iou=None):
        pe = self.model.prompt_encoder
        points = None if prompts.coords is None else (prompts.coords.double(), prompts.labels)
        boxes = None if prompts.boxes is None else prompts.boxes.double()
        masks = None if prompts.masks is None else prompts.masks.double()
        sparse, dense = pe(points, boxes, masks)
        low_res, iou = self.model.mask_decoder(
            image, pe.get_dense_pe(), sparse.double(), dense, multimask
        )
        rows = torch.arange(len(iou))
        if min_iou is not None:
            rows = torch.nonzero((iou > min_iou).any(dim=1)).flatten()
        return Decoded(low_res[rows].float(), iou[rows].float(), rows)


def float64_engine(model, precision, options):
    if precision != "fp32":
        raise ValueError(f"precision={precision!r}: the float64 backend runs float64")
    double = copy.deepcopy(model).double()
    return Engine(model, Float64Encoder(double), Float64Decoder(double),
                  precision=precision, backend="float64", options=options)  # fmt: skip


@pytest.fixture
def float64_backend():
    register_backend("float64", float64_engine)
    yield "float64"
    unregister_backend("float64")


def _image(rng, shape=(90, 70)):
    return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)


ALL_PASS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def test_a_backend_registered_from_outside_runs_everywhere(tiny_model, rng, float64_backend):
    assert "float64" in backend_names()
    image = _image(rng)
    ours, ref = Predictor(tiny_model, backend="float64"), Predictor(tiny_model)
    assert ours.backend_name == "float64" and ours.describe().startswith("cpu: float64")
    for p in (ours, ref):
        p.set_image(image)
    assert ours.engine.encoder.calls == 1
    torch.testing.assert_close(ours.features, ref.features, rtol=1e-4, atol=1e-4)
    kw = {"point_coords": np.array([[30.0, 20.0]]), "point_labels": np.array([1]),
          "box": np.array([10, 5, 50, 60]), "return_logits": True}  # fmt: skip
    for got, want in zip(ours.predict(**kw), ref.predict(**kw), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    batch = ours.predict_batch(boxes=np.array([[0, 0, 30, 30], [10, 10, 60, 80]]))
    assert batch[0].shape == (2, 3, 90, 70)
    for mode in ("fast", "reference", "device"):
        gen = MaskGenerator(tiny_model, **ALL_PASS, mode=mode, nms="box", backend="float64")
        want = MaskGenerator(tiny_model, **ALL_PASS, mode=mode, nms="box").generate_labels(image)
        got = gen.generate_labels(image)
        assert gen.predictor.backend_name == "float64"
        assert np.mean(got == want) > 0.99, mode
    with pytest.raises(ValueError, match="the float64 backend runs float64"):
        Predictor(tiny_model, backend="float64", precision="bf16")
    assert Predictor(tiny_model, backend="float64", precision="auto").precision == "fp32"


def test_registry_errors(float64_backend):
    with pytest.raises(ValueError, match="'float64' is registered already"):
        register_backend("float64", float64_engine)
    register_backend("float64", float64_engine, replace=True)
    with pytest.raises(ValueError, match="non-empty str"):
        register_backend("", float64_engine)
    with pytest.raises(TypeError, match="factory must be callable"):
        register_backend("x", 3)
    with pytest.raises(KeyError):
        unregister_backend("never-registered")


def test_make_engine_errors(tiny_model):
    with pytest.raises(TypeError, match="model must be a Sam model, got Linear"):
        make_engine(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"backend must be 'torch', 'onnx' or 'auto'"):
        make_engine(tiny_model, "tensorrt")
    with pytest.raises(ValueError, match="precision must be one of"):
        make_engine(tiny_model, precision="int4")
    with pytest.raises(ValueError, match="onnx_folder and quantize need backend='onnx'"):
        make_engine(tiny_model, options=EngineOptions(quantize="int8"))


def test_prompts_rows_and_length():
    coords = torch.zeros(5, 2, 2)
    p = Prompts(coords, torch.ones(5, 2, dtype=torch.int64))
    assert len(p) == 5 and len(p.rows(1, 3)) == 2 and p.rows(1, 3).labels.shape == (2, 2)
    assert len(Prompts()) == 1  # no prompt at all: one empty prompt, as SAM's encoder does
    assert len(Prompts(masks=torch.zeros(3, 1, 8, 8))) == 3


def test_predictors_share_an_engine(tiny_model, rng):
    first = Predictor(tiny_model)
    second = Predictor(first.engine)
    assert second.engine is first.engine and second.model is tiny_model
    a, b = _image(rng), _image(rng, (64, 100))
    first.set_image(a)
    second.set_image(b)  # each predictor keeps its own image
    assert first.original_size == (90, 70) and second.original_size == (64, 100)


# -- threads ----------------------------------------------------------------------------------


def _run_in_threads(*jobs):
    errors = []

    def wrap(job):
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_one_predictor_from_two_threads_equals_one_thread(tiny_model, rng, mode):
    """The two napari widgets' pattern on one shared predictor: prompts on image A from one
    thread, segment-everything on image B from another, and both setting their own image
    (under the predictor's lock) on each call. Every result equals a single-thread run."""
    a, b = _image(rng), _image(rng, (64, 100))
    pred = Predictor(tiny_model)
    gen = MaskGenerator(pred, **ALL_PASS, mode=mode, nms="box")
    points = [np.array([[x, y]], float) for x, y in rng.uniform(0, 60, (12, 2))]
    boxes = np.array([[0, 0, 30, 30], [10, 10, 60, 80], [5, 5, 6, 6]], float)

    def prompts(image):
        pred.set_image(image)
        out = [pred.predict(p, np.array([1]), return_logits=True) for p in points]
        return [*out, pred.predict_batch(boxes=boxes, return_logits=True)]

    want_a, want_b = prompts(a), prompts(b)
    want_labels, want_records = gen.generate_labels(b), gen.generate(a)
    pred.set_image(a)
    got: dict[str, list] = {"a": [], "b": [], "labels": [], "records": []}

    def prompt_thread():
        for _ in range(3):
            got["a"].append([pred.predict(p, np.array([1]), return_logits=True) for p in points])
            with pred.lock:  # set an image and decode against it, as one step
                pred.set_image(b)
                got["b"].append(prompts(b))
                pred.set_image(a)

    def everything_thread():
        for _ in range(3):
            got["labels"].append(gen.generate_labels(b))
            got["records"].append(gen.generate(a))

    _run_in_threads(prompt_thread, everything_thread)
    for run in got["a"]:
        for out, want in zip(run, want_a, strict=False):
            for x, y in zip(out, want, strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    for run in got["b"]:
        for out, want in zip(run, want_b, strict=True):
            for x, y in zip(out, want, strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    for labels in got["labels"]:
        assert labels.shape == want_labels.shape and np.mean(labels == want_labels) > 0.999
    for records in got["records"]:
        assert len(records) == len(want_records)
        for r, w in zip(records, want_records, strict=True):
            assert r["segmentation"].shape == (90, 70) and r["bbox"] == w["bbox"]
            assert r["predicted_iou"] == pytest.approx(w["predicted_iou"], abs=1e-5)


def test_embed_and_decode_from_two_threads(tiny_model, rng):
    """set_embedding / get_embedding / embed_images / predict_torch on one predictor from
    two threads: each call sees one image from start to end."""
    images = [_image(rng), _image(rng, (64, 100))]
    pred = Predictor(tiny_model)
    embeddings = pred.embed_images(images, batch_size=2)
    torch_prompt = (torch.tensor([[[20.0, 30.0]]]), torch.ones(1, 1, dtype=torch.int64))
    want = []
    for emb in embeddings:
        pred.set_embedding(emb)
        want.append(pred.predict_torch(*torch_prompt)[1])
    got: list = [[], []]

    def job(k):
        for _ in range(20):
            with pred.lock:
                pred.set_embedding(embeddings[k])
                assert pred.get_embedding() is not None
                got[k].append(pred.predict_torch(*torch_prompt)[1])
            assert len(pred.embed_images([images[k]])) == 1

    _run_in_threads(lambda: job(0), lambda: job(1))
    for k in (0, 1):
        assert len(got[k]) == 20
        for scores in got[k]:
            torch.testing.assert_close(scores, want[k], rtol=1e-5, atol=1e-5)
