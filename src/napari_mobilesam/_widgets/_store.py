"""The prompt widget's embedding stores: embeddings precomputed by ``mobilesam embed``.

*Embeddings…* opens a store (a ``*.zarr`` folder) for the chosen image: with a session,
at once; before Start, when Start makes the session. An image opened from a file
``X.tif`` whose folder holds ``X.embeddings.zarr`` (:func:`store_beside`) gets that store
at Start without asking. Either way the store is checked in a worker thread against the
session's model, image and normalisation (:func:`napari_mobilesam.store.attach_store`):
a store that fits serves its planes instead of the encoder ("embeddings from X: N
planes"); one that does not is never used, and says why (a notification when the user
chose it, the status line only for the store found beside the file). The session then
computes its planes as without a store.
"""

from __future__ import annotations

from pathlib import Path

from napari.utils.notifications import show_info
from qtpy.QtWidgets import QFileDialog, QPushButton

from ..store import EmbeddingStore, StoreError, attach_store

__all__ = ["STORE_SUFFIX", "StoreActions", "store_beside"]

#: The store ``mobilesam embed X.tif -o X.embeddings.zarr`` makes, found beside ``X.tif``.
STORE_SUFFIX = ".embeddings.zarr"
_DOUBLE = (".ome.tif", ".ome.tiff", ".ome.zarr")


def store_beside(path) -> Path | None:
    """The embedding store named after an image file, in its folder, if it exists.

    ``folder/X.tif`` -> ``folder/X.embeddings.zarr`` (``X.ome.tif`` and ``X.ome.zarr``
    -> ``X.embeddings.zarr`` too).

    Parameters
    ----------
    path : str or Path or None
        The image file (a napari layer's ``source.path``).

    Returns
    -------
    Path or None
        The store folder, or None when there is none (or no path).
    """
    if not path:
        return None
    path = Path(path)
    name = path.name
    double = next((s for s in _DOUBLE if name.lower().endswith(s)), None)
    stem = name[: -len(double)] if double else path.stem
    if not stem or name.endswith(STORE_SUFFIX):
        return None
    found = path.with_name(stem + STORE_SUFFIX)
    return found if found.is_dir() else None


def _whole_planes(store: EmbeddingStore) -> bool:
    """Whether the store holds one embedding per plane (no tile grid)."""
    return list(store.meta.get("tiles", {}).get("grid", [1, 1])) == [1, 1]


def brief(exc: BaseException, path) -> str:
    """A store's error in one line, the store by its name (the folder is known)."""
    name = Path(path).name
    text = str(exc)
    for spelled in sorted({str(path), str(Path(path).resolve())}, key=len, reverse=True):
        text = text.replace(spelled, name)
    cut = text.find(" (store != this)")
    if cut >= 0:  # the advice after it is for the command line
        text = text[:cut] + " (store != this image)"
    if not isinstance(exc, StoreError | FileNotFoundError):
        text = f"cannot read the embedding store {name}: {text}"
    return text


class StoreActions:
    """Mixin of :class:`~._prompt.PromptWidget`: *Embeddings…* and stores found at Start.

    Uses the widget's ``viewer``, ``state``, ``image_combo``, ``runner``, ``status`` and
    :meth:`session_of`.
    """

    #: stores chosen for images without a session yet: id(layer) -> (layer, path)
    _chosen: dict

    def store_button(self) -> QPushButton:
        """The *Embeddings…* button (made once)."""
        self._chosen = {}
        button = QPushButton("Embeddings…")
        button.setToolTip(
            "open the embeddings of this image precomputed with `mobilesam embed IMAGE -o "
            "STORE` (a .zarr folder): checked against the image, the model and the layer's "
            "contrast limits, then used instead of the encoder. X.embeddings.zarr beside "
            "X.tif is opened at Start by itself"
        )
        button.clicked.connect(lambda _checked=False: self.choose_store())
        return button

    def choose_store(self) -> None:
        """Ask for a store folder, then :meth:`open_store` it."""
        layer = self.image_combo.layer()
        if layer is None:
            show_info("MobileSAM: add an image layer first")
            return
        source = getattr(getattr(layer, "source", None), "path", None)
        start = str(Path(source).parent) if source else ""
        path = QFileDialog.getExistingDirectory(
            self, f"Embedding store of {layer.name!r} (mobilesam embed)", start
        )
        if path:
            self.open_store(path)

    def open_store(self, path) -> None:
        """Use the embedding store at ``path`` for the chosen image.

        With a session, the store is checked (in a worker) and attached at once;
        before Start, it is remembered and checked when Start makes the session. A store
        that does not fit is a notification naming it and what differs.
        """
        layer = self.image_combo.layer()
        if layer is None:
            show_info("MobileSAM: add an image layer first")
            return
        state = self.session_of(layer)
        if state is None or state.session is None:
            self._chosen[id(layer)] = (layer, Path(path))
            self.status.setText(f"embeddings {Path(path).name} are checked at Start")
            return
        self._attach(state, Path(path), quiet=False)

    def attach_at_start(self, state) -> None:
        """At Start: attach the store chosen for the image before (or used by its previous
        session), else the one beside its file (:func:`store_beside`), if any; queued
        before the first plane's embedding."""
        chosen = self._chosen.pop(id(state.image), None)
        if chosen is not None and chosen[0] is state.image:
            self._attach(state, chosen[1], quiet=False)
            return
        if state.store is not None:  # Start again: the store the image had
            self._attach(state, state.store, quiet=False)
            return
        found = store_beside(getattr(getattr(state.image, "source", None), "path", None))
        if found is not None:
            self._attach(state, found, quiet=True)

    def _attach(self, state, path: Path, quiet: bool) -> None:
        session, name = state.session, path.name
        state.store = path  # its planes load without the "computing" message

        def check():
            tiles = getattr(session, "tiles", None)
            try:
                store = EmbeddingStore.open(path, mode="r")
                if tiles is not None and _whole_planes(store):  # a tiled session: tiles
                    return (
                        f"{name} holds whole-plane embeddings, and the planes of "
                        f"{state.image.name!r} are tiled ({len(tiles)} tiles each): the "
                        "store is not used"
                    )
                cache = attach_store(session, store)
            except (StoreError, OSError) as exc:  # the session keeps its own cache
                return brief(exc, path)
            return len(cache.store.done())

        def done(result) -> None:
            if state.session is not session:
                return
            if isinstance(result, str):
                state.store = None
                if quiet:
                    self.status.setText(f"{result}; computing the embeddings instead")
                else:
                    show_info(f"MobileSAM: {result}")
                    self.status.setText(result)
                return
            self.status.setText(f"embeddings from {name}: {result} planes")

        self.runner.submit(check, done, f"checking the embedding store {name}…")
