"""The model registry: which weights files exist, where they come from, what they are.

``weights/registry.json`` (in a source checkout; shipped in the wheel as
``napari_mobilesam/_data/registry.json``) maps each model name to its file name,
download URL, sha256, size in bytes, license and a description. Three optional keys:

``architecture``
    The network the weights are for (a name of :data:`napari_mobilesam.build.MODEL_CONFIGS`);
    the model's own name when absent.
``bundled``
    True for weights shipped with the package (``weights/<filename>`` in a checkout,
    ``napari_mobilesam/_data/<filename>`` in the wheel): never downloaded, ``url`` empty.
``max_upscale``
    How many times at most an image smaller than the model's input is enlarged by
    default (a number >= 1): the scale the model was trained at. A model trained on
    cells of a given size in pixels finds them best at about that size, where SAM's
    own preprocessing enlarges a 256 px plane 4 times. Absent: enlarge to the input
    size, as SAM does. The command-line tools and the widgets use it unless told
    otherwise (``--max-upscale none``).

Importing this module reads the registry file and nothing else (no torch).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHECKOUT_WEIGHTS", "PACKAGE_DATA", "ModelInfo", "bundled_path"]

#: Data shipped inside the wheel (pyproject force-include): registry, bundled weights.
PACKAGE_DATA = Path(__file__).resolve().parent / "_data"
#: Registry shipped inside the wheel.
_PACKAGED_REGISTRY = PACKAGE_DATA / "registry.json"
#: The ``weights/`` folder of a source checkout: registry, bundled weights, local cache.
CHECKOUT_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_REQUIRED_KEYS = ("filename", "url", "sha256", "size", "license", "description")


@dataclass(frozen=True)
class ModelInfo:
    """One weights file of the registry.

    Attributes
    ----------
    name : str
        Registry name (``vit_t``, ``vit_b``, ``vit_l``, ``vit_h``,
        ``vit_t_synthetic_cells``).
    filename : str
        File name in the cache, as published (e.g. ``mobile_sam.pt``).
    url : str
        Canonical download URL ("" for bundled weights).
    sha256 : str
        Lower-case hex sha256 of the file.
    size : int
        File size in bytes.
    license : str
        SPDX license identifier of the weights.
    description : str
        One line for people.
    source : str
        Web page of the project that publishes the weights ("" if unknown).
    architecture : str
        Network the weights are for ("" means the same as ``name``).
    bundled : bool
        Shipped with the package, never downloaded.
    max_upscale : float or None
        The default upscale limit for small images (see the module's docstring); None:
        none (enlarge to the model's input size).
    """

    name: str
    filename: str
    url: str
    sha256: str
    size: int
    license: str
    description: str
    source: str = ""
    architecture: str = ""
    bundled: bool = False
    max_upscale: float | None = None

    @property
    def network(self) -> str:
        """The architecture's name (``architecture`` or else ``name``)."""
        return self.architecture or self.name


def bundled_path(info: ModelInfo) -> Path:
    """Where a bundled weights file lies: the installed package's data, else the checkout.

    Returns
    -------
    pathlib.Path
        The first of ``napari_mobilesam/_data/<filename>`` and
        ``weights/<filename>`` that exists (the first when neither does).
    """
    candidates = [PACKAGE_DATA / info.filename, CHECKOUT_WEIGHTS / info.filename]
    return next((p for p in candidates if p.is_file()), candidates[0])


def _load_registry(paths: list[Path] | None = None) -> dict[str, ModelInfo]:
    """Read the first registry file that exists among ``paths``.

    Parameters
    ----------
    paths : list of pathlib.Path, optional
        Candidates in order; by default the packaged copy, then the checkout's.

    Returns
    -------
    dict of str to ModelInfo
        In file order.

    Raises
    ------
    FileNotFoundError
        None of the candidates exists (a broken installation).
    ValueError
        The file is not valid JSON or an entry is malformed; names file and entry.
    """
    if paths is None:
        paths = [_PACKAGED_REGISTRY, CHECKOUT_WEIGHTS / "registry.json"]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            "model registry not found; looked in: "
            + ", ".join(str(p) for p in paths)
            + " (reinstall napari-mobilesam)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"model registry {str(path)!r} is not valid JSON: {exc}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"model registry {str(path)!r} has no 'models' mapping")
    return {name: _parse_entry(path, name, entry) for name, entry in models.items()}


def _parse_entry(path: Path, name: str, entry: object) -> ModelInfo:
    """Check one registry entry and turn it into a :class:`ModelInfo`."""
    where = f"model registry {str(path)!r}, entry {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    size = entry["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"{where}: 'size' must be a positive integer, got {size!r}")
    if not isinstance(entry["sha256"], str) or not _SHA256_RE.fullmatch(entry["sha256"]):
        raise ValueError(
            f"{where}: 'sha256' must be 64 lower-case hex digits, got {entry['sha256']!r}"
        )
    filename = entry["filename"]
    if not isinstance(filename, str) or not filename or Path(filename).name != filename:
        raise ValueError(f"{where}: 'filename' must be a bare file name, got {filename!r}")
    bundled = entry.get("bundled", False)
    if not isinstance(bundled, bool):
        raise ValueError(f"{where}: 'bundled' must be true or false, got {bundled!r}")
    architecture = entry.get("architecture", "")
    if not isinstance(architecture, str):
        raise ValueError(f"{where}: 'architecture' must be a model name, got {architecture!r}")
    upscale = entry.get("max_upscale")
    number = isinstance(upscale, (int, float)) and not isinstance(upscale, bool)
    if upscale is not None and not (number and 1 <= upscale < float("inf")):
        raise ValueError(f"{where}: 'max_upscale' must be a finite number >= 1, got {upscale!r}")
    return ModelInfo(
        name=name,
        filename=filename,
        url=str(entry["url"]),
        sha256=entry["sha256"],
        size=size,
        license=str(entry["license"]),
        description=str(entry["description"]),
        source=str(entry.get("source", "")),
        architecture=architecture,
        bundled=bundled,
        max_upscale=None if upscale is None else float(upscale),
    )
