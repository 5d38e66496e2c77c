"""Which network interface the ranks talk over, told to oneCCL, libfabric and gloo.

On a node with several interfaces, oneCCL's key-value store and libfabric's ``tcp`` provider
take the first one they find, and gloo the one the host's name resolves to; when that is not
the cluster network, the other nodes cannot reach it and the job fails after minutes. The
interface that can reach the other ranks is the one this host reaches MASTER_ADDR through,
so that is the default:

- ``IPEX_LARS_IFACE`` (``lars-run --iface``) names it explicitly; it must exist here;
- else the kernel is asked which local address it uses towards MASTER_ADDR (a UDP socket
  "connected" to it sends nothing), and the interface holding that address is the one;
- a job that may span nodes whose MASTER_ADDR is a *name* resolving to a loopback address
  (Debian maps a host's own name to 127.0.1.1) gives no answer: nothing is set, and the
  line printed says to set ``IPEX_LARS_IFACE``.

The chosen interface goes into ``CCL_KVS_IFACE``, ``FI_TCP_IFACE`` and ``GLOO_SOCKET_IFNAME``,
each only if the user has not set it.
"""

from __future__ import annotations

import array
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

from ipex_lars.distributed.env import Launch
from ipex_lars.distributed.rendezvous import RendezvousError

IFACE_ENV = "IPEX_LARS_IFACE"
IFACE_VARS = ("CCL_KVS_IFACE", "FI_TCP_IFACE", "GLOO_SOCKET_IFNAME")
_SIOCGIFCONF = 0x8912
_IFREQ_SIZE = 40  # struct ifreq on 64-bit Linux: 16-byte name + 24-byte union


class InterfaceError(RendezvousError):
    """The interface asked for does not exist here, or MASTER_ADDR cannot be resolved or reached."""


@dataclass
class Choice:
    """The interface chosen (None: none could be), how, and the variables it set."""

    name: str | None
    how: str
    applied: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        """One line for rank 0's log."""
        if self.name is None:
            return f"network interface: not chosen ({self.how}); set {IFACE_ENV}=<interface> if ranks cannot meet"
        settings = " ".join(f"{k}={v}" for k, v in self.applied.items()) or "nothing (all set by the user)"
        return f"network interface {self.name} ({self.how}); set {settings}"


def ipv4_addresses() -> dict[str, str]:
    """Every IPv4 address of this host -> its interface (aliases such as ``eth0:1`` as ``eth0``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        size = 64
        while True:
            buf = array.array("B", b"\0" * size * _IFREQ_SIZE)
            addr, _ = buf.buffer_info()
            used = struct.unpack("iL", fcntl.ioctl(s.fileno(), _SIOCGIFCONF, struct.pack("iL", len(buf), addr)))[0]
            if used < len(buf):
                break
            size *= 2  # the table filled the buffer: there may be more
    raw = buf.tobytes()
    found = {}
    for off in range(0, used, _IFREQ_SIZE):
        name = raw[off : off + 16].split(b"\0", 1)[0].decode()
        found[socket.inet_ntoa(raw[off + 20 : off + 24])] = name.split(":", 1)[0]
    return found


def ipv6_addresses(path: str = "/proc/net/if_inet6") -> dict[str, str]:
    """Every IPv6 address of this host -> its interface, from ``/proc/net/if_inet6``."""
    found = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6:
                    found[str(ipaddress.IPv6Address(bytes.fromhex(parts[0])))] = parts[5]
    except OSError:
        pass
    return found


def local_address_towards(host: str) -> str:
    """The local address the kernel's routing uses to reach ``host`` (no packet is sent)."""
    try:
        family, _, _, _, target = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    except socket.gaierror as exc:
        raise InterfaceError(
            f"cannot resolve MASTER_ADDR={host!r} ({exc.strerror}); set MASTER_ADDR to rank 0's host name or address"
        ) from None
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect(target)
        except OSError as exc:
            raise InterfaceError(
                f"no route from this host to MASTER_ADDR={host} ({exc.strerror}); check the "
                f"network, or name the interface with {IFACE_ENV}"
            ) from None
        return s.getsockname()[0].split("%", 1)[0]


def interface_of(address: str) -> str | None:
    """The interface holding ``address`` on this host, or None."""
    table = ipv6_addresses() if ":" in address else ipv4_addresses()
    if ":" in address:
        address = str(ipaddress.IPv6Address(address))
    return table.get(address)


def choose(launch: Launch, env: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """(interface, how it was chosen) for this rank; (None, why) when nothing can be said."""
    env = os.environ if env is None else env
    given = env.get(IFACE_ENV, "").strip()
    if given:
        names = {name for _, name in socket.if_nameindex()}
        if given not in names:
            raise InterfaceError(
                f"{IFACE_ENV}={given} (lars-run --iface) names no interface of this host "
                f"({socket.gethostname()}: {', '.join(sorted(names))}); name one of them"
            )
        return given, f"from {IFACE_ENV}"
    if launch.world_size == 1:
        return None, "single process"
    local = local_address_towards(launch.master_addr)
    loopback = ipaddress.ip_address(local).is_loopback
    literal = _is_address(launch.master_addr)
    if loopback and not literal and not launch.single_node:
        return None, (
            f"MASTER_ADDR={launch.master_addr} resolves to the loopback address {local} here, "
            "which other nodes cannot reach"
        )
    name = interface_of(local)
    if name is None:
        return None, f"no interface holds {local}, this host's address towards MASTER_ADDR={launch.master_addr}"
    return name, f"holds {local}, this host's address towards MASTER_ADDR={launch.master_addr}"


def apply(launch: Launch, env: MutableMapping[str, str] | None = None) -> Choice:
    """Choose the interface and set the variables the user has not set; returns what was done."""
    env = os.environ if env is None else env
    name, how = choose(launch, env)
    applied = {}
    if name is not None:
        applied = {var: name for var in IFACE_VARS if var not in env}
        env.update(applied)
    return Choice(name, how, applied)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False
