"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Token tensors are (B, N, C). The image side may come in with batch 1 while the
prompts have batch B (one image, many prompts): it is then projected once and
broadcast, never copied per prompt, until the first image-to-token update makes
it prompt-specific.

Everything the first block computes from the image alone (the keys/values of
its token-to-image attention and the queries of its image-to-token attention)
does not depend on the prompts: :meth:`TwoWayTransformer.prepare_image` computes
it once per image and ``forward(..., image_cache=...)`` reuses it.

Few tokens, many pixels: a prompt has ~7 tokens against 4096 image tokens, so
the attentions between them are cheaper when the tokens are mapped into the
image's channel space than when every image token is projected down
(:meth:`Attention.tokens_to_image`, :meth:`Attention.image_to_tokens`). The
result is the same up to float rounding; ``fast=False`` keeps the plain
projection path as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock


class Attention(nn.Module):
    """Multi-head attention with optional down-projection of the inner width.

    ``q``, ``k``, ``v`` are (B, N, C) (the batch axis of ``k``/``v`` may be 1 and
    is broadcast against ``q``'s, or the other way round). ``project_*`` and
    :meth:`attend` expose the two halves so projections can be reused.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"{self.internal_dim} channels do not split into {num_heads} heads")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C' / heads)."""
        return self._heads(self.q_proj(x))

    def project_k(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.k_proj(x))

    def project_v(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.v_proj(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention over projected heads, then the output projection -> (B, Nq, C)."""
        b = max(q.shape[0], k.shape[0])
        q, k, v = (t.expand(b, -1, -1, -1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, self.internal_dim)
        return self.out_proj(out)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attend(self.project_q(q), self.project_k(k), self.project_v(v))

    def worth_factoring(self, n_tokens: int) -> bool:
        """Whether the token-side factorisation below costs fewer FLOPs."""
        return n_tokens * self.num_heads < self.internal_dim

    def _weights(self, lin: nn.Linear) -> torch.Tensor:
        """(heads, head_dim, C) view of a projection weight."""
        return lin.weight.view(self.num_heads, -1, lin.weight.shape[1])

    def tokens_to_image(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``forward(q, k, v)`` for few queries (tokens) and many keys (pixels).

        The keys and values are never projected: per head, the query is mapped
        back to the key's input space, ``(q_h W_k,h) . k`` (the key bias adds the
        same number to every score of a row, so the softmax ignores it), and the
        value projection is applied after the weighted sum,
        ``(P v) W_v,h^T + b_v,h`` (the weights of a row sum to 1).

        Shapes: q (B, Nq, C); k, v (B or 1, Nk, C) -> (B, Nq, C).
        """
        b, nq, _ = q.shape
        heads = self.num_heads
        qh = self.project_q(q) * (self.internal_dim // heads) ** -0.5  # (B, h, Nq, d)
        q_in = torch.einsum("bhnd,hdc->bhnc", qh, self._weights(self.k_proj))
        q_in = q_in.reshape(b, heads * nq, -1)  # (B, h*Nq, C)
        probs = _bmm_shared(q_in, k.transpose(1, 2)).softmax(dim=-1)  # (B, h*Nq, Nk)
        pv = _bmm_shared(probs, v)  # (B, h*Nq, C)
        out = torch.einsum("bhnc,hdc->bnhd", pv.view(b, heads, nq, -1), self._weights(self.v_proj))
        out = out + self.v_proj.bias.view(heads, -1)
        return self.out_proj(out.reshape(b, nq, self.internal_dim))

    def image_to_tokens(
        self,
        q: torch.Tensor | None,
        k: torch.Tensor,
        v: torch.Tensor,
        q_heads: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``forward(q, k, v)`` for many queries (pixels) and few keys (tokens), plus
        ``residual`` (B or 1, Nq, C) when given.

        Per head the key is mapped into the query's input space,
        ``q . (W_q,h^T k_h) + b_q,h . k_h``, and the output projection is folded
        into the values, ``sum_h P_h (v_h W_o,h^T) + b_o``, so nothing of size
        (pixels x channels) is projected. ``q_heads`` (1 or B, heads, Nq, d), the
        already projected queries, may replace ``q``. Scores are laid out
        (B, heads, Nk, Nq) so the softmax over the few keys runs along a long
        contiguous axis. The ``residual`` is added by the last matrix product itself
        (``baddbmm``): no separate pass over the (B, Nq, C) result, about half the
        time of product + sum on a CPU.

        Shapes: q (B or 1, Nq, C); k, v (B, Nk, C) -> (B, Nq, C).
        """
        b, nk, _ = k.shape
        heads = self.num_heads
        scale = (self.internal_dim // heads) ** -0.5
        kh = self.project_k(k) * scale  # (B, h, Nk, d)
        if q_heads is not None and q_heads.shape[0] == 1 and b > 1:
            # shared queries: one (B*Nk, d) @ (d, Nq) product per head, no broadcast copy
            per_head = kh.transpose(0, 1).reshape(heads, b * nk, -1) @ q_heads[0].transpose(1, 2)
            scores = per_head.view(heads, b, nk, -1).transpose(0, 1)  # (B, h, Nk, Nq)
        elif q_heads is not None:
            scores = kh @ q_heads.transpose(-2, -1)  # (B, h, Nk, Nq)
        else:
            k_in = torch.einsum("bhnd,hdc->bhnc", kh, self._weights(self.q_proj))
            k_bias = torch.einsum("bhnd,hd->bhn", kh, self.q_proj.bias.view(heads, -1))
            scores = _bmm_shared(k_in.reshape(b, heads * nk, -1), q.transpose(1, 2))
            scores = (scores + k_bias.reshape(b, heads * nk, 1)).view(b, heads, nk, -1)
        probs = scores.softmax(dim=2).reshape(b, heads * nk, -1)  # (B, h*Nk, Nq)
        out_w = self.out_proj.weight.view(-1, heads, self.internal_dim // heads)  # (C, h, d)
        v_out = torch.einsum("bhnd,chd->bhnc", self.project_v(v), out_w)  # (B, h, Nk, C)
        # each head's weights sum to 1 per query: bias / heads on every value row adds
        # the output bias exactly once, without a pass over the (B, Nq, C) result
        v_out = (v_out + self.out_proj.bias / heads).reshape(b, heads * nk, -1)
        if residual is not None:
            return torch.baddbmm(residual.expand(b, -1, -1), probs.transpose(1, 2), v_out)
        return probs.transpose(1, 2) @ v_out


def _bmm_shared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for (B, n, k) @ (B or 1, k, m); a shared ``b`` is one large GEMM."""
    if b.shape[0] == 1 and a.shape[0] > 1:
        return (a.reshape(-1, a.shape[-1]) @ b[0]).view(a.shape[0], a.shape[1], -1)
    return a @ b


@dataclass
class ImageCache:
    """Prompt-independent image-side tensors of one image (batch 1).

    Attributes
    ----------
    size : (int, int)
        (H, W) of the image embedding grid.
    keys, key_pe : torch.Tensor
        (1, H*W, C) image tokens and their positional encoding.
    t2i_k, t2i_v, i2t_q : torch.Tensor
        First block's projections: keys/values of the token-to-image attention
        and queries of the image-to-token attention, (1, heads, H*W, C').
    """

    size: tuple[int, int]
    keys: torch.Tensor
    key_pe: torch.Tensor
    t2i_k: torch.Tensor
    t2i_v: torch.Tensor
    i2t_q: torch.Tensor


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of the tokens, token-to-image attention, MLP, image-to-token."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module],
        attention_downsample_rate: int,
        skip_first_layer_pe: bool,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def project_image(
        self, keys: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three projections of the image tokens that do not involve the prompts."""
        k = keys + key_pe
        return (
            self.cross_attn_token_to_image.project_k(k),
            self.cross_attn_token_to_image.project_v(keys),
            self.cross_attn_image_to_token.project_q(k),
        )

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        image_proj: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        factorized: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block.

        ``image_proj`` is :meth:`project_image` of these ``keys`` when known;
        ``factorized`` lets the cross attentions use the token-side factorisation
        when it is cheaper.
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        n_tokens = queries.shape[1]
        k = keys + key_pe if image_proj is None else None  # both attentions use it
        q = queries + query_pe
        if image_proj is not None:
            attn = t2i.attend(t2i.project_q(q), image_proj[0], image_proj[1])
        elif factorized and t2i.worth_factoring(n_tokens):
            attn = t2i.tokens_to_image(q, k, keys)
        else:
            attn = t2i(q, k, keys)
        queries = self.norm2(queries + attn)
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        if factorized and i2t.worth_factoring(n_tokens):
            q_heads = None if image_proj is None else image_proj[2]
            keys = i2t.image_to_tokens(k, q, queries, q_heads=q_heads, residual=keys)
        elif image_proj is not None:
            keys = keys + i2t.attend(image_proj[2], i2t.project_k(q), i2t.project_v(queries))
        else:
            keys = keys + i2t(k, q, queries)
        return queries, self.norm4(keys)


class TwoWayTransformer(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock` and a final token-to-image attention.

    Parameters
    ----------
    depth, embedding_dim, num_heads, mlp_dim : int
        SAM: 2, 256, 8, 2048.
    activation : nn.Module class
        MLP activation (ReLU in SAM).
    attention_downsample_rate : int
        Inner width divisor of the cross attentions (2).

    Attributes
    ----------
    factorized : bool
        Use the token-side factorisation of the cross attentions where it saves
        work (default True); False runs the plain reference computation.
    """

    factorized: bool = True

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"TwoWayTransformer needs depth >= 1, got {depth}")
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                activation,
                attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def prepare_image(self, image_embedding: torch.Tensor, image_pe: torch.Tensor) -> ImageCache:
        """Prompt-independent work for one (1, C, H, W) image (plus dense prompt)."""
        if image_embedding.shape[0] != 1:
            raise ValueError(
                f"prepare_image takes one image (batch 1), got {tuple(image_embedding.shape)}"
            )
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        size = (image_embedding.shape[2], image_embedding.shape[3])
        return ImageCache(size, keys, key_pe, *self.layers[0].project_image(keys, key_pe))

    def forward(
        self,
        image_embedding: torch.Tensor | None,
        image_pe: torch.Tensor | None,
        point_embedding: torch.Tensor,
        image_cache: ImageCache | None = None,
        factorized: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the transformer.

        Parameters
        ----------
        image_embedding : (B or 1, C, H, W), or None with ``image_cache``
        image_pe : (1, C, H, W), or None with ``image_cache``
        point_embedding : (B, N, C)
        image_cache : ImageCache, optional
            From :meth:`prepare_image` of the same image embedding and PE.
        factorized : bool, optional
            Override :attr:`factorized` for this call.

        Returns
        -------
        queries : (B, N, C)
        keys : (B, H*W, C)
        """
        if image_cache is None:
            keys = image_embedding.flatten(2).transpose(1, 2)
            key_pe = image_pe.flatten(2).transpose(1, 2)
            first = None
        else:
            keys, key_pe = image_cache.keys, image_cache.key_pe
            first = (image_cache.t2i_k, image_cache.t2i_v, image_cache.i2t_q)
        queries = point_embedding
        fast = self.factorized if factorized is None else factorized
        for i, layer in enumerate(self.layers):
            proj = first if i == 0 else None
            queries, keys = layer(queries, keys, point_embedding, key_pe, proj, fast)
        q = queries + point_embedding
        final = self.final_attn_token_to_image
        if fast and final.worth_factoring(q.shape[1]):
            attn = final.tokens_to_image(q, keys + key_pe, keys)
        else:
            attn = final(q, keys + key_pe, keys)
        queries = self.norm_final_attn(queries + attn)
        return queries, keys
