"""``ipex-lars build``: compile every C++ extension for this torch and CPU, once.

env/setup.sh runs this so that training ranks only ever load finished builds.
"""

from __future__ import annotations

import argparse
import time

from ipex_lars import ext


def all_specs() -> list[ext.ExtensionSpec]:
    """Every extension the project ships, in build order."""
    from ipex_lars.distributed import EXTENSIONS as DIST_SPECS  # empty when oneCCL is not installed
    from ipex_lars.optim.fused import SPEC as LARS_SPEC

    return [LARS_SPEC, *DIST_SPECS]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")


def run(args: argparse.Namespace) -> int:
    for spec in all_specs():
        start = time.perf_counter()
        try:
            lib = ext.build(spec, verbose=args.verbose)
        except ext.ExtensionBuildError as exc:
            print(f"[build] {spec.name}: FAILED\n{exc}")
            return 1
        print(f"[build] {spec.name}: {lib} ({time.perf_counter() - start:.1f} s)")
    return 0
