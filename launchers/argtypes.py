"""argparse helpers: a parser whose errors are one line, and types that range-check values
where they are parsed.

A bad value then ends the command with exit code 2 and one line naming the flag, the
valid range and what was given, e.g. ``lars-run: error: argument --master-port: expected a
whole number from 1 to 65535, got '99999'``, before anything starts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


class UsageError(ValueError):
    """Bad input from the user: the command's main prints this one line and exits 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors on one line (exit code 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """Type accepting a whole number from ``lo`` to ``hi`` (both included)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a whole number from {lo} to {hi}, got {text!r}")
        return value

    return parse


def float_range(lo: float, hi: float, *, above: bool = False) -> Callable[[str], float]:
    """Type accepting a number from ``lo`` (or, with ``above``, greater than ``lo``) to ``hi``."""
    wanted = f"above {lo:g} and at most {hi:g}" if above else f"from {lo:g} to {hi:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (lo < value <= hi if above else lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"expected a number {wanted}, got {text!r}")
        return value

    return parse


def csv_of(item: Callable[[str], object], what: str) -> Callable[[str], list]:
    """Type accepting a comma-separated list of ``item`` values, none empty; ``what`` describes one
    item in the error (e.g. ``"rank counts from 2 to 256"``)."""

    def parse(text: str) -> list:
        parts = text.split(",")
        try:
            if "" in (p.strip() for p in parts):
                raise argparse.ArgumentTypeError("empty item")
            return [item(p.strip()) for p in parts]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    return parse
