"""Structural rewrites for inference: fold BatchNorm, merge activations into kernels.

Modules declare the pairs that may be merged, as dotted names relative to themselves:
``conv_gelu_pairs`` (a convolution followed by a GELU) and ``linear_gelu_pairs`` (a
linear layer followed by a GELU). The merged layer takes the first name, an identity
the second, so the module's ``forward`` is unchanged, and keeps its parameters under
the same names. :func:`split_activations` undoes the merges; BatchNorm stays folded (a
folded convolution is a standard operator with the same function).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.common import ConvBN
from .onednn import CONV_GELU_CLASSES, OneDNNLinear

__all__ = [
    "fold_batchnorm",
    "fold_batchnorms",
    "merge_conv_gelu",
    "merge_linear",
    "split_activations",
]


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a new convolution equal to ``bn(conv(x))`` in eval mode.

    The folded weight is ``w * g / sqrt(var + eps)`` and the bias
    ``beta + (b - mean) * g / sqrt(var + eps)``, computed in float64 and cast back.
    """
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = bn.bias.double() + (bias - bn.running_mean.double()) * scale
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device)
    folded.weight.copy_(weight.to(conv.weight.dtype))
    folded.bias.copy_(bias.to(conv.weight.dtype))
    return folded.to(dtype=conv.weight.dtype)


def fold_batchnorms(module: nn.Module) -> int:
    """Fold every :class:`~napari_mobilesam.model.common.ConvBN` below ``module`` into one
    convolution, in place. Inference only (the running statistics become weights).
    Returns the number of pairs folded."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, ConvBN):
            setattr(module, name, fold_batchnorm(child.c, child.bn))
            count += 1
        else:
            count += fold_batchnorms(child)
    return count


def merge_conv_gelu(module: nn.Module) -> int:
    """Make the declared (convolution, GELU) pairs below ``module`` one
    :class:`~.onednn.ConvGELU`, in place; pairs whose BatchNorm is not folded yet are
    left alone. Returns the number merged."""
    count = 0
    for mod in list(module.modules()):
        for conv_name, act_name in getattr(mod, "conv_gelu_pairs", ()):
            conv, act = mod.get_submodule(conv_name), mod.get_submodule(act_name)
            merged = CONV_GELU_CLASSES.get(type(conv))
            if merged is None or not isinstance(act, nn.GELU) or act.approximate != "none":
                continue  # not folded yet, or already merged
            conv.__class__ = merged
            _set_submodule(mod, act_name, nn.Identity())
            count += 1
    return count


def merge_linear(module: nn.Module) -> int:
    """Make every ``nn.Linear`` below ``module`` a :class:`~.onednn.OneDNNLinear`, in place,
    merging the declared (linear, exact GELU) pairs. Returns the number replaced."""
    count = 0
    for mod in list(module.modules()):
        for lin_name, act_name in getattr(mod, "linear_gelu_pairs", ()):
            lin, act = mod.get_submodule(lin_name), mod.get_submodule(act_name)
            if type(lin) is nn.Linear and isinstance(act, nn.GELU) and act.approximate == "none":
                _set_submodule(mod, lin_name, OneDNNLinear(lin, gelu=True))
                _set_submodule(mod, act_name, nn.Identity())
                count += 1
    for mod in list(module.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                setattr(mod, name, OneDNNLinear(child))
                count += 1
    return count


def split_activations(module: nn.Module) -> int:
    """Undo :func:`merge_conv_gelu` and :func:`merge_linear` below ``module``, in place:
    plain convolutions, linear layers and GELUs with the same parameters. Returns the
    number of layers split."""
    count = 0
    for mod in list(module.modules()):
        pairs = (*getattr(mod, "conv_gelu_pairs", ()), *getattr(mod, "linear_gelu_pairs", ()))
        for layer_name, act_name in pairs:
            layer = mod.get_submodule(layer_name)
            plain = _PLAIN_CONV.get(type(layer))
            if plain is not None:
                layer.__class__ = plain
            elif isinstance(layer, OneDNNLinear) and layer.gelu:
                _set_submodule(mod, layer_name, layer.plain())
            else:
                continue
            _set_submodule(mod, act_name, nn.GELU())
            count += 1
    for mod in list(module.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, OneDNNLinear) and not child.gelu:
                setattr(mod, name, child.plain())
                count += 1
    return count


_PLAIN_CONV = {merged: plain for plain, merged in CONV_GELU_CLASSES.items()}


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)
