"""SAM's mask decoder: image embedding + prompt embeddings -> mask logits and IoU."""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm2d
from .transformer import ImageCache


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

    def prepare_image(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> ImageCache:
        """Prompt-independent work for one image and a shared dense prompt.

        Parameters
        ----------
        image_embeddings : (1, C, h, w)
        image_pe : (1, C, h, w)
        dense_prompt_embeddings : (1, C, h, w)
            The "no mask" embedding; the cache is only valid with it.
        """
        return self.transformer.prepare_image(image_embeddings + dense_prompt_embeddings, image_pe)

    def forward(
        self,
        image_embeddings: torch.Tensor | None,
        image_pe: torch.Tensor | None,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor | None,
        multimask_output: bool,
        image_cache: ImageCache | None = None,
        factorized: bool | None = None,
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
        image_cache : ImageCache, optional
            :meth:`prepare_image` of this image and dense prompt; the three tensor
            arguments before it are then ignored (may be None).
        factorized : bool, optional
            Override the transformer's ``factorized`` setting (False: the plain
            reference computation).

        Returns
        -------
        masks : (B, M, 4h, 4w) low-resolution logits, M = 3 or 1
        iou_pred : (B, M)
        """
        hs, keys, size = self.forward_tokens(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            image_cache,
            factorized,
        )
        return (
            self.masks_from_tokens(hs, keys, size, multimask_output),
            self.iou_from_tokens(hs, multimask_output),
        )

    def _token_slice(self, multimask_output: bool) -> slice:
        return slice(1, None) if multimask_output else slice(0, 1)

    def forward_tokens(
        self,
        image_embeddings: torch.Tensor | None,
        image_pe: torch.Tensor | None,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor | None,
        image_cache: ImageCache | None = None,
        factorized: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """The transformer part: output tokens (B, T', C), image tokens (B or 1, h*w, C)
        and the grid size (h, w). Arguments as in :meth:`forward`."""
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1
        )
        if image_cache is None:
            src = image_embeddings + dense_prompt_embeddings
            if src.shape[0] not in (1, b):
                raise ValueError(
                    f"image embeddings have batch {src.shape[0]} but there are {b} prompts"
                )
            size = (src.shape[2], src.shape[3])
            hs, keys = self.transformer(src, image_pe, tokens, factorized=factorized)
        else:
            size = image_cache.size
            hs, keys = self.transformer(None, None, tokens, image_cache, factorized=factorized)
        return hs, keys, size

    def iou_from_tokens(self, hs: torch.Tensor, multimask_output: bool) -> torch.Tensor:
        """Predicted IoU (B, M) from the transformer's output tokens."""
        return self.iou_prediction_head(hs[:, 0, :])[:, self._token_slice(multimask_output)]

    def masks_from_tokens(
        self,
        hs: torch.Tensor,
        keys: torch.Tensor,
        size: tuple[int, int],
        multimask_output: bool,
    ) -> torch.Tensor:
        """Low-res mask logits (B, M, 4h, 4w) from the transformer's outputs.

        The expensive part (upscaling convolutions): callers that filter on the
        IoU first can run it on the surviving prompts only.
        """
        b = hs.shape[0]
        h, w = size
        sl = self._token_slice(multimask_output)
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :][:, sl]
        mlps = list(self.output_hypernetworks_mlps)[sl]
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
