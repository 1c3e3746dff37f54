"""The onnxruntime backend: exported encoder and decoder graphs on the CPU (or CUDA)."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np

from .base import EncoderDecoderBackend

__all__ = ["OnnxBackend", "import_onnxruntime", "physical_cores"]

INSTALL_HINT = 'pip install "napari-mobilesam[onnx]"'


def import_onnxruntime():
    """Import onnxruntime, or raise ImportError with the install command."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(
            f"the ONNX backend needs onnxruntime, which is not installed: {INSTALL_HINT}"
        ) from exc
    return onnxruntime


def physical_cores() -> int:
    """Number of physical CPU cores (``os.cpu_count()`` may count SMT threads)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    return max(1, int(n or os.cpu_count() or 1))


class OnnxBackend(EncoderDecoderBackend):
    """Encoder and decoder run by onnxruntime, one ``InferenceSession`` each.

    The graphs are those written by :func:`~napari_mobilesam.runtime.export_onnx`
    (or their int8 versions). Sessions are tuned for CPU inference: all graph
    optimisations, ``threads`` intra-op threads, one inter-op thread, sequential
    execution, memory patterns on.

    Parameters
    ----------
    encoder_path, decoder_path : str or path-like
        ``encoder.onnx`` and ``decoder.onnx`` (or ``*.int8.onnx``).
    threads : int, optional
        Intra-op threads per session; default: the number of physical cores.
    providers : sequence of str, optional
        onnxruntime execution providers; default ``["CPUExecutionProvider"]``
        (pass ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` for a GPU).

    Raises
    ------
    ImportError
        onnxruntime is not installed (the message says how to install it).
    FileNotFoundError
        A model file does not exist.
    TypeError
        ``threads`` is not an int.
    ValueError
        ``threads`` is smaller than 1.
    """

    name = "onnx"

    def __init__(
        self,
        encoder_path: str | PathLike,
        decoder_path: str | PathLike,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        ort = import_onnxruntime()
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, numbers.Integral)
        ):
            raise TypeError(f"threads must be an int or None, got {threads!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads!r}")
        self.encoder_path = Path(encoder_path)
        self.decoder_path = Path(decoder_path)
        for arg, path in (("encoder_path", self.encoder_path), ("decoder_path", self.decoder_path)):
            if not path.is_file():
                raise FileNotFoundError(f"{arg}: ONNX model file {str(path)!r} does not exist")
        self.threads = int(threads) if threads is not None else physical_cores()
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.enable_mem_pattern = True
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # no busy-waiting between runs: torch (pre/postprocessing) and the GUI share the
        # cores with onnxruntime, and spinning threads would slow them down
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.encoder = ort.InferenceSession(
            str(self.encoder_path), sess_options=opts, providers=self.providers
        )
        self.decoder = ort.InferenceSession(
            str(self.decoder_path), sess_options=opts, providers=self.providers
        )
        image = self.encoder.get_inputs()[0]
        self._image_name = image.name
        self.img_size = int(image.shape[-1])
        emb = self.encoder.get_outputs()[0].shape
        self.embed_shape = (int(emb[1]), int(emb[2]), int(emb[3]))

    def encode(self, x: np.ndarray) -> np.ndarray:
        """See :meth:`EncoderDecoderBackend.encode`."""
        x = self._check_image(x)
        return self.encoder.run(None, {self._image_name: x})[0]

    def decode(
        self,
        embedding: np.ndarray,
        coords: np.ndarray,
        labels: np.ndarray,
        mask_input: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`EncoderDecoderBackend.decode`."""
        embedding, coords, labels, mask_input = self._check_prompts(
            embedding, coords, labels, mask_input
        )
        b = coords.shape[0]
        if mask_input is None:
            mask_input = np.zeros((b, 1, *self.mask_input_size), np.float32)
            has_mask = np.zeros(b, np.float32)
        else:
            has_mask = np.ones(b, np.float32)
        low_res, iou = self.decoder.run(
            None,
            {
                "image_embeddings": embedding,
                "point_coords": coords,
                "point_labels": labels,
                "mask_input": mask_input,
                "has_mask_input": has_mask,
            },
        )
        return low_res, iou
