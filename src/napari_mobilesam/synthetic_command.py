"""``mobilesam synthetic``: write a seeded dataset of synthetic cells with ground truth.

Examples::

    mobilesam synthetic cells/ -n 20                      # 20 x (512 x 512 uint16 + labels)
    mobilesam synthetic stacks/ -n 2 --kind 3d            # (24, 256, 256) stacks
    mobilesam synthetic movies/ -n 1 --kind timeseries    # 20 frames, tracks CSV beside
    mobilesam synthetic train/ -n 100 --layout folders    # images/ + labels/
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser"]


def _shape(args: argparse.Namespace) -> tuple[int, ...] | None:
    """The generator's ``shape`` from --size / --planes (None: its default)."""
    if args.size is None and args.planes is None:
        return None
    if args.kind == "3d":
        return (args.planes or 24, args.size or 256, args.size or 256)
    if args.planes is not None:
        raise ValueError(f"--planes is for --kind 3d, not {args.kind}")
    return (args.size, args.size)


def _run(args: argparse.Namespace) -> int:
    from .synthetic import write_dataset

    kwargs: dict = {}
    shape = _shape(args)
    if shape is not None:
        kwargs["shape"] = shape
    if args.frames is not None:
        if args.kind != "timeseries":
            raise ValueError(f"--frames is for --kind timeseries, not {args.kind}")
        kwargs["n_frames"] = args.frames
    if args.radius is not None:
        kwargs["radius"] = tuple(args.radius)
    if args.dtype is not None:
        kwargs["dtype"] = args.dtype
    pairs = write_dataset(
        args.out, args.n, seed=args.seed, kind=args.kind, layout=args.layout,
        prefix=args.prefix, **kwargs,
    )  # fmt: skip
    print(f"wrote {len(pairs)} image/label pairs to {args.out}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``synthetic`` on the ``mobilesam`` command line."""
    p = subparsers.add_parser(
        "synthetic",
        help="write synthetic fluorescence images of cells with their instance labels",
        description=(
            "Write seeded synthetic fluorescence images of cells (round and elongated, "
            "touching, textured, unevenly lit, noisy) with exact instance labels, as TIFF "
            "pairs: NAME.tif + NAME_labels.tif (or images/ + labels/)."
        ),
    )
    p.add_argument("out", type=Path, help="folder to write (created)")
    p.add_argument("-n", type=int, default=10, help="number of samples (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=("2d", "3d", "timeseries"), default="2d")
    p.add_argument("--layout", choices=("suffix", "folders"), default="suffix")
    p.add_argument("--size", type=int, help="image side in pixels")
    p.add_argument("--planes", type=int, help="z planes of a 3d stack")
    p.add_argument("--frames", type=int, help="frames of a time series")
    p.add_argument("--radius", type=float, nargs=2, metavar=("MIN", "MAX"), help="cell radius")
    p.add_argument("--dtype", choices=("uint8", "uint16"))
    p.add_argument("--prefix", default="cells", help="file name prefix (default cells)")
    p.set_defaults(func=_run)
