"""Commit and undo of a :class:`~.session.PromptSession`: the methods that paint masks
into label planes, with undo, through the session's :class:`~.labels.LabelEditor`.

A mixin: the session sets ``self._labels`` (a :class:`~.labels.LabelEditor` of its
planes' (H, W)) before any of these is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..validation import check_int

if TYPE_CHECKING:
    from .labels import LabelEditor

__all__ = ["SessionLabels"]


class SessionLabels:
    """Commit, commit many, undo and the undo settings of a session."""

    _labels: LabelEditor

    @property
    def max_undo(self) -> int:
        """How many commits :meth:`undo` can revert (default 64)."""
        return self._labels.max_undo

    @max_undo.setter
    def max_undo(self, value: int) -> None:
        self._labels.max_undo = check_int(value, "max_undo", minimum=0)

    @property
    def can_undo(self) -> bool:
        """Whether :meth:`undo` has a commit to revert."""
        return self._labels.can_undo

    def next_undo(self) -> tuple[object, tuple[slice, slice]] | None:
        """``(plane, box)`` that :meth:`undo` would revert now (see
        :meth:`LabelEditor.next_undo`), or None."""
        return self._labels.next_undo()

    def adopt_undo(self, other: SessionLabels) -> None:
        """Take over ``other``'s undo steps: a new session of the same image (e.g. with
        another model) keeps reverting the commits made in the earlier one.

        Raises
        ------
        ValueError
            If ``other``'s planes have another (H, W) than this session's.
        """
        if other._labels.shape_hw != self._labels.shape_hw:
            raise ValueError(
                f"cannot take undo steps of planes {other._labels.shape_hw} "
                f"into a session of planes {self._labels.shape_hw}"
            )
        self._labels = other._labels

    def commit(
        self,
        labels: np.ndarray,
        mask: np.ndarray,
        *,
        label_id: int | None = None,
        overwrite: bool = False,
        min_free: float = 0.0,
    ) -> int:
        """Paint ``mask`` into a label plane in place, with a new id; undoable.

        Parameters
        ----------
        labels : np.ndarray
            (H, W) integer label image (0 = background), modified in place; a view into
            a stack (``labels3d[z]``) works.
        mask : np.ndarray
            (H, W) bool.
        label_id : int, optional
            The id to paint; default ``labels.max() + 1`` (for one plane of a stack, pass
            ``stack.max() + 1`` to keep ids unique across planes).
        overwrite : bool
            Also paint over other objects; by default only unlabelled pixels change.
        min_free : float
            Without ``overwrite``, the least fraction of the mask that must be unlabeled.

        Returns
        -------
        int
            The id painted. Errors: see :meth:`LabelEditor.commit`.
        """
        ids = None if label_id is None else [label_id]
        return self._labels.commit(
            labels, [mask], label_ids=ids, overwrite=overwrite, min_free=min_free
        )[0]

    def commit_many(
        self,
        labels: np.ndarray,
        masks,
        *,
        label_ids=None,
        overwrite: bool = False,
        min_free: float = 0.0,
    ) -> list[int]:
        """Paint several masks into a label plane, each with a new id; one undo step.

        See :meth:`LabelEditor.commit`: where the masks overlap, the earlier one keeps
        the pixel; ``label_ids`` default to ``labels.max() + 1, + 2, ...``; ``min_free``
        applies to each mask.
        """
        return self._labels.commit(
            labels, masks, label_ids=label_ids, overwrite=overwrite, min_free=min_free
        )

    def undo(self, labels: np.ndarray | None = None) -> list[int] | None:
        """Revert the last commit (all objects committed together).

        Parameters
        ----------
        labels : np.ndarray, optional
            Revert in this array instead of the one the commit painted (when the label
            data was replaced by a copy); same shape.

        Returns
        -------
        list of int or None
            The ids that were removed, or None when there is nothing to undo.
        """
        return self._labels.undo(labels)
