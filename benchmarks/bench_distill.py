"""Distillation training throughput: precomputed teacher embeddings vs running the teacher.

One training step of the student image encoder (forward, MSE against the teacher's
embedding, backward, AdamW with gradient clipping, as ``distill.train`` does), timed
two ways in one process, interleaved (A B A B ...):

- ours (decoupled distillation): the teacher's embeddings were computed once
  beforehand (``mobilesam-distill embed``); a step reads them as float16 tensors, as
  the embedding store provides them, and converts them to float32 on the device;
- baseline (coupled / online distillation): the teacher's image encoder runs on every
  batch (no gradient) before the student step, which is what training without the
  precomputed store costs.

Both paths get the same normalised, padded input batch (as the data loader delivers
it) and train their own copy of the same student. On CUDA both use autocast (bfloat16
where supported) and channels-last encoders, as ``distill.train`` does.

Usage::

    python benchmarks/bench_distill.py [--teacher vit_h] [--teacher-weights PATH]
        [--student vit_t] [--batch-size 2] [--steps 3] [--device auto]
        [--image-size N] [--json OUT]

Without ``--teacher-weights`` the ``vit_t`` teacher uses the golden checkpoint
(``../shared/golden/mobile_sam_random.pt``) when present; other teachers (and
``--image-size``) are randomly initialised, which does not change the timing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import default_weights, interleaved, machine, summary, write_json
from napari_mobilesam.build import build_sam, resolve_device
from napari_mobilesam.distill.models import build_student, load_sam, resolve_config, spec_name

PATHS = (
    ("ours", "decoupled: precomputed fp16 embeddings"),
    ("baseline", "online: teacher encoder every step"),
)


def _with_size(spec, image_size: int | None):
    """The config of ``spec``, its input side replaced by ``image_size`` when given."""
    cfg = resolve_config(spec)
    if image_size is None:
        return cfg
    return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, img_size=image_size))


def _teacher(teacher, teacher_weights, image_size, device):
    if image_size is not None and teacher_weights is not None:
        raise ValueError("image_size needs a randomly initialised teacher (no teacher_weights)")
    if teacher_weights is None and image_size is None and spec_name(teacher) == "vit_t":
        teacher_weights = default_weights()
    if teacher_weights is not None:
        return load_sam(teacher, teacher_weights, device=device), str(teacher_weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_sam(_with_size(teacher, image_size))
    model.model_name = spec_name(teacher)
    return model.eval().to(device), None


class _Path:
    """One student, its optimiser and a training step fed by ``targets()``."""

    def __init__(self, student, device, amp_dtype, targets) -> None:
        self.encoder = student.image_encoder.to(device).train()
        if device.type == "cuda":
            self.encoder.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.encoder.parameters(), lr=1e-4, weight_decay=0.01)
        self.device = device
        self.amp_dtype = amp_dtype
        self.targets = targets
        self.losses: list[float] = []

    def step(self, x_cpu: torch.Tensor) -> None:
        x = x_cpu.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.targets(x)
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        ):
            pred = self.encoder(x)
        loss = F.mse_loss(pred.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), 1.0)
        self.opt.step()
        self.losses.append(float(loss.detach()))  # synchronises, as logging does
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def run(
    teacher="vit_t",
    teacher_weights=None,
    student="vit_t",
    *,
    batch_size: int = 2,
    steps: int = 3,
    device="auto",
    image_size: int | None = None,
) -> dict:
    """Time both paths; returns a JSON-able dict (also used by the tests at tiny sizes).

    Parameters
    ----------
    teacher, student : ModelSpec
        Registry name, JSON config file or SamConfig.
    teacher_weights : path, optional
        Teacher checkpoint; default: the golden checkpoint for ``vit_t`` when present,
        else random initialisation.
    batch_size, steps : int
        Images per step; timed steps per path (after one warm-up step each).
    device : str
        ``"auto"``: CUDA when available.
    image_size : int, optional
        Override the input side of both models (random-initialised teacher), e.g. to
        run the real architectures at a small size.
    """
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size and steps must be >= 1, got {batch_size}, {steps}")
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    amp_dtype = None
    if cuda:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        torch.backends.cudnn.benchmark = True
    t_model, weights_used = _teacher(teacher, teacher_weights, image_size, dev)
    if cuda:
        t_model.image_encoder.to(memory_format=torch.channels_last)
    s_spec = _with_size(student, image_size)
    size = t_model.img_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, size, size, generator=gen)
    if cuda:
        x = x.pin_memory()
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        emb = t_model.image_encoder(x.to(dev)).float()
    stored = emb.to("cpu", torch.float16)  # what the embedding store holds
    if cuda:
        stored = stored.pin_memory()
    embed_shape = list(stored.shape[1:])

    def precomputed(_x):
        return stored.to(dev, non_blocking=True).float()

    def online(x_dev):
        with (
            torch.no_grad(),
            torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None),
        ):
            return t_model.image_encoder(x_dev).float()

    base_student = build_student(s_spec, t_model, seed=0)
    paths = {
        "ours": _Path(copy.deepcopy(base_student), dev, amp_dtype, precomputed),
        "baseline": _Path(copy.deepcopy(base_student), dev, amp_dtype, online),
    }
    times = interleaved({k: (lambda p=p: p.step(x)) for k, p in paths.items()}, steps)
    base_ips = batch_size / summary(times["baseline"])["median"]
    rows = []
    for key, label in PATHS:
        s = summary(times[key])
        ips = batch_size / s["median"]
        rows.append({"path": key, "label": label, "step_s": s, "images_per_s": ips,
                     "ratio": ips / base_ips, "last_loss": paths[key].losses[-1]})  # fmt: skip
    return {
        "machine": machine(),
        "device": str(dev),
        "amp": None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
        "teacher": spec_name(teacher),
        "teacher_weights": weights_used,
        "student": spec_name(student),
        "image_size": size,
        "embed_shape": embed_shape,
        "batch_size": batch_size,
        "steps": steps,
        "rows": rows,
    }


def report(result: dict) -> str:
    m = result["machine"]
    where = m.get("gpu", m["cpu"]) if result["device"].startswith("cuda") else m["cpu"]
    c, h, w = result["embed_shape"]
    lines = [
        f"teacher {result['teacher']} -> student {result['student']}, "
        f"{result['image_size']} px -> {c}x{h}x{w}, batch {result['batch_size']}, "
        f"{result['steps']} steps, {result['device']} ({where})"
        + (f", amp {result['amp']}" if result["amp"] else ""),
    ]
    head = f"{'path':40} {'images/s':>9} {'vs baseline':>12}"
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['label']:40} {r['images_per_s']:9.2f} {r['ratio']:11.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="vit_t", help="registry name or JSON config")
    p.add_argument("--teacher-weights", type=Path)
    p.add_argument("--student", default="vit_t", help="registry name or JSON config")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, help="override the models' input side")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = run(
        args.teacher,
        args.teacher_weights,
        args.student,
        batch_size=args.batch_size,
        steps=args.steps,
        device=args.device,
        image_size=args.image_size,
    )
    print(report(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
