"""Teacher and student models: configurations, loading, and the student checkpoint.

A model is named by a registry name (``vit_t``, ``vit_b``, ``vit_l``, ``vit_h``) or by a
JSON file describing a :class:`~napari_mobilesam.build.SamConfig`, so that smaller or
custom students (and the tiny models of the tests) go through the same code::

    {"encoder": {"type": "tiny_vit", "img_size": 1024, "embed_dims": [64, 128, 160, 320],
                 ...},
     "prompt_embed_dim": 256, ...}

``encoder.type`` is ``"tiny_vit"`` (fields of
:class:`~napari_mobilesam.model.TinyViTConfig`) or ``"vit"`` (fields of
:class:`~napari_mobilesam.build.ViTConfig`); the other keys are fields of ``SamConfig``.

The student is the student's image encoder plus the teacher's prompt encoder and mask
decoder (frozen copies): :func:`build_student`. :func:`student_state_dict` writes it in
the official checkpoint format (flat dict, prefixes ``image_encoder.``,
``prompt_encoder.``, ``mask_decoder.``), which
``napari_mobilesam.build.load_model("vit_t", checkpoint=...)`` and the original
MobileSAM code load.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from os import PathLike
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..build import (
    SamConfig,
    ViTConfig,
    build_sam,
    get_config,
    load_state_dict_checked,
    model_names,
    read_state_dict,
)
from ..model import Sam, TinyViTConfig

__all__ = [
    "SamConfigLike",
    "build_student",
    "config_from_dict",
    "config_to_dict",
    "load_sam",
    "load_teacher_parts",
    "resolve_config",
    "save_student",
    "spec_name",
    "student_state_dict",
]

#: A registry name, a path to a JSON config file, or a config.
SamConfigLike = str | PathLike | SamConfig

_ENCODER_TYPES = {"tiny_vit": TinyViTConfig, "vit": ViTConfig}


def config_to_dict(config: SamConfig) -> dict:
    """JSON-able description of ``config`` (inverse of :func:`config_from_dict`)."""
    enc = config.encoder
    kind = "tiny_vit" if isinstance(enc, TinyViTConfig) else "vit"
    out = {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "encoder"
    }
    out.pop("description", None)
    out["encoder"] = {"type": kind, **dataclasses.asdict(enc)}
    return json.loads(json.dumps(out))  # tuples -> lists


def config_from_dict(data: dict, source: str = "config") -> SamConfig:
    """Build a :class:`SamConfig` from :func:`config_to_dict`'s format.

    Raises
    ------
    ValueError
        Unknown encoder type or unknown / invalid fields, naming ``source``.
    """
    if not isinstance(data, dict) or not isinstance(data.get("encoder"), dict):
        raise ValueError(f"{source}: expected an object with an 'encoder' object")
    enc = dict(data["encoder"])
    kind = enc.pop("type", None)
    if kind not in _ENCODER_TYPES:
        raise ValueError(
            f"{source}: encoder.type must be one of {sorted(_ENCODER_TYPES)}, got {kind!r}"
        )
    enc_cls = _ENCODER_TYPES[kind]
    rest = {k: v for k, v in data.items() if k != "encoder"}
    try:
        encoder = enc_cls(**{k: _tuple(v) for k, v in enc.items()})
        return SamConfig(encoder=encoder, **{k: _tuple(v) for k, v in rest.items()})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: invalid model configuration: {exc}") from None


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def resolve_config(spec: SamConfigLike) -> SamConfig:
    """Configuration of a registry name, a JSON config file, or a config (returned as is).

    Raises
    ------
    ValueError
        Neither a registry name nor an existing ``.json`` file, or an invalid file.
    """
    if isinstance(spec, SamConfig):
        return spec
    text = os.fspath(spec)
    if text in model_names():
        return get_config(text)
    path = Path(text)
    if path.suffix.lower() == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"model config {str(path)!r} is not readable JSON: {exc}") from None
        return config_from_dict(data, source=f"model config {str(path)!r}")
    known = ", ".join(model_names())
    raise ValueError(
        f"unknown model {text!r}: give a registry name ({known}) or a JSON config file"
    )


def spec_name(spec: SamConfigLike) -> str:
    """Short name for logs and provenance: the registry name or the file's path."""
    if isinstance(spec, SamConfig):
        return "custom"
    return os.fspath(spec)


def load_sam(spec: SamConfigLike, weights: str | PathLike, device="cpu") -> Sam:
    """A complete model with ``weights`` loaded (strictly), unfused, in eval mode.

    Raises
    ------
    FileNotFoundError, napari_mobilesam.build.CheckpointError
        Missing or unusable weights file (the message names it).
    """
    cfg = resolve_config(spec)
    model = build_sam(cfg)
    state = read_state_dict(weights)
    load_state_dict_checked(model, state, source=f"checkpoint {os.fspath(weights)!r}")
    model.model_name = spec_name(spec)
    model.checkpoint_path = Path(weights)
    return model.eval().to(device)


def _check_student(student: SamConfig, img_size: int, emb: int, embed_dim: int) -> None:
    """Raise ValueError unless the student's embeddings fit a teacher decoder taking
    ``img_size`` px inputs, ``emb`` x ``emb`` embeddings of ``embed_dim`` channels."""
    s_emb = student.image_embedding_size
    if (student.image_size, s_emb) != (img_size, emb):
        raise ValueError(
            f"student input {student.image_size} px -> {s_emb}x{s_emb} embedding does not "
            f"match the teacher's {img_size} px -> {emb}x{emb}"
        )
    if student.encoder.out_chans != embed_dim:
        raise ValueError(
            f"student encoder writes {student.encoder.out_chans} channels, the teacher's "
            f"decoder expects {embed_dim}"
        )


def build_student(
    student: SamConfigLike, teacher: Sam, init: str | PathLike | None = None, seed: int = 0
) -> Sam:
    """Student image encoder + copies of the teacher's prompt encoder and mask decoder.

    Parameters
    ----------
    student : SamConfigLike
        The student's architecture (only its encoder is used).
    teacher : Sam
        Provides the prompt encoder and mask decoder (deep-copied, frozen:
        ``requires_grad=False``) and the pixel normalisation.
    init : path, optional
        A checkpoint whose ``image_encoder.*`` weights initialise the student encoder
        (e.g. a previous student); otherwise the encoder is randomly initialised
        (``torch.manual_seed(seed)``).
    seed : int
        Seed of the random initialisation.

    Returns
    -------
    Sam
        In train mode; ``model.image_encoder`` is the part to train.

    Raises
    ------
    ValueError
        The student's embedding shape differs from the teacher's.
    """
    cfg = resolve_config(student)
    pe = teacher.prompt_encoder
    _check_student(cfg, teacher.img_size, pe.image_embedding_size[0], pe.embed_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam(cfg)
    model.prompt_encoder = copy.deepcopy(teacher.prompt_encoder).cpu()
    model.mask_decoder = copy.deepcopy(teacher.mask_decoder).cpu()
    model.pixel_mean.copy_(teacher.pixel_mean.cpu())
    model.pixel_std.copy_(teacher.pixel_std.cpu())
    for part in (model.prompt_encoder, model.mask_decoder):
        part.requires_grad_(False).eval()
    if init is not None:
        state = read_state_dict(init)
        enc = {k[len("image_encoder.") :]: v for k, v in state.items()
               if k.startswith("image_encoder.")}  # fmt: skip
        enc = {k: v for k, v in enc.items() if not k.startswith(("norm_head.", "head."))}
        load_state_dict_checked(
            model.image_encoder, enc, source=f"image encoder of {os.fspath(init)!r}"
        )
    model.model_name = spec_name(student)
    return model.train()


def load_teacher_parts(
    student: SamConfigLike, teacher: SamConfigLike, teacher_weights: str | PathLike, seed: int = 0
) -> Sam:
    """Like :func:`build_student`, without building the teacher's image encoder.

    Only the ``prompt_encoder.*`` and ``mask_decoder.*`` weights of ``teacher_weights``
    are read (a ViT-H checkpoint's 636M encoder parameters are never materialised).
    The student encoder is randomly initialised (``seed``); returns the model in
    train mode with the prompt encoder and decoder frozen.

    Raises
    ------
    FileNotFoundError, napari_mobilesam.build.CheckpointError
        Missing or unusable teacher weights, or keys that do not match.
    ValueError
        The student's embedding shape differs from the teacher's.
    """
    t_cfg = resolve_config(teacher)
    s_cfg = resolve_config(student)
    cfg = dataclasses.replace(t_cfg, encoder=s_cfg.encoder)
    _check_student(s_cfg, t_cfg.image_size, t_cfg.image_embedding_size, t_cfg.prompt_embed_dim)
    state = read_state_dict(teacher_weights)
    parts = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam(cfg)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("image_encoder.")}
    probe = torch.nn.Module()
    probe.prompt_encoder = model.prompt_encoder
    probe.mask_decoder = model.mask_decoder
    load_state_dict_checked(
        probe, parts, source=f"prompt encoder / mask decoder of {os.fspath(teacher_weights)!r}"
    )
    assert set(own) == set(probe.state_dict())
    for part in (model.prompt_encoder, model.mask_decoder):
        part.requires_grad_(False).eval()
    model.model_name = spec_name(student)
    return model.train()


def student_state_dict(model: Sam) -> dict[str, torch.Tensor]:
    """The official checkpoint format of ``model``: flat, CPU, contiguous tensors.

    A TinyViT encoder also gets the unused classifier keys of the official checkpoints
    (``image_encoder.norm_head.*`` = LayerNorm identity, ``image_encoder.head.*`` =
    zeros) so that code loading strictly (the original MobileSAM) accepts the file.
    """
    model = getattr(model, "module", model)  # DistributedDataParallel
    out = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    enc = model.image_encoder
    cfg = getattr(enc, "config", None)
    if isinstance(cfg, TinyViTConfig):
        dim = cfg.embed_dims[-1]
        out["image_encoder.norm_head.weight"] = torch.ones(dim)
        out["image_encoder.norm_head.bias"] = torch.zeros(dim)
        out["image_encoder.head.weight"] = torch.zeros(cfg.num_classes, dim)
        out["image_encoder.head.bias"] = torch.zeros(cfg.num_classes)
    return out


def save_student(model: Sam, path: str | PathLike) -> Path:
    """Write :func:`student_state_dict` to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(student_state_dict(model), tmp)
    return path
