"""napari-mobilesam: MobileSAM for napari, batch segmentation and distillation.

The core (this package outside ``_widgets``) needs no GUI. Heavy modules import
lazily so that ``import napari_mobilesam`` stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": "napari_mobilesam.build",
    "build_sam": "napari_mobilesam.build",
    "Predictor": "napari_mobilesam.predictor",
    "to_rgb_uint8": "napari_mobilesam.normalize",
}

__all__ = ["Predictor", "__version__", "build_sam", "load_model", "to_rgb_uint8"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_mobilesam' has no attribute {name!r}")
