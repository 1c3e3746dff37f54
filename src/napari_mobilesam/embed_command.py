"""``mobilesam embed``: precompute an image's embeddings into a zarr store, resumably.

Examples::

    mobilesam embed stack.tif -o stack.embeddings.zarr --device cuda
    mobilesam embed cells.zarr -o cells.emb.zarr --axes ZCYX --channels 1 \\
        --contrast-limits 100,4000

Planes longer than 2048 px are embedded as overlapping 1024 px tiles, as the prompt
widget embeds them (``--tile-threshold``, ``--tile-size``, ``--tile-overlap``). Run it
again after an interruption: finished planes (tiles) are kept, damaged ones are
recomputed. The store is checked against the model and the image first and never
overwritten when it belongs to another one. The napari prompt widget and
:class:`~napari_mobilesam.interactive.PromptSession` (:func:`napari_mobilesam.store.
attach_store`) then load the planes instead of computing them.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

__all__ = ["add_parser"]

# PromptSession's defaults (napari_mobilesam.interactive.tiles), repeated here so that
# building the command line does not import torch; tests/test_store_tiles.py checks them
DEFAULT_TILE_THRESHOLD, DEFAULT_TILE_SIZE, DEFAULT_TILE_OVERLAP = 2048, 1024, 256


def _numbers(text: str | None, kind, count: int | None, flag: str):
    """``"a,b"`` as a tuple of ``kind``; a usage error naming ``flag`` otherwise."""
    from .cli import CommandError

    if text is None:
        return None
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or (count is not None and len(values) != count):
        what = f"{count} comma-separated numbers" if count else "comma-separated integers"
        raise CommandError(f"{flag} {text!r}: give {what}", status=2)
    return values


def _grid(args: argparse.Namespace, shape_hw):
    """The tile grid for planes of ``shape_hw``, as a PromptSession would cut them, or
    None for whole planes."""
    from .cli import CommandError
    from .interactive.tiles import TileGrid

    if args.tile_threshold < 0:
        raise CommandError(f"--tile-threshold must be >= 0, got {args.tile_threshold}", status=2)
    if args.tile_threshold == 0 or max(shape_hw) <= args.tile_threshold:
        return None
    try:
        return TileGrid(tuple(shape_hw), args.tile_size, args.tile_overlap)
    except ValueError as exc:
        raise CommandError(f"--tile-size/--tile-overlap: {exc}", status=2) from None


def _run(args: argparse.Namespace) -> int:
    from mobilesam_batch.folder import OutputError
    from mobilesam_batch.inputs import InputError, open_source

    from .cli import CommandError
    from .transforms import max_upscale_option
    from .weights import default_max_upscale

    channels = _numbers(args.channels, int, None, "--channels")
    limits = _numbers(args.contrast_limits, float, 2, "--contrast-limits")
    percentiles = _numbers(args.percentiles, float, 2, "--percentiles") or (0.5, 99.5)
    if limits is not None and args.percentiles is not None:
        raise CommandError("give --contrast-limits or --percentiles, not both", status=2)
    # checked before anything is written: a store made with them could not be reused
    if not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise CommandError(
            f"--percentiles {args.percentiles}: give LO,HI with 0 <= LO < HI <= 100", status=2
        )
    if args.batch_size is not None and args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}", status=2)
    try:  # the model's default unless given, as mobilesam-everything resolves it
        args.max_upscale = max_upscale_option(args.max_upscale, default_max_upscale(args.model))
    except ValueError as exc:
        raise CommandError(f"--max-upscale {exc}", status=2) from None
    if args.weights is not None and not args.weights.is_file():
        raise CommandError(f"--weights {args.weights}: no such file", status=2)
    try:
        source = open_source(args.input, args.axes)
    except InputError as exc:
        raise CommandError(str(exc)) from None
    try:
        with source:
            return _embed(args, source, channels, limits, percentiles)
    except InputError as exc:  # a plane that cannot be read (a truncated file)
        raise CommandError(str(exc)) from None
    except OutputError as exc:  # another run writes the store, or no room for its lock
        raise CommandError(str(exc)) from None


def _in_use(store: Path):
    """The refusal when another ``mobilesam embed`` writes ``store``."""

    def message(who: str) -> str:
        return (
            f"{store}: another mobilesam embed run is writing this store ({who}); wait for "
            "it to finish, then run this command again to add what it lacks"
        )

    return message


def _embed(args, source, channels, limits, percentiles) -> int:
    """Embed ``source``'s planes into the store at ``args.output``, holding its lock
    (``<store>.lock`` beside it) so that two runs never write one store."""
    from tqdm.auto import tqdm

    from mobilesam_batch.embeddings import source_planes
    from mobilesam_batch.folder import held

    from . import build
    from . import weights as _w
    from .cli import CommandError
    from .predictor import Predictor
    from .store import StoreError, embed_planes, open_for

    # read as mobilesam-everything reads it, so that its --embeddings accepts the store
    planes = source_planes(source, channels, limits)
    grid = _grid(args, planes.shape_hw)
    checkpoint = args.weights if args.weights is not None else _w.fetch(args.model)
    model = build.load_model(args.model, checkpoint, device=args.device)
    predictor = Predictor(model, precision=args.precision, max_upscale=args.max_upscale)
    output = Path(args.output)
    try:  # the store's folder is made, as mobilesam-everything makes its output folder
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(
            f"{args.output}: cannot make the folder {str(output.parent)!r} to hold it "
            f"({exc.strerror or exc})"
        ) from None
    lock = output.with_name(output.name + ".lock")
    # no folder to hold the lock in: open_for says what is wrong with the path
    hold = held(lock, _in_use(output)) if output.parent.is_dir() else nullcontext()
    try:
        with hold:
            store = open_for(output, planes, predictor, percentiles, grid)
            total, unit = planes.n_planes, "plane"
            if grid is not None:
                total, unit = planes.n_planes * len(grid), "tile"
            with tqdm(total=total, unit=unit, desc="embed", disable=args.quiet) as bar:
                report = embed_planes(
                    store, planes, predictor, percentiles=percentiles,
                    batch_size=args.batch_size, progress=bar.update,
                )  # fmt: skip
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:  # e.g. no room to create the store
        raise CommandError(f"{args.output}: {exc}") from None
    damaged = f", {len(report.damaged)} damaged planes recomputed" if report.damaged else ""
    what = "planes" if grid is None else f"tiles ({len(grid)} per plane)"
    print(
        f"{args.output}: {report.computed} {what} embedded, {report.skipped} already "
        f"done{damaged} ({predictor.describe()})"
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``embed`` on the ``mobilesam`` command line."""
    p = subparsers.add_parser(
        "embed",
        help="precompute an image's embeddings into a zarr store (resumable)",
        description=(
            "Compute the image embedding of every plane of INPUT (TIFF, PNG/JPEG, npy, "
            "zarr or OME-Zarr) into a zarr store, one chunk per plane, with the model, "
            "the normalisation and a fingerprint of the image in its attributes. Rerun "
            "to resume: finished planes are kept. The prompt widget and PromptSession "
            "load the store's planes instead of computing them."
        ),
    )
    p.add_argument("input", type=Path, metavar="INPUT", help="image file or zarr store")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="STORE",
                   help="the embedding store (a folder, e.g. image.embeddings.zarr)")  # fmt: skip
    p.add_argument("--model", default="vit_t", help="model name [vit_t]")
    p.add_argument("--weights", type=Path, metavar="PATH",
                   help="checkpoint file [the registry's weights, downloaded once]")  # fmt: skip
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (CUDA when available) [auto]")  # fmt: skip
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"],
                   help="image encoder precision [fp32]")  # fmt: skip
    p.add_argument("--axes", metavar="AXES",
                   help="axes of INPUT, e.g. ZYX, TZYX, ZCYX, YXC (C: channels; other "
                   "letters: planes) [from the file's metadata or its shape]")  # fmt: skip
    p.add_argument("--channels", metavar="I[,J[,K]]",
                   help="channels shown to the model as R[,G[,B]] [the first three]")  # fmt: skip
    p.add_argument("--contrast-limits", metavar="LO,HI",
                   help="fixed intensity range, as the napari layer's contrast limits "
                   "[per-plane percentiles]")  # fmt: skip
    p.add_argument("--percentiles", metavar="LO,HI",
                   help="percentiles of each plane used as contrast limits [0.5,99.5, "
                   "what the prompt widget uses]")  # fmt: skip
    p.add_argument("--max-upscale", metavar="X|none",
                   help="enlarge planes smaller than the model's input at most X times, as "
                   "mobilesam-everything --max-upscale X does; none: to the input size "
                   "[the model's default, as mobilesam-everything]")  # fmt: skip
    p.add_argument("--batch-size", type=int,
                   help="planes (tiles) per encoder call [GPU 8, CPU 1]")  # fmt: skip
    p.add_argument("--tile-threshold", type=int, default=DEFAULT_TILE_THRESHOLD, metavar="PX",
                   help="planes whose longer side exceeds PX are embedded as tiles, as the "
                   f"prompt widget does; 0: never [{DEFAULT_TILE_THRESHOLD}]")  # fmt: skip
    p.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE, metavar="PX",
                   help=f"side of a tile [{DEFAULT_TILE_SIZE}]")  # fmt: skip
    p.add_argument("--tile-overlap", type=int, default=DEFAULT_TILE_OVERLAP, metavar="PX",
                   help=f"least overlap of neighbours [{DEFAULT_TILE_OVERLAP}]")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
