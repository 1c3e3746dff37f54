"""How the engine sizes its work for the machine it runs on.

One place for the decisions that depend on the hardware rather than on the model:
threads, how many prompts one decoder pass takes on a CPU and on a GPU. (A policy
that adapts to a busy machine belongs here too, so :meth:`Engine.describe` can report
it and tests can check its decisions without timing anything.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_POLICY", "Policy"]


@dataclass(frozen=True)
class Policy:
    """Work sizes of an engine.

    Attributes
    ----------
    cpu_prompts_per_pass : int
        Prompts decoded together on a CPU: a few at a time keep the per-prompt image
        tensors (4096 x 256 floats each) in cache.
    gpu_prompt_bytes : int
        GPU memory one grid prompt takes while decoding in float32 (half that in 16
        bits): a few (4096, 256) image-token tensors and the (32, 256, 256) upscaled
        features.
    gpu_memory_fraction : float
        Share of the free GPU memory one decoder pass may take.
    """

    cpu_prompts_per_pass: int = 4
    gpu_prompt_bytes: int = 24 * 2**20
    gpu_memory_fraction: float = 0.6

    def threads(self) -> int:
        """torch's intra-op threads (torch picks the physical cores unless told)."""
        return torch.get_num_threads()

    def decoder_chunk(self, device: torch.device) -> int | None:
        """Prompts per decoder call inside one pass: a few on a CPU, all (None) elsewhere."""
        return self.cpu_prompts_per_pass if device.type == "cpu" else None

    def prompts_per_pass(
        self, device: torch.device, n_prompts: int, minimum: int, bits: int = 32
    ) -> int:
        """Grid prompts to decode in one pass: ``minimum`` on a CPU; on a GPU as many as
        fit in :attr:`gpu_memory_fraction` of its free memory (at least ``minimum``, at
        most ``n_prompts``), twice as many with a ``bits`` = 16 decoder."""
        if device.type != "cuda":
            return minimum
        free, _ = torch.cuda.mem_get_info(device)
        per_prompt = self.gpu_prompt_bytes * bits // 32
        fits = int(self.gpu_memory_fraction * free) // per_prompt
        return max(minimum, min(n_prompts, fits))


#: the policy of engines made without one
DEFAULT_POLICY = Policy()
