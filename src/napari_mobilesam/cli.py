"""The ``mobilesam`` command line.

Subcommands::

    mobilesam weights list                   known models, sizes, licenses, cache state
    mobilesam weights download [NAME ...]    download into the cache (default: vit_t)
    mobilesam weights path NAME              print where a model's file is cached
    mobilesam export-onnx -o DIR [--quantize int8]   single-file ONNX encoder and decoder
    mobilesam embed INPUT -o STORE.zarr      precompute embeddings into a zarr store

Each command group is added by one ``_add_<group>_parser(subparsers)`` function
that registers its subparser and sets ``func`` (called with the parsed arguments,
returning the exit status); add new groups (e.g. ``export-onnx``) the same way and
list them in :data:`_GROUPS`. Keep torch out of this module's imports: import it
inside the handler that needs it, so that ``mobilesam weights list`` stays fast.

Errors are reported as one message on stderr and a non-zero exit status (1 for a
failure, 2 for bad usage), without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__
from . import weights as _w
from .embed_command import add_parser as add_embed_parser
from .synthetic_command import add_parser as add_synthetic_parser

PROG = "mobilesam"


class CommandError(Exception):
    """A command failed; the message is printed and the exit status is ``status``.

    Parameters
    ----------
    message : str
        Shown on stderr after ``mobilesam: error:``.
    status : int
        Exit status (1: failure, 2: bad usage).
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _err(message: str) -> None:
    """Print an error message on stderr."""
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _info(name: str) -> _w.ModelInfo:
    """Registry lookup turning an unknown name into a usage error."""
    try:
        return _w.get_model_info(name)
    except ValueError as exc:
        raise CommandError(str(exc), status=2) from None


# ---------------------------------------------------------------------------- weights


def _weights_list(args: argparse.Namespace) -> int:
    """``mobilesam weights list``: a table of the registry and the cache state."""
    folder = _w.cache_dir()
    rows = [("name", "file", "size (MB)", "license", "cached", "path")]
    states = {"ok": "yes", "mismatch": "corrupt", "partial": "partial", "missing": "no"}
    for info in _w.REGISTRY.values():
        path = _w.local_path(info)
        cached = states[_w.cache_state(info, path)]
        cached = f"{cached} (bundled)" if info.bundled else cached
        rows.append(
            (info.name, info.filename, f"{info.size / 1e6:.1f}", info.license, cached, str(path))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    right = {2}  # numeric column
    for row in rows:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row[:-1], widths, strict=True))
        ]
        print("  ".join([*cells, row[-1]]))
    print(f"\ncache folder: {folder}  (set {_w.CACHE_ENV} to change it)")
    if any(row[4].startswith("corrupt") for row in rows):
        print(f"corrupt: the file's sha256 is not the published one; `{PROG} weights download "
              "NAME` replaces it")  # fmt: skip
    return 0


def _weights_download(args: argparse.Namespace) -> int:
    """``mobilesam weights download``: fetch each named model into the cache."""
    names = args.names or ["vit_t"]
    infos = [_info(n) for n in names]  # check every name before downloading anything
    failed = 0
    for info in infos:
        dest = _w.local_path(info)
        state = _w.cache_state(info, dest)
        if info.bundled:  # nothing to download: fetch() verifies it or says to reinstall
            state = "ok"
        if not args.quiet:
            if info.bundled:
                print(f"{info.name}: ships with napari-mobilesam", file=sys.stderr)
            elif state == "ok":
                print(f"{info.name}: already in the cache (sha256 checked)", file=sys.stderr)
            else:
                if state == "mismatch":
                    print(f"{info.name}: {dest} has the wrong sha256 (damaged or replaced); "
                          "downloading it again", file=sys.stderr)  # fmt: skip
                url = _w.download_url(info)
                size = info.size / 1e6
                print(f"{info.name}: downloading {size:.1f} MB from {url}", file=sys.stderr)
        try:
            if state == "mismatch":  # asked to download: replace the damaged file
                path = _w.download(info, dest, progress=not args.quiet)
            else:
                path = _w.fetch(info.name, progress=not args.quiet)
        except _w.WeightsError as exc:
            _err(str(exc))
            failed += 1
            continue
        print(path)
    if failed and len(infos) > 1:
        raise CommandError(f"{failed} of {len(infos)} downloads failed")
    return 1 if failed else 0


def _weights_path(args: argparse.Namespace) -> int:
    """``mobilesam weights path``: print the cache path of a model's file."""
    info = _info(args.name)
    path = _w.local_path(info)
    state = "ok" if args.no_check else _w.cache_state(info, path)
    if state != "ok":
        what = {
            "missing": "does not exist yet",
            "partial": "is incomplete",
            "mismatch": "has the wrong sha256 (damaged or replaced)",
        }[state]
        raise CommandError(
            f"the weights of {info.name!r} are not in the cache: {path} {what}; "
            f"run `{PROG} weights download {info.name}`, or pass --no-check"
        )
    print(path)
    return 0


def _add_weights_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``mobilesam weights {list,download,path}``."""
    names = ", ".join(_w.REGISTRY)
    p = subparsers.add_parser(
        "weights",
        help="list, download and locate model weights",
        description=(
            "Model weights. The cache folder is $MOBILESAM_CACHE, else the checkout's "
            "weights/ folder, else the user cache; $MOBILESAM_WEIGHTS_MIRROR downloads "
            "from <mirror>/<filename> instead of the registry URLs."
        ),
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    p_list = sub.add_parser("list", help="known models and whether they are cached")
    p_list.set_defaults(func=_weights_list)

    p_dl = sub.add_parser("download", help="download weights into the cache")
    p_dl.add_argument(
        "names", nargs="*", metavar="NAME", help=f"model names ({names}); default: vit_t"
    )
    p_dl.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")
    p_dl.set_defaults(func=_weights_download)

    p_path = sub.add_parser("path", help="print the cache path of a model's weights file")
    p_path.add_argument("name", metavar="NAME", help=f"model name ({names})")
    p_path.add_argument(
        "--no-check",
        action="store_true",
        help="print the path even if the file is not downloaded yet",
    )
    p_path.set_defaults(func=_weights_path)


# ------------------------------------------------------------------------- export-onnx


def _export_onnx(args: argparse.Namespace) -> int:
    from .build import CheckpointError, load_model

    _info(args.model)
    if args.weights is not None and not args.weights.is_file():
        raise CommandError(f"--weights {args.weights}: no such file", status=2)
    try:
        from .runtime import DEFAULT_OPSET, export_onnx
    except ImportError as exc:
        raise CommandError(str(exc)) from None
    checkpoint = args.weights if args.weights is not None else _w.fetch(args.model)
    try:
        model = load_model(args.model, checkpoint, device="cpu", optimize=False)
    except CheckpointError as exc:
        raise CommandError(str(exc)) from None
    source = {"checkpoint": str(checkpoint), "sha256": _w.sha256_file(checkpoint)}
    try:
        meta = export_onnx(
            model,
            args.output,
            opset=DEFAULT_OPSET if args.opset is None else args.opset,
            quantize=args.quantize,
            source=source,
        )
    except ImportError as exc:
        raise CommandError(str(exc)) from None
    for name in sorted(meta.get("files", {})):
        print(args.output / name)
    return 0


def _add_export_onnx_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``mobilesam export-onnx``."""
    from pathlib import Path

    p = subparsers.add_parser(
        "export-onnx",
        help="export the encoder and decoder to single-file ONNX models",
        description=(
            "Write encoder.onnx (preprocessed 1x3x1024x1024 image -> 1x256x64x64 embedding), "
            "decoder.onnx (embedding + points/labels [+ box corners labelled 2, 3] [+ mask] "
            "-> low-res logits and IoU of the four mask tokens, batched) and "
            "mobilesam_onnx.json (inputs, outputs, source checkpoint sha256)."
        ),
    )
    p.add_argument("--model", default="vit_t", help="model name [vit_t]")
    p.add_argument(
        "--weights",
        type=Path,
        metavar="PATH",
        help="checkpoint file (default: the registry weights, downloaded once)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="also write int8 dynamically quantised models (*.int8.onnx)",
    )
    p.add_argument("--opset", type=int, help="ONNX opset [20: the first with Gelu]")  # fmt: skip
    p.set_defaults(func=_export_onnx)


#: Functions that each register one command group.
_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_weights_parser,
    _add_export_onnx_parser,
    add_synthetic_parser,
    add_embed_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mobilesam`` with every command group.

    Returns
    -------
    argparse.ArgumentParser
        Parsed arguments carry ``func(args) -> int``.
    """
    parser = argparse.ArgumentParser(
        prog=PROG, description="MobileSAM / Segment Anything tools for napari-mobilesam."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _GROUPS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mobilesam`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 1 on failure, 2 on bad usage, 130 on Ctrl-C.
    """
    return run_command(build_parser(), argv, PROG, lambda: (_w.WeightsError, ValueError))


def run_command(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    prog: str,
    failures: Callable[[], tuple[type[BaseException], ...]] = tuple,
    interrupted: str = "interrupted",
) -> int:
    """Parse ``argv`` and run the chosen subcommand (``args.func(args)``), as a CLI does.

    Errors become ``<prog>: error: <message>`` on stderr and an exit status:
    :class:`CommandError` its own, the exceptions ``failures()`` names 1, Ctrl-C 130
    (with ``interrupted`` as the message); argparse's own exits (``--help``, usage
    errors) keep theirs.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        Its subcommands set ``func``.
    argv : sequence of str or None
        Arguments without the program name; None: ``sys.argv[1:]``.
    prog : str
        The program name in error messages.
    failures : callable
        Returns the expected failure types; called only after parsing, so that
        ``--help`` needs no heavy imports.
    interrupted : str
        The message on Ctrl-C.

    Returns
    -------
    int
        The exit status.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse printed already
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    expected = failures()
    try:
        return args.func(args)
    except CommandError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.status
    except expected as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: error: {interrupted}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
