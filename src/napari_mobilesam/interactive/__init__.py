"""Interactive segmentation of images and stacks, without any GUI.

The napari prompt widget stays thin: it turns layers into calls on
:class:`PromptSession` and runs the slow ones (:meth:`PromptSession.embed`,
:meth:`PromptSession.precompute`, :meth:`PromptSession.propagate`) in a thread worker.
One module per job:

- :mod:`.planes`: :class:`ImagePlanes`, the layout of an image or stack and its planes;
- :mod:`.cache`: :class:`EmbeddingCache`, per-plane embeddings in memory and on disk;
- :mod:`.prompts`: :class:`ObjectPrompt`, :class:`Prediction`, napari prompts to SAM's;
- :mod:`.labels`: :class:`LabelEditor`, commit masks into label images, undo;
  :func:`add_objects`, merge a label image's objects into unlabeled pixels (:func:`drop_covered`
  first drops those mostly inside existing objects);
- :mod:`.propagate`: following an object through neighbouring planes;
- :mod:`.propagate_many`: following every object of a plane at once, one decoder call
  per plane;
- :mod:`.objects`: the objects of a label image as a table (area, bbox, scores,
  intensities), delete and merge;
- :mod:`.session`: :class:`PromptSession`, all of the above around one predictor (its
  propagation methods in :mod:`.session_stacks`);
- :mod:`.locks`: :func:`predictor_lock`, what keeps sessions on one predictor apart.

Coordinates here are napari's: points are (row, col) = (y, x) pixels of the plane,
boxes two opposite corners (r0, c0, r1, c1). They are converted to SAM's (x, y) with
:mod:`napari_mobilesam.transforms` only.
"""

from .cache import EmbeddingCache, content_fingerprint, model_fingerprint
from .labels import LabelEditor, add_objects, drop_covered
from .locks import predictor_lock
from .planes import ImagePlanes
from .prompts import ObjectPrompt, Prediction
from .propagate import PropagationRule, mask_prompt
from .propagate_many import Propagated
from .session import PromptSession

__all__ = [
    "EmbeddingCache",
    "ImagePlanes",
    "LabelEditor",
    "ObjectPrompt",
    "Prediction",
    "PromptSession",
    "Propagated",
    "PropagationRule",
    "add_objects",
    "content_fingerprint",
    "drop_covered",
    "mask_prompt",
    "model_fingerprint",
    "predictor_lock",
]
