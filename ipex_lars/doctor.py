"""``ipex-lars doctor``: what this machine and stack can do, and whether our extensions load.

The first thing to run on a new node, and the thing to paste into a bug report.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import warnings

from affinity.machine import Machine, MachineError, load_machine, this_machine
from launchers.argtypes import UsageError

PACKAGES = ("torch", "torchvision", "intel-extension-for-pytorch", "oneccl-cpu", "impi-rt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--machine",
        metavar="DIR",
        help="report on the machine described in DIR (made there with `python -m affinity.machine "
        "--save DIR`) instead of this one: ISA, bf16 verdict, memory nodes, topology; "
        "the stack and extensions are not checked",
    )


def cpu_info(machine: Machine | None = None) -> dict:
    """The CPU's model, ISA features, the ISA our kernels are built for, its bf16 verdict and NUMA memory nodes."""
    machine = machine or this_machine()
    info = machine.summary()
    if machine is this_machine():
        from ipex_lars.ext import ExtensionBuildError, kernel_isa

        try:
            info["kernel_isa"] = kernel_isa()  # honours IPEX_LARS_ISA
        except ExtensionBuildError as exc:
            info["kernel_isa_error"] = str(exc)
    return info


def _topology(machine: Machine) -> dict:
    from affinity import allowed_cpus, format_cpulist

    topo = machine.topology
    allowed = allowed_cpus() if machine is this_machine() else topo.cpu_ids
    usable = topo.restricted(allowed)
    return {
        **topo.summary(),
        "allowed_cpus": format_cpulist(allowed),
        "usable_physical_cores": len(usable.cores()),
        "notes": list(topo.notes),
    }


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _extensions() -> dict:
    from ipex_lars import ext
    from ipex_lars.build import all_specs

    report = {}
    for spec in all_specs():
        try:
            ext.load(spec)
            report[spec.name] = {"loads": True, "path": str(ext.build_dir(spec))}
        except Exception as exc:  # any failure is what doctor is for; report it, don't crash
            report[spec.name] = {"loads": False, "error": str(exc).splitlines()[0]}
    return report


def _cpu_problems(cpu: dict) -> list[str]:
    problems = []
    if "kernel_isa_error" in cpu:
        problems.append(cpu["kernel_isa_error"])
    return problems


def describe(machine: Machine) -> dict:
    """The report for a machine described as data: CPU and topology only."""
    cpu = cpu_info(machine)
    return {
        "machine": machine.source,
        "cpu": cpu,
        "topology": _topology(machine),
        "problems": [],
        "verdict": f"OK: {cpu['model']}: kernels for {cpu['kernel_isa']}, {cpu['bf16']}",
    }


def collect() -> dict:
    """Everything doctor reports about this machine and stack, as a dict."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import intel_extension_for_pytorch  # noqa: F401

            ipex_loads = True
        except ImportError:
            ipex_loads = False
    versions = _versions()
    machine = this_machine()
    report = {
        "machine": machine.source,
        "stack": "ipex" if versions["intel-extension-for-pytorch"] else "native",
        "versions": versions,
        "ipex_imports": ipex_loads,
        "cpu": cpu_info(machine),
        "topology": _topology(machine),
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "extensions": _extensions(),
    }
    problems = _cpu_problems(report["cpu"])
    problems += [
        f"extension {name} does not load: {info['error']} (run `ipex-lars build`)"
        for name, info in report["extensions"].items()
        if not info["loads"]
    ]
    if versions["intel-extension-for-pytorch"] and not ipex_loads:
        problems.append("IPEX is installed but does not import; re-run env/setup.sh ipex")
    for pkg in ("oneccl-cpu", "impi-rt"):
        if not versions[pkg]:
            problems.append(f"{pkg} is not installed; multi-rank runs fall back to gloo (env/setup.sh installs it)")
    report["problems"] = problems
    failed = [name for name, info in report["extensions"].items() if not info["loads"]]
    report["verdict"] = ("OK: " if not problems else "PROBLEM: ") + (
        f"{report['stack']} stack, torch {versions['torch']}, "
        + (f"extension(s) {', '.join(failed)} unavailable" if failed else "extensions ready")
        + f", kernels for {report['cpu'].get('kernel_isa', '?')}, {report['cpu']['bf16']}"
        + (f"; {len(problems)} problem(s) above" if problems else "")
    )
    return report


def _print(report: dict) -> None:
    cpu, topo = report["cpu"], report["topology"]
    print(f"machine     {report['machine']}")
    if "stack" in report:
        print(f"stack       {report['stack']}")
        print("versions    " + ", ".join(f"{k} {val or '-'}" for k, val in report["versions"].items()))
    print(f"cpu         {cpu['model']}")
    print("isa         " + ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in cpu["features"].items()))
    print(
        f"kernels     built for {cpu.get('kernel_isa', '?')} (this CPU can run: {', '.join(cpu['buildable_isas'])}; "
        "override with IPEX_LARS_ISA)"
    )
    print(f"bf16        {cpu['bf16']}; precision auto -> {'bf16' if cpu['native_bf16'] else 'fp32'}")
    if cpu["ipex_bf16_missing"]:
        print(f"ipex bf16   not possible: IPEX's bf16 weight prepack needs {cpu['ipex_bf16_missing'][0]}")
    for node in cpu["memory_nodes"]:
        where = (
            f"CPUs {node['cpus']}" if node["cpus"] else "no CPUs: HBM/MCDRAM in flat mode (lars-run --memory-node hbm)"
        )
        print(f"memory      node {node['node']}: {node['mem_gib']} GiB, {where}")
    print(
        f"topology    {topo['sockets']} socket(s), {topo['numa_nodes']} NUMA node(s) with CPUs, "
        f"{topo['physical_cores']} physical cores, {topo['logical_cpus']} logical CPUs (from {topo['source']})"
    )
    print(f"allowed     CPUs {topo['allowed_cpus']} ({topo['usable_physical_cores']} physical cores usable)")
    for note in topo["notes"]:
        print(f"note        {note}")
    if "threads" in report:
        print(f"threads     torch {report['threads']['torch']}, OMP_NUM_THREADS={report['threads']['OMP_NUM_THREADS']}")
    for name, info in report.get("extensions", {}).items():
        print(f"extension   {name}: " + ("loads" if info["loads"] else f"FAILS: {info['error']}"))
    for problem in report["problems"]:
        print(f"problem     {problem}")
    print(report["verdict"])


def run(args: argparse.Namespace) -> int:
    if args.machine:
        try:
            report = describe(load_machine(args.machine))
        except MachineError as exc:
            raise UsageError(str(exc)) from None
    else:
        report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0 if not report["problems"] else 1
