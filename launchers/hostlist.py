"""Slurm's hostlist syntax, expanded: ``node[1-3,5],gpu[07-08]`` -> node1 node2 node3 node5 gpu07 gpu08.

Ranges keep their zero padding (``[07-10]`` -> 07 08 09 10), and several bracket groups in one
name multiply (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2), as ``scontrol show hostnames`` prints them.
"""

from __future__ import annotations

import itertools
import re

from affinity.errors import UsageError

_PART = re.compile(r"\[([^\[\]]*)\]|([^\[\]]+)")


class HostlistError(UsageError):
    """Not a Slurm hostlist."""


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c == "[") - (c == "]")
        if depth not in (0, 1):
            raise HostlistError(f"unbalanced brackets in hostlist {text!r}")
        if c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise HostlistError(f"unbalanced brackets in hostlist {text!r}")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _range(spec: str, text: str) -> list[str]:
    values = []
    for piece in spec.split(","):
        lo, sep, hi = piece.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise HostlistError(f"bad range {piece!r} in hostlist {text!r}")
        width = len(lo)
        values += [str(n).zfill(width) for n in range(int(lo), int(hi or lo) + 1)]
    return values


def expand(text: str) -> list[str]:
    """Every host of a Slurm hostlist, in order; raises HostlistError for anything else."""
    hosts: list[str] = []
    for item in _split_top(text):
        choices = [[fixed] if fixed else _range(spec, text) for spec, fixed in _PART.findall(item)]
        hosts += ["".join(parts) for parts in itertools.product(*choices)]
    if not hosts:
        raise HostlistError(f"hostlist {text!r} names no host")
    return hosts
