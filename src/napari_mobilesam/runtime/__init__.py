"""The networks on numpy arrays, and their ONNX export: torch (reference) and onnxruntime.

Every backend here implements :class:`EncoderDecoderBackend`: ``encode`` a
preprocessed (1, 3, S, S) image to its (1, C, h, w) embedding, ``decode`` labelled
points (boxes as two corner points) and an optional mask input to the low-res logits
and IoU of all four mask tokens (segment-anything's ONNX interface).
:class:`TorchBackend` runs the model's own modules; :class:`OnnxBackend` runs graphs
written by :func:`export_onnx` with onnxruntime, and :func:`get_onnx_backend` exports
them once into a cache. :func:`keep_freed_memory` tunes glibc's malloc for repeated
large CPU tensors. (``Predictor`` and ``MaskGenerator`` reach these through
:mod:`napari_mobilesam.engine`, which runs any such backend.)

Importing this package needs neither onnx nor onnxruntime; they are imported when
used (``pip install "napari-mobilesam[onnx]"``).
"""

from .base import EncoderDecoderBackend
from .cache import get_onnx_backend, onnx_cache_dir
from .export import DEFAULT_OPSET, EXPORTER_VERSION, export_onnx
from .graphs import DecoderGraph, plain_copy
from .heap import keep_freed_memory
from .onnx_backend import OnnxBackend
from .torch_backend import TorchBackend

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTER_VERSION",
    "DecoderGraph",
    "EncoderDecoderBackend",
    "OnnxBackend",
    "TorchBackend",
    "export_onnx",
    "get_onnx_backend",
    "keep_freed_memory",
    "onnx_cache_dir",
    "plain_copy",
]
