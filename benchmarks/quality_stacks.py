"""The quality benchmark's figures on stacks: propagation through z (one object at a
time and every object of a plane at once), 3D objects linked by ``mobilesam-everything
--link z`` and tracks linked by ``--link t``, each against the synthetic generator's truth.

:mod:`benchmarks.bench_quality` runs them; tests pin them (``tests/test_quality.py``,
``tests/test_quality_stacks.py``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks._quality import SEED, STANDIN_THRESHOLDS


def propagation(
    model, n_stacks: int, seed: int = SEED, max_objects: int = 6, max_upscale: float | None = None
) -> dict:
    """Mean IoU per plane of objects propagated through synthetic 3D stacks (256 px planes;
    ``max_upscale``: shown at most that many times enlarged, ``Predictor(max_upscale=)``)."""
    from napari_mobilesam.interactive import PromptSession
    from napari_mobilesam.predictor import Predictor

    predictor = Predictor(model, max_upscale=max_upscale)
    ious: list[float | None] = []
    for k in range(n_stacks):
        s = _stack(seed + k)
        session = PromptSession(predictor, s.image)
        ids = [i for i in np.unique(s.labels) if i]
        rng = np.random.default_rng(seed + k)
        for i in rng.permutation(ids)[:max_objects]:
            planes = np.nonzero((s.labels == i).any((1, 2)))[0]
            if len(planes) < 3:
                continue
            mid = int(planes[len(planes) // 2])
            got = session.propagate((mid,), s.labels[mid] == i, 0)
            ious += _walk_ious(s.labels, i, mid, got)
    return _walk_summary(ious)


def propagation_many(
    model, n_stacks: int, seed: int = SEED, max_upscale: float | None = None
) -> dict:
    """Mean IoU per plane of every object of a stack's middle plane propagated at once.

    The synthetic stacks of :func:`propagation`; from the middle plane, with the true
    label plane as the committed objects, ``PromptSession.propagate_all`` walks up and
    down with every object together (one decoder call per plane), each stopping on its own
    score and area rule. For each object and each other plane it occupies in the truth:
    the IoU of the mask found there (0 for a plane the walk did not reach).

    Returns
    -------
    dict
        ``mean_iou_per_plane``, ``planes_reached`` (share), ``planes`` (object planes
        scored), ``objects`` (objects propagated).
    """
    from napari_mobilesam.interactive import PromptSession
    from napari_mobilesam.predictor import Predictor

    predictor = Predictor(model, max_upscale=max_upscale)
    ious: list[float | None] = []
    objects = 0
    for k in range(n_stacks):
        s = _stack(seed + k)
        mid = s.labels.shape[0] // 2
        session = PromptSession(predictor, s.image)
        got = session.propagate_all((mid,), s.labels[mid], 0)
        ids = [int(i) for i in np.unique(s.labels[mid]) if i]
        objects += len(ids)
        for i in ids:
            ious += _walk_ious(s.labels, i, mid, got.masks[i])
    return dict(_walk_summary(ious), objects=objects)


def _stack(seed: int):
    """The propagation figures' synthetic stack: 16 planes of 256 px."""
    from napari_mobilesam import synthetic

    return synthetic.cells_3d((16, 256, 256), seed=seed, z_radius=(3, 6))


def _walk_ious(
    labels: np.ndarray, cell: int, start: int, found: dict[tuple[int, ...], np.ndarray]
) -> list[float | None]:
    """IoU of ``found``'s mask (``{(z,): (H, W) bool}``) with ``cell``'s true section in
    each plane of ``labels`` (Z, H, W) the cell occupies, ``start`` excluded; None where
    the walk found nothing."""
    out: list[float | None] = []
    for z in np.nonzero((labels == cell).any((1, 2)))[0]:
        if z == start:
            continue
        mask = found.get((int(z),))
        if mask is None:
            out.append(None)
            continue
        truth = labels[z] == cell
        out.append(float((mask & truth).sum() / max(1, (mask | truth).sum())))
    return out


def _walk_summary(ious: list[float | None]) -> dict:
    """Mean IoU per plane (a plane not reached, None, counting 0), the share of planes
    reached and the number of planes scored."""
    if not ious:
        return {"mean_iou_per_plane": float("nan"), "planes_reached": float("nan"), "planes": 0}
    reached = [v for v in ious if v is not None]
    return {
        "mean_iou_per_plane": float(sum(reached) / len(ious)),
        "planes_reached": len(reached) / len(ious),
        "planes": len(ious),
    }


def linked_3d(
    weights: str = "vit_t_synthetic_cells",
    n_stacks: int = 3,
    seed: int = SEED,
    shape: tuple[int, int, int] = (16, 256, 256),
    grid: int = 32,
    folder: Path | None = None,
    extra: tuple[str, ...] = (),
    min_planes: int = 3,
    extend: bool = False,
    max_upscale: float | str | None = None,
    thresholds: dict | None = STANDIN_THRESHOLDS,
) -> dict:
    """3D AP50 of ``mobilesam-everything --link z`` on synthetic (Z, Y, X) stacks.

    Each stack (``synthetic.cells_3d(shape, seed=seed + k)``) is written as an ImageJ
    TIFF and segmented by the command, in this process, with ``--link z --csv`` and
    ``thresholds``. A linked 3D object matches a true cell when their
    3D IoU is at least 0.5; its score for AP is the area-weighted mean of its
    sections' predicted IoU (from ``<stem>_objects.csv``).

    Parameters
    ----------
    weights : str
        Registry name (``--model``) or checkpoint file (``--weights``, vit_t).
    n_stacks, seed, shape, grid
        Stacks ``seed .. seed + n_stacks - 1`` of ``shape``; ``--points-per-side``.
    folder : Path, optional
        Where inputs and outputs go (default: a temporary folder, removed).
    extra : tuple of str
        More command-line arguments.
    min_planes : int
        ``--link-min-planes`` (default 3): the generator's cells span 5 planes or more
        of a 16-plane stack (z semi-axes of 3-7 planes) unless the stack's top or
        bottom cuts them, so a 3D object seen in fewer than 3 planes is a fragment or
        out-of-focus light; cells cut to fewer planes than this are missed. 1 keeps
        every object.
    extend : bool
        Also run the command with ``--link-extend`` (each object prompted with its box
        into the planes next to it where it has no section; the added sections'
        predicted IoU join its score): its figures go under ``"extended"``, with
        ``sections_added`` and ``seconds`` (its whole run, segmentation included).
    max_upscale : float or "none", optional
        ``--max-upscale``: planes enlarged at most this many times for the model's input
        (the stand-in model learnt cells on 512 px images shown 2x; SAM's resize shows a
        256 px plane 4x); ``"none"``: no limit; None (no flag): the model's default (2
        for the stand-in model).
    thresholds : dict, optional
        ``pred_iou_thresh`` and ``stability_score_thresh`` given to the command
        (default :data:`STANDIN_THRESHOLDS`; None: the command's defaults).

    Returns
    -------
    dict
        ``ap50``, ``precision``, ``recall``, ``f1`` (at 3D IoU 0.5), ``objects``
        (linked), ``truth`` (true cells), ``planes``, ``seconds`` (the command's wall time).
    """
    import csv
    import tempfile

    import tifffile

    from mobilesam_batch import cli
    from napari_mobilesam import synthetic

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(folder) if folder is not None else Path(tmp)
        inputs = root / "stacks"
        inputs.mkdir(parents=True, exist_ok=True)
        truths = {}
        for k in range(n_stacks):
            s = synthetic.cells_3d(tuple(shape), seed=seed + k)
            tifffile.imwrite(inputs / f"stack{k}.tif", s.image, imagej=True,
                             metadata={"axes": "ZYX"})  # fmt: skip
            truths[f"stack{k}"] = s.labels
        model = ["--model", weights] if Path(weights).suffix == "" else ["--weights", weights]
        if max_upscale is not None:
            model += ["--max-upscale", str(max_upscale)]
        score_args = [f"--{k.replace('_', '-')}={v}" for k, v in (thresholds or {}).items()]

        def command(out: Path, *more: str) -> tuple[list, float]:
            t0 = time.perf_counter()
            code = cli.main([str(inputs), "-o", str(out), "--link", "z", "--csv", "-q",
                             "--link-min-planes", str(min_planes), "--points-per-side",
                             str(grid), *score_args, *model, *extra, *more])  # fmt: skip
            seconds = time.perf_counter() - t0
            if code != 0:
                raise RuntimeError(f"mobilesam-everything exited with status {code}")
            found = []
            for stem, truth in truths.items():
                labels = tifffile.imread(out / f"{stem}_labels.tif")
                scores: dict[int, list[tuple[float, float]]] = {}
                with open(out / f"{stem}_objects.csv", encoding="utf-8") as f:
                    for row in csv.DictReader(f):  # an added section: a row of its object
                        i, area = int(row["object_id"]), float(row["area"])
                        scores.setdefault(i, []).append((area, float(row["predicted_iou"])))
                found.append((labels, truth, scores))
            return found, seconds

        found, seconds = command(root / "labels")
        res = _scored_3d(found)
        res.update(planes=n_stacks * shape[0], seconds=seconds)
        if extend:
            found, seconds = command(root / "labels-extended", "--link-extend")
            added = sum(
                json.loads(p.read_text())["linked"]["extended"]["sections_added"]
                for p in (root / "labels-extended").glob("*_labels.json")
            )
            res["extended"] = dict(_scored_3d(found), sections_added=added, seconds=seconds)
    return res


def _scored_3d(stacks) -> dict:
    """AP50, precision, recall, F1 at 3D IoU 0.5 of ``(labels, truth, {id: [(area,
    predicted IoU), ...]})`` per stack; an object's score is its sections' area-weighted
    predicted IoU."""
    from napari_mobilesam.training.metrics import average_precision, iou_matrix, match_counts

    scored, tp, n_pred, n_true = [], 0, 0, 0
    for labels, truth, scores in stacks:
        ids = np.unique(labels)
        ids = ids[ids > 0]
        ious = iou_matrix(labels, truth)  # rows: ids ascending
        weighted = [sum(a * s for a, s in scores[int(i)]) / sum(a for a, _ in scores[int(i)])
                    for i in ids]  # fmt: skip
        scored.append((ious, np.array(weighted)))
        c = match_counts(ious)
        tp, n_pred, n_true = tp + c["tp"], n_pred + c["n_pred"], n_true + c["n_true"]
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return {
        "ap50": average_precision(scored), "precision": p, "recall": r,
        "f1": 2 * p * r / (p + r) if p + r else 0.0, "objects": n_pred, "truth": n_true,
    }  # fmt: skip


def tracked(
    weights: str = "vit_t_synthetic_cells",
    n_series: int = 2,
    seed: int = SEED,
    n_frames: int = 12,
    shape: tuple[int, int] = (256, 256),
    grid: int = 32,
    folder: Path | None = None,
    extra: tuple[str, ...] = (),
    thresholds: dict | None = None,
) -> dict:
    """Tracking accuracy of ``mobilesam-everything --link t`` on synthetic time series.

    Each series (``synthetic.cell_time_series(n_frames, shape, seed=seed + k)``: moving
    cells, 3 divisions) is written as an ImageJ TIFF (TYX) and segmented by the command,
    in this process, with ``--link t --csv`` and every other setting at its default
    unless ``extra`` or ``thresholds`` say otherwise. The tracks (``<stem>_labels.tif``,
    parents from ``<stem>_tracks.csv``) are scored by
    :func:`napari_mobilesam.linking.track_accuracy`: the fraction of the true links
    (a cell from one frame to the next, a mother to each daughter) that the tracks keep,
    and the share of divisions recalled.

    Returns
    -------
    dict
        The sums of ``track_accuracy``'s counts over the series and the ratios
        (``link_accuracy``, ``division_recall``, ``detection_recall``), ``frames``,
        ``seconds`` (the command's wall time).
    """
    import csv
    import tempfile

    import tifffile

    from mobilesam_batch import cli
    from napari_mobilesam import synthetic
    from napari_mobilesam.linking import track_accuracy

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(folder) if folder is not None else Path(tmp)
        inputs = root / "series"
        inputs.mkdir(parents=True, exist_ok=True)
        truths = {}
        for k in range(n_series):
            s = synthetic.cell_time_series(n_frames, tuple(shape), seed=seed + k)
            tifffile.imwrite(inputs / f"series{k}.tif", s.image, imagej=True,
                             metadata={"axes": "TYX"})  # fmt: skip
            truths[f"series{k}"] = (s.labels, s.parents)
        model = ["--model", weights] if Path(weights).suffix == "" else ["--weights", weights]
        score_args = [f"--{k.replace('_', '-')}={v}" for k, v in (thresholds or {}).items()]
        out = root / "tracks"
        t0 = time.perf_counter()
        code = cli.main([str(inputs), "-o", str(out), "--link", "t", "--csv", "-q",
                         "--points-per-side", str(grid), *score_args, *model, *extra])  # fmt: skip
        seconds = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"mobilesam-everything exited with status {code}")
        sums: dict[str, int] = {}
        for stem, (truth, true_parents) in truths.items():
            labels = tifffile.imread(out / f"{stem}_labels.tif")
            with open(out / f"{stem}_tracks.csv", encoding="utf-8") as f:
                parents = {int(r["track_id"]): int(r["parent_track_id"])
                           for r in csv.DictReader(f)}  # fmt: skip
            res = track_accuracy(labels.astype(np.int64), parents, truth, true_parents)
            for key in ("links", "links_correct", "divisions", "divisions_found",
                        "sections", "sections_matched"):  # fmt: skip
                sums[key] = sums.get(key, 0) + res[key]

    def ratio(a: str, b: str) -> float:
        return sums[a] / sums[b] if sums[b] else float("nan")

    return {
        **sums,
        "link_accuracy": ratio("links_correct", "links"),
        "division_recall": ratio("divisions_found", "divisions"),
        "detection_recall": ratio("sections_matched", "sections"),
        "frames": n_series * n_frames,
        "seconds": seconds,
    }
