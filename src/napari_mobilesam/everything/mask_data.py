"""``MaskData``: the batch container that flows through segment-everything."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


class MaskData:
    """A dict of equally long batches (tensors, arrays or lists) filtered together.

    Every stage of the pipeline is a function of a ``MaskData`` that filters it
    (:meth:`filter`), adds fields, or joins batches (:meth:`cat`).
    """

    def __init__(self, **kwargs: Any) -> None:
        self._stats: dict[str, Any] = {}
        for k, v in kwargs.items():
            self[k] = v

    def __setitem__(self, key: str, item: Any) -> None:
        if not isinstance(item, list | np.ndarray | torch.Tensor) and item is not None:
            raise TypeError(f"MaskData only holds lists, arrays and tensors, got {type(item)}")
        self._stats[key] = item

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __contains__(self, key: str) -> bool:
        return key in self._stats

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self._stats.items())

    def __len__(self) -> int:
        for v in self._stats.values():
            if v is not None:
                return len(v)
        return 0

    def filter(self, keep: torch.Tensor | np.ndarray) -> None:
        """Keep entries by a bool mask or an index array (indices also reorder)."""
        keep_t = torch.as_tensor(keep)
        keep_np = keep_t.cpu().numpy()
        idx = np.flatnonzero(keep_np) if keep_np.dtype == bool else keep_np
        for k, v in self._stats.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                self._stats[k] = v[torch.as_tensor(idx, device=v.device, dtype=torch.long)]
            elif isinstance(v, np.ndarray):
                self._stats[k] = v[idx]
            else:
                self._stats[k] = [v[i] for i in idx]

    def cat(self, other: MaskData) -> None:
        """Append ``other``'s entries (fields missing on one side are an error)."""
        if len(other) == 0:
            return
        if len(self) == 0:
            self._stats = dict(other._stats)
            return
        if set(self._stats) != set(other._stats):
            raise ValueError(f"fields differ: {sorted(self._stats)} vs {sorted(other._stats)}")
        for k, v in other.items():
            mine = self._stats[k]
            if isinstance(v, torch.Tensor):
                self._stats[k] = torch.cat([mine, v.to(mine.device)])
            elif isinstance(v, np.ndarray):
                self._stats[k] = np.concatenate([mine, v])
            else:
                self._stats[k] = mine + list(v)

    def to_cpu(self) -> None:
        for k, v in self._stats.items():
            if isinstance(v, torch.Tensor):
                self._stats[k] = v.detach().cpu()
