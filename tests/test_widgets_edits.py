"""Hand edits of the everything widget's result layer survive a rerun (``_widgets/_edits``)."""

from __future__ import annotations

import numpy as np
from skimage.draw import disk

from .widget_support import everything_widget, idle, napari  # noqa: F401  (skips)


def _blobs(shape=(96, 120), centers=((40, 50), (70, 95))):
    img = np.full(shape, 300, np.uint16)
    for c in centers:
        img[disk(c, 14, shape=shape)] = 3000
    return img


def test_edit_planes_reads_every_kind_of_index():
    from napari_mobilesam._widgets._edits import edit_planes

    lead = (3, 4)  # (T, Z) before (Y, X)
    brush = [((slice(1, 2), slice(2, 4), slice(0, 8), slice(0, 8)), None, None, 5)]
    assert edit_planes(brush, lead) == {(1, 2), (1, 3)}
    fill = [((np.array([0, 0, 0]), np.array([1, 1, 1]), np.arange(3), np.arange(3)), None, 7)]
    assert edit_planes(fill, lead) == {(0, 1)}
    wrapped = [((np.array([slice(2, 3)], dtype=object), 0, slice(None), slice(None)), None, 1)]
    assert edit_planes(wrapped, lead) == {(2, 0)}
    assert edit_planes(brush, ()) == {()}  # a 2D image: its one plane
    assert edit_planes([object()], lead) is None  # unreadable: the caller counts every plane
    assert edit_planes(None, lead) is None
    assert edit_planes([], lead) is None


def test_rerun_keeps_hand_edits_in_a_layer_of_their_own(make_napari_viewer, qtbot, tiny_predictor):
    from napari_mobilesam._widgets._edits import ALL, EDITED

    viewer = make_napari_viewer()
    viewer.add_image(np.stack([_blobs()] * 3), name="cells")
    e = everything_widget(viewer, "cells")
    viewer.dims.current_step = (0, 0, 0)
    e.run()
    idle(qtbot, e)
    result = viewer.layers["cells everything"]
    result.paint((0, 5, 5), 99)  # the user paints on plane 0
    painted = result.data[0].copy()
    assert result.metadata[EDITED] == {(0,)}

    # a run of another plane writes into the same layer: plane 0 is not touched
    viewer.dims.current_step = (2, 0, 0)
    e.run()
    idle(qtbot, e)
    assert viewer.layers["cells everything"] is result
    np.testing.assert_array_equal(result.data[0], painted)
    assert result.data[2].max() > 0

    # a run of the edited plane leaves the edited layer alone, renamed
    viewer.dims.current_step = (0, 0, 0)
    e.pred_iou_thresh.setValue(0.5)  # other settings, as a user tries them
    e.run()
    idle(qtbot, e)
    assert result.name == "cells everything (edited)" and result in viewer.layers
    np.testing.assert_array_equal(result.data[0], painted)
    assert (result.data[0] == 99).any() and result.data[2].max() > 0
    fresh = viewer.layers["cells everything"]
    assert fresh is not result and EDITED not in fresh.metadata
    assert fresh.data[2].max() == 0  # only the plane this run did
    assert "your edits are kept in layer 'cells everything (edited)'" in e.status.text()

    # edits in the new layer are watched too; a second copy gets a name of its own
    fresh.fill((0, 1, 1), 42)
    e.run()
    idle(qtbot, e)
    assert fresh.name == "cells everything (edited 2)"
    assert "cells everything (edited)" in viewer.layers and "cells everything" in viewer.layers

    # an edit whose planes cannot be read counts every plane
    new = viewer.layers["cells everything"]
    from napari_mobilesam._widgets import _edits

    _edits._painted(new, type("Event", (), {"value": [object()]})())
    assert new.metadata[EDITED] == ALL


def test_linked_rerun_keeps_edits_of_any_plane(make_napari_viewer, qtbot, tiny_predictor):
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([_blobs()] * 3), name="cells")
    e = everything_widget(viewer, "cells")
    e.scope.setCurrentIndex(1)
    e.run()
    idle(qtbot, e)
    result = viewer.layers["cells everything"]
    before = result.data.copy()
    e.run()  # unedited: the same layer is written again
    idle(qtbot, e)
    assert viewer.layers["cells everything"] is result and result.name == "cells everything"

    result.paint((1, 80, 10), 7)  # an edit on plane 1 only
    edited = result.data.copy()
    e.link.axis.setCurrentIndex(e.link.axis.findData("z"))
    e.run()  # a linked run clears every plane: the edited layer is kept
    idle(qtbot, e)
    assert result.name == "cells everything (edited)"
    np.testing.assert_array_equal(result.data, edited)
    assert (edited != before).any()
    assert viewer.layers["cells everything"] is not result
