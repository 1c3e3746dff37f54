"""``mobilesam-everything``: batch segment-everything over folders and large stacks."""

from napari_mobilesam import __version__

__all__ = ["__version__"]
