"""``--link-extend``: linked 3D objects prompted into the planes where they were missed.

After linking (:mod:`.link`), each 3D object is prompted, with the box of its section,
into the planes next to it where it has none, one z-stack at a time
(:func:`napari_mobilesam.linking.extend.extend_stack`: a forward and a backward sweep,
two planes held at once). A kept section becomes a new object of its plane's saved
planes: its next per-plane id, its predicted IoU, no stability score (the prompt has
none), and the linked id it extends in the plane's ``lut``. The planes that gain
sections are saved again in the input's staging folder, never over the saved planes
of the segmentation (a run killed meanwhile extends them again from the same start),
and every output is then written from them as without the flag.

The model runs in the process that writes the outputs (the planes are read again from
the input and embedded once per sweep that prompts them, or their embeddings read from
the run's ``--embeddings`` store when it holds them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .inputs import InputError, open_source
from .link import EXTEND_THRESHOLDS, Linked, LinkLayout
from .outputs import atomic_path
from .planes import load_plane, plane_name
from .segment import get_segmenter

if TYPE_CHECKING:
    from .jobs import Job
    from .runner import RunConfig

__all__ = ["Extended", "extend_linked"]


@dataclass
class Extended:
    """What :func:`extend_linked` added to one input.

    Attributes
    ----------
    folder : Path
        Where the planes that gained sections are saved (``plane_*.npz``).
    sections : int
        Sections added.
    objects : int
        Linked objects that gained at least one section.
    planes_prompted : int
        Prompts of a plane (each one decoder call with all the boxes for that plane).
    embedded : int
        Encoder runs (at most two per plane).
    from_store : int
        Plane embeddings read from the run's ``--embeddings`` store instead.
    seconds : float
    """

    folder: Path
    sections: int = 0
    objects: int = 0
    planes_prompted: int = 0
    embedded: int = 0
    from_store: int = 0
    seconds: float = 0.0

    def load(self, job: Job, index: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Plane ``index`` as saved, with the sections added to it (``labels``,
        ``predicted_iou``, ``stability_score``; NaN stability for added sections)."""
        saved = (self.folder / plane_name(index)).exists()
        return load_plane(job, index, self.folder if saved else None)

    def record(self) -> dict:
        """For the provenance record (``linked.extended``)."""
        return {"sections_added": self.sections, "objects_extended": self.objects,
                "planes_prompted": self.planes_prompted, "encoder_runs": self.embedded,
                "embeddings_from_store": self.from_store,
                "seconds": round(self.seconds, 3)}  # fmt: skip


def extend_linked(
    job: Job,
    config: RunConfig,
    layout: LinkLayout,
    linked: Linked,
    folder: Path,
    log: Callable[[str], None] | None = None,
) -> Extended:
    """Extend the linked 3D objects of a finished input into the planes next to them.

    ``linked.luts`` gain the added sections' per-plane ids, in place; the planes that
    gained sections are saved in ``folder`` (read them with :meth:`Extended.load`).

    Parameters
    ----------
    job : Job
        An input whose planes are all saved.
    config : RunConfig
        The run's model, segmentation options (channels, contrast) and ``link``
        (axis ``z`` or ``zt``).
    layout : LinkLayout
    linked : Linked
        From :func:`~.link.link_planes`, with ``min_planes`` applied.
    folder : Path
        An empty folder for the extended planes (the input's staging folder).
    log : callable, optional
        Told when the extension starts and at each further tenth of its plane steps
        (a long stack runs the model again on up to twice its planes).

    Returns
    -------
    Extended
    """
    from napari_mobilesam.linking.extend import extend_stack
    from napari_mobilesam.predictor import Predictor

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    out = Extended(folder)
    seg = get_segmenter(config.model, config.options)
    # a predictor of its own (the generator's may be segmenting the next input meanwhile)
    # on the generator's engine, which serves any number of threads
    predictor = Predictor(seg.generator.predictor.engine)
    extended: set[int] = set()
    stacks = _z_stacks(layout, config.link.axis)
    steps = _Steps(job, sum(2 * max(len(s) - 1, 0) for s in stacks), log)
    try:
        source = open_source(job.path, config.axes)
    except (InputError, OSError) as exc:
        raise ValueError(_unreadable(job, exc)) from None
    with source as src:
        for stack in stacks:

            def read(z: int, stack=stack) -> np.ndarray:
                index = stack[z]
                return linked.luts[index][out.load(job, index)["labels"]]

            def write(z: int, labels: np.ndarray, added: list, stack=stack) -> None:
                _save(out, job, linked, stack[z], labels, added)

            def plane(z: int, stack=stack, src=src) -> tuple[tuple[int, ...], np.ndarray]:
                try:
                    return stack[z], src.read_plane(stack[z])
                except (InputError, OSError) as exc:
                    raise ValueError(_unreadable(job, exc)) from None

            prompter = _prompter(predictor, plane, seg, config.embeddings, out)
            added, prompted = extend_stack(len(stack), read, write, prompter,
                                           progress=steps, **EXTEND_THRESHOLDS)  # fmt: skip
            out.sections += len(added)
            out.planes_prompted += prompted
            extended.update(obj for _, obj, _, _ in added)
    out.objects = len(extended)
    out.seconds = time.perf_counter() - start
    return out


def _unreadable(job: Job, exc: BaseException) -> str:
    """Why the input could not be read again (it changed or went since it was segmented):
    the input fails, never the run (an OSError here is not the output folder's)."""
    reason = exc.reason if isinstance(exc, InputError) else str(exc)
    return f"--link-extend: cannot read the input again: {reason}"


def _prompter(
    predictor,
    plane: Callable[[int], tuple[tuple[int, ...], np.ndarray]],
    seg,
    store: str | None,
    out: Extended,
) -> Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``predict(z, boxes)`` for :func:`extend_stack`: plane z (``plane(z)``: its index
    and raw pixels) embedded as the run's segmenter ``seg`` shows it to the model, or its
    embedding read from the run's ``--embeddings`` store when the store holds these
    pixels, then prompted with the boxes (counted in ``out``)."""
    from napari_mobilesam.linking.extend import box_masks

    from .embeddings import plane_embedding

    def predict(z: int, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index, raw = plane(z)
        known = None
        if store is not None:
            known = plane_embedding(store, index, raw, seg.input_size(raw.shape))
        if known is None:
            predictor.set_image(seg.rgb(raw))
            out.embedded += 1
        else:
            predictor.set_embedding(known)
            out.from_store += 1
        return box_masks(predictor, boxes)

    return predict


class _Steps:
    """``progress(1)`` of :func:`extend_stack`: a log line at the start, then at each
    further tenth of the steps, at most one per ``interval`` seconds (short stacks stay
    quiet; a long one reports as the plane bar would)."""

    def __init__(
        self,
        job: Job,
        total: int,
        log: Callable[[str], None] | None,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job, self.total, self.log, self.interval, self.clock = job, total, log, interval, clock
        self.done, self.shown, self.last = 0, 0, clock()
        if log is not None and total:
            log(f"extend {job.path}: prompting the linked 3D objects into the planes where "
                f"they were missed ({total} plane steps)")  # fmt: skip

    def __call__(self, n: int) -> None:
        self.done += n
        tenth = 10 * self.done // max(self.total, 1)
        if self.log is None or tenth <= self.shown or self.done >= self.total:
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self.shown, self.last = tenth, now
            self.log(f"extend {self.job.path}: {10 * tenth}% ({self.done} of {self.total})")


def _z_stacks(layout: LinkLayout, axis: str) -> list[list[tuple[int, ...]]]:
    """The plane indices of each z-stack, in z order (``zt``: one per time point)."""
    stacks = []
    for _, order in layout.stacks():
        n_z = layout.plane_shape[layout.linked[-1]]  # Z is the inner linked axis
        if axis == "z":
            stacks.append(order)
        else:  # T outer, Z inner
            stacks.extend(order[i : i + n_z] for i in range(0, len(order), n_z))
    return stacks


def _save(
    out: Extended,
    job: Job,
    linked: Linked,
    index: tuple[int, ...],
    labels: np.ndarray,
    added: list[tuple[int, int, int, float]],
) -> None:
    """Save plane ``index`` with the sections ``added`` to it (``labels``: its linked
    labels with them painted) as new per-plane objects, and extend its ``lut``."""
    plane = out.load(job, index)
    lut = linked.luts[index]
    per = plane["labels"]
    painted = labels != lut[per]  # only pixels that were background (or a dropped object)
    n = len(plane["predicted_iou"])
    ids = [obj for _, obj, _, _ in added]
    new_ids = np.arange(n + 1, n + 1 + len(ids))
    dtype = np.promote_types(per.dtype, np.min_scalar_type(int(new_ids[-1])))
    per = per.astype(dtype, copy=True)
    for obj, new in zip(ids, new_ids, strict=True):
        per[painted & (labels == obj)] = new
    linked.luts[index] = np.concatenate([lut, np.asarray(ids, dtype=lut.dtype)])
    scores = np.asarray([score for *_, score in added], dtype=np.float64)
    with atomic_path(out.folder / plane_name(index)) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            labels=per,
            predicted_iou=np.concatenate([np.asarray(plane["predicted_iou"], np.float64), scores]),
            stability_score=np.concatenate(
                [np.asarray(plane["stability_score"], np.float64), np.full(len(ids), np.nan)]
            ),
        )
