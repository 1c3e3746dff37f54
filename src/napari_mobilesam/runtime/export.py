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

The cache of exports (:func:`~napari_mobilesam.runtime.cache.get_onnx_backend`) is in
:mod:`.cache`.
"""

from __future__ import annotations

import contextlib
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
from ..weights import sha256_file
from .graphs import DecoderGraph, plain_copy
from .onnx_backend import INSTALL_HINT, import_onnxruntime

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTER_VERSION",
    "INT8_OP_TYPES",
    "META_FILE",
    "export_onnx",
    "model_files",
]

#: Version of the exported graphs; bump when they change (part of the cache key).
#: 2: opset 20 by default (one ``Gelu`` node instead of five elementwise ones).
EXPORTER_VERSION: int = 2
#: Default ONNX opset: 20 is the first with a ``Gelu`` operator, one node that
#: onnxruntime runs as one kernel where older opsets need the ``Div, Erf, Add, Mul, Mul``
#: chain.
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
