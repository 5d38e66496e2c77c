"""The ``ipex-lars`` command: one entry point, one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys

from launchers.argtypes import OneLineParser, UsageError

# subcommand -> module with add_arguments(parser) and run(args) -> exit code
COMMANDS = {
    "train": ("ipex_lars.train.command", "train a model with LARS from a recipe (default: the digits main job)"),
    "doctor": ("ipex_lars.doctor", "report the stack, CPU, topology and whether the C++ extensions load"),
    "build": ("ipex_lars.build", "build the C++ extensions for this torch and CPU (env/setup.sh runs it)"),
    "plan": ("ipex_lars.plan.command", "predict iteration time, time to train and scaling efficiency on N nodes"),
}
# `ipex-lars experiment NAME`
EXPERIMENTS = {
    "large-batch": (
        "ipex_lars.experiments.large_batch",
        "SGD vs LARS on MNIST digits (mnist5k): an lr sweep at one large batch, then growing batch "
        "sizes; tables and plots",
    ),
}
# `ipex-lars bench NAME`
BENCHMARKS = {
    "optimizer": (
        "ipex_lars.bench.optimizer",
        "LARS step time: fused vs foreach vs reference (vs IPEX) vs the memory floor",
    ),
    "comm": ("ipex_lars.bench.comm", "allreduce latency/bus bandwidth 1 KB-256 MB and a DDP step: oneccl vs gloo"),
    "train": (
        "ipex_lars.bench.train",
        "training img/s per precision x layout x backend x optimizer x batch, "
        "as ratios to plain PyTorch; per-phase times, memory, --ranks scaling",
    ),
    "launch": ("ipex_lars.bench.launch", "2 instances pinned by lars-run vs unpinned, with/without thread caps"),
}


def _register(subparsers, table: dict[str, tuple[str, str]]) -> None:
    for name, (module, help_text) in table.items():
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(  # subcommands inherit it: every usage error is one line, exit 2
        prog="ipex-lars",
        description="Large-batch training with LARS on Xeon CPUs. Run `ipex-lars COMMAND --help` for details.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _register(sub, COMMANDS)
    bench = sub.add_parser(
        "bench",
        help="benchmarks that print ratios measured side by side in one run",
        description="Benchmarks. Each prints a table and JSON; see docs/BENCHMARKS.md.",
    )
    _register(bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True), BENCHMARKS)
    experiment = sub.add_parser(
        "experiment",
        help="experiments that write their evidence to docs/",
        description="Experiments. Each writes a table and a plot.",
    )
    _register(experiment.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True), EXPERIMENTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        try:
            return importlib.import_module(args._module).run(args)
        except UsageError as exc:
            print(f"{_command_name(args)}: error: {exc}", file=sys.stderr)
            return 2
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # output piped into `head` and the like, which stopped reading: end quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141


def _command_name(args: argparse.Namespace) -> str:
    """``ipex-lars train``, ``ipex-lars bench comm``, ...: what a one-line error starts with."""
    words = [args.command, getattr(args, "benchmark", None), getattr(args, "experiment", None)]
    return " ".join(["ipex-lars", *(w for w in words if w)])


def _stdout_closed() -> bool:
    """Whether nobody reads our standard output any more (a pipe whose reader exited)."""
    poll = select.poll()
    poll.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


if __name__ == "__main__":
    sys.exit(main())
