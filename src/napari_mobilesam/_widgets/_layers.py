"""The layers of one image's prompt session: prompts, preview and labels, named after it.

Every image layer gets its own set (``<image> points``, ``<image> box``,
``<image> preview``, ``<image>_labels``), created once and then found again by name, so
that switching images never reuses or deletes another image's layers. A layer of the
right name but the wrong kind or shape is a :class:`LayerConflict` (a message for the
user), never a reason to remove it: the plugin never removes a Labels layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels, Points, Shapes
from napari.utils.colormaps import CyclicLabelColormap
from napari.utils.colormaps.standardize_color import transform_color

from ..interactive import Prediction, PromptSession
from ._chunked import add_labels
from ._common import add_quietly
from ._tiles import layer_transform

POSITIVE_COLOR = "lime"
NEGATIVE_COLOR = "red"
#: the preview's colours (object k of several boxes: colour k), none of them a committed
#: object's: a preview never looks like an object already in the labels
PREVIEW_COLORS = ("cyan", "magenta", "yellow", "#6699ff", "white")


class LayerConflict(ValueError):
    """A layer with the name the plugin needs exists but cannot be used."""


def image_shape(image: Image) -> tuple[int, ...]:
    """Shape of ``image`` without its RGB axis: (plane axes..., H, W)."""
    shape = image.data.shape
    return tuple(int(s) for s in (shape[:-1] if image.rgb else shape))


def labels_name(image_name: str) -> str:
    """The session labels layer of an image: ``<image>_labels``, the name napari's save
    dialog suggests as a file name and the one the plugin's reader opens again."""
    return f"{image_name}_labels"


def labels_layer(viewer, image: Image, create: bool = True) -> Labels | None:
    """The image's session Labels layer: found by name, else added (uint32 zeros of the
    image's shape, chunked on disk for a large stack: :func:`~._chunked.add_labels`)
    when ``create``.

    Raises
    ------
    LayerConflict
        When a layer of that name is not a Labels layer of the image's shape.
    """
    name, shape = labels_name(image.name), image_shape(image)
    if name in viewer.layers:
        layer = viewer.layers[name]
        if not isinstance(layer, Labels) or tuple(layer.data.shape) != shape:
            found = getattr(layer.data, "shape", "?")
            raise LayerConflict(
                f"the layer {name!r} ({type(layer).__name__}, shape {tuple(found)}) does not "
                f"fit image {image.name!r} (shape {shape}); rename or move that layer, "
                "then press Start again"
            )
        return layer
    if not create:
        return None
    return add_labels(viewer, shape, name=name, opacity=0.6, **layer_transform(image, image.ndim))


@dataclass(eq=False)
class ImageSession:
    """One image's prompt layers, labels, :class:`PromptSession` and prompt state.

    Attributes
    ----------
    image : napari.layers.Image
        The image layer segmented.
    points, box, preview, labels : napari layers
        Its prompt layers (image's dimensionality), the (H, W) preview and the labels
        (image's shape) that commits paint.
    session : PromptSession or None
        Set once the model is loaded for this image.
    ready : set of tuple of int
        Planes whose embedding has been computed.
    plane : tuple of int or None
        The plane the prompts and the preview refer to.
    prediction : Prediction or None
        The previewed prediction.
    predictions : list of Prediction or None
        The previewed objects of several boxes (:mod:`._multi`), instead of ``prediction``.
    choice : "best" or int
        The candidate shown for the current object (X cycles it; reset per object).
    store : Path or None
        The embedding store the session reads (or that is being checked), see
        :mod:`._store`.
    extent : (r0, c0, r1, c1) or None
        Where the previewed prediction's candidate masks have pixels (plane pixels).
    shown : (r0, c0, r1, c1) or None
        Where the preview layer may hold non-zero values (all of it at first: a reused
        layer may hold an old preview); :func:`~._tiles.update_preview` clears it.
    tiles_known : set of (plane, tile)
        Tiles of a tiled image known to be embedded (checked once each).
    committed : dict
        id -> (plane, region) of each object this dock committed on one plane only (an
        id propagated to other planes is dropped): the region an undo of it redraws.
    limits : tuple or None
        The image layer's contrast limits the session normalises with (the model sees
        what the user sees; other limits start the session again).
    """

    image: Image
    points: Points
    box: Shapes
    preview: Labels
    labels: Labels
    session: PromptSession | None = None
    ready: set = field(default_factory=set)
    plane: tuple[int, ...] | None = None
    prediction: Prediction | None = None
    predictions: list | None = None
    choice: int | str = "best"
    store: Path | None = None
    extent: tuple[int, int, int, int] | None = None
    shown: tuple[int, int, int, int] | None = None
    tiles_known: set = field(default_factory=set)
    committed: dict = field(default_factory=dict)
    limits: tuple | None = None

    def __post_init__(self) -> None:
        h, w = self.preview.data.shape[-2:]
        self.shown = (0, 0, int(h), int(w))

    def layers(self) -> tuple:
        """The prompt layers (where the shortcuts are bound)."""
        return (self.image, self.points, self.box)

    def intact(self, viewer) -> bool:
        """Whether all its layers are still in ``viewer`` (the user may remove some)."""
        layers = (self.image, self.points, self.box, self.preview, self.labels)
        return all(layer in viewer.layers for layer in layers)


def _find(viewer, name: str, kind: type, ndim: int, image: Image):
    if name not in viewer.layers:
        return None
    layer = viewer.layers[name]
    if not isinstance(layer, kind) or layer.ndim != ndim:
        raise LayerConflict(
            f"the layer {name!r} ({type(layer).__name__}, {layer.ndim}D) is not the "
            f"{kind.__name__} layer of image {image.name!r} ({ndim}D); rename or remove it, "
            "then press Start again"
        )
    return layer


def check_layers(viewer, image: Image) -> tuple:
    """The image's existing layers (points, box, preview, labels; None where missing).

    Raises
    ------
    LayerConflict
        When a layer of one of the names has another kind, dimensionality or shape.
    """
    shape = image_shape(image)
    ndim = image.ndim
    name = image.name
    points = _find(viewer, f"{name} points", Points, ndim, image)
    box = _find(viewer, f"{name} box", Shapes, ndim, image)
    preview = _find(viewer, f"{name} preview", Labels, 2, image)
    if preview is not None and tuple(preview.data.shape) != shape[-2:]:
        raise LayerConflict(
            f"the layer {name + ' preview'!r} has shape {preview.data.shape}, not the "
            f"planes' {shape[-2:]}; rename or remove it, then press Start again"
        )
    labels = labels_layer(viewer, image, create=False)
    return points, box, preview, labels


def ensure_layers(viewer, image: Image) -> ImageSession:
    """The image's layer set: existing layers of its names are reused, missing ones added.

    Everything is checked before anything is added, so a conflict changes no layer.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    image : napari.layers.Image

    Returns
    -------
    ImageSession
        Without a :class:`PromptSession` yet.

    Raises
    ------
    LayerConflict
        When a layer of one of the names has another kind, dimensionality or shape.
    """
    steps, finish = layer_steps(viewer, image)
    for step in steps:
        step()
    return finish()


def layer_steps(viewer, image: Image) -> tuple[list, object]:
    """What :func:`ensure_layers` does, one added layer per step: napari takes 0.1-0.3 s
    to add a layer on the GUI thread, so a caller can run the steps in separate turns of
    the event loop (the viewer stays responsive between them).

    Returns
    -------
    steps : list of callable()
        One per missing layer, each adding it (and checking the names again first);
        none adds anything once ``image`` is no longer in the viewer.
    finish : callable() -> ImageSession
        The session of the layers, once every step ran.

    Raises
    ------
    LayerConflict
        When a layer of one of the names does not fit (now, or in a step later on).
    """
    check_layers(viewer, image)
    shape, ndim, name = image_shape(image), image.ndim, image.name
    # sizes in image pixels: a point covers a small cell of a large image, and stays
    # visible when the whole image is in view (at least 8 screen pixels)
    side = min(shape[-2:])
    size = min(max(4, side // 60), 12)
    nd, flat = layer_transform(image, ndim), layer_transform(image, 2)
    makers = {
        0: lambda: viewer.add_points(
            ndim=ndim, name=f"{name} points", size=size, canvas_size_limits=(8, 10000),
            features={"positive": np.zeros(0, dtype=bool)},
            feature_defaults={"positive": True}, face_color="positive",
            face_color_cycle={True: POSITIVE_COLOR, False: NEGATIVE_COLOR}, **nd,
        ),
        1: lambda: viewer.add_shapes(
            ndim=ndim, name=f"{name} box", edge_color="yellow", face_color="transparent",
            edge_width=min(max(1, side // 300), 6), **nd,
        ),
        2: lambda: viewer.add_labels(
            np.zeros(shape[-2:], dtype=np.uint8), name=f"{name} preview", opacity=0.5,
            colormap=_preview_colormap(), **flat,
        ),
        3: lambda: labels_layer(viewer, image),
    }  # fmt: skip

    def step(k):
        def run():
            if image not in viewer.layers:
                return  # removed meanwhile: no layers for it
            if check_layers(viewer, image)[k] is None:
                add_quietly(viewer, makers[k])

        return run

    existing = check_layers(viewer, image)
    steps = [step(k) for k in range(4) if existing[k] is None]

    def finish() -> ImageSession:
        return ImageSession(image, *check_layers(viewer, image))

    return steps, finish


def _preview_colormap() -> CyclicLabelColormap:
    colors = np.concatenate([np.zeros((1, 4)), transform_color(list(PREVIEW_COLORS))])
    return CyclicLabelColormap(colors=colors, background_value=0)


def on_plane(coords: np.ndarray, plane: tuple[int, ...]) -> np.ndarray:
    """Rows of (N, ndim) layer coordinates that lie on ``plane`` (leading axes)."""
    if not plane:
        return np.ones(len(coords), dtype=bool)
    lead = np.round(coords[:, : len(plane)]).astype(int)
    return (lead == np.asarray(plane)).all(axis=1)


def plane_prompts(
    state: ImageSession,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The prompts of ``state``'s shown plane: points, their labels and the newest box.

    Returns
    -------
    points : (N, 2) float array or None
        (row, col) of the points on the plane; points on other planes are ignored.
    labels : (N,) int array or None
        1 for positive, 0 for negative points.
    box : (4,) float array or None
        (r0, c0, r1, c1) of the newest rectangle on the plane.
    """
    plane = state.plane
    if plane is None:
        return None, None, None
    points = labels = box = None
    data = np.asarray(state.points.data)
    if len(data):
        on = on_plane(data, plane)
        if on.any():
            points = data[on][:, -2:]
            labels = np.asarray(state.points.features["positive"])[on].astype(int)
    layer = state.box
    for shape, kind in zip(layer.data[::-1], layer.shape_type[::-1], strict=True):
        shape = np.asarray(shape)
        if kind == "rectangle" and on_plane(shape, plane).all():
            rc = shape[:, -2:]
            box = np.array([*rc.min(axis=0), *rc.max(axis=0)])
            break
    return points, labels, box
