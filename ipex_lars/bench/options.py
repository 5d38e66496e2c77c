"""An argparse type the benchmarks share, next to ``launchers.argtypes``: a name out of a fixed set,
checked where it is parsed, so a bad one ends the command with exit code 2 and one line naming its flag."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection


def one_of(choices: Collection[str]) -> Callable[[str], str]:
    """Type accepting one of ``choices`` (an item of ``launchers.argtypes.csv_of``, which names them)."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse
