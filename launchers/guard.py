"""``python -m launchers.guard [--grace-period S] [--pmi-abort] -- PROGRAM [ARGS]``: one rank's supervisor.

lars-run puts this in front of every rank's program in the mpiexec and srun commands, so
the same rules hold on every host, whoever sends the signal (see :mod:`launchers.supervise`):

* SIGTERM, SIGINT and SIGHUP (as SIGTERM) are forwarded to the program, which runs in a
  process group of its own; that group is SIGKILLed when the grace period is over, or at a
  second stop signal. hydra and srun relay a signal to the guards and then wait, however
  long the ranks take; hydra's proxies send SIGTERM when mpiexec is gone and do not wait.
* When the program fails on its own, one line names the rank, the host and how it ended.
  With ``--pmi-abort`` (under hydra) the guard then asks hydra to abort the job over the PMI
  connection hydra gave it; lars-run sets ``I_MPI_JOB_ABORT_SIGNAL=15``, so every other
  rank's guard gets SIGTERM and its grace period. Without this, hydra waits for ranks that do
  not use MPI (oneCCL wired by the c10d store) forever. Under srun, ``--kill-on-bad-exit``
  ends the job; lars-run stops srun jobs with SIGUSR2 (``--usr2-stops``), since srun kills the
  tasks outright at SIGTERM.
* The exit code is the program's (128+N if signal N killed it); the program gets SIGKILL if
  the guard itself is killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys

from launchers.argtypes import OneLineParser, float_range
from launchers.supervise import DEFAULT_GRACE_S, STOP_SIGNALS, Child, JobRun, catching, child_setup

GRACE = float_range(0, 3600)


def command(grace: float, *, pmi_abort: bool, usr2_stops: bool = False) -> list[str]:
    """The argv prefix that runs a rank's program under the guard."""
    return [
        sys.executable,
        "-m",
        "launchers.guard",
        "--grace-period",
        f"{grace:g}",
        *(["--pmi-abort"] if pmi_abort else []),
        *(["--usr2-stops"] if usr2_stops else []),
        "--",
    ]


def rank_label() -> str:
    """``rank R on HOST``, R from the MPI or Slurm launch variables."""
    rank = os.environ.get("PMI_RANK") or os.environ.get("SLURM_PROCID") or "?"
    return f"rank {rank} on {socket.gethostname()}"


def pmi_abort(code: int) -> None:
    """Ask hydra to abort the job with ``code`` (PMI-1 ``abort`` over ``PMI_FD``); no-op without it."""
    fd = os.environ.get("PMI_FD", "")
    if fd.isdigit():
        try:
            os.write(int(fd), f"cmd=abort exitcode={code}\n".encode())
        except OSError:
            pass


def _parser() -> OneLineParser:
    p = OneLineParser(prog="launchers.guard", description="Supervise one rank's program (lars-run starts it).")
    p.add_argument(
        "--grace-period",
        type=GRACE,
        default=DEFAULT_GRACE_S,
        help="seconds between the forwarded stop signal and SIGKILL (default 30)",
    )
    p.add_argument(
        "--pmi-abort", action="store_true", help="when the program fails on its own, ask hydra to abort the job"
    )
    p.add_argument(
        "--usr2-stops",
        action="store_true",
        help="(under srun) SIGUSR2 is a stop signal too, and the program starts with SIGUSR2 ignored: "
        "srun relays it to every process of the step",
    )
    p.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS]")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the program to its end under supervision; returns its exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        parser.error("no PROGRAM given; append -- PROGRAM [ARGS]")
    label = rank_label()
    fd = os.environ.get("PMI_FD", "")
    stops = STOP_SIGNALS + ((signal.SIGUSR2,) if args.usr2_stops else ())
    ignore_usr2 = (lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN)) if args.usr2_stops else None
    with catching(stops) as pending:
        try:
            proc = subprocess.Popen(
                program,
                preexec_fn=child_setup(signal.SIGKILL, own_group=True, then=ignore_usr2),
                pass_fds=(int(fd),) if fd.isdigit() else (),
            )
        except OSError as exc:
            print(f"lars-run: {label}: cannot start {program[0]!r}: {exc.strerror}", file=sys.stderr, flush=True)
            if args.pmi_abort:
                pmi_abort(127)
                os._exit(127)
            return 127
        run = JobRun([Child(label, proc, own_session=False)], args.grace_period, pending, outermost=False)
        code = run.run()
        if run.failed is not None and args.pmi_abort:
            pmi_abort(code)
            os._exit(code)  # now, while signals are still caught: hydra answers with SIGTERM to this guard too
    return code


if __name__ == "__main__":
    sys.exit(main())
