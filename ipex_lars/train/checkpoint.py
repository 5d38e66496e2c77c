"""Checkpoints that survive a crash at any moment: write to a temp file, fsync, rename.

A reader only ever sees complete files; the newest ``keep`` are kept.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"ckpt-(\d{8})\.pt")


def save(directory: str | Path, step: int, state: dict, keep: int) -> Path:
    """Write ``state`` as ``ckpt-<step>.pt`` atomically, then drop all but the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"ckpt-{step:08d}.pt"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    # Prune older steps only: never the file just written, never a later step (an explicit
    # resume from an earlier checkpoint branches; what came after it stays).
    older = [p for p in all_checkpoints(directory) if step_of(p) < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        old.unlink(missing_ok=True)
    return final


def step_of(path: Path) -> int:
    """The step a checkpoint file was written at."""
    return int(_NAME.fullmatch(path.name).group(1))


def all_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.fullmatch(p.name))


def load(path: str | Path) -> dict:
    """Read a checkpoint written by ``save``; a clear error if it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, not where in the unpickler
        raise ValueError(f"{path} is not a readable ipex-lars checkpoint ({type(exc).__name__}: {exc})") from None
