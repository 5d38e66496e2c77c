"""``lars-run``: NUMA-aware launcher for multi-instance and multi-node CPU jobs.

Parses the ipexrun-compatible flags, plans cores per rank with :mod:`affinity`, then
hands the plan to one launcher (local processes, Intel MPI, Slurm, or torchrun-style env).
Bad input exits with code 2 and a one-line ``lars-run: error: ...``, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import replace

from affinity.cpuset import CpuListError, allowed_cpus, format_cpulist, parse_cpulist
from affinity.machine import Machine, load_machine, this_machine
from affinity.plan import NodePlan, PlanRequest, make_plan, place_memory
from affinity.rank_env import resolve
from affinity.topology import Topology, load_topology
from launchers import hostlist, identity, local, mpi, slurm, torchrun_env
from launchers.argtypes import OneLineParser, UsageError, int_range
from launchers.guard import GRACE
from launchers.hostfile import read_hostfile
from launchers.job import Job, LaunchError
from launchers.rank_spec import RankSpec
from launchers.supervise import DEFAULT_GRACE_S

IFACE_ENV = "IPEX_LARS_IFACE"  # read by ipex_lars.distributed.interface in every rank
LAUNCHERS = ("local", "mpi", "slurm", "torchrun-env")
MAX_CPUS = 8192  # Linux's limit (CONFIG_NR_CPUS with MAXSMP)
PER_NODE = int_range(1, MAX_CPUS)


def cpu_list_text(text: str) -> str:
    """argparse type of ``--allowed-cpus`` and ``--nodes-list``: the kernel's list format, checked."""
    try:
        parse_cpulist(text)
    except CpuListError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def memory_node(text: str) -> str:
    """argparse type of ``--memory-node``: ``hbm``, ``ddr`` or a NUMA node number (normalised)."""
    if text in ("hbm", "ddr"):
        return text
    if text.isascii() and text.isdigit():
        return str(int(text))
    raise argparse.ArgumentTypeError(f"{text!r} is not hbm, ddr or a NUMA node number")


def interface_name(text: str) -> str:
    """argparse type of ``--iface``: a Linux interface name (1-15 characters, no '/', ':' or blanks)."""
    if 0 < len(text) <= 15 and text.isascii() and not any(c in text for c in "/: \t"):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a network interface name (1-15 characters, e.g. eth0, ib0)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="lars-run",
        description=(
            "Run PROGRAM as pinned instances (one per NUMA node by default) on this machine, or as "
            "ranks on several nodes via Intel MPI, Slurm or torchrun-style env. Each rank gets its own "
            "physical cores, memory on its NUMA node (or, with --memory-node hbm, on the nearest HBM/MCDRAM "
            "node), OMP_NUM_THREADS and affinity variables, and (multi-rank) oneCCL worker cores. Use "
            "--dry-run --json to see the plan without running. SIGTERM, SIGINT or SIGHUP to lars-run reaches every "
            "rank (see --grace-period); when one rank fails, lars-run stops the others and names it."
        ),
        epilog="examples:\n  lars-run --ninstances 2 bench.py\n"
        "  lars-run --nnodes 2 --nprocs-per-node 2 --hostfile hosts -m ipex_lars train\n"
        "  lars-run --dry-run --json --topology xeon.lscpu --nprocs-per-node 2 train.py\n"
        "  lars-run --memory-node hbm -m ipex_lars train      # Xeon Max / Xeon Phi in flat mode\n"
        "  lars-run --dry-run --machine max9480 --memory-node hbm train.py\n"
        "      (max9480/ written on the target by `python -m affinity.machine --save max9480`)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("instances and cores")
    g.add_argument("--ninstances", type=PER_NODE, help="processes on this machine (default: one per NUMA node)")
    g.add_argument(
        "--ncores-per-instance",
        type=int_range(1, MAX_CPUS),
        help="OpenMP cores per instance (default: the largest even split that keeps each "
        "instance inside one NUMA node); oneCCL worker cores come on top",
    )
    g.add_argument("--nodes-list", type=cpu_list_text, help="NUMA nodes to use, e.g. 0,1 or 0-3 (default: all allowed)")
    g.add_argument(
        "--use-logical-cores",
        action="store_true",
        help="also run OpenMP threads on hyper-thread siblings (default: physical cores only)",
    )
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--throughput-mode",
        action="store_true",
        help="one instance per NUMA node using all its cores (the default layout)",
    )
    mode.add_argument(
        "--latency-mode", action="store_true", help="4 cores per instance, as many instances as fit; KMP_BLOCKTIME=0"
    )
    where = g.add_mutually_exclusive_group()
    where.add_argument(
        "--topology",
        metavar="FILE",
        help="plan for the machine described by FILE (`lscpu -p=CPU,CORE,SOCKET,NODE` output) "
        "instead of this one; CPUs only, no memory nodes; needs --dry-run",
    )
    where.add_argument(
        "--machine",
        metavar="DIR",
        help="plan for the machine described in DIR (its CPUs and its NUMA memory nodes, "
        "HBM/MCDRAM included), as `python -m affinity.machine --save DIR` writes it on "
        "that machine; needs --dry-run",
    )
    g.add_argument(
        "--allowed-cpus",
        metavar="LIST",
        type=cpu_list_text,
        help="restrict to these CPUs, e.g. 0-15 (default: this process's scheduler mask and "
        "cgroup cpuset; with --topology/--machine: every CPU described)",
    )
    r = p.add_argument_group("runtime libraries and pinning")
    r.add_argument(
        "--memory-allocator",
        choices=("auto", "default", "tcmalloc", "jemalloc"),
        default="auto",
        help="LD_PRELOAD this allocator, found under versioned names too (auto: tcmalloc, "
        "then jemalloc, else the default malloc)",
    )
    r.add_argument(
        "--omp-runtime",
        choices=("auto", "default", "intel"),
        default="auto",
        help="intel: LD_PRELOAD libiomp5 and set KMP_AFFINITY/KMP_BLOCKTIME; default: GNU "
        "OpenMP with GOMP_CPU_AFFINITY (auto: intel when libiomp5 is installed)",
    )
    r.add_argument(
        "--multi-task-manager",
        choices=local.BINDERS,
        default="auto",
        help="how local processes are pinned: numactl (cores + memory), taskset, sched "
        "(os.sched_setaffinity before exec), none (OpenMP affinity variables only); "
        "auto uses the first of numactl, taskset, sched that works here",
    )
    r.add_argument(
        "--memory-node",
        type=memory_node,
        metavar="{hbm,ddr,N}",
        help="where each rank's memory goes. hbm: the CPU-less node (HBM of a Xeon Max, MCDRAM "
        "of a Xeon Phi, in flat memory mode) nearest to the rank's cores, as numactl "
        "--preferred, so what does not fit spills to DDR instead of failing; ddr: only the "
        "rank's own NUMA node(s), numactl --membind; N: NUMA node N, preferred. Needs "
        "numactl with every launcher (mpi and slurm ranks run under it too) and refuses to "
        "run without it. Default: bind to the rank's own nodes when numactl works here "
        "(local, torchrun-env), else first touch",
    )
    d = p.add_argument_group("multi-rank / multi-node")
    d.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        help="local: independent instances; mpi: mpiexec.hydra (impi-rt); slurm: srun; "
        "torchrun-env: spawn this node's ranks with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* "
        "(default: mpi if --nnodes/--nprocs-per-node/--hostfile is given, else local)",
    )
    d.add_argument("--nnodes", type=int_range(1, 65536), help="number of nodes (default: hosts in --hostfile, else 1)")
    d.add_argument("--nprocs-per-node", type=PER_NODE, help="ranks per node (default: one per NUMA node)")
    d.add_argument(
        "--node-rank",
        type=int_range(0, 65535),
        default=0,
        help="torchrun-env: index of this machine in the hostfile (default 0)",
    )
    d.add_argument("--hostfile", help="one hostname or IP per line; first host is the default master")
    d.add_argument("--master-addr", help="rendezvous address (default: first host, or 127.0.0.1)")
    d.add_argument(
        "--master-port",
        type=int_range(1, 65535),
        help="rendezvous port, 1-65535 (default: one free on the master when it is this machine, "
        "else derived from the job id; never a fixed port another job also uses)",
    )
    d.add_argument(
        "--job-id",
        help="id every rank of this job shares (IPEX_LARS_JOB_ID); ranks refuse a store of "
        "another job (default: $IPEX_LARS_JOB_ID, else a new one; torchrun-env on "
        "several nodes derives it from the hosts, master and program)",
    )
    d.add_argument(
        "--ccl-worker-count",
        type=int_range(0, 64),
        help="oneCCL worker threads per rank, each pinned to a core of its own when one is "
        "spare (default: 1 for multi-rank launches, 0 for independent instances)",
    )
    d.add_argument(
        "--logical-cores-for-ccl",
        action="store_true",
        help="put oneCCL workers on hyper-thread siblings of the rank's cores instead of "
        "taking physical cores from OpenMP",
    )
    d.add_argument(
        "--iface",
        type=interface_name,
        metavar="NAME",
        help="network interface the ranks talk over, on every node (IPEX_LARS_IFACE; ranks then set "
        "CCL_KVS_IFACE, FI_TCP_IFACE and GLOO_SOCKET_IFNAME unless set). Default: each rank "
        "takes the interface holding its address towards the master address",
    )
    d.add_argument(
        "--mpiexec", metavar="PATH", help="mpiexec.hydra to use (default: next to this Python, else on PATH)"
    )
    d.add_argument(
        "--extra-mpi-params",
        metavar="'OPTS'",
        default="",
        help="more mpiexec.hydra options, one shell-quoted string (e.g. '-genv I_MPI_DEBUG 5'), "
        "placed before the program; --launcher mpi only",
    )
    d.add_argument("--bind-numa-node", action="store_true", help=argparse.SUPPRESS)
    s = p.add_argument_group("stopping")
    s.add_argument(
        "--grace-period",
        type=GRACE,
        default=DEFAULT_GRACE_S,
        metavar="SECONDS",
        help="SIGTERM, SIGINT or SIGHUP to lars-run is passed to every rank (SIGINT as SIGINT, "
        "the others as SIGTERM; mpiexec and srun relay it to every host); when a rank exits "
        "non-zero or is killed, the others get SIGTERM. Either way ranks then have SECONDS "
        "(0-3600, default 30) to save and exit before they are SIGKILLed with everything they "
        "started; Ctrl-C twice kills at once. lars-run then exits 128+signal, or with the "
        "failed rank's code, named in one line",
    )
    o = p.add_argument_group("output")
    o.add_argument("--log-dir", help="write each process's stdout+stderr to LOG_DIR/rank_<N>.log")
    o.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    o.add_argument(
        "--print-sbatch",
        action="store_true",
        help="--launcher slurm: print a batch script (nodes, tasks per node, CPUs per task from the "
        "plan) that runs this same lars-run command inside its allocation, and exit",
    )
    o.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    p.add_argument("-m", "--module", action="store_true", help="PROGRAM is a Python module, run as `python -m PROGRAM`")
    p.add_argument(
        "program", nargs="?", metavar="PROGRAM", help="script (.py runs with this Python) or executable to launch"
    )
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for PROGRAM")
    return p


def program_argv(args: argparse.Namespace, spawned_here: bool) -> list[str]:
    """The command every rank runs, before any pinning prefix. ``spawned_here``: lars-run starts
    it on this machine, so a missing script or executable is reported before anything starts."""
    if args.program is None:
        if not args.dry_run:
            raise LaunchError("no PROGRAM given; append the script or `-m MODULE` to run")
        return ["PROGRAM"]
    if args.module:
        return [sys.executable, "-u", "-m", args.program, *args.args]
    if args.program.endswith(".py"):
        if spawned_here and not os.path.isfile(args.program):
            raise LaunchError(f"script {args.program} not found; check the path")
        return [sys.executable, "-u", args.program, *args.args]
    if spawned_here and shutil.which(args.program) is None:
        raise LaunchError(f"program {args.program} not found or not executable; check the path or PATH")
    return [args.program, *args.args]


def _hosts(args: argparse.Namespace, launcher: str) -> list[str]:
    hosts = read_hostfile(args.hostfile) if args.hostfile else None
    where = f"hostfile {args.hostfile}"
    if hosts is None and launcher == "slurm" and os.environ.get("SLURM_JOB_NODELIST"):  # inside an allocation
        try:
            hosts = hostlist.expand(os.environ["SLURM_JOB_NODELIST"])
        except hostlist.HostlistError as exc:
            raise LaunchError(f"SLURM_JOB_NODELIST: {exc}; pass --hostfile") from None
        where = f"the allocation (SLURM_JOB_NODELIST={os.environ['SLURM_JOB_NODELIST']})"
    nnodes = args.nnodes if args.nnodes is not None else (len(hosts) if hosts else 1)
    if hosts is None:
        if nnodes == 1:
            return ["localhost"]
        if launcher == "slurm":
            return [f"slurm-node-{i}" for i in range(nnodes)]
        raise LaunchError(f"--nnodes {nnodes} needs --hostfile (one hostname or IP per line)")
    if len(hosts) < nnodes:
        raise LaunchError(f"--nnodes {nnodes} but {where} lists only {len(hosts)} host(s); add hosts or lower --nnodes")
    return hosts[:nnodes]


def _machine(args: argparse.Namespace) -> tuple[Machine | None, Topology, set[int]]:
    """The machine to plan for (None for --topology, which describes CPUs only), its topology,
    and the CPUs the plan may use."""
    described = args.machine or args.topology
    if described and not args.dry_run:
        flag = "--machine" if args.machine else "--topology"
        raise LaunchError(f"{flag} {described} describes another machine; add --dry-run to see its plan")
    extra = parse_cpulist(args.allowed_cpus) if args.allowed_cpus else None
    if described:
        machine = load_machine(args.machine) if args.machine else None
        topo = machine.topology if machine else load_topology(args.topology)
        return machine, topo, extra if extra is not None else topo.cpu_ids
    allowed = allowed_cpus()
    if extra is not None and not extra <= allowed:
        raise LaunchError(
            f"--allowed-cpus {args.allowed_cpus} includes CPUs this process may not use "
            f"(allowed here: {format_cpulist(allowed)})"
        )
    machine = this_machine()
    return machine, machine.topology, extra if extra is not None else allowed


def _need_numactl(args: argparse.Namespace, plan: NodePlan) -> None:
    """An explicit --memory-node is refused, not ignored, when numactl cannot place memory here."""
    why = local.numactl_problem(plan.ranks[0])
    if why:
        raise LaunchError(
            f"--memory-node {args.memory_node} needs numactl to place memory, but numactl {why}; "
            "install numactl (apt-get install numactl) or drop --memory-node"
        )


def _numactl_on_every_host(args: argparse.Namespace, plan: NodePlan) -> None:
    """mpi/slurm with --memory-node: every rank runs under numactl; checked here unless planning elsewhere."""
    described = args.machine or args.topology
    if described:
        plan.notes.append(
            f"--memory-node: ranks run under numactl on every host (not probed: planning for {described})"
        )
    else:
        _need_numactl(args, plan)
        plan.notes.append("--memory-node: ranks run under numactl on every host (checked on this one)")


def _binder(args: argparse.Namespace, plan: NodePlan) -> str:
    """Pinning tool for processes lars-run spawns itself: probed here, assumed for --topology/--machine."""
    if args.memory_node is not None and args.multi_task_manager in ("taskset", "sched", "none"):
        raise LaunchError(
            f"--memory-node {args.memory_node} needs numactl, but --multi-task-manager "
            f"{args.multi_task_manager} cannot place memory; use --multi-task-manager numactl or auto"
        )
    described = args.machine or args.topology
    if described:
        binder = "numactl" if args.multi_task_manager == "auto" else args.multi_task_manager
        plan.notes.append(f"pinning tool not probed (planning for {described}): {binder} assumed")
        return binder
    if args.memory_node is not None:
        _need_numactl(args, plan)
        return "numactl"
    binder, why = local.detect_binder(args.multi_task_manager, plan.ranks[0])
    plan.notes += why
    return binder


def make_job(args: argparse.Namespace) -> Job:
    """Turn parsed flags into a :class:`Job` (raises UsageError on bad input)."""
    distributed = any(x is not None for x in (args.nnodes, args.nprocs_per_node, args.hostfile))
    launcher = args.launcher or ("mpi" if distributed else "local")
    if (
        launcher != "local"
        and args.ninstances is not None
        and args.nprocs_per_node is not None
        and args.ninstances != args.nprocs_per_node
    ):
        raise LaunchError("--ninstances and --nprocs-per-node disagree; give only --nprocs-per-node")
    if launcher == "local" and distributed and (args.nnodes or 1) > 1:
        raise LaunchError(
            "--launcher local runs on this machine only; use --launcher mpi, slurm or torchrun-env for --nnodes > 1"
        )
    if args.bind_numa_node:
        raise LaunchError(
            "--bind-numa-node (ipexrun) is not a lars-run flag: each rank's memory is bound to its own "
            "NUMA node already when numactl works; use --memory-node ddr to require it"
        )
    if args.extra_mpi_params and launcher != "mpi":
        raise LaunchError(f"--extra-mpi-params only applies to --launcher mpi (this is {launcher}); drop it")
    if args.iface and launcher == "local":
        raise LaunchError(
            "--iface applies to ranks that talk (--launcher mpi, slurm or torchrun-env), not to "
            "independent local instances; drop it"
        )
    if args.node_rank != 0 and launcher != "torchrun-env":
        raise LaunchError("--node-rank only applies to --launcher torchrun-env")

    machine, topo, allowed = _machine(args)
    ccl = args.ccl_worker_count if args.ccl_worker_count is not None else (0 if launcher == "local" else 1)
    req = PlanRequest(
        ninstances=args.nprocs_per_node or args.ninstances,
        ncores_per_instance=args.ncores_per_instance,
        nodes_list=tuple(sorted(parse_cpulist(args.nodes_list))) if args.nodes_list else None,
        use_logical_cores=args.use_logical_cores,
        ccl_worker_count=ccl,
        logical_cores_for_ccl=args.logical_cores_for_ccl,
        mode="latency" if args.latency_mode else "throughput" if args.throughput_mode else None,
    )
    plan = make_plan(topo, allowed, req)
    if args.memory_node is not None:
        place_memory(plan, args.memory_node, machine)
    choice = resolve(args.memory_allocator, args.omp_runtime)
    plan.notes += choice.notes
    program = program_argv(args, not args.dry_run and launcher in ("local", "torchrun-env"))
    hosts = _hosts(args, launcher) if launcher != "local" else ["localhost"]
    if args.master_addr is None and not args.hostfile and len(hosts) > 1 and launcher != "slurm":
        raise LaunchError(f"--launcher {launcher} on {len(hosts)} nodes needs --master-addr or --hostfile")
    master = args.master_addr or (hosts[0] if args.hostfile else "127.0.0.1")
    if launcher == "slurm":  # each rank derives what is not given from Slurm (ipex_lars.distributed.env)
        master = args.master_addr
    if launcher != "local":  # ranks that meet: a job id of their own and a port no other job uses
        per_node_launch = launcher == "torchrun-env" and len(hosts) > 1  # each node runs its own lars-run
        job = identity.job_id(
            args.job_id or identity.default_job_id(), [*hosts, master, *program] if per_node_launch else None
        )
        if launcher == "slurm" and args.master_port is None:
            why = "master address and port derived by the ranks from Slurm"
        else:
            args.master_port, why = identity.master_port(
                args.master_port, master or hosts[0], job, derive=per_node_launch
            )
        if not args.dry_run:
            os.environ["IPEX_LARS_JOB_ID"] = job  # every rank inherits it, through mpiexec and srun too
        plan.notes.append(f"job id {job} (IPEX_LARS_JOB_ID); {why}")
        if args.iface:
            if not args.dry_run:
                os.environ[IFACE_ENV] = args.iface  # inherited by every rank, as the job id
            plan.notes.append(f"ranks talk over interface {args.iface} ({IFACE_ENV})")

    if launcher in ("local", "torchrun-env"):
        binder = _binder(args, plan)
        if launcher == "local":
            return local.build(plan, choice, program, binder, latency=args.latency_mode)
        if not 0 <= args.node_rank < len(hosts):
            raise LaunchError(f"--node-rank {args.node_rank} is outside 0..{len(hosts) - 1}")
        return torchrun_env.build(
            plan, hosts, program, choice, binder, master_addr=master, master_port=args.master_port
        )
    bind_memory = args.memory_node is not None
    if bind_memory:
        _numactl_on_every_host(args, plan)
    if launcher == "mpi":
        exe = mpi.find_mpiexec(args.mpiexec)
        if exe is None:
            if not args.dry_run:
                raise LaunchError(
                    f"{args.mpiexec or mpi.MPIEXEC} not found or not executable; "
                    "pip install impi-rt in this venv, or pass --mpiexec PATH"
                )
            exe = mpi.MPIEXEC
            plan.notes.append("mpiexec.hydra not found here; shown by name")
        try:
            extra = shlex.split(args.extra_mpi_params)
        except ValueError as exc:
            raise LaunchError(
                f"--extra-mpi-params {args.extra_mpi_params!r}: {exc}; quote it as one shell string"
            ) from None
        allowed_given = format_cpulist(parse_cpulist(args.allowed_cpus)) if args.allowed_cpus else None
        spec = RankSpec(
            replace(req, ninstances=len(plan.ranks)),
            allowed_given,
            args.memory_allocator,
            args.omp_runtime,
            args.memory_node,
        )
        hostfile = os.path.join(args.log_dir or tempfile.gettempdir(), f"lars-run-{job}.hosts")
        return mpi.build(
            plan,
            hosts,
            program,
            choice,
            spec,
            master_addr=master,
            master_port=args.master_port,
            mpiexec=exe,
            hostfile=hostfile,
            log_dir=args.log_dir,
            bind_memory=bind_memory,
            grace=args.grace_period,
            extra_mpi_params=extra,
        )
    nodefile = os.path.join(args.log_dir or tempfile.gettempdir(), f"lars-run-{job}.hosts") if args.hostfile else None
    return slurm.build(
        plan,
        hosts,
        program,
        choice,
        master_addr=master,
        master_port=args.master_port,
        nodefile=nodefile,
        log_dir=args.log_dir,
        bind_memory=bind_memory,
        grace=args.grace_period,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lars-run`` and ``python -m launchers``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.print_sbatch:
            if args.launcher != "slurm":
                raise LaunchError("--print-sbatch writes a Slurm batch script; add --launcher slurm")
            args.dry_run = True
            print(slurm.sbatch_script(make_job(args), list(sys.argv[1:] if argv is None else argv)), end="")
            return 0
        job = make_job(args)
        if args.dry_run:
            print(job.to_json() if args.json else job.to_text())
            return 0
        for note in job.notes:
            print(f"lars-run: note: {note}", file=sys.stderr)
        if job.launcher == "local":
            return local.run(job, args.log_dir, args.grace_period)
        if job.launcher == "torchrun-env":
            return local.run(torchrun_env.this_node(job, args.node_rank), args.log_dir, args.grace_period)
        return mpi.run_outer(job, args.log_dir, args.grace_period)
    except UsageError as exc:
        print(f"lars-run: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
