"""Before and after the networks: images to the input frame, low-res logits to masks.

Shared by every backend. An image goes to the encoder as (1, 3, h, w) uint8 resized so
that its longer side is the model's input size S (Pillow's bilinear resize on the host,
or the same bytes on the device, :class:`~napari_mobilesam.accel.resize.PillowResize`),
then normalised and zero-padded to (S, S) by ``Sam.preprocess``. Low-res logits come
back to the original size by ``Sam.postprocess_masks``, in chunks.

With an upscale limit (``max_upscale``) a small image is resized to a shorter side
(:func:`~napari_mobilesam.transforms.input_long_side`) and the rest of the input is
filled with the image's background colour (the per-channel median of its border
pixels) instead of zeros: a model trained on fluorescence images reads SAM's zero
padding, which is the mean ImageNet colour, as a bright object.
"""

from __future__ import annotations

import numpy as np
import torch

from ..accel.resize import PillowResize
from ..model import Sam
from ..transforms import (
    check_max_upscale,
    input_long_side,
    preprocess_shape,
    resize_longest_side,
)

__all__ = ["DEVICE_RESIZE_PIXELS", "POSTPROCESS_CHUNK", "Frames", "background_colour"]

#: upsampled logits are produced in chunks of at most this many float32 values (~256
#: MB), so many prompts never hold them all at once
POSTPROCESS_CHUNK = 64 * 2**20
#: larger images are resized by Pillow on the host (the device copy is float64)
DEVICE_RESIZE_PIXELS = 4096 * 4096


class Frames:
    """Images into the model's input frame and masks out of it, for one model.

    Parameters
    ----------
    model : Sam
    device_resize : bool, optional
        Resize on the model's device (:class:`~napari_mobilesam.accel.resize.PillowResize`)
        instead of with Pillow on the host: default on CUDA, where Pillow's resize would
        bound a stack's speed. The bytes are the same.
    max_upscale : float, optional
        Enlarge an image at most this many times (>= 1); None: resize every image to
        the model's input size, as SAM does.
    """

    def __init__(
        self, model: Sam, device_resize: bool | None = None, max_upscale: float | None = None
    ) -> None:
        check_max_upscale(max_upscale)
        self.model = model
        self.max_upscale = None if max_upscale is None else float(max_upscale)
        if device_resize is None:
            device_resize = model.device.type == "cuda"
        self.resize = PillowResize(model.img_size) if device_resize else None

    def long_side(self, size: tuple[int, int]) -> int:
        """The longer side, in the model's input, of an image of ``size`` (H, W)."""
        return input_long_side(size[0], size[1], self.model.img_size, self.max_upscale)

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) that an image of ``size`` (H, W) takes in the model's input (the
        ``input_size`` of its embedding)."""
        return preprocess_shape(size[0], size[1], self.long_side(size))

    def frame(self, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """(1, 3, h, w) uint8 tensor on the model's device, and the (H, W) of ``rgb``.

        Parameters
        ----------
        rgb : np.ndarray
            (H, W, 3) uint8 in the model's channel order.
        """
        device = self.model.device
        size = (int(rgb.shape[0]), int(rgb.shape[1]))
        long_side = self.long_side(size)
        full = long_side == self.model.img_size
        if full and self.resize is not None and size[0] * size[1] <= DEVICE_RESIZE_PIXELS:
            image = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).to(device)
            return self.resize(image.permute(2, 0, 1)).contiguous()[None], size
        resized = resize_longest_side(rgb, long_side)
        return torch.tensor(resized, device=device).permute(2, 0, 1).contiguous()[None], size

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) RGB 0..255 (uint8 or float) -> (B, 3, S, S) float32 encoder input.

        Frames whose longer side is the model's input size S are zero-padded, as SAM
        pads them; smaller ones (an upscale limit) are padded with their background
        colour (:func:`background_colour`), normalised.
        """
        x = frames.to(self.model.device).float()
        out = self.model.preprocess(x)
        h, w = x.shape[-2:]
        if max(h, w) < self.model.img_size:
            model = self.model
            fill = (background_colour(x) - model.pixel_mean.view(1, 3)) / model.pixel_std.view(
                1, 3
            )  # (B, 3)
            out[:, :, h:, :] = fill[:, :, None, None]
            out[:, :, :h, w:] = fill[:, :, None, None]
        return out

    def masks(
        self,
        low_res: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        return_logits: bool = False,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """Low-res logits (B, M, h', w') -> (B, M, H, W) bool masks, or float logits.

        ``chunk`` bounds the float32 values upsampled at once (default
        :data:`POSTPROCESS_CHUNK`).
        """
        b, m = low_res.shape[:2]
        h, w = original_size
        per_prompt = m * max(h * w, self.model.img_size**2)
        step = max(1, (chunk or POSTPROCESS_CHUNK) // per_prompt)
        out = torch.empty(
            (b, m, h, w),
            dtype=low_res.dtype if return_logits else torch.bool,
            device=low_res.device,
        )
        for i in range(0, b, step):
            logits = self.model.postprocess_masks(low_res[i : i + step], input_size, original_size)
            out[i : i + step] = logits if return_logits else logits > self.model.mask_threshold
        return out


def background_colour(frames: torch.Tensor) -> torch.Tensor:
    """The background colour of images: the per-channel median of their border pixels.

    Parameters
    ----------
    frames : torch.Tensor
        (B, 3, h, w) float RGB 0..255.

    Returns
    -------
    torch.Tensor
        (B, 3) float32 on the frames' device.
    """
    border = torch.cat(
        [frames[..., 0, :], frames[..., -1, :], frames[..., 1:-1, 0], frames[..., 1:-1, -1]],
        dim=-1,
    )
    return border.float().median(dim=-1).values
