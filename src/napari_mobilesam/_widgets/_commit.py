"""The prompt widget's commit, undo and clear (a mixin of
:class:`~._prompt.PromptWidget`): the previewed mask into the image's labels with a new
id, its undo, and removing the shown plane's prompts."""

from __future__ import annotations

import numpy as np
from napari.utils.notifications import show_info

from ..chunked_labels import label_plane
from . import _features
from ._chunked import unwritable, writable
from ._layers import on_plane
from ._tiles import refresh_region, step_region, undo_region

#: Without *overlap: overwrite*, the least fraction of a mask that must be unlabeled to be
#: committed: a mask mostly inside existing objects (the same cell clicked again) would add
#: only their fringes, as a fragmented object of its own (*Commit to labels*: the same rule).
MIN_FREE = 0.5


def overlap_message(exc: ValueError) -> str:
    """A commit's ValueError as the widget says it: the library's advice to pass
    ``overwrite=True`` becomes the widget's *overlap* option."""
    return str(exc).replace(
        "pass overwrite=True to paint over them",
        "choose 'overlap: overwrite' in the widget to paint over them",
    )


class CommitActions:
    """Commit, Undo and Clear of :class:`~._prompt.PromptWidget` (its ``state``,
    ``overlap``, ``negative_box``, ``status``, ``_commit_many`` and ``_show``)."""

    def commit(self) -> int | None:
        """Write the previewed mask into the image's labels with a new id.

        Where the mask covers existing objects, *overlap* decides: only unlabeled pixels
        change (default; a mask less than :data:`MIN_FREE` unlabeled is refused), or the
        mask overwrites them. Problems become a message.

        Returns
        -------
        int or None
            The new id, or None when nothing was committed.
        """
        state = self.state
        if state is None or state.session is None:
            show_info("MobileSAM: press Start first")
            return None
        if state.predictions and state.plane is not None and state.intact(self.viewer):
            return self._commit_many(state)  # several boxes: several objects
        if state.prediction is None or state.plane is None:
            show_info("MobileSAM: nothing to commit: click a point or draw a box first")
            return None
        if not state.intact(self.viewer):
            show_info(f"MobileSAM: a layer of {state.image.name!r} was removed; press Start again")
            return None
        mask = state.prediction.mask
        if not mask.any():
            show_info("MobileSAM: the mask is empty: move the point or draw a box")
            return None
        data = state.labels.data
        if not writable(data):  # numpy, or chunked labels on disk
            show_info(f"MobileSAM: {unwritable(state.labels.name)}")
            return None
        new_id = int(np.max(data)) + 1  # ids are unique over the whole layer, not per plane
        overwrite = self.overlap.currentIndex() == 1
        try:
            plane = label_plane(data, state.plane)
            state.session.commit(
                plane, mask, label_id=new_id, overwrite=overwrite, min_free=MIN_FREE
            )
        except ValueError as exc:
            if "already have a label" in str(exc):
                exc = ValueError(
                    "the mask lies inside existing objects only; choose 'overlap: overwrite' "
                    "in the widget to paint over them"
                )
            show_info(f"MobileSAM: {overlap_message(exc)}")
            return None
        except OSError as exc:  # labels on a full disk: put back, or left to Undo
            show_info(f"MobileSAM: {exc}")
            state.labels.refresh()
            return None
        scores = _features.prediction_scores(state.prediction)  # for the object table
        _features.record(state.labels, state.plane, [new_id], [scores[0]], [scores[1]])
        refresh_region(state.labels, state.plane, state.extent)  # only where the mask is
        state.committed[new_id] = (state.plane, state.extent)  # what its undo redraws
        self.clear()
        self.negative_box.setChecked(False)  # each object starts with positive points
        self.status.setText(f"committed object {new_id} to {state.labels.name}")
        return new_id

    def undo(self) -> None:
        """Revert the chosen image's last commit."""
        state = self.state
        if state is None or state.session is None:
            return
        step = state.session.next_undo()
        removed = state.session.undo()
        if removed is not None:
            undone = undo_region(state, removed)  # (plane, region) of a commit of this dock
            if undone is None:  # e.g. one plane of a propagated object: the step's own
                undone = step_region(state.labels.data, step)
            if undone is None:
                state.labels.refresh()
            else:
                refresh_region(state.labels, *undone)
            self.status.setText(f"removed object {', '.join(map(str, removed))}")

    def clear(self) -> None:
        """Remove the prompts of the shown plane and the preview."""
        state = self.state
        if state is None:
            return
        plane = state.plane or ()
        for layer in (state.points, state.box):
            if layer is state.points:
                data = np.asarray(layer.data)
                drop = np.flatnonzero(on_plane(data, plane)) if len(data) else []
            else:
                drop = [i for i, s in enumerate(layer.data) if on_plane(np.asarray(s), plane).all()]
            if len(drop):
                with layer.events.data.blocker():
                    layer.selected_data = set(int(i) for i in drop)
                    layer.remove_selected()
        state.choice = "best"
        self._show(state, None)
