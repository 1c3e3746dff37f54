"""The per-crop steps of segment-everything, one :class:`Pipeline` per mode.

:class:`~napari_mobilesam.everything.MaskGenerator` cuts the image into crops (and
tiles) and merges their masks; for each crop a pipeline embeds it with the engine,
decodes its point grid in batches and turns the decoder's output into a
:class:`~napari_mobilesam.everything.MaskData` of kept masks. The modes differ in
which engine decoder they call and how they filter and store the masks:

- :class:`ReferencePipeline` (``mode="reference"``): segment-anything's steps on the
  engine's reference decoder (:mod:`.pipeline`);
- :class:`~napari_mobilesam.everything.fast.FastPipeline` (``mode="fast"``): the same
  decisions on low-res logits, survivors upsampled in windows (:mod:`.fast`);
- :class:`~napari_mobilesam.everything.device.DevicePipeline` (``mode="device"``):
  the reference decisions on batched tensors on the model's device (:mod:`.device`).

Pipelines hold no image: each crop's embedding and decoder state live in a
:class:`CropImage` made by :meth:`Pipeline.prepare`, so a generator can run in
several threads at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from ..engine import Decoded, Decoder, Engine, ImageEmbedding, Prompts
from ..transforms import apply_boxes, apply_coords
from .boxes import batched_mask_to_box, is_box_near_crop_edge
from .mask_data import MaskData
from .rle import masks_to_rle
from .stability import calculate_stability_score

__all__ = ["CropImage", "Filters", "Pipeline", "ReferencePipeline", "uncrop_masks"]


@dataclass(frozen=True)
class Filters:
    """The mask filters of a generator (0 disables a threshold)."""

    pred_iou_thresh: float
    stability_score_thresh: float
    stability_score_offset: float


@dataclass(frozen=True)
class CropImage:
    """One crop as the decoder sees it: its embedding and the decoder's state for it."""

    embedding: ImageEmbedding
    state: object

    @property
    def size(self) -> tuple[int, int]:
        """(h, w) of the crop."""
        return self.embedding.original_size

    @property
    def input_size(self) -> tuple[int, int]:
        """(h, w) of the crop in the model's input frame."""
        return self.embedding.input_size


class Pipeline(ABC):
    """One segment-everything mode: a crop's point batches -> kept masks.

    Parameters
    ----------
    engine : Engine
    filters : Filters
    points_per_batch : int
        Points decoded together (on a GPU, fast and device modes take as many as fit).
    """

    #: the ``mode=`` name
    mode: str = ""
    #: whether masks end as full-size RLEs (True) or tight crops (False)
    full_size: bool = True

    def __init__(self, engine: Engine, filters: Filters, points_per_batch: int) -> None:
        self.engine = engine
        self.filters = filters
        self.points_per_batch = points_per_batch

    @property
    def decoder(self) -> Decoder:
        """The engine decoder this mode uses (default: the grid decoder)."""
        return self.engine.grid_decoder

    @property
    def model(self):
        return self.engine.model

    def prepare(self, rgb: np.ndarray, embedding: ImageEmbedding | None = None) -> CropImage:
        """Embed an (h, w, 3) uint8 crop and prepare the decoder for it; with
        ``embedding`` (the crop's, computed before), the encoder does not run."""
        if embedding is None:
            embedding = self.engine.embed_image(rgb)
        else:
            embedding = embedding.to(self.engine.device)
        self.engine.apply_threads()
        return CropImage(embedding, self.decoder.prepare(embedding.features))

    def crop_state(self, image: CropImage) -> object:
        """Work shared by the batches of one crop (default: none)."""
        return None

    #: whether :meth:`batch` may run on worker threads (:mod:`..engine.workers`)
    parallel_batches = False

    def batch_workers(self, n_points: int) -> int:
        """Worker threads for a crop's ``n_points`` grid points: the engine policy's
        :meth:`~napari_mobilesam.engine.Policy.batch_workers` where this mode allows it
        (:attr:`parallel_batches`), at most one per decoder call's prompts
        (``Policy.cpu_prompts_per_pass``); else 1."""
        if not self.parallel_batches:
            return 1
        policy = self.engine.policy
        calls = -(-n_points // max(1, policy.cpu_prompts_per_pass))
        return max(1, min(calls, policy.batch_workers(self.engine.device)))

    def prompts_per_pass(self, n_points: int) -> int:
        """Grid prompts decoded together: ``points_per_batch``, or on a GPU as many as
        fit its free memory (:meth:`~napari_mobilesam.engine.Policy.prompts_per_pass`)."""
        if not self.decoder.on_device:
            return self.points_per_batch
        bits = getattr(self.decoder, "bits", 32)
        return self.engine.policy.prompts_per_pass(
            self.engine.device, n_points, self.points_per_batch, bits
        )

    #: dtype of the point coordinates given to the decoder
    coords_dtype = torch.float32

    def decode_grid(
        self, image: CropImage, points: np.ndarray, min_iou=None, boxes: np.ndarray | None = None
    ) -> Decoded:
        """Single positive point prompts, (x, y) in the crop, through the decoder.

        With ``boxes`` ((N, 4) XYXY in the crop, one per point), each prompt is that box
        alone and the decoder gives one mask per prompt (box refinement,
        :mod:`.refine`); ``points`` then only name the prompts' grid points.
        """
        dev = self.engine.device
        if boxes is not None:
            frame = apply_boxes(np.asarray(boxes, np.float64), image.size, max(image.input_size))
            prompts = Prompts(
                None, None, torch.as_tensor(frame, dtype=self.coords_dtype, device=dev)
            )
        else:
            coords = apply_coords(points, image.size, max(image.input_size))
            coords = torch.as_tensor(coords, dtype=self.coords_dtype, device=dev)
            labels = torch.ones(len(coords), 1, dtype=torch.int64, device=dev)
            prompts = Prompts(coords[:, None, :], labels)
        self.engine.apply_threads()
        return self.decoder.decode(image.state, prompts, multimask=boxes is None, min_iou=min_iou)

    def crop_frame_boxes(self, data: MaskData, crop_box) -> np.ndarray:
        """(N, 4) XYXY boxes (inclusive) of a crop's masks from :meth:`batch`, in the
        crop's pixels (what :meth:`decode_grid` takes as ``boxes``)."""
        boxes = np.asarray(data["boxes"].cpu(), dtype=np.float64).reshape(-1, 4)
        if self.boxes_in_image:
            boxes = boxes - np.array([crop_box[0], crop_box[1]] * 2, dtype=np.float64)
        return boxes

    #: whether :meth:`batch` gives boxes in image pixels (else in the crop's)
    boxes_in_image = False

    @abstractmethod
    def batch(self, image: CropImage, points, crop_box, orig_size, state, boxes=None) -> MaskData:
        """The kept masks of one batch of ``points`` (x, y in the crop); with ``boxes``
        (XYXY in the crop, one per point) the boxes are the prompts (:meth:`decode_grid`)."""

    def finish(self, data: MaskData, crop_box, orig_size, keep_masks: bool) -> MaskData:
        """A crop's masks after its NMS, in image coordinates (boxes and points)."""
        x0, y0 = crop_box[:2]
        data["boxes"] = data["boxes"] + torch.tensor([[x0, y0, x0, y0]])
        return data


class ReferencePipeline(Pipeline):
    """segment-anything's ``SamAutomaticMaskGenerator`` step by step, on the engine's
    reference decoder: every mask upsampled to full resolution, filters and boxes on
    full-resolution logits, RLEs."""

    mode = "reference"
    coords_dtype = torch.float64  # (as segment-anything's generator gives them)

    @property
    def decoder(self) -> Decoder:
        return self.engine.reference_decoder

    def prompts_per_pass(self, n_points: int) -> int:
        return self.points_per_batch

    def batch(self, image: CropImage, points, crop_box, orig_size, state, boxes=None) -> MaskData:
        orig_h, orig_w = orig_size
        decoded = self.decode_grid(image, points, boxes=boxes)
        masks = self.engine.frames.masks(
            decoded.low_res, image.input_size, image.size, return_logits=True
        )
        data = MaskData(
            masks=masks.flatten(0, 1),
            iou_preds=decoded.iou.flatten(0, 1),
            points=torch.as_tensor(points.repeat(masks.shape[1], axis=0)),
        )
        del masks
        f = self.filters
        if f.pred_iou_thresh > 0.0:
            data.filter(data["iou_preds"] > f.pred_iou_thresh)
        threshold = self.model.mask_threshold
        data["stability_score"] = calculate_stability_score(
            data["masks"], threshold, f.stability_score_offset
        )
        if f.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] >= f.stability_score_thresh)
        data["masks"] = data["masks"] > threshold
        data["boxes"] = batched_mask_to_box(data["masks"])
        keep = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
        if not torch.all(keep):
            data.filter(keep)
        data["rles"] = masks_to_rle(uncrop_masks(data["masks"], crop_box, orig_h, orig_w))
        del data["masks"]
        data.to_cpu()
        return data


def uncrop_masks(masks: torch.Tensor, crop_box, orig_h: int, orig_w: int) -> torch.Tensor:
    """(N, h, w) masks of a crop -> (N, H, W) masks of the image (zero outside)."""
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    return torch.nn.functional.pad(masks, (x0, pad_x - x0, y0, pad_y - y0), value=0)
