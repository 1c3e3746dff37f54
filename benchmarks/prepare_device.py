"""Prepare the files a GPU machine needs, then run ``benchmarks/device.sh`` there.

``../shared`` need not exist on the GPU machine, so this copies a subset of the
golden files (about 55 MB, small enough to copy with the checkout) into
the git-ignored ``.device/golden``:

- ``mobile_sam_random.pt`` and ``images/public_*.png``;
- ``public_amg0_photo.json`` and ``public_amg1_micro.json`` (one case without and one
  with crop layers and ``min_mask_region_area``);
- ``sub_cases.npz``: the predictor cases of ``public_cases.npz`` whose second key
  part is one of :data:`CASES` (features, one multimask point case, a box, a point and
  box, the batched boxes), under the golden file's key names;
- ``.device/original/segment_anything``: the original code (pure Python) from
  ``.original`` when ``.ci/run`` installed it there, so that ``gpu.py`` times it on
  the GPU too (that machine has its own torchvision).

Usage (here, then on the GPU machine, in a copy of the checkout that includes ``.device``)::

    python benchmarks/prepare_device.py [--golden ../shared/golden] [--out .device/golden]
    bash benchmarks/device.sh
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = ("features", "input_size", "p0_mm1", "p3_mm0", "p4_mm1", "batch_boxes")
AMG = ("public_amg0_photo.json", "public_amg1_micro.json")


def prepare(golden: Path, out: Path) -> list[Path]:
    """Copy the subset from ``golden`` into ``out``; returns the files written.

    Raises
    ------
    FileNotFoundError
        A golden file is missing (the message names it).
    """
    needed = [golden / "mobile_sam_random.pt", golden / "public_cases.npz",
              *(golden / name for name in AMG)]  # fmt: skip
    images = sorted((golden / "images").glob("public_*.png"))
    missing = [str(p) for p in needed if not p.is_file()] or ([] if images else [
        str(golden / "images" / "public_*.png")])  # fmt: skip
    if missing:
        raise FileNotFoundError(f"golden files not found: {', '.join(missing)}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    written = []
    for src in [needed[0], *needed[2:]]:
        shutil.copyfile(src, out / src.name)
        written.append(out / src.name)
    for src in images:
        shutil.copyfile(src, out / "images" / src.name)
        written.append(out / "images" / src.name)
    with np.load(golden / "public_cases.npz") as cases:
        keep = {k: cases[k] for k in cases.files if k.split("/")[1] in CASES}
    tmp = out / "sub_cases.tmp.npz"
    np.savez_compressed(tmp, **keep)
    tmp.replace(out / "sub_cases.npz")
    written.append(out / "sub_cases.npz")
    return written


def copy_original(src: Path, out: Path) -> list[Path]:
    """Copy the ``segment_anything`` package from ``src`` (``.original``) into ``out``.

    Returns the files written; none when ``src`` does not hold it.
    """
    package = src / "segment_anything"
    if not package.is_dir():
        return []
    shutil.rmtree(out / "segment_anything", ignore_errors=True)
    shutil.copytree(package, out / "segment_anything",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return [f for f in (out / "segment_anything").rglob("*") if f.is_file()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", type=Path, default=ROOT.parent / "shared" / "golden")
    parser.add_argument("--out", type=Path, default=ROOT / ".device" / "golden")
    args = parser.parse_args(argv)
    try:
        files = prepare(args.golden, args.out)
    except FileNotFoundError as exc:
        print(f"prepare_device: {exc}", file=sys.stderr)
        return 1
    original = copy_original(ROOT / ".original", args.out.parent / "original")
    if not original:
        print("prepare_device: no .original/segment_anything (see benchmarks/original.py); "
              "the GPU run will not time the original code", file=sys.stderr)  # fmt: skip
    files += original
    size = sum(f.stat().st_size for f in files) / 2**20
    print(f"{len(files)} files, {size:.0f} MiB in {args.out}; on the device machine: "
          "bash benchmarks/device.sh (carry .device)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
