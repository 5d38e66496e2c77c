"""Slurm on the simulated cluster: munged, slurmctld on the first node, one slurmd per node.

Each daemon runs inside its node's network namespace through ``nsenter --net`` (``ip netns
exec`` would remount /sys and hide /sys/fs/cgroup from slurmd), with a private munge socket,
key and state directory, so nothing of the host's own Slurm or munge setup is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from simcluster import Cluster

DAEMONS = ("munged", "slurmctld", "slurmd", "srun", "sinfo")


def unavailable_reason() -> str | None:
    """Why Slurm cannot run here, or None."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge; .ci/run does it as root)"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class Slurm:
    cluster: Cluster
    root: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self) -> dict[str, str]:
        """What srun, sinfo and lars-run need to find this Slurm."""
        return {"SLURM_CONF": str(self.conf)}

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
            p.wait()
        subprocess.run(["pkill", "-KILL", "-F", str(self.root / "munged.pid")], capture_output=True)


def _write_conf(cluster: Cluster, root: Path, cpus: int) -> None:
    head = cluster.nodes[0]
    nodes = "\n".join(f"NodeName={n.host} NodeAddr={n.addr} CPUs={cpus} State=UNKNOWN" for n in cluster.nodes)
    (root / "slurm.conf").write_text(f"""ClusterName=ilc
MailProg=/bin/true
SlurmctldHost={head.host}({head.addr})
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
{nodes}
PartitionName=ilc Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")


def start(cluster: Cluster, timeout: float = 60) -> Slurm:
    """Start munged and the Slurm daemons; wait until every node is idle (or raise RuntimeError)."""
    root = cluster.workdir / "slurm"
    (root / "ctld").mkdir(parents=True, exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    slurm = Slurm(cluster, root)
    _write_conf(cluster, root, len(os.sched_getaffinity(0)))
    subprocess.run(
        [
            _exe("munged"),
            "--force",
            f"--socket={root}/munge.socket",
            f"--key-file={key}",
            f"--pid-file={root}/munged.pid",
            f"--log-file={root}/munged.log",
            f"--seed-file={root}/munge.seed",
        ],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ, SLURM_CONF=str(slurm.conf))
    log = open(root / "daemons.out", "ab")
    head = cluster.nodes[0]
    # slurmctld runs only on a host whose name is SlurmctldHost: node commands run under the node's name
    slurm.procs.append(
        subprocess.Popen(
            head.command([_exe("slurmctld"), "-D", "-i", "-f", str(slurm.conf)]), env=env, stdout=log, stderr=log
        )
    )
    for n in cluster.nodes:
        (root / f"spool-{n.host}").mkdir(exist_ok=True)
        slurm.procs.append(
            subprocess.Popen(
                n.command([_exe("slurmd"), "-D", "-N", n.host, "-f", str(slurm.conf)]), env=env, stdout=log, stderr=log
            )
        )
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        dead = [p.args for p in slurm.procs if p.poll() is not None]
        if dead:
            slurm.stop()
            raise RuntimeError(f"a Slurm daemon exited: {dead}; see {root}")
        res = subprocess.run(
            head.command(["sinfo", "-h", "-N", "-o", "%N %t"]), env=env, capture_output=True, text=True
        )
        state = res.stdout.strip()
        if (
            res.returncode == 0
            and len(state.splitlines()) == len(cluster.nodes)
            and all(line.split()[1] == "idle" for line in state.splitlines())
        ):
            return slurm
        time.sleep(0.5)
    slurm.stop()
    raise RuntimeError(f"Slurm nodes not idle after {timeout:g} s: {state!r}; see {root}")
