"""How the networks run: one layer between the model and everything that uses it.

:func:`make_engine` turns a :class:`~napari_mobilesam.model.Sam` and a backend name
into an :class:`Engine`: an :class:`Encoder` (``encode``: preprocessed images to
embeddings) and :class:`Decoder` objects (``prepare`` an image's embedding once,
then ``decode`` batches of prompts against it, optionally dropping prompts below a
predicted IoU), with the frames shared by all backends (:mod:`.frames`: resize,
normalise, upsample). ``Predictor``, ``MaskGenerator`` and the napari widgets use
nothing else.

One module per backend:

- :mod:`.torch_eager`: the model's own modules, eagerly (``"torch"``), on an optimised
  model the fused CPU kernels of :mod:`napari_mobilesam.accel`;
- :mod:`.cuda_graphs`: the torch encoder replayed from CUDA graphs on a GPU;
- :mod:`.reduced`: 16-bit decoding of segment-everything's grids, float32 fallback;
- :mod:`.onnx`: onnxruntime (``"onnx"``), the onnxruntime encoder with the torch
  decoder (``"auto"``), or any numpy-level backend object.

A new backend is one module with a factory, registered by name
(:func:`register_backend`). :mod:`.policy` sizes the work for the machine and
:mod:`.precision` says what ``precision=`` means.
"""

from .base import Decoded, Decoder, Encoder, ImageEmbedding, Prompts
from .engine import Engine, EngineOptions
from .policy import DEFAULT_POLICY, Policy
from .precision import PRECISIONS, cpu_has_bf16, resolve_precision
from .registry import backend_names, make_engine, register_backend, unregister_backend

__all__ = [
    "DEFAULT_POLICY",
    "PRECISIONS",
    "Decoded",
    "Decoder",
    "Encoder",
    "Engine",
    "EngineOptions",
    "ImageEmbedding",
    "Policy",
    "Prompts",
    "backend_names",
    "cpu_has_bf16",
    "make_engine",
    "register_backend",
    "resolve_precision",
    "unregister_backend",
]
