"""Prompted segmentation of one image: the ``SamPredictor`` contract.

``Predictor.set_image`` computes the image embedding once; ``predict`` /
``predict_batch`` then decode prompts against it. Code written for
segment-anything's ``SamPredictor`` ports by changing the import.

Conventions: points are (x, y) pixels of the original image, boxes XYXY in the
same pixels, labels 1 = foreground, 0 = background. Masks come back at the
original size, (C, H, W) bool; ``low_res_logits`` are the decoder's
(C, 256, 256) logits (before upsampling), which can be fed back as
``mask_input``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .build import load_model
from .model import Sam
from .normalize import to_rgb_uint8
from .runtime.cuda_graph import CudaGraphEncoder, run_encoder
from .runtime.heap import keep_freed_memory
from .transforms import ResizeLongestSide, resize_longest_side_torch

# Upsampled logits are produced in chunks of at most this many float32 values
# (~256 MB), so predict_batch with many prompts does not hold them all at once.
_POSTPROCESS_CHUNK = 64 * 2**20


@dataclass(frozen=True)
class ImageEmbedding:
    """An image embedding with the sizes needed to decode against it.

    Attributes
    ----------
    features : torch.Tensor
        (1, C, h', w') encoder output (256 x 64 x 64 for SAM models).
    original_size : (int, int)
        (H, W) of the image given to ``set_image``.
    input_size : (int, int)
        (h, w) after resize-longest-side, before padding.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    def to(self, device: str | torch.device) -> ImageEmbedding:
        """Copy on another device."""
        return ImageEmbedding(self.features.to(device), self.original_size, self.input_size)


class Predictor:
    """Predict masks for prompts on one image.

    Parameters
    ----------
    model : Sam or str
        A loaded model, or a registry name (``"vit_t"``) passed to
        :func:`~napari_mobilesam.build.load_model`.
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
    backend : {"torch", "onnx", "auto"} or EncoderDecoderBackend
        What runs the encoder and decoder. ``"onnx"``: onnxruntime on models exported
        from this model on first use (cached by checkpoint hash, see
        :func:`~napari_mobilesam.runtime.get_onnx_backend`); pre- and postprocessing
        stay in torch. Needs ``pip install "napari-mobilesam[onnx]"``. ``"auto"``: the
        fastest choice for what is asked: torch, except on a CPU where ONNX models are
        asked for (``quantize="int8"`` or an ``onnx_folder``) and onnxruntime is
        installed: then onnxruntime's encoder and our torch decoder (faster than the ONNX
        decoder). In float32 onnxruntime's encoder is no faster than ours (2-core AMD EPYC: 0.99x
        of its time at 2 threads, 1.07x at 1) and needs an export; its int8 encoder
        takes 0.73x (:attr:`backend_name` says what runs).
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
        under ``torch.autocast``, the embedding is returned as float32 and
        prompts are decoded in float32 (segment-everything's grids in 16 bits:
        :meth:`reduced_decoder`). On the golden prompts the masks keep a mean
        IoU of 0.998 (bf16) / 0.9998 (fp16) against float32 (worst 0.987 / 0.999).
        bf16 is about 2x faster on GPUs and faster on CPUs with bf16 units (AVX512-BF16
        or AMX: 0.63-0.74x of float32's time on an AMD EPYC); elsewhere on CPUs it is
        slower, and fp16 is always much slower on CPUs (warned). ``"auto"``: the
        fastest of these for the device (:func:`resolve_precision`); the attribute
        :attr:`precision` holds the choice. The default float32 reproduces the
        reference to float rounding.
    cuda_graphs : bool
        On a GPU, replay the image encoder from CUDA graphs recorded once per
        batch size and precision (:class:`~napari_mobilesam.runtime.cuda_graph.
        CudaGraphEncoder`): the same kernels without the launch overhead that
        dominates at batch 1. No effect on a CPU or with another backend.
    """

    def __init__(
        self,
        model: Sam | str = "vit_t",
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
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        torch_encoder = isinstance(backend, str) and backend in ("torch", "auto")
        if precision not in ("fp32", "auto") and not torch_encoder:
            raise ValueError(f"precision={precision!r} needs backend='torch'")
        if isinstance(model, str):
            model = load_model(model, device=device)
        elif not isinstance(model, Sam):
            raise TypeError(f"model must be a Sam model or a registry name, got {type(model)}")
        elif device is not None:
            model = model.to(device)
        if model.device.type == "cpu":
            keep_freed_memory()  # the next image reuses this one's memory (runtime.heap)
        precision = resolve_precision(precision, model.device) if torch_encoder else "fp32"
        if precision == "fp16" and model.device.type == "cpu":
            import warnings

            warnings.warn(
                "precision='fp16' on a CPU is very slow (no fast float16 kernels: 7.6x "
                "float32's time measured on an AMD EPYC); use 'bf16' or 'auto'",
                RuntimeWarning,
                stacklevel=2,
            )
        self.model = model
        self.decoder_cache = decoder_cache
        self.factorized = factorized
        self.precision = precision
        #: the encoder through CUDA graphs (used on CUDA devices only), or None
        self._graphed = CudaGraphEncoder(model.image_encoder) if cuda_graphs else None
        #: (16-bit copy of the mask decoder, its dtype), made by reduced_decoder()
        self._low_decoder = None
        #: onnxruntime encoder of ``backend="auto"`` (decoding stays in torch), or None
        self._encoder = None
        if isinstance(backend, str) and backend == "auto":
            self._encoder = _auto_encoder(model, onnx_folder, quantize, threads, precision)
            self.backend = None
        else:
            self.backend = _make_backend(backend, model, onnx_folder, quantize, threads)
        self.transform = ResizeLongestSide(model.img_size)
        self.reset_image()

    def describe(self) -> str:
        """What runs, as chosen: e.g. ``"cpu: torch, 2 threads, bf16"``.

        Device, :attr:`backend_name`, torch's intra-op threads (torch picks the
        physical cores unless told otherwise) and the encoder :attr:`precision`.
        """
        graphs = ", CUDA graphs" if self.uses_cuda_graphs else ""
        return (
            f"{self.device}: {self.backend_name}, {torch.get_num_threads()} threads, "
            f"{self.precision}{graphs}"
        )

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether the encoder runs from CUDA graphs (``cuda_graphs`` on a GPU, torch
        backend, no recording failure)."""
        return (
            self._graphed is not None
            and self.backend is None
            and self._encoder is None
            and self.device.type == "cuda"
            and self._graphed.failed is None
        )

    @property
    def backend_name(self) -> str:
        """What runs the networks: ``"torch"``, ``"onnx"``, ``"onnx int8"``, or for
        ``backend="auto"`` on a CPU ``"onnx encoder + torch decoder"`` (with ``int8``)."""
        if self._encoder is not None:
            return f"onnx{_int8(self._encoder)} encoder + torch decoder"
        if self.backend is None:
            return "torch"
        return f"{getattr(self.backend, 'name', type(self.backend).__name__)}{_int8(self.backend)}"

    # -- image ------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        #: the decoder's image-side tensors of this image, per dtype (None: float32)
        self._decoder_caches: dict = {}
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

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
        convert = {"contrast_limits": contrast_limits, "channels": channels,
                   "channel_axis": channel_axis}  # fmt: skip
        tensor, original_size = self._input_frame(image, image_format, convert)
        self.set_torch_image(tensor, original_size)

    def _input_frame(
        self, image: np.ndarray, image_format: str, convert: dict
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """(1, 3, h, w) uint8 tensor resized to the input frame, and the (H, W) before."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        rgb = to_rgb_uint8(image, **convert)
        if image_format != self.model.image_format:
            rgb = np.ascontiguousarray(rgb[..., ::-1])
        pixels = rgb.shape[0] * rgb.shape[1]
        if self.device.type in _DEVICE_RESIZE and pixels <= _DEVICE_RESIZE_PIXELS:
            # upload the original and resize there (the same bytes as Pillow's resize,
            # which takes ~10 ms of a CPU core per image: the bound for stacks on a GPU)
            image_t = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).to(self.device)
            resized_t = resize_longest_side_torch(image_t.permute(2, 0, 1), self.model.img_size)
            return resized_t.contiguous()[None], rgb.shape[:2]
        resized = self.transform.apply_image(rgb)
        tensor = torch.tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        return tensor, rgb.shape[:2]

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
        self.reset_image()
        x = self.model.preprocess(transformed_image.to(self.device).float())
        if self.backend is None:
            self.features = self.encode(x)
        else:
            self.features = torch.from_numpy(self.backend.encode(x.cpu().numpy())).to(self.device)
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (int(transformed_image.shape[-2]), int(transformed_image.shape[-1]))
        self.is_image_set = True

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Run the image encoder (torch backend) at this predictor's ``precision``.

        Parameters
        ----------
        x : torch.Tensor
            (B, 3, S, S) float32, preprocessed (:meth:`Sam.preprocess`).

        Returns
        -------
        torch.Tensor
            (B, C, h', w') float32 embeddings.
        """
        if self._encoder is not None:
            feats = [self._encoder.encode(x[i : i + 1].cpu().numpy()) for i in range(len(x))]
            return torch.from_numpy(np.concatenate(feats)).to(self.device)
        x = x.to(self.device)
        dtype = _AUTOCAST[self.precision]
        if self._graphed is not None and self._graphed.applies(x):
            return self._graphed(x, dtype)
        return run_encoder(self.model.image_encoder, x, dtype)

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
        convert = {"contrast_limits": contrast_limits, "channels": channels,
                   "channel_axis": channel_axis}  # fmt: skip
        out: list[ImageEmbedding] = []
        pending: list[tuple[torch.Tensor, tuple[int, int], tuple[int, int]]] = []

        def flush() -> None:
            x = torch.cat([t for t, _, _ in pending])
            if self.backend is None:
                feats = self.encode(x)
            else:
                feats = torch.cat([
                    torch.from_numpy(self.backend.encode(x[i : i + 1].cpu().numpy()))
                    for i in range(len(x))
                ]).to(self.device)  # fmt: skip
            for i, (_, orig, inp) in enumerate(pending):
                out.append(ImageEmbedding(feats[i : i + 1], orig, inp))
            pending.clear()

        with torch.no_grad():
            for image in images:
                t, original_size = self._input_frame(image, image_format, convert)
                x = self.model.preprocess(t.float())
                pending.append((x, original_size, tuple(t.shape[-2:])))
                if len(pending) == batch_size:
                    flush()
            if pending:
                flush()
        return out

    def get_image_embedding(self) -> torch.Tensor:
        """The current (1, C, h', w') embedding."""
        self._require_image()
        return self.features

    def get_embedding(self) -> ImageEmbedding:
        """The current embedding with its sizes (to cache and restore later)."""
        self._require_image()
        return ImageEmbedding(self.features, self.original_size, self.input_size)

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
        self.reset_image()
        self.features = embedding.features.to(self.device)
        self.original_size = tuple(embedding.original_size)
        self.input_size = tuple(embedding.input_size)
        self.is_image_set = True

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("no image is set: call set_image() before predicting")

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
        self._require_image()
        coords, labels = _check_points(point_coords, point_labels, batched=False)
        boxes = _check_boxes(box, batched=False)
        masks_in = _check_mask_input(
            mask_input, self.model.prompt_encoder.mask_input_size, batched=False
        )
        masks, scores, low_res = self.predict_torch(
            *self._to_input_frame(coords, labels, boxes, masks_in),
            multimask_output=multimask_output,
            return_logits=return_logits,
        )
        return (
            masks[0].cpu().numpy(),
            scores[0].float().cpu().numpy(),
            low_res[0].float().cpu().numpy(),
        )

    def predict_batch(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for B prompts in one decoder pass.

        Parameters
        ----------
        point_coords : (B, N, 2) array, optional
            (x, y) pixels of the original image; N points per prompt.
        point_labels : (B, N) array, optional
        boxes : (B, 4) array, optional
            XYXY in original pixels, one box per prompt.
        mask_input : (B, 1, 256, 256) array, optional
        multimask_output, return_logits : bool
            As in :meth:`predict`.

        Returns
        -------
        masks : (B, C, H, W) bool
        scores : (B, C) float32
        low_res_logits : (B, C, 256, 256) float32
            B = 0 prompts (e.g. ``boxes`` of shape (0, 4)) give empty arrays of these
            shapes without running the decoder.
        """
        self._require_image()
        coords, labels = _check_points(point_coords, point_labels, batched=True)
        boxes_ = _check_boxes(boxes, batched=True)
        masks_in = _check_mask_input(
            mask_input, self.model.prompt_encoder.mask_input_size, batched=True
        )
        sizes = {
            name: a.shape[0]
            for name, a in (("point_coords", coords), ("boxes", boxes_), ("mask_input", masks_in))
            if a is not None
        }
        if len(set(sizes.values())) > 1:
            raise ValueError(f"prompt batch sizes differ: {sizes}")
        if 0 in sizes.values():  # an empty batch: no decoder pass
            return self._empty_batch(multimask_output, return_logits)
        masks, scores, low_res = self.predict_torch(
            *self._to_input_frame(coords, labels, boxes_, masks_in),
            multimask_output=multimask_output,
            return_logits=return_logits,
        )
        return masks.cpu().numpy(), scores.float().cpu().numpy(), low_res.float().cpu().numpy()

    def _empty_batch(
        self, multimask_output: bool, return_logits: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`predict_batch`'s three arrays for B = 0 prompts (C = 3 or 1 masks)."""
        c = self.model.mask_decoder.num_multimask_outputs if multimask_output else 1
        h, w = self.original_size
        low_h, low_w = self.model.prompt_encoder.mask_input_size
        return (
            np.zeros((0, c, h, w), np.float32 if return_logits else bool),
            np.zeros((0, c), np.float32),
            np.zeros((0, c, low_h, low_w), np.float32),
        )

    def _to_input_frame(self, coords, labels, boxes, masks_in):
        dev = self.device
        coords_t = labels_t = boxes_t = masks_t = None
        if coords is not None:
            coords_t = torch.as_tensor(
                self.transform.apply_coords(coords, self.original_size),
                dtype=torch.float32,
                device=dev,
            )
            labels_t = torch.as_tensor(labels, dtype=torch.int64, device=dev)
        if boxes is not None:
            boxes_t = torch.as_tensor(
                self.transform.apply_boxes(boxes, self.original_size),
                dtype=torch.float32,
                device=dev,
            )
        if masks_in is not None:
            masks_t = torch.as_tensor(masks_in, dtype=torch.float32, device=dev)
        return coords_t, labels_t, boxes_t, masks_t

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction on tensors already in the *input* frame.

        Parameters
        ----------
        point_coords : (B, N, 2) float tensor or None
            (x, y) in the resized-image frame (see ``transform.apply_coords_torch``).
        point_labels : (B, N) tensor or None
        boxes : (B, 4) float tensor or None
        mask_input : (B, 1, 256, 256) float tensor or None
        multimask_output, return_logits : bool

        Returns
        -------
        masks : (B, C, H, W) bool (or float logits) at the original size
        iou_predictions : (B, C)
        low_res_logits : (B, C, 256, 256)
        """
        self._require_image()
        if self.backend is not None:
            low_res, iou = self.decode_backend(point_coords, point_labels, boxes, mask_input)
            sl = slice(1, None) if multimask_output else slice(0, 1)
            low_res, iou = low_res[:, sl], iou[:, sl]
            return self._postprocess(low_res, return_logits), iou, low_res
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.model.prompt_encoder(points, boxes, mask_input)
        decoder = self.model.mask_decoder
        if mask_input is None and self.decoder_cache:
            # the image side of the decoder's first block does not depend on the
            # prompts: computed once per image, reused by every call
            cache = self._image_cache(dense)
            low_res, iou = decoder(
                None, None, sparse, None, multimask_output, cache, factorized=self.factorized
            )
        else:
            pe = self.model.prompt_encoder.get_dense_pe()
            low_res, iou = decoder(
                self.features, pe, sparse, dense, multimask_output, factorized=self.factorized
            )
        masks = self._postprocess(low_res, return_logits)
        return masks, iou, low_res

    def decode_backend(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All four mask tokens' low-res logits (B, 4, h, w) and IoU (B, 4) from the backend.

        Prompts are encoded as segment-anything's ONNX decoder takes them: a box is two
        corner points labelled 2 and 3; without a box one padding point (label -1) is
        appended, as the prompt encoder does.
        """
        coords, labels = [], []
        if point_coords is not None:
            coords.append(point_coords.float())
            labels.append(point_labels.float())
        if boxes is not None:
            b = boxes.reshape(-1, 2, 2).float()
            coords.append(b)
            labels.append(torch.tensor([2.0, 3.0], device=b.device).expand(len(b), 2))
        else:
            n = len(coords[0]) if coords else (len(mask_input) if mask_input is not None else 1)
            coords.append(torch.zeros(n, 1, 2, device=self.device))
            labels.append(torch.full((n, 1), -1.0, device=self.device))
        c = torch.cat(coords, dim=1).cpu().numpy()
        lab = torch.cat(labels, dim=1).cpu().numpy()
        m = None if mask_input is None else mask_input.float().cpu().numpy()
        low_res, iou = self.backend.decode(self.features.cpu().numpy(), c, lab, m)
        return torch.from_numpy(low_res).to(self.device), torch.from_numpy(iou).to(self.device)

    def reduced_decoder(self):
        """The mask decoder in this predictor's reduced :attr:`precision`, for many prompts.

        Segment-everything decodes a whole grid of prompts at once: work bound by
        memory traffic and float32 arithmetic, which a 16-bit copy of the decoder
        halves (the IoU head still runs in float32 on its output tokens).
        Single prompts (:meth:`predict`) keep the float32 decoder. Made once, from
        the model's weights at the time.

        Returns
        -------
        (MaskDecoder, torch.dtype) or (None, None)
            float16 on a GPU (tensor cores run it as fast as bfloat16 and its finer
            mantissa keeps the logits 10x closer to float32's; callers fall back to
            float32 where it overflows), bfloat16 on a CPU (fast kernels on CPUs with
            bf16 units; float16 has none). None where it does not apply: float32
            precision or another backend.

        Notes
        -----
        Measured against the float32 decoder on 144 grid prompts of each golden
        image (random weights, whose logits are near 0 and so thresholded most
        fragilely): float16 mask IoU 0.998 mean, predicted IoU within 0.0014;
        bfloat16 0.981-0.986 mean, within 0.013. Speed: 256 grid prompts on an AMD
        EPYC (2 cores, bf16 units) 6.4 s in float32, 3.3 s in bfloat16.
        """
        if _AUTOCAST[self.precision] is None or self.backend is not None:
            return None, None
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        held = self._low_decoder
        if held is None or held[1] != dtype:
            import copy

            held = (copy.deepcopy(self.model.mask_decoder).to(dtype).eval(), dtype)
            self._low_decoder = held
        return held

    def _image_cache(self, no_mask_dense: torch.Tensor, dtype: torch.dtype | None = None):
        """The decoder's image-side tensors of the current image (float32, or ``dtype``
        for :meth:`reduced_decoder`)."""
        cache = self._decoder_caches.get(dtype)
        if cache is None:
            decoder = self.model.mask_decoder if dtype is None else self.reduced_decoder()[0]

            def cast(t: torch.Tensor) -> torch.Tensor:
                return t if dtype is None else t.to(dtype)

            pe = self.model.prompt_encoder.get_dense_pe()
            cache = decoder.prepare_image(cast(self.features), cast(pe), cast(no_mask_dense))
            self._decoder_caches[dtype] = cache
        return cache

    def _postprocess(self, low_res: torch.Tensor, return_logits: bool) -> torch.Tensor:
        b, c = low_res.shape[:2]
        h, w = self.original_size
        per_prompt = c * max(h * w, self.model.img_size**2)
        step = max(1, _POSTPROCESS_CHUNK // per_prompt)
        out = torch.empty(
            (b, c, h, w),
            dtype=low_res.dtype if return_logits else torch.bool,
            device=low_res.device,
        )
        for i in range(0, b, step):
            logits = self.model.postprocess_masks(
                low_res[i : i + step], self.input_size, self.original_size
            )
            out[i : i + step] = logits if return_logits else logits > self.model.mask_threshold
        return out


#: device types whose images are resized on the device (:func:`resize_longest_side_torch`)
_DEVICE_RESIZE = ("cuda",)
#: larger images are resized by Pillow on the host (the device copy is float64)
_DEVICE_RESIZE_PIXELS = 4096 * 4096

#: torch.autocast dtype of each ``precision`` (None: plain float32).
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: what ``precision=`` accepts
PRECISIONS = (*_AUTOCAST, "auto")


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The image encoder precision that ``precision`` means on ``device``.

    ``"auto"`` is the fastest choice that keeps the golden masks (mean IoU >= 0.98
    against float32): on CUDA ``"bf16"`` (``"fp16"`` on GPUs without bfloat16);
    on a CPU ``"bf16"`` when it has bfloat16 units (:func:`cpu_has_bf16`), else
    ``"fp32"``; ``"fp32"`` on other devices. Other values are returned unchanged.

    Parameters
    ----------
    precision : {"fp32", "bf16", "fp16", "auto"}
    device : str or torch.device

    Returns
    -------
    str
        ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return "fp32"


@functools.lru_cache(maxsize=1)
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX-BF16).

    Read from the ``flags`` line of ``/proc/cpuinfo`` (Linux); False where that
    is missing, so other systems keep float32 under ``precision="auto"``.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.partition(":")[2].split()))
    return False


def _onnx_backend(model: Sam, onnx_folder, quantize, threads):
    """The model's onnxruntime backend: exported into the cache on first use, or a folder."""
    from .runtime import get_onnx_backend

    return get_onnx_backend(
        model,
        checkpoint=getattr(model, "checkpoint_path", None),
        model_name=getattr(model, "model_name", None) or "vit_t",
        folder=onnx_folder,
        quantize=quantize,
        threads=threads,
    )


def _int8(backend) -> str:
    path = getattr(backend, "encoder_path", None)
    return " int8" if path is not None and ".int8." in str(path) else ""


def _auto_encoder(model: Sam, onnx_folder, quantize, threads, precision: str):
    """The onnxruntime encoder ``backend="auto"`` uses, or None for plain torch.

    On a CPU in float32, when ONNX models are asked for (``quantize="int8"``: 0.73x of
    our torch encoder's time on an AMD EPYC, or an ``onnx_folder``) and onnxruntime /
    onnx / onnxscript are installed, the image encoder runs in onnxruntime while
    prompts are decoded by the torch decoder (with its per-image cache, faster than the
    ONNX decoder). Elsewhere plain torch: on a GPU, in reduced precision, in float32
    without a folder (our torch encoder is as fast as onnxruntime's, with no export),
    with onnxruntime missing or the export failing (with a warning).
    """
    if model.device.type != "cpu" or precision != "fp32":
        return None
    if quantize is None and onnx_folder is None:
        return None
    try:
        from .runtime.export import _import_exporter
        from .runtime.onnx_backend import import_onnxruntime

        import_onnxruntime()
        if onnx_folder is None:
            _import_exporter()
    except ImportError:
        return None
    try:
        return _onnx_backend(model, onnx_folder, quantize, threads)
    except Exception as exc:  # an export failure must not stop predicting
        import warnings

        warnings.warn(
            f"backend='auto': the onnxruntime encoder is not available ({exc}); using torch",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _make_backend(backend, model: Sam, onnx_folder, quantize, threads):
    """None for the built-in torch path, else an EncoderDecoderBackend."""
    if isinstance(backend, str):
        if backend == "torch":
            if onnx_folder is not None or quantize is not None:
                raise ValueError("onnx_folder and quantize need backend='onnx'")
            return None
        if backend == "onnx":
            return _onnx_backend(model, onnx_folder, quantize, threads)
        raise ValueError(f"backend must be 'torch', 'onnx' or 'auto', got {backend!r}")
    if hasattr(backend, "encode") and hasattr(backend, "decode"):
        return backend
    raise TypeError(
        f"backend must be 'torch', 'onnx', 'auto' or a backend object, got {type(backend)}"
    )


# -- prompt validation (numpy level) ------------------------------------------------


def _as_float_array(value, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric, got {value!r}") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values: {value!r}")
    return arr


def _check_points(coords, labels, *, batched: bool):
    if coords is None:
        if labels is not None:
            raise ValueError("point_labels given without point_coords")
        return None, None
    if labels is None:
        raise ValueError("point_coords given without point_labels (1 foreground, 0 background)")
    coords = _as_float_array(coords, "point_coords")
    labels_f = _as_float_array(labels, "point_labels")
    want = "(B, N, 2)" if batched else "(N, 2)"
    ndim = 3 if batched else 2
    if coords.ndim != ndim or coords.shape[-1] != 2 or coords.shape[-2] == 0:
        raise ValueError(f"point_coords must have shape {want} as (x, y), got {coords.shape}")
    if labels_f.shape != coords.shape[:-1]:
        raise ValueError(
            f"point_labels must have shape {coords.shape[:-1]} to match point_coords "
            f"{coords.shape}, got {labels_f.shape}"
        )
    if not np.isin(labels_f, (0, 1)).all():
        bad = np.unique(labels_f[~np.isin(labels_f, (0, 1))])
        raise ValueError(
            f"point_labels must be 1 (foreground) or 0 (background), got {bad.tolist()}"
        )
    if not batched:
        coords, labels_f = coords[None], labels_f[None]
    return coords, labels_f.astype(np.int64)


def _check_boxes(boxes, *, batched: bool):
    if boxes is None:
        return None
    name = "boxes" if batched else "box"
    arr = _as_float_array(boxes, name)
    if batched:
        if arr.ndim != 2 or arr.shape[1] != 4:
            raise ValueError(f"boxes must have shape (B, 4) as XYXY, got {arr.shape}")
    else:
        if arr.size != 4:
            raise ValueError(f"box must have shape (4,) as XYXY, got {arr.shape}")
        arr = arr.reshape(1, 4)
    inverted = (arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1])
    if inverted.any():
        raise ValueError(
            f"{name} must be XYXY with x1 >= x0 and y1 >= y0, got {arr[inverted][0].tolist()}"
        )
    return arr


def _check_mask_input(mask_input, size: tuple[int, int], *, batched: bool):
    if mask_input is None:
        return None
    arr = _as_float_array(mask_input, "mask_input")
    want = (arr.shape[0] if arr.ndim else -1, 1, *size) if batched else (1, *size)
    if arr.shape != want or (batched and arr.shape[0] == 0):
        shape = f"(B, 1, {size[0]}, {size[1]})" if batched else f"(1, {size[0]}, {size[1]})"
        raise ValueError(f"mask_input must have shape {shape}, got {arr.shape}")
    return arr.astype(np.float32) if batched else arr.astype(np.float32)[None]
