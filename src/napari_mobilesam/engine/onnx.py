"""The onnxruntime backend, and any numpy-level encoder/decoder backend.

:class:`ArrayEncoder` and :class:`ArrayDecoder` run a
:class:`~napari_mobilesam.runtime.EncoderDecoderBackend` (onnxruntime's
:class:`~napari_mobilesam.runtime.OnnxBackend`, or any object with its ``encode`` and
``decode``) behind the engine's tensor interface: prompts become segment-anything's
ONNX inputs (a box is two corner points labelled 2 and 3; without a box one padding
point labelled -1 is appended, as the prompt encoder does), and the decoder returns
all four mask tokens, of which the requested ones are kept.

``backend="onnx"`` runs both networks in onnxruntime. ``backend="auto"`` runs
onnxruntime's encoder and the torch decoder (with its per-image cache, faster than
the ONNX decoder) where ONNX models are asked for on a CPU in float32 (``quantize``
or ``onnx_folder``) and onnxruntime is installed; plain torch elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch

from ..model import Sam
from .base import Decoded, Decoder, Encoder, Prompts
from .engine import Engine, EngineOptions

__all__ = ["ArrayDecoder", "ArrayEncoder", "auto_engine", "backend_object_engine", "onnx_engine"]


def _name(backend) -> str:
    path = getattr(backend, "encoder_path", None)
    int8 = " int8" if path is not None and ".int8." in str(path) else ""
    return f"{getattr(backend, 'name', type(backend).__name__)}{int8}"


class ArrayEncoder(Encoder):
    """The encoder of a numpy-level backend, one image per call."""

    def __init__(self, backend, device: torch.device) -> None:
        self.backend = backend
        self.device = device
        self.name = _name(backend)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.backend.encode(x[i : i + 1].cpu().numpy()) for i in range(len(x))]
        return torch.from_numpy(np.concatenate(feats)).to(self.device)


class ArrayDecoder(Decoder):
    """The decoder of a numpy-level backend: the whole decoder per batch of prompts
    (no early IoU filter inside it)."""

    def __init__(self, backend, device: torch.device) -> None:
        self.backend = backend
        self.device = device
        self.name = _name(backend)

    def prepare(self, features: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(features.float().cpu().numpy())

    def decode(
        self, image: np.ndarray, prompts: Prompts, *, multimask: bool = True, min_iou=None
    ) -> Decoded:
        coords, labels = [], []
        n = len(prompts)
        if prompts.coords is not None:
            coords.append(prompts.coords.float().cpu())
            labels.append(prompts.labels.float().cpu())
        if prompts.boxes is not None:
            coords.append(prompts.boxes.reshape(-1, 2, 2).float().cpu())
            labels.append(torch.tensor([2.0, 3.0]).expand(n, 2))
        else:
            coords.append(torch.zeros(n, 1, 2))
            labels.append(torch.full((n, 1), -1.0))
        masks = None if prompts.masks is None else prompts.masks.float().cpu().numpy()
        low_res, iou = self.backend.decode(
            image, torch.cat(coords, 1).numpy(), torch.cat(labels, 1).numpy(), masks
        )
        sl = slice(1, None) if multimask else slice(0, 1)
        low_res = torch.from_numpy(low_res[:, sl]).to(self.device)
        iou = torch.from_numpy(iou[:, sl]).to(self.device)
        rows = torch.arange(len(iou))
        if min_iou is not None:
            rows = torch.nonzero((iou > min_iou).any(dim=1)).flatten().cpu()
            low_res, iou = low_res[rows.to(self.device)], iou[rows.to(self.device)]
        return Decoded(low_res, iou, rows)


def backend_object_engine(model: Sam, backend, precision: str, options: EngineOptions):
    """An engine around a backend object (``encode`` and ``decode`` on numpy arrays)."""
    dev = model.device
    return Engine(model, ArrayEncoder(backend, dev), ArrayDecoder(backend, dev),
                  precision=precision, backend=_name(backend), options=options)  # fmt: skip


def _onnx_backend(model: Sam, options: EngineOptions):
    from ..runtime import get_onnx_backend

    return get_onnx_backend(
        model,
        checkpoint=getattr(model, "checkpoint_path", None),
        model_name=getattr(model, "model_name", None) or "vit_t",
        folder=options.onnx_folder,
        quantize=options.quantize,
        threads=options.threads,
    )


def onnx_engine(model: Sam, precision: str, options: EngineOptions) -> Engine:
    """The engine of backend ``"onnx"``: onnxruntime runs both networks, float32."""
    if precision != "fp32":
        raise ValueError(f"precision={precision!r} needs backend='torch'")
    engine = backend_object_engine(model, _onnx_backend(model, options), precision, options)
    engine.backend = "onnx"
    return engine


def auto_engine(model: Sam, precision: str, options: EngineOptions) -> Engine:
    """The engine of backend ``"auto"``: the fastest choice for what is asked.

    onnxruntime's encoder and the torch decoder on a CPU in float32 when ONNX models
    are asked for (``quantize="int8"`` or an ``onnx_folder``) and onnxruntime (and, to
    export, onnx and onnxscript) is installed; the torch engine elsewhere, and where
    the export fails (with a warning).
    """
    from .torch_eager import torch_engine

    encoder = _auto_encoder(model, precision, options)
    plain = EngineOptions(**{**options.__dict__, "onnx_folder": None, "quantize": None})
    engine = torch_engine(model, precision, plain)
    engine.backend, engine.options = "auto", options
    if encoder is not None:
        engine.encoder = ArrayEncoder(encoder, model.device)
    return engine


def _auto_encoder(model: Sam, precision: str, options: EngineOptions):
    if model.device.type != "cpu" or precision != "fp32":
        return None
    if options.quantize is None and options.onnx_folder is None:
        return None
    try:
        from ..runtime.export import _import_exporter
        from ..runtime.onnx_backend import import_onnxruntime

        import_onnxruntime()
        if options.onnx_folder is None:
            _import_exporter()
    except ImportError:
        return None
    try:
        return _onnx_backend(model, options)
    except Exception as exc:  # an export failure must not stop predicting
        import warnings

        warnings.warn(
            f"backend='auto': the onnxruntime encoder is not available ({exc}); using torch",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
