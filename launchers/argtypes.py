"""argparse helpers: a parser whose errors are one line, and types that range-check values
where they are parsed.

A bad value then ends the command with exit code 2 and one line naming the flag, the
valid range and what was given, e.g. ``lars-run: error: argument --master-port: expected a
whole number from 1 to 65535, got '99999'``, before anything starts.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Collection

from affinity.errors import UsageError

__all__ = [
    "OneLineParser",
    "UsageError",
    "byte_size",
    "csv_of",
    "float_range",
    "int_range",
    "one_of",
    "parse_size",
    "renamed",
]


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


def one_of(choices: Collection[str]) -> Callable[[str], str]:
    """Type accepting one of ``choices`` (as an item of ``csv_of``, which names them)."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def parse_size(size: str) -> int:
    """Bytes of a size written like 4K, 100M or 1G (powers of 1024), or a plain number."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(size[:-1]) * units[size[-1]]) if size[-1:] in units else int(size)


def byte_size(most: int) -> Callable[[str], str]:
    """Type accepting a size from 1 byte to ``most`` written like ``parse_size`` reads it, kept as
    written (benchmarks label their results with it)."""

    def parse(text: str) -> str:
        try:
            ok = 1 <= parse_size(text) <= most
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"bad size {text!r}")
        return text

    return parse


def renamed(new: str, prefix: str) -> type[argparse.Action]:
    """Action of a flag's old name: it stores into the new flag's dest after a warning on stderr
    that starts with ``prefix``. Given both, the later one wins, as for one flag given twice."""

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None) -> None:
            print(f"{prefix} {option_string} is now called {new}; {option_string} will go away", file=sys.stderr)
            setattr(namespace, self.dest, values)

    return Renamed
