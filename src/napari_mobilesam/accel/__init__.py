"""Faster modules for a loaded model: :func:`optimize` swaps them in, :func:`reference` out.

:mod:`napari_mobilesam.model` holds the SAM-shaped modules and computes what the
original computes, step by step. This package holds the speed tricks that replace
some of those steps for inference, each computing the same function up to float
rounding (tests check every one against its reference):

- :mod:`.merge`: BatchNorm folded into the convolutions before it; convolution + GELU
  and linear + GELU pairs merged into one layer (declared by the model's modules);
- :mod:`.onednn`: those merged layers run as oneDNN's fused CPU kernels;
- :mod:`.slices`: inverted-residual convolution chains a slice of channels at a time;
- :mod:`.blocks`: encoder blocks that use the above, torch's fused CPU attention, and a
  channels-last TinyViT;
- :mod:`.decoder`: the mask decoder's prompt-independent part computed once per image,
  and its cross attentions factorised on the side of the few prompt tokens;
- :mod:`.resize`: Pillow's bilinear resize, byte for byte, as matrix products on a GPU.

:func:`optimize` applies the module swaps of the first four in place
(``load_model(optimize=True)``, the default, calls it); :func:`reference` undoes them
(for exporters, which need standard operators, and to run a model as the original
does). The decoder and resize paths are chosen per call by the engine
(:mod:`napari_mobilesam.engine`), so one model serves both computations.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import Sam
from .blocks import FAST_CLASSES
from .merge import fold_batchnorms, merge_conv_gelu, merge_linear, split_activations

__all__ = ["is_optimized", "optimize", "reference"]

_REFERENCE_CLASSES = {fast: base for base, fast in FAST_CLASSES.items()}


def optimize(model: Sam, device: str | torch.device | None = None) -> Sam:
    """Swap the fast modules into ``model`` for inference, in place.

    Folds BatchNorm into the convolutions, merges the declared (convolution, GELU)
    pairs of the whole model and the encoder's linear layers into oneDNN layers,
    switches the encoder's blocks to their faster subclasses (:mod:`.blocks`) and its
    weights to channels-last memory. Idempotent. The result is in eval mode: folded
    BatchNorm cannot train.

    Parameters
    ----------
    model : Sam
    device : str or torch.device, optional
        Move the model there first (default: leave it where it is). The fast kernels
        are used where they apply (float32 CPU inference); elsewhere every swapped
        module computes as the model's own does.

    Returns
    -------
    Sam
        ``model`` itself.
    """
    _check_sam(model)
    if device is not None:
        model.to(device)
    model.eval()
    fold_batchnorms(model)
    merge_conv_gelu(model)
    # oneDNN matmuls pay for the encoder's big token matrices; the decoder's
    # prompt-token matmuls are small and faster in torch's default kernels
    merge_linear(model.image_encoder)
    for module in model.modules():
        fast = FAST_CLASSES.get(type(module))
        if fast is not None:
            module.__class__ = fast
    model.image_encoder.to(memory_format=torch.channels_last)
    return model


def reference(model: Sam) -> Sam:
    """Make ``model`` run the reference computation with standard operators, in place.

    Undoes :func:`optimize`: plain convolutions, linear layers and GELUs (the same
    parameters), the model's own block classes and contiguous (NCHW) weights, as the
    original keeps them. BatchNorm that was folded stays folded (a convolution with
    the same function).

    Returns
    -------
    Sam
        ``model`` itself.
    """
    _check_sam(model)
    split_activations(model)
    for module in model.modules():
        base = _REFERENCE_CLASSES.get(type(module))
        if base is not None:
            module.__class__ = base
    model.image_encoder.to(memory_format=torch.contiguous_format)
    return model


def is_optimized(model: nn.Module) -> bool:
    """Whether :func:`optimize` has swapped fast modules into ``model``."""
    return any(type(m) in _REFERENCE_CLASSES for m in model.modules())


def _check_sam(model: object) -> None:
    if not isinstance(model, Sam):
        raise TypeError(f"model must be a Sam model, got {type(model).__name__}")
