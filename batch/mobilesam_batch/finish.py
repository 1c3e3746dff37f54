"""Finishing an input: its outputs written from the saved planes, then moved into place.

Every output of an input is first written whole into the run's temporary folder
(``OUTDIR/.mobilesam-work/tmp-*/``, same filesystem), one plane at a time so memory
stays flat. Only when all of them are there does the set move into place: a commit
note naming the input first, then each file by rename, the provenance record last,
then the note goes. A full disk therefore stops a run *before* anything of the set is
visible; a run killed among the renames leaves a note, by which the next run knows
the set as this input's and completes it.

With ``--link``, the saved planes are first linked, one at a time (:mod:`.link`), and
every output is written from them relabelled with the linked ids.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .extend import extend_linked
from .folder import OutputError, describe, is_fatal
from .jobs import OUTPUT_KINDS, Job, commit_note, edited_outputs, link_parameters, output_paths
from .link import Linked, link_layout, link_planes, write_tracks_csv
from .outputs import (
    OBJECT_COLUMNS,
    atomic_path,
    coco_annotations,
    labels_dtype,
    object_table,
    write_coco_json,
    write_json_atomic,
    write_labels_tiff,
    write_labels_zarr,
    write_objects_csv,
)
from .planes import RAN_ON, load_plane
from .provenance import environment, file_digest, now, read_provenance

if TYPE_CHECKING:
    from .runner import RunConfig, Summary

__all__ = ["finish"]


def finish(
    job: Job, config: RunConfig, tmp: Path, summary: Summary, log: Callable[[str], None]
) -> None:
    """Write a finished job's outputs, move them into place and clear its saved planes.

    A bad output of this input (e.g. a value the format cannot hold) fails the input
    alone.

    Raises
    ------
    OutputError
        The output folder is full, read-only or denies writing: the run stops.
    """
    stage = tmp / f"stage-{job.stem}"
    try:
        stage.mkdir()
        record = _write_outputs(job, config, stage, log)
        _check_unchanged(job, config)
        removed = _commit(job, stage, tmp)
    except OSError as exc:
        if is_fatal(exc):
            raise OutputError(
                f"cannot write in {config.outdir}: {describe(exc)} (writing the outputs of "
                f"{job.path}); free space or fix the folder, then run the same command again "
                "to finish"
            ) from None
        _failed(job, f"cannot write outputs: {exc}", summary, log)
        return
    except ValueError as exc:
        _failed(job, f"cannot write outputs: {exc}", summary, log)
        return
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    shutil.rmtree(job.cache, ignore_errors=True)
    summary.done.append(job.path)
    n = len(job.indices)
    seconds = sum(s for _, s in job.done.values())
    linked = ""
    if "linked" in record:
        what = "3D objects" if config.link.axis == "z" else "tracks"
        linked = f" linked into {record['linked']['objects']} {what}"
        ext = record["linked"].get("extended")
        if ext is not None:
            linked += (f", {ext['sections_added']} sections added to "
                       f"{ext['objects_extended']} of them in {ext['seconds']:.1f} s")  # fmt: skip
    log(
        f"done   {job.path} ({n} plane{'s' if n != 1 else ''}, {record['objects']} objects"
        f"{linked}, {seconds:.1f} s) -> {job.outputs['labels'].name}"
    )
    if removed:
        log(f"       removed {', '.join(removed)}: written by an earlier run with other "
            "settings, they no longer matched the labels")  # fmt: skip


def _failed(job: Job, reason: str, summary: Summary, log: Callable[[str], None]) -> None:
    job.failed = reason
    summary.failed.append((str(job.path), reason))
    log(f"FAILED {job.path}: {reason}")


def _check_unchanged(job: Job, config: RunConfig) -> None:
    """Raise ValueError when files of the set this job replaces were edited while it ran
    (planning refused sets edited before; ``--on-clash overwrite`` replaces them)."""
    if config.on_clash == "overwrite":
        return
    changed = edited_outputs(job.outputs, config.outdir, job.stem)
    if changed:
        raise ValueError(
            f"{', '.join(changed)} in {config.outdir} changed while this run was running "
            "(edited by hand?); refusing to replace it. Run again with --on-clash suffix to "
            "write beside it, or --on-clash overwrite to replace it"
        )


def _commit(job: Job, stage: Path, tmp: Path) -> list[str]:
    """Move the staged set into place, provenance last; undo the moves if one fails.

    Then remove the files that the input's previous record lists and this set does not
    replace (a CSV or COCO file of an earlier run with other settings, which would
    describe labels that are gone); returns their names.
    """
    stale = _stale_outputs(job)
    note = commit_note(job.outputs["provenance"].parent, job.stem)
    write_json_atomic(note, {"path": job.identity["path"], "key": job.key}, tmp_dir=tmp)
    moved: list[Path] = []
    try:
        for dest in job.outputs.values():  # provenance is the last
            staged = stage / dest.name
            if staged.is_dir():
                with atomic_path(dest, tmp, is_dir=True) as t:
                    os.replace(staged, t)
            else:
                os.replace(staged, dest)
            moved.append(dest)
    except BaseException:
        for dest in moved:  # this run's own files: no label image without its record
            if dest.is_dir():
                shutil.rmtree(dest, ignore_errors=True)
            else:
                dest.unlink(missing_ok=True)
        raise
    note.unlink(missing_ok=True)
    removed = []
    for path in stale:
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path.name)
        except OSError:
            pass  # left as it was: the record no longer lists it
    return removed


def _stale_outputs(job: Job) -> list[Path]:
    """The files of this input's previous set that the new set lacks: each listed under
    its kind in the previous record, with the name this tool gives that kind (the job's
    ownership check found the set this input's, so this run may replace it)."""
    record = read_provenance(job.outputs["provenance"])
    listed = record.get("outputs") if isinstance(record, dict) else None
    if not isinstance(listed, dict):
        return []
    folder = job.outputs["provenance"].parent
    ours = output_paths(folder, job.stem, [k for k in OUTPUT_KINDS if k != "provenance"])
    return [
        path for kind, path in ours.items()
        if kind not in job.outputs and listed.get(kind) == path.name and path.exists()
    ]  # fmt: skip


def _write_outputs(
    job: Job, config: RunConfig, stage: Path, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Write every output of a finished job into ``stage``; returns the provenance record
    (``log``: where ``--link-extend`` reports its progress)."""
    src = job.source
    out_shape = tuple(src["out_shape"])
    out_axes = src["out_axes"]
    linked = layout = extended = None
    load: Callable[[tuple[int, ...]], dict] = lambda index: load_plane(job, index)  # noqa: E731
    if config.link is not None:  # one pass over the saved planes, in linking order
        layout = link_layout(src["plane_axes"], out_shape[:-2], config.link)
        linked = link_planes(layout, config.link, load)
        max_id = linked.n_objects
        if config.link.extend:  # the planes that gain sections are saved in the stage
            extended = extend_linked(job, config, layout, linked, stage / "extended", log)
            load = lambda index: extended.load(job, index)  # noqa: E731
    else:
        max_id = max((n for n, _ in job.done.values()), default=0)
    dtype = labels_dtype(max_id)
    staged = {kind: stage / path.name for kind, path in job.outputs.items()}

    def planes() -> Iterator[np.ndarray]:
        for index in job.indices:
            labels = load(index)["labels"]
            yield labels if linked is None else linked.relabel(index, labels)

    info = {"tool": "mobilesam-everything", "version": __version__,
            "source": job.identity["path"]}  # fmt: skip
    write_labels_tiff(
        staged["labels"], planes(), out_shape, out_axes, dtype, tmp_dir=stage, description=info
    )
    if config.zarr:
        write_labels_zarr(
            staged["zarr"], planes(), out_shape, out_axes, dtype, tmp_dir=stage, attrs=info
        )
    id_name = None if config.link is None else config.link.id_name
    if config.csv:
        columns = list(OBJECT_COLUMNS)
        if id_name is not None:
            columns.insert(columns.index("label") + 1, id_name)
        write_objects_csv(staged["csv"], _object_rows(job, load, linked, id_name),
                          tmp_dir=stage, columns=columns)  # fmt: skip
    if config.coco:
        _write_coco(job, load, staged["coco"], stage, linked, id_name)
    if "tracks" in staged:
        write_tracks_csv(staged["tracks"], linked, layout, tmp_dir=stage)

    planes_record = [
        {
            "index": list(index),
            "objects": job.done[index][0],
            "seconds": round(job.done[index][1], 3),
        }
        for index in job.indices
    ]
    record = {
        "tool": "mobilesam-everything",
        "version": __version__,
        "created": now(),
        "command": config.command,
        "key": job.key,
        "input": {**job.identity, **{k: v for k, v in src.items() if k not in ("out_shape",)}},
        "model": {
            "name": config.model.name,
            "weights": config.model.weights,
            "sha256": config.model_sha256,
            "backend": config.model.backend,
            "precision": config.model.precision,
            "device": config.model.device,
            # every process setup that computed planes of this output, in this run and
            # in earlier, interrupted ones; "auto" choices as they were resolved there
            "ran_on": [dict(zip(RAN_ON, r, strict=True)) for r in sorted(job.ran_on, key=str)],
        },
        "parameters": link_parameters(config, {**config.options.resolved(), "axes": config.axes}),
        "outputs": {
            **{k: p.name for k, p in job.outputs.items() if k != "provenance"},
            "dtype": np.dtype(dtype).name,
            "shape": list(out_shape),
            "axes": out_axes,
            "label_ids": _label_ids(config),
            # what this run wrote: a rerun with other settings keeps a file edited since
            "sha256": {k: file_digest(p) for k, p in staged.items() if k != "provenance"},
        },
        "objects": int(sum(n for n, _ in job.done.values())),
        "planes": planes_record,
        "environment": environment(),
    }
    if linked is not None:
        record["linked"] = {"objects": linked.n_objects, "divisions": linked.n_divisions,
                            "dropped_short": linked.n_dropped}  # fmt: skip
        if extended is not None:
            record["linked"]["extended"] = extended.record()
    if job.embeddings is not None:  # --embeddings: the store, what it matched, what it served
        served = sorted(job.from_store)
        record["embeddings"] = {**job.embeddings, "planes_from_store": [list(i) for i in served]}
    write_json_atomic(staged["provenance"], record, tmp_dir=stage)
    return record


def _label_ids(config: RunConfig) -> str:
    if config.link is None:
        return "per plane: 1..N in each plane, by decreasing predicted IoU"
    along = {"z": "one id per 3D object through Z", "t": "one track id per cell through T",
             "zt": "one track id per 3D object through Z and T"}[config.link.axis]  # fmt: skip
    return f"linked: {along}, 1..N in order of first appearance (linking order)"


def _scores(plane: dict[str, np.ndarray]) -> dict[int, dict[str, float | None]]:
    """``{per-plane id: scores}``; an added section (``--link-extend``) has no stability."""
    return {
        k + 1: {
            "predicted_iou": float(iou),
            "stability_score": None if np.isnan(stab) else float(stab),
        }
        for k, (iou, stab) in enumerate(
            zip(plane["predicted_iou"], plane["stability_score"], strict=True)
        )
    }


def _object_rows(
    job: Job, load: Callable[[tuple[int, ...]], dict], linked: Linked | None, id_name: str | None
) -> Iterator[dict]:
    """The CSV rows, plane by plane (``load(index)``: a saved plane); with ``linked``,
    each row's linked id in ``id_name``."""
    for index in job.indices:
        plane = load(index)
        lut = None if linked is None else linked.luts[index]
        for row in object_table(_kept(plane["labels"], lut), _scores(plane)):
            if lut is not None:
                row = {"label": row["label"], id_name: int(lut[row["label"]]), **row}
            yield {"plane": _flat_plane(job, index), **row}


def _kept(labels: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
    """A plane's per-plane labels without the objects linking left out (``lut`` 0:
    seen in too few planes, ``--link-min-planes``)."""
    if lut is None or lut[1:].all():
        return labels
    return np.where(lut[labels] > 0, labels, 0)


def _flat_plane(job: Job, index: tuple[int, ...]) -> int:
    """A plane's position as one number: its flat index in C order (0 for a 2D image)."""
    shape = tuple(job.source["out_shape"][:-2])
    return int(np.ravel_multi_index(index, shape)) if index else 0


def _write_coco(
    job: Job,
    load: Callable[[tuple[int, ...]], dict],
    dest: Path,
    stage: Path,
    linked: Linked | None,
    id_name: str | None,
) -> None:
    """COCO JSON, one image per plane and one annotation per label, streamed plane by plane."""
    height, width = job.source["out_shape"][-2:]
    images = [
        {"id": i, "file_name": job.path.name, "height": height, "width": width, "plane": list(ix)}
        for i, ix in enumerate(job.indices, start=1)
    ]

    def annotations() -> Iterator[dict[str, Any]]:
        next_id = 1
        for image_id, index in enumerate(job.indices, start=1):
            plane = load(index)
            lut = None if linked is None else linked.luts[index]
            anns = coco_annotations(_kept(plane["labels"], lut), image_id, next_id, _scores(plane))
            if lut is not None:
                for ann in anns:
                    ann[id_name] = int(lut[ann["label"]])
            next_id += len(anns)
            yield from anns

    info = {
        "description": f"mobilesam-everything objects of {job.path.name}",
        "version": __version__,
        "date_created": now(),
    }
    write_coco_json(dest, images, annotations(), info=info, tmp_dir=stage)
