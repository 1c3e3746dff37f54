"""The segment-everything parameters of the everything widget, one spin box each."""

from __future__ import annotations

from qtpy.QtWidgets import QDoubleSpinBox, QFormLayout, QSpinBox, QWidget

__all__ = ["GeneratorParams"]


class GeneratorParams(QWidget):
    """A form of :class:`~napari_mobilesam.everything.MaskGenerator` keywords, each a spin
    box attribute of the same name, at the library's defaults."""

    #: the keywords shown, in form order
    NAMES = (
        "points_per_side",
        "pred_iou_thresh",
        "stability_score_thresh",
        "box_nms_thresh",
        "min_mask_region_area",
        "min_visible_fraction",
        "max_covered_fraction",
        "refine_rounds",
    )

    def __init__(self) -> None:
        super().__init__()
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        self.points_per_side = _spin(QSpinBox(), 1, 128, 32)
        self.pred_iou_thresh = _spin(QDoubleSpinBox(), 0.0, 1.0, 0.88, 0.01)
        self.stability_score_thresh = _spin(QDoubleSpinBox(), 0.0, 1.0, 0.95, 0.01)
        self.box_nms_thresh = _spin(QDoubleSpinBox(), 0.0, 1.0, 0.7, 0.05)
        self.min_mask_region_area = _spin(QSpinBox(), 0, 10**7, 0)
        self.min_visible_fraction = _spin(QDoubleSpinBox(), 0.0, 1.0, 0.5, 0.05)
        self.min_visible_fraction.setToolTip(
            "a mask mostly covered by better-scored ones gets no label when less than this "
            "fraction of it stays visible (0 keeps every sliver)"
        )
        self.max_covered_fraction = _spin(QDoubleSpinBox(), 0.0, 1.0, 0.5, 0.05)
        self.max_covered_fraction.setToolTip(
            "drop a mask when more than this fraction of it lies inside better-scored masks: "
            "a part of a cell, a near-copy (1 keeps every mask)"
        )
        self.refine_rounds = _spin(QSpinBox(), 0, 8, 0)
        self.refine_rounds.setToolTip(
            "prompt each grid mask again with its own box this many times: more cells found "
            "with a trained model, about 1.6x the time per round (0: off)"
        )
        for label, name in (
            ("points per side", "points_per_side"),
            ("predicted IoU ≥", "pred_iou_thresh"),
            ("stability ≥", "stability_score_thresh"),
            ("NMS IoU", "box_nms_thresh"),
            ("min region area (px)", "min_mask_region_area"),
            ("min visible fraction", "min_visible_fraction"),
            ("max covered fraction", "max_covered_fraction"),
            ("box refinement rounds", "refine_rounds"),
        ):
            form.addRow(label, getattr(self, name))

    def parameters(self) -> dict:
        """The MaskGenerator keyword arguments chosen."""
        return {name: getattr(self, name).value() for name in self.NAMES}


def _spin(box, lo, hi, value, step=None):
    box.setRange(lo, hi)
    box.setValue(value)
    if step is not None:
        box.setSingleStep(step)
    return box
