"""Checkpoints that survive a crash at any moment and show any damage: write to a temp file, fsync, rename.

A checkpoint file is what ``torch.save`` writes (a zip) followed by a trailer holding the SHA-256 of
those bytes, so a changed byte anywhere in the file is found when it is loaded. ``torch.load`` still
reads the file as it is: zip readers find their directory from the end and step over trailing bytes.
Files from before checksums end in the zip's end record instead; they load unverified, with a note.

A reader only ever sees complete files; the newest ``keep`` are kept. A save the disk refuses removes
its temp file and raises ``SaveError``, leaving the checkpoints already there as they were.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import torch

_NAME = re.compile(r"ckpt-(\d{8})\.pt")
_TEMP = re.compile(r"\.ckpt-\d{8}\.pt\.tmp-\d+")  # a save in progress, or one a crash or full disk cut short
_TRAILER = b"\nipex-lars sha256 "  # then the 64 hex digits of the SHA-256 of every byte before the trailer
_TRAILER_SIZE = len(_TRAILER) + 64
_ZIP_END = b"PK\x05\x06"  # a zip's last record: 22 bytes, as torch.save writes no zip comment
_CHUNK = 1 << 20


class SaveError(Exception):
    """A checkpoint could not be written (a full disk, say); the checkpoints already there are intact."""


class CorruptCheckpoint(ValueError):
    """A checkpoint file that is missing, truncated, damaged or not a checkpoint at all."""


class _HashingWriter:
    """The file ``torch.save`` writes through: hashes the bytes, counts those attempted, and keeps the
    OSError a write raised (torch reports only ``unexpected pos``)."""

    def __init__(self, file) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.attempted = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.attempted += len(data)
        try:
            written = self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.sha256.update(data)
        return written

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            self.error = exc
            raise


def save(directory: str | Path, step: int, state: dict, keep: int) -> Path:
    """Write ``state`` and its checksum as ``ckpt-<step>.pt`` atomically, then drop all but the newest ``keep``.

    If the filesystem refuses (no space, say), the temp file is removed and ``SaveError`` says why.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"ckpt-{step:08d}.pt"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.write(_TRAILER + writer.sha256.hexdigest().encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException as exc:  # a full disk, a second Ctrl-C: never leave a partial file behind
        tmp.unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else exc
        if isinstance(cause, OSError):
            raise SaveError(_save_failure(final, cause, writer.attempted if writer is not None else 0)) from exc
        raise
    # Prune older steps only: never the file just written, never a later step (an explicit
    # resume from an earlier checkpoint branches; what came after it stays).
    older = [p for p in all_checkpoints(directory) if step_of(p) < step]
    for old in older[: max(0, len(older) - (keep - 1))]:
        old.unlink(missing_ok=True)
    return final


def _save_failure(final: Path, error: OSError, attempted: int) -> str:
    """One line on a failed save: where, the system's reason, for a full disk the space it needs, and what to do."""
    directory = final.parent
    existing = [p for p in all_checkpoints(directory) if p != final]
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    message = f"cannot save checkpoint {final.name} in {directory}: {error.strerror or error}"
    if full:
        if existing:
            need = f"about {human_size(existing[-1].stat().st_size)} (the size of {existing[-1].name})"
        else:
            need = f"more than the {human_size(attempted)} it had attempted"
        message += f"; a checkpoint needs {need}, {human_size(shutil.disk_usage(directory).free)} are free"
    fix = "free space there" if full else "fix that"
    if existing:
        return (
            f"{message}; the checkpoints there are intact (newest {existing[-1].name}): {fix}, then continue "
            "with --resume auto"
        )
    return f"{message}: {fix} or pick another --out-dir, then run again"


def human_size(n: int) -> str:
    """A byte count for people, in powers of 1000: ``812 bytes``, ``86.4 KB``, ``1.2 GB``."""
    exponent = min((len(str(n)) - 1) // 3, 4)
    return f"{n} bytes" if exponent == 0 else f"{n / 1000**exponent:.1f} {'KMGT'[exponent - 1]}B"


def remove_interrupted(directory: str | Path) -> tuple[int, int]:
    """Delete the temp files of saves a crash, a kill or a full disk cut short; return (files, bytes freed)."""
    directory = Path(directory)
    files = freed = 0
    if not directory.is_dir():
        return files, freed
    for path in directory.iterdir():
        if _TEMP.fullmatch(path.name):
            freed += path.lstat().st_size
            path.unlink(missing_ok=True)
            files += 1
    return files, freed


def step_of(path: Path) -> int:
    """The step a checkpoint file was written at."""
    return int(_NAME.fullmatch(path.name).group(1))


def all_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.fullmatch(p.name))


def load(path: str | Path, quiet: bool = False) -> dict:
    """Read a checkpoint written by ``save`` after checking its checksum.

    Raises ``CorruptCheckpoint`` (one line) if the file is missing, truncated, damaged or not a
    checkpoint. A file from before checksums loads unverified, with a note on stderr unless ``quiet``.
    Only tensors and plain containers are unpickled (``weights_only``): a crafted file cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpoint(f"checkpoint {path} does not exist")
    verified = _verify(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign file: say which, not where in the unpickler
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise CorruptCheckpoint(
            f"checkpoint {path} is not a readable ipex-lars checkpoint ({type(exc).__name__}: {reason})"
        ) from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"checkpoint {path} holds a {type(state).__name__}, not an ipex-lars checkpoint")
    if not verified and not quiet:
        print(
            f"[ipex-lars] note: {path} has no checksum (it predates them), so it was loaded unverified",
            file=sys.stderr,
            flush=True,
        )
    return state


def saved_sha256(path: str | Path) -> str | None:
    """The SHA-256 stored in a checkpoint's trailer (not re-computed: ``load`` checks it), or None for a file
    from before checksums; it names the checkpoint's content, whichever host or folder holds a copy."""
    path = Path(path)
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - _TRAILER_SIZE))
        tail = f.read()
    return tail[len(_TRAILER) :].decode() if len(tail) == _TRAILER_SIZE and tail.startswith(_TRAILER) else None


def _verify(path: Path) -> bool:
    """True if ``path`` ends in a checksum its bytes match, False if it predates checksums (it ends in the
    zip's end record); raises ``CorruptCheckpoint`` otherwise."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - _TRAILER_SIZE))
        tail = f.read()
        if len(tail) == _TRAILER_SIZE and tail.startswith(_TRAILER):
            if _sha256(f, size - _TRAILER_SIZE).encode() != tail[len(_TRAILER) :]:
                raise CorruptCheckpoint(
                    f"checkpoint {path} is damaged: its bytes do not match the SHA-256 saved with it"
                )
            return True
    if tail[-22:].startswith(_ZIP_END):
        return False
    raise CorruptCheckpoint(
        f"checkpoint {path} is truncated or damaged: it ends in neither a checksum nor a zip directory"
    )


def _sha256(f, length: int) -> str:
    """The hex SHA-256 of the first ``length`` bytes of the open file ``f``."""
    f.seek(0)
    digest = hashlib.sha256()
    while length > 0 and (chunk := f.read(min(_CHUNK, length))):
        digest.update(chunk)
        length -= len(chunk)
    return digest.hexdigest()
