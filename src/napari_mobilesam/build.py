"""Model configurations, the registry of named variants, and checkpoint loading.

A variant is a :class:`SamConfig` in :data:`MODEL_CONFIGS`; :func:`build_sam`
turns a config into a randomly initialised :class:`~napari_mobilesam.model.Sam`
and :func:`load_model` builds one and loads weights into it (the only place that
reads checkpoints).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from .model import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TinyViT,
    TinyViTConfig,
    TwoWayTransformer,
)
from .model.sam import PIXEL_MEAN, PIXEL_STD

# Keys of the official checkpoints that belong to no part of the segmentation
# model (TinyViT's ImageNet classifier head, trained but unused by MobileSAM).
IGNORED_KEY_PREFIXES: tuple[str, ...] = ("image_encoder.norm_head.", "image_encoder.head.")

# Wrappers used by training scripts around the state dict.
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")


@dataclass(frozen=True)
class ViTConfig:
    """SAM's ViT image encoder; the fields are :class:`ImageEncoderViT` arguments."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    mlp_ratio: float = 4.0
    out_chans: int = 256
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    rel_pos_zero_init: bool = True
    window_size: int = 14
    norm_eps: float = 1e-6

    @property
    def stride(self) -> int:
        """Input pixels per embedding cell."""
        return self.patch_size

    def kwargs(self) -> dict:
        """Constructor arguments of :class:`ImageEncoderViT`."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


EncoderConfig = TinyViTConfig | ViTConfig


@dataclass(frozen=True)
class SamConfig:
    """A complete model: encoder architecture plus prompt encoder and decoder sizes.

    The image embedding size is derived (``encoder.img_size // encoder.stride``),
    never written down.
    """

    encoder: EncoderConfig
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD
    description: str = field(default="", compare=False)

    @property
    def image_size(self) -> int:
        return self.encoder.img_size

    @property
    def image_embedding_size(self) -> int:
        return self.encoder.img_size // self.encoder.stride


MODEL_CONFIGS: dict[str, SamConfig] = {
    "vit_t": SamConfig(TinyViTConfig(), description="MobileSAM: TinyViT encoder, 5.7M parameters"),
    "vit_b": SamConfig(
        ViTConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
        description="SAM ViT-B, 91M encoder parameters",
    ),
    "vit_l": SamConfig(
        ViTConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
        description="SAM ViT-L, 308M encoder parameters",
    ),
    "vit_h": SamConfig(
        ViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
        description="SAM ViT-H, 636M encoder parameters",
    ),
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


def get_config(name: str | SamConfig) -> SamConfig:
    """The architecture of a model name (``vit_t``, ``vit_b``, ``vit_l``, ``vit_h``, or
    registry weights such as ``vit_t_synthetic_cells``: their ``architecture``).

    Raises
    ------
    ValueError
        An unknown name; the message lists the known ones.
    """
    if isinstance(name, SamConfig):
        return name
    try:
        return MODEL_CONFIGS[name]
    except (KeyError, TypeError):
        pass
    from .weights import REGISTRY  # trained weights of a known architecture

    info = REGISTRY.get(name) if isinstance(name, str) else None
    if info is not None and info.network in MODEL_CONFIGS:
        return MODEL_CONFIGS[info.network]
    known = ", ".join(model_names())
    raise ValueError(f"unknown model name {name!r}; known models: {known}")


def model_names() -> list[str]:
    """Every name :func:`load_model` accepts: the architectures, then registry weights
    of a known architecture (e.g. ``vit_t_synthetic_cells``)."""
    from .weights import REGISTRY

    extra = [
        n for n, i in REGISTRY.items() if n not in MODEL_CONFIGS and i.network in MODEL_CONFIGS
    ]
    return [*MODEL_CONFIGS, *extra]


def build_image_encoder(config: EncoderConfig) -> nn.Module:
    """Randomly initialised image encoder for ``config``."""
    if isinstance(config, TinyViTConfig):
        return TinyViT(config)
    return ImageEncoderViT(**config.kwargs())


def build_sam(config: str | SamConfig) -> Sam:
    """Randomly initialised :class:`Sam` for a registry name or a :class:`SamConfig`."""
    cfg = get_config(config)
    emb = cfg.image_embedding_size
    return Sam(
        image_encoder=build_image_encoder(cfg.encoder),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(emb, emb),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=cfg.prompt_embed_dim,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                num_heads=cfg.decoder_num_heads,
                mlp_dim=cfg.decoder_mlp_dim,
                attention_downsample_rate=cfg.attention_downsample_rate,
            ),
            num_multimask_outputs=cfg.num_multimask_outputs,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=cfg.pixel_mean,
        pixel_std=cfg.pixel_std,
    )


def read_state_dict(path: str | PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU.

    Uses ``torch.load(..., weights_only=True)``: no pickled code is ever run.
    Accepts a bare state dict or one wrapped under ``model`` / ``state_dict``.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    CheckpointError
        Not a file, empty, not a PyTorch checkpoint, truncated or corrupt, holding
        Python objects beyond tensors, or holding no state dict.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint file {str(path)!r} is empty (0 bytes)")
    magic = _magic(path)
    if magic not in ("zip", "pickle"):
        raise CheckpointError(
            f"file {str(path)!r} ({size:,} bytes) is not a PyTorch checkpoint "
            "(neither a torch.save zip archive nor a legacy pickle)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=magic == "zip")
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds Python objects other than tensors, which are "
                "not loaded for safety (weights_only=True). If you trust its source, re-save "
                "it as a plain state dict: torch.save(model.state_dict(), path)."
            ) from None
        raise CheckpointError(_not_a_checkpoint(path, size, exc)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(_not_a_checkpoint(path, size, exc)) from None
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not hold a state dict (found {type(obj).__name__})"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a state dict: entries {bad[:5]} are not tensors"
        )
    return dict(obj)


def _magic(path: Path) -> str:
    """'zip' (torch.save since 1.6), 'pickle' (legacy torch.save) or 'unknown'."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol marker
        return "pickle"
    return "unknown"


def _not_a_checkpoint(path: Path, size: int, exc: BaseException) -> str:
    detail = load_error_detail(exc)
    if _magic(path) == "zip":
        try:
            with zipfile.ZipFile(path):
                pass
            return f"checkpoint {str(path)!r} ({size:,} bytes) is corrupt: {detail}"
        except zipfile.BadZipFile:
            return (
                f"checkpoint {str(path)!r} ({size:,} bytes) is truncated or corrupt "
                f"(the zip archive is incomplete); download it again. Details: {detail}"
            )
    return f"file {str(path)!r} ({size:,} bytes) is not a PyTorch checkpoint: {detail}"


def load_error_detail(exc: BaseException) -> str:
    """What ``torch.load(..., weights_only=True)`` found wrong, without its advice.

    torch's "Weights only load failed" message suggests re-running with
    ``weights_only=False``, which runs whatever code the file holds: never pass that
    on. Keeps only the unpickler's own reason (e.g. ``Unsupported operand 103``).
    """
    text = str(exc)
    if "weights_only" not in text:
        return text
    found = re.search(
        r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text, re.S
    )
    reason = " ".join(found.group(1).split()) if found else ""
    return f"unreadable pickle data ({reason})" if reason else "unreadable pickle data"


def detect_model_name(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Registry name whose parameter names and shapes match ``state_dict``, or None."""
    keys = {k for k in state_dict if not k.startswith(IGNORED_KEY_PREFIXES)}
    for name, cfg in MODEL_CONFIGS.items():
        expected = _expected_shapes(cfg)
        if keys == set(expected) and all(
            tuple(state_dict[k].shape) == s for k, s in expected.items()
        ):
            return name
    return None


def _expected_shapes(cfg: SamConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_sam(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Strictly load ``state_dict`` into ``model`` (known unused keys are dropped).

    Raises
    ------
    CheckpointError
        Listing missing keys, unexpected keys and shape mismatches, naming
        ``source`` and, when recognisable, the model the checkpoint belongs to.
    """
    sd = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_KEY_PREFIXES)}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(sd) & set(own))
        if sd[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the model architecture:"]
        if missing:
            lines.append(f"  {len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {_listing(unexpected)}")
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatches: {_listing(mismatched, 6)}")
        guess = detect_model_name(state_dict)
        if guess is not None:
            lines.append(f"  It looks like a {guess!r} checkpoint: load it with name={guess!r}.")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(sd, strict=True)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` -> CUDA when available, else CPU; checks availability."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available on this machine")
    return dev


def load_model(
    name: str = "vit_t",
    checkpoint: str | PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    optimize: bool = True,
    progress: bool = True,
    fuse: bool | None = None,
) -> Sam:
    """Build a model and load its weights; returned in eval mode.

    Parameters
    ----------
    name : str
        Registry name: ``vit_t`` (MobileSAM), ``vit_b``, ``vit_l``, ``vit_h``.
    checkpoint : path, optional
        Weights file in the official format (``mobile_sam.pt``, ``sam_vit_*.pth``).
        When None the registry's file is used, downloaded into the cache on first
        use (see :mod:`napari_mobilesam.weights`).
    device : str or torch.device, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... ; None or ``"auto"`` picks CUDA when
        available.
    optimize : bool
        Swap in the fast inference modules (:func:`napari_mobilesam.accel.optimize`:
        BatchNorm folded, fused CPU kernels, channels-last memory; the same results
        within float rounding). False: the model's own modules, the reference
        computation; use it to train or to re-save the weights.
    progress : bool
        Show a progress bar when downloading.
    fuse : bool, optional
        Deprecated name of ``optimize``.

    Returns
    -------
    Sam
        With attributes ``model_name`` and ``checkpoint_path`` recording the source.
    """
    if fuse is not None:
        import warnings

        warnings.warn(
            "load_model(fuse=...) is deprecated: use optimize=...", DeprecationWarning, stacklevel=2
        )
        optimize = fuse
    cfg = get_config(name)
    dev = resolve_device(device)
    if checkpoint is None:
        from .weights import fetch

        checkpoint = fetch(name, progress=progress)
    path = Path(checkpoint)
    state_dict = read_state_dict(path)
    model = build_sam(cfg)
    load_state_dict_checked(model, state_dict, source=f"checkpoint {str(path)!r}")
    model.eval()
    if optimize:
        from .accel import optimize as optimize_model

        optimize_model(model)
    model.model_name = name
    model.checkpoint_path = path
    return model.to(dev)
