"""SAM's mask decoder: image embedding + prompt embeddings -> mask logits and IoU."""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm2d


class MaskDecoder(nn.Module):
    """Predicts ``num_multimask_outputs + 1`` masks and their IoU per prompt.

    Parameters
    ----------
    transformer_dim : int
        Channel width of the image embedding and the tokens (256).
    transformer : nn.Module
        A :class:`~napari_mobilesam.model.transformer.TwoWayTransformer`.
    num_multimask_outputs : int
        Masks returned when ``multimask_output`` is set (3); one more token gives
        the single-mask output.
    activation : nn.Module class
        Activation of the upscaling path (GELU).
    iou_head_depth, iou_head_hidden_dim : int
        Layers and width of the IoU prediction MLP (3, 256).
    """

    #: (convolution, activation) pairs that may run as one kernel (napari_mobilesam.accel)
    conv_gelu_pairs = (("output_upscaling.3", "output_upscaling.4"),)

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks.

        Parameters
        ----------
        image_embeddings : (1 or B, C, h, w)
            One embedding shared by all prompts (broadcast, not copied), or one per
            prompt.
        image_pe : (1, C, h, w)
        sparse_prompt_embeddings : (B, N, C)
        dense_prompt_embeddings : (1 or B, C, h, w)
        multimask_output : bool
            Return the ``num_multimask_outputs`` masks instead of the single one.

        Returns
        -------
        masks : (B, M, 4h, 4w) low-resolution logits, M = 3 or 1
        iou_pred : (B, M)
        """
        hs, keys, size = self._transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        sl = self.token_slice(multimask_output)
        return self.masks_from_tokens(hs, keys, size, sl), self.iou_prediction_head(hs[:, 0])[:, sl]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, 4h, 4w) and IoU (B, T) of all T = ``num_mask_tokens`` outputs
        (token 0: the single-mask output, 1..3: the multimask outputs); arguments as
        for :meth:`forward`."""
        hs, keys, size = self._transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        every = slice(0, None)
        return self.masks_from_tokens(hs, keys, size, every), self.iou_prediction_head(hs[:, 0])

    def _transformer(self, image_embeddings, image_pe, sparse, dense):
        tokens = self.prompt_tokens(sparse)
        src = image_embeddings + dense
        if src.shape[0] not in (1, tokens.shape[0]):
            raise ValueError(
                f"image embeddings have batch {src.shape[0]} but there are {tokens.shape[0]} "
                "prompts"
            )
        hs, keys = self.transformer(src, image_pe, tokens)
        return hs, keys, (src.shape[2], src.shape[3])

    def prompt_tokens(self, sparse_prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """The transformer's input tokens (B, 1 + T + N, C): the IoU token and the T mask
        tokens before each prompt's N sparse embeddings (in their dtype)."""
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.to(sparse_prompt_embeddings.dtype)
        return torch.cat(
            [output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1
        )

    @staticmethod
    def token_slice(multimask_output: bool) -> slice:
        """The mask tokens returned: 1..3 with ``multimask_output``, else 0."""
        return slice(1, None) if multimask_output else slice(0, 1)

    def masks_from_tokens(
        self,
        hs: torch.Tensor,
        keys: torch.Tensor,
        size: tuple[int, int],
        tokens: slice,
    ) -> torch.Tensor:
        """Low-res mask logits (B, M, 4h, 4w) of the mask ``tokens`` (a slice of the T
        mask tokens) from the transformer's outputs: output tokens ``hs`` (B, 1 + T + N,
        C) and image tokens ``keys`` (B or 1, h*w, C) on an (h, w) grid."""
        b = hs.shape[0]
        h, w = size
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :][:, tokens]
        mlps = list(self.output_hypernetworks_mlps)[tokens]
        # (B, h*w, C) tokens are a channels-last image: view, don't copy (the
        # transposed convolutions are also several times faster channels-last).
        c = keys.shape[-1]
        grid = keys.expand(b, -1, -1).reshape(b, h, w, c).permute(0, 3, 1, 2)
        upscaled = self.output_upscaling(grid)  # (B, C/8, 4h, 4w)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(mlps)], dim=1
        )  # (B, M, C/8)
        _, cu, hu, wu = upscaled.shape
        pixels = upscaled.permute(0, 2, 3, 1).reshape(b, hu * wu, cu)
        return (pixels @ hyper_in.transpose(1, 2)).transpose(1, 2).reshape(b, -1, hu, wu)
