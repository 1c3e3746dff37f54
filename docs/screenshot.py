"""Render the MobileSAM widgets on a real napari viewer to PNGs (shown in the README).

Usage (no display needed)::

    xvfb-run -a .venv/bin/python docs/screenshot.py [--scene widgets|objects|all]
        [--model vit_t_synthetic_cells] [--weights FILE] [--out-dir docs]

Scenes, each with the bundled stand-in model (``vit_t_synthetic_cells``) by default:

- ``widgets`` (``docs/widgets.png``): the synthetic cell stack with both widgets docked;
  a cell segmented with a point prompt and committed, segment-everything on the shown
  plane;
- ``objects`` (``docs/objects.png``): the synthetic cells segmented everywhere, four
  objects committed with point prompts (their predicted IoU and stability recorded),
  the other objects of segment-everything committed to the same labels, and the
  *MobileSAM: objects* table docked, sorted by predicted IoU (the doubtful first),
  its first row selected;
- ``linked`` (``docs/linked.png``): the synthetic cell stack segmented everywhere with
  *link: z* (*min planes* 3, *extend objects*, *link IoU* 0.7) and *max upscale* 2, one id per
  3D object through the planes,
  shown in napari's 3D view.

``--pred-iou-thresh`` and ``--stability-thresh`` set segment-everything's score
thresholds (default: the widget's).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENES = ("widgets", "objects", "linked")


def _wait(app, widget, timeout: float = 600.0) -> None:
    """Let the event loop run until ``widget``'s work (and its table throttle) is done."""
    end = time.monotonic() + timeout
    timer = getattr(widget, "timer", None)  # the object table's throttle
    while (widget.runner.busy or (timer is not None and timer.isActive())) and (
        time.monotonic() < end
    ):
        app.processEvents()
        time.sleep(0.02)
    app.processEvents()


def _settle(app) -> None:
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)


def _widgets(viewer, app, args) -> str:
    import numpy as np

    from napari_mobilesam._widgets import EverythingWidget, PromptWidget
    from napari_mobilesam.napari_io import sample_cell_stack

    viewer.window.resize(1500, 1250)
    ((stack, kwargs, _),) = sample_cell_stack()
    viewer.add_image(stack, **kwargs)
    viewer.dims.current_step = (5, 0, 0)
    prompt, everything = PromptWidget(viewer), EverythingWidget(viewer)
    # one model setting per viewer: the everything widget shows the same choice
    prompt.model.name.setCurrentText(args.model)
    prompt.model.weights.setText(str(args.weights) if args.weights else "")
    add = viewer.window.add_dock_widget
    docks = [
        add(prompt, name="MobileSAM: segment with prompts", area="right"),
        add(everything, name="MobileSAM: segment everything", area="right"),
    ]

    prompt.start()
    _wait(app, prompt)
    # a point on the brightest pixel of the shown plane: inside a cell
    r, c = np.unravel_index(np.argmax(stack[5]), stack[5].shape)
    prompt.state.points.add(np.array([[5, r, c]], dtype=float))
    _wait(app, prompt)
    prompt.commit()
    prompt.state.points.add(np.array([[5, r, c]], dtype=float))
    _wait(app, prompt)
    _thresholds(everything, args)
    everything.run()
    _wait(app, everything)
    viewer.layers.selection.active = prompt.state.points
    # each dock as tall as its controls (Qt shares the rest; a dock added second
    # starts at its scroll minimum)
    from qtpy.QtCore import Qt

    heights = [w.scroll_area.widget().sizeHint().height() + 30 for w in (prompt, everything)]
    viewer.window._qt_window.resizeDocks(docks, heights, Qt.Orientation.Vertical)
    return "segmented with a point, segment-everything on the shown plane"


def _thresholds(everything, args) -> None:
    if args.pred_iou_thresh is not None:
        everything.pred_iou_thresh.setValue(args.pred_iou_thresh)
    if args.stability_thresh is not None:
        everything.stability_score_thresh.setValue(args.stability_thresh)


def _linked(viewer, app, args) -> str:
    import numpy as np

    from napari_mobilesam._widgets import EverythingWidget
    from napari_mobilesam.napari_io import sample_cell_stack

    viewer.window.resize(1500, 1000)
    ((stack, kwargs, _),) = sample_cell_stack()
    layer = viewer.add_image(stack, **kwargs)
    everything = EverythingWidget(viewer)
    everything.model.name.setCurrentText(args.model)
    everything.model.weights.setText(str(args.weights) if args.weights else "")
    viewer.window.add_dock_widget(everything, name="MobileSAM: segment everything", area="right")
    everything.link.axis.setCurrentIndex(everything.link.axis.findData("z"))
    everything.link.min_planes.setValue(3)  # fragments and out-of-focus light left out
    everything.link.extend.setChecked(True)  # the end sections segment-everything missed
    everything.link.min_iou.setValue(0.7)  # cells stacked in z kept apart
    everything.model.max_upscale.setCurrentText("2")  # 256 px planes at the model's scale
    _thresholds(everything, args)
    everything.run()
    _wait(app, everything)
    result = viewer.layers[f"{layer.name} everything"]
    layer.visible = False
    result.scale = (4, 1, 1)  # planes 4 px apart: cells look as thick as they are
    viewer.dims.ndisplay = 3
    viewer.reset_view()
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.angles = (-15, 25, 130)
    camera.zoom *= 1.5
    ids = np.unique(np.asarray(result.data))
    return (f"{int((ids > 0).sum())} 3D objects through {stack.shape[0]} planes "
            f"({everything.status.text()})")  # fmt: skip


def _interior_points(labels, n: int):
    """(row, col) of the most interior pixel of the ``n`` largest objects."""
    import numpy as np
    from scipy.ndimage import distance_transform_edt

    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    points = []
    for label in ids[np.argsort(-counts)][:n]:
        depth = distance_transform_edt(labels == label)
        points.append(np.unravel_index(int(np.argmax(depth)), labels.shape))
    return points


def _objects(viewer, app, args) -> str:
    import numpy as np
    from qtpy.QtCore import Qt

    from napari_mobilesam._widgets import EverythingWidget, ObjectsWidget, PromptWidget
    from napari_mobilesam.napari_io import sample_cells

    viewer.window.resize(1700, 950)
    ((image, kwargs, _),) = sample_cells()
    layer = viewer.add_image(image, **kwargs)
    prompt, everything = PromptWidget(viewer), EverythingWidget(viewer)  # not docked
    prompt.model.name.setCurrentText(args.model)
    prompt.model.weights.setText(str(args.weights) if args.weights else "")
    _thresholds(everything, args)
    everything.run()
    _wait(app, everything)
    found = np.asarray(viewer.layers[f"{layer.name} everything"].data)

    prompt.start()
    _wait(app, prompt)
    for r, c in _interior_points(found, 4):
        prompt.state.points.add(np.array([[r, c]], dtype=float))
        _wait(app, prompt)
        prompt.commit()
    everything.commit_to_labels()  # the other objects, into unlabeled pixels
    viewer.layers[f"{layer.name} everything"].visible = False
    for name in ("points", "box", "preview"):
        viewer.layers[f"{layer.name} {name}"].visible = False

    objects = ObjectsWidget(viewer)
    dock = viewer.window.add_dock_widget(objects, name="MobileSAM: objects", area="right")
    dock.setMinimumWidth(640)
    objects.labels_combo.setCurrentText(f"{layer.name}_labels")
    _wait(app, objects)
    column = objects.model.names.index("predicted_iou")
    objects.view.sortByColumn(column, Qt.SortOrder.AscendingOrder)
    objects.view.selectRow(0)
    objects.show_row(0)
    viewer.reset_view()  # the whole image; the row's object is the layer's selected label
    viewer.layers.selection.active = viewer.layers[f"{layer.name}_labels"]
    return f"{objects.model.rowCount()} objects in the table"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scene", choices=(*SCENES, "all"), default="all")
    p.add_argument("--model", default="vit_t_synthetic_cells", help="registry name")
    p.add_argument("--weights", type=Path, help="a checkpoint file instead of the registry's")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    p.add_argument("--pred-iou-thresh", type=float, help="segment-everything's [widget's]")
    p.add_argument("--stability-thresh", type=float, help="segment-everything's [widget's]")
    args = p.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    render = {"widgets": _widgets, "objects": _objects, "linked": _linked}
    for scene in SCENES if args.scene == "all" else (args.scene,):
        viewer = napari.Viewer(title="napari-mobilesam", show=True)
        app = QApplication.instance()
        what = render[scene](viewer, app, args)
        _settle(app)
        out = args.out_dir / f"{scene}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(out), canvas_only=False)
        print(f"wrote {out}: {what}")
        viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
