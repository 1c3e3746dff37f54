"""The ``mobilesam-everything`` command line.

::

    mobilesam-everything INPUT... -o OUTDIR [--model vit_t | --weights PATH]
        [--device auto] [--points-per-side 32 ...] [--channels 0,1] [--axes TZYX]
        [--coco] [--csv] [--zarr] [--link z|t|zt] [--scheduler local --workers 2]

The MaskGenerator parameters are flags (``--points-per-side``, ``--nms``, ...,
declared in :mod:`.flags`); flags left out keep the library defaults. Exit status: 0
when every input is done or already up to date, 1 when some input failed (each is
named with its reason) or the run could not go on (output folder unusable, full or
held by another run; no dask worker), 2 for bad usage, 130 when interrupted (Ctrl-C
or SIGTERM, at any moment; rerun to resume).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .flags import add_generator_flags

PROG = "mobilesam-everything"

EPILOG = """\
outputs, per input <stem>:
  <stem>_labels.tif   label image, same plane layout as the input (e.g. (Z, Y, X)),
                      uint16 (uint32 when a plane has more than 65535 objects);
                      ids 1..N in each plane by decreasing predicted IoU
  <stem>_labels.json  provenance: tool version, model and weights sha256, all
                      parameters, input size and mtime, per-plane counts and times
  <stem>_coco.json    with --coco: COCO annotations, RLE per object
  <stem>_objects.csv  with --csv: one row per object
  <stem>_labels.zarr  with --zarr: OME-Zarr label image, chunked per plane
  <stem>_tracks.csv   with --link t or zt: one row per track per time point
                      (track_id, t, [z,] y, x, ..., parent_track_id)

--link z|t|zt links the planes of a stack: one id per 3D object through Z, one
track id per cell through T (divisions recorded), or 3D objects tracked through T.

A rerun skips inputs whose outputs are up to date and finishes the rest. Outputs
another input wrote (same file name from another folder), and outputs edited by
hand since they were written, are never replaced silently: see --on-clash. One
run at a time writes to an output folder.

examples:
  mobilesam-everything images/ -o labels/
  mobilesam-everything 'plates/**/*.tif' -o labels/ --channels 1 --csv
  mobilesam-everything stack.ome.tif -o labels/ --scheduler local --workers 4
  mobilesam-everything data/ -o labels/ --scheduler tcp://10.0.0.5:8786
"""


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


def _numbers(text: str, kind, count: int | None, flag: str) -> tuple:
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated {kind.__name__}s") from None
    if count is not None and len(values) != count:
        raise UsageError(f"{flag} {text!r}: expected {count} values, got {len(values)}")
    return values


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    """The argument parser and the names of the MaskGenerator parameters it exposes."""
    from napari_mobilesam.weights import REGISTRY

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment everything in images, folders and stacks with MobileSAM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders, glob patterns or zarr arrays")  # fmt: skip
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR",
                        help="output folder (created if needed)")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="vit_t", choices=sorted(REGISTRY),
                       help="model architecture; its weights are downloaded when --weights "
                       "is not given [vit_t]")  # fmt: skip
    model.add_argument(
        "--weights",
        type=Path,
        metavar="PATH",
        help="checkpoint file in the official format (e.g. mobile_sam.pt)",
    )
    model.add_argument("--backend", default="torch", choices=["torch", "onnx", "auto"],
                       help="onnx: onnxruntime, models exported on first use; auto: the "
                       "fastest, which is torch in float32 (onnxruntime's float32 encoder is "
                       "no faster on CPUs) [torch]")  # fmt: skip
    model.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available) [auto]"
    )
    model.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"],
                       help="image encoder precision; auto: bf16 on GPUs and on CPUs with bf16 "
                       "units (1.5-2x faster; masks mean IoU 0.998 vs fp32), else fp32 "
                       "[fp32: the reference's numbers]")  # fmt: skip
    model.add_argument("--embeddings", metavar="STORE",
                       help="an embedding store of the one INPUT (made by `mobilesam embed` "
                       "with the same model, --axes, --channels and --contrast-limits or "
                       "--percentiles): checked first, its planes are not embedded again "
                       "(labels unchanged) [embed every plane]")  # fmt: skip
    model.add_argument("--threads", type=int, metavar="N",
                       help="exactly N torch threads per process [all cores, one per "
                       "core other processes leave free; cores / workers with --scheduler "
                       "local]")  # fmt: skip

    names = add_generator_flags(parser)

    image = parser.add_argument_group("image")
    image.add_argument(
        "--axes",
        metavar="AXES",
        help="axes of the inputs, e.g. ZYX, TZYX, ZCYX, YXC (C: channels; "
        "other letters: planes) [from TIFF/OME metadata or the shape]",
    )
    image.add_argument("--channels", metavar="I[,J[,K]]",
                       help="channels shown to the model as R[,G[,B]]; needed for 2 or 5+ "
                       "channels [gray: 0; RGB: 0,1,2]")  # fmt: skip
    image.add_argument(
        "--contrast-limits",
        metavar="LO,HI",
        help="fixed intensity range for every plane [per-plane percentiles]",
    )
    image.add_argument(
        "--percentiles",
        metavar="LO,HI",
        default="0.5,99.5",
        help="percentiles used as contrast limits [0.5,99.5]",
    )
    image.add_argument("--max-upscale", metavar="X|none",
                       help="enlarge a plane smaller than the model's 1024 px input at most X "
                       "times, padding the rest with its background, so small planes' objects "
                       "keep the size the model knows; none: enlarge to 1024 px, as SAM does "
                       "[the model's default: 2 for vit_t_synthetic_cells, none for the "
                       "others]")  # fmt: skip

    out = parser.add_argument_group("outputs")
    out.add_argument("--coco", action="store_true", help="also write <stem>_coco.json")
    out.add_argument("--csv", action="store_true", help="also write <stem>_objects.csv")
    out.add_argument(
        "--zarr",
        action="store_true",
        help="also write <stem>_labels.zarr (OME-Zarr, for very large stacks)",
    )

    link = parser.add_argument_group("linking (stacks)")
    link.add_argument("--link", choices=["z", "t", "zt"],
                      help="link the planes' objects: z: one id per 3D object through Z; t: one "
                      "track id per cell through T, divisions recorded, <stem>_tracks.csv; zt: "
                      "3D objects tracked through T (TZYX) [off: ids per plane]")  # fmt: skip
    link.add_argument("--link-iou", type=float, metavar="X",
                      help="objects of neighbouring planes are one object when their IoU is at "
                      "least this [0.5]")  # fmt: skip
    link.add_argument("--link-gap", type=int, metavar="N",
                      help="planes an object may be missed in and keep its id [1]")  # fmt: skip
    link.add_argument("--link-min-planes", type=int, metavar="N",
                      help="--link z: leave out 3D objects seen in fewer than N planes "
                      "(fragments, out-of-focus light) [1: keep all]")  # fmt: skip
    link.add_argument("--link-extend", action="store_true",
                      help="--link z or zt: prompt each 3D object, with its box, into the "
                      "planes next to it where segment-everything missed it (its faint end "
                      "sections, a missed middle plane); runs the model again on up to 2 x "
                      "the planes [off]")  # fmt: skip

    run = parser.add_argument_group("run")
    run.add_argument("-r", "--recursive", action="store_true", help="descend into subfolders")
    run.add_argument(
        "--overwrite", action="store_true", help="recompute inputs whose outputs are up to date"
    )
    run.add_argument("--on-clash", default="refuse", choices=["refuse", "suffix", "overwrite"],
                     help="when an input's outputs would replace those another input wrote "
                     "(e.g. plate1/well.png, then plate2/well.png), or its own outputs edited "
                     "since: refuse (fail that input, naming the file), suffix (write "
                     "well-2_labels.tif ...) or overwrite [refuse]")  # fmt: skip
    run.add_argument(
        "--dry-run", action="store_true", help="list what would be done, without loading the model"
    )
    run.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar and no per-file lines; failures and the summary only",
    )
    run.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="'local' for a LocalCluster on this machine, or a dask scheduler "
        "address (tcp://host:8786) [no dask: this process]",
    )
    run.add_argument("--workers", type=int, default=2, metavar="N",
                     help="worker processes with --scheduler local [2]")  # fmt: skip
    run.add_argument("--worker-timeout", type=float, default=60.0, metavar="S",
                     help="seconds to wait for a dask worker (at the start, or when all have "
                     "left) before stopping [60]")  # fmt: skip
    return parser, names


def _options(args: argparse.Namespace, names: list[str]):
    from napari_mobilesam.transforms import max_upscale_option
    from napari_mobilesam.weights import default_max_upscale

    from .segment import SegmentOptions

    generator = tuple(sorted((n, getattr(args, n)) for n in names if getattr(args, n) is not None))
    channels = None
    if args.channels is not None:
        channels = _numbers(args.channels, int, None, "--channels")
        if not 1 <= len(channels) <= 3:
            raise UsageError(f"--channels {args.channels!r}: give 1 to 3 channel indices")
    limits = None
    if args.contrast_limits is not None:
        limits = _numbers(args.contrast_limits, float, 2, "--contrast-limits")
        if not limits[0] <= limits[1]:
            raise UsageError(f"--contrast-limits {args.contrast_limits!r}: LO must be <= HI")
    percentiles = _numbers(args.percentiles, float, 2, "--percentiles")
    if not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise UsageError(f"--percentiles {args.percentiles!r}: need 0 <= LO < HI <= 100")
    try:  # the model's default unless given
        upscale = max_upscale_option(args.max_upscale, default_max_upscale(args.model))
    except ValueError as exc:
        raise UsageError(f"--max-upscale {exc}") from None
    return SegmentOptions(
        generator=generator, channels=channels, contrast_limits=limits, percentiles=percentiles,
        max_upscale=upscale,
    )  # fmt: skip


def _check_axes(axes: str | None) -> str | None:
    if axes is None:
        return None
    axes = axes.upper()
    if not re.fullmatch(r"[A-Z]+", axes) or "Y" not in axes or "X" not in axes:
        raise UsageError(f"--axes {axes!r}: letters only, including Y and X (e.g. ZYX)")
    if len(set(axes)) != len(axes):
        raise UsageError(f"--axes {axes!r}: each letter once")
    return axes


def _resolve_weights(args: argparse.Namespace, quiet: bool) -> Path:
    from napari_mobilesam.weights import WeightsError, fetch

    if args.weights is not None:
        if not args.weights.is_file():
            raise UsageError(f"--weights {args.weights}: no such file")
        return args.weights.resolve()
    try:
        return fetch(args.model, progress=not quiet)
    except WeightsError as exc:
        raise RuntimeError(str(exc)) from None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class _deferred_interrupts:
    """Ctrl-C or SIGTERM while this block runs is acted on when it ends.

    For imports: a KeyboardInterrupt raised inside the import machinery can be
    swallowed ("Exception ignored in ...", the run then goes on) or leave a module
    half imported. A press is remembered and raised once the imports are done.
    """

    def __enter__(self):
        self._pressed: list[int] = []
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, lambda s, f: self._pressed.append(s))
        return self

    def __exit__(self, exc_type, exc, tb):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._pressed and exc_type is None:
            raise KeyboardInterrupt
        return False


def _import_modules(cluster: bool) -> None:
    """Import what a run needs (torch, the model, readers, writers; dask for a cluster)."""
    import tqdm.auto  # noqa: F401

    import napari_mobilesam.build
    import napari_mobilesam.everything  # noqa: F401

    from . import runner  # noqa: F401

    if cluster:
        try:
            import distributed  # noqa: F401
        except ImportError:
            pass  # said when the cluster starts


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mobilesam-everything``; returns the exit status."""
    # SIGTERM (a cluster job's time limit, kill) stops the run as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the run began (imports, model loading) or after
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    # fewer page faults in the encoder (~10% faster); must precede importing torch
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    with _deferred_interrupts():  # (the flags' defaults come from the library: torch)
        parser, names = build_parser()
    args = parser.parse_args(argv)
    quiet = args.quiet

    def log(line: str) -> None:
        if line.startswith(("FAILED", "note", "waiting")):
            print(line, file=sys.stderr, flush=True)
        elif not quiet:
            print(line, flush=True)

    try:
        options = _options(args, names)
        axes = _check_axes(args.axes)
        if args.workers < 1:
            raise UsageError(f"--workers {args.workers}: must be at least 1")
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"--threads {args.threads}: must be at least 1")
        if not args.worker_timeout > 0:
            raise UsageError(f"--worker-timeout {args.worker_timeout:g}: must be positive")
        if args.precision not in ("fp32", "auto") and args.backend == "onnx":
            raise UsageError(f"--precision {args.precision} needs --backend torch")
        given = argv if argv is not None else sys.argv
        if args.scheduler is None and "--workers" in given:
            raise UsageError("--workers needs --scheduler local")
        if args.scheduler in (None, "local") and "--worker-timeout" in given:
            raise UsageError("--worker-timeout needs --scheduler ADDRESS")
        link = _link(args)
        embeddings = _embeddings(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    from .folder import OutputError, OutputFolder

    command = [PROG, *(argv if argv is not None else sys.argv[1:])]
    folder = None
    try:
        # the output folder is checked and held before the model loads: a bad -o, or
        # one another run is writing to, fails at once
        if not args.dry_run:
            folder = OutputFolder.open(args.output, command=command, log=log)
        with _deferred_interrupts():
            _import_modules(cluster=args.scheduler is not None)
        from .runner import run

        config = _config(args, options, axes, quiet, command, link, embeddings)
        if not config.dry_run and config.scheduler is None:  # what was chosen automatically
            from .segment import get_segmenter

            log(f"model: {get_segmenter(config.model, config.options).describe()}")
        summary = run(config, log=log, progress=not quiet, folder=folder)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (OutputError, RuntimeError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if folder is not None:
            folder.close()
    if summary.failed:
        print(f"{len(summary.failed)} input(s) failed:", file=sys.stderr)
        for path, reason in summary.failed:
            print(f"  {path}: {reason}", file=sys.stderr)
    if summary.stopped:
        print(f"{PROG}: error: {summary.stopped}", file=sys.stderr)
    print(f"{summary.line()} ({summary.planes} planes in {summary.seconds:.1f} s)", flush=True)
    return summary.exit_code


def _link(args: argparse.Namespace):
    """The ``--link`` options, or None; UsageError for bad values or strays."""
    from .link import LinkOptions

    if args.link is None:
        for flag, value in (("--link-iou", args.link_iou), ("--link-gap", args.link_gap),
                            ("--link-min-planes", args.link_min_planes)):  # fmt: skip
            if value is not None:
                raise UsageError(f"{flag} needs --link z|t|zt")
        if args.link_extend:
            raise UsageError("--link-extend needs --link z or zt")
        return None
    given = {"min_iou": args.link_iou, "max_gap": args.link_gap,
             "min_planes": args.link_min_planes, "extend": args.link_extend}  # fmt: skip
    try:
        return LinkOptions(args.link, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _embeddings(args: argparse.Namespace) -> str | None:
    """``--embeddings``: an existing folder, with one INPUT; UsageError otherwise."""
    if args.embeddings is None:
        return None
    if len(args.inputs) != 1:
        raise UsageError(f"--embeddings {args.embeddings}: an embedding store belongs to one "
                         f"image; give one INPUT, not {len(args.inputs)}")  # fmt: skip
    path = Path(args.embeddings)
    if not path.is_dir():
        raise UsageError(f"--embeddings {args.embeddings}: no such store (a folder made by "
                         "`mobilesam embed INPUT -o STORE`)")  # fmt: skip
    return str(path.resolve())


def _config(args, options, axes, quiet, command, link=None, embeddings=None):
    from .runner import RunConfig
    from .segment import ModelSpec, get_segmenter

    threads = args.threads
    if threads is None and args.scheduler == "local":
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    if args.dry_run:
        weights = args.weights.resolve() if args.weights else None
        if weights is None:
            from napari_mobilesam.weights import weight_path

            weights = weight_path(args.model)
        sha = _sha(weights) if weights.is_file() else "(weights not available yet)"
    else:
        weights = _resolve_weights(args, quiet)
        sha = _sha(weights)
    spec = ModelSpec(
        name=args.model, weights=str(weights), device=args.device, backend=args.backend,
        threads=threads, precision=args.precision,
    )  # fmt: skip
    if not args.dry_run:
        # load here (cached for the local run): a bad checkpoint, device or parameter
        # fails once, before any input is touched
        from napari_mobilesam.build import CheckpointError

        try:
            get_segmenter(spec, options)
        except CheckpointError:
            raise
        except (TypeError, ValueError) as exc:
            raise UsageError(str(exc)) from None
    return RunConfig(
        inputs=list(args.inputs), outdir=args.output, model=spec, model_sha256=sha,
        options=options, coco=args.coco, csv=args.csv, zarr=args.zarr, axes=axes,
        recursive=args.recursive, overwrite=args.overwrite, dry_run=args.dry_run,
        on_clash=args.on_clash, scheduler=args.scheduler, workers=args.workers,
        worker_timeout=args.worker_timeout, command=command, link=link, embeddings=embeddings,
    )  # fmt: skip


def _sha(path: Path) -> str:
    from napari_mobilesam.weights import file_sha256

    return file_sha256(path)  # once per file version: fetch() has usually hashed it


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
