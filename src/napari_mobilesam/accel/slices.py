"""Expand, (depth-wise,) project convolution chains computed a slice of channels at a time.

An inverted-residual block widens its input to many hidden channels (``expand``, a
convolution + GELU), optionally filters each hidden channel alone (``depthwise``) and
sums over them (``project``). The hidden channels can therefore be produced and
consumed a slice at a time, ``project`` adding each slice's share into the output in
place (a oneDNN sum post-op): the hidden map never exists whole (at 256x256 it would
take 64 MB, written to fresh memory and read back from RAM), and each slice is still
in cache when the next convolution reads it. The result equals the one-pass
computation up to float rounding (the sum over hidden channels is taken in another
order). Float32 CPU inference with oneDNN only: see :func:`sliced_path_applies`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .onednn import ConvGELU, autocast_on, conv_pointwise, cpu_fp32_inference

__all__ = ["SLICE_BYTES", "expand_project_in_slices", "slice_channels", "sliced_path_applies"]

#: largest hidden slice (a 256x256 map of 64 channels in float32 stays in cache between
#: the convolutions)
SLICE_BYTES = 16 * 2**20


def slice_channels(x: torch.Tensor, expand: nn.Conv2d) -> int:
    """Hidden channels per slice: the hidden map (``expand``'s output for ``x``) cut into
    equal slices of at most :data:`SLICE_BYTES`, each a multiple of 16 channels."""
    h, w = x.shape[-2:]
    (sh, sw), (ph, pw), (kh, kw) = expand.stride, expand.padding, expand.kernel_size
    h, w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    hidden = expand.out_channels
    per_channel = x.shape[0] * h * w * x.element_size()
    slices = max(1, math.ceil(hidden * per_channel / SLICE_BYTES))
    return min(hidden, 16 * math.ceil(hidden / slices / 16))


def sliced_path_applies(x: torch.Tensor, expand, depthwise, project) -> bool:
    """Whether :func:`expand_project_in_slices` can run these layers on ``x``.

    Parameters
    ----------
    x : torch.Tensor
        The (B, C, H, W) input.
    expand, depthwise : nn.Module or None
        :class:`~.onednn.ConvGELU` layers; ``depthwise`` may be None.
    project : nn.Module
        A plain ``nn.Conv2d`` with a bias (BatchNorm folded).
    """
    convs = [expand] + ([depthwise] if depthwise is not None else [])
    return (
        all(type(c) is ConvGELU for c in convs)
        and expand.fused_applies(x)
        and type(project) is nn.Conv2d
        and project.bias is not None
        and project.groups == 1
        and expand.groups == 1
        and (depthwise is None or depthwise.groups == depthwise.out_channels)
        and cpu_fp32_inference(x, project.weight)
        and not autocast_on("cpu")
    )


def expand_project_in_slices(
    x: torch.Tensor,
    expand: ConvGELU,
    depthwise: ConvGELU | None,
    project: nn.Conv2d,
    residual: torch.Tensor | None = None,
    slice_size: int | None = None,
) -> torch.Tensor:
    """``project(depthwise(expand(x))) [+ residual]``, a slice of hidden channels at a time.

    Parameters
    ----------
    x : torch.Tensor
        (B, C, H, W) float32, best channels-last.
    expand, depthwise : ConvGELU
        ``depthwise`` may be None.
    project : nn.Conv2d
        With a bias.
    residual : torch.Tensor, optional
        Added to the output (shape of the output).
    slice_size : int, optional
        Hidden channels per slice; default :func:`slice_channels`.

    Returns
    -------
    torch.Tensor
        (B, project.out_channels, H', W') float32.
    """
    mk = torch.ops.mkldnn
    e, p, d = expand, project, depthwise
    hidden = e.out_channels
    step = slice_size or slice_channels(x, e)
    out = None
    for start in range(0, hidden, step):
        part = slice(start, min(start + step, hidden))
        h = conv_pointwise(x, e, e.weight[part], None if e.bias is None else e.bias[part], "gelu")
        if d is not None:
            h = conv_pointwise(h, d, d.weight[part], None if d.bias is None else d.bias[part],
                               "gelu")  # fmt: skip
        w = p.weight[:, part].contiguous()
        if out is None and residual is None:
            out = conv_pointwise(h, p, w, p.bias, "none")
        elif out is None:
            out = mk._convolution_pointwise.binary(
                h, residual, w, p.bias, p.padding, p.stride, p.dilation, 1,
                "add", 1.0, None, [], None,
            )  # fmt: skip
        else:
            mk._convolution_pointwise_.binary(
                out, h, w, None, p.padding, p.stride, p.dilation, 1, "add", 1.0, None, [], None
            )
    return out
