"""The image encoder replayed from CUDA graphs (GPU inference at small batches).

At batch 1 a GPU spends most of TinyViT's forward pass launching its ~400 small
kernels, not running them. A CUDA graph records the launches once per input shape
and precision and replays them with one call; the arithmetic is the same kernels
on the same weights, so the embedding equals the eager one (up to the
nondeterminism of cuBLAS/cuDNN algorithm choice).

:class:`CudaGraphEncoder` wraps an encoder module. It records on the first call
for each (shape, dtype, precision, weights' address) and keeps at most
``max_graphs`` recordings, each holding its own activation memory. Only batches
of up to ``max_batch`` images are recorded: larger ones keep the GPU busy enough
that launches overlap with work, and their recordings would hold gigabytes. It
runs the module eagerly where a graph does not apply: on a CPU, with autograd
on, for larger batches, or after a recording failed (then it warns once and
stays eager). A recording's input and output buffers are shared by its replays, so
recording and replaying hold a lock (one thread at a time per encoder).
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

import torch
from torch import nn

__all__ = ["CudaGraphEncoder", "record_cuda_graph", "run_encoder"]


def run_encoder(
    encoder: nn.Module,
    x: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
    cache_enabled: bool | None = None,
) -> torch.Tensor:
    """``encoder(x)``, under ``torch.autocast(autocast_dtype)`` when one is given.

    Returns the features as float32 either way.
    """
    if autocast_dtype is None:
        return encoder(x)
    with torch.autocast(x.device.type, dtype=autocast_dtype, cache_enabled=cache_enabled):
        return encoder(x).float()


def record_cuda_graph(forward, static_in: torch.Tensor, warmup: int = 3):
    """Record ``forward(static_in)`` as a CUDA graph.

    Parameters
    ----------
    forward : callable
        Tensor -> tensor, free of host synchronisation.
    static_in : torch.Tensor
        The input buffer the graph reads on every replay (on a CUDA device).
    warmup : int
        Eager runs on a side stream first (cuBLAS/cuDNN set-up must not happen inside
        the recording).

    Returns
    -------
    replay : callable
        Runs the recorded kernels again on whatever ``static_in`` then holds.
    static_out : torch.Tensor
        The buffer each replay writes.
    """
    device = static_in.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            forward(static_in)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward(static_in)
    return graph.replay, static_out


class CudaGraphEncoder:
    """Call ``encoder`` through CUDA graphs, one per input shape and precision.

    Parameters
    ----------
    encoder : torch.nn.Module
        Maps a (B, 3, S, S) float32 image batch to (B, C, h, w) features; in eval
        mode and free of host synchronisation (TinyViT and ViT are).
    max_graphs : int
        Recordings kept (least recently used dropped first).
    max_batch : int
        Largest batch run from a graph.
    warmup : int
        Eager runs on a side stream before recording (cuBLAS/cuDNN set-up must not
        happen inside the recording).
    record : callable, optional
        ``record(forward, static_in, warmup) -> (replay, static_out)``; default
        :func:`record_cuda_graph`.
    device_types : tuple of str
        Devices whose inputs are run from recordings.

    Notes
    -----
    The recording reads the module's parameters where they are when it is made:
    in-place weight updates (``load_state_dict``) are seen by later replays, a
    move (``.to``) makes a new recording.
    """

    def __init__(
        self,
        encoder: nn.Module,
        max_graphs: int = 4,
        warmup: int = 3,
        max_batch: int = 4,
        *,
        record=record_cuda_graph,
        device_types: tuple[str, ...] = ("cuda",),
    ):
        for name, value in (("max_graphs", max_graphs), ("max_batch", max_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.encoder = encoder
        self.max_graphs = max_graphs
        self.max_batch = max_batch
        self.warmup = warmup
        self.record = record
        self.device_types = device_types
        self.failed: str | None = None  # why recording was given up, if it was
        self._graphs: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def applies(self, x: torch.Tensor) -> bool:
        """Whether ``x`` would be run from a graph (CUDA, no autograd, a batch of at
        most ``max_batch``, no failure)."""
        return (
            x.device.type in self.device_types
            and not torch.is_grad_enabled()
            and len(x) <= self.max_batch
            and self.failed is None
        )

    def __call__(self, x: torch.Tensor, autocast_dtype: torch.dtype | None = None):
        """The features of ``x``, float32.

        Parameters
        ----------
        x : torch.Tensor
            (B, 3, S, S) float32 on the encoder's device.
        autocast_dtype : torch.dtype, optional
            Run under ``torch.autocast`` with this dtype (bf16/fp16), as the
            eager path would.

        Returns
        -------
        torch.Tensor
            (B, C, h, w) float32, a new tensor (not the recording's buffer).
        """
        if not self.applies(x):
            return self.eager(x, autocast_dtype)
        with self._lock:
            return self._replay(x, autocast_dtype)

    def _replay(self, x: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device, autocast_dtype, self._weights_address())
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._recording(x, autocast_dtype)
            except Exception as exc:
                self.failed = f"{type(exc).__name__}: {exc}"
                self._graphs.clear()
                warnings.warn(
                    f"CUDA graph recording of the image encoder failed ({self.failed}); "
                    "running it eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return self.eager(x, autocast_dtype)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        replay, static_in, static_out = entry
        with torch.inference_mode():
            static_in.copy_(x)
            replay()
            return static_out.clone()

    @property
    def n_graphs(self) -> int:
        """Recordings held now."""
        return len(self._graphs)

    def _weights_address(self) -> int:
        first = next(self.encoder.parameters(), None)
        return 0 if first is None else first.data_ptr()

    def eager(self, x: torch.Tensor, autocast_dtype: torch.dtype | None = None):
        """The encoder run eagerly (what a replay computes)."""
        return run_encoder(self.encoder, x, autocast_dtype)

    def _recording(self, x, autocast_dtype):
        def forward(t):
            # autocast's weight-cast cache must be off while recording (its casts would
            # be made outside the graph's memory)
            return run_encoder(self.encoder, t, autocast_dtype, cache_enabled=False)

        with torch.inference_mode():
            static_in = x.clone()
            replay, static_out = self.record(forward, static_in, self.warmup)
        return replay, static_in, static_out
