"""``Sam``: an image encoder, a prompt encoder and a mask decoder composed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

#: RGB normalisation of every SAM model, in 0..255 units (ImageNet's mean and std)
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """Segment Anything model assembled from its parts.

    Parameters
    ----------
    image_encoder : nn.Module
        Maps a normalised, padded (B, 3, S, S) image to (B, C, S/16, S/16);
        exposes ``img_size`` (S).
    prompt_encoder : PromptEncoder
    mask_decoder : MaskDecoder
    pixel_mean, pixel_std : sequence of 3 floats
        RGB normalisation in 0..255 units.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def img_size(self) -> int:
        """Side of the square model input (1024)."""
        return self.image_encoder.img_size

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (B, 3, h, w) RGB in 0..255 and zero-pad bottom/right to (S, S)."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """Upscale low-res logits (B, M, h', w') to the original (B, M, H, W).

        The reference's two steps: bilinear to (S, S), crop the padding to
        ``input_size`` (h, w), bilinear to ``original_size`` (H, W). The first step
        only computes what survives the crop: it upsamples the low-res rows and
        columns that the kept pixels read (plus the one beyond, so no border is
        clamped differently), which gives bit-identical values.
        """
        lh, lw = masks.shape[-2:]
        fh, fw = self.img_size // lh, self.img_size // lw  # 4 for SAM
        h, w = input_size
        # kept pixel j reads low-res sample floor((j + 0.5) / f - 0.5) and the next one
        rows = min(lh, (h - 1) // fh + 2)
        cols = min(lw, (w - 1) // fw + 2)
        masks = bilinear(masks[..., :rows, :cols], (rows * fh, cols * fw))
        masks = masks[..., :h, :w]
        return bilinear(masks, original_size)

    @torch.no_grad()
    def forward(
        self, batched_input: list[dict], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """End-to-end prediction over images already resized to the input frame.

        Each dict holds ``image`` (3, h, w) float 0..255, ``original_size`` (H, W)
        and optionally ``point_coords`` (B, N, 2), ``point_labels`` (B, N),
        ``boxes`` (B, 4), ``mask_inputs`` (B, 1, 256, 256), all in the input frame.
        Returns per image ``masks`` (B, M, H, W) bool, ``iou_predictions`` (B, M)
        and ``low_res_logits`` (B, M, 256, 256).
        """
        images = torch.stack([self.preprocess(d["image"][None])[0] for d in batched_input])
        embeddings = self.image_encoder(images)
        outputs = []
        for record, emb in zip(batched_input, embeddings, strict=True):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            sparse, dense = self.prompt_encoder(
                points, record.get("boxes"), record.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                emb[None], self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output
            )
            masks = self.postprocess_masks(
                low_res, tuple(record["image"].shape[-2:]), tuple(record["original_size"])
            )
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs


def bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` of (B, C, h, w).

    On a CPU running one torch thread (the thread policy's choice on a busy machine),
    torch's bilinear kernel for C > 1 channels is 3-5x slower than for one and rounds
    differently (by up to about 4e-6 on logits of magnitude 10) from its multi-threaded
    kernel. There each channel is upsampled as an image of its own, which gives the
    multi-threaded kernel's values bit for bit (a test checks it). Elsewhere it is the
    plain call.
    """
    if x.device.type == "cpu" and x.dim() == 4 and x.shape[1] > 1 and torch.get_num_threads() == 1:
        b, c = x.shape[:2]
        y = F.interpolate(
            x.reshape(b * c, 1, *x.shape[2:]), size, mode="bilinear", align_corners=False
        )
        return y.reshape(b, c, *y.shape[2:])
    return F.interpolate(x, size, mode="bilinear", align_corners=False)
