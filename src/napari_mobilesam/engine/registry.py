"""The backends by name, and :func:`make_engine`.

A backend is a factory ``factory(model, precision, options) -> Engine`` registered
under a name: :func:`make_engine` (and so ``Predictor(backend=name)``,
``MaskGenerator(backend=name)``, the widgets and the batch tool) can then run it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ..model import Sam
from ..runtime.heap import keep_freed_memory
from .engine import Engine, EngineOptions
from .onnx import auto_engine, backend_object_engine, onnx_engine
from .precision import check_precision, resolve_precision
from .torch_eager import torch_engine

__all__ = ["backend_names", "make_engine", "register_backend", "unregister_backend"]

Factory = Callable[[Sam, str, EngineOptions], Engine]

_BACKENDS: dict[str, Factory] = {"torch": torch_engine, "onnx": onnx_engine, "auto": auto_engine}
#: backends whose encoder runs in torch (they take a reduced ``precision``)
_TORCH_ENCODERS = {"torch", "auto"}
_LOCK = threading.Lock()


def register_backend(
    name: str, factory: Factory, *, torch_precision: bool = False, replace: bool = False
) -> None:
    """Make ``factory`` the backend called ``name``.

    Parameters
    ----------
    name : str
    factory : callable
        ``factory(model, precision, options)``: the :class:`~.engine.Engine` for a
        :class:`~napari_mobilesam.model.Sam` on its device, ``precision`` one of
        ``"fp32"``, ``"bf16"``, ``"fp16"`` (already resolved from ``"auto"``), and
        :class:`~.engine.EngineOptions`. It raises ``ValueError`` for options it
        cannot honour.
    torch_precision : bool
        Whether the backend runs reduced precisions (``precision="auto"`` resolves
        to one only then; otherwise ``"auto"`` means ``"fp32"``).
    replace : bool
        Allow replacing a registered backend.

    Raises
    ------
    ValueError
        ``name`` is registered already (and not ``replace``), or is not a non-empty str.
    TypeError
        ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    with _LOCK:
        if name in _BACKENDS and not replace:
            raise ValueError(f"backend {name!r} is registered already (pass replace=True)")
        _BACKENDS[name] = factory
        (_TORCH_ENCODERS.add if torch_precision else _TORCH_ENCODERS.discard)(name)


def unregister_backend(name: str) -> None:
    """Forget backend ``name`` (KeyError if it is not registered)."""
    with _LOCK:
        del _BACKENDS[name]
        _TORCH_ENCODERS.discard(name)


def backend_names() -> tuple[str, ...]:
    """The registered backends' names."""
    with _LOCK:
        return tuple(_BACKENDS)


def make_engine(
    model: Sam,
    backend="torch",
    precision: str = "fp32",
    device: str | torch.device | None = None,
    options: EngineOptions | None = None,
) -> Engine:
    """The engine that runs ``model`` with ``backend`` at ``precision``.

    Parameters
    ----------
    model : Sam
        Used in place (not copied; moved to ``device`` when one is given).
    backend : str or backend object
        A registered name (:func:`backend_names`: ``"torch"``, ``"onnx"``, ``"auto"``
        and any added by :func:`register_backend`), or an object with the numpy
        ``encode`` / ``decode`` of :class:`~napari_mobilesam.runtime.EncoderDecoderBackend`.
    precision : {"fp32", "bf16", "fp16", "auto"}
        The image encoder's precision (:func:`~.precision.resolve_precision`).
    device : str or torch.device, optional
        Move the model there first.
    options : EngineOptions, optional

    Raises
    ------
    ValueError
        An unknown backend name or precision, or options the backend cannot honour.
    TypeError
        ``model`` is not a ``Sam``, or ``backend`` neither a name nor a backend object.
    """
    if not isinstance(model, Sam):
        raise TypeError(f"model must be a Sam model, got {type(model).__name__}")
    check_precision(precision)
    options = options or EngineOptions()
    if device is not None:
        model = model.to(device)
    if model.device.type == "cpu":
        keep_freed_memory()  # the next image reuses this one's memory (runtime.heap)
    if not isinstance(backend, str):
        if not (hasattr(backend, "encode") and hasattr(backend, "decode")):
            raise TypeError(f"backend must be {_names()} or a backend object, got {type(backend)}")
        return backend_object_engine(model, backend, _fp32_only(precision), options)
    with _LOCK:
        factory = _BACKENDS.get(backend)
        torch_encoder = backend in _TORCH_ENCODERS
    if factory is None:
        raise ValueError(f"backend must be {_names()}, got {backend!r}")
    if torch_encoder:
        precision = resolve_precision(precision, model.device)
    elif precision == "auto":
        precision = "fp32"
    return factory(model, precision, options)


def _fp32_only(precision: str) -> str:
    if precision not in ("fp32", "auto"):
        raise ValueError(f"precision={precision!r} needs backend='torch'")
    return "fp32"


def _names() -> str:
    names = [repr(n) for n in backend_names()]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
