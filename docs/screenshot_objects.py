"""Render the object table docked beside a real napari viewer to a PNG (for the README).

Usage (no display needed)::

    xvfb-run -a .venv/bin/python docs/screenshot_objects.py
        [--model vit_t_synthetic_cells] [--weights FILE] [--out docs/objects.png]

It opens the synthetic cells with the bundled stand-in model (``vit_t_synthetic_cells``),
segments everything on them, commits four objects with point prompts in the prompt
widget (their predicted IoU and stability are recorded), commits the other objects of
segment-everything to the same labels, docks *MobileSAM: objects*, sorts it by predicted
IoU (the doubtful first), selects the first row's object, and saves the whole window.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wait(app, widget, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    timer = getattr(widget, "timer", None)  # the object table's throttle
    while (widget.runner.busy or (timer is not None and timer.isActive())) and (
        time.monotonic() < end
    ):
        app.processEvents()
        time.sleep(0.02)
    app.processEvents()


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_t_synthetic_cells", help="registry name")
    p.add_argument("--weights", type=Path, help="a checkpoint file instead of the registry's")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "objects.png")
    args = p.parse_args(argv)

    import napari
    import numpy as np
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    from napari_mobilesam._widgets import EverythingWidget, ObjectsWidget, PromptWidget
    from napari_mobilesam.napari_io import sample_cells

    viewer = napari.Viewer(title="napari-mobilesam", show=True)
    viewer.window.resize(1700, 950)
    ((image, kwargs, _),) = sample_cells()
    layer = viewer.add_image(image, **kwargs)
    app = QApplication.instance()

    prompt, everything = PromptWidget(viewer), EverythingWidget(viewer)  # not docked
    for w in (prompt, everything):
        w.model.name.setCurrentText(args.model)
        w.model.weights.setText(str(args.weights) if args.weights else "")
    # the stand-in model's scores need lower thresholds than the defaults (docs/quality.md)
    everything.pred_iou_thresh.setValue(0.6)
    everything.stability_score_thresh.setValue(0.8)
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
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False)
    print(f"wrote {args.out}: {objects.model.rowCount()} objects")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
