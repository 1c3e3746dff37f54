"""Small building blocks shared by the encoders and the mask decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor.

    Parameters
    ----------
    num_channels : int
        C, the number of channels normalised together.
    eps : float
        Added to the variance; SAM uses 1e-6.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # layer_norm over the last axis of a channels-last view: one fused kernel
        # instead of the mean / variance / divide chain, same result.
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (``lin1``, ``lin2``)."""

    linear_gelu_pairs = (("lin1", "act"),)  # (merged by fuse_linear when ``act`` is a GELU)

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (``layers.{i}``).

    Parameters
    ----------
    input_dim, hidden_dim, output_dim : int
        Feature sizes of the input, the hidden layers and the output.
    num_layers : int
        Number of linear layers (>= 1).
    sigmoid_output : bool
        Apply a sigmoid to the output.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in, dims_out, strict=True))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class ConvBN(nn.Sequential):
    """Bias-free convolution followed by BatchNorm (state-dict names ``c`` and ``bn``).

    :func:`fuse_conv_bn` folds the BatchNorm into the convolution for inference.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.add_module(
            "c",
            nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False),
        )
        self.add_module("bn", nn.BatchNorm2d(out_chans))


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
    fused = nn.Conv2d(
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
    fused.weight.copy_(weight.to(conv.weight.dtype))
    fused.bias.copy_(bias.to(conv.weight.dtype))
    return fused.to(dtype=conv.weight.dtype)


def fuse_conv_bn(module: nn.Module) -> int:
    """Fold every :class:`ConvBN` inside ``module`` into a single convolution, in place.

    Only valid for inference (BatchNorm running statistics are frozen into the
    weights). Returns the number of pairs fused.
    """
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, ConvBN):
            setattr(module, name, fold_batchnorm(child.c, child.bn))
            count += 1
        else:
            count += fuse_conv_bn(child)
    return count


def _onednn_pointwise_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


def _cpu_fp32_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's fused inference kernels apply: float32 on the CPU, no autograd."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
    )


class ConvGELU(nn.Module):
    """``gelu(conv(x))`` (exact erf GELU) for inference; ``conv`` may be transposed.

    On CPU in float32 it runs as one oneDNN (transposed) convolution with a GELU
    post-op (the kernels torch's own compiler uses), which saves a full pass
    over the output; elsewhere, or with ``use_onednn=False``, it is the plain
    two-step reference path.
    """

    def __init__(self, conv: nn.Conv2d | nn.ConvTranspose2d, use_onednn: bool = True) -> None:
        super().__init__()
        self.conv = conv
        self.use_onednn = use_onednn and _onednn_pointwise_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if self.use_onednn and _cpu_fp32_inference(x, c.weight):
            if isinstance(c, nn.ConvTranspose2d):
                return torch.ops.mkldnn._convolution_transpose_pointwise(
                    x, c.weight, c.bias, c.padding, c.output_padding, c.stride, c.dilation,
                    c.groups, "gelu", [None], "none",
                )  # fmt: skip
            return torch.ops.mkldnn._convolution_pointwise(
                x, c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups,
                "gelu", [None], "none",
            )  # fmt: skip
        return F.gelu(c(x))


def fuse_conv_gelu(module: nn.Module, use_onednn: bool = True) -> int:
    """Merge the (convolution, GELU) pairs that modules declare, in place.

    A module lists its pairs in a ``conv_gelu_pairs`` attribute as dotted names
    relative to itself; each convolution becomes a :class:`ConvGELU` and the
    GELU an identity. Call after :func:`fuse_conv_bn`. Returns the number fused.
    """
    count = 0
    for mod in list(module.modules()):
        for conv_name, act_name in getattr(mod, "conv_gelu_pairs", ()):
            conv, act = mod.get_submodule(conv_name), mod.get_submodule(act_name)
            if not isinstance(conv, nn.Conv2d | nn.ConvTranspose2d) or not isinstance(act, nn.GELU):
                continue  # not folded yet, or already merged
            _set_submodule(mod, conv_name, ConvGELU(conv, use_onednn))
            _set_submodule(mod, act_name, nn.Identity())
            count += 1
    return count


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return device_type == "cpu" and torch.is_autocast_cpu_enabled()


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear(nn.Linear):
    """``nn.Linear``, optionally followed by the exact (erf) GELU, for inference.

    On CPU in float32 (no autograd, no autocast) it runs as one oneDNN matmul with
    an optional GELU post-op, the kernel torch's own compiler uses: 1.3-1.6x faster
    than the default (MKL) matmul on the encoder's shapes on an AMD EPYC, and the
    GELU costs no extra pass. Elsewhere, or with ``use_onednn=False``, it is
    ``F.linear`` (then ``F.gelu``). Parameters and state-dict keys are those of
    the ``nn.Linear`` it replaces.
    """

    def __init__(self, linear: nn.Linear, gelu: bool = False, use_onednn: bool = True) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.gelu = gelu
        self.use_onednn = use_onednn and _onednn_linear_available()

    def onednn_applies(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes through the oneDNN kernel (CPU, float32, inference)."""
        return self.use_onednn and _cpu_fp32_inference(x, self.weight) and not _autocast_on("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn_applies(x):
            return torch.ops.mkldnn._linear_pointwise(
                x, self.weight, self.bias, "gelu" if self.gelu else "none", [], "none"
            )
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y) if self.gelu else y

    def plus(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``self(x) + other`` (``other`` of the output's shape); the sum is the matmul's
        post-op on the oneDNN path (no GELU)."""
        if not self.gelu and self.onednn_applies(x):
            return torch.ops.mkldnn._linear_pointwise.binary(
                x, other, self.weight, self.bias, "add"
            )
        return self(x) + other

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gelu={self.gelu}, use_onednn={self.use_onednn}"


def fuse_linear(module: nn.Module, use_onednn: bool = True) -> int:
    """Make every ``nn.Linear`` below ``module`` a :class:`OneDNNLinear`, in place.

    The (linear, GELU) pairs that modules declare in ``linear_gelu_pairs`` (dotted
    names relative to the module) become one :class:`OneDNNLinear` with its GELU
    and an identity. Returns the number of linear layers replaced.
    """
    count = 0
    for mod in list(module.modules()):
        for lin_name, act_name in getattr(mod, "linear_gelu_pairs", ()):
            lin, act = mod.get_submodule(lin_name), mod.get_submodule(act_name)
            if type(lin) is nn.Linear and isinstance(act, nn.GELU) and act.approximate == "none":
                _set_submodule(mod, lin_name, OneDNNLinear(lin, gelu=True, use_onednn=use_onednn))
                _set_submodule(mod, act_name, nn.Identity())
                count += 1
    for mod in list(module.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                setattr(mod, name, OneDNNLinear(child, use_onednn=use_onednn))
                count += 1
    return count


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


#: torch's fused CPU attention kernel (torch >= 2.2), or None
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fuse_attention(module: nn.Module) -> int:
    """Let every attention below ``module`` that can (a ``fused_cpu`` attribute) use
    torch's fused CPU attention kernel (see :func:`attention_with_bias`), in place.

    Returns the number of attention modules switched.
    """
    count = 0
    for mod in module.modules():
        if hasattr(mod, "fused_cpu") and not mod.fused_cpu:
            mod.fused_cpu = True
            count += 1
    return count


def attention_with_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, fused: bool = False
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` for (B, heads, N, d) tensors.

    ``bias`` broadcasts to (B, heads, N, M). On CPU in float32 without autograd,
    where torch has it and ``fused`` is true, this is torch's fused (flash) CPU
    attention kernel called directly: the (N, M) scores are never written to memory
    (TinyViT's 14x14 windows: 7.7 ms per block instead of 13-20 ms on an AMD EPYC),
    and the output is laid out as (B, N, heads, d), so merging the heads afterwards
    is a view. (Through ``scaled_dot_product_attention`` a float mask sends CPU
    inputs to a slower path.) Otherwise on CPU it is a batched matmul, an in-place
    broadcast add of the bias (never expanded per window), a softmax and a second
    matmul; on other devices ``scaled_dot_product_attention``.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    flash = fused and _CPU_FLASH is not None and q.dtype == torch.float32
    if flash and not torch.is_grad_enabled():
        mask = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape)) if bias.ndim < 4 else bias
        return _CPU_FLASH(q, k, v, attn_mask=mask)[0]
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    scores += bias
    return torch.matmul(scores.softmax(dim=-1), v)


#: largest hidden slice of :func:`expand_project_in_slices` (a 256x256 map of 64 channels
#: in float32: it stays in cache between the convolutions)
SLICE_BYTES = 16 * 2**20


def _slice_channels(x: torch.Tensor, expand: nn.Conv2d) -> int:
    """Hidden channels per slice: the largest hidden map (expand's output) in slices of at
    most SLICE_BYTES, the slices equal and a multiple of 16 channels."""
    h, w = x.shape[-2:]
    (sh, sw), (ph, pw), (kh, kw) = expand.stride, expand.padding, expand.kernel_size
    h, w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    hidden = expand.out_channels
    per_channel = x.shape[0] * h * w * x.element_size()
    slices = max(1, math.ceil(hidden * per_channel / SLICE_BYTES))
    return min(hidden, 16 * math.ceil(hidden / slices / 16))


def _onednn_conv(x, conv: nn.Conv2d, weight, bias, unary: str) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, conv.padding, conv.stride, conv.dilation,
        weight.shape[0] if conv.groups > 1 else 1, unary, [None], "none",
    )  # fmt: skip


def sliced_path_applies(x: torch.Tensor, expand, depthwise, project) -> bool:
    """Whether :func:`expand_project_in_slices` can run these layers on ``x``.

    Parameters
    ----------
    x : torch.Tensor
        The (B, C, H, W) input.
    expand, depthwise : nn.Module or None
        :class:`ConvGELU` layers (oneDNN enabled); ``depthwise`` may be None.
    project : nn.Module
        A plain ``nn.Conv2d`` with a bias (BatchNorm folded).
    """
    convs = [expand] + ([depthwise] if depthwise is not None else [])
    return (
        all(isinstance(c, ConvGELU) and c.use_onednn for c in convs)
        and all(type(c.conv) is nn.Conv2d for c in convs)
        and type(project) is nn.Conv2d
        and project.bias is not None
        and project.groups == 1
        and expand.conv.groups == 1
        and (depthwise is None or depthwise.conv.groups == depthwise.conv.out_channels)
        and _cpu_fp32_inference(x, project.weight)
        and not _autocast_on("cpu")
    )


def expand_project_in_slices(
    x: torch.Tensor,
    expand: ConvGELU,
    depthwise: ConvGELU | None,
    project: nn.Conv2d,
    residual: torch.Tensor | None = None,
    slice_channels: int | None = None,
) -> torch.Tensor:
    """``project(depthwise(expand(x))) [+ residual]``, a slice of hidden channels at a time.

    ``expand`` (a convolution + GELU) widens ``x`` to many hidden channels,
    ``depthwise`` (optional, per-channel convolution + GELU) works on each hidden
    channel alone and ``project`` (a convolution) sums over them. So the hidden
    channels can be produced and consumed ``slice_channels`` at a time, ``project``
    adding each slice's share into the output in place (a oneDNN sum post-op):
    the hidden map never exists whole (an inverted-residual block at 256x256 would
    need 64 MB for it, then another 64 MB, written to fresh memory and read back from
    RAM), and each slice is still in cache when the next convolution reads it. The
    result equals the one-pass computation up to float rounding (the sum over hidden
    channels is taken in another order). CPU, float32, inference, oneDNN only: see
    :func:`sliced_path_applies`.

    Parameters
    ----------
    x : torch.Tensor
        (B, C, H, W), best channels-last.
    expand, depthwise : ConvGELU
        ``depthwise`` may be None.
    project : nn.Conv2d
        With a bias.
    residual : torch.Tensor, optional
        Added to the output (shape of the output).
    slice_channels : int, optional
        Hidden channels per slice. Default: as many equal slices (multiples of 16
        channels) as keep each slice's map within :data:`SLICE_BYTES`; one slice
        when the whole hidden map fits.

    Returns
    -------
    torch.Tensor
        (B, project.out_channels, H', W').
    """
    mk = torch.ops.mkldnn
    e, p = expand.conv, project
    d = depthwise.conv if depthwise is not None else None
    hidden = e.out_channels
    if slice_channels is None:
        slice_channels = _slice_channels(x, e)
    out = None
    for start in range(0, hidden, slice_channels):
        part = slice(start, min(start + slice_channels, hidden))
        h = _onednn_conv(x, e, e.weight[part], e.bias[part] if e.bias is not None else None, "gelu")
        if d is not None:
            h = _onednn_conv(h, d, d.weight[part], d.bias[part] if d.bias is not None else None,
                             "gelu")  # fmt: skip
        w = p.weight[:, part].contiguous()
        if out is None and residual is None:
            out = _onednn_conv(h, p, w, p.bias, "none")
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
