"""Planning: which inputs to segment, under which output names, and which to skip.

Every input gets a set of outputs named after its file (``<stem>_labels.tif``,
``<stem>_labels.json``, ...). Before anything is computed, :func:`plan` decides for
each input whether its set

- is free (no file of it exists), or this input's own (its provenance record, or
  the commit note of an interrupted write, names this input): it is (re)computed,
  or skipped when the record shows it up to date;
- belongs to another input, by a record of this run or an earlier one (plate
  folders reuse names: ``plate1/well.png`` and ``plate2/well.png``): a *clash*.
  ``--on-clash refuse`` (the default) fails the input, naming both; ``suffix``
  writes ``<stem>-2_labels.tif`` (the first free or own ``-N``); ``overwrite``
  replaces the other input's outputs.

A set is complete only when its provenance record is written (last). A set without
its record, left by a run that stopped while writing it, is redone by the next run.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .discover import discover_inputs, split_output_folder
from .embeddings import check_embeddings
from .folder import WORK_DIR
from .inputs import ImageSource, InputError, open_source
from .link import link_layout
from .outputs import ngff_attrs
from .planes import scan_cache
from .provenance import changed_outputs, input_identity, read_provenance, run_key
from .segment import SegmentOptions, get_segmenter

if TYPE_CHECKING:
    from .runner import RunConfig, Summary

__all__ = [
    "CLASH_CHOICES",
    "Job",
    "commit_note",
    "edited_outputs",
    "output_paths",
    "output_stem",
    "plan",
]

CLASH_CHOICES = ("refuse", "suffix", "overwrite")
#: ``-N`` suffixes tried with ``--on-clash suffix`` before giving up
_MAX_SUFFIX = 1000


@dataclass
class Job:
    """One input on its way through the run."""

    path: Path
    stem: str
    source: dict[str, Any]
    identity: dict[str, Any]
    key: str
    outputs: dict[str, Path]
    cache: Path
    indices: list[tuple[int, ...]]
    done: dict[tuple[int, ...], tuple[int, float]] = field(default_factory=dict)
    # RAN_ON values of the planes (this run's and earlier runs'), as resolved where they ran
    ran_on: set[tuple] = field(default_factory=set)
    # --embeddings: what the store matched (check_embeddings), and the planes it served
    embeddings: dict[str, Any] | None = None
    from_store: set[tuple[int, ...]] = field(default_factory=set)
    failed: str | None = None
    started: float = field(default_factory=time.perf_counter)
    _open: ImageSource | None = None

    @property
    def todo(self) -> list[tuple[int, ...]]:
        return [i for i in self.indices if i not in self.done]

    def open(self, axes: str | None) -> ImageSource:
        if self._open is None:
            self._open = open_source(self.path, axes)
        return self._open

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None


def output_stem(path: Path) -> str:
    """File name without its image suffix (``a.ome.tif`` -> ``a``)."""
    name = path.name
    lower = name.lower()
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name


#: every kind of output of one input, and its file name's ending after the input's stem
OUTPUT_KINDS = {
    "labels": "_labels.tif",
    "zarr": "_labels.zarr",
    "coco": "_coco.json",
    "csv": "_objects.csv",
    "tracks": "_tracks.csv",
    "provenance": "_labels.json",
}


def output_paths(outdir: Path, stem: str, kinds: list[str]) -> dict[str, Path]:
    """``kind -> path`` of the outputs of one input; ``provenance`` always included (last)."""
    return {k: outdir / f"{stem}{OUTPUT_KINDS[k]}" for k in [*kinds, "provenance"]}


def commit_note(outdir: Path, stem: str) -> Path:
    """Where a run notes which input's set it is moving into place (removed when done)."""
    return outdir / WORK_DIR / f"commit-{stem}.json"


# ---------------------------------------------------------------------------- ownership


def _owner(outputs: dict[str, Path], outdir: Path, stem: str) -> tuple[str, dict | None]:
    """Who wrote the set at ``outputs``.

    Returns ``("free", None)`` when none of its files exists, ``("input", owner)``
    when the commit note of an unfinished write, else the provenance record, else the
    label TIFF's own metadata names an input (``owner``: its ``path`` and ``key``),
    and ``("unknown", None)`` when files exist that nothing accounts for.
    """
    note = read_provenance(commit_note(outdir, stem))
    if note is not None and "path" in note:
        return "input", note
    record = read_provenance(outputs["provenance"])
    if record is not None and isinstance(record.get("input"), dict):
        return "input", {"path": record["input"].get("path"), "key": record.get("key")}
    source = _tiff_source(outputs["labels"])  # a set whose record was never written
    if source is not None:
        return "input", {"path": source, "key": None}
    if any(p.exists() for p in outputs.values()):
        return "unknown", None
    return "free", None


def _tiff_source(path: Path) -> str | None:
    """The input a label TIFF written by this tool names in its own metadata, else None."""
    if not path.is_file():
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            if tif.imagej_metadata and "Info" in tif.imagej_metadata:
                info = json.loads(tif.imagej_metadata["Info"])
            else:
                info = tif.shaped_metadata[0] if tif.shaped_metadata else None
    except Exception:  # not a TIFF this tool wrote: nothing to learn
        return None
    mine = info.get("mobilesam") if isinstance(info, dict) else None
    if not isinstance(mine, dict) or mine.get("tool") != "mobilesam-everything":
        return None
    source = mine.get("source")
    return str(Path(source).resolve()) if isinstance(source, str) and source else None


def _clash(
    outputs: dict[str, Path], outdir: Path, stem: str, identity: dict, key: str, redo: bool
) -> str | None:
    """None when this input may write the set at ``outputs``, else why not (one line).

    ``redo`` (``--overwrite``): an up-to-date set of this input is written again too.
    """
    state, owner = _owner(outputs, outdir, stem)
    if state == "free":
        return None
    if state == "unknown":
        names = ", ".join(p.name for p in outputs.values() if p.exists())
        return f"{names} in {outdir} exist(s) without a provenance record of this tool"
    other = owner.get("path")
    moved = other is not None and not Path(other).exists() and owner.get("key") == key
    if other == identity["path"] or moved:  # moved: its folder was renamed since
        return _edited(outputs, outdir, stem, identity, key, redo)
    return f"{outputs['labels'].name} in {outdir} was written for {other}"


def _edited(
    outputs: dict[str, Path], outdir: Path, stem: str, identity: dict, key: str, redo: bool
) -> str | None:
    """None when this input's own set may be replaced, else why not: files of it that
    differ from what the run that wrote them recorded (edited by hand since)."""
    if not redo and _up_to_date(outputs, outdir, stem, identity, key):
        return None  # skipped: nothing is written
    changed = edited_outputs(outputs, outdir, stem)
    if not changed:
        return None
    return (
        f"{', '.join(changed)} in {outdir} changed since mobilesam-everything wrote "
        f"{'them' if len(changed) > 1 else 'it'} (edited by hand?)"
    )


def edited_outputs(outputs: dict[str, Path], outdir: Path, stem: str) -> list[str]:
    """The files of the set at ``outputs`` changed since the run that wrote them (by the
    SHA-256 its record keeps); none while a commit note says a write of this set was
    interrupted (the set is then partly this tool's newer files, which a run completes)."""
    if read_provenance(commit_note(outdir, stem)) is not None:
        return []
    return changed_outputs(read_provenance(outputs["provenance"]), outdir)


def _choose_stem(
    path: Path, identity: dict, key: str, kinds: list[str], claimed: dict[str, Path],
    config: RunConfig, log: Callable[[str], None],
) -> str:  # fmt: skip
    """The output stem of ``path``; raises ValueError (the reason) on a refused clash."""
    base = output_stem(path)
    outdir = config.outdir
    for n in range(1, _MAX_SUFFIX + 1):
        stem = base if n == 1 else f"{base}-{n}"
        if stem in claimed:
            reason = (
                f"its outputs would overwrite those of {claimed[stem]} in this run "
                f"(same name {stem!r})"
            )
        else:
            reason = _clash(output_paths(outdir, stem, kinds), outdir, stem, identity, key,
                            config.overwrite)  # fmt: skip
        if reason is None:
            return stem
        if config.on_clash == "overwrite" and stem not in claimed:
            log(f"note   {path}: --on-clash overwrite: replacing them ({reason})")
            return stem
        if config.on_clash != "suffix":
            raise ValueError(
                f"{reason}; refusing to replace them. Use --on-clash suffix to write "
                f"{base}-2_labels.tif etc., --on-clash overwrite to replace them, or "
                "another -o folder"
            )
    raise ValueError(f"no free output name {base}-2 ... {base}-{_MAX_SUFFIX} in {outdir}")


# ------------------------------------------------------------------------------ planning


def plan(
    config: RunConfig,
    summary: Summary,
    log: Callable[[str], None],
    same_as: dict[str, str] | None = None,
) -> list[Job]:
    """The jobs of a run: inputs found, opened, named and not yet up to date.

    Inputs that cannot be used (missing, unreadable, clashing, inside the output
    folder) are added to ``summary.failed`` and logged; up-to-date ones to
    ``summary.skipped``. ``same_as`` is passed to :func:`~.planes.scan_cache`.
    """

    def fail(path, reason: str) -> None:
        summary.failed.append((str(path), reason))
        log(f"FAILED {path}: {reason}")

    paths, errors = discover_inputs(config.inputs, recursive=config.recursive)
    paths, inside, summary.ignored = split_output_folder(config.inputs, paths, config.outdir)
    for err in [*errors, *inside]:
        fail(err.path, err.reason)
    if config.embeddings is not None and len(paths) > 1:
        for path in paths:
            fail(path, f"--embeddings {config.embeddings} belongs to one image, and "
                 f"{len(paths)} inputs were found: run one input at a time with it")  # fmt: skip
        return []

    kinds = config.output_kinds()
    model = {
        "name": config.model.name,
        "sha256": config.model_sha256,
        "backend": config.model.backend,
    }
    if config.model.precision != "fp32":  # (absent for fp32: keys of earlier runs still match)
        model["precision"] = config.model.precision
    parameters = {**config.options.resolved(), "axes": config.axes}
    # the saved planes depend on the segmentation only: a changed linking parameter
    # re-links the planes an interrupted run saved, without segmenting them again
    plane_kinds = [k for k in kinds if k != "tracks"]
    keyed = link_parameters(config, parameters)
    jobs: list[Job] = []
    claimed: dict[str, Path] = {}
    for path in paths:
        try:
            with open_source(path, config.axes) as src:
                _check_channels(src, config.options)
                source = src.describe()
                source.update(out_shape=list(src.out_shape), out_axes=src.out_axes)
                indices = [tuple(int(i) for i in ix) for ix in src.plane_indices()]
                if config.zarr:
                    ngff_attrs(src.out_axes)  # OME-Zarr takes 2 to 5 axes: fail now, not later
                if config.link is not None:  # a 2D image, or no such axis: fail now
                    link_layout(src.plane_axes, src.plane_shape, config.link)
                store = None
                if config.embeddings is not None and not config.dry_run:  # before any plane
                    sam = get_segmenter(config.model, config.options).sam
                    store = check_embeddings(config.embeddings, src, config.options, sam)
            identity = input_identity(path)
            key = run_key(identity, source, model, keyed, kinds)
            planes_key = run_key(identity, source, model, parameters, plane_kinds)
            stem = _choose_stem(path, identity, key, kinds, claimed, config, log)
        except (InputError, ValueError, OSError) as exc:
            fail(path, exc.reason if isinstance(exc, InputError) else str(exc))
            continue
        claimed[stem] = path
        outputs = output_paths(config.outdir, stem, kinds)
        job = Job(
            path=path, stem=stem, source=source, identity=identity, key=key, outputs=outputs,
            cache=config.outdir / WORK_DIR / f"{stem}-{planes_key[:16]}", indices=indices,
            embeddings=store,
        )  # fmt: skip
        if store is not None:
            _log_store(job, store, same_as, log)
        if not config.overwrite and _up_to_date(outputs, config.outdir, stem, identity, key):
            if not config.dry_run:
                # planes a run killed between the provenance record and their removal left
                shutil.rmtree(job.cache, ignore_errors=True)
                commit_note(config.outdir, stem).unlink(missing_ok=True)
            summary.skipped.append(path)
            log(f"skip   {path} (outputs up to date)")
            continue
        if config.overwrite:
            if not config.dry_run:
                shutil.rmtree(job.cache, ignore_errors=True)
        else:
            scan_cache(job, None if config.dry_run else same_as)
        jobs.append(job)
    return jobs


def _log_store(job: Job, store: dict, same_as: dict | None, log: Callable[[str], None]) -> None:
    log(f"store  {job.path}: embeddings of {store['planes_done']} of {len(job.indices)} "
        f"planes from {store['path']}")  # fmt: skip
    ran = None if same_as is None else same_as.get("precision")
    if ran is not None and store["precision"] not in (None, ran):
        log(f"note   {job.path}: the store's embeddings were computed in "
            f"{store['precision']}, this run embeds in {ran}: labels can differ slightly "
            "from a run without it")  # fmt: skip


def link_parameters(config: RunConfig, parameters: dict) -> dict:
    """``parameters`` with the linking parameters under ``"link"`` when linking (else
    unchanged, so the keys of runs without ``--link`` stay as they were)."""
    if config.link is None:
        return parameters
    return {**parameters, "link": config.link.record()}


def _up_to_date(outputs: dict[str, Path], outdir: Path, stem: str, identity: dict, key: str):
    """Whether the set is complete and made by this input with this key."""
    record = read_provenance(outputs["provenance"])
    if record is None or record.get("key") != key:
        return False
    note = read_provenance(commit_note(outdir, stem))
    if note is not None and note.get("path") != identity["path"]:
        return False  # another input's write into this set was interrupted
    recorded = (record.get("input") or {}).get("path")
    if recorded != identity["path"] and recorded is not None and Path(recorded).exists():
        return False
    return all(p.exists() for p in outputs.values())


def _check_channels(src: ImageSource, options: SegmentOptions) -> None:
    """Fail early, by file, when the channels cannot be shown as RGB."""
    n = src.n_channels
    if options.channels is None:
        if src.channel_axis is not None and n not in (1, 3, 4):
            raise ValueError(
                f"has {n} channels (axes {src.axes}); choose up to 3 with --channels, "
                "e.g. --channels 0,1"
            )
        return
    bad = [c for c in options.channels if not -n <= c < n]
    if bad:
        raise ValueError(f"--channels {bad} out of range: the image has {n} channel(s)")
