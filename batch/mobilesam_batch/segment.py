"""One plane in, one label image out: the work every process (or dask worker) repeats.

:class:`ModelSpec` and :class:`SegmentOptions` are small frozen, picklable records of
what to compute; :func:`get_segmenter` turns them into a :class:`PlaneSegmenter`,
cached per process, so a dask worker loads the model once however many planes it
segments. :func:`segment_plane` is the task function the runner maps over planes.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .flags import generator_defaults
from .inputs import open_source

_HOST = socket.gethostname()


@dataclass(frozen=True)
class ModelSpec:
    """Which model to run and where.

    Parameters
    ----------
    name : str
        Registry name of the architecture (``vit_t``, ``vit_b``, ...).
    weights : str
        Path of the checkpoint file, already resolved (downloaded) by the caller:
        workers never download.
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
    backend : str
        ``"torch"``, ``"onnx"`` (onnxruntime; the models are exported into the
        cache on first use) or ``"auto"`` (the fastest: torch; see
        :class:`~napari_mobilesam.predictor.Predictor`).
    threads : int or None
        torch intra-op threads for this process, exactly (the adaptive thread policy
        off); None: torch's default, adapted to other processes' load.
    precision : str
        Image encoder precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` (torch backend) or
        ``"auto"`` (resolved where the planes run: bf16 on GPUs and CPUs with bf16 units).
    """

    name: str
    weights: str
    device: str = "auto"
    backend: str = "torch"
    threads: int | None = None
    precision: str = "fp32"

    def load(self):
        """Build the model, load the weights and move it to the device."""
        import torch

        from napari_mobilesam.build import load_model

        if self.backend not in ("torch", "onnx", "auto"):
            raise ValueError(f"backend must be 'torch', 'onnx' or 'auto', got {self.backend!r}")
        if self.threads is not None:  # exactly N: the adaptive thread policy off
            from napari_mobilesam.engine.threads import ADAPTIVE

            ADAPTIVE.enabled = False
            torch.set_num_threads(self.threads)
        return load_model(self.name, self.weights, device=self.device, progress=False)


@dataclass(frozen=True)
class SegmentOptions:
    """How each plane is segmented.

    Parameters
    ----------
    generator : tuple of (name, value)
        MaskGenerator keyword arguments that differ from the library defaults
        (a sorted tuple, so the record is hashable).
    channels : tuple of int or None
        Up to three source channels shown as R, G, B.
    contrast_limits : (float, float) or None
        Fixed intensity range for every picked channel; None: per-plane percentiles.
    percentiles : (float, float)
        Percentiles used as contrast limits when ``contrast_limits`` is None.
    max_upscale : float or None
        Enlarge a small plane at most this many times for the model's input
        (:class:`~napari_mobilesam.predictor.Predictor`); None: to the input size.
    """

    generator: tuple[tuple[str, Any], ...] = ()
    channels: tuple[int, ...] | None = None
    contrast_limits: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    max_upscale: float | None = None

    def generator_kwargs(self) -> dict[str, Any]:
        return dict(self.generator)

    def resolved(self) -> dict[str, Any]:
        """Every parameter with its effective value (defaults filled in), JSON-able."""
        params = generator_defaults()
        params.update(self.generator_kwargs())
        out = {k: _jsonable(v) for k, v in params.items()}
        out.update(
            channels=None if self.channels is None else list(self.channels),
            contrast_limits=None if self.contrast_limits is None else list(self.contrast_limits),
            percentiles=list(self.percentiles),
        )
        if self.max_upscale is not None:  # (absent when unset: keys of earlier runs match)
            out["max_upscale"] = self.max_upscale
        return out


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class PlaneResult:
    """The outcome of one plane.

    Attributes
    ----------
    index : tuple of int
        Position of the plane in the input's plane axes (``()`` for a 2D image).
    labels : (H, W) uint32
        0 background, ids 1..N by decreasing predicted IoU.
    predicted_iou, stability_score : (N,) float64
        Scores of label ``k + 1`` at row ``k``.
    seconds : float
        Wall time of reading, converting and segmenting the plane.
    extra : dict
        Where and how it ran (:meth:`PlaneSegmenter.where`): ``host``, ``device``
        (e.g. ``"cpu"``), ``backend``, ``threads``, ``precision``.
    """

    index: tuple[int, ...]
    labels: np.ndarray
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def n_objects(self) -> int:
        return len(self.predicted_iou)


class PlaneSegmenter:
    """A loaded model and a configured MaskGenerator, ready for planes.

    Parameters
    ----------
    model : ModelSpec
    options : SegmentOptions
    """

    def __init__(self, model: ModelSpec, options: SegmentOptions) -> None:
        from napari_mobilesam.everything import MaskGenerator
        from napari_mobilesam.predictor import Predictor

        self.model_spec = model
        self.options = options
        self.sam = model.load()
        predictor = Predictor(
            self.sam, backend=model.backend, threads=model.threads, precision=model.precision,
            max_upscale=options.max_upscale,
        )  # fmt: skip
        self.generator = MaskGenerator(predictor, **options.generator_kwargs())

    def where(self) -> dict[str, Any]:
        """What runs the planes here, as chosen (``--backend auto``, default threads):
        ``host``, ``device``, ``backend`` (e.g. ``"onnx encoder + torch decoder"``),
        ``threads`` (torch intra-op threads of this process), ``precision``, and the
        segment-everything ``mode`` and ``nms`` (``"auto"`` resolved)."""
        import torch

        return {
            "host": _HOST,
            "device": str(self.sam.device),
            "backend": self.generator.predictor.backend_name,
            "threads": torch.get_num_threads(),
            "precision": self.generator.predictor.precision,
            "mode": self.generator.mode,
            "nms": self.generator.nms,
        }

    def describe(self) -> str:
        """One line for the log, e.g. ``vit_t on cpu: torch, 2 threads, fp32; fast mode,
        prompt batches on 2 worker threads`` (:meth:`MaskGenerator.describe`)."""
        return f"{self.model_spec.name} on {self.generator.describe()}"

    def input_size(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(h, w) in the model's input of a plane of ``shape`` ((H, W) or (H, W, C)):
        its longer side the input size, or less with ``--max-upscale``."""
        return self.generator.predictor.engine.frames.input_size((int(shape[0]), int(shape[1])))

    def rgb(self, plane: np.ndarray) -> np.ndarray:
        """A plane as the model sees it: (H, W) or (H, W, C) in, (H, W, 3) uint8 out,
        with the run's channels and contrast (``--channels``, ``--contrast-limits``)."""
        from napari_mobilesam.normalize import to_rgb_uint8

        opts = self.options
        return to_rgb_uint8(
            plane,
            contrast_limits=opts.contrast_limits,
            percentiles=opts.percentiles,
            channels=opts.channels,
            channel_axis=-1 if plane.ndim == 3 else None,
        )

    def segment(
        self, plane: np.ndarray, index: tuple[int, ...] = (), embeddings: str | None = None
    ) -> PlaneResult:
        """Segment everything in one plane.

        Parameters
        ----------
        plane : np.ndarray
            (H, W) or (H, W, C) channels-last, any numeric dtype.
        index : tuple of int
            Recorded in the result.
        embeddings : str, optional
            An embedding store checked against this input
            (:func:`~.embeddings.check_embeddings`): the plane's whole-image embedding
            is read from it when it holds this plane (``extra["embedding"]`` is then
            ``"store"``, else ``"computed"``).

        Returns
        -------
        PlaneResult
        """
        from .embeddings import plane_embedding

        start = time.perf_counter()
        rgb = self.rgb(plane)
        known = None
        if embeddings is not None:
            known = plane_embedding(embeddings, tuple(index), plane, self.input_size(plane.shape))
        labels, info = self.generator.generate_labels(rgb, return_info=True, embedding=known)
        return PlaneResult(
            index=tuple(index),
            labels=labels,
            predicted_iou=info["predicted_iou"],
            stability_score=info["stability_score"],
            seconds=time.perf_counter() - start,
            extra={**self.where(), "embedding": "computed" if known is None else "store"},
        )


_SEGMENTERS: dict[tuple[ModelSpec, SegmentOptions], PlaneSegmenter] = {}


def get_segmenter(model: ModelSpec, options: SegmentOptions) -> PlaneSegmenter:
    """The process's segmenter for ``(model, options)``, loading the model on first use."""
    key = (model, options)
    seg = _SEGMENTERS.get(key)
    if seg is None:
        _SEGMENTERS.clear()  # one model per process: a new configuration replaces the old
        seg = _SEGMENTERS[key] = PlaneSegmenter(model, options)
    return seg


def segment_plane(
    path: str,
    axes: str | None,
    index: tuple[int, ...],
    model: ModelSpec,
    options: SegmentOptions,
    embeddings: str | None = None,
) -> PlaneResult:
    """Read one plane of an input and segment it (the task mapped over planes).

    Parameters
    ----------
    path : str
        The input file or zarr directory (must be readable where this runs).
    axes : str or None
        The user's axes override, as given to :func:`~mobilesam_batch.inputs.open_source`.
    index : tuple of int
        Plane position in the input's plane axes.
    model, options
        What to run; the loaded model is cached per process.
    embeddings : str, optional
        An embedding store to read the plane's embedding from (readable where this
        runs), see :meth:`PlaneSegmenter.segment`.

    Returns
    -------
    PlaneResult
        ``seconds`` includes reading the plane.
    """
    start = time.perf_counter()
    seg = get_segmenter(model, options)
    plane = _cached_source(path, axes).read_plane(tuple(index))
    result = seg.segment(plane, index, embeddings)
    result.seconds = time.perf_counter() - start
    return result


_SOURCE: dict[tuple, Any] = {}


def _cached_source(path: str, axes: str | None):
    """The open input for ``path``, kept open between the planes of one file."""
    import os

    st = os.stat(path)
    key = (path, axes, st.st_mtime_ns, st.st_size)
    src = _SOURCE.get(key)
    if src is None:
        for old in _SOURCE.values():
            old.close()
        _SOURCE.clear()
        src = _SOURCE[key] = open_source(path, axes)
    return src
