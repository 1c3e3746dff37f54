"""Prompted segmentation of one image: the ``SamPredictor`` contract.

``Predictor.set_image`` computes the image embedding once; ``predict`` /
``predict_batch`` then decode prompts against it. Code written for
segment-anything's ``SamPredictor`` ports by changing the import.

Conventions: points are (x, y) pixels of the original image, boxes XYXY in the
same pixels, labels 1 = foreground, 0 = background. Masks come back at the
original size, (C, H, W) bool; ``low_res_logits`` are the decoder's
(C, 256, 256) logits (before upsampling), which can be fed back as
``mask_input``.

A predictor is the current image over an :class:`~napari_mobilesam.engine.Engine`
(what runs the networks), plus a lock: every public method is safe to call from
several threads, each call seeing one image from start to end (the image is an
immutable snapshot, replaced whole under the lock; the networks run outside it).
Code that sets an image and then predicts on it must hold :attr:`Predictor.lock`
around both when other threads set images on the same predictor; or give each thread
its own predictor over one engine (``Predictor(engine)``), which shares the weights.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from .build import load_model
from .engine import Decoded, Engine, EngineOptions, ImageEmbedding, Prompts, make_engine
from .engine.precision import PRECISIONS, cpu_has_bf16, resolve_precision
from .mask_upsampler import MaskUpsampler
from .model import Sam
from .normalize import to_rgb_uint8
from .predictor_batch import BatchPrediction
from .transforms import ResizeLongestSide, apply_boxes, apply_coords, check_max_upscale
from .validation import check_boxes, check_mask_input, check_points

__all__ = [
    "PRECISIONS",
    "ImageEmbedding",
    "MaskUpsampler",
    "Predictor",
    "cpu_has_bf16",
    "resolve_precision",
]


@dataclass(frozen=True)
class _Image:
    """The current image: its embedding and what the decoder keeps for it."""

    embedding: ImageEmbedding
    decoder_state: object


class Predictor(BatchPrediction):
    """Predict masks for prompts on one image.

    Parameters
    ----------
    model : Sam, str or Engine
        A loaded model, a registry name (``"vit_t"``) passed to
        :func:`~napari_mobilesam.build.load_model`, or an engine to share with another
        predictor (``Predictor(other.engine)``, with no other argument).
    device : str or torch.device, optional
        Move the model there (default: keep the model where it is; for a name,
        CUDA when available).
    decoder_cache : bool
        Compute the prompt-independent part of the mask decoder once per image
        and reuse it for every prompt (default). False recomputes it on every
        call, as the reference does; results agree within float rounding.
    factorized : bool
        Let the decoder's token/image attentions use the cheaper factorised form
        (default). False runs the reference computation.
    backend : str or EncoderDecoderBackend
        What runs the networks (:func:`~napari_mobilesam.engine.make_engine`): ``"torch"``;
        ``"onnx"``, onnxruntime on models exported on first use (needs
        ``pip install "napari-mobilesam[onnx]"``); ``"auto"``, torch, or on a CPU where
        ONNX models are asked for (``quantize`` or ``onnx_folder``) onnxruntime's
        encoder with the torch decoder; a name added with
        :func:`~napari_mobilesam.engine.register_backend`; or an object with numpy
        ``encode`` / ``decode``. :attr:`backend_name` says what runs.
    onnx_folder : path, optional
        With ``backend="onnx"`` or ``"auto"``: use the models exported there
        (``mobilesam export-onnx``) instead of the cache.
    quantize : {None, "int8"}
        With ``backend="onnx"`` or ``"auto"``: run the int8 (dynamically quantised)
        models.
    threads : int, optional
        With ``backend="onnx"``: onnxruntime threads (default: physical cores).
    precision : {"fp32", "bf16", "fp16", "auto"}
        Precision of the image encoder (torch backend): ``"bf16"`` / ``"fp16"`` run it
        under ``torch.autocast``; embeddings are float32 and prompts are decoded in
        float32 (segment-everything's grids in 16 bits). On the golden prompts the
        masks keep a mean IoU of 0.998 (bf16) / 0.9998 (fp16) against float32.
        ``"auto"``: the fastest for the device (:func:`resolve_precision`), held by
        :attr:`precision`. The default float32 reproduces the reference.
    cuda_graphs : bool
        On a GPU, replay the image encoder from CUDA graphs recorded once per
        batch size and precision: the same kernels without the launch overhead
        that dominates at batch 1. No effect on a CPU or with another backend.
    max_upscale : float, optional
        Enlarge a small image at most this many times (>= 1) instead of to the model's
        input size, and fill the rest of the input with its background colour
        (:func:`~napari_mobilesam.transforms.input_long_side`). A 256 px image is then
        shown at 512 px with ``max_upscale=2`` instead of at 1024 px, so its objects
        keep the size a model trained on larger images expects. Default None: every
        image is resized to the input size, as SAM does (the reference's results).
        Prompts and masks stay in the image's pixels either way;
        :attr:`transform`, which maps to a full-size input, then does not apply to
        small images (:meth:`predict_torch` users: scale by ``max(input_size) /
        max(original_size)``).
    """

    def __init__(
        self,
        model: Sam | str | Engine = "vit_t",
        *,
        device: str | torch.device | None = None,
        decoder_cache: bool = True,
        factorized: bool = True,
        backend="torch",
        onnx_folder=None,
        quantize: str | None = None,
        threads: int | None = None,
        precision: str = "fp32",
        cuda_graphs: bool = True,
        max_upscale: float | None = None,
    ):
        check_max_upscale(max_upscale)
        options = EngineOptions(
            decoder_cache=decoder_cache, factorized=factorized, cuda_graphs=cuda_graphs,
            onnx_folder=onnx_folder, quantize=quantize, threads=threads,
            max_upscale=None if max_upscale is None else float(max_upscale),
        )  # fmt: skip
        if isinstance(model, Engine):
            given = (options, backend, precision, device)
            if given != (EngineOptions(), "torch", "fp32", None):
                raise ValueError(
                    "an Engine comes with its device, backend, precision and options: give "
                    "no other argument with it (or give a model instead)"
                )
            engine = model
        else:
            if isinstance(model, str):
                model = load_model(model, device=device)
                device = None
            elif not isinstance(model, Sam):
                raise TypeError(
                    f"model must be a Sam model, a registry name or an Engine, got {type(model)}"
                )
            engine = make_engine(model, backend, precision, device, options)
        #: what runs the networks (shared by every predictor made from it)
        self.engine = engine
        #: held by every public method; hold it around set_image + predict sequences
        self.lock = threading.RLock()
        self.transform = ResizeLongestSide(engine.model.img_size)
        self._image: _Image | None = None

    # -- what runs --------------------------------------------------------------------

    @property
    def model(self) -> Sam:
        return self.engine.model

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def precision(self) -> str:
        """The image encoder's precision, as chosen (``"fp32"``, ``"bf16"``, ``"fp16"``)."""
        return self.engine.precision

    decoder_cache = property(lambda self: self.engine.options.decoder_cache)
    factorized = property(lambda self: self.engine.options.factorized)

    @property
    def backend_name(self) -> str:
        """What runs the networks: ``"torch"``, ``"onnx"``, ``"onnx int8"``, or for
        ``backend="auto"`` on a CPU ``"onnx encoder + torch decoder"`` (with ``int8``)."""
        return self.engine.name

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether the encoder runs from CUDA graphs (``cuda_graphs`` on a GPU, torch
        backend, no recording failure)."""
        return self.engine.uses_cuda_graphs

    def describe(self) -> str:
        """What runs, as chosen: e.g. ``"cpu: torch, 2 threads, bf16"`` (device,
        :attr:`backend_name`, torch's intra-op threads, :attr:`precision`)."""
        return self.engine.describe()

    # -- image ------------------------------------------------------------------------

    @property
    def is_image_set(self) -> bool:
        return self._image is not None

    features = property(lambda self: self._field("features"),
                        doc="The current (1, C, h', w') embedding, or None.")  # fmt: skip
    original_size = property(lambda self: self._field("original_size"),
                             doc="(H, W) of the current image, or None.")  # fmt: skip
    input_size = property(lambda self: self._field("input_size"),
                          doc="(h, w) of the current image, resized, or None.")  # fmt: skip

    def _field(self, name: str):
        image = self._image
        return None if image is None else getattr(image.embedding, name)

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        with self.lock:
            self._image = None

    def set_image(
        self,
        image: np.ndarray,
        image_format: str = "RGB",
        *,
        contrast_limits: tuple[float, float] | None = None,
        channels: list[int] | None = None,
        channel_axis: int | None = None,
    ) -> None:
        """Compute the embedding of ``image``.

        Parameters
        ----------
        image : np.ndarray
            (H, W) grayscale, (H, W, 3) RGB or (H, W, C) multichannel, any numeric
            dtype. RGB uint8 goes to the model unchanged (as in the reference);
            other inputs go through :func:`~napari_mobilesam.normalize.to_rgb_uint8`.
        image_format : {"RGB", "BGR"}
            Channel order of a 3-channel input.
        contrast_limits, channels, channel_axis
            Passed to :func:`~napari_mobilesam.normalize.to_rgb_uint8`.
        """
        rgb = self._rgb(image, image_format, contrast_limits, channels, channel_axis)
        self._set(self.engine.embed_image(rgb))

    def _rgb(self, image, image_format, contrast_limits, channels, channel_axis) -> np.ndarray:
        """``image`` as (H, W, 3) uint8 in the model's channel order."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        rgb = to_rgb_uint8(
            image, contrast_limits=contrast_limits, channels=channels, channel_axis=channel_axis
        )
        if image_format != self.model.image_format:
            rgb = np.ascontiguousarray(rgb[..., ::-1])
        return rgb

    def _set(self, embedding: ImageEmbedding) -> None:
        """Make ``embedding`` the current image (its decoder state made first)."""
        self.engine.apply_threads()
        image = _Image(embedding, self.engine.decoder.prepare(embedding.features))
        with self.lock:
            self._image = image

    @torch.no_grad()
    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, int]
    ) -> None:
        """Embed an image already resized to the input frame.

        Parameters
        ----------
        transformed_image : torch.Tensor
            (1, 3, h, w) RGB in 0..255 (uint8 or float), longest side = model input size.
        original_image_size : (int, int)
            (H, W) of the image before resizing.
        """
        if (
            transformed_image.ndim != 4
            or transformed_image.shape[:2] != (1, 3)
            or max(transformed_image.shape[2:]) != self.model.img_size
        ):
            raise ValueError(
                "set_torch_image needs a (1, 3, h, w) tensor with max(h, w) = "
                f"{self.model.img_size}, got {tuple(transformed_image.shape)}"
            )
        self._set(self.engine.embed([transformed_image], [original_image_size])[0])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Run the image encoder at this predictor's :attr:`precision`.

        Parameters
        ----------
        x : torch.Tensor
            (B, 3, S, S) float32, preprocessed (:meth:`Sam.preprocess`).

        Returns
        -------
        torch.Tensor
            (B, C, h, w) float32 embeddings.
        """
        self.engine.apply_threads()
        return self.engine.encoder.encode(x)

    def embed_images(
        self,
        images,
        batch_size: int = 8,
        *,
        image_format: str = "RGB",
        contrast_limits: tuple[float, float] | None = None,
        channels: list[int] | None = None,
        channel_axis: int | None = None,
    ) -> list[ImageEmbedding]:
        """Embeddings of many images, ``batch_size`` at a time through the encoder.

        For stacks on a GPU, where batching raises throughput; each result can be
        restored with :meth:`set_embedding`. Does not change the current image.

        Parameters
        ----------
        images : iterable of np.ndarray
            Images as :meth:`set_image` takes them (RGB uint8 passes unchanged;
            others go through :func:`~napari_mobilesam.normalize.to_rgb_uint8`).
        batch_size : int
            Images per encoder call.
        image_format, contrast_limits, channels, channel_axis
            As in :meth:`set_image`, for every image.

        Returns
        -------
        list of ImageEmbedding
            In input order; features (1, C, h', w') float32 on this device.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        convert = (image_format, contrast_limits, channels, channel_axis)
        return self.engine.embed_images((self._rgb(im, *convert) for im in images), batch_size)

    def get_image_embedding(self) -> torch.Tensor:
        """The current (1, C, h', w') embedding."""
        return self._current().embedding.features

    def get_embedding(self) -> ImageEmbedding:
        """The current embedding with its sizes (to cache and restore later)."""
        return self._current().embedding

    def set_embedding(self, embedding: ImageEmbedding) -> None:
        """Restore an embedding from :meth:`get_embedding` (no encoder run)."""
        if not isinstance(embedding, ImageEmbedding):
            raise TypeError(f"embedding must be an ImageEmbedding, got {type(embedding)}")
        emb_size = self.model.prompt_encoder.image_embedding_size
        if tuple(embedding.features.shape[-2:]) != emb_size or embedding.features.ndim != 4:
            raise ValueError(
                f"embedding features have shape {tuple(embedding.features.shape)}, this model "
                f"needs (1, C, {emb_size[0]}, {emb_size[1]})"
            )
        features = embedding.features.to(self.device)
        sizes = (tuple(embedding.original_size), tuple(embedding.input_size))
        self._set(ImageEmbedding(features, *sizes))

    def _current(self) -> _Image:
        with self.lock:
            image = self._image
        if image is None:
            raise RuntimeError("no image is set: call set_image() before predicting")
        return image

    # -- prompts ----------------------------------------------------------------------

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt (any mix of points, a box and a mask).

        Parameters
        ----------
        point_coords : (N, 2) array, optional
            (x, y) pixels of the original image.
        point_labels : (N,) array, optional
            1 foreground, 0 background; required with ``point_coords``.
        box : (4,) array, optional
            XYXY in original pixels.
        mask_input : (1, 256, 256) array, optional
            Low-res logits from a previous call.
        multimask_output : bool
            Three candidate masks instead of one (better for ambiguous single
            clicks).
        return_logits : bool
            Return upsampled logits instead of bool masks.

        Returns
        -------
        masks : (C, H, W) bool (float32 logits with ``return_logits``)
        scores : (C,) float32 predicted IoU
        low_res_logits : (C, 256, 256) float32
        """
        image = self._current()
        prompts = self._one_prompt(image, point_coords, point_labels, box, mask_input)
        masks, scores, low_res = self._predict(image, prompts, multimask_output, return_logits)
        return (
            masks[0].cpu().numpy(),
            scores[0].float().cpu().numpy(),
            low_res[0].float().cpu().numpy(),
        )

    def predict_low_res(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, MaskUpsampler]:
        """:meth:`predict` without upsampling: the scores, the low-res logits and what
        upsamples them, for callers that show one of the candidates (a click shows the
        best of three; upsampling the other two took a fifth of its time).

        Parameters are those of :meth:`predict`.

        Returns
        -------
        scores : (C,) float32 predicted IoU
        low_res_logits : (C, 256, 256) float32
        upsample : MaskUpsampler
            ``upsample(low_res_logits[k:k + 1])`` is ``predict(...)[0][k:k + 1]``, bit for
            bit; bound to this image's sizes, so it stays right after another image is set.
        """
        image = self._current()
        prompts = self._one_prompt(image, point_coords, point_labels, box, mask_input)
        decoded = self._decoded(image, prompts, multimask_output)
        emb = image.embedding
        upsample = MaskUpsampler(self.engine.frames, emb.input_size, emb.original_size)
        return (
            decoded.iou[0].float().cpu().numpy(),
            decoded.low_res[0].float().cpu().numpy(),
            upsample,
        )

    def _one_prompt(self, image: _Image, point_coords, point_labels, box, mask_input) -> Prompts:
        """One prompt's checked arrays -> :class:`Prompts` of batch 1 (input frame)."""
        coords, labels = check_points(point_coords, point_labels)
        if coords is not None:
            coords, labels = coords[None], labels[None]
        boxes = check_boxes(box, batched=False)
        masks_in = check_mask_input(
            mask_input, self.model.prompt_encoder.mask_input_size, batched=False
        )
        return self._prompts(image, coords, labels, boxes, masks_in)

    def _prompts(self, image: _Image, coords, labels, boxes, masks_in) -> Prompts:
        """Checked numpy prompts in the original frame -> :class:`Prompts` (input frame)."""
        dev, size = self.device, image.embedding.original_size
        long_side = max(image.embedding.input_size)  # the model's input size, or less

        def tensor(a, dtype=torch.float32):
            return None if a is None else torch.as_tensor(a, dtype=dtype, device=dev)

        return Prompts(
            tensor(None if coords is None else apply_coords(coords, size, long_side)),
            tensor(labels, torch.int64),
            tensor(None if boxes is None else apply_boxes(boxes, size, long_side)),
            tensor(masks_in),
        )

    @torch.no_grad()
    def _decoded(self, image: _Image, prompts, multimask: bool) -> Decoded:
        """The decoder's low-res logits and scores for ``prompts`` (None: B = 0)."""
        if prompts is None:
            m = self.model.mask_decoder.num_multimask_outputs if multimask else 1
            size = self.model.prompt_encoder.mask_input_size
            return Decoded.empty(m, size, self.device)
        self.engine.apply_threads()
        return self.engine.decoder.decode(image.decoder_state, prompts, multimask=multimask)

    @torch.no_grad()
    def _predict(self, image: _Image, prompts, multimask: bool, return_logits: bool):
        """Decode ``prompts`` (None: no prompts, B = 0) and upsample the masks."""
        decoded = self._decoded(image, prompts, multimask)
        emb = image.embedding
        masks = self.engine.frames.masks(
            decoded.low_res, emb.input_size, emb.original_size, return_logits
        )
        return masks, decoded.iou, decoded.low_res
