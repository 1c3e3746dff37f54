"""The original code, built here so that benchmarks can time it in the same run as ours.

MobileSAM's ``SamPredictor``, ``SamAutomaticMaskGenerator``, prompt encoder, mask
decoder and their utilities are segment-anything 1.0 (Meta's package, on PyPI);
only its image encoder (TinyViT, ``mobile_sam``) is its own and is not on PyPI.
:func:`load` builds the most original pipeline it can find:

- ``mobile_sam`` importable (``pip install git+https://github.com/ChaoningZhang/MobileSAM``):
  all of it is the original (``source == "mobile_sam"``);
- else ``segment_anything`` importable: segment-anything's predictor, generator,
  prompt encoder and mask decoder around our reference-path TinyViT
  (:func:`napari_mobilesam.accel.reference` of ``load_model(optimize=False)``: the
  original's computation step by step, in the original's memory layout, contiguous
  NCHW, where our optimised models run channels-last;
  ``source == "segment_anything + our reference TinyViT"``). Where it still differs,
  it is faster than the original: the attention scales q instead of the scores and
  adds the bias in place.

Where it looks: ``sys.path`` first, then ``$MOBILESAM_ORIGINAL`` (when set) and
``<repo>/.original``,
which ``.ci/run`` fills with::

    pip install --no-deps --target .original segment-anything==1.0 torchvision==0.28.0

(the torchvision release that matches torch 2.13; pick the one matching your torch).

torchvision: the original imports it for PIL resizing and for NMS. PyPI's
torchvision wheels are CUDA builds whose compiled operators do not load beside a
CPU-only torch; then :func:`load` registers ``torchvision::nms`` with a pure-torch
kernel (:func:`napari_mobilesam.everything.boxes.nms`, the same greedy rule: sort by
score, drop boxes with IoU above the threshold) and skips torchvision's meta-kernel
registrations. Everything else is torchvision's own Python code. ``nms_kernel``
says which kernel ran.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

#: MobileSAM's ``vit_t`` settings of the prompt encoder and mask decoder (``build_sam``)
EMBED_DIM, IMAGE_SIZE, EMBED_SIZE = 256, 1024, 64


PURE_TORCH = "pure torch (torchvision's compiled ops do not load)"


class OriginalUnavailable(RuntimeError):
    """The original code cannot be imported here; the message says why and how to get it."""


@dataclass
class Original:
    """The original pipeline around one model.

    Attributes
    ----------
    sam : torch.nn.Module
        The original ``Sam`` (eval mode, float32, on the CPU).
    predictor : object
        ``SamPredictor(sam)``: ``set_image(HxWx3 uint8 RGB)``, then ``predict(...)``.
    source : str
        ``"mobile_sam"`` or ``"segment_anything + our reference TinyViT"``.
    nms_kernel : str
        ``"torchvision"`` or ``"pure torch (torchvision's compiled ops do not load)"``.
    """

    sam: torch.nn.Module
    predictor: object
    source: str
    nms_kernel: str

    def generator(self, **params):
        """The original ``SamAutomaticMaskGenerator(sam, **params)`` (its parameter names)."""
        module = "mobile_sam" if self.source == "mobile_sam" else "segment_anything"
        return importlib.import_module(module).SamAutomaticMaskGenerator(self.sam, **params)

    def describe(self) -> str:
        return f"{self.source}; NMS kernel: {self.nms_kernel}"


def _search_paths() -> list[Path]:
    env = os.environ.get("MOBILESAM_ORIGINAL")
    return [Path(env), ROOT / ".original"] if env else [ROOT / ".original"]


def _add_search_paths() -> None:
    for path in reversed(_search_paths()):  # the first ends up first on sys.path
        if path.is_dir() and str(path) not in sys.path:
            sys.path.insert(0, str(path))


def _forget(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]


def _pure_torch_nms() -> None:
    """Give ``torchvision::nms`` a kernel and let torchvision import without its ``_C``."""
    from napari_mobilesam.everything.boxes import nms

    if not hasattr(_pure_torch_nms, "lib"):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.impl("nms", lambda boxes, scores, thr: nms(boxes, scores, thr), "CPU")
        _pure_torch_nms.lib = lib  # registrations live as long as this object
    # the meta kernels it registers on import are for operators that do not exist here
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations"
    )
    extension = importlib.import_module("torchvision.extension")
    extension._has_ops = lambda: True


def import_torchvision() -> str:
    """Import torchvision, with the pure-torch NMS kernel if its own cannot load.

    Returns
    -------
    str
        Which NMS kernel torchvision will use (see :class:`Original`).

    Raises
    ------
    OriginalUnavailable
        torchvision is not installed.
    """
    _add_search_paths()
    if importlib.util.find_spec("torchvision") is None:
        raise OriginalUnavailable(
            "torchvision is not installed; the original code imports it "
            f"(see {Path(__file__).name}'s docstring)"
        )
    kernel = getattr(import_torchvision, "kernel", None)
    if kernel == PURE_TORCH and "torchvision" not in sys.modules:  # imported again
        _pure_torch_nms()
    if kernel:
        import torchvision.ops

        return kernel
    try:
        import torchvision.ops

        kernel = "torchvision"
        torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except (RuntimeError, OSError):
        _forget("torchvision")
        _pure_torch_nms()
        import torchvision.ops

        kernel = PURE_TORCH
    import_torchvision.kernel = kernel
    return kernel


def _segment_anything_sam(weights) -> torch.nn.Module:
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    from napari_mobilesam.accel import reference
    from napari_mobilesam.build import load_model
    from napari_mobilesam.model import PIXEL_MEAN, PIXEL_STD

    # the original's modules and memory layout: it never asks for channels-last memory,
    # its convolutions take and give contiguous NCHW tensors
    ours = reference(load_model("vit_t", weights, device="cpu", optimize=False))
    sam = Sam(
        image_encoder=ours.image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=EMBED_DIM,
            image_embedding_size=(EMBED_SIZE, EMBED_SIZE),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    if weights is None:  # our random initialisation, copied so both models are the same
        state = ours.state_dict()
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    for part in ("prompt_encoder", "mask_decoder"):
        n = len(part) + 1
        getattr(sam, part).load_state_dict({k[n:]: v for k, v in state.items()
                                            if k.startswith(part + ".")})  # fmt: skip
    return sam.eval()


def load(weights=None) -> Original:
    """Build the original pipeline around ``weights`` (a checkpoint in the official format).

    Parameters
    ----------
    weights : path or None
        The checkpoint; None gives our random initialisation (only with
        ``segment_anything``: ``mobile_sam`` needs a checkpoint).

    Raises
    ------
    OriginalUnavailable
        Neither ``mobile_sam`` nor ``segment_anything`` (with torchvision) imports.
    """
    _add_search_paths()
    have_mobile_sam = importlib.util.find_spec("mobile_sam") is not None
    have_segment_anything = importlib.util.find_spec("segment_anything") is not None
    if have_mobile_sam and weights is None and not have_segment_anything:
        raise OriginalUnavailable("mobile_sam builds its model from a checkpoint: give weights")
    if not have_mobile_sam and not have_segment_anything:
        where = " or ".join(str(p) for p in _search_paths())
        raise OriginalUnavailable(
            "the original code is not installed (neither mobile_sam nor segment_anything "
            f"imports; looked on sys.path and in {where}); install it with "
            "`pip install --no-deps --target .original segment-anything==1.0 "
            "torchvision==<the release matching your torch>`"
        )
    kernel = import_torchvision()
    if have_mobile_sam and weights is not None:
        from mobile_sam import SamPredictor, sam_model_registry

        sam = sam_model_registry["vit_t"](checkpoint=str(weights))
        # its builder calls eval() before loading: TinyViT's cached attention biases
        # are stale until eval() runs again (see the golden README)
        sam = sam.eval()
        source = "mobile_sam"
    else:
        from segment_anything import SamPredictor

        sam = _segment_anything_sam(weights)
        source = "segment_anything + our reference TinyViT"
    return Original(sam=sam, predictor=SamPredictor(sam), source=source, nms_kernel=kernel)
