"""oneDNN's fused CPU kernels as modules: convolution + GELU, linear (+ GELU, + sum).

These are the kernels torch's own compiler emits for CPU inference
(``torch.ops.mkldnn``): one pass over the output where eager torch takes two or three.
Each module computes exactly what the plain modules it replaces compute; it takes the
fused kernel only for float32 CPU inference (no autograd, no autocast) where oneDNN
is built in, and the plain operators everywhere else, so training, autocast and other
devices keep working on an optimised model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CONV_GELU_CLASSES",
    "ConvGELU",
    "ConvTransposeGELU",
    "OneDNNLinear",
    "autocast_on",
    "conv_pointwise",
    "cpu_fp32_inference",
    "onednn_conv_available",
    "onednn_linear_available",
]


def onednn_conv_available() -> bool:
    """Whether this torch build has oneDNN's fused (transposed) convolution kernels."""
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's fused linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_fp32_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused inference kernels apply: float32 on the CPU, no autograd."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
    )


def autocast_on(device_type: str) -> bool:
    """Whether autocast is enabled for ``device_type`` in this thread."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return device_type == "cpu" and torch.is_autocast_cpu_enabled()


def conv_pointwise(
    x: torch.Tensor,
    conv: nn.Conv2d,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    unary: str,
) -> torch.Tensor:
    """oneDNN convolution with ``conv``'s geometry, the given weights and a unary post-op
    (``"gelu"`` or ``"none"``); grouped convolutions must be depth-wise."""
    groups = weight.shape[0] if conv.groups > 1 else 1
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, conv.padding, conv.stride, conv.dilation, groups, unary, [None], "none"
    )


class ConvGELU(nn.Conv2d):
    """``gelu(conv(x))`` (exact erf GELU): an ``nn.Conv2d`` switched to this class by
    :func:`~.merge.merge_conv_gelu` (same parameters and state-dict keys).

    For float32 CPU inference one oneDNN convolution with a GELU post-op, which saves
    a full pass over the output; elsewhere the two plain steps.
    """

    def fused_applies(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes through the oneDNN kernel."""
        return onednn_conv_available() and cpu_fp32_inference(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused_applies(x):
            return F.gelu(super().forward(x))
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "gelu", [None], "none",
        )  # fmt: skip


class ConvTransposeGELU(nn.ConvTranspose2d):
    """``gelu(conv_transpose(x))``: :class:`ConvGELU` for an ``nn.ConvTranspose2d``."""

    def fused_applies(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes through the oneDNN kernel."""
        return onednn_conv_available() and cpu_fp32_inference(x, self.weight)

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if output_size is not None or not self.fused_applies(x):
            return F.gelu(super().forward(x, output_size))
        return torch.ops.mkldnn._convolution_transpose_pointwise(
            x, self.weight, self.bias, self.padding, self.output_padding, self.stride,
            self.dilation, self.groups, "gelu", [None], "none",
        )  # fmt: skip


#: the plain convolution classes and their GELU-merged subclasses
CONV_GELU_CLASSES = {nn.Conv2d: ConvGELU, nn.ConvTranspose2d: ConvTransposeGELU}


class OneDNNLinear(nn.Linear):
    """``nn.Linear``, optionally followed by the exact (erf) GELU.

    For float32 CPU inference (no autograd, no autocast) one oneDNN matmul with an
    optional GELU post-op, the kernel torch's own compiler uses: faster than the
    default matmul on the encoder's token matrices, and the GELU costs no extra pass.
    Elsewhere ``F.linear`` (then ``F.gelu``). Parameters and state-dict keys are those
    of the ``nn.Linear`` it replaces (the same tensors, not copies).
    """

    def __init__(self, linear: nn.Linear, gelu: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.gelu = gelu

    def fused_applies(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes through the oneDNN kernel (CPU, float32, inference)."""
        return (
            onednn_linear_available()
            and cpu_fp32_inference(x, self.weight)
            and not autocast_on("cpu")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_applies(x):
            return torch.ops.mkldnn._linear_pointwise(
                x, self.weight, self.bias, "gelu" if self.gelu else "none", [], "none"
            )
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y) if self.gelu else y

    def plus(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``self(x) + other`` (``other`` of the output's shape); the sum is the matmul's
        post-op on the oneDNN path (no GELU)."""
        if not self.gelu and self.fused_applies(x):
            return torch.ops.mkldnn._linear_pointwise.binary(
                x, other, self.weight, self.bias, "add"
            )
        return self(x) + other

    def plain(self) -> nn.Linear:
        """An ``nn.Linear`` holding the same parameters (without the GELU)."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gelu={self.gelu}"
