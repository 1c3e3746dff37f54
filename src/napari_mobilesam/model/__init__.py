"""The MobileSAM / SAM network in pure torch, one module per file.

``Sam`` composes an image encoder (:class:`TinyViT` for ``vit_t``,
:class:`ImageEncoderViT` for ``vit_b/l/h``), a :class:`PromptEncoder` and a
:class:`MaskDecoder` (with a :class:`TwoWayTransformer`). Builders and the
registry of named variants live in :mod:`napari_mobilesam.build`.
"""

from .common import LayerNorm2d
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import PIXEL_MEAN, PIXEL_STD, Sam
from .tiny_vit import TinyViT, TinyViTConfig
from .transformer import TwoWayTransformer

__all__ = [
    "PIXEL_MEAN",
    "PIXEL_STD",
    "ImageEncoderViT",
    "LayerNorm2d",
    "MaskDecoder",
    "PromptEncoder",
    "Sam",
    "TinyViT",
    "TinyViTConfig",
    "TwoWayTransformer",
]
