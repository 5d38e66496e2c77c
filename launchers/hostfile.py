"""Read and check a hostfile: one hostname or IP address per line, ``#`` comments allowed.

``host:slots`` and ``host slots=N`` (MPI styles) are accepted; slots are ignored because
ranks per node come from ``--nprocs-per-node``.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from affinity.errors import UsageError

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


class HostfileError(UsageError):
    """The hostfile is unreadable, empty or holds something that is not a host."""


def is_host(text: str) -> bool:
    """True for an IPv4/IPv6 address or an RFC 1123 hostname."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_HOSTNAME.fullmatch(text))


def read_hostfile(path: str | Path) -> list[str]:
    """Hosts in file order. Raises HostfileError naming the file, the line and the fix."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise HostfileError(
            f"cannot read hostfile {path}: {reason}; pass a readable text file with one hostname or IP per line"
        ) from None
    hosts: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        token = line.split()[0]
        if token.count(":") == 1:  # host:slots (an IPv6 address has several colons)
            token = token.split(":")[0]
        if not is_host(token):
            raise HostfileError(
                f"hostfile {path} line {lineno}: {token!r} is not a hostname or IP address; write one host per line"
            )
        if token in hosts:
            raise HostfileError(
                f"hostfile {path} line {lineno}: {token} is listed twice; list each "
                "node once and set ranks per node with --nprocs-per-node"
            )
        hosts.append(token)
    if not hosts:
        raise HostfileError(f"hostfile {path} lists no hosts; write one hostname or IP per line")
    return hosts
