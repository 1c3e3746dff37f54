"""The distillation loop's parts: the dataset and its per-epoch order, the log, random
state, encoder weights and the distributed environment."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_text_atomic
from ..build import (
    IGNORED_KEY_PREFIXES,
    load_state_dict_checked,
    read_state_dict,
    resolve_device,
)
from .data import load_image, preprocess
from .store import EmbeddingStore
from .train_config import LOG_FIELDS

log = logging.getLogger("napari_mobilesam.distill.train")


class _DistillDataset(torch.utils.data.Dataset):
    """Item i: (x (3, S, S) float32 model input, teacher embedding (C, h, w) float32)."""

    def __init__(self, store: EmbeddingStore, rows: list[int], root: Path) -> None:
        self.store = store
        self.rows = rows
        self.root = root
        self.img_size = int(store.meta["img_size"])
        self.mean = tuple(store.meta["pixel_mean"])
        self.std = tuple(store.meta["pixel_std"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        image = load_image(self.root / self.store.images[row])
        x, _ = preprocess(image, self.img_size, self.mean, self.std)
        y = torch.from_numpy(self.store.read(row).astype(np.float32))
        return x, y


class _IndexSampler(torch.utils.data.Sampler):
    """Yields ``self.indices``, which the training loop sets before every epoch."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self):
        return iter(list(self.indices))

    def __len__(self) -> int:
        return len(self.indices)


def _epoch_indices(n: int, epoch: int, seed: int, world: int, rank: int) -> list[int]:
    """This rank's dataset indices for ``epoch``, like ``DistributedSampler``.

    A permutation seeded with ``seed + epoch``, padded by repeating its start to a
    multiple of ``world``, then every ``world``-th entry from ``rank``.
    """
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = math.ceil(n / world)
    pad = per_rank * world - n
    if pad:
        perm += (perm * math.ceil(pad / n))[:pad]
    return perm[rank::world]


# ---------------------------------------------------------------------- files


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


class _Log:
    """Per-step log (csv or jsonl), flushed every row."""

    def __init__(self, path: Path, fmt: str, keep_until: int | None) -> None:
        self.path = path
        self.fmt = fmt
        header = ",".join(LOG_FIELDS) + "\n" if fmt == "csv" else ""
        kept = []
        if keep_until is not None and path.exists():
            kept = [ln for ln in self._rows(path) if self._step(ln) <= keep_until]
        _atomic_write_text(path, header + "".join(ln + "\n" for ln in kept))
        self.fh = open(path, "a", encoding="utf-8")  # closed by close()

    def _rows(self, path: Path) -> list[str]:
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # drop a partial line
        if self.fmt == "csv":
            lines = lines[1:]
        return [ln for ln in lines if ln.strip() and self._step(ln) is not None]

    def _step(self, line: str) -> int | None:
        try:
            if self.fmt == "csv":
                return int(line.split(",", 1)[0])
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return None

    def write(self, row: dict) -> None:
        if self.fmt == "csv":
            line = ",".join(str(row[k]) for k in LOG_FIELDS)
        else:
            line = json.dumps({k: row[k] for k in LOG_FIELDS})
        self.fh.write(line + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _rng_state(cuda: bool) -> dict:
    key, state, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 - global state saved
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else [],
        "numpy": [key, torch.from_numpy(state.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict, cuda: bool) -> None:
    torch.set_rng_state(state["torch"])
    if cuda and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    key, arr, pos, has_gauss, gauss = state["numpy"]
    state_np = (key, arr.numpy().astype(np.uint32), pos, has_gauss, gauss)
    np.random.set_state(state_np)  # noqa: NPY002 - global state restored
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def load_encoder_weights(encoder: torch.nn.Module, checkpoint: str | PathLike) -> None:
    """Load a checkpoint's ``image_encoder.*`` weights into ``encoder`` (strictly).

    TinyViT's unused classifier keys (``norm_head``, ``head``) are ignored.

    Raises
    ------
    FileNotFoundError, napari_mobilesam.build.CheckpointError
        Missing or unusable file, or encoder weights that do not fit.
    """
    state = read_state_dict(checkpoint)
    prefix = "image_encoder."
    enc = {
        k[len(prefix) :]: v
        for k, v in state.items()
        if k.startswith(prefix) and not k.startswith(IGNORED_KEY_PREFIXES)
    }
    load_state_dict_checked(encoder, enc, source=f"image encoder of {os.fspath(checkpoint)!r}")


# ---------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @classmethod
    def setup(cls, device: str | None) -> _Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dev = resolve_device(device)
        if world <= 1:
            return cls(1, 0, dev, False)
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(dist.get_world_size(), dist.get_rank(), dev, owns)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return value
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


# ---------------------------------------------------------------------- training
