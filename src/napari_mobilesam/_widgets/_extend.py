"""The everything widget's *extend* option: linked 3D objects prompted into the planes
where segment-everything missed them.

After a run linked through z (``z`` or ``zt``), each 3D object of the result layer is
prompted, with the box of its section, into the planes next to it where it has none
(:func:`napari_mobilesam.linking.extend.sweep_stack`, as ``mobilesam-everything
--link-extend`` does), one z-stack at a time, in a worker. Each plane that gains
sections is written into the layer as it is done, with the new sections' predicted IoU
in the layer's features; Cancel keeps what was added.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

from ..interactive import predictor_lock
from ..linking.extend import THRESHOLDS, box_masks, sweep_stack
from ..normalize import to_rgb_uint8

#: one step of :func:`extend_work`: (steps done, steps in all, and the plane that
#: gained sections: (index, labels (H, W), [(z, id, area, predicted IoU), ...]) or None)
Step = tuple[int, int, tuple[tuple[int, ...], np.ndarray, list] | None]


def z_stacks(lead: tuple[int, ...]) -> list[list[tuple[int, ...]]]:
    """The plane indices of each z-stack of an image whose plane axes have sizes
    ``lead`` (Z the last of them; the others index independent stacks), in z order."""
    *outer, n_z = lead
    return [[(*(int(i) for i in o), z) for z in range(n_z)] for o in np.ndindex(*outer)]


def extend_work(
    predictor,
    image,
    labels,
    lead: tuple[int, ...],
    *,
    rgb: bool,
    contrast_limits: tuple[float, float] | None,
    stop: threading.Event,
) -> Iterator[Step]:
    """The worker: sweep each z-stack of ``labels`` and yield after every plane.

    Parameters
    ----------
    predictor : napari_mobilesam.predictor.Predictor
        Shared with the prompt widget: held (:func:`predictor_lock`) for each prompt.
    image : array-like, (..., Z, H, W) or (..., Z, H, W, C) with ``rgb``
        The image layer's data.
    labels : array-like, (..., Z, H, W)
        The linked result; read here, never written (the GUI thread writes what is
        yielded).
    lead : tuple of int
        The sizes of the plane axes (the image's shape before (H, W)).
    rgb, contrast_limits
        How the planes are shown: their conversion to the model's input.
    stop : threading.Event
        Set by Cancel: the work ends after the plane being prompted.
    """
    stacks = z_stacks(lead)
    total = sum(2 * max(len(s) - 1, 0) for s in stacks)
    done = 0
    written: dict[tuple[int, ...], np.ndarray] = {}  # the planes that gained sections
    for stack in stacks:

        def read(z: int, stack=stack) -> np.ndarray:
            index = stack[z]
            return written[index].copy() if index in written else np.array(labels[index])

        def write(z: int, plane: np.ndarray, added: list, stack=stack) -> None:
            written[stack[z]] = plane.copy()

        def model_input(z: int, stack=stack) -> np.ndarray:
            plane = np.asarray(image[stack[z]])
            return to_rgb_uint8(plane, contrast_limits=None if rgb else contrast_limits,
                                channel_axis=-1 if rgb else None)  # fmt: skip

        predict = prompter(predictor, model_input)
        for z, new in sweep_stack(len(stack), read, write, predict, **THRESHOLDS):
            done += 1
            yield done, total, ((stack[z], written[stack[z]], new) if new else None)
            if stop.is_set():
                return


def prompter(predictor, model_input):
    """``predict(z, boxes)`` for :func:`~napari_mobilesam.linking.extend.sweep_stack`:
    plane ``model_input(z)`` embedded and prompted with the boxes, the predictor held
    meanwhile (a prompt of the user's may go between two planes)."""

    def predict(z: int, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        plane = model_input(z)  # (read before taking the predictor from the user)
        with predictor_lock(predictor):
            predictor.set_image(plane)
            return box_masks(predictor, boxes)

    return predict


def paint_added(current: np.ndarray, labels: np.ndarray, added: list) -> np.ndarray:
    """Plane ``current`` (the layer's, (H, W)) with the sections ``added`` to it, taken
    from ``labels`` (the worker's plane): only their pixels, and only where ``current`` is
    still 0, so what the user painted or erased on the plane meanwhile stays."""
    ids = np.array([i for _, i, _, _ in added], dtype=labels.dtype)
    fill = np.isin(labels, ids) & (current == 0)
    out = current.copy()
    out[fill] = labels[fill]
    return out
