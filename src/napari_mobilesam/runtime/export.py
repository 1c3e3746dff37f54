"""Export a model to ONNX (encoder + decoder), quantise it, and cache the result.

Exporter
--------
Both graphs are exported with torch's dynamo-based exporter,
``torch.onnx.export(..., dynamo=True)`` (needs ``onnxscript``), from a
:func:`~napari_mobilesam.runtime.graphs.plain_copy` of the model: standard
operators only (no oneDNN fused convolutions), the unfactorised decoder, the
caller's model untouched. Each graph is one self-contained ``.onnx`` file (weights
inside, no ``.data`` side file) and passes ``onnx.checker``.

``encoder.onnx``
    ``image`` (1, 3, S, S) float32, normalised and padded -> ``image_embeddings``
    (1, C, h, w) float32.
``decoder.onnx``
    ``image_embeddings`` (1, C, h, w), ``point_coords`` (B, N, 2) (x, y) in the
    model input frame, ``point_labels`` (B, N) (1, 0, -1 padding, 2 / 3 box
    corners), ``mask_input`` (B, 1, 4h, 4w), ``has_mask_input`` (B,) 0 / 1, all
    float32 -> ``low_res_masks`` (B, 4, 4h, 4w) and ``iou_predictions`` (B, 4) of
    all four mask tokens. B and N are dynamic.

int8
----
``quantize="int8"`` adds ``encoder.int8.onnx`` and ``decoder.int8.onnx``, made by
onnxruntime's dynamic quantisation (``quantize_dynamic``) of the fp32 files. Only
nodes of the types in :data:`INT8_OP_TYPES` (``MatMul``, ``Gemm``) whose second
input is a weight are quantised: the linear layers of the attention blocks and
MLPs become ``DynamicQuantizeLinear`` + ``MatMulInteger``, weights signed int8
(``QInt8``) per output channel, activations uint8 quantised at run time (the
u8 x s8 kernels of x86 CPUs; fastest and about as accurate as ``QUInt8`` weights
on vit_t). Products of two activations (attention scores and values, the final
mask product) and all convolutions stay float32: onnxruntime's CPU
``ConvInteger`` takes uint8 weights only, and with those, quantising the
convolutions as well made the vit_t encoder both slower and less accurate (relative
embedding error 0.058 instead of 0.021); the decoder's upscaling convolutions also
decide the mask edges. On x86 CPUs without VNNI the u8 x s8 kernels may saturate
and lose some accuracy.

Cache
-----
:func:`get_onnx_backend` exports on first use into
``onnx_cache_dir() / "<sha256 of the checkpoint>[:16]-v<EXPORTER_VERSION>"`` and
reuses the folder afterwards while its ``mobilesam_onnx.json`` matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from os import PathLike
from pathlib import Path

import torch

from ..model import Sam
from ..weights import cache_dir, sha256_file
from .graphs import DecoderGraph, plain_copy
from .onnx_backend import INSTALL_HINT, OnnxBackend, import_onnxruntime

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTER_VERSION",
    "INT8_OP_TYPES",
    "META_FILE",
    "export_onnx",
    "get_onnx_backend",
    "onnx_cache_dir",
]

#: Version of the exported graphs; bump when they change (part of the cache key).
#: 2: opset 20 by default (one ``Gelu`` node instead of five elementwise ones).
EXPORTER_VERSION: int = 2
#: Default ONNX opset: 20 is the first with a ``Gelu`` operator, which onnxruntime
#: runs about 3x faster than the ``Div, Erf, Add, Mul, Mul`` chain older opsets need
#: (GELU is about a fifth of the encoder's time at opset 18).
DEFAULT_OPSET: int = 20
#: Name of the JSON file that describes an export folder.
META_FILE = "mobilesam_onnx.json"
#: Node types whose weights ``quantize="int8"`` stores as int8.
INT8_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm")

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("image_embeddings",)
DECODER_INPUTS = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
)
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions")
_QUANTIZE = (None, "int8")
_MIN_OPSET = 17  # LayerNormalization


def model_files(quantize: str | None = None) -> tuple[str, str]:
    """File names (encoder, decoder) of an export folder: fp32 or ``int8``."""
    _check_quantize(quantize)
    if quantize == "int8":
        return "encoder.int8.onnx", "decoder.int8.onnx"
    return "encoder.onnx", "decoder.onnx"


def _check_quantize(quantize: object) -> None:
    if quantize not in _QUANTIZE:
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")


def _import_exporter():
    """onnx and onnxscript (the dynamo exporter's backend), or ImportError with a hint."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (used by torch.onnx.export(dynamo=True))
    except ImportError as exc:
        raise ImportError(
            f"exporting to ONNX needs onnx and onnxscript, which are not installed: {INSTALL_HINT}"
        ) from exc
    return onnx


def _not_preprocess_advice(record: logging.LogRecord) -> bool:
    # quantize_dynamic logs this on the root logger for every model
    return "pre-processing before quantization" not in str(record.msg)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's and quantiser's warnings and log lines (not errors)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    root = logging.getLogger()
    root.addFilter(_not_preprocess_advice)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            yield
    finally:
        root.removeFilter(_not_preprocess_advice)
        logger.setLevel(level)


def _export_graphs(model: Sam, folder: Path, opset: int) -> None:
    """Write encoder.onnx and decoder.onnx of ``model`` (a plain copy) into ``folder``."""
    s = model.img_size
    c = model.prompt_encoder.embed_dim
    h, w = model.prompt_encoder.image_embedding_size
    mh, mw = model.prompt_encoder.mask_input_size
    common = {"opset_version": opset, "dynamo": True, "external_data": False, "verbose": False}
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(
            model.image_encoder,
            (torch.zeros(1, 3, s, s),),
            str(folder / "encoder.onnx"),
            input_names=list(ENCODER_INPUTS),
            output_names=list(ENCODER_OUTPUTS),
            **common,
        )
        # example with B = 2, N = 3 (not 1: the exporter specialises size-1 axes)
        b, n = 2, 3
        example = (
            torch.zeros(1, c, h, w),
            torch.full((b, n, 2), s / 2),
            torch.tensor([[1.0, 0.0, -1.0], [1.0, 2.0, 3.0]]),
            torch.zeros(b, 1, mh, mw),
            torch.tensor([1.0, 0.0]),
        )
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        points = torch.export.Dim("points", min=1, max=1 << 16)
        dynamic = {
            "image_embeddings": None,
            "point_coords": {0: batch, 1: points},
            "point_labels": {0: batch, 1: points},
            "mask_input": {0: batch},
            "has_mask_input": {0: batch},
        }
        torch.onnx.export(
            DecoderGraph(model).eval(),
            example,
            str(folder / "decoder.onnx"),
            input_names=list(DECODER_INPUTS),
            output_names=list(DECODER_OUTPUTS),
            dynamic_shapes=dynamic,
            **common,
        )


def _quantize_int8(folder: Path, out_folder: Path) -> None:
    """Dynamic int8 quantisation of folder's encoder/decoder.onnx into out_folder."""
    import_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for src, dst in zip(model_files(None), model_files("int8"), strict=True):
        with _quiet_exporter():
            quantize_dynamic(
                folder / src,
                out_folder / dst,
                op_types_to_quantize=list(INT8_OP_TYPES),
                per_channel=True,
                weight_type=QuantType.QInt8,
            )


def _io_spec(onnx_module, path: Path) -> tuple[list[dict], list[dict]]:
    """Names, shapes (dynamic axes as their names) and dtypes of a model's inputs/outputs."""
    proto = onnx_module.load(str(path), load_external_data=False)

    def spec(value) -> dict:
        t = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        dtype = onnx_module.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        return {"name": value.name, "shape": shape, "dtype": dtype}

    inits = {i.name for i in proto.graph.initializer}
    inputs = [spec(v) for v in proto.graph.input if v.name not in inits]
    return inputs, [spec(v) for v in proto.graph.output]


def _describe(onnx_module, folder: Path, names: list[str], base: dict) -> dict:
    """The JSON dict of an export folder holding the files ``names``."""
    meta = dict(base)
    meta["inputs"], meta["outputs"], meta["files"] = {}, {}, {}
    for name in names:
        meta["inputs"][name], meta["outputs"][name] = _io_spec(onnx_module, folder / name)
        meta["files"][name] = sha256_file(folder / name)
    return meta


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON atomically (temp file in the same folder + rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _install(tmp: Path, out_dir: Path, names: list[str], meta: dict) -> None:
    """Move the finished files from ``tmp`` into ``out_dir``; the JSON goes last.

    The old JSON is removed first, so an interrupted move leaves a folder without
    JSON (which :func:`get_onnx_backend` re-exports), never a JSON that describes
    files that are not there.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)
    for name in names:
        os.replace(tmp / name, out_dir / name)
    _write_json(tmp / META_FILE, meta)
    os.replace(tmp / META_FILE, out_dir / META_FILE)


def export_onnx(
    model: Sam,
    out_dir: str | PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    source: dict | None = None,
) -> dict:
    """Export ``model``'s encoder and decoder to single-file ONNX models.

    Writes ``encoder.onnx``, ``decoder.onnx`` (and with ``quantize="int8"`` also
    ``encoder.int8.onnx``, ``decoder.int8.onnx``) and ``mobilesam_onnx.json`` into
    ``out_dir``. The graphs are described in :mod:`napari_mobilesam.runtime.export`.
    Everything is first written into a temporary folder next to ``out_dir`` and
    then renamed into place, the JSON last: an interrupted export leaves no partial
    model behind. ``model`` is not changed (a plain copy is exported).

    Parameters
    ----------
    model : Sam
        Fused or not, on any device; exported in float32 on the CPU.
    out_dir : str or path-like
        Destination folder (created; files of the same names are replaced).
    opset : int
        ONNX opset (>= 17); default :data:`DEFAULT_OPSET`.
    quantize : {None, "int8"}
        Also write dynamically quantised int8 models.
    source : dict, optional
        Where the weights came from, stored as is in the JSON, e.g.
        ``{"checkpoint": path, "sha256": hex}``.

    Returns
    -------
    dict
        The contents of ``mobilesam_onnx.json``: ``exporter_version``,
        ``exporter``, ``torch_version``, ``opset``, ``model_name``, ``source``,
        ``img_size``, ``embed_shape`` [C, h, w], ``quantize``, ``inputs`` and
        ``outputs`` (per file: a list of ``{"name", "shape", "dtype"}``, dynamic
        axes named by strings) and ``files`` (file name -> sha256).

    Raises
    ------
    TypeError
        ``model`` is not a :class:`Sam`, ``opset`` not an int, ``source`` not a dict.
    ValueError
        ``opset`` < 17 or ``quantize`` is not None / ``"int8"``.
    ImportError
        onnx / onnxscript (or onnxruntime, for ``quantize``) are not installed.
    """
    if not isinstance(model, Sam):
        raise TypeError(f"model must be a Sam model, got {type(model).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {opset!r}")
    if opset < _MIN_OPSET:
        raise ValueError(f"opset must be at least {_MIN_OPSET}, got {opset}")
    _check_quantize(quantize)
    if source is not None and not isinstance(source, dict):
        raise TypeError(f"source must be a dict or None, got {type(source).__name__}")
    onnx = _import_exporter()
    if quantize is not None:
        import_onnxruntime()

    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    plain = plain_copy(model)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        _export_graphs(plain, tmp, opset)
        names = list(model_files(None))
        for name in names:
            onnx.checker.check_model(str(tmp / name))
        if quantize == "int8":
            _quantize_int8(tmp, tmp)
            names += model_files("int8")
        base = {
            "exporter_version": EXPORTER_VERSION,
            "exporter": "torch.onnx.export(dynamo=True)",
            "torch_version": torch.__version__,
            "opset": opset,
            "model_name": getattr(model, "model_name", None),
            "source": source,
            "img_size": int(plain.img_size),
            "embed_shape": [
                int(plain.prompt_encoder.embed_dim),
                *map(int, plain.prompt_encoder.image_embedding_size),
            ],
            "quantize": quantize,
        }
        meta = _describe(onnx, tmp, names, base)
        if quantize is None:  # int8 files of an earlier export no longer match
            for stale in model_files("int8"):
                (out_dir / stale).unlink(missing_ok=True)
        _install(tmp, out_dir, names, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _add_int8(out_dir: Path, meta: dict) -> dict:
    """Quantise an existing export folder's fp32 models in place (atomic); new JSON."""
    onnx = _import_exporter()
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        _quantize_int8(out_dir, tmp)
        names = list(model_files("int8"))
        extra = _describe(onnx, tmp, names, {})
        new = dict(meta, quantize="int8")
        for key in ("inputs", "outputs", "files"):
            new[key] = {**meta[key], **extra[key]}
        _install(tmp, out_dir, names, new)
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
        ``checkpoint`` with ``fuse=False``). Must hold the weights of
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

            model = load_model(model_name, path, device="cpu", fuse=False)
        meta = export_onnx(model, out_dir, quantize=quantize, source=source)
    elif quantize == "int8" and not _files_intact(out_dir, meta, names):
        meta = _add_int8(out_dir, meta)
    return OnnxBackend(out_dir / names[0], out_dir / names[1], threads=threads)
