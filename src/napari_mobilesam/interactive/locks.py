"""One lock per predictor, shared by every session that uses it.

A :class:`~napari_mobilesam.predictor.Predictor` holds a current image: code that sets
an image and then decodes against it must not let another thread set a different image
in between. :func:`predictor_lock` gives every such caller the same lock.
"""

from __future__ import annotations

import threading
import weakref

__all__ = ["predictor_lock"]

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def predictor_lock(predictor) -> threading.RLock:
    """The re-entrant lock that guards ``predictor``'s current image.

    Hold it around any sequence of calls that sets an image and then decodes against
    it (``set_image`` + ``predict``), so that no session on another thread swaps the
    image in between. One lock per predictor, for as long as the predictor lives.
    """
    with _GUARD:
        lock = _LOCKS.get(predictor)
        if lock is None:
            lock = _LOCKS[predictor] = threading.RLock()
        return lock
