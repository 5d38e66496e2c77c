"""Rank 0's per-step metrics, written as JSON lines and as CSV for spreadsheets and plotting tools."""

from __future__ import annotations

import csv
import json
from pathlib import Path

PHASES = ("data", "forward", "backward", "allreduce", "optimizer")
CSV_COLUMNS = ("step", "epoch", "loss", "lr", "images_per_second", *(f"{p}_seconds" for p in PHASES),
               "skipped_steps", "skipped_images", "val_top1", "val_top5", "val_loss")


class MetricsLog:
    """``metrics-rank0.jsonl`` (every field) and ``metrics.csv`` (the scalars, one column each) in ``out``.

    A run starting at step ``resumed_at`` first forgets the lines of later steps, which it logs
    again (all of them for a fresh run, at step 0).
    """

    def __init__(self, out: Path, resumed_at: int = 0) -> None:
        self.jsonl_path, self.csv_path = out / "metrics-rank0.jsonl", out / "metrics.csv"
        self._rewind(resumed_at)
        new_csv = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._jsonl = open(self.jsonl_path, "a")
        self._csv_file = open(self.csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, CSV_COLUMNS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()

    def write(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._csv.writerow(record)
        self._jsonl.flush()
        self._csv_file.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()

    def _rewind(self, step: int) -> None:
        if self.jsonl_path.exists():
            kept = [line for line in self.jsonl_path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.jsonl_path.write_text("".join(line + "\n" for line in kept))
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= step]
            with open(self.csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
