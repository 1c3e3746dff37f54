"""The prompt widget's work on whole stacks: precompute every plane, propagate an object
or every object of the shown plane.

All are cancellable at plane granularity and keep what is done: precompute runs as one
background job per plane (or batch of planes on a GPU), which a click's jobs overtake;
propagation checks a flag before each plane and commits the planes found so far.
"""

from __future__ import annotations

import threading

import numpy as np
from napari.utils.notifications import show_info
from qtpy.QtCore import QObject, Signal

from ..chunked_labels import label_plane
from ..interactive.objects import record_scores
from . import _features
from ._chunked import unwritable, writable


class _Relay(QObject):
    """Carries a worker's progress to the GUI thread (a signal emitted in the worker is
    delivered in the thread the relay lives in)."""

    step = Signal(object)


def _objects(n: int) -> str:
    return f"{n} object" if n == 1 else f"{n} objects"


class StackActions:
    """Mixin of :class:`~._prompt.PromptWidget`: precompute, propagation and Cancel.

    Uses the widget's ``state``, ``runner``, ``progress``, ``status``, ``overlap``,
    ``cancel_button``, ``prop_*`` controls and :meth:`commit`.
    """

    #: [planes done, planes to do] of the precompute under way, or None
    _precompute: list[int] | None = None
    #: what it counts: planes, or tiles on a tiled image (:mod:`._tiles`)
    _precompute_unit = "planes"
    #: the stop flag of the propagation under way, or None
    _stop: threading.Event | None = None
    _cancel_note = ""
    #: the planes known embedded of the image being precomputed (ImageSession.ready)
    _precompute_ready: set | None = None

    def precompute(self) -> None:
        """Embed every plane in the background, one job per plane (per batch on a GPU),
        behind any click; the progress bar counts planes done of the total."""
        state = self.state
        if state is None or state.session is None:
            return
        session = state.session
        if session.tiles is not None:  # tiled planes: one job per plane, counting tiles
            self._precompute_tiles(state)
            return
        indices = [tuple(int(v) for v in i) for i in np.ndindex(*session.plane_shape)]
        todo = [i for i in indices if i not in state.ready]
        self._precompute = [len(indices) - len(todo), len(indices)]
        self._precompute_unit = "planes"
        self._precompute_ready = state.ready  # (also planes embedded meanwhile: clicks, Start)
        self._cancel_note = ""
        step = session.batch_size  # planes per encoder call (batched on a GPU)
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            at = len(indices) - len(todo) + start + len(chunk)
            self.runner.submit(
                lambda chunk=chunk: session.precompute(chunk),
                lambda _n, chunk=chunk: self._precomputed(state, chunk),
                f"precomputing embeddings: plane {at} of {len(indices)}…",
                background=True,
            )
        self._show_progress()
        self.cancel_button.setEnabled(self.runner.busy and self._cancellable())

    def _precomputed(self, state, chunk) -> None:
        state.ready.update(chunk)
        if self._precompute is not None:
            self._precompute[0] += len(chunk)
            self._show_progress()

    def _show_progress(self) -> None:
        """Determinate while precomputing (planes done of the total), else busy/idle."""
        if self._precompute is not None:
            done, total = self._precompute
            self.progress.setRange(0, total)
            self.progress.setValue(done)
            self.progress.setFormat(f"%v / %m {self._precompute_unit}")
        elif self.runner.busy:
            self.progress.setRange(0, 0)  # indeterminate
        else:
            self.progress.setRange(0, 1)
            self.progress.setValue(1)
            self.progress.setFormat("%p%")

    def cancel(self) -> None:
        """Stop precompute and propagation after the plane that runs now; the planes
        done stay (embeddings in the cache, propagated planes committed)."""
        dropped = self.runner.cancel_background()
        if self._stop is not None:
            self._stop.set()
        tiles = getattr(self, "_tile_stop", None)
        if tiles is not None:
            tiles.set()  # the running job stops after its tile
        if self._precompute is not None:
            total, unit = self._precompute[1], self._precompute_unit
            self._cancel_note = f"precompute cancelled: {{}} of {total} {unit} embedded (kept)"
        self.cancel_button.setEnabled(False)
        if (dropped or self._stop is not None or tiles) and self.runner.worker is not None:
            self.status.setText("cancelling: finishing the plane that runs now…")

    def _busy(self, busy: bool, _message: str) -> None:
        if not busy:
            if self._cancel_note and self._precompute is not None:
                done = self._precompute[0]
                if self._precompute_unit == "planes" and self._precompute_ready is not None:
                    done = max(done, len(self._precompute_ready))
                self.status.setText(self._cancel_note.format(done))
            elif self._precompute is not None and self.status.text() == "":
                unit = self._precompute_unit
                self.status.setText(f"all {self._precompute[1]} {unit} embedded")
            self._precompute, self._cancel_note = None, ""
            self._tile_stop, self._precompute_ready = None, None
        self.cancel_button.setEnabled(busy and self._cancellable())
        self._show_progress()

    def _cancellable(self) -> bool:
        """Whether a precompute or a propagation runs that Cancel has not stopped yet."""
        precomputing = self._precompute is not None and not self._cancel_note
        return precomputing or (self._stop is not None and not self._stop.is_set())

    def _walk_settings(self) -> tuple[int, int, float, bool]:
        """(axis, direction, min_score, overwrite) of the propagate group and overlap option."""
        direction = {0: 0, 1: 1, 2: -1}[self.prop_direction.currentIndex()]
        overwrite = self.overlap.currentIndex() == 1
        return self.prop_axis.currentIndex(), direction, self.prop_min_score.value(), overwrite

    def propagate(self) -> None:
        """Commit the shown mask, then segment the same object in neighbouring planes
        (Cancel stops after the plane that runs now and commits the planes found)."""
        state = self.state
        if state is None or state.session is None or state.prediction is None:
            show_info("MobileSAM: segment an object on this plane first")
            return
        start = state.plane
        mask = state.prediction.mask.copy()
        new_id = self.commit()
        if new_id is None:
            return
        state.committed.pop(new_id, None)  # its id goes onto other planes: undo redraws all
        axis, direction, min_score, overwrite = self._walk_settings()
        session, target = state.session, state.labels
        stop = self._stop = threading.Event()
        scores: dict[tuple[int, ...], float] = {}  # plane -> predicted IoU (object table)
        stability: dict[tuple[int, ...], float] = {}  # plane -> stability score

        def run():
            return session.propagate(
                start, mask, axis, direction=direction, min_score=min_score,
                progress=scores.__setitem__, should_stop=stop.is_set, stability=stability,
            )  # fmt: skip

        def done(masks) -> None:
            painted = skipped = 0
            failed = None
            for index, m in masks.items():
                try:
                    plane = label_plane(target.data, index)
                    session.commit(plane, m, label_id=new_id, overwrite=overwrite)
                except ValueError:
                    skipped += 1  # inside other objects only, with overlap: only unlabeled
                except OSError as exc:  # labels on a full disk: the planes left are not
                    failed = exc
                    break
                else:  # its scores for the object table
                    painted += 1
                    _features.record(target, index, [new_id], [scores[index]], [stability[index]])
                state.ready.add(index)
            target.refresh()
            if failed is not None:
                show_info(f"MobileSAM: {failed}")
            note = f" ({skipped} inside other objects, skipped)" if skipped else ""
            note += f" ({len(masks) - painted - skipped} not written: {failed})" if failed else ""
            how = "propagation cancelled: " if stop.is_set() else ""
            planes = "plane" if painted == 1 else "planes"
            self.status.setText(f"{how}object {new_id} propagated to {painted} more {planes}{note}")

        def finished(*_args) -> None:
            if self._stop is stop:
                self._stop = None

        self.runner.submit(run, lambda masks: (finished(), done(masks)),
                           "propagating… (Cancel keeps the planes done)",
                           failed=finished)  # fmt: skip
        self.cancel_button.setEnabled(True)

    def propagate_all(self) -> None:
        """Follow every committed object of the shown plane through the neighbouring
        planes at once (one decoder call per plane), each with its own id and stopping on
        its own; the status counts the objects still going. Cancel stops after the plane
        that runs now and commits the planes found."""
        state = self.state
        if state is None or state.session is None or state.plane is None:
            show_info("MobileSAM: press Start first")
            return
        if self._stop is not None:
            show_info("MobileSAM: a propagation runs: wait for it, or Cancel it")
            return
        data = state.labels.data
        if not writable(data):  # numpy, or chunked labels on disk
            show_info(f"MobileSAM: {unwritable(state.labels.name)}")
            return
        start, plane = state.plane, np.array(data[state.plane])  # a copy for the worker
        n = len(np.unique(plane[plane > 0]))
        if n == 0:
            show_info("MobileSAM: no committed objects on this plane: commit some first")
            return
        axis, direction, min_score, overwrite = self._walk_settings()
        session, target = state.session, state.labels
        stop = self._stop = threading.Event()
        relay = _Relay(self)

        def shown(step) -> None:
            idx, going = step
            if self._stop is stop and not stop.is_set():
                way = "forward" if idx[axis] > start[axis] else "backward"
                self.status.setText(
                    f"propagating {_objects(n)} {way}: plane {idx[axis]} ({going} still going)"
                )

        relay.step.connect(shown)

        def run():
            return session.propagate_all(
                start, plane, axis, direction=direction, min_score=min_score,
                progress=lambda idx, scores: relay.step.emit((idx, len(scores))),
                should_stop=stop.is_set,
            )  # fmt: skip

        def finished(*_args) -> None:
            if self._stop is stop:
                self._stop = None
            relay.deleteLater()

        def done(result) -> None:
            finished()
            self._commit_all(state, target, result, overwrite, cancelled=stop.is_set())

        self.runner.submit(run, done, f"propagating {_objects(n)}… (Cancel keeps the planes done)",
                           failed=finished)  # fmt: skip
        self.cancel_button.setEnabled(True)

    def _commit_all(self, state, target, result, overwrite: bool, *, cancelled: bool) -> None:
        """Commit :meth:`propagate_all`'s planes with the objects' own ids, their predicted
        IoU into the labels' features (the object table), and say per object how far it
        went."""
        try:
            painted = state.session.commit_propagated(target.data, result, overwrite=overwrite)
        except (ValueError, OSError) as exc:  # labels replaced meanwhile, or a full disk
            target.refresh()
            show_info(f"MobileSAM: {exc}")
            self.status.setText(f"propagation not committed: {exc}")
            return
        features = target.features
        for index, ids in painted.items():
            for i in ids:  # these ids are on other planes now: undo redraws everything
                state.committed.pop(i, None)
            iou = [result.scores[i][index] for i in ids]
            stab = [result.stability[i][index] for i in ids]
            features = record_scores(features, ids, iou, stab, plane=index)
        if painted:
            target.features = features
        state.ready.update(painted)
        target.refresh()
        found = sum(len(planes) for planes in result.masks.values())
        skipped = found - sum(len(ids) for ids in painted.values())
        per = [f"{i}: {len(planes)}" for i, planes in result.masks.items()]
        more = ", …" if len(per) > 12 else ""
        note = f"; {skipped} inside other objects, skipped" if skipped else ""
        how = "propagation cancelled: " if cancelled else ""
        self.status.setText(
            f"{how}{_objects(len(result.masks))} propagated to {found - skipped} more object "
            f"planes (planes per object: {', '.join(per[:12])}{more}{note})"
        )
