"""A dock widget's controls in a vertical scroll area, so a crowded dock never clips them.

Two docks stacked on a laptop screen are shorter than their controls. Without a scroll
area Qt squeezes the rows and clips buttons; with one the dock scrolls instead.
"""

from __future__ import annotations

from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

MIN_HEIGHT = 240  # px: the least height a dock scrolls at (a few rows of controls)


class ScrollArea(QScrollArea):
    """A frameless vertical scroll area that asks for its contents' full size.

    QScrollArea's own size hint is capped (about 24 lines high), which made docks open
    with a scroll bar while the window had room; this one asks for the contents' hint.
    """

    def _with_bar(self, hint: QSize, height: int) -> QSize:
        """``hint``'s width plus the scroll bar's, and ``height``."""
        return QSize(hint.width() + self.verticalScrollBar().sizeHint().width(), height)

    def sizeHint(self) -> QSize:
        inner = self.widget()
        if inner is None:
            return super().sizeHint()
        hint = inner.sizeHint()
        return self._with_bar(hint, hint.height() + 2 * self.frameWidth())

    def minimumSizeHint(self) -> QSize:
        """The contents' width, and at most :data:`MIN_HEIGHT` of their height: docks
        stacked in a short window share it instead of one shrinking to its title."""
        inner = self.widget()
        if inner is None:
            return super().minimumSizeHint()
        hint = inner.minimumSizeHint()
        return self._with_bar(hint, min(hint.height(), MIN_HEIGHT))


def scrolled(widget: QWidget) -> QVBoxLayout:
    """Give ``widget`` a vertical scroll area as its only child.

    Parameters
    ----------
    widget : QWidget
        The dock widget, without a layout yet.

    Returns
    -------
    QVBoxLayout
        The layout of the scrolled contents, to add the controls to.
    """
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    area = ScrollArea(widget)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    inner = QWidget(area)
    area.setWidget(inner)
    outer.addWidget(area)
    widget.scroll_area = area
    return QVBoxLayout(inner)
