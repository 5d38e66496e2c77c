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
from pathlib import Path

ISA_FLAGS = {"AVX2": "avx2", "AVX-512": "avx512f", "AVX512-BF16": "avx512_bf16", "AMX-BF16": "amx_bf16"}
PACKAGES = ("torch", "torchvision", "intel-extension-for-pytorch", "oneccl-cpu", "impi-rt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def cpu_info() -> dict:
    """The CPU's model name, its vector ISA flags, and the ISA our kernels are built for."""
    from ipex_lars.ext import cpu_isa

    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": model, "isa": {name: flag in flags for name, flag in ISA_FLAGS.items()},
            "kernel_isa": cpu_isa()}


def _topology() -> dict:
    from affinity import allowed_cpus, discover, format_cpulist

    topo = discover()
    allowed = allowed_cpus()
    usable = topo.restricted(allowed)
    return {**topo.summary(), "allowed_cpus": format_cpulist(allowed),
            "usable_physical_cores": len(usable.cores()), "notes": list(topo.notes)}


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


def collect() -> dict:
    """Everything doctor reports, as a dict."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import intel_extension_for_pytorch  # noqa: F401
            ipex_loads = True
        except ImportError:
            ipex_loads = False
    versions = _versions()
    report = {
        "stack": "ipex" if versions["intel-extension-for-pytorch"] else "native",
        "versions": versions,
        "ipex_imports": ipex_loads,
        "cpu": cpu_info(),
        "topology": _topology(),
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "extensions": _extensions(),
    }
    problems = [f"extension {name} does not load: {info['error']} (run `ipex-lars build`)"
                for name, info in report["extensions"].items() if not info["loads"]]
    if versions["intel-extension-for-pytorch"] and not ipex_loads:
        problems.append("IPEX is installed but does not import; re-run env/setup.sh ipex")
    for pkg in ("oneccl-cpu", "impi-rt"):
        if not versions[pkg]:
            problems.append(f"{pkg} is not installed; multi-rank runs fall back to gloo (env/setup.sh installs it)")
    report["problems"] = problems
    report["verdict"] = ("OK: " if not problems else "PROBLEM: ") + (
        f"{report['stack']} stack, torch {versions['torch']}, fused LARS "
        f"{'ready' if all(i['loads'] for i in report['extensions'].values()) else 'unavailable'}"
        f" on {report['cpu']['kernel_isa']}" + (f"; {len(problems)} problem(s) above" if problems else ""))
    return report


def _print(report: dict) -> None:
    v, cpu, topo = report["versions"], report["cpu"], report["topology"]
    print(f"stack       {report['stack']}")
    print("versions    " + ", ".join(f"{k} {val or '-'}" for k, val in v.items()))
    print(f"cpu         {cpu['model']}")
    print("isa         " + ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in cpu["isa"].items())
          + f"  (kernels built for {cpu['kernel_isa']})")
    print(f"topology    {topo['sockets']} socket(s), {topo['numa_nodes']} NUMA node(s), "
          f"{topo['physical_cores']} physical cores, {topo['logical_cpus']} logical CPUs (from {topo['source']})")
    print(f"allowed     CPUs {topo['allowed_cpus']} ({topo['usable_physical_cores']} physical cores usable)")
    for note in topo["notes"]:
        print(f"note        {note}")
    print(f"threads     torch {report['threads']['torch']}, OMP_NUM_THREADS={report['threads']['OMP_NUM_THREADS']}")
    for name, info in report["extensions"].items():
        print(f"extension   {name}: " + ("loads" if info["loads"] else f"FAILS: {info['error']}"))
    for problem in report["problems"]:
        print(f"problem     {problem}")
    print(report["verdict"])


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0 if not report["problems"] else 1
