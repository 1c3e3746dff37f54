"""Text report of :func:`napari_mobilesam.distill.evaluate.evaluate`."""

from __future__ import annotations

import math

__all__ = ["format_report"]


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.4f}"


def format_report(result: dict) -> str:
    """Text summary of :func:`evaluate`'s result; the first line is ``mIoU: 0.xxxx``."""
    lines = [
        f"mIoU: {_fmt(result['miou'])}",
        f"mIoU points: {_fmt(result.get('miou_points'))}"
        + (f" ({result['n_points']} prompts)" if result.get("miou_points") is not None else ""),
        f"mIoU boxes: {_fmt(result.get('miou_boxes'))}"
        + (f" ({result['n_boxes']} prompts)" if result.get("miou_boxes") is not None else ""),
        f"embedding MSE: {result['embedding_mse']:.6g}",
        f"images: {result['n_images']}, prompts: {result['n_prompts']}"
        + (f" ({result['skipped']} images skipped)" if result.get("skipped") else ""),
        f"student: {result.get('student')} ({result.get('student_model', '?')}), "
        f"teacher: {result.get('teacher')}, seed: {result.get('seed')}",
    ]
    return "\n".join(lines)
