"""The torch backend: the model's own modules, run eagerly.

:class:`TorchEncoder` runs ``model.image_encoder`` (optimised or not, see
:mod:`napari_mobilesam.accel`) under ``torch.autocast`` for a reduced precision, from
CUDA graphs on a GPU (:mod:`.cuda_graphs`). :class:`TorchDecoder` runs the prompt
encoder and mask decoder: with the per-image cache and factorised attentions of
:mod:`napari_mobilesam.accel.decoder`, or as the model's own ``forward`` (the reference
computation). :func:`torch_engine` puts them together, with a 16-bit grid decoder for
reduced precisions (:mod:`.reduced`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..accel.decoder import ImageCache, decode_tokens, prepare_image
from ..model import Sam
from .base import Decoded, Decoder, Encoder, Prompts
from .cuda_graphs import CudaGraphEncoder, run_encoder
from .engine import Engine, EngineOptions
from .policy import DEFAULT_POLICY
from .precision import AUTOCAST
from .reduced import ReducedDecoder

__all__ = ["TorchDecoder", "TorchEncoder", "torch_engine"]


class TorchEncoder(Encoder):
    """``model.image_encoder`` at a precision, eagerly or from CUDA graphs.

    Parameters
    ----------
    model : Sam
    precision : {"fp32", "bf16", "fp16"}
        ``bf16`` / ``fp16`` run under ``torch.autocast``; the features come back float32.
    cuda_graphs : bool
        On a GPU, replay the encoder from CUDA graphs recorded once per batch size and
        precision (:class:`~.cuda_graphs.CudaGraphEncoder`). No effect elsewhere.
    """

    name = "torch"

    def __init__(self, model: Sam, precision: str = "fp32", cuda_graphs: bool = True) -> None:
        self.model = model
        self.dtype = AUTOCAST[precision]
        on_gpu = model.device.type == "cuda"
        self.graphs = CudaGraphEncoder(model.image_encoder) if cuda_graphs and on_gpu else None

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.graphs is not None and self.graphs.failed is None

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.model.device)
        if self.graphs is not None and self.graphs.applies(x):
            return self.graphs(x, self.dtype)
        return run_encoder(self.model.image_encoder, x, self.dtype)


@dataclass(frozen=True)
class TorchImage:
    """What :class:`TorchDecoder` keeps per image: the embedding, and the decoder's
    prompt-independent tensors (None without the cache)."""

    features: torch.Tensor
    cache: ImageCache | None


class TorchDecoder(Decoder):
    """The model's prompt encoder and mask decoder.

    Parameters
    ----------
    model : Sam
    cache : bool
        Compute the prompt-independent part of the mask decoder once per image
        (:meth:`prepare`) and reuse it for every prompt without a mask input.
    factorized : bool
        Let the cross attentions use the factorised form where it costs less.
        With neither, the decoder is the model's own ``forward``.
    chunk : int, optional
        Decode at most this many prompts per call (a CPU keeps a few prompts' image
        tensors in cache); default all at once.
    """

    name = "torch"
    on_device = True

    def __init__(
        self, model: Sam, *, cache: bool = True, factorized: bool = True, chunk: int | None = None
    ) -> None:
        self.model = model
        self.cache = cache
        self.factorized = factorized
        self.chunk = chunk

    @property
    def is_reference(self) -> bool:
        """Whether this is the model's own computation (no cache, no factorisation)."""
        return not (self.cache or self.factorized)

    @torch.no_grad()
    def prepare(self, features: torch.Tensor) -> TorchImage:
        features = features.to(self.model.device)
        if not self.cache:
            return TorchImage(features, None)
        pe = self.model.prompt_encoder
        _, no_mask = pe(None, None, None)
        dec = self.model.mask_decoder
        return TorchImage(features, prepare_image(dec, features, pe.get_dense_pe(), no_mask))

    @torch.no_grad()
    def decode(
        self, image: TorchImage, prompts: Prompts, *, multimask: bool = True, min_iou=None
    ) -> Decoded:
        n = len(prompts)
        step = self.chunk or max(n, 1)
        parts, offsets = [], []
        for i in range(0, n, step):
            found = self._decode(image, prompts.rows(i, i + step), multimask, min_iou)
            if found is not None:
                parts.append(found)
                offsets.append(i)
        empty = Decoded.empty(
            self.model.mask_decoder.num_multimask_outputs if multimask else 1,
            self.model.prompt_encoder.mask_input_size,
            image.features.device,
        )
        return Decoded.cat(parts, offsets, empty)

    def _decode(self, image: TorchImage, prompts: Prompts, multimask: bool, min_iou):
        """One call of :meth:`decode`; None when no prompt passes ``min_iou``."""
        model, dec = self.model, self.model.mask_decoder
        points = None if prompts.coords is None else (prompts.coords, prompts.labels)
        sparse, dense = model.prompt_encoder(points, prompts.boxes, prompts.masks)
        sl = dec.token_slice(multimask)
        if self.is_reference and min_iou is None:
            pe = model.prompt_encoder.get_dense_pe()
            low_res, iou = dec(image.features, pe, sparse, dense, multimask)
            return Decoded(low_res, iou, torch.arange(len(iou)))  # (rows on the CPU)
        if prompts.masks is None and image.cache is not None:
            hs, keys, size = decode_tokens(
                dec, sparse, cache=image.cache, factorized=self.factorized
            )
        else:
            hs, keys, size = decode_tokens(
                dec, sparse, image_embeddings=image.features,
                image_pe=model.prompt_encoder.get_dense_pe(),
                dense_prompt_embeddings=dense, factorized=self.factorized,
            )  # fmt: skip
        iou = dec.iou_prediction_head(hs[:, 0])[:, sl]
        if min_iou is None:
            return Decoded(dec.masks_from_tokens(hs, keys, size, sl), iou, torch.arange(len(iou)))
        rows = torch.nonzero((iou > min_iou).any(dim=1)).flatten()
        if len(rows) == 0:
            return None
        hs, iou = hs[rows], iou[rows]
        keys = keys if keys.shape[0] == 1 else keys[rows]
        return Decoded(dec.masks_from_tokens(hs, keys, size, sl), iou, rows.cpu())


def torch_engine(model: Sam, precision: str, options: EngineOptions) -> Engine:
    """The engine of backend ``"torch"``."""
    if options.onnx_folder is not None or options.quantize is not None:
        raise ValueError("onnx_folder and quantize need backend='onnx'")
    if precision in ("fp16", "bf16") and model.device.type == "cpu":
        import warnings

        from . import precision as _precision

        if precision == "fp16":
            warnings.warn(
                "precision='fp16' on a CPU is very slow (CPUs have no fast float16 kernels); "
                "use 'bf16' or 'auto'",
                RuntimeWarning,
                stacklevel=4,
            )
        elif not _precision.cpu_has_bf16():
            warnings.warn(
                "precision='bf16' on a CPU without bfloat16 units (AVX512-BF16 or AMX) is "
                "much slower than float32 (about 10x measured); use 'auto' or 'fp32'",
                RuntimeWarning,
                stacklevel=4,
            )
    encoder = TorchEncoder(model, precision, options.cuda_graphs)
    cached = {"cache": options.decoder_cache, "factorized": options.factorized}
    decoder = TorchDecoder(model, **cached)
    chunk = DEFAULT_POLICY.decoder_chunk(model.device)
    grid = TorchDecoder(model, **cached, chunk=chunk)
    if AUTOCAST[precision] is not None:  # 16 bits on a GPU and on CPUs with bf16 units
        grid = ReducedDecoder(model, fallback=grid)
    reference = TorchDecoder(model, cache=False, factorized=False)
    return Engine(model, encoder, decoder, grid_decoder=grid, reference_decoder=reference,
                  precision=precision, backend="torch", options=options)  # fmt: skip
