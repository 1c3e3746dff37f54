"""TinyViT image encoder as used by MobileSAM (``vit_t``).

A convolutional stem and stage, then three stages of windowed self-attention with
a learned relative-position bias and a depth-wise "local" convolution, then SAM's
neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) to ``out_chans`` channels.
State-dict names follow the official MobileSAM checkpoint.

Shapes: input (B, 3, S, S) normalised image with S = ``img_size``; output
(B, out_chans, S // stride, S // stride) with ``stride`` = 4 * prod(downsample_strides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import ConvBN, LayerNorm2d, attention_with_bias


@dataclass(frozen=True)
class TinyViTConfig:
    """Architecture of a TinyViT encoder.

    ``downsample_strides[i]`` is the stride of the patch merging after stage ``i``
    (MobileSAM keeps the last one at 1 so that a 1024 input gives a 64x64 map).
    """

    img_size: int = 1024
    in_chans: int = 3
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    downsample_strides: tuple[int, ...] = (2, 2, 1)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    out_chans: int = 256
    num_classes: int = 1000  # size of the unused classification head in the checkpoints

    def __post_init__(self) -> None:
        n = len(self.embed_dims)
        for field in ("depths", "num_heads", "window_sizes"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"TinyViTConfig.{field} must have {n} entries like embed_dims")
        if len(self.downsample_strides) != n - 1:
            raise ValueError(f"TinyViTConfig.downsample_strides must have {n - 1} entries")
        for d, h in zip(self.embed_dims[1:], self.num_heads[1:], strict=True):
            if d % h:
                raise ValueError(f"embed dim {d} is not divisible by {h} heads")

    @property
    def stem_resolution(self) -> int:
        """Side of the feature map after the stride-4 convolutional stem."""
        return self.img_size // 4

    @property
    def stage_resolutions(self) -> tuple[int, ...]:
        """Side of the feature map inside each stage."""
        res = [self.stem_resolution]
        for s in self.downsample_strides:
            res.append(_strided_size(res[-1], s))
        return tuple(res)

    @property
    def stride(self) -> int:
        """Input pixels per output feature (16 for MobileSAM)."""
        return self.img_size // self.stage_resolutions[-1]


def _strided_size(size: int, stride: int) -> int:
    # 3x3 conv, padding 1
    return (size + 2 - 3) // stride + 1


class PatchEmbed(nn.Module):
    """Stride-4 stem: two 3x3 stride-2 ConvBN with a GELU between."""

    #: (convolution, activation) pairs that may run as one kernel (napari_mobilesam.accel)
    conv_gelu_pairs = (("seq.0", "seq.1"),)

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, 3, 2, 1),
            nn.GELU(),
            ConvBN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depth-wise, 1x1 project, residual."""

    #: (convolution, activation) pairs that may run as one kernel (napari_mobilesam.accel)
    conv_gelu_pairs = (("conv1", "act1"), ("conv2", "act2"))

    def __init__(self, in_chans: int, out_chans: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(in_chans * expand_ratio)
        self.conv1 = ConvBN(in_chans, hidden, 1)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, out_chans, 1)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(y + x)


class PatchMerging(nn.Module):
    """1x1 ConvBN, 3x3 depth-wise ConvBN with ``stride``, 1x1 ConvBN (GELU between).

    Takes (B, C, H, W) or tokens (B, H*W, C) at ``resolution``; returns tokens
    (B, H'*W', out_dim).
    """

    #: (convolution, activation) pairs that may run as one kernel (napari_mobilesam.accel)
    conv_gelu_pairs = (("conv1", "act1"), ("conv2", "act2"))

    def __init__(self, resolution: int, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv1 = ConvBN(dim, out_dim, 1)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            b = x.shape[0]
            x = x.view(b, self.resolution, self.resolution, -1).permute(0, 3, 1, 2)
        return self.convs(x).flatten(2).transpose(1, 2)

    def convs(self, x: torch.Tensor) -> torch.Tensor:
        """The three convolutions on a (B, C, H, W) map."""
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        return self.conv3(x)


def _window_offset_index(window: int) -> torch.Tensor:
    """(N, N) index into the bias table of an N = window**2 token window.

    Two tokens at (r1, c1) and (r2, c2) share the bias of offset
    (|r1 - r2|, |c1 - c2|); offsets are numbered in the order they are first met
    when the pairs are enumerated row-major, which is ``|dr| * window + |dc|``.
    """
    coords = torch.stack(
        torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ).flatten(1)
    delta = (coords[:, :, None] - coords[:, None, :]).abs()
    return delta[0] * window + delta[1]


class Attention(nn.Module):
    """Multi-head self-attention over one window with a learned offset bias.

    ``qkv`` output is laid out per head as (q, k, v) of ``head_dim`` each; the bias
    table ``attention_biases`` has shape (num_heads, window**2) and is gathered per
    token pair on every call (no cache that could go stale after loading).
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", _window_offset_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) tokens of B windows -> (B, N, dim)."""
        return self.proj(self.heads(x))

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """The heads' merged output (B, N, dim), before the ``proj`` layer."""
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v = (self.qkv(x).view(b, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)).split(
            self.head_dim, dim=3
        )
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        return self.attend(q, k, v, bias).transpose(1, 2).reshape(b, n, -1)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """``softmax(q k^T / sqrt(d) + bias) v`` over (B, heads, N, d) tensors."""
        return attention_with_bias(q, k, v, bias)


class Mlp(nn.Module):
    """LayerNorm, Linear, GELU, Linear."""

    #: (linear, activation) pairs that may run as one kernel (napari_mobilesam.accel)
    linear_gelu_pairs = (("fc1", "act"),)

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention, depth-wise local conv, MLP; tokens (B, H*W, C) in and out.

    The feature map is zero-padded at the bottom/right to a multiple of the window
    *before* the attention's LayerNorm (as in the reference), so padded tokens take
    part in the softmax; they are dropped afterwards.
    """

    def __init__(
        self,
        dim: int,
        resolution: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        local_conv_size: int,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def windows(self, x: torch.Tensor, attend) -> torch.Tensor:
        """``attend`` (tokens (B', ws*ws, C) -> (B', ws*ws, C')) over the zero-padded
        windows of tokens ``x`` (B, H*W, C); returns (B, H*W, C')."""
        b, n, c = x.shape
        h = w = self.resolution
        ws = self.window
        if h == ws and w == ws:
            return attend(x)
        x = x.view(b, h, w, c)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = attend(x)
        x = x.view(b, nh, nw, ws, ws, -1).transpose(2, 3).reshape(b, ph, pw, -1)
        if pad_b or pad_r:
            x = x[:, :h, :w]
        return x.reshape(b, n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.local(x + self.windows(x, self.attn))
        return x + self.mlp(x)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """The depth-wise local convolution on tokens (B, H*W, C)."""
        b, n, c = x.shape
        s = self.resolution
        y = self.local_conv(x.transpose(1, 2).reshape(b, c, s, s))
        return y.view(b, c, n).transpose(1, 2)


class ConvLayer(nn.Module):
    """Stage of MBConv blocks, optionally followed by patch merging."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class BasicLayer(nn.Module):
    """Stage of TinyViT blocks, optionally followed by patch merging."""

    def __init__(self, blocks: list[TinyViTBlock], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """TinyViT image encoder with SAM's neck.

    Parameters
    ----------
    config : TinyViTConfig
        Architecture; the defaults are MobileSAM's ``vit_t``.

    Notes
    -----
    ``norm_head`` / ``head`` (the ImageNet classifier of the official checkpoint)
    are not part of this module: :func:`napari_mobilesam.build.load_model` knows
    them as ignorable keys.
    """

    def __init__(self, config: TinyViTConfig | None = None) -> None:
        super().__init__()
        cfg = config or TinyViTConfig()
        self.config = cfg
        self.img_size = cfg.img_size
        res = cfg.stage_resolutions
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dims[0])
        layers: list[nn.Module] = []
        last = len(cfg.embed_dims) - 1
        for i, dim in enumerate(cfg.embed_dims):
            down = None
            if i < last:
                down = PatchMerging(res[i], dim, cfg.embed_dims[i + 1], cfg.downsample_strides[i])
            if i == 0:
                layers.append(ConvLayer(dim, cfg.depths[0], cfg.mbconv_expand_ratio, down))
            else:
                blocks = [
                    TinyViTBlock(
                        dim,
                        res[i],
                        cfg.num_heads[i],
                        cfg.window_sizes[i],
                        cfg.mlp_ratio,
                        cfg.local_conv_size,
                    )
                    for _ in range(cfg.depths[i])
                ]
                layers.append(BasicLayer(blocks, down))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dims[-1], cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, img_size, img_size) -> (B, out_chans, img_size/16, img_size/16)."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, n, c = x.shape
        side = math.isqrt(n)
        x = x.view(b, side, side, c).permute(0, 3, 1, 2)
        return self.neck(x)
