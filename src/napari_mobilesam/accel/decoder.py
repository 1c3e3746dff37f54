"""The mask decoder's fast path: a per-image cache and factorised cross attentions.

Computed on the model's own :class:`~napari_mobilesam.model.MaskDecoder` weights, with
the same results as its ``forward`` up to float rounding (tests check both):

- **Per-image cache** (:func:`prepare_image`): everything the transformer's first
  block computes from the image alone (the keys/values of its token-to-image
  attention, the queries of its image-to-token attention) does not depend on the
  prompts; it is computed once per image (with the "no mask" dense prompt) and reused
  by every prompt.
- **Factorised attention** (:func:`tokens_to_image`, :func:`image_to_tokens`): a
  prompt has ~7 tokens against 4096 image tokens, so the cross attentions are cheaper
  when the tokens are mapped into the image's channel space than when every image
  token is projected down.
- **Split outputs** (:func:`decode_tokens`, then the decoder's ``iou_prediction_head``
  and ``masks_from_tokens``): the predicted IoU comes before the expensive upscaling,
  so callers can drop prompts first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.mask_decoder import MaskDecoder
from ..model.transformer import Attention, TwoWayAttentionBlock

__all__ = [
    "ImageCache",
    "decode_tokens",
    "image_to_tokens",
    "prepare_image",
    "tokens_to_image",
    "worth_factoring",
]


@dataclass(frozen=True)
class ImageCache:
    """Prompt-independent image-side tensors of one image (batch 1).

    Attributes
    ----------
    size : (int, int)
        (H, W) of the image embedding grid.
    keys, key_pe : torch.Tensor
        (1, H*W, C) image tokens (embedding + "no mask" dense prompt) and their
        positional encoding.
    t2i_k, t2i_v, i2t_q : torch.Tensor
        First block's projections: keys/values of the token-to-image attention and
        queries of the image-to-token attention, (1, heads, H*W, C').
    """

    size: tuple[int, int]
    keys: torch.Tensor
    key_pe: torch.Tensor
    t2i_k: torch.Tensor
    t2i_v: torch.Tensor
    i2t_q: torch.Tensor


def prepare_image(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
) -> ImageCache:
    """The prompt-independent work of ``decoder`` for one image and a shared dense prompt.

    Parameters
    ----------
    image_embeddings, image_pe, dense_prompt_embeddings : (1, C, H, W) torch.Tensor
        The embedding, the dense positional encoding and the "no mask" embedding (the
        cache is only valid with it).
    """
    src = image_embeddings + dense_prompt_embeddings
    if src.shape[0] != 1:
        raise ValueError(f"prepare_image takes one image (batch 1), got {tuple(src.shape)}")
    keys = src.flatten(2).transpose(1, 2)
    key_pe = image_pe.flatten(2).transpose(1, 2)
    block = decoder.transformer.layers[0]
    k = keys + key_pe
    return ImageCache(
        (src.shape[2], src.shape[3]),
        keys,
        key_pe,
        block.cross_attn_token_to_image.project_k(k),
        block.cross_attn_token_to_image.project_v(keys),
        block.cross_attn_image_to_token.project_q(k),
    )


def decode_tokens(
    decoder: MaskDecoder,
    sparse_prompt_embeddings: torch.Tensor,
    *,
    cache: ImageCache | None = None,
    image_embeddings: torch.Tensor | None = None,
    image_pe: torch.Tensor | None = None,
    dense_prompt_embeddings: torch.Tensor | None = None,
    factorized: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The decoder's transformer on B prompts: against ``cache``, or the three tensors.

    Parameters
    ----------
    decoder : MaskDecoder
    sparse_prompt_embeddings : (B, N, C) torch.Tensor
    cache : ImageCache, optional
        :func:`prepare_image` of the image; the three tensors below are then unused.
    image_embeddings : (1 or B, C, H, W) torch.Tensor, optional
    image_pe : (1, C, H, W) torch.Tensor, optional
    dense_prompt_embeddings : (1 or B, C, H, W) torch.Tensor, optional
    factorized : bool
        Use the factorised cross attentions where they cost less (False: projections
        as in the model).

    Returns
    -------
    hs : (B, T, C) torch.Tensor
        Output tokens (IoU token, mask tokens, prompt tokens).
    keys : (B or 1, H*W, C) torch.Tensor
        Image tokens after the transformer.
    size : (int, int)
        (H, W) of the embedding grid.
    """
    tokens = decoder.prompt_tokens(sparse_prompt_embeddings)
    if cache is None:
        src = image_embeddings + dense_prompt_embeddings
        if src.shape[0] not in (1, tokens.shape[0]):
            raise ValueError(
                f"image embeddings have batch {src.shape[0]} but there are "
                f"{tokens.shape[0]} prompts"
            )
        size = (src.shape[2], src.shape[3])
        keys = src.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        first = None
    else:
        size, keys, key_pe = cache.size, cache.keys, cache.key_pe
        first = (cache.t2i_k, cache.t2i_v, cache.i2t_q)
    transformer = decoder.transformer
    queries = tokens
    for i, layer in enumerate(transformer.layers):
        proj = first if i == 0 else None
        queries, keys = _block(layer, queries, keys, tokens, key_pe, proj, factorized)
    q = queries + tokens
    final = transformer.final_attn_token_to_image
    if factorized and worth_factoring(final, q.shape[1]):
        attn = tokens_to_image(final, q, keys + key_pe, keys)
    else:
        attn = final(q, keys + key_pe, keys)
    return transformer.norm_final_attn(queries + attn), keys, size


def _block(
    block: TwoWayAttentionBlock,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
    image_proj: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    factorized: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One :class:`TwoWayAttentionBlock`; ``image_proj`` is the cache's projections of
    these ``keys`` (first block only)."""
    if block.skip_first_layer_pe:
        queries = block.self_attn(queries, queries, queries)
    else:
        q = queries + query_pe
        queries = queries + block.self_attn(q, q, queries)
    queries = block.norm1(queries)

    t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
    n_tokens = queries.shape[1]
    k = keys + key_pe if image_proj is None else None  # both attentions use it
    q = queries + query_pe
    if image_proj is not None:
        attn = t2i.attend(t2i.project_q(q), image_proj[0], image_proj[1])
    elif factorized and worth_factoring(t2i, n_tokens):
        attn = tokens_to_image(t2i, q, k, keys)
    else:
        attn = t2i(q, k, keys)
    queries = block.norm2(queries + attn)
    queries = block.norm3(queries + block.mlp(queries))

    q = queries + query_pe
    if factorized and worth_factoring(i2t, n_tokens):
        q_heads = None if image_proj is None else image_proj[2]
        keys = image_to_tokens(i2t, k, q, queries, q_heads=q_heads, residual=keys)
    elif image_proj is not None:
        keys = keys + i2t.attend(image_proj[2], i2t.project_k(q), i2t.project_v(queries))
    else:
        keys = keys + i2t(k, q, queries)
    return queries, block.norm4(keys)


def worth_factoring(attn: Attention, n_tokens: int) -> bool:
    """Whether the token-side factorisation costs fewer FLOPs than the projections."""
    return n_tokens * attn.num_heads < attn.internal_dim


def _head_weights(attn: Attention, lin: torch.nn.Linear) -> torch.Tensor:
    """(heads, head_dim, C) view of a projection weight."""
    return lin.weight.view(attn.num_heads, -1, lin.weight.shape[1])


def _bmm_shared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for (B, n, k) @ (B or 1, k, m); a shared ``b`` is one large GEMM."""
    if b.shape[0] == 1 and a.shape[0] > 1:
        return (a.reshape(-1, a.shape[-1]) @ b[0]).view(a.shape[0], a.shape[1], -1)
    return a @ b


def tokens_to_image(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``attn(q, k, v)`` for few queries (tokens) and many keys (pixels).

    The keys and values are never projected: per head, the query is mapped back to
    the key's input space, ``(q_h W_k,h) . k`` (the key bias adds the same number to
    every score of a row, so the softmax ignores it), and the value projection is
    applied after the weighted sum, ``(P v) W_v,h^T + b_v,h`` (the weights of a row
    sum to 1).

    Shapes: q (B, Nq, C); k, v (B or 1, Nk, C) -> (B, Nq, C).
    """
    b, nq, _ = q.shape
    heads = attn.num_heads
    qh = attn.project_q(q) * (attn.internal_dim // heads) ** -0.5  # (B, h, Nq, d)
    q_in = torch.einsum("bhnd,hdc->bhnc", qh, _head_weights(attn, attn.k_proj))
    q_in = q_in.reshape(b, heads * nq, -1)  # (B, h*Nq, C)
    probs = _bmm_shared(q_in, k.transpose(1, 2)).softmax(dim=-1)  # (B, h*Nq, Nk)
    pv = _bmm_shared(probs, v)  # (B, h*Nq, C)
    out = torch.einsum(
        "bhnc,hdc->bnhd", pv.view(b, heads, nq, -1), _head_weights(attn, attn.v_proj)
    )
    out = out + attn.v_proj.bias.view(heads, -1)
    return attn.out_proj(out.reshape(b, nq, attn.internal_dim))


def image_to_tokens(
    attn: Attention,
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    q_heads: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attn(q, k, v)`` for many queries (pixels) and few keys (tokens), plus
    ``residual`` (B or 1, Nq, C) when given.

    Per head the key is mapped into the query's input space,
    ``q . (W_q,h^T k_h) + b_q,h . k_h``, and the output projection is folded into the
    values, ``sum_h P_h (v_h W_o,h^T) + b_o``, so nothing of size (pixels x channels)
    is projected. ``q_heads`` (1 or B, heads, Nq, d), the already projected queries,
    may replace ``q``. Scores are laid out (B, heads, Nk, Nq) so the softmax over the
    few keys runs along a long contiguous axis. The ``residual`` is added by the last
    matrix product itself (``baddbmm``): no separate pass over the (B, Nq, C) result.

    Shapes: q (B or 1, Nq, C); k, v (B, Nk, C) -> (B, Nq, C).
    """
    b, nk, _ = k.shape
    heads = attn.num_heads
    scale = (attn.internal_dim // heads) ** -0.5
    kh = attn.project_k(k) * scale  # (B, h, Nk, d)
    if q_heads is not None and q_heads.shape[0] == 1 and b > 1:
        # shared queries: one (B*Nk, d) @ (d, Nq) product per head, no broadcast copy
        per_head = kh.transpose(0, 1).reshape(heads, b * nk, -1) @ q_heads[0].transpose(1, 2)
        scores = per_head.view(heads, b, nk, -1).transpose(0, 1)  # (B, h, Nk, Nq)
    elif q_heads is not None:
        scores = kh @ q_heads.transpose(-2, -1)  # (B, h, Nk, Nq)
    else:
        k_in = torch.einsum("bhnd,hdc->bhnc", kh, _head_weights(attn, attn.q_proj))
        k_bias = torch.einsum("bhnd,hd->bhn", kh, attn.q_proj.bias.view(heads, -1))
        scores = _bmm_shared(k_in.reshape(b, heads * nk, -1), q.transpose(1, 2))
        scores = (scores + k_bias.reshape(b, heads * nk, 1)).view(b, heads, nk, -1)
    probs = scores.softmax(dim=2).reshape(b, heads * nk, -1)  # (B, h*Nk, Nq)
    out_w = attn.out_proj.weight.view(-1, heads, attn.internal_dim // heads)  # (C, h, d)
    v_out = torch.einsum("bhnd,chd->bhnc", attn.project_v(v), out_w)  # (B, h, Nk, C)
    # each head's weights sum to 1 per query: bias / heads on every value row adds
    # the output bias exactly once, without a pass over the (B, Nq, C) result
    v_out = (v_out + attn.out_proj.bias / heads).reshape(b, heads * nk, -1)
    if residual is not None:
        return torch.baddbmm(residual.expand(b, -1, -1), probs.transpose(1, 2), v_out)
    return probs.transpose(1, 2) @ v_out
