"""Rank 0's per-step metrics, written as JSON lines and as CSV for spreadsheets and plotting tools."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

from ipex_lars.train.checkpoint import SaveError

PHASES = ("data", "forward", "backward", "allreduce", "optimizer")
CSV_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "lr",
    "images_per_second",
    *(f"{p}_seconds" for p in PHASES),
    "skipped_steps",
    "skipped_images",
    "val_top1",
    "val_top5",
    "val_loss",
    "val_skipped_images",
)


class MetricsLog:
    """``metrics-rank0.jsonl`` (every field) and ``metrics.csv`` (the scalars, one column each) in ``out``.

    A run starting at step ``resumed_at`` first forgets the lines of later steps, which it logs
    again (all of them for a fresh run, at step 0). A line a crash or a full disk cut short is
    dropped then, with a warning. The CSV is rebuilt from the JSON lines, so the two always agree.
    """

    def __init__(self, out: Path, resumed_at: int = 0) -> None:
        self.jsonl_path, self.csv_path = out / "metrics-rank0.jsonl", out / "metrics.csv"
        self._rewind(resumed_at)
        self._jsonl = open(self.jsonl_path, "a")
        self._csv_file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, CSV_COLUMNS, extrasaction="ignore")

    def write(self, record: dict) -> None:
        """Append one step's record to both files; ``SaveError`` in one line if the disk refuses."""
        try:
            self._jsonl.write(json.dumps(record) + "\n")
            self._csv.writerow(record)
            self._jsonl.flush()
            self._csv_file.flush()
        except OSError as exc:
            raise SaveError(
                f"cannot write metrics to {self.jsonl_path.parent}: {exc.strerror or exc}; free space "
                "there (or fix that), then continue with --resume auto"
            ) from exc

    def close(self) -> None:
        """Close both files; what a full disk kept in their buffers is dropped (``write`` reported it)."""
        for file in (self._jsonl, self._csv_file):
            try:
                file.close()
            except OSError:
                pass

    def _rewind(self, step: int) -> None:
        """Rewrite both files with the readable records of steps up to ``step``."""
        kept = [(line, record) for line, record in _readable_lines(self.jsonl_path) if record["step"] <= step]
        _replace(self.jsonl_path, "".join(line for line, _ in kept))
        table = io.StringIO()
        writer = csv.DictWriter(table, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(record for _, record in kept)
        _replace(self.csv_path, table.getvalue())


def _readable_lines(path: Path) -> list[tuple[str, dict]]:
    """Each complete, readable line of the JSON-lines file ``path`` (if any) with its record. A torn or
    unreadable line is left out, with a one-line warning naming the file."""
    if not path.exists():
        return []
    kept, dropped = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(keepends=True), 1):
        record = _record(line)
        if record is None:
            dropped.append(number)
        else:
            kept.append((line, record))
    if dropped:
        numbers = ", ".join(map(str, dropped[:5])) + (", ..." if len(dropped) > 5 else "")
        print(
            f"[ipex-lars] warning: dropped {len(dropped)} torn or unreadable line(s) of {path} (line {numbers}), "
            "as a crash or a full disk leaves them; rewrote the file without them",
            file=sys.stderr,
            flush=True,
        )
    return kept


def _record(line: str) -> dict | None:
    """The metrics record on ``line``, or None if the line is torn (no newline) or not a record."""
    if not line.endswith("\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and type(record.get("step")) is int else None


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` in one step: a crash meanwhile leaves the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)
