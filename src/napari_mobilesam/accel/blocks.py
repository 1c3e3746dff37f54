"""Encoder blocks with faster CPU paths, as subclasses of the model's own blocks.

Each class overrides only ``forward`` (or the one step it speeds up) and adds no
parameters, so :func:`~napari_mobilesam.accel.optimize` can switch a block to it, and
:func:`~napari_mobilesam.accel.reference` back, by changing the block's class: the
weights, the state-dict keys and every reference held to the block stay as they are.
Where its fast kernel does not apply (autograd, autocast, another device or dtype) each
falls back to the model's own computation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import image_encoder, tiny_vit
from .onednn import OneDNNLinear
from .slices import expand_project_in_slices, sliced_path_applies

__all__ = [
    "CPU_FLASH_ATTENTION",
    "ChannelsLastTinyViT",
    "FlashViTAttention",
    "FlashWindowAttention",
    "OneDNNTinyViTBlock",
    "SlicedMBConv",
    "SlicedPatchEmbed",
    "SlicedPatchMerging",
    "flash_attention",
    "mlp_residual",
]

#: torch's fused CPU attention kernel (torch >= 2.2), or None
CPU_FLASH_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor | None:
    """:func:`~napari_mobilesam.model.common.attention_with_bias` through torch's fused
    (flash) CPU kernel, or None where it does not apply (another device, dtype, autograd).

    The (N, M) scores are never written to memory, and the output is laid out as
    (B, N, heads, d), so merging the heads afterwards is a view.
    """
    if (
        CPU_FLASH_ATTENTION is None
        or q.device.type != "cpu"
        or q.dtype != torch.float32
        or torch.is_grad_enabled()
    ):
        return None
    mask = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape)) if bias.ndim < 4 else bias
    return CPU_FLASH_ATTENTION(q, k, v, attn_mask=mask)[0]


class FlashWindowAttention(tiny_vit.Attention):
    """TinyViT window attention through :func:`flash_attention`."""

    def attend(self, q, k, v, bias):
        out = flash_attention(q, k, v, bias)
        return super().attend(q, k, v, bias) if out is None else out


class FlashViTAttention(image_encoder.Attention):
    """ViT attention (with relative positions) through :func:`flash_attention`."""

    def attend(self, q, k, v, bias):
        out = flash_attention(q, k, v, bias)
        return super().attend(q, k, v, bias) if out is None else out


class SlicedPatchEmbed(tiny_vit.PatchEmbed):
    """The stem's two convolutions a slice of channels at a time (:mod:`.slices`)."""

    def forward(self, x):
        first, _, second = self.seq
        if sliced_path_applies(x, first, None, second):
            return expand_project_in_slices(x, first, None, second)
        return super().forward(x)


class SlicedMBConv(tiny_vit.MBConv):
    """The inverted residual a slice of hidden channels at a time, the residual sum as
    the projection's post-op (:mod:`.slices`)."""

    def forward(self, x):
        if sliced_path_applies(x, self.conv1, self.conv2, self.conv3):
            y = expand_project_in_slices(x, self.conv1, self.conv2, self.conv3, residual=x)
            return torch.ops.aten.gelu_(y)
        return super().forward(x)


class SlicedPatchMerging(tiny_vit.PatchMerging):
    """Patch merging's three convolutions a slice of channels at a time (:mod:`.slices`)."""

    def convs(self, x):
        if sliced_path_applies(x, self.conv1, self.conv2, self.conv3):
            return expand_project_in_slices(x, self.conv1, self.conv2, self.conv3)
        return super().convs(x)


#: tokens per chunk of :func:`mlp_residual`: TinyViT's 128x128 stage then runs in 4
#: chunks whose (tokens, 4 x dim) activation stays in cache
MLP_CHUNK_TOKENS = 4096


def mlp_residual(mlp: tiny_vit.Mlp, x: torch.Tensor, chunk: int = MLP_CHUNK_TOKENS):
    """``x + mlp(x)`` for tokens (B, N, C), or None where the oneDNN path does not apply.

    With merged oneDNN linear layers, float32 CPU inference: ``chunk`` tokens at a time,
    the residual sum as ``fc2``'s post-op.
    """
    fc1, fc2 = mlp.fc1, mlp.fc2
    if not (isinstance(fc1, OneDNNLinear) and fc1.gelu and isinstance(fc2, OneDNNLinear)):
        return None
    if not (fc1.fused_applies(x) and fc2.fused_applies(x)):
        return None
    parts = [fc2.plus(fc1(mlp.norm(xs)), xs) for xs in x.split(chunk, dim=1)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class OneDNNTinyViTBlock(tiny_vit.TinyViTBlock):
    """A TinyViT block whose oneDNN linear layers add the residuals as post-ops.

    The attention's projection works token by token, so it runs on the real tokens
    only (not the windows' padding) with the residual sum as its post-op; the MLP runs
    in chunks of tokens (:func:`mlp_residual`).
    """

    def forward(self, x):
        proj = self.attn.proj
        if not (isinstance(proj, OneDNNLinear) and proj.fused_applies(x)):
            return super().forward(x)
        x = self.local(proj.plus(self.windows(x, self.attn.heads), x))
        out = mlp_residual(self.mlp, x)
        return x + self.mlp(x) if out is None else out


class ChannelsLastTinyViT(tiny_vit.TinyViT):
    """TinyViT run in channels-last memory: the convolutions are faster and the token
    views between stages need no copies (the weights are converted by ``optimize``)."""

    def forward(self, x):
        return super().forward(x.contiguous(memory_format=torch.channels_last))


#: the model's block classes and their faster subclasses
FAST_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    tiny_vit.Attention: FlashWindowAttention,
    image_encoder.Attention: FlashViTAttention,
    tiny_vit.PatchEmbed: SlicedPatchEmbed,
    tiny_vit.MBConv: SlicedMBConv,
    tiny_vit.PatchMerging: SlicedPatchMerging,
    tiny_vit.TinyViTBlock: OneDNNTinyViTBlock,
    tiny_vit.TinyViT: ChannelsLastTinyViT,
}
