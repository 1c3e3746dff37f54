"""Fast paths of the model against their reference computations."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from napari_mobilesam.build import build_sam
from napari_mobilesam.model import fuse_attention, fuse_conv_bn, fuse_conv_gelu, fuse_linear
from napari_mobilesam.model.common import (
    ConvGELU,
    MLPBlock,
    OneDNNLinear,
    attention_with_bias,
    expand_project_in_slices,
    sliced_path_applies,
)
from napari_mobilesam.model.tiny_vit import MBConv, Mlp, PatchEmbed, PatchMerging, TinyViTBlock
from napari_mobilesam.model.transformer import Attention, TwoWayTransformer

from .conftest import TINY_CONFIG


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def attn():
    torch.manual_seed(0)
    a = Attention(64, 4, downsample_rate=2)
    for p in a.parameters():
        p.normal_(0, 0.3)
    return a


@pytest.mark.parametrize(("b", "b_img"), [(1, 1), (3, 1), (3, 3)])
def test_factorized_attentions_match_projection(attn, b, b_img):
    tokens = torch.randn(b, 5, 64)
    image = torch.randn(b_img, 300, 64)
    torch.testing.assert_close(
        attn.tokens_to_image(tokens, image, image), attn(tokens, image, image), rtol=1e-4, atol=1e-4
    )
    ref = attn(image, tokens, tokens)
    torch.testing.assert_close(
        attn.image_to_tokens(image, tokens, tokens), ref, rtol=1e-4, atol=1e-4
    )
    cached = attn.image_to_tokens(None, tokens, tokens, q_heads=attn.project_q(image))
    torch.testing.assert_close(cached, ref, rtol=1e-4, atol=1e-4)
    residual = torch.randn(b_img, 300, 64)  # summed by the product itself, broadcast over b
    summed = attn.image_to_tokens(image, tokens, tokens, residual=residual)
    torch.testing.assert_close(summed, residual + ref, rtol=1e-4, atol=1e-4)


def test_worth_factoring(attn):
    assert attn.worth_factoring(7)  # 7 tokens x 4 heads < 32 channels
    assert not attn.worth_factoring(8)


@pytest.mark.parametrize("n_tokens", [3, 20])
def test_transformer_fast_equals_reference(n_tokens):
    torch.manual_seed(1)
    tr = TwoWayTransformer(depth=2, embedding_dim=64, num_heads=4, mlp_dim=32)
    for p in tr.parameters():
        p.normal_(0, 0.3)
    image, pe = torch.randn(1, 64, 12, 12), torch.randn(1, 64, 12, 12)
    tokens = torch.randn(3, n_tokens, 64)
    tr.factorized = False
    ref = tr(image, pe, tokens)
    tr.factorized = True
    fast = tr(image, pe, tokens)
    cached = tr(None, None, tokens, image_cache=tr.prepare_image(image, pe))
    for got in (fast, cached):
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="batch 1"):
        tr.prepare_image(image.repeat(2, 1, 1, 1), pe)
    with pytest.raises(ValueError, match="depth >= 1"):
        TwoWayTransformer(depth=0, embedding_dim=64, num_heads=4, mlp_dim=32)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bias_shape", [(4, 49, 49), (1, 4, 49, 49), (6, 4, 49, 49)])
def test_attention_with_bias_matches_sdpa(fused, bias_shape):
    # q, k, v as TinyViT makes them: strided views of one qkv tensor
    q, k, v = torch.randn(6, 49, 4, 24).transpose(1, 2).split(8, dim=3)
    bias = torch.randn(*bias_shape)
    torch.testing.assert_close(
        attention_with_bias(q, k, v, bias, fused=fused),
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "conv",
    [
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16),
        torch.nn.ConvTranspose2d(16, 8, 2, stride=2),
    ],
)
def test_conv_gelu_fast_equals_reference(conv):
    x = torch.randn(2, conv.in_channels, 10, 10).contiguous(memory_format=torch.channels_last)
    want = F.gelu(conv(x))
    torch.testing.assert_close(ConvGELU(conv)(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ConvGELU(conv, use_onednn=False)(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", [(7, 24), (3, 49, 24), (2, 5, 6, 24)])
def test_onednn_linear_equals_reference(gelu, shape):
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(*shape)
    want = F.linear(x, lin.weight, lin.bias)
    want = F.gelu(want) if gelu else want
    fast = OneDNNLinear(lin, gelu=gelu)
    assert fast.weight is lin.weight and fast.bias is lin.bias  # the same parameters
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x.transpose(0, -2).contiguous().transpose(0, -2)),
                                   want, rtol=1e-5, atol=1e-5)  # fmt: skip
        plain = OneDNNLinear(lin, gelu=gelu, use_onednn=False)
        torch.testing.assert_close(plain(x), want, rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps its bf16 matmul
            assert fast(x).dtype == torch.bfloat16
    # with autograd it is the plain path, so training works
    with torch.enable_grad():
        fast(x.requires_grad_()).sum().backward()
    assert lin.weight.grad is not None


def test_fuse_linear_merges_gelu_pairs_and_keeps_keys():
    block = torch.nn.Sequential(MLPBlock(8, 16), MLPBlock(8, 16, torch.nn.ReLU))
    keys = set(block.state_dict())
    assert fuse_linear(block) == 4
    assert set(block.state_dict()) == keys
    gelu_block, relu_block = block
    assert isinstance(gelu_block.lin1, OneDNNLinear) and gelu_block.lin1.gelu
    assert isinstance(gelu_block.act, torch.nn.Identity)
    assert not relu_block.lin1.gelu and isinstance(relu_block.act, torch.nn.ReLU)
    assert fuse_linear(block) == 0  # already done


def test_full_model_fast_equals_reference(tiny_model):
    reference = build_sam(TINY_CONFIG)
    reference.load_state_dict(tiny_model.state_dict())
    reference.eval().mask_decoder.transformer.factorized = False
    fast = tiny_model
    assert fuse_conv_bn(fast) > 0 and fuse_conv_gelu(fast) > 0
    assert fuse_linear(fast.image_encoder) > 0
    assert fuse_attention(fast.image_encoder) == sum(TINY_CONFIG.encoder.depths[1:])
    assert fuse_attention(fast.image_encoder) == 0  # already done
    assert not any(getattr(m, "fused_cpu", False) for m in reference.modules())
    fast.image_encoder.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 128, 128) * 50
    emb_ref, emb = reference.image_encoder(x), fast.image_encoder(x)
    torch.testing.assert_close(emb, emb_ref, rtol=1e-4, atol=1e-4)
    coords = torch.rand(4, 3, 2) * 128
    labels = torch.randint(0, 2, (4, 3))
    outs = []
    for m in (reference, fast):
        sparse, dense = m.prompt_encoder((coords, labels), None, None)
        outs.append(m.mask_decoder(emb_ref, m.prompt_encoder.get_dense_pe(), sparse, dense, True))
    for a, b in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("input_size", "original"),
    [
        ((1024, 1023), (770, 769)),
        ((1024, 853), (660, 550)),
        ((37, 1024), (20, 555)),
        ((1024, 1024), (1024, 1024)),
        ((1024, 1), (3000, 2)),
    ],
)
def test_postprocess_crop_first_is_bit_identical(input_size, original):
    # a tiny model with a 1024 input: postprocessing only depends on the sizes
    model = build_sam(replace(TINY_CONFIG, encoder=replace(TINY_CONFIG.encoder, img_size=1024)))
    low = torch.randn(2, 3, 256, 256)
    ref = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)
    ref = F.interpolate(
        ref[..., : input_size[0], : input_size[1]], original, mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(
        model.postprocess_masks(low, input_size, original), ref, rtol=0, atol=0
    )


def _randomized(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights and BatchNorm statistics, eval mode."""
    torch.manual_seed(3)
    for p in module.parameters():
        p.normal_(0, 0.3)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2)
    return module.eval()


def _fused(module: torch.nn.Module) -> torch.nn.Module:
    fuse_conv_bn(module)
    fuse_conv_gelu(module)
    return module


def _plain(x, conv):
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, 1, conv.groups)


@pytest.mark.parametrize("slice_channels", [16, 24, 64, 1000])
def test_expand_project_in_slices_equals_one_pass(slice_channels):
    block = _fused(_randomized(MBConv(16, 16, 4.0)))  # 64 hidden channels
    x = torch.randn(2, 16, 12, 10).contiguous(memory_format=torch.channels_last)
    e, d, p = block.conv1, block.conv2, block.conv3
    assert sliced_path_applies(x, e, d, p)
    want = _plain(F.gelu(_plain(F.gelu(_plain(x, e.conv)), d.conv)), p)
    got = expand_project_in_slices(x, e, d, p, slice_channels=slice_channels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got = expand_project_in_slices(x, e, d, p, residual=x, slice_channels=slice_channels)
    torch.testing.assert_close(got, want + x, rtol=1e-5, atol=1e-5)
    # no depth-wise step; a strided 3x3 projection
    strided = _randomized(torch.nn.Conv2d(64, 8, 3, 2, 1))
    want = _plain(F.gelu(_plain(x, e.conv)), strided)
    got = expand_project_in_slices(x, e, None, strided, slice_channels=slice_channels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sliced_path_only_where_it_applies():
    block = _fused(_randomized(MBConv(16, 16, 4.0)))
    x = torch.randn(1, 16, 8, 8)
    e, d, p = block.conv1, block.conv2, block.conv3
    assert sliced_path_applies(x, e, d, p) and sliced_path_applies(x, e, None, p)
    with torch.enable_grad():
        assert not sliced_path_applies(x, e, d, p)  # training: the plain path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not sliced_path_applies(x, e, d, p)
    assert not sliced_path_applies(x.double(), e, d, p)
    assert not sliced_path_applies(x, d, e, p)  # e is not depth-wise, d not a plain expansion
    e.use_onednn = False  # (exporters' copies)
    assert not sliced_path_applies(x, e, d, p)
    raw = MBConv(16, 16, 4.0).eval()  # BatchNorm not folded
    assert not sliced_path_applies(x, raw.conv1, raw.conv2, raw.conv3)


@pytest.mark.parametrize(
    ("make", "chans"),
    [
        (lambda: MBConv(32, 32, 4.0), 32),  # 128 hidden channels: two slices of 64
        (lambda: PatchMerging(12, 32, 96, 2), 32),  # 96: a slice of 64 and one of 32
        (lambda: PatchEmbed(3, 160), 3),  # 80 hidden channels
    ],
)
def test_tinyvit_blocks_in_slices_equal_reference(make, chans, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return expand_project_in_slices(*args, **kwargs)

    monkeypatch.setattr("napari_mobilesam.model.tiny_vit.expand_project_in_slices", spy)
    ref = _randomized(make())
    fast = _fused(copy.deepcopy(ref))
    x = torch.randn(1, chans, 12, 12).contiguous(memory_format=torch.channels_last)
    want = ref(x)
    assert not calls  # BatchNorm not folded: the reference path
    torch.testing.assert_close(fast(x), want, rtol=1e-4, atol=1e-4)
    assert calls == [1]


@pytest.mark.parametrize("chunk", [5, 4096])
def test_mlp_residual_equals_reference(chunk, monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    for p in mlp.parameters():
        p.normal_(0, 0.3)
    x = torch.randn(2, 13, 16)
    want = x + mlp.fc2(F.gelu(mlp.fc1(mlp.norm(x))))
    assert fuse_linear(mlp) == 2
    monkeypatch.setattr(Mlp, "chunk_tokens", chunk)
    torch.testing.assert_close(mlp.residual(x), want, rtol=1e-5, atol=1e-5)
    mlp.fc2.use_onednn = False  # the plain path
    torch.testing.assert_close(mlp.residual(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gelu", [False, True])
def test_onednn_linear_plus(gelu):
    torch.manual_seed(0)
    lin = OneDNNLinear(torch.nn.Linear(24, 40), gelu=gelu)
    x, other = torch.randn(3, 7, 24), torch.randn(3, 7, 40)
    want = F.linear(x, lin.weight, lin.bias)
    want = (F.gelu(want) if gelu else want) + other
    torch.testing.assert_close(lin.plus(x, other), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("resolution", "window"), [(10, 7), (7, 7)])  # padded to 14; one window
def test_tinyvit_block_projects_only_real_tokens(resolution, window, monkeypatch):
    """Fused, the attention's projection (with the residual sum) skips the windows'
    padding; the result is the reference block's."""
    ref = _randomized(TinyViTBlock(32, resolution, 2, window, 4.0, 3))
    fast = copy.deepcopy(ref)
    _fused(fast)
    fuse_linear(fast)
    fuse_attention(fast)
    projected = []
    plus = OneDNNLinear.plus

    def spy(self, x, other):
        if self is fast.attn.proj:
            projected.append(x.shape[:2])
        return plus(self, x, other)

    monkeypatch.setattr(OneDNNLinear, "plus", spy)
    x = torch.randn(2, resolution * resolution, 32)
    with torch.inference_mode():
        want, got = ref(x), fast(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert projected == [(2, resolution * resolution)]  # not 14 * 14 tokens per image
