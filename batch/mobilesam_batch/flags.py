"""The segment-everything flags of ``mobilesam-everything``, declared one by one.

Each :class:`Flag` names a :class:`~napari_mobilesam.everything.MaskGenerator`
keyword, its type and its help line. Defaults are the library's own, read from
``MaskGenerator.__init__``'s signature so that they cannot drift apart;
``tests/test_batch_cli.py`` checks that every keyword is either a flag here or in
:data:`NOT_FLAGS`, so a new library parameter fails a test until it is declared.
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass
from typing import Any

__all__ = ["GENERATOR_FLAGS", "NOT_FLAGS", "Flag", "add_generator_flags", "generator_defaults"]


@dataclass(frozen=True)
class Flag:
    """One MaskGenerator keyword exposed as ``--name-with-dashes``.

    Parameters
    ----------
    name : str
        The keyword of ``MaskGenerator.__init__``.
    kind : {int, float, str}
        Type of the value on the command line.
    help : str
        One line; the default is appended in brackets.
    choices : tuple of str
        Allowed values of a ``str`` flag (empty: any).
    """

    name: str
    kind: type
    help: str
    choices: tuple[str, ...] = ()

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


#: Every MaskGenerator keyword the tool exposes, in help order.
GENERATOR_FLAGS: tuple[Flag, ...] = (
    Flag("points_per_side", int, "grid of N x N prompt points over each image and crop"),
    Flag("points_per_batch", int, "points decoded together (memory against speed); on a GPU "
         "at least this many, as many as fit in 60%% of its free memory"),
    Flag("pred_iou_thresh", float, "keep masks whose predicted IoU is above this (0: all)"),
    Flag("stability_score_thresh", float, "keep masks whose stability score is at least this "
         "(0: all)"),
    Flag("stability_score_offset", float, "logit offset of the stability score"),
    Flag("box_nms_thresh", float, "IoU above which the lower-scoring of two masks is removed"),
    Flag("crop_n_layers", int, "extra layers of zoomed-in crops (layer i: 2**i x 2**i crops)"),
    Flag("crop_nms_thresh", float, "IoU for removing duplicates between crops"),
    Flag("crop_overlap_ratio", float, "overlap of crops, as a fraction of the shorter side"),
    Flag("crop_n_points_downscale_factor", int, "points per side shrink by this per crop layer"),
    Flag("min_mask_region_area", int, "fill holes and remove islands smaller than this many "
         "pixels (0: off)"),
    Flag("refine_rounds", int, "box refinement: prompt each grid mask again with its own box "
         "this many times (0: off; 1 lifts recall on trained models, about 1.6x the time)"),
    Flag("refine_min_iou", float, "with --refine-rounds: refine grid masks whose predicted IoU "
         "is above this"),
    Flag("min_visible_fraction", float, "label images: drop an object when less than this "
         "fraction of its mask is left visible under better-scored ones (0: keep slivers)"),
    Flag("max_covered_fraction", float, "drop a mask when more than this fraction of it lies "
         "inside better-scored masks: parts of a cell, near-copies (1: keep every mask)"),
    Flag("nms", str, "duplicate removal by mask IoU or box IoU; auto: mask in fast mode, box "
         "otherwise", choices=("auto", "mask", "box")),
    Flag("mode", str, "auto: device mode on a GPU, fast mode elsewhere; reference: "
         "segment-anything's computation", choices=("auto", "fast", "reference", "device")),
    Flag("tile_size", int, "also cover the image with tiles of this size at native resolution "
         "(0: never; default: automatic for images longer than twice the model input)"),
    Flag("tile_overlap", int, "pixels shared by neighbouring tiles"),
)  # fmt: skip

#: MaskGenerator keywords that are not flags: the model comes from --model/--weights,
#: --backend and --precision; the tool keeps records out and draws its own progress.
NOT_FLAGS: tuple[str, ...] = (
    "model_or_predictor",
    "point_grids",
    "output_mode",
    "progress",
    "backend",
    "precision",
)


def generator_defaults() -> dict[str, Any]:
    """``name -> default`` of every flag, as ``MaskGenerator.__init__`` declares them."""
    from napari_mobilesam.everything import MaskGenerator

    params = inspect.signature(MaskGenerator.__init__).parameters
    return {flag.name: params[flag.name].default for flag in GENERATOR_FLAGS}


def add_generator_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Add one option per :data:`GENERATOR_FLAGS` entry; returns their names.

    Every option defaults to None (left out: the library default applies).
    """
    group = parser.add_argument_group(
        "segment-everything parameters (defaults: the library's, shown in brackets)"
    )
    defaults = generator_defaults()
    for flag in GENERATOR_FLAGS:
        shown = defaults[flag.name]
        if shown is None:
            shown = "automatic"
        elif flag.kind is float:
            shown = f"{shown:g}"
        kwargs: dict[str, Any] = {"dest": flag.name, "default": None,
                                  "help": f"{flag.help} [{shown}]"}  # fmt: skip
        if flag.choices:
            kwargs["choices"] = list(flag.choices)
        else:
            kwargs["type"] = flag.kind
            kwargs["metavar"] = "N" if flag.kind is int else "X"
        group.add_argument(flag.option, **kwargs)
    return [flag.name for flag in GENERATOR_FLAGS]
