"""The prompt widget's work on whole stacks: precompute every plane, propagate an object."""

from __future__ import annotations

import numpy as np
from napari.utils.notifications import show_info


class StackActions:
    """Mixin of :class:`~._prompt.PromptWidget`: precompute and propagation.

    Uses the widget's ``state``, ``runner``, ``progress``, ``status``, ``overlap``,
    ``prop_*`` controls and :meth:`commit`.
    """

    def precompute(self) -> None:
        """Embed every plane in the background (shown in the progress bar)."""
        state = self.state
        if state is None or state.session is None:
            return
        session = state.session

        def run():
            indices = [tuple(int(v) for v in i) for i in np.ndindex(*session.plane_shape)]
            step = session.batch_size  # planes per encoder call (batched on a GPU)
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                session.precompute(chunk)
                state.ready.update(chunk)
                yield start + len(chunk), len(indices)

        self.runner.submit(run, None, "precomputing embeddings…", yielded=self._progressed)

    def _progressed(self, value) -> None:
        done, total = value
        self.progress.setRange(0, total)
        self.progress.setValue(done)

    def propagate(self) -> None:
        """Commit the shown mask, then segment the same object in neighbouring planes."""
        state = self.state
        if state is None or state.session is None or state.prediction is None:
            show_info("MobileSAM: segment an object on this plane first")
            return
        start = state.plane
        mask = state.prediction.mask.copy()
        new_id = self.commit()
        if new_id is None:
            return
        axis = self.prop_axis.currentIndex()
        direction = {0: 0, 1: 1, 2: -1}[self.prop_direction.currentIndex()]
        min_score = self.prop_min_score.value()
        overwrite = self.overlap.currentIndex() == 1
        session, target = state.session, state.labels

        def run():
            return session.propagate(start, mask, axis, direction=direction, min_score=min_score)

        def done(masks) -> None:
            skipped = 0
            for index, m in masks.items():
                try:
                    session.commit(target.data[index], m, label_id=new_id, overwrite=overwrite)
                except ValueError:
                    skipped += 1  # inside other objects only, with overlap: only unlabeled
                state.ready.add(index)
            target.refresh()
            note = f" ({skipped} inside other objects, skipped)" if skipped else ""
            self.status.setText(
                f"object {new_id} propagated to {len(masks) - skipped} more plane(s){note}"
            )

        self.runner.submit(run, done, "propagating…")
