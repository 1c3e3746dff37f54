"""MobileSAM: segment with prompts (points and boxes) on 2D images and stacks.

The widget translates napari layers into :class:`~napari_mobilesam.interactive.PromptSession`
calls and back; the embedding, predictions and propagation run in thread workers. Every
image layer has its own session (:class:`~._layers.ImageSession`): its prompt layers, its
labels and its undo steps, kept while the widget switches between images.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Image
from napari.utils.notifications import show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QWidget,
)

from ..interactive import EmbeddingCache, Prediction, PromptSession
from ._commit import CommitActions
from ._common import (
    LayerCombo,
    Runner,
    current_plane,
    embedding_cache_dir,
    guarded,
    in_turns,
    outside_message,
    prepare_process,
)
from ._input import PromptInput
from ._layers import (
    ImageSession,
    LayerConflict,
    check_layers,
    layer_steps,
    plane_prompts,
)
from ._model import ModelPicker
from ._multi import MultiObjects, plane_objects
from ._reader_preference import prefer_plugin_reader
from ._scroll import scrolled
from ._stacks import StackActions
from ._store import StoreActions
from ._tiles import (
    TileActions,
    embedding_message,
    image_data,
    mask_extent,
    missing_tiles,
    prompt_tiles,
    tiles_note,
    update_preview,
)

SHORTCUTS = (
    "click: a positive point (green); right-click or Shift-click: a negative point (red) · "
    "N: next points negative/positive · draw a rectangle in the box layer · C: commit · "
    "X: next candidate mask · Shift-Z: undo · Escape: clear prompts"
)


#: How long the contrast limits must stay unchanged before the session starts again (ms).
CONTRAST_SETTLE_MS = 500


class PromptWidget(
    CommitActions, StoreActions, TileActions, StackActions, MultiObjects, PromptInput, QWidget
):
    """Dock widget: click points / draw a box, see the mask, commit it to a Labels layer.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        prefer_plugin_reader()  # *_labels.tif opens without "Choose reader"
        prepare_process()  # imports and a garbage collection now, not in the first Start
        self.sessions: list[ImageSession] = []
        self.state: ImageSession | None = None
        self.cache = EmbeddingCache(max_items=32)
        self.negative = False

        layout = scrolled(self)  # a crowded dock scrolls instead of clipping
        form = QFormLayout()
        self.image_combo = LayerCombo(napari_viewer, Image)
        self.image_combo.currentTextChanged.connect(self._image_changed)
        form.addRow("image", self.image_combo)
        layout.addLayout(form)
        self.model = ModelPicker(napari_viewer)
        layout.addWidget(self.model)

        opts = QFormLayout()
        self.multimask = QComboBox()
        self.multimask.addItems(["best of 3", "single"])
        self.multimask.setToolTip(
            "a single point gives 3 candidate masks: X shows the next (empty ones skipped)"
        )
        self.multimask.currentIndexChanged.connect(self._masks_changed)
        opts.addRow("masks", self.multimask)
        self.overlap = QComboBox()
        self.overlap.addItems(["only unlabeled pixels", "overwrite"])
        self.overlap.setToolTip("what a commit does where the mask covers existing objects")
        opts.addRow("overlap", self.overlap)
        self.negative_box = QCheckBox("next points are negative (N)")
        self.negative_box.toggled.connect(self._set_negative)
        opts.addRow(self.negative_box)
        self.disk_cache = QCheckBox("precompute all planes (on-disk cache)")
        self.disk_cache.setToolTip(
            "embed every plane in the background at Start and keep the embeddings on disk "
            "(about 4 MB per plane), also for the next session with the same image"
        )
        opts.addRow(self.disk_cache)
        opts.addRow("embeddings", self.store_button())  # precomputed: mobilesam embed
        layout.addLayout(opts)

        buttons = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.start_button.setToolTip("load the model, add this image's prompt layers, embed")
        self.commit_button = QPushButton("Commit (C)")
        self.undo_button = QPushButton("Undo (Shift-Z)")
        self.clear_button = QPushButton("Clear (Esc)")
        for b, f in ((self.start_button, self.start), (self.commit_button, self.commit),
                     (self.undo_button, self.undo), (self.clear_button, self.clear)):  # fmt: skip
            handler = guarded(f)
            b.clicked.connect(lambda _checked=False, f=handler: f())
            buttons.addWidget(b)
        layout.addLayout(buttons)

        prop = QGroupBox("propagate through z / t")
        pform = QFormLayout(prop)
        self.prop_axis = QComboBox()
        self.prop_direction = QComboBox()
        self.prop_direction.addItems(["both", "forward", "backward"])
        self.prop_min_score = QDoubleSpinBox()
        self.prop_min_score.setRange(0.0, 1.0)
        self.prop_min_score.setSingleStep(0.05)
        self.prop_min_score.setValue(0.7)
        self.prop_button = QPushButton("Propagate")
        self.prop_button.setToolTip("commit the mask and follow the object plane by plane")
        self.prop_button.clicked.connect(lambda _checked=False: guarded(self.propagate)())
        pform.addRow("axis", self.prop_axis)
        pform.addRow("direction", self.prop_direction)
        pform.addRow("stop below score", self.prop_min_score)
        self.prop_all_button = QPushButton("Propagate all on plane")
        self.prop_all_button.setToolTip(
            "follow every committed object of the shown plane at once, each with its own id"
        )
        self.prop_all_button.clicked.connect(lambda _checked=False: guarded(self.propagate_all)())
        prop_row = QHBoxLayout()  # one row: a dock shared with another widget stays legible
        prop_row.addWidget(self.prop_button)
        prop_row.addWidget(self.prop_all_button)
        pform.addRow(prop_row)
        layout.addWidget(prop)

        self.status = QLabel("choose an image and press Start")
        self.status.setWordWrap(True)  # two lines, never squeezed by a crowded dock
        self.status.setMinimumHeight(2 * self.status.fontMetrics().lineSpacing() + 4)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip(
            "stop precomputing or propagating after the plane that runs now; "
            "the planes done are kept"
        )
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(lambda _checked=False: guarded(self.cancel)())
        layout.addWidget(self.status)
        row = QHBoxLayout()
        row.addWidget(self.progress)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        help_label = QLabel(SHORTCUTS)
        help_label.setWordWrap(True)
        layout.addWidget(help_label)
        layout.addStretch()
        self.runner = Runner(self._busy, self.status)
        # contrast changes (a slider drag sends many) start the session again once settled
        self._contrast_timer = QTimer(self)
        self._contrast_timer.setSingleShot(True)
        self._contrast_timer.setInterval(CONTRAST_SETTLE_MS)
        self._contrast_timer.timeout.connect(self._contrast_settled)

        napari_viewer.dims.events.current_step.connect(self._plane_changed)
        self._image_changed()

    # -- sessions ------------------------------------------------------------------------

    @property
    def session(self) -> PromptSession | None:
        """The chosen image's :class:`PromptSession` (None before Start)."""
        return self.state.session if self.state is not None else None

    @property
    def prediction(self) -> Prediction | None:
        """The chosen image's previewed prediction."""
        return self.state.prediction if self.state is not None else None

    def session_of(self, image) -> ImageSession | None:
        """The session of an image layer (None before its first Start)."""
        return next((s for s in self.sessions if s.image is image), None)

    def _image_changed(self, *_args) -> None:
        if self.state is not None:
            self._show(self.state, None)  # its preview would lie over the next image
        # a session whose layers the user removed starts again (at Start) from its names
        self.sessions = [s for s in self.sessions if s.intact(self.viewer)]
        layer = self.image_combo.layer()
        self.state = self.session_of(layer)
        self.prop_axis.clear()
        if layer is not None:
            shape = layer.data.shape
            self.prop_axis.addItems(
                [f"axis {i} ({shape[i]} planes)" for i in range(layer.ndim - 2)]
            )
        self.prop_button.setEnabled(self.prop_axis.count() > 0)
        self.prop_all_button.setEnabled(self.prop_axis.count() > 0)
        if self.state is None:
            if layer is not None:
                self.status.setText(f"press Start to segment {layer.name!r}")
            return
        self._set_negative(self.negative)
        self.state.plane = None
        self.viewer.layers.selection.active = self.state.points
        self.status.setText(f"back to {layer.name!r}: its objects are in {self.state.labels.name}")
        if self._contrast_stale(self.state):  # its contrast changed while another was chosen
            self._contrast_settled()
            return
        self._plane_changed()

    # -- contrast: the model sees what the user sees ---------------------------------------

    def _contrast_stale(self, state: ImageSession) -> bool:
        """Whether ``state``'s image shows other contrast limits than its session uses."""
        if state.session is None or state.limits is None:
            return False
        return tuple(float(v) for v in state.image.contrast_limits) != state.limits

    def _contrast_changed(self, state: ImageSession) -> None:
        if state is self.state and state in self.sessions and self._contrast_stale(state):
            self._contrast_timer.start()  # (restarted by each event of a drag)

    def _contrast_settled(self) -> None:
        """Start the chosen image's session again with its new contrast limits: the shown
        plane is embedded again (embeddings of earlier limits stay cached); its layers,
        objects and undo steps stay."""
        state = self.state
        if state is None or not state.intact(self.viewer) or not self._contrast_stale(state):
            return
        self.start()
        self.status.setText(
            f"contrast of {state.image.name!r} changed: embedding with the new limits…"
        )

    def start(self) -> None:
        """Load the model, create the image's session and layers, and embed the shown plane.

        Layers are added only once the model has loaded; existing layers of the image's
        names are reused (its labels keep their objects), never removed.
        """
        layer = self.image_combo.layer()
        if layer is None:
            show_info("MobileSAM: add an image layer first")
            return
        try:
            check_layers(self.viewer, layer)
        except LayerConflict as exc:
            show_info(f"MobileSAM: {exc}")
            self.status.setText(str(exc))
            return
        on_disk = self.disk_cache.isChecked()

        limits = tuple(float(v) for v in layer.contrast_limits)

        adding = f"adding the layers of {layer.name!r}…"

        def make():
            predictor = self.model.predictor()
            # keyed by the planes' pixels (and the model and limits), so an entry is never
            # taken for other data, and a later session on the same image reuses it
            if on_disk:
                cache = EmbeddingCache(max_items=32, folder=embedding_cache_dir())
            else:
                cache = self.cache
            return PromptSession(  # a multiscale layer: its full resolution, read lazily
                predictor, image_data(layer), rgb=bool(layer.rgb), contrast_limits=limits,
                cache=cache,
            )  # fmt: skip

        def made(session) -> None:
            if layer not in self.viewer.layers:
                return
            state = self.session_of(layer)
            if state is not None and not state.intact(self.viewer):
                self.sessions.remove(state)
                state = None
            if state is None:  # the layers are added one per turn of the event loop
                try:
                    steps, finish = layer_steps(self.viewer, layer)
                except LayerConflict as exc:
                    show_info(f"MobileSAM: {exc}")
                    self.status.setText(str(exc))
                    return
                self.runner.hold()
                if layer is self.image_combo.layer():  # (the user may have chosen another)
                    self.status.setText(adding)
                in_turns(steps, lambda: added(session, finish), self._layers_failed)
                return
            ready(session, state)

        def added(session, finish) -> None:
            self.runner.release()
            if layer not in self.viewer.layers:
                if self.status.text() == adding:  # (else the combo's next image says its own)
                    self.status.setText(f"{layer.name!r} was removed while its layers were added")
                return
            state = finish()
            self._connect(state)
            self.sessions.append(state)
            ready(session, state)

        def ready(session, state) -> None:
            if state.session is not None:  # Start again: Undo still reverts earlier commits
                try:
                    session.adopt_undo(state.session)
                except ValueError as exc:
                    show_info(f"MobileSAM: earlier commits can no longer be undone: {exc}")
            state.session, state.ready, state.plane = session, set(), None
            state.limits = limits
            self.attach_at_start(state)  # a store for the image: before its first plane
            if state.image is self.image_combo.layer():  # (the user may have chosen another)
                self.status.setText(f"model on {session.predictor.describe()}")
                self.state = state
                self.viewer.layers.selection.active = state.points
                self._set_negative(self.negative)
                self._plane_changed()
                if on_disk:
                    self.precompute()

        self.runner.submit(make, made, "loading the model…")

    def _layers_failed(self, exc: Exception) -> None:
        self.runner.release()
        show_info(f"MobileSAM: {exc}")
        self.status.setText(str(exc))

    # -- plane and prompts -----------------------------------------------------------------

    def current_plane(self) -> tuple[int, ...] | None:
        """The chosen image's plane the viewer shows (None beyond its extent)."""
        return current_plane(self.viewer, self.image_combo.layer())

    def _plane_changed(self, *_args) -> None:
        state = self.state
        if state is None or state.session is None or not state.intact(self.viewer):
            return  # (layers are removed one by one when the viewer closes)
        plane = current_plane(self.viewer, state.image)
        if plane is None:  # a stack shorter than the slider: never embed another plane
            state.plane = None
            self._show(state, None)
            self.status.setText(outside_message(self.viewer, state.image))
            return
        if plane == state.plane:
            return
        state.plane = plane
        self._show(state, None)
        session = state.session
        known = plane in state.ready or state.store is not None  # (a store: read, mostly)
        known = known or session.tiles is not None  # tiles are embedded at clicks
        message = "" if known else f"computing the embedding of plane {plane}…"
        if not known:
            self._note_queued(f"the embedding of plane {plane}" if plane else "the embedding")
        self.runner.submit(
            lambda: session.embed(plane), lambda _: self._embedded(state, plane), message
        )

    def _embedded(self, state: ImageSession, plane) -> None:
        state.ready.add(plane)
        note = tiles_note(state.session)
        if note and state is self.state:
            self.status.setText(f"plane {plane}: {note}" if plane else note)
        self._predict(state)

    def _masks_changed(self, _index=None) -> None:
        """'best of 3' / 'single' applies to the prompts shown now, not only the next."""
        state = self.state
        if state is None or state.session is None:
            return
        state.choice = "best"
        self._predict(state)

    def _prompts_changed(self, state: ImageSession, event=None) -> None:
        if str(getattr(event, "action", "")) in ("adding", "removing"):
            return  # announced before the data changes; the -ed event follows
        state.choice = "best"  # a new object, or a changed one: the best candidate first
        if state is self.state and state.session is not None and state.plane not in state.ready:
            self._note_queued()  # the prompt waits for its plane's embedding
        self._predict(state)

    def prompts(self) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """Points (N, 2) (row, col), labels (N,), box (4,) (r0, c0, r1, c1) on the shown plane
        of the chosen image (None where there is none); see :func:`~._layers.plane_prompts`."""
        if self.state is None:
            return None, None, None
        return plane_prompts(self.state)

    def _predict(self, state: ImageSession) -> None:
        if state is not self.state or state.session is None or state.plane not in state.ready:
            return
        objects = plane_objects(state)  # two or more boxes: as many objects
        if objects:
            self._predict_many(state, objects)
            return
        points, labels, box = self.prompts()
        if points is None and box is None:
            self._show(state, None)
            return
        # three candidates only for an ambiguous prompt: a single point (a box is not)
        multimask = self.multimask.currentIndex() == 0 and box is None
        choice, plane, session = state.choice, state.plane, state.session
        tiles, single = prompt_tiles(session, points, box)  # [] when not tiled
        known = state.tiles_known

        def run():  # a generator: it says which tiles it embeds before it does
            missing = missing_tiles(session, plane, tiles, known)
            if missing:
                yield embedding_message(missing, len(session.tiles))
            prediction = session.predict(points, labels, box, multimask=multimask, choice=choice)
            known.update((plane, t) for t in tiles)
            prediction.mask  # noqa: B018  the shown candidate upsampled here, not on the GUI thread
            window = prediction.window if single else None  # masks only inside the tile
            return prediction, mask_extent(prediction.masks, window)

        def done(result) -> None:
            if state.plane == plane:
                self._show(state, *result)

        self._note_queued()
        self.runner.submit(run, done, yielded=self.status.setText, key="predict")

    def _note_queued(self, what: str = "your prompt") -> None:
        """Say in the status line that ``what`` waits for the job that runs now."""
        if self.runner.worker is not None and self.runner.running:
            self.status.setText(f"{what} runs next, after: {self.runner.running}")

    def _show(self, state: ImageSession, prediction: Prediction | None, extent=None) -> None:
        """Preview ``prediction`` (None: no preview); ``extent`` (r0, c0, r1, c1) holds all
        its candidates' pixels (default: computed, or the shown prediction's for another
        candidate of it). Only the region that changes is written and redrawn."""
        if prediction is not None and extent is None:
            same = state.prediction is not None and prediction.masks is state.prediction.masks
            extent = state.extent if same else mask_extent(prediction.masks)
        state.prediction, state.predictions = prediction, None
        state.extent = extent if prediction is not None else None
        if prediction is None:
            update_preview(state, None, None)
            return
        mask = prediction.mask
        update_preview(state, extent, lambda view, rows, cols: np.copyto(view, mask[rows, cols]))
        if state is self.state:
            n = len(prediction.scores)
            self.status.setText(
                f"mask {prediction.choice + 1} of {n}, predicted IoU {prediction.score:.3f}"
            )

    # -- actions ---------------------------------------------------------------------------
