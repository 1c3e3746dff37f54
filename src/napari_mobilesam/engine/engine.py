""":class:`Engine`: one model's encoder and decoders as a backend built them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike

import numpy as np
import torch

from ..model import Sam
from .base import Decoder, Encoder, ImageEmbedding
from .frames import Frames
from .policy import DEFAULT_POLICY, Policy

__all__ = ["Engine", "EngineOptions"]


@dataclass(frozen=True)
class EngineOptions:
    """Backend options, as ``Predictor`` takes them; each backend says which it honours
    and rejects the ones it cannot (with the argument's name).

    Attributes
    ----------
    decoder_cache : bool
        Torch decoders: compute the prompt-independent part once per image.
    factorized : bool
        Torch decoders: factorised cross attentions where they cost less.
    cuda_graphs : bool
        Torch encoder on a GPU: replay CUDA graphs.
    onnx_folder : path, optional
        onnxruntime: the exported models to run (default: exported into the cache).
    quantize : {None, "int8"}
        onnxruntime: run the int8 models.
    threads : int, optional
        onnxruntime: intra-op threads.
    device_resize : bool, optional
        Resize images on the model's device (default on CUDA, see :class:`Frames`).
    max_upscale : float, optional
        Enlarge a small image at most this many times and pad the rest of the model's
        input with its background (see :class:`Frames`); None: SAM's resize.
    """

    decoder_cache: bool = True
    factorized: bool = True
    cuda_graphs: bool = True
    onnx_folder: str | PathLike | None = None
    quantize: str | None = None
    threads: int | None = None
    device_resize: bool | None = None
    max_upscale: float | None = None


class Engine:
    """How one model's networks run: an encoder, decoders, and the shared frames.

    Made by a backend (:func:`~napari_mobilesam.engine.make_engine`). An engine holds
    no image: callers keep embeddings and the decoders' per-image state, so one
    engine serves any number of predictors, generators and threads at once.

    Parameters
    ----------
    model : Sam
    encoder : Encoder
    decoder : Decoder
        For prompts as people give them (float32).
    grid_decoder : Decoder, optional
        For the many point prompts of segment-everything (default ``decoder``).
    reference_decoder : Decoder, optional
        The model's own computation, step by step (default ``decoder``).
    precision : str
        The encoder's precision (``"fp32"``, ``"bf16"``, ``"fp16"``).
    backend : str
        The registry name that built it.
    options : EngineOptions, optional
    policy : Policy, optional
        Work sizes for the machine (:mod:`.policy`).
    """

    def __init__(
        self,
        model: Sam,
        encoder: Encoder,
        decoder: Decoder,
        *,
        grid_decoder: Decoder | None = None,
        reference_decoder: Decoder | None = None,
        precision: str = "fp32",
        backend: str = "torch",
        options: EngineOptions | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.model = model
        self.encoder = encoder
        self.decoder = decoder
        self.grid_decoder = grid_decoder or decoder
        self.reference_decoder = reference_decoder or decoder
        self.precision = precision
        self.backend = backend
        self.options = options or EngineOptions()
        self.policy = policy or DEFAULT_POLICY
        self.frames = Frames(model, self.options.device_resize, self.options.max_upscale)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def name(self) -> str:
        """What runs the networks: ``"torch"``, ``"onnx"``, ``"onnx int8"``, or
        ``"onnx encoder + torch decoder"`` when encoder and decoder differ."""
        enc, dec = self.encoder.name, self.decoder.name
        return enc if enc == dec else f"{enc} encoder + {dec} decoder"

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether the encoder replays CUDA graphs."""
        return self.device.type == "cuda" and self.encoder.uses_cuda_graphs

    def describe(self) -> str:
        """What runs, as chosen: e.g. ``"cpu: torch, 2 threads, bf16"``."""
        graphs = ", CUDA graphs" if self.uses_cuda_graphs else ""
        threads = self.policy.describe_threads(self.device)
        limit = self.frames.max_upscale
        upscale = "" if limit is None else f", small images enlarged at most {limit:g}x"
        return f"{self.device}: {self.name}, {threads}, {self.precision}{graphs}{upscale}"

    def apply_threads(self) -> int:
        """Size torch's threads in the calling thread for the machine's load now
        (:meth:`Policy.apply_threads`); every entry point that runs a network calls it."""
        return self.policy.apply_threads(self.device)

    @torch.no_grad()
    def embed(
        self, frames: list[torch.Tensor], sizes: list[tuple[int, int]]
    ) -> list[ImageEmbedding]:
        """Embeddings of images in the input frame, in one encoder call.

        Parameters
        ----------
        frames : list of torch.Tensor
            (1, 3, h, w) RGB 0..255 (uint8 or float) each, longest side the model's
            input size (:meth:`Frames.frame`).
        sizes : list of (int, int)
            (H, W) of each image before resizing.

        Returns
        -------
        list of ImageEmbedding
            In order; features (1, C, h', w') float32 on the engine's device.
        """
        self.apply_threads()
        x = torch.cat([self.frames.preprocess(f) for f in frames])
        feats = self.encoder.encode(x)
        return [
            ImageEmbedding(feats[i : i + 1], (int(s[0]), int(s[1])), tuple(f.shape[-2:]))
            for i, (f, s) in enumerate(zip(frames, sizes, strict=True))
        ]

    def embed_image(self, rgb: np.ndarray) -> ImageEmbedding:
        """The embedding of one (H, W, 3) uint8 image in the model's channel order."""
        frame, size = self.frames.frame(rgb)
        return self.embed([frame], [size])[0]

    def embed_images(self, rgbs: Iterable[np.ndarray], batch_size: int) -> list[ImageEmbedding]:
        """Embeddings of (H, W, 3) uint8 images, ``batch_size`` per encoder call."""
        out: list[ImageEmbedding] = []
        frames, sizes = [], []
        for rgb in rgbs:
            frame, size = self.frames.frame(rgb)
            frames.append(frame)
            sizes.append(size)
            if len(frames) == batch_size:
                out += self.embed(frames, sizes)
                frames, sizes = [], []
        return out + self.embed(frames, sizes) if frames else out

    def __repr__(self) -> str:
        return f"Engine({self.describe()})"
