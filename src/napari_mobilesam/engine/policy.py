"""How the engine sizes its work for the machine it runs on.

One place for the decisions that depend on the hardware rather than on the model:
threads (adapted to other processes' load on a CPU, :mod:`.threads`), how many prompts
one decoder pass takes on a CPU and on a GPU. :meth:`Engine.describe` reports them, and
tests check the decisions without timing anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .threads import ADAPTIVE

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
    adaptive_threads : bool
        On a CPU, use fewer torch threads while other processes keep CPUs busy
        (:mod:`.threads`; off for every engine with ``MOBILESAM_ADAPTIVE_THREADS=0``).
    cpu_batch_workers : bool
        On a CPU, decode segment-everything's independent prompt batches on worker
        threads of one torch thread each, as many as the calling thread's base thread
        count (:mod:`.workers`), instead of each small operation on all threads.
    """

    cpu_prompts_per_pass: int = 4
    gpu_prompt_bytes: int = 24 * 2**20
    gpu_memory_fraction: float = 0.6
    adaptive_threads: bool = True
    cpu_batch_workers: bool = True

    def threads(self) -> int:
        """torch's intra-op threads of the calling thread (torch picks the physical cores
        unless told; :meth:`apply_threads` adapts them)."""
        return torch.get_num_threads()

    def apply_threads(self, device: torch.device) -> int:
        """Before work on ``device`` in the calling thread: on a CPU, set torch's threads
        for the machine's load now (:class:`~.threads.AdaptiveThreads`). Returns the
        thread count."""
        if device.type == "cpu" and self.adaptive_threads:
            return ADAPTIVE.apply()
        return torch.get_num_threads()

    def batch_workers(self, device: torch.device) -> int:
        """Worker threads for independent prompt batches (1: the calling thread alone).

        On a CPU with :attr:`cpu_batch_workers`, the calling thread's base count: the
        torch threads it has, or had before the adaptive policy reduced them. Not fewer
        on a busy machine: workers that never wait for each other use whatever share of
        the cores the scheduler gives them. Elsewhere 1 (a GPU runs a batch at once)."""
        if device.type != "cpu" or not self.cpu_batch_workers:
            return 1
        if self.adaptive_threads and ADAPTIVE.enabled:
            return max(1, ADAPTIVE.base())
        return max(1, torch.get_num_threads())

    def describe_threads(self, device: torch.device) -> str:
        """``"2 threads"``, ``"2 threads (adaptive)"`` or ``"1 of 2 threads (other
        processes busy)"``."""
        if device.type != "cpu" or not self.adaptive_threads or not ADAPTIVE.enabled:
            return f"{torch.get_num_threads()} threads"
        base = ADAPTIVE.base()
        if base <= 1:
            return f"{base} threads"
        now = ADAPTIVE.decide(base)
        if now < base:
            return f"{now} of {base} threads (other processes busy)"
        return f"{base} threads (adaptive)"

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
