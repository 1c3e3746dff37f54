"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Token tensors are (B, N, C). The image side may come in with batch 1 while the
prompts have batch B (one image, many prompts): it is then projected once and
broadcast, never copied per prompt, until the first image-to-token update makes
it prompt-specific. (A per-image cache and factorised cross attentions, the same
function computed faster, are in :mod:`napari_mobilesam.accel.decoder`.)
"""

from __future__ import annotations

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

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block: queries (B, N, C) and keys (B or 1, H*W, C) with their encodings."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        k = keys + key_pe  # both cross attentions use it
        q = queries + query_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = keys + self.cross_attn_image_to_token(k, q, queries)
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
    """

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

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the transformer.

        Parameters
        ----------
        image_embedding : (B or 1, C, H, W)
        image_pe : (1, C, H, W)
        point_embedding : (B, N, C)

        Returns
        -------
        queries : (B, N, C)
        keys : (B, H*W, C)
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q = queries + point_embedding
        attn = self.final_attn_token_to_image(q, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys
