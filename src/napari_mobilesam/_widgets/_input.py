"""The prompt widget's input: shortcuts on its layers, the sign of clicked points, X.

Mixin of :class:`~._prompt.PromptWidget`.
"""

from __future__ import annotations

import dataclasses

from napari.utils.notifications import show_info

from ._common import guarded
from ._layers import ImageSession


class PromptInput:
    """Mixin of :class:`~._prompt.PromptWidget`: key bindings, point sign, candidates.

    Uses the widget's ``state``, ``negative``, ``negative_box``, :meth:`commit`,
    :meth:`undo`, :meth:`clear`, :meth:`prompts`, :meth:`_show` and
    :meth:`_prompts_changed`.
    """

    def _connect(self, state: ImageSession) -> None:
        for layer in (state.points, state.box):
            layer.events.data.connect(lambda e=None, s=state: self._prompts_changed(s, e))
        state.points.mouse_drag_callbacks.insert(0, self._click)
        contrast = state.image.events.contrast_limits
        contrast.connect(lambda e=None, s=state: self._contrast_changed(s))
        state.points.mode = "add"
        for layer in state.layers():
            for key, func in (
                ("c", self.commit), ("x", self.next_mask), ("n", self.toggle_negative),
                ("Shift-z", self.undo), ("Escape", self.clear),
            ):  # fmt: skip
                handler = guarded(func)
                layer.bind_key(key, lambda _layer, f=handler: f(), overwrite=True)

    def _click(self, layer, event) -> None:
        """Before napari adds the clicked point: right-click or Shift-click is negative."""
        if layer.mode != "add":
            return
        button = getattr(event, "button", 1)
        gesture = button == 2 or "Shift" in tuple(getattr(event, "modifiers", ()) or ())
        defaults = layer.feature_defaults
        defaults["positive"] = not (self.negative or gesture)
        layer.feature_defaults = defaults

    def next_mask(self) -> None:
        """Show the next candidate mask of the current object (a single point's three),
        starting after the best-scored one and stepping over empty ones; later objects
        start with the best again."""
        state = self.state
        prediction = state.prediction if state is not None else None
        if prediction is None:
            show_info("MobileSAM: X shows the next candidate mask: click a point first")
            return
        if len(prediction.scores) < 2:
            points, _, box = self.prompts()
            why = (
                "a box" if box is not None
                else f"{len(points)} points" if points is not None and len(points) > 1
                else "'masks: single'"
            )  # fmt: skip
            show_info(
                f"MobileSAM: X does nothing with {why}: SAM gives one mask for it; "
                "candidates exist for a single point with 'masks: best of 3'"
            )
            return
        k = len(prediction.scores)
        # an empty candidate shows nothing and commits nothing: step over it (a candidate
        # is upsampled only when reached, as before)
        later = ((prediction.choice + step) % k for step in range(1, k))
        choice = next((c for c in later if prediction.masks[c].any()), None)
        if choice is None:
            show_info(
                "MobileSAM: the other candidate masks of this click are empty; the one shown stays"
            )
            return
        state.choice = choice
        self._show(state, dataclasses.replace(prediction, choice=choice))

    def toggle_negative(self) -> None:
        """Switch the next points between positive and negative."""
        self.negative_box.setChecked(not self.negative_box.isChecked())

    def _set_negative(self, negative: bool) -> None:
        self.negative = negative
        if self.state is not None:
            layer = self.state.points
            layer.feature_defaults["positive"] = not negative
            layer.feature_defaults = layer.feature_defaults
