"""``MaskGenerator``: segment everything in an image with a grid of point prompts.

The generator covers the image with crops (and, for large images, tiles), runs its
mode's :class:`~napari_mobilesam.everything.pipeline.Pipeline` on each, and merges
the crops' masks (NMS, small-region cleanup) into segment-anything's records or a
label image. The pipelines call the predictor's engine
(:mod:`napari_mobilesam.engine`), never the predictor's current image, so a
generator and the predictor it was given can be used from different threads at once:

``mode="reference"``
    segment-anything's ``SamAutomaticMaskGenerator`` step by step on the engine's
    reference decoder (:mod:`.pipeline`). It reproduces the reference's outputs.
``mode="fast"`` (what ``mode="auto"``, the default, picks on a CPU)
    The same decisions made earlier and cheaper (:mod:`.fast`); duplicates are
    removed by mask IoU (``nms="mask"``) or box IoU (``nms="box"``).
``mode="device"`` (for GPUs; what ``mode="auto"`` picks there)
    Reference mode's decisions on the model's device without per-mask host work
    (:mod:`.device`); :meth:`MaskGenerator.generate_labels` paints the label image on
    the device and reads back only that (for one crop without
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
from ..predictor import ImageEmbedding, Predictor
from ..validation import check_int
from .boxes import box_area, nms
from .covered import covered_masks, covered_on_device
from .device import DevicePipeline, labels_from_masks
from .fast import FastPipeline, small_regions_of_crops
from .grid import build_all_layer_point_grids, generate_crop_boxes, generate_tiles
from .labels import masks_to_labels
from .mask_data import MaskData
from .masks import mask_nms
from .pipeline import Filters, Pipeline, ReferencePipeline
from .records import crops_and_boxes, label_info, records, reference_small_regions
from .refine import decode_prompts, refine_crop

log = logging.getLogger(__name__)

#: the pipeline of each ``mode``
PIPELINES: dict[str, type[Pipeline]] = {
    p.mode: p for p in (ReferencePipeline, FastPipeline, DevicePipeline)
}
OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
#: largest ``points_per_side``: a million prompts per image and crop (SAM uses 32)
MAX_POINTS_PER_SIDE = 1024
#: most rounds of box refinement (masks settle within two or three)
MAX_REFINE_ROUNDS = 8


class MaskGenerator:
    """Segment everything: prompt a grid of points, keep good masks, remove duplicates.

    Parameters (names and defaults as segment-anything's ``SamAutomaticMaskGenerator``)
    ----------
    model_or_predictor : Sam, Predictor or str
        A model, a :class:`~napari_mobilesam.predictor.Predictor`, or a registry name.
    points_per_side : int or None
        Grid of ``n x n`` points over the image (and each crop), 1 to
        :data:`MAX_POINTS_PER_SIDE`; None when ``point_grids`` is given.
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
    refine_rounds : int
        Box refinement (:mod:`.refine`): the grid's masks that pass
        ``refine_min_iou`` are prompted again with their own bounding boxes this many
        times, and the last round's masks are filtered and merged as the grid's would
        be. 0 (default): segment-anything's generator, the grid's masks themselves.
        Each round costs about one more decoder pass per object found.
    refine_min_iou : float in [0, 1]
        With ``refine_rounds``: the predicted IoU above which a grid mask is refined
        (the loose filter before the rounds).
    min_visible_fraction : float in [0, 1]
        Label images only (:meth:`generate_labels`): an object keeps its id only if
        at least this fraction of its mask stays visible under the better-scored
        masks; the rest of a mask that falls short becomes background rather than a
        sliver around its neighbours. 0: every mask with a visible pixel gets an id.
    max_covered_fraction : float in [0, 1]
        Drop a mask when more than this fraction of its pixels lies inside
        better-scored masks (higher predicted IoU) kept before it: a part of a cell
        next to the whole cell, or a near-copy that NMS let through
        (:mod:`.covered`), in every mode. It applies to :meth:`generate`'s records
        and, before ``min_visible_fraction``, to :meth:`generate_labels`. 1 keeps
        every mask: segment-anything's records, which may hold an object and its
        parts (a nucleus inside its cell, a cell's lobe).
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
        :class:`~napari_mobilesam.engine.reduced.ReducedDecoder`).
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
        refine_rounds: int = 0,
        refine_min_iou: float = 0.5,
        min_visible_fraction: float = 0.5,
        max_covered_fraction: float = 0.5,
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
        check_int(points_per_batch, "points_per_batch", minimum=1)
        check_int(crop_n_layers, "crop_n_layers", minimum=0)
        check_int(crop_n_points_downscale_factor, "crop_n_points_downscale_factor", minimum=1)
        check_int(min_mask_region_area, "min_mask_region_area", minimum=0)
        check_int(refine_rounds, "refine_rounds", minimum=0, maximum=MAX_REFINE_ROUNDS)
        check_int(tile_overlap, "tile_overlap", minimum=0)
        if tile_size is not None:
            check_int(tile_size, "tile_size", minimum=0)
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
            ("min_visible_fraction", min_visible_fraction),
            ("refine_min_iou", refine_min_iou),
            ("max_covered_fraction", max_covered_fraction),
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
            # beyond MAX_POINTS_PER_SIDE the grid alone outgrows memory (1e5 per side: 75 GiB)
            check_int(points_per_side, "points_per_side", minimum=1, maximum=MAX_POINTS_PER_SIDE)
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
        self.min_visible_fraction = min_visible_fraction
        self.refine_rounds = refine_rounds
        self.refine_min_iou = refine_min_iou
        self.output_mode = output_mode
        engine = self.predictor.engine
        if mode == "auto":  # the GPU path where it runs, else fast mode
            on_gpu = engine.device.type == "cuda" and engine.grid_decoder.on_device
            mode = "device" if on_gpu and nms != "mask" else "fast"
        if nms == "auto":
            nms = "mask" if mode == "fast" else "box"
        self.nms = nms
        self.mode = mode
        self.max_covered_fraction = max_covered_fraction
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.progress = progress
        filters = Filters(pred_iou_thresh, stability_score_thresh, stability_score_offset)
        #: this mode's steps for each crop, on the predictor's engine
        self.pipeline: Pipeline = PIPELINES[mode](engine, filters, points_per_batch)
        #: the loose filters of the masks that box refinement prompts again
        seed_filters = Filters(refine_min_iou, 0.0, stability_score_offset)
        self._seed_pipeline: Pipeline = PIPELINES[mode](engine, seed_filters, points_per_batch)

    @property
    def model(self) -> Sam:
        return self.predictor.model

    # -- public ------------------------------------------------------------------------

    def describe(self) -> str:
        """What runs, as chosen: the predictor's engine (:meth:`Predictor.describe`), the
        mode, and the worker threads of the prompt batches of the first crop layer when
        there are several (fast mode on a CPU), e.g. ``"cpu: torch, 2 threads
        (adaptive), fp32; fast mode, prompt batches on 2 worker threads"``."""
        text = f"{self.predictor.describe()}; {self.mode} mode"
        workers = self.pipeline.batch_workers(len(self.point_grids[0]))
        if workers > 1:
            text += f", prompt batches on {workers} worker threads"
        if self.refine_rounds:
            rounds = self.refine_rounds
            text += f", box refinement ({rounds} round{'s' if rounds > 1 else ''})"
        return text

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
        embedding: ImageEmbedding | None = None,
    ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
        """Segment everything and return a label image.

        Parameters
        ----------
        image, contrast_limits, channels, channel_axis
            As for :meth:`generate`.
        return_info : bool
            Also return the scores of each labelled object.
        embedding : ImageEmbedding, optional
            The whole image's embedding, computed before from the same RGB image (e.g.
            read from an embedding store): used for the crop that covers the whole
            image instead of running the encoder (other crops and tiles are embedded
            as usual). Its ``original_size`` must be the image's (H, W).

        Returns
        -------
        labels : np.ndarray
            (H, W) uint32, 0 = background, objects 1..N without overlaps. Where
            masks overlap, the one with the higher predicted IoU wins (ties: the
            earlier in :meth:`generate` order); ids are assigned in that priority
            order, so label 1 is the best-scored object. Masks left without pixels,
            or with less than ``min_visible_fraction`` of their pixels visible, get
            no id.
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
        if embedding is not None and tuple(embedding.original_size) != tuple(shape):
            raise ValueError(
                f"embedding is of a {tuple(embedding.original_size)} image, not of this "
                f"{tuple(shape)} one: give the embedding of this image, or none"
            )
        on_device = (
            self.mode == "device"
            and self.min_mask_region_area == 0
            and len(self._crop_boxes(shape)[0]) == 1
        )
        data = self._generate_masks(rgb, keep_masks=on_device, embedding=embedding)
        if on_device and len(data):
            data.filter(
                ~covered_on_device(data["masks"], data["iou_preds"], self.max_covered_fraction)
            )
            labels_t, sources_t = labels_from_masks(
                data["masks"], data["iou_preds"], min_visible=self.min_visible_fraction
            )
            labels = labels_t.cpu().numpy().astype(np.uint32)
            sources = sources_t.numpy().astype(np.int64)
            areas = data["masks"].flatten(1).sum(1).cpu().numpy() if return_info else None
            del data["masks"]
        elif len(data) == 0:
            labels, sources = np.zeros(shape, dtype=np.uint32), np.zeros(0, dtype=np.int64)
            areas = np.zeros(0, dtype=np.int64)
        else:
            crops, boxes = self._crops_and_boxes(data, shape)
            labels, sources = masks_to_labels(
                crops, boxes, np.asarray(data["iou_preds"]), shape,
                min_visible=self.min_visible_fraction, return_sources=True,
            )  # fmt: skip
            areas = np.array([np.count_nonzero(c) for c in crops], dtype=np.int64)
        if not return_info:
            return labels
        return labels, label_info(data, sources, areas)

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

    def _generate_masks(
        self, image: np.ndarray, keep_masks: bool = False, embedding=None
    ) -> MaskData:
        """The final masks of an RGB uint8 image; ``keep_masks``: device mode's masks stay
        on the device (one crop only); ``embedding``: the whole image's, if known."""
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = self._crop_boxes(orig_size)
        bar = _progress(self.progress, sum(len(self.point_grids[i]) for i in layer_idxs))
        data = MaskData()
        try:
            whole = [0, 0, orig_size[1], orig_size[0]]
            for crop_box, layer in zip(crop_boxes, layer_idxs, strict=True):
                known = embedding if list(crop_box) == whole else None
                data.cat(
                    self._process_crop(image, crop_box, layer, orig_size, bar, keep_masks, known)
                )
        finally:
            if bar is not None:
                bar.close()
        if len(crop_boxes) > 1 and len(data):
            # duplicates between crops: prefer masks from smaller (higher resolution) crops
            scores = 1 / box_area(data["crop_boxes"].float())
            data.filter(self._nms(data, scores, self.crop_nms_thresh, orig_size))
        if self.min_mask_region_area > 0 and len(data):
            nms_thresh = max(self.box_nms_thresh, self.crop_nms_thresh)
            if self.pipeline.full_size:  # full-size masks (RLEs)
                reference_small_regions(data, self.min_mask_region_area, nms_thresh)
            else:
                small_regions_of_crops(
                    data, self.min_mask_region_area, nms_thresh, orig_size, self.nms
                )
        if self.max_covered_fraction < 1 and len(data) and "masks" not in data:
            # (masks kept on the device: generate_labels drops covered ones there)
            crops, boxes = self._crops_and_boxes(data, orig_size)
            scores = np.asarray(data["iou_preds"], dtype=np.float64)
            data.filter(~covered_masks(crops, boxes, scores, orig_size, self.max_covered_fraction))
        return data

    def _process_crop(
        self, image, crop_box, layer, orig_size, bar, keep_masks, embedding=None
    ) -> MaskData:
        x0, y0, x1, y1 = crop_box
        pipeline = self.pipeline
        crop = pipeline.prepare(np.ascontiguousarray(image[y0:y1, x0:x1]), embedding)
        points = self.point_grids[layer] * np.array(crop.size)[None, ::-1]
        state = pipeline.crop_state(crop)
        if self.refine_rounds:
            data = refine_crop(
                self._seed_pipeline, pipeline, self.refine_rounds, crop, points, crop_box,
                orig_size, state, bar,
                dedup=lambda d: self._nms(d, d["iou_preds"], self.box_nms_thresh, orig_size),
            )  # fmt: skip
        else:
            data = decode_prompts(pipeline, crop, points, crop_box, orig_size, state, bar)
        del crop  # the crop's embedding is not needed below
        if len(data) == 0:
            return data
        data.filter(self._nms(data, data["iou_preds"], self.box_nms_thresh, orig_size))
        data = pipeline.finish(data, crop_box, orig_size, keep_masks)
        data["points"] = data["points"] + torch.tensor([[x0, y0]], dtype=torch.float64)
        data["crop_boxes"] = torch.tensor([crop_box], dtype=torch.int64).repeat(len(data), 1)
        return data

    def _nms(self, data, scores, thresh, orig_size) -> torch.Tensor:
        if self.nms == "mask":
            crops, boxes = self._crops_and_boxes(data, orig_size)
            return mask_nms(crops, boxes, scores, thresh)
        return nms(data["boxes"].float(), scores, thresh)

    def _crops_and_boxes(self, data: MaskData, shape) -> tuple[list[np.ndarray], np.ndarray]:
        return crops_and_boxes(data, shape)

    def _records(self, data: MaskData, shape: tuple[int, int]) -> list[dict[str, Any]]:
        return records(data, shape, self.output_mode)


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="segment everything", unit="pt", leave=False)
