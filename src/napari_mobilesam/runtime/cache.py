"""The cache of ONNX exports: :func:`get_onnx_backend` exports a model on first use.

Exports go into ``onnx_cache_dir() / "<sha256 of the checkpoint>[:16]-v<EXPORTER_VERSION>"``
(:func:`~napari_mobilesam.runtime.export.export_onnx`) and are reused while the folder's
``mobilesam_onnx.json`` matches the weights and the exporter version and its files are
intact. A model without a checkpoint file is keyed by a hash of its state dict.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from os import PathLike
from pathlib import Path

import torch

from ..model import Sam
from ..weights import cache_dir, sha256_file
from . import export
from .export import EXPORTER_VERSION, META_FILE, _check_quantize, model_files
from .onnx_backend import OnnxBackend, import_onnxruntime

__all__ = ["get_onnx_backend", "onnx_cache_dir"]


def _add_int8(out_dir: Path, meta: dict) -> dict:
    """Quantise an existing export folder's fp32 models in place (atomic); new JSON."""
    onnx = export._import_exporter()
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        export._quantize_int8(out_dir, tmp)
        names = list(model_files("int8"))
        extra = export._describe(onnx, tmp, names, {})
        new = dict(meta, quantize="int8")
        for key in ("inputs", "outputs", "files"):
            new[key] = {**meta[key], **extra[key]}
        export._install(tmp, out_dir, names, new)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return new


def onnx_cache_dir() -> Path:
    """Folder of the cached ONNX exports: ``weights.cache_dir() / "onnx"``."""
    return cache_dir() / "onnx"


def _state_dict_sha256(model: Sam) -> str:
    """sha256 over a model's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _source(
    model: Sam | None, checkpoint: str | PathLike | None, model_name: str
) -> tuple[str, dict, Path | None]:
    """Cache key (hex), the JSON ``source`` and the checkpoint path (if any)."""
    if checkpoint is None and model is not None:
        checkpoint = getattr(model, "checkpoint_path", None)
    if checkpoint is None and model is not None:
        key = _state_dict_sha256(model)
        return key, {"state_dict_sha256": key}, None
    if checkpoint is None:
        from ..weights import fetch

        checkpoint = fetch(model_name)
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    key = sha256_file(path)
    return key, {"checkpoint": str(path), "sha256": key}, path


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _files_intact(folder: Path, meta: dict, names: tuple[str, ...]) -> bool:
    files = meta.get("files")
    if not isinstance(files, dict):
        return False
    for name in names:
        path = folder / name
        if name not in files or not path.is_file() or sha256_file(path) != files[name]:
            return False
    return True


def _source_key(source: object) -> str | None:
    """The weights' hash recorded in a JSON ``source``."""
    if not isinstance(source, dict):
        return None
    return source.get("sha256") or source.get("state_dict_sha256")


def _matches(meta: dict | None, key: str) -> bool:
    """Whether an export folder's JSON is of this exporter version and these weights."""
    return (
        meta is not None
        and meta.get("exporter_version") == EXPORTER_VERSION
        and _source_key(meta.get("source")) == key
    )


def get_onnx_backend(
    model: Sam | None = None,
    *,
    checkpoint: str | PathLike | None = None,
    model_name: str = "vit_t",
    folder: str | PathLike | None = None,
    quantize: str | None = None,
    threads: int | None = None,
) -> OnnxBackend:
    """An :class:`OnnxBackend`, exporting the model on first use.

    Parameters
    ----------
    model : Sam, optional
        The model to export when no cached export exists (default: loaded from
        ``checkpoint`` with ``optimize=False``). Must hold the weights of
        ``checkpoint`` (or of ``model.checkpoint_path``) unchanged: the cache is
        keyed by that file's sha256. A model without a checkpoint is keyed by a
        hash of its state dict.
    checkpoint : str or path-like, optional
        Weights file; default ``model.checkpoint_path`` when ``model`` has one,
        else the registry's file for ``model_name`` (downloaded on first use).
    model_name : str
        Registry name, to load the model and to find its default weights.
    folder : str or path-like, optional
        Use the models in this folder (from :func:`export_onnx` or
        ``mobilesam export-onnx``) instead of the cache; nothing is exported.
    quantize : {None, "int8"}
        Run the int8 models (``*.int8.onnx``).
    threads : int, optional
        onnxruntime intra-op threads; default the number of physical cores.

    Returns
    -------
    OnnxBackend

    Raises
    ------
    FileNotFoundError
        ``folder`` lacks a model file (the message names them), or
        ``checkpoint`` does not exist.
    TypeError
        ``model`` is neither None nor a :class:`Sam`.
    ValueError
        ``quantize`` is not None / ``"int8"``.
    ImportError
        onnxruntime (or, to export, onnx / onnxscript) is not installed.
    """
    _check_quantize(quantize)
    if model is not None and not isinstance(model, Sam):
        raise TypeError(f"model must be a Sam model or None, got {type(model).__name__}")
    names = model_files(quantize)
    if folder is not None:
        folder = Path(folder)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            how = "mobilesam export-onnx" + (" --quantize int8" if quantize else "")
            raise FileNotFoundError(
                f"folder {str(folder)!r} does not hold {' and '.join(missing)} "
                f"(write them with `{how}` or export_onnx())"
            )
        return OnnxBackend(folder / names[0], folder / names[1], threads=threads)

    import_onnxruntime()
    key, source, path = _source(model, checkpoint, model_name)
    out_dir = onnx_cache_dir() / f"{key[:16]}-v{EXPORTER_VERSION}"
    meta = _read_meta(out_dir)
    fp32 = model_files(None)
    if not (_matches(meta, key) and _files_intact(out_dir, meta, fp32)):
        if model is None:
            from ..build import load_model

            model = load_model(model_name, path, device="cpu", optimize=False)
        meta = export.export_onnx(model, out_dir, quantize=quantize, source=source)
    elif quantize == "int8" and not _files_intact(out_dir, meta, names):
        meta = _add_int8(out_dir, meta)
    return OnnxBackend(out_dir / names[0], out_dir / names[1], threads=threads)
