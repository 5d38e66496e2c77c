"""``precision: auto`` and the CPU checks behind a bf16 run.

bf16 pays only where the CPU computes it natively (AVX512_BF16, AVX_NE_CONVERT or AMX);
elsewhere (Skylake, Cascade Lake, Xeon Phi, AMD Zen 2/3) oneDNN emulates it and fp32 is
faster. IPEX's bf16 path also needs AVX512 BW/VL/DQ or AVX_NE_CONVERT for its weight
prepacking, and asserts deep inside ``ipex.optimize`` without them: that is refused here,
before any work, with the alternatives.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import torch

from affinity.machine import Machine, this_machine
from ipex_lars.train.config import TrainConfig


def choose(cfg: TrainConfig, machine: Machine | None = None) -> tuple[TrainConfig, str]:
    """``cfg`` with a concrete precision, and one line saying what was chosen and why.

    Raises ValueError (one line, with the fix) for bf16 on IPEX where this CPU cannot run it.
    """
    cpu = (machine or this_machine()).cpu
    if cfg.precision == "auto":
        precision = "bf16" if cpu.native_bf16 else "fp32"
        why = f"precision auto -> {precision}: {cpu.bf16_verdict()}"
    else:
        precision = cfg.precision
        why = f"precision {precision} (as asked)"
        if precision == "bf16" and not cpu.native_bf16:
            why += f"; note: {cpu.bf16_verdict()}"
    missing = cpu.ipex_bf16_missing()
    if precision == "bf16" and cfg.execution == "ipex" and missing:
        if cfg.precision == "auto":  # cannot happen today (native bf16 implies the prepack ISA), kept safe
            precision, why = "fp32", f"precision auto -> fp32: IPEX bf16 needs {missing[0]}"
        else:
            raise ValueError(
                f"--execution ipex --precision bf16 needs {missing[0]}, which this CPU ({cpu.model}) "
                "lacks; use --execution native (bf16 autocast), --precision fp32, or --precision auto"
            )
    return dataclasses.replace(cfg, precision=precision), why


def autocast(cfg: TrainConfig):
    """The context a forward pass runs in: bf16 autocast for precision bf16, else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()


def to_input(images: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """A batch in the memory format the model was put in (channels_last or not)."""
    return images.contiguous(memory_format=torch.channels_last) if cfg.channels_last else images
