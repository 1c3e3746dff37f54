"""``MaskGenerator``: segment everything in an image with a grid of point prompts.

Three modes share one pipeline of small functions over :class:`MaskData`:

``mode="reference"``
    segment-anything's ``SamAutomaticMaskGenerator`` step by step: every mask
    upsampled to full resolution, filters and boxes on full-resolution logits,
    RLEs, box NMS. It reproduces the reference's outputs (golden tests).
``mode="fast"`` (what ``mode="auto"``, the default, picks on a CPU)
    The same decisions made earlier and cheaper: the IoU and stability filters
    run on the low-resolution logits, empty masks are dropped, each survivor is
    upsampled only inside its own window (:mod:`.upsample`) and kept as a tight
    crop (:mod:`.masks`), duplicates are removed by mask IoU (``nms="mask"``) or
    box IoU (``nms="box"``). Memory grows with the objects, not the image.
``mode="device"`` (for GPUs; what ``mode="auto"`` picks there)
    Reference mode's decisions on the model's device without per-mask host
    work (:mod:`.device`): the grid prompts decoded in as few passes as the
    GPU's memory allows by the cached, factorised decoder, the survivors
    upsampled in batches, full-resolution stability scores, box NMS
    (``nms="box"``); :meth:`MaskGenerator.generate_labels` paints the label
    image on the device and reads back only that (for one crop without
    ``min_mask_region_area``; otherwise through RLEs as in reference mode).

Large images (longer side above ``2 * tile_size`` by default) are also covered
by overlapping tiles at native resolution; an object cut by a tile border is
dropped from that tile and kept from a tile that holds it whole, and
duplicates across tiles and crops are removed by NMS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..model import Sam
from ..normalize import to_rgb_uint8
from ..predictor import Predictor
from . import device as _device
from .boxes import batched_mask_to_box, box_area, box_xyxy_to_xywh, is_box_near_crop_edge, nms
from .grid import build_all_layer_point_grids, generate_crop_boxes, generate_tiles
from .labels import masks_to_labels
from .mask_data import MaskData
from .masks import crop_to_rle, mask_nms, paste, tight_crop
from .regions import remove_small_regions
from .rle import area_from_rle, masks_to_rle, rle_to_coco, rle_to_mask
from .stability import calculate_stability_score
from .upsample import Upsampler

log = logging.getLogger(__name__)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


class MaskGenerator:
    """Segment everything: prompt a grid of points, keep good masks, remove duplicates.

    Parameters (names and defaults as segment-anything's ``SamAutomaticMaskGenerator``)
    ----------
    model_or_predictor : Sam, Predictor or str
        A model, a :class:`~napari_mobilesam.predictor.Predictor`, or a registry name.
    points_per_side : int or None
        Grid of ``n x n`` points over the image (and each crop); None when
        ``point_grids`` is given.
    points_per_batch : int
        Points decoded together on a CPU and in reference mode (memory vs speed). On
        a GPU, fast and device modes decode as many as fit in 60% of its free
        memory (at least this many): a 32x32 grid in one pass on a large card.
    pred_iou_thresh : float
        Keep masks whose predicted IoU is above this (0 disables).
    stability_score_thresh : float
        Keep masks whose stability score is at least this (0 disables).
    stability_score_offset : float
        Logit offset of the stability score.
    box_nms_thresh : float
        IoU above which the lower-scoring of two masks of one crop is removed.
    crop_n_layers : int
        Extra layers of zoomed-in crops (layer i: 2**i x 2**i crops).
    crop_nms_thresh : float
        IoU for removing duplicates between crops.
    crop_overlap_ratio : float
        Overlap of crops, as a fraction of the shorter image side.
    crop_n_points_downscale_factor : int
        Points per side shrink by this factor per crop layer.
    point_grids : list of (N, 2) arrays, optional
        Explicit normalised (x, y) grids, one per crop layer.
    min_mask_region_area : int
        Fill holes and remove islands smaller than this many pixels (0 disables).
    output_mode : {"binary_mask", "uncompressed_rle", "coco_rle"}
        Format of each record's ``segmentation``.
    nms : {"auto", "mask", "box"}
        Duplicate removal by mask IoU (fast mode only) or box IoU; ``"auto"``: mask
        in fast mode, box in the others.
    mode : {"auto", "fast", "reference", "device"}
        See the module docstring. ``"device"`` needs ``nms="box"``. ``"auto"``:
        device mode on a GPU (torch backend, unless ``nms="mask"``), fast mode
        elsewhere. :attr:`mode` and :attr:`nms` hold the choices.
    tile_size : int or None
        Also cover the image with overlapping ``tile_size`` tiles at native
        resolution. None: automatic, tiles of the model input size (1024) for images
        whose longer side exceeds twice that; 0: never.
    tile_overlap : int
        Pixels shared by neighbouring tiles. A tile drops objects within 20 px of
        its inner edges (as segment-anything does for crops), so objects up to
        ``tile_overlap - 40`` px wide are always whole in some tile. With automatic
        tiles it is at most a quarter of the tile.
    progress : bool
        Show a progress bar (tqdm, on stderr) over crops and point batches.
    backend : {"torch", "onnx", "auto"}, optional
        What runs the encoder and decoder (see :class:`~napari_mobilesam.predictor.Predictor`);
        with ``"onnx"`` the decoder runs whole per prompt batch (no early IoU filter
        inside it). Default: torch for a model or name, a given Predictor's own backend.
    precision : {"fp32", "bf16", "fp16", "auto"}, optional
        Precision of the image encoder (see :class:`~napari_mobilesam.predictor.Predictor`;
        ``"auto"``: bf16 on GPUs and on CPUs with bf16 units). Default: fp32 for a
        model or name, a given Predictor's own. Reduced precisions also decode the
        grid in 16 bits (float16 on GPUs, bfloat16 on CPUs:
        :meth:`~napari_mobilesam.predictor.Predictor.reduced_decoder`), about twice
        as fast.
    """

    def __init__(
        self,
        model_or_predictor: Sam | Predictor | str,
        *,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Sequence[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        nms: str = "auto",
        mode: str = "auto",
        tile_size: int | None = None,
        tile_overlap: int = 256,
        progress: bool = False,
        backend: str | None = None,
        precision: str | None = None,
    ) -> None:
        if isinstance(model_or_predictor, Predictor):
            if backend is not None or precision is not None:
                raise ValueError(
                    "backend= and precision= are for a model or a name; a Predictor has its own"
                )
            self.predictor = model_or_predictor
        elif isinstance(model_or_predictor, Sam | str):
            self.predictor = Predictor(
                model_or_predictor, backend=backend or "torch", precision=precision or "fp32"
            )
        else:
            raise TypeError(
                "model_or_predictor must be a Sam model, a Predictor or a registry name, "
                f"got {type(model_or_predictor).__name__}"
            )
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        _check_int("points_per_batch", points_per_batch, 1)
        _check_int("crop_n_layers", crop_n_layers, 0)
        _check_int("crop_n_points_downscale_factor", crop_n_points_downscale_factor, 1)
        _check_int("min_mask_region_area", min_mask_region_area, 0)
        _check_int("tile_overlap", tile_overlap, 0)
        if tile_size is not None:
            _check_int("tile_size", tile_size, 0)
            if tile_size and tile_overlap >= tile_size:
                raise ValueError(
                    f"tile_overlap ({tile_overlap}) must be smaller than tile_size ({tile_size})"
                )
        for name, value in (
            ("pred_iou_thresh", pred_iou_thresh),
            ("stability_score_thresh", stability_score_thresh),
            ("box_nms_thresh", box_nms_thresh),
            ("crop_nms_thresh", crop_nms_thresh),
            ("crop_overlap_ratio", crop_overlap_ratio),
        ):
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if not (isinstance(stability_score_offset, int | float) and stability_score_offset > 0):
            raise ValueError(
                f"stability_score_offset must be a positive number, got {stability_score_offset!r}"
            )
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if nms not in ("auto", "mask", "box"):
            raise ValueError(f"nms must be 'auto', 'mask' or 'box', got {nms!r}")
        if mode not in ("auto", "fast", "reference", "device"):
            raise ValueError(f"mode must be 'auto', 'fast', 'reference' or 'device', got {mode!r}")
        if mode in ("reference", "device") and nms == "mask":
            raise ValueError(f"mode={mode!r} follows segment-anything, which uses nms='box'")

        if points_per_side is not None:
            _check_int("points_per_side", points_per_side, 1)
            self.point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
            if len(grids) != crop_n_layers + 1:
                raise ValueError(
                    f"point_grids needs one grid per crop layer ({crop_n_layers + 1}), "
                    f"got {len(grids)}"
                )
            for g in grids:
                if g.ndim != 2 or g.shape[1] != 2 or g.size == 0 or (g < 0).any() or (g > 1).any():
                    raise ValueError("each point grid must be (N, 2) (x, y) values in [0, 1]")
            self.point_grids = grids
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        if mode == "auto":  # the GPU path where it runs, else fast mode
            on_gpu = self.predictor.device.type == "cuda" and self.predictor.backend is None
            mode = "device" if on_gpu and nms != "mask" else "fast"
        if nms == "auto":
            nms = "mask" if mode == "fast" else "box"
        self.nms = nms
        self.mode = mode
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.progress = progress
        self._keep_masks = False  # device mode: keep masks on the device for labels
        if mode == "reference":
            # the reference computation throughout: no decoder cache, plain attention
            self.predictor = Predictor(
                self.predictor.model,
                decoder_cache=False,
                factorized=False,
                backend=self.predictor.backend or "torch",
                precision=self.predictor.precision,
                cuda_graphs=False,
            )

    @property
    def model(self) -> Sam:
        return self.predictor.model

    # -- public ------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        image: np.ndarray,
        *,
        contrast_limits: tuple[float, float] | None = None,
        channels: Sequence[int] | None = None,
        channel_axis: int | None = None,
    ) -> list[dict[str, Any]]:
        """Segment everything in one 2D image.

        Parameters
        ----------
        image : np.ndarray
            (H, W) or (H, W, C) of any numeric dtype; converted with
            :func:`~napari_mobilesam.normalize.to_rgb_uint8` (RGB uint8 unchanged).
        contrast_limits, channels, channel_axis
            Passed to :func:`~napari_mobilesam.normalize.to_rgb_uint8`.

        Returns
        -------
        list of dict
            One record per object with segment-anything's keys: ``segmentation``
            (per ``output_mode``), ``area`` (pixels), ``bbox`` (XYWH), ``predicted_iou``,
            ``point_coords`` ([[x, y]]), ``stability_score``, ``crop_box`` (XYWH).
            Ordered as segment-anything orders them (by NMS rank). Empty when no
            mask passes the filters.
        """
        rgb, data = self._masks_of(image, contrast_limits, channels, channel_axis)
        return self._records(data, rgb.shape[:2])

    @torch.no_grad()
    def generate_labels(
        self,
        image: np.ndarray,
        *,
        contrast_limits: tuple[float, float] | None = None,
        channels: Sequence[int] | None = None,
        channel_axis: int | None = None,
        return_info: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
        """Segment everything and return a label image.

        Parameters
        ----------
        image, contrast_limits, channels, channel_axis
            As for :meth:`generate`.
        return_info : bool
            Also return the scores of each labelled object.

        Returns
        -------
        labels : np.ndarray
            (H, W) uint32, 0 = background, objects 1..N without overlaps. Where
            masks overlap, the one with the higher predicted IoU wins (ties: the
            earlier in :meth:`generate` order); ids are assigned in that priority
            order, so label 1 is the best-scored object. Masks left without pixels
            get no id.
        info : dict of np.ndarray, only with ``return_info``
            Per object, row ``k`` describing label ``k + 1``: ``predicted_iou`` (N,)
            float64, ``stability_score`` (N,) float64, ``point_coords`` (N, 2) float64
            (x, y) of the prompt, ``mask_area`` (N,) int64 pixels of the whole mask
            before overlaps were resolved, ``order`` (N,) int64 index of the mask
            in :meth:`generate` order.
        """
        rgb = to_rgb_uint8(
            image, contrast_limits=contrast_limits, channels=channels, channel_axis=channel_axis
        )
        shape = rgb.shape[:2]
        on_device = (
            self.mode == "device"
            and self.min_mask_region_area == 0
            and len(self._crop_boxes(shape)[0]) == 1
        )
        self._keep_masks = on_device
        try:
            data = self._generate_masks(rgb)
        finally:
            self._keep_masks = False
        if on_device and len(data):
            labels_t, sources_t = _device.labels_from_masks(data["masks"], data["iou_preds"])
            labels = labels_t.cpu().numpy().astype(np.uint32)
            sources = sources_t.numpy().astype(np.int64)
            if return_info:
                areas_all = data["masks"].flatten(1).sum(1).cpu().numpy()
            del data["masks"]
            if not return_info:
                return labels
            return labels, {
                "predicted_iou": np.asarray(data["iou_preds"], dtype=np.float64)[sources],
                "stability_score": np.asarray(data["stability_score"], dtype=np.float64)[sources],
                "point_coords": np.asarray(data["points"], dtype=np.float64).reshape(-1, 2)[
                    sources
                ],
                "mask_area": areas_all[sources].astype(np.int64),
                "order": sources,
            }
        if len(data) == 0:
            labels, sources = np.zeros(shape, dtype=np.uint32), np.zeros(0, dtype=np.int64)
        else:
            crops, boxes = self._crops_and_boxes(data, shape)
            labels, sources = masks_to_labels(
                crops, boxes, np.asarray(data["iou_preds"]), shape, return_sources=True
            )
        if not return_info:
            return labels
        if len(data) == 0:
            empty = np.zeros(0, dtype=np.float64)
            return labels, {
                "predicted_iou": empty,
                "stability_score": empty.copy(),
                "point_coords": np.zeros((0, 2), dtype=np.float64),
                "mask_area": np.zeros(0, dtype=np.int64),
                "order": sources,
            }
        areas = np.array([np.count_nonzero(crops[i]) for i in sources], dtype=np.int64)
        return labels, {
            "predicted_iou": np.asarray(data["iou_preds"], dtype=np.float64)[sources],
            "stability_score": np.asarray(data["stability_score"], dtype=np.float64)[sources],
            "point_coords": np.asarray(data["points"], dtype=np.float64).reshape(-1, 2)[sources],
            "mask_area": areas,
            "order": sources,
        }

    # -- pipeline ----------------------------------------------------------------------

    def _masks_of(self, image, contrast_limits, channels, channel_axis):
        """RGB uint8 version of ``image`` and its final :class:`MaskData`."""
        rgb = to_rgb_uint8(
            image, contrast_limits=contrast_limits, channels=channels, channel_axis=channel_axis
        )
        return rgb, self._generate_masks(rgb)

    def _crop_boxes(self, size: tuple[int, int]) -> tuple[list[list[int]], list[int]]:
        boxes, layers = generate_crop_boxes(size, self.crop_n_layers, self.crop_overlap_ratio)
        tile, overlap = self.tile_size, self.tile_overlap
        if tile is None:
            tile = self.model.img_size if max(size) > 2 * self.model.img_size else 0
            overlap = min(overlap, tile // 4)
        if tile and max(size) > tile:
            tiles = generate_tiles(size, tile, overlap)
            log.info("covering a %dx%d image with %d tiles of %d px", *size, len(tiles), tile)
            boxes += tiles
            layers += [0] * len(tiles)  # tiles use the full grid at native resolution
        return boxes, layers

    def _generate_masks(self, image: np.ndarray) -> MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = self._crop_boxes(orig_size)
        bar = _progress(self.progress, sum(len(self.point_grids[i]) for i in layer_idxs))
        data = MaskData()
        try:
            for crop_box, layer in zip(crop_boxes, layer_idxs, strict=True):
                data.cat(self._process_crop(image, crop_box, layer, orig_size, bar))
        finally:
            if bar is not None:
                bar.close()
        if len(crop_boxes) > 1 and len(data):
            # duplicates between crops: prefer masks from smaller (higher resolution) crops
            scores = 1 / box_area(data["crop_boxes"].float())
            data.filter(self._nms(data, scores, self.crop_nms_thresh, orig_size))
        if self.min_mask_region_area > 0 and len(data):
            nms_thresh = max(self.box_nms_thresh, self.crop_nms_thresh)
            if self.mode in ("reference", "device"):  # full-size masks (RLEs)
                _reference_small_regions(data, self.min_mask_region_area, nms_thresh)
            else:
                self._fast_small_regions(data, nms_thresh, orig_size)
        return data

    def _process_crop(self, image, crop_box, layer, orig_size, bar) -> MaskData:
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1]
        size = cropped.shape[:2]
        self.predictor.set_image(cropped)
        points = self.point_grids[layer] * np.array(size)[None, ::-1]
        process = {"reference": self._batch_reference, "fast": self._batch_fast,
                   "device": self._batch_device}[self.mode]  # fmt: skip
        state = self._fast_state(size) if self.mode == "fast" else None
        per_batch = self._prompts_per_pass(len(points))
        data = MaskData()
        for start in range(0, len(points), per_batch):
            batch = points[start : start + per_batch]
            data.cat(process(batch, size, crop_box, orig_size, state))
            if bar is not None:
                bar.update(len(batch))
        self.predictor.reset_image()
        if len(data) == 0:
            return data
        data.filter(self._nms(data, data["iou_preds"], self.box_nms_thresh, orig_size))
        offset = torch.tensor([[x0, y0, x0, y0]])
        if self.mode == "device":
            data["boxes"] = data["boxes"].cpu()
            if not self._keep_masks:
                data["rles"] = masks_to_rle(_uncrop_masks(data["masks"], crop_box, *orig_size))
                del data["masks"]
            for key in ("iou_preds", "stability_score"):
                data[key] = data[key].cpu()
        if self.mode in ("reference", "device"):
            data["boxes"] = data["boxes"] + offset
        data["points"] = data["points"] + torch.tensor([[x0, y0]], dtype=torch.float64)
        data["crop_boxes"] = torch.tensor([crop_box], dtype=torch.int64).repeat(len(data), 1)
        return data

    def _prompts_per_pass(self, n_points: int) -> int:
        """Grid prompts decoded together: ``points_per_batch`` on a CPU; on a GPU (fast
        and device modes) as many as fit in 60% of its free memory, all of a 32x32
        grid on a large card (one decoder pass instead of 16)."""
        device = self.predictor.device
        if device.type != "cuda" or self.mode == "reference" or self.predictor.backend:
            return self.points_per_batch
        free, _ = torch.cuda.mem_get_info(device)
        low = self.predictor.reduced_decoder()[1] is not None
        per_prompt = PROMPT_BYTES_FP32 // (2 if low else 1)
        return max(self.points_per_batch, min(n_points, int(0.6 * free) // per_prompt))

    def _nms(self, data, scores, thresh, orig_size) -> torch.Tensor:
        if self.nms == "mask":
            crops, boxes = self._crops_and_boxes(data, orig_size)
            return mask_nms(crops, boxes, scores, thresh)
        return nms(data["boxes"].float(), scores, thresh)

    def _crops_and_boxes(self, data: MaskData, shape) -> tuple[list[np.ndarray], np.ndarray]:
        """Tight crop masks and inclusive boxes in image coordinates."""
        if "crops" in data:
            return data["crops"], np.asarray(data["boxes"], dtype=np.int64).reshape(-1, 4)
        crops, boxes = [], []
        for rle in data["rles"]:
            found = tight_crop(rle_to_mask(rle), 0, 0)
            crop, box = found if found is not None else (np.zeros((1, 1), bool), [0, 0, 0, 0])
            crops.append(crop)
            boxes.append(box)
        return crops, np.asarray(boxes, dtype=np.int64).reshape(-1, 4)

    # -- reference mode ----------------------------------------------------------------

    def _batch_reference(self, points, im_size, crop_box, orig_size, _state) -> MaskData:
        pred = self.predictor
        orig_h, orig_w = orig_size
        in_points = torch.as_tensor(
            pred.transform.apply_coords(points, im_size), device=pred.device
        )
        in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=pred.device)
        masks, iou_preds, _ = pred.predict_torch(
            in_points[:, None, :], in_labels[:, None], multimask_output=True, return_logits=True
        )
        data = MaskData(
            masks=masks.flatten(0, 1),
            iou_preds=iou_preds.flatten(0, 1),
            points=torch.as_tensor(points.repeat(masks.shape[1], axis=0)),
        )
        del masks
        if self.pred_iou_thresh > 0.0:
            data.filter(data["iou_preds"] > self.pred_iou_thresh)
        threshold = self.model.mask_threshold
        data["stability_score"] = calculate_stability_score(
            data["masks"], threshold, self.stability_score_offset
        )
        if self.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] >= self.stability_score_thresh)
        data["masks"] = data["masks"] > threshold
        data["boxes"] = batched_mask_to_box(data["masks"])
        keep = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
        if not torch.all(keep):
            data.filter(keep)
        data["rles"] = masks_to_rle(_uncrop_masks(data["masks"], crop_box, orig_h, orig_w))
        del data["masks"]
        data.to_cpu()
        return data

    def _decode_grid(self, points, im_size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Single positive point prompts (x, y in the crop) through :func:`_decode`, with
        the early ``pred_iou_thresh`` filter; returns low-res logits, IoU, prompt indices."""
        pred = self.predictor
        in_points = torch.as_tensor(
            pred.transform.apply_coords(points, im_size), dtype=torch.float32, device=pred.device
        )
        in_labels = torch.ones(in_points.shape[0], 1, dtype=torch.int64, device=pred.device)
        min_iou = self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else None
        return _decode(pred, in_points[:, None, :], in_labels, min_iou)

    # -- device mode -------------------------------------------------------------------

    def _batch_device(self, points, im_size, crop_box, orig_size, _state) -> MaskData:
        pred = self.predictor
        orig_h, orig_w = orig_size
        low_res, iou_preds, prompts = self._decode_grid(points, im_size)
        n_masks = low_res.shape[1]
        masks, iou, stability, index = _device.full_res_masks(
            self.model, low_res.flatten(0, 1), iou_preds.flatten(0, 1), pred.input_size, im_size,
            pred_iou_thresh=self.pred_iou_thresh,
            stability_score_thresh=self.stability_score_thresh,
            stability_score_offset=self.stability_score_offset,
        )  # fmt: skip
        boxes = batched_mask_to_box(masks)
        keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        rows = index[keep]
        pts = torch.as_tensor(points, dtype=torch.float64)[
            prompts.cpu().repeat_interleave(n_masks)[rows.cpu()]
        ]
        return MaskData(
            masks=masks[keep], boxes=boxes[keep], iou_preds=iou[keep],
            stability_score=stability[keep], points=pts,
        )  # fmt: skip

    # -- fast mode ---------------------------------------------------------------------

    def _fast_state(self, size: tuple[int, int]) -> dict:
        pred = self.predictor
        low_res = pred.model.prompt_encoder.mask_input_size
        img = pred.model.img_size
        upsampler = Upsampler.create(low_res, img, pred.input_size, size)
        # low-res rows/columns that pixels of the crop read (one past the image
        # when its size is a multiple of 4: bilinear reads into the padding)
        valid = (int(upsampler.row_hi.max()) + 1, int(upsampler.col_hi.max()) + 1)
        return {"upsampler": upsampler, "valid": valid}

    def _batch_fast(self, points, im_size, crop_box, orig_size, state) -> MaskData:
        low_res, iou_preds, prompts = self._decode_grid(points, im_size)
        n_masks = low_res.shape[1]
        vh, vw = state["valid"]
        low_res_full = low_res.flatten(0, 1)
        low_res = low_res_full[:, :vh, :vw]
        iou_preds = iou_preds.flatten(0, 1)
        pts = torch.as_tensor(points[prompts.cpu().numpy()].repeat(n_masks, axis=0))
        keep = torch.ones(len(iou_preds), dtype=torch.bool, device=low_res.device)
        if self.pred_iou_thresh > 0.0:
            keep &= iou_preds > self.pred_iou_thresh
        threshold = self.model.mask_threshold
        stability = torch.full_like(iou_preds, float("nan"))
        stability[keep] = calculate_stability_score(
            low_res[keep], threshold, self.stability_score_offset
        ).to(stability.dtype)
        if self.stability_score_thresh > 0.0:
            keep &= stability >= self.stability_score_thresh
        positive = low_res > threshold
        keep &= positive.flatten(1).any(dim=1)  # an empty low-res mask upsamples to nothing
        idx = torch.nonzero(keep).flatten().cpu()
        low_boxes = batched_mask_to_box(positive[idx.to(positive.device)]).cpu().numpy()
        found = self._upsample_survivors(
            low_res_full[idx.to(low_res_full.device)], low_boxes, state
        )
        kept = [k for k, f in enumerate(found) if f is not None]
        crops = [found[k][0] for k in kept]
        boxes = [found[k][1] for k in kept]
        orig_h, orig_w = orig_size
        boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.int64).reshape(-1, 4))
        edge = is_box_near_crop_edge(boxes_t, crop_box, [0, 0, orig_w, orig_h])
        sel = [i for i, e in enumerate(edge.tolist()) if not e]
        kept_idx = idx[torch.as_tensor(kept, dtype=torch.long)][sel]
        offset = torch.tensor([[crop_box[0], crop_box[1], crop_box[0], crop_box[1]]])
        return MaskData(
            crops=[crops[i] for i in sel],
            boxes=boxes_t[sel] + offset,
            iou_preds=iou_preds[kept_idx.to(iou_preds.device)].float().cpu(),
            stability_score=stability[kept_idx.to(stability.device)].float().cpu(),
            points=pts[kept_idx],
        )

    def _upsample_survivors(self, low_res: torch.Tensor, low_boxes: np.ndarray, state: dict):
        """Tight crop masks (crop, inclusive box) at crop resolution, or None if empty.

        Each mask is upsampled inside the window its positive low-res samples
        reach; masks whose window covers more than a quarter of the crop go
        through the predictor's exact batched postprocessing instead, which is
        cheaper there.
        """
        up: Upsampler = state["upsampler"]
        pred = self.predictor
        size = pred.original_size
        threshold = self.model.mask_threshold
        out: list = [None] * len(low_res)
        low_cpu = low_res.float().cpu()
        large = []
        for k in range(len(low_cpu)):
            win = up.window(tuple(low_boxes[k]))
            if (win[1] - win[0]) * (win[3] - win[2]) * 4 > size[0] * size[1]:
                large.append(k)
                continue
            logits = up.logits(low_cpu[k], win)
            out[k] = tight_crop((logits > threshold).numpy(), win[0], win[2])
        for start in range(0, len(large), 8):
            ks = large[start : start + 8]
            logits = self.model.postprocess_masks(low_res[ks][:, None], pred.input_size, size)
            masks = (logits[:, 0] > threshold).cpu().numpy()
            for k, mask in zip(ks, masks, strict=True):
                out[k] = tight_crop(mask, 0, 0)
        return out

    def _fast_small_regions(self, data: MaskData, nms_thresh: float, shape) -> None:
        crops, boxes = data["crops"], np.asarray(data["boxes"], dtype=np.int64)
        new_crops, new_boxes, unchanged = [], [], []
        for crop, box in zip(crops, boxes, strict=True):
            crop2, box2, changed = _clean_crop(crop, box, self.min_mask_region_area, shape)
            new_crops.append(crop2)
            new_boxes.append(box2)
            unchanged.append(float(not changed))
        # masks that needed no cleanup win ties in the NMS, as in segment-anything
        scores = torch.tensor(unchanged)
        new_boxes_arr = np.asarray(new_boxes, dtype=np.int64).reshape(-1, 4)
        if self.nms == "mask":
            keep = mask_nms(new_crops, new_boxes_arr, scores, nms_thresh)
        else:
            keep = nms(torch.as_tensor(new_boxes_arr).float(), scores, nms_thresh)
        data["crops"] = new_crops
        data["boxes"] = torch.as_tensor(new_boxes_arr)
        data.filter(keep)

    # -- records -----------------------------------------------------------------------

    def _records(self, data: MaskData, shape: tuple[int, int]) -> list[dict[str, Any]]:
        records = []
        n = len(data)
        if n == 0:
            return records
        boxes = np.asarray(data["boxes"], dtype=np.int64).reshape(-1, 4)
        crop_boxes = np.asarray(data["crop_boxes"]).reshape(-1, 4)
        points = np.asarray(data["points"], dtype=np.float64).reshape(-1, 2)
        iou = np.asarray(data["iou_preds"], dtype=np.float64)
        stab = np.asarray(data["stability_score"], dtype=np.float64)
        for i in range(n):
            if "rles" in data:
                rle = data["rles"][i]
                area = area_from_rle(rle)
                seg = None
            else:
                crop = data["crops"][i]
                area = int(np.count_nonzero(crop))
                seg = (crop, boxes[i])
            if self.output_mode == "binary_mask":
                segmentation = rle_to_mask(rle) if seg is None else paste(*seg, shape)
            else:
                if seg is not None:
                    rle = crop_to_rle(*seg, shape)
                segmentation = rle if self.output_mode == "uncompressed_rle" else rle_to_coco(rle)
            records.append(
                {
                    "segmentation": segmentation,
                    "area": int(area),
                    "bbox": box_xyxy_to_xywh(boxes[i]).tolist(),
                    "predicted_iou": float(iou[i]),
                    "point_coords": [points[i].tolist()],
                    "stability_score": float(stab[i]),
                    "crop_box": box_xyxy_to_xywh(crop_boxes[i]).tolist(),
                }
            )
        return records


# GPU memory one grid prompt takes while decoding, in float32 (half that in 16 bits): a
# few (4096, 256) image-token tensors and the (32, 256, 256) upscaled features. Measured
# on an H200: 21 GiB peak for a 32x32 grid in one pass (11 GiB in 16 bits); sizes the
# decoder passes on a GPU (see _prompts_per_pass).
PROMPT_BYTES_FP32 = 24 * 2**20

# Prompts decoded together on a CPU: a few at a time keeps the per-prompt image
# tensors (4096 x 256 floats each) in cache, ~1.7x faster per prompt than 64.
CPU_DECODE_CHUNK = 4


def _decode(
    pred: Predictor, coords: torch.Tensor, labels: torch.Tensor, min_iou: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode point prompts against the shared embedding, filtering on IoU early.

    The predicted IoU comes from the transformer's output tokens, before the
    upscaling convolutions: prompts none of whose masks has an IoU above
    ``min_iou`` are not upscaled at all.

    Returns
    -------
    low_res : (P, 3, h, w) logits of the P prompts kept
    iou : (P, 3)
    prompts : (P,) their indices in ``coords``
    """
    if pred.backend is not None:
        return _decode_backend(pred, coords, labels, min_iou)
    model = pred.model
    low, dtype = pred.reduced_decoder()  # with a reduced precision: fp16 (GPU) / bf16 (CPU)
    chunk = CPU_DECODE_CHUNK if coords.device.type == "cpu" else len(coords)
    masks, ious, prompts = [], [], []
    for i in range(0, len(coords), chunk):
        points = (coords[i : i + chunk], labels[i : i + chunk])
        sparse, dense = model.prompt_encoder(points, None, None)
        found = None if low is None else _decode_chunk(pred, sparse, dense, min_iou, low, dtype)
        if found is None:  # float32 (also where the reduced one overflowed)
            found = _decode_chunk(pred, sparse, dense, min_iou)
        if found is not False:
            masks.append(found[0])
            ious.append(found[1])
            prompts.append(found[2] + i)
    if not masks:
        h, w = model.prompt_encoder.mask_input_size
        empty = torch.zeros(0, 3, device=coords.device)
        return empty.new_zeros(0, 3, h, w), empty, torch.zeros(0, dtype=torch.long)
    return torch.cat(masks), torch.cat(ious), torch.cat(prompts)


def _decode_chunk(pred: Predictor, sparse, dense, min_iou, low=None, dtype=None):
    """One chunk of :func:`_decode`: (low_res, iou, rows), False when no prompt passes
    ``min_iou``, or None when the reduced-precision decoder ``low`` gave non-finite values."""
    dec = pred.model.mask_decoder
    if low is None:
        hs, keys, size = dec.forward_tokens(None, None, sparse, None, pred._image_cache(dense))
        iou = dec.iou_from_tokens(hs, True)
    else:
        cache = pred._image_cache(dense, dtype)
        hs, keys, size = low.forward_tokens(None, None, sparse.to(dtype), None, cache)
        iou = dec.iou_from_tokens(hs.float(), True)  # the float32 head
    sel = torch.arange(len(iou), device=iou.device)
    if min_iou is not None:
        sel = torch.nonzero((iou > min_iou).any(dim=1)).flatten()
        if len(sel) == 0:
            return None if low is not None and not torch.isfinite(iou).all() else False
        hs, iou = hs[sel], iou[sel]
        keys = keys if keys.shape[0] == 1 else keys[sel]
    low_res = (dec if low is None else low).masks_from_tokens(hs, keys, size, True).float()
    if low is not None and not (torch.isfinite(iou).all() and torch.isfinite(low_res).all()):
        return None
    return low_res, iou, sel


def _decode_backend(
    pred: Predictor, coords: torch.Tensor, labels: torch.Tensor, min_iou: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_decode` through the predictor's backend (e.g. onnxruntime): whole decoder."""
    low_res, iou = pred.decode_backend(coords, labels)
    low_res, iou = low_res[:, 1:], iou[:, 1:]  # the three multimask outputs
    sel = torch.arange(len(iou), device=iou.device)
    if min_iou is not None:
        sel = torch.nonzero((iou > min_iou).any(dim=1)).flatten()
    return low_res[sel], iou[sel], sel


def _uncrop_masks(masks: torch.Tensor, crop_box, orig_h: int, orig_w: int) -> torch.Tensor:
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    return torch.nn.functional.pad(masks, (x0, pad_x - x0, y0, pad_y - y0), value=0)


def _reference_small_regions(data: MaskData, min_area: int, nms_thresh: float) -> None:
    """segment-anything's ``postprocess_small_regions`` on full-size masks."""
    new_masks, scores = [], []
    for rle in data["rles"]:
        mask = rle_to_mask(rle)
        mask, changed = remove_small_regions(mask, min_area, mode="holes")
        unchanged = not changed
        mask, changed = remove_small_regions(mask, min_area, mode="islands")
        unchanged = unchanged and not changed
        new_masks.append(torch.as_tensor(mask)[None])
        scores.append(float(unchanged))
    masks = torch.cat(new_masks, dim=0)
    boxes = batched_mask_to_box(masks)
    keep = nms(boxes.float(), torch.as_tensor(scores), nms_thresh)
    for i in keep.tolist():
        if scores[i] == 0.0:
            data["rles"][i] = masks_to_rle(masks[i][None])[0]
            data["boxes"][i] = boxes[i]
    data.filter(keep)


def _clean_crop(crop: np.ndarray, box, min_area: int, shape) -> tuple[np.ndarray, list, bool]:
    """Fill small holes, remove small islands of one crop mask, as on the full mask.

    Holes are found in a window around the box wide enough that the background
    around the object alone holds ``min_area`` pixels (or reaches the image
    border), so a background region that is large in the full image is never
    mistaken for a small hole.
    """
    h, w = shape
    x0, y0, x1, y1 = (int(v) for v in box)
    pad = -(-min_area // max(1, min(x1 - x0 + 1, y1 - y0 + 1))) + 1
    wx0, wy0 = max(0, x0 - pad), max(0, y0 - pad)
    wx1, wy1 = min(w - 1, x1 + pad), min(h - 1, y1 + pad)
    win = np.zeros((wy1 - wy0 + 1, wx1 - wx0 + 1), dtype=bool)
    win[y0 - wy0 : y1 - wy0 + 1, x0 - wx0 : x1 - wx0 + 1] = crop
    win, holes_changed = remove_small_regions(win, min_area, mode="holes")
    win, islands_changed = remove_small_regions(win, min_area, mode="islands")
    if not (holes_changed or islands_changed):
        return crop, [x0, y0, x1, y1], False
    found = tight_crop(win, wy0, wx0)
    if found is None:  # cannot happen: islands keep the largest region
        return crop, [x0, y0, x1, y1], True
    return found[0], found[1], True


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="segment everything", unit="pt", leave=False)
