"""Which checkpoint a run resumes from, agreed by all its ranks.

Only rank 0 writes checkpoints, into its ``--out-dir``, so only rank 0 decides: with
``--resume auto`` the newest intact checkpoint there (each damaged one passed over with a
warning), with ``--resume FILE`` that file. It broadcasts the decision: the file, its
step and the SHA-256 saved in it. Every other rank then reads the same checkpoint itself,
from its own ``--out-dir`` (``auto``: the same file name) or from ``FILE``, and checks it
holds what rank 0's holds. Then the ranks compare: if any rank cannot read it, every rank
stops with the same one-line error naming that rank, its host, the path and the fix, so
no rank trains from another step and none waits for a peer that already gave up.

Why each rank reads the file rather than receiving the state from rank 0 by broadcast:
a checkpoint holds the weights and the optimizer's momentum, hundreds of MB for the
ImageNet models, and a broadcast would send all of it from rank 0's one link to every
rank, through a collective backend that was not built for that, with a pickled copy in
rank 0's memory; and a job whose checkpoints live only on rank 0's local disk loses them
all with that node. Clusters give jobs a shared filesystem for exactly this, so a rank
that cannot see the checkpoint is a setup error, reported before any work is done.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from ipex_lars.train import checkpoint
from ipex_lars.train.config import TrainConfig

# Settings that fix the data order and the learning-rate schedule: a resumed run must keep them.
MUST_MATCH = (
    "model",
    "data",
    "global_batch",
    "seed",
    "epochs",
    "optimizer",
    "lr",
    "warmup_epochs",
    "warmup_start_lr",
    "poly_power",
    "end_lr",
    "momentum_style",
)


class ResumeRefused(ValueError):
    """The run cannot resume as asked. Every rank raises it together, with the same message."""


@dataclass(frozen=True)
class Decision:
    """What rank 0 decided: an error all ranks raise, a fresh start (no ``path``), or a checkpoint."""

    error: str | None = None
    path: str = ""  # rank 0's path to the checkpoint
    in_out_dir: bool = False  # --resume auto: every rank reads the file of that name in its own --out-dir
    step: int = 0
    sha256: str | None = None  # None: a checkpoint from before checksums, matched by step only
    host: str = ""


def agree(cfg: TrainConfig, out: Path, rank: int = 0, world: int = 1) -> tuple[Path, dict] | None:
    """The checkpoint every rank resumes from and what it holds (read by this rank), or None to start afresh.

    Every rank of the job must call it. Raises ResumeRefused (one line, the same on every rank) when rank 0
    cannot resume as asked (no intact checkpoint, one made with other settings, a fresh run in a folder
    of checkpoints) or some rank cannot read the checkpoint rank 0 chose.
    """
    found = None
    if rank == 0:
        try:
            found = _rank0_choice(cfg, out)
            if found is not None:
                _check_settings(found[1]["config"], cfg)
            decision = (
                Decision()
                if found is None
                else Decision(
                    path=str(found[0]),
                    in_out_dir=cfg.resume == "auto",
                    step=found[1]["step"],
                    sha256=checkpoint.saved_sha256(found[0]),
                    host=socket.gethostname(),
                )
            )
        except ValueError as exc:
            decision = Decision(error=str(exc))
    else:
        decision = None
    decision = _broadcast(decision, world)
    if decision.error:
        raise ResumeRefused(decision.error)
    if not decision.path:
        return None
    if rank == 0:
        mine, problem = found, None
    else:
        path = out / Path(decision.path).name if decision.in_out_dir else Path(decision.path)
        mine, problem = _read_same(path, decision)
    problems = _gather(problem, world)
    failed = [(r, p) for r, p in enumerate(problems) if p]
    if failed:
        first, reason = failed[0]
        others = f" (and rank(s) {', '.join(str(r) for r, _ in failed[1:])} likewise)" if len(failed) > 1 else ""
        where = "into every rank's --out-dir" if decision.in_out_dir else "to that path on every rank's host"
        raise ResumeRefused(
            f"rank {first} {reason}{others}; rank 0 resumes from {decision.host}:{decision.path} "
            f"(step {decision.step}). Put --out-dir on a filesystem all ranks share, or copy that "
            f"file {where}"
        )
    return mine


def _rank0_choice(cfg: TrainConfig, out: Path) -> tuple[Path, dict] | None:
    """Rank 0's checkpoint to resume from and what it holds, or None to start afresh.

    ``--resume FILE`` must be intact; ``--resume auto`` takes the newest intact checkpoint in ``out``,
    warning about each damaged one it passes over. A fresh run refuses a folder that holds checkpoints.
    """
    if not cfg.resume:
        if existing := checkpoint.all_checkpoints(out):
            raise ValueError(
                f"{out} already holds checkpoints (newest {existing[-1].name}); continue that run "
                "with --resume auto, or start this one in a new --out-dir"
            )
        return None
    if cfg.resume != "auto":
        try:
            return Path(cfg.resume), checkpoint.load(cfg.resume)
        except checkpoint.CorruptCheckpoint as exc:
            raise ValueError(
                f"{exc}; resume from another one, or use --resume auto for the newest intact one in --out-dir"
            ) from None
    found = checkpoint.all_checkpoints(out)
    for path in reversed(found):
        try:
            return path, checkpoint.load(path)
        except checkpoint.CorruptCheckpoint as exc:
            print(f"[ipex-lars] warning: {exc}; --resume auto skips it", file=sys.stderr, flush=True)
    if found:
        raise ValueError(
            f"none of the {len(found)} checkpoint(s) in {out} is intact (see the warnings above); "
            "start afresh in a new --out-dir"
        )
    return None


def _check_settings(saved: dict, cfg: TrainConfig) -> None:
    """Refuse a checkpoint made with another data order or learning-rate schedule."""
    defaults = TrainConfig()  # a checkpoint from before a setting existed was made with its default
    for key in MUST_MATCH:
        made_with = saved.get(key, getattr(defaults, key))
        if made_with != getattr(cfg, key):
            raise ValueError(
                f"cannot resume: the checkpoint was made with {key}={made_with!r}, this run has "
                f"{getattr(cfg, key)!r}; use the same setting or a new --out-dir"
            )


def _read_same(path: Path, decision: Decision) -> tuple[tuple[Path, dict] | None, str | None]:
    """(path, state) if ``path`` here holds the checkpoint rank 0 chose, else (None, why not)."""
    where = f"(host {socket.gethostname()})"
    if not path.is_file():
        return None, f"{where} cannot resume: {path} does not exist there"
    try:
        if decision.sha256 is not None and checkpoint.saved_sha256(path) != decision.sha256:
            return None, f"{where} cannot resume: {path} there is another checkpoint than rank 0's (SHA-256 differs)"
        state = checkpoint.load(path, quiet=True)
    except (checkpoint.CorruptCheckpoint, OSError) as exc:
        return None, f"{where} cannot resume from {path}: {exc}"
    if state.get("step") != decision.step:
        return None, f"{where} cannot resume: {path} there holds step {state.get('step')}, not {decision.step}"
    return (path, state), None


def _broadcast(decision: Decision | None, world: int) -> Decision:
    if world == 1:
        return decision
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(problem: str | None, world: int) -> list[str | None]:
    if world == 1:
        return [problem]
    problems: list[str | None] = [None] * world
    dist.all_gather_object(problems, problem)
    return problems
