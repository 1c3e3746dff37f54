"""Segment everything: a grid of point prompts, filters, duplicate removal, labels.

:class:`MaskGenerator` is the entry point; the modules hold the small pure
functions it is built from (grids and crops, boxes and NMS, stability, RLE,
crop masks, small-region cleanup, label images).
"""

from .generator import MaskGenerator
from .mask_data import MaskData

__all__ = ["MaskData", "MaskGenerator"]
