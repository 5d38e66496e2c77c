"""``ipex-lars plan --calibrate``: fit alpha and beta to real oneccl allreduces on this machine.

The measurement is ``ipex-lars bench comm`` itself, run as a subprocess with 2 local ranks on
the project's ``oneccl`` backend, so the plan is calibrated on exactly what the benchmark
reports. The fit is a least-squares fit of the cost model's own formula,

    t(n) = messages(p) * alpha + bytes_sent(p, n) * beta

weighted by 1/t so that a 4 KB message counts as much as a 64 MB one (relative error, not
absolute, is minimised). With 2 ranks ring and Rabenseifner coincide: t = 2*alpha + n*beta.
The local reduction (gamma) is not separable from beta here and is folded into it.

The same benchmark run also times a DDP step over ResNet-50's 25.6M fp32 gradients with next
to no compute, i.e. a whole-gradient allreduce. The fit was not made on it, so comparing it
with the model's allreduce time is an honest check of the fitted model on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ipex_lars.plan.cost import coefficients
from ipex_lars.plan.presets import MODELS
from launchers.argtypes import parse_size

RANKS = 2
SIZES = "4K,64K,1M,16M,64M,100M"
DDP_STEPS = 5


class CalibrationError(RuntimeError):
    """The measurement could not run or could not be fitted."""


@dataclass(frozen=True)
class Fit:
    """Fitted alpha (s) and beta (s/byte), and the model's error at each measured size."""

    alpha_s: float
    beta_s_per_byte: float
    points: list[tuple[int, float, float]]  # (bytes, measured s, model s)
    ddp_step_s: float | None = None  # measured DDP step over ResNet-50's gradients, if there was one

    @property
    def bandwidth_gbps(self) -> float:
        return 8 / self.beta_s_per_byte / 1e9

    @property
    def ddp_step_model_s(self) -> float:
        """The fitted model's time for one allreduce of ResNet-50's fp32 gradients over the 2 ranks."""
        messages, sent, _ = coefficients("ring", RANKS, MODELS["resnet50"].params * 4)
        return messages * self.alpha_s + sent * self.beta_s_per_byte

    def as_network_file(self) -> dict:
        """What ``--save`` writes and ``plan --network`` reads."""
        return {
            "latency_us": self.alpha_s * 1e6,
            "bandwidth_gbps": self.bandwidth_gbps,
            "ddp_step": {"measured_s": self.ddp_step_s, "model_s": self.ddp_step_model_s},
            "fitted_on": {
                "ranks": RANKS,
                "backend": "oneccl",
                "host": os.uname().nodename,
                "bytes": [b for b, _, _ in self.points],
                "measured_s": [m for _, m, _ in self.points],
                "model_s": [f for _, _, f in self.points],
            },
            "note": "2 ranks on one machine: shared-memory transfers, not a network link",
        }


def message_bytes(size: str) -> int:
    """Bytes ``bench comm`` actually reduces for a size like ``4K``: a float32 tensor of size // 4 values."""
    return 4 * max(1, parse_size(size) // 4)


def measure(sizes: list[str], seconds: float, timeout: float = 600) -> tuple[dict[int, float], float]:
    """Median allreduce seconds per message size, and the DDP step, from ``bench comm`` on 2 oneccl ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "comm.json"
        cmd = [
            sys.executable,
            "-m",
            "ipex_lars",
            "bench",
            "comm",
            "--worlds",
            str(RANKS),
            "--backends",
            "oneccl",
            "--sizes",
            ",".join(sizes),
            "--seconds",
            str(seconds),
            "--ddp-steps",
            str(DDP_STEPS),
            "--json",
            str(path),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CalibrationError(f"`{' '.join(cmd[2:])}` did not finish within {timeout:.0f} s") from None
        if proc.returncode != 0 or not path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise CalibrationError(
                f"`ipex-lars bench comm` failed (rc {proc.returncode}): {' | '.join(tail)}; "
                "check `ipex-lars doctor` says the oneccl extension loads"
            )
        result = json.loads(path.read_text())["results"]["oneccl"][str(RANKS)]
    return {message_bytes(size): t for size, t in result["allreduce_s"].items()}, result["ddp_step_s"]


def fit(samples: dict[int, float], ddp_step_s: float | None = None, ranks: int = RANKS, algorithm: str = "ring") -> Fit:
    """Least-squares alpha, beta (weighted by 1/t, both kept >= 0) for measured ``{bytes: seconds}``."""
    if len(samples) < 2:
        raise CalibrationError("need at least two message sizes to fit latency and bandwidth")
    rows = []
    for n, t in sorted(samples.items()):
        messages, sent, _ = coefficients(algorithm, ranks, n)
        rows.append((messages / t, sent / t))  # each row weighted by 1/t; the target becomes 1
    saa = sum(a * a for a, _ in rows)
    sbb = sum(b * b for _, b in rows)
    sab = sum(a * b for a, b in rows)
    sa = sum(a for a, _ in rows)
    sb = sum(b for _, b in rows)
    det = saa * sbb - sab * sab
    alpha = (sa * sbb - sb * sab) / det if det else -1.0
    beta = (saa * sb - sab * sa) / det if det else -1.0
    if alpha < 0 or beta <= 0:  # the unconstrained optimum is infeasible: refit with alpha = 0
        alpha, beta = 0.0, sb / sbb
    points = []
    for n, t in sorted(samples.items()):
        messages, sent, _ = coefficients(algorithm, ranks, n)
        points.append((n, t, messages * alpha + sent * beta))
    return Fit(alpha, beta, points, ddp_step_s)


def report(result: Fit) -> list[str]:
    """The fit and, for each measured size, measured vs model time and the model's error."""
    lines = [
        f"fit ({RANKS} local ranks, oneccl; model t = 2*alpha + n*beta, least squares on relative error):",
        f"  alpha = {result.alpha_s * 1e6:.2f} us    beta = {result.beta_s_per_byte * 1e9:.4f} ns/byte "
        f"= {1 / result.beta_s_per_byte / 1e9:.2f} GB/s = {result.bandwidth_gbps:.1f} Gbit/s per rank",
        f"  {'bytes':>11} {'measured':>12} {'model':>12} {'error':>8}",
    ]
    for n, measured, model in result.points:
        lines.append(
            f"  {n:>11,} {measured * 1e6:>9.1f} us {model * 1e6:>9.1f} us {(model - measured) / measured * 100:>+7.1f}%"
        )
    if result.ddp_step_s:
        model, measured = result.ddp_step_model_s, result.ddp_step_s
        megabytes = MODELS["resnet50"].params * 4 / 1e6
        lines.append(
            f"check on a job the fit did not see: a DDP step over ResNet-50's {megabytes:.1f} MB of fp32 "
            f"gradients, forward and backward near-empty: measured {measured * 1e3:.1f} ms, "
            f"model {model * 1e3:.1f} ms ({(model - measured) / measured * 100:+.1f}%)"
        )
    return lines
