"""A simulated cluster on one host: a network namespace per node on a private bridge.

Each node ``ilcnodeN`` is the namespace ``ilcnN`` (and that host name, in a UTS namespace of
its own) with one veth leg ``ilcv`` on the bridge ``ilcbr0`` (10.213.7.(10+N)/24, named in
/etc/hosts) and, listed before it, a decoy interface ``ilcd`` (10.213.8.(10+N)/24, a veth pair
inside the namespace that leads nowhere): a second network that a library picking "the first
interface" takes, and from which no other node can be reached. Processes share the host's PID
space, file system, /dev/shm and cgroups; only the network and the host name differ, which is
what multi-node code gets wrong.

``bootstrap_exec`` is a script ``HOST CMD...`` running CMD inside HOST's namespace, for hydra
(``I_MPI_HYDRA_BOOTSTRAP=rsh``); with ``ILC_CPUS_<host>=<cpus>`` in its environment, HOST's
processes may use only those CPUs, as on a smaller node or under a cgroup cpuset. Everything is removed
by :meth:`Cluster.teardown`, and
:func:`clean_stale` removes what an earlier, killed run left behind.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "ilc"
BRIDGE = "ilcbr0"
SUBNET = "10.213.7"
DECOY_SUBNET = "10.213.8"
HOSTS_MARK = "# ilc-simcluster"
HOSTS_FILE = Path("/etc/hosts")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Node:
    index: int
    ns: str
    host: str
    addr: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this node's network namespace, under this node's host name (a UTS
        namespace of its own); the mount namespace is left alone, so /sys/fs/cgroup stays visible:
        what slurmd needs, unlike ``ip netns exec``. The process keeps the pid of the command."""
        return [
            "nsenter",
            f"--net=/run/netns/{self.ns}",
            "--",
            "unshare",
            "--uts",
            "--",
            "/bin/sh",
            "-c",
            'hostname "$0" && exec "$@"',
            self.host,
            *argv,
        ]


@dataclass
class Cluster:
    nodes: list[Node]
    workdir: Path
    bootstrap_exec: Path = field(init=False)
    hostfile: Path = field(init=False)

    def __post_init__(self) -> None:
        table = "\n".join(f"  {n.host}|{n.addr}) ns={n.ns} name={n.host} ;;" for n in self.nodes)
        script = self.workdir / "ilc-rsh"
        # hydra calls it as `EXEC [options] HOST COMMAND...`; COMMAND is one shell string or several words
        script.write_text(f"""#!/bin/sh
while [ "${{1#-}}" != "$1" ]; do shift; done
host=$1; shift
case "$host" in
{table}
  *) echo "ilc-rsh: unknown host $host" >&2; exit 255 ;;
esac
eval "cpus=\\${{ILC_CPUS_$name:-}}"  # a node with fewer CPUs: ILC_CPUS_<host>=<list>
exec nsenter --net=/run/netns/$ns -- ${{cpus:+taskset -c $cpus}} unshare --uts -- \
  /bin/sh -c 'hostname "$0" && exec /bin/sh -c "$*"' "$name" "$@"
""")
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        self.bootstrap_exec = script
        self.hostfile = self.workdir / "hosts"
        self.hostfile.write_text("".join(f"{n.host}\n" for n in self.nodes))

    def hydra_env(self) -> dict[str, str]:
        """What makes hydra start its proxies inside the nodes' namespaces."""
        return {"I_MPI_HYDRA_BOOTSTRAP": "rsh", "I_MPI_HYDRA_BOOTSTRAP_EXEC": str(self.bootstrap_exec)}

    def teardown(self) -> None:
        remove_all()


def unavailable_reason() -> str | None:
    """Why no simulated cluster can be built here, or None."""
    if os.geteuid() != 0:
        return "the simulated cluster needs root (network namespaces, a bridge, /etc/hosts)"
    for tool in ("ip", "nsenter", "unshare", "taskset"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 util-linux)"
    probe = f"{PREFIX}probe{os.getpid() % 10000}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    if not os.access(HOSTS_FILE, os.W_OK):
        return f"{HOSTS_FILE} is not writable"
    return None


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def _kill_namespace_processes(ns: str) -> None:
    """SIGKILL what runs in one of our namespaces (only ``ilc*`` ones, which only this suite makes)."""
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def remove_all() -> None:
    """Delete every ``ilc*`` namespace (killing what runs inside), the bridge and our /etc/hosts lines."""
    for ns in _namespaces():
        _kill_namespace_processes(ns)
        _ip("netns", "del", ns, check=False)
    _ip("link", "del", BRIDGE, check=False)
    if HOSTS_FILE.exists():
        lines = HOSTS_FILE.read_text().splitlines(keepends=True)
        kept = [line for line in lines if HOSTS_MARK not in line]
        if kept != lines:
            with open(HOSTS_FILE, "w") as f:  # in place: /etc/hosts may be a bind mount
                f.writelines(kept)


clean_stale = remove_all


def build(nnodes: int, workdir: Path | None = None, decoy: bool = True) -> Cluster:
    """Create ``nnodes`` nodes on the bridge (with the decoy interface unless ``decoy`` is False)."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ilc-"))
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    nodes = []
    for i in range(nnodes):
        ns, node = f"{PREFIX}n{i}", Node(i, f"{PREFIX}n{i}", f"{PREFIX}node{i}", f"{SUBNET}.{10 + i}")
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        if decoy:  # created first, so it is listed first (lower index, and "ilcd" sorts before "ilcv")
            _ip("-n", ns, "link", "add", "ilcd", "type", "veth", "peer", "name", "ilcdpeer")
            _ip("-n", ns, "addr", "add", f"{DECOY_SUBNET}.{10 + i}/24", "dev", "ilcd")
            _ip("-n", ns, "link", "set", "ilcd", "up")
            _ip("-n", ns, "link", "set", "ilcdpeer", "up")
        _ip("link", "add", f"{PREFIX}h{i}", "type", "veth", "peer", "name", "ilcv", "netns", ns)
        _ip("link", "set", f"{PREFIX}h{i}", "master", BRIDGE)
        _ip("link", "set", f"{PREFIX}h{i}", "up")
        _ip("-n", ns, "addr", "add", f"{node.addr}/24", "dev", "ilcv")
        _ip("-n", ns, "link", "set", "ilcv", "up")
        # no default route: the host's DNS server is unreachable from a node, and a lookup there (c10d
        # names its peers) should fail at once, not after the resolver's timeouts
        nodes.append(node)
    ends_line = HOSTS_FILE.read_text().endswith("\n") if HOSTS_FILE.exists() else True
    with open(HOSTS_FILE, "a") as f:
        if not ends_line:
            f.write("\n")
        f.writelines(f"{n.addr} {n.host} {HOSTS_MARK}\n" for n in nodes)
        if decoy:  # hydra looks every local address up; unnamed, each costs a DNS timeout in a namespace
            f.writelines(f"{DECOY_SUBNET}.{10 + n.index} {n.host}-decoy {HOSTS_MARK}\n" for n in nodes)
    return Cluster(nodes, workdir)


def main(argv: list[str] | None = None) -> int:
    """``python tests/simcluster.py [--nodes N] -- CMD...``: build a cluster, run CMD on its first node
    with hydra's bootstrap variables set (``{hostfile}`` in CMD becomes the cluster's hostfile), remove it."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="simcluster", description=main.__doc__)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    why = unavailable_reason()
    if why or not command:
        print(f"simcluster: {why or 'no command given'}", file=sys.stderr)
        return 2
    clean_stale()
    cluster = build(args.nodes)
    try:
        argv_ = [a.replace("{hostfile}", str(cluster.hostfile)) for a in command]
        return subprocess.run(cluster.nodes[0].command(argv_), env=dict(os.environ, **cluster.hydra_env())).returncode
    finally:
        cluster.teardown()
        shutil.rmtree(cluster.workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
