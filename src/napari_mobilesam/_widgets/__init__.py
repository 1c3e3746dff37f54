"""napari widgets (the only package that imports napari or Qt)."""

from ._everything import EverythingWidget
from ._objects import ObjectsWidget
from ._prompt import PromptWidget

__all__ = ["EverythingWidget", "ObjectsWidget", "PromptWidget"]
