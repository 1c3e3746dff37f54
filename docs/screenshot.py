"""Render the docked MobileSAM widgets on a real napari viewer to a PNG (shown in the README).

Usage (no display needed)::

    xvfb-run -a .venv/bin/python docs/screenshot.py
        [--model vit_t_synthetic_cells] [--weights FILE] [--out docs/widgets.png]

It opens the synthetic cell stack with the bundled stand-in model
(``vit_t_synthetic_cells``), docks both widgets, segments a cell with a point prompt,
commits it, runs segment-everything on the shown plane, and saves a screenshot of
the whole window.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wait(app, widget, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while widget.runner.busy and time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)
    app.processEvents()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_t_synthetic_cells", help="registry name")
    p.add_argument("--weights", type=Path, help="a checkpoint file instead of the registry's")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "widgets.png")
    args = p.parse_args(argv)

    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_mobilesam._widgets import EverythingWidget, PromptWidget
    from napari_mobilesam.napari_io import sample_cell_stack

    viewer = napari.Viewer(title="napari-mobilesam", show=True)
    viewer.window.resize(1500, 1150)
    ((stack, kwargs, _),) = sample_cell_stack()
    viewer.add_image(stack, **kwargs)
    viewer.dims.current_step = (5, 0, 0)
    app = QApplication.instance()

    prompt = PromptWidget(viewer)
    everything = EverythingWidget(viewer)
    # one model setting per viewer: the everything widget shows the same choice
    prompt.model.name.setCurrentText(args.model)
    prompt.model.weights.setText(str(args.weights) if args.weights else "")
    viewer.window.add_dock_widget(prompt, name="MobileSAM: segment with prompts", area="right")
    viewer.window.add_dock_widget(everything, name="MobileSAM: segment everything", area="right")

    prompt.start()
    _wait(app, prompt)
    # a point on the brightest pixel of the shown plane: inside a cell
    plane = stack[5]
    r, c = np.unravel_index(np.argmax(plane), plane.shape)
    prompt.state.points.add(np.array([[5, r, c]], dtype=float))
    _wait(app, prompt)
    prompt.commit()
    prompt.state.points.add(np.array([[5, r, c]], dtype=float))
    _wait(app, prompt)

    # 32 x 32 points; the stand-in model's scores need lower thresholds than the
    # defaults (docs/quality.md)
    everything.pred_iou_thresh.setValue(0.6)
    everything.stability_score_thresh.setValue(0.8)
    everything.run()
    _wait(app, everything)
    viewer.layers.selection.active = prompt.state.points
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False)
    print(f"wrote {args.out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
