"""napari_mobilesam.accel: every fast module against the model's own computation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from napari_mobilesam.accel import is_optimized, optimize, reference
from napari_mobilesam.accel.blocks import FlashWindowAttention, OneDNNTinyViTBlock, mlp_residual
from napari_mobilesam.accel.decoder import (
    decode_tokens,
    image_to_tokens,
    prepare_image,
    tokens_to_image,
    worth_factoring,
)
from napari_mobilesam.accel.merge import (
    fold_batchnorms,
    merge_conv_gelu,
    merge_linear,
    split_activations,
)
from napari_mobilesam.accel.onednn import ConvGELU, ConvTransposeGELU, OneDNNLinear
from napari_mobilesam.accel.slices import expand_project_in_slices, sliced_path_applies
from napari_mobilesam.build import build_sam
from napari_mobilesam.model.common import MLPBlock, attention_with_bias
from napari_mobilesam.model.tiny_vit import MBConv, Mlp, PatchEmbed, PatchMerging, TinyViTBlock
from napari_mobilesam.model.transformer import Attention

from .conftest import TINY_CONFIG


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


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


def _merged(module: torch.nn.Module) -> torch.nn.Module:
    fold_batchnorms(module)
    merge_conv_gelu(module)
    return module


def _plain(x, conv):
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, 1, conv.groups)


# -- optimize / reference on a whole model ------------------------------------------------


def test_optimized_model_equals_reference_and_back(tiny_model):
    ref = copy.deepcopy(tiny_model)
    x = torch.randn(1, 3, 128, 128) * 50
    want = ref.image_encoder(x)
    assert optimize(tiny_model) is tiny_model and is_optimized(tiny_model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tiny_model.modules())
    assert any(isinstance(m, FlashWindowAttention) for m in tiny_model.modules())
    conv = next(m for m in tiny_model.image_encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(tiny_model.image_encoder(x), want, rtol=1e-4, atol=1e-4)
    assert optimize(tiny_model) is tiny_model  # idempotent
    keys = set(tiny_model.state_dict())
    # the decoder's upscaling convolution + GELU is merged too: same masks
    coords, labels = torch.rand(4, 3, 2) * 128, torch.randint(0, 2, (4, 3))
    outs = []
    for m in (ref, tiny_model):
        sparse, dense = m.prompt_encoder((coords, labels), None, None)
        outs.append(m.mask_decoder(want, m.prompt_encoder.get_dense_pe(), sparse, dense, True))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    assert reference(tiny_model) is tiny_model and not is_optimized(tiny_model)
    kinds = {type(m) for m in tiny_model.modules()}
    assert not kinds & {ConvGELU, OneDNNLinear, FlashWindowAttention, OneDNNTinyViTBlock}
    assert conv.weight.is_contiguous()  # the original's layout
    assert set(tiny_model.state_dict()) == keys  # the same parameters, the same names
    torch.testing.assert_close(tiny_model.image_encoder(x), want, rtol=1e-4, atol=1e-4)


def test_optimize_and_reference_need_a_sam_model():
    for fn in (optimize, reference):
        with pytest.raises(TypeError, match="model must be a Sam model, got Linear"):
            fn(torch.nn.Linear(2, 2))


def test_optimize_moves_to_a_device(tiny_model):
    assert optimize(tiny_model, "cpu").device.type == "cpu"


# -- structural rewrites -------------------------------------------------------------------


def test_fold_batchnorms_keeps_the_function(tiny_model):
    x = torch.randn(2, 3, 128, 128)
    want = tiny_model.image_encoder(x)
    assert fold_batchnorms(tiny_model) > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tiny_model.modules())
    torch.testing.assert_close(tiny_model.image_encoder(x), want, rtol=1e-5, atol=1e-5)


def test_merge_linear_merges_gelu_pairs_keeps_keys_and_splits_back():
    block = torch.nn.Sequential(MLPBlock(8, 16), MLPBlock(8, 16, torch.nn.ReLU))
    keys = set(block.state_dict())
    x = torch.randn(3, 8)
    want = block(x)
    assert merge_linear(block) == 4
    assert set(block.state_dict()) == keys
    gelu_block, relu_block = block
    assert isinstance(gelu_block.lin1, OneDNNLinear) and gelu_block.lin1.gelu
    assert isinstance(gelu_block.act, torch.nn.Identity)
    assert not relu_block.lin1.gelu and isinstance(relu_block.act, torch.nn.ReLU)
    assert merge_linear(block) == 0  # already done
    torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-5)
    assert split_activations(block) == 4
    assert not any(isinstance(m, OneDNNLinear) for m in block.modules())
    assert isinstance(gelu_block.act, torch.nn.GELU) and set(block.state_dict()) == keys
    torch.testing.assert_close(block(x), want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "conv",
    [
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16),
        torch.nn.ConvTranspose2d(16, 8, 2, stride=2),
    ],
)
def test_conv_gelu_equals_reference(conv):
    x = torch.randn(2, conv.in_channels, 10, 10).contiguous(memory_format=torch.channels_last)
    want = F.gelu(conv(x))
    pair = torch.nn.Sequential(copy.deepcopy(conv), torch.nn.GELU())
    pair.conv_gelu_pairs = (("0", "1"),)
    assert merge_conv_gelu(pair) == 1 and isinstance(pair[1], torch.nn.Identity)
    assert isinstance(pair[0], ConvGELU | ConvTransposeGELU)
    assert set(pair.state_dict()) == {"0.weight", "0.bias"}  # the same keys
    torch.testing.assert_close(pair(x), want, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():  # the plain path
        torch.testing.assert_close(pair(x), want, rtol=0, atol=0)
    assert split_activations(pair) == 1 and type(pair[0]) is type(conv)


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
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps its bf16 matmul
            assert fast(x).dtype == torch.bfloat16
    # with autograd it is the plain path, so training works
    with torch.enable_grad():
        fast(x.requires_grad_()).sum().backward()
    assert lin.weight.grad is not None


@pytest.mark.parametrize("gelu", [False, True])
def test_onednn_linear_plus(gelu):
    torch.manual_seed(0)
    lin = OneDNNLinear(torch.nn.Linear(24, 40), gelu=gelu)
    x, other = torch.randn(3, 7, 24), torch.randn(3, 7, 40)
    want = F.linear(x, lin.weight, lin.bias)
    want = (F.gelu(want) if gelu else want) + other
    torch.testing.assert_close(lin.plus(x, other), want, rtol=1e-5, atol=1e-5)


# -- blocks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_shape", [(4, 49, 49), (1, 4, 49, 49), (6, 4, 49, 49)])
def test_flash_attention_equals_reference(bias_shape):
    from napari_mobilesam.accel.blocks import flash_attention

    # q, k, v as TinyViT makes them: strided views of one qkv tensor
    q, k, v = torch.randn(6, 49, 4, 24).transpose(1, 2).split(8, dim=3)
    bias = torch.randn(*bias_shape)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(attention_with_bias(q, k, v, bias), want, rtol=1e-5, atol=1e-5)
    got = flash_attention(q, k, v, bias)
    if got is not None:  # (torch >= 2.2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():
        assert flash_attention(q, k, v, bias) is None  # autograd: the reference


@pytest.mark.parametrize("slice_size", [16, 24, 64, 1000])
def test_expand_project_in_slices_equals_one_pass(slice_size):
    block = _merged(_randomized(MBConv(16, 16, 4.0)))  # 64 hidden channels
    x = torch.randn(2, 16, 12, 10).contiguous(memory_format=torch.channels_last)
    e, d, p = block.conv1, block.conv2, block.conv3
    assert sliced_path_applies(x, e, d, p)
    want = _plain(F.gelu(_plain(F.gelu(_plain(x, e)), d)), p)
    got = expand_project_in_slices(x, e, d, p, slice_size=slice_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got = expand_project_in_slices(x, e, d, p, residual=x, slice_size=slice_size)
    torch.testing.assert_close(got, want + x, rtol=1e-5, atol=1e-5)
    # no depth-wise step; a strided 3x3 projection
    strided = _randomized(torch.nn.Conv2d(64, 8, 3, 2, 1))
    want = _plain(F.gelu(_plain(x, e)), strided)
    got = expand_project_in_slices(x, e, None, strided, slice_size=slice_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sliced_path_only_where_it_applies():
    block = _merged(_randomized(MBConv(16, 16, 4.0)))
    x = torch.randn(1, 16, 8, 8)
    e, d, p = block.conv1, block.conv2, block.conv3
    assert sliced_path_applies(x, e, d, p) and sliced_path_applies(x, e, None, p)
    with torch.enable_grad():
        assert not sliced_path_applies(x, e, d, p)  # training: the plain path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not sliced_path_applies(x, e, d, p)
    assert not sliced_path_applies(x.double(), e, d, p)
    assert not sliced_path_applies(x, d, e, p)  # e is not depth-wise, d not a plain expansion
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
    from napari_mobilesam.accel import blocks

    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return expand_project_in_slices(*args, **kwargs)

    monkeypatch.setattr(blocks, "expand_project_in_slices", spy)
    ref = _randomized(make())
    fast = _merged(copy.deepcopy(ref))
    fast.__class__ = blocks.FAST_CLASSES[type(ref)]
    x = torch.randn(1, chans, 12, 12).contiguous(memory_format=torch.channels_last)
    want = ref(x)
    torch.testing.assert_close(fast(x), want, rtol=1e-4, atol=1e-4)
    assert calls == [1]
    with torch.enable_grad():
        torch.testing.assert_close(fast(x), want, rtol=1e-4, atol=1e-4)
    assert calls == [1]  # autograd: the model's own path


@pytest.mark.parametrize("chunk", [5, 4096])
def test_mlp_residual_equals_reference(chunk):
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    for p in mlp.parameters():
        p.normal_(0, 0.3)
    x = torch.randn(2, 13, 16)
    want = x + mlp(x)
    assert mlp_residual(mlp, x) is None  # not merged: the caller's plain path
    assert merge_linear(mlp) == 2
    torch.testing.assert_close(mlp_residual(mlp, x, chunk), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("resolution", "window"), [(10, 7), (7, 7)])  # padded to 14; one window
def test_tinyvit_block_projects_only_real_tokens(resolution, window, monkeypatch):
    """Optimised, the attention's projection (with the residual sum) skips the windows'
    padding; the result is the reference block's."""
    ref = _randomized(TinyViTBlock(32, resolution, 2, window, 4.0, 3))
    fast = copy.deepcopy(ref)
    _merged(fast)
    merge_linear(fast)
    fast.__class__ = OneDNNTinyViTBlock
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


def test_vit_encoder_optimized_equals_reference():
    from dataclasses import replace

    from napari_mobilesam.build import ViTConfig

    cfg = replace(TINY_CONFIG, encoder=ViTConfig(
        embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=128,
        patch_size=16, out_chans=32, window_size=4))  # fmt: skip
    model = _randomized(build_sam(cfg))
    x = torch.randn(1, 3, 128, 128)
    want = model.image_encoder(x)
    optimize(model)
    torch.testing.assert_close(model.image_encoder(x), want, rtol=1e-4, atol=1e-4)


# -- decoder ----------------------------------------------------------------------------------


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
        tokens_to_image(attn, tokens, image, image), attn(tokens, image, image),
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip
    ref = attn(image, tokens, tokens)
    torch.testing.assert_close(
        image_to_tokens(attn, image, tokens, tokens), ref, rtol=1e-4, atol=1e-4
    )
    cached = image_to_tokens(attn, None, tokens, tokens, q_heads=attn.project_q(image))
    torch.testing.assert_close(cached, ref, rtol=1e-4, atol=1e-4)
    residual = torch.randn(b_img, 300, 64)  # summed by the product itself, broadcast over b
    summed = image_to_tokens(attn, image, tokens, tokens, residual=residual)
    torch.testing.assert_close(summed, residual + ref, rtol=1e-4, atol=1e-4)


def test_worth_factoring(attn):
    assert worth_factoring(attn, 7)  # 7 tokens x 4 heads < 32 channels
    assert not worth_factoring(attn, 8)


@pytest.mark.parametrize("n_tokens", [1, 6])  # 3 + 1 + n tokens: factorised below 8
def test_decoder_fast_paths_equal_the_model(tiny_model, n_tokens):
    torch.manual_seed(1)
    dec = tiny_model.mask_decoder
    for p in dec.parameters():
        p.normal_(0, 0.3)
    pe = tiny_model.prompt_encoder.get_dense_pe()
    emb = torch.randn(1, 32, 8, 8)
    points = (torch.rand(3, n_tokens, 2) * 128, torch.randint(0, 2, (3, n_tokens)))
    sparse, dense = tiny_model.prompt_encoder(points, None, None)
    want = dec.predict_masks(emb, pe, sparse, dense)
    cache = prepare_image(dec, emb, pe, dense)
    for factorized in (False, True):
        plain = decode_tokens(dec, sparse, image_embeddings=emb, image_pe=pe,
                              dense_prompt_embeddings=dense, factorized=factorized)  # fmt: skip
        for hs, keys, size in (plain, decode_tokens(dec, sparse, cache=cache,
                                                    factorized=factorized)):  # fmt: skip
            every = slice(0, None)
            got = dec.masks_from_tokens(hs, keys, size, every), dec.iou_prediction_head(hs[:, 0])
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="batch 1"):
        prepare_image(dec, emb.repeat(2, 1, 1, 1), pe, dense)
    with pytest.raises(ValueError, match="image embeddings have batch 2 but there are 3"):
        decode_tokens(dec, sparse, image_embeddings=emb.repeat(2, 1, 1, 1), image_pe=pe,
                      dense_prompt_embeddings=dense)  # fmt: skip
