"""Supervise a job's processes to the end: forward stop signals, end the job when one process
fails, escalate to SIGKILL after a grace period, and leave no process behind.

lars-run supervises what it starts (local ranks, or one mpiexec / srun); :mod:`launchers.guard`
supervises the program of one mpi/slurm rank the same way.

* SIGTERM, SIGINT or SIGHUP (a signal inherited as ignored, as under nohup, stays ignored)
  is forwarded to every child as ``translate(signum)`` and starts the grace period.
* A child that exits non-zero (or is killed) on its own ends the job: one line names it and
  how it ended, the others get SIGTERM and the same grace period.
* When the grace period is over, or at a second SIGINT (Ctrl-C twice; in a guard, any second
  stop signal), every child still running is SIGKILLed with everything it started (its
  session or its process group).
* What a child leaves behind when it exits is SIGKILLed too, and every child gets SIGKILL
  should its supervisor die (``PR_SET_PDEATHSIG``), even by SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
DEFAULT_GRACE_S = 30.0
POLL_S = 0.05
RELAY_MARGIN_S = 5.0  # mpiexec/srun: the guards kill at the grace period; lars-run only after this too
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def exit_code(returncode: int) -> int:
    """Shell convention: a process killed by signal N counts as 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def how_it_ended(returncode: int) -> str:
    """``exited with code 3``, ``was killed by SIGKILL``, or ``exited with code 139 (128 + SIGSEGV)``
    (how launchers and shells pass on a child's signal), from a Popen return code."""
    if returncode < 0:
        return f"was killed by {_signal_name(-returncode) or f'signal {-returncode}'}"
    if returncode > 128 and _signal_name(returncode - 128):
        return f"exited with code {returncode} (128 + {_signal_name(returncode - 128)})"
    return f"exited with code {returncode}"


def to_ranks(signum: int) -> int:
    """What ranks (and mpiexec, which relays SIGTERM and SIGINT to them) get for a stop signal: SIGINT
    stays SIGINT, SIGTERM and SIGHUP become SIGTERM, the two that training handlers act on (hydra's
    mpiexec would die at SIGHUP, taking its ranks with it unsaved)."""
    return signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM


def to_srun(signum: int) -> int:
    """What srun gets for a stop signal: SIGUSR2, which srun relays to every process of the step and
    the guards take as a stop (Slurm 22.05's srun, measured: at SIGTERM it kills the tasks at once,
    unsaved; a single SIGINT only prints the tasks' states)."""
    return signal.SIGUSR2


def members(*, sid: int | None = None, pgid: int | None = None) -> list[int]:
    """Live (not zombie) processes of session ``sid`` or process group ``pgid``, read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        state, _ppid, group, session = stat[stat.rindex(")") + 2 :].split()[:4]
        if state != "Z" and (int(session) == sid or int(group) == pgid):
            found.append(int(entry))
    return found


def kill_all(*, sid: int | None = None, pgid: int | None = None) -> int:
    """SIGKILL every process of a session or process group, again until none is left (a process
    may fork while we look); returns how many were signalled."""
    killed: set[int] = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pids = members(sid=sid, pgid=pgid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    return len(killed)


def child_setup(
    deathsig: int, *, own_group: bool = False, then: Callable[[], None] | None = None
) -> Callable[[], None]:
    """``preexec_fn`` for a supervised child: it gets ``deathsig`` when its supervisor dies (even by
    SIGKILL), optionally leads a new process group, then runs ``then`` (e.g. pinning)."""
    libc = ctypes.CDLL(None, use_errno=True)
    supervisor = os.getpid()

    def setup() -> None:
        if own_group:
            os.setpgid(0, 0)
        libc.prctl(_PR_SET_PDEATHSIG, deathsig)
        if os.getppid() != supervisor:  # it died before prctl took effect
            os.kill(os.getpid(), deathsig)
        if then is not None:
            then()

    return setup


@contextmanager
def catching(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[list[int]]:
    """Within the block, these signals are appended to the yielded list instead of acting; one
    inherited as ignored stays ignored. The previous handlers come back afterwards."""
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in signals}
    for s, handler in previous.items():
        if handler != signal.SIG_IGN:
            signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield pending
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclass
class Child:
    """One supervised process. ``own_session``: it leads a session of its own (what lars-run
    starts), else a process group of its own (a guard's program, which stays in hydra's session).
    ``relays``: mpiexec or srun, whose ranks' guards report their own failures."""

    label: str
    proc: subprocess.Popen
    own_session: bool = True
    relays: bool = False

    def running(self) -> bool:
        """Whether it still runs (reaps it once it has ended)."""
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process itself (its children are its business)."""
        try:
            self.proc.send_signal(signum)
        except ProcessLookupError:
            pass

    def kill(self) -> int:
        """SIGKILL it and everything it started; returns how many processes that was."""
        pid = self.proc.pid
        return kill_all(sid=pid) if self.own_session else kill_all(pgid=pid)


def _describe(children: list[Child]) -> str:
    """How a stop line names who got the signal: the one child's label, or a count of ranks."""
    return children[0].label if len(children) == 1 else f"{len(children)} ranks"


class JobRun:
    """Supervision of started children until all are gone; :meth:`run` returns the exit code.

    ``pending`` is the list :func:`catching` fills. ``outermost`` (lars-run itself) announces
    stops and exits 128+signum after a stop signal; a guard is quiet about stops, passes its
    program's exit code through, and kills at any second stop signal: hydra's proxies send one
    when mpiexec is gone, e.g. after Ctrl-C twice.
    """

    def __init__(
        self,
        children: list[Child],
        grace: float,
        pending: list[int],
        *,
        translate: Callable[[int], int] = to_ranks,
        outermost: bool = True,
    ) -> None:
        self.children, self.grace, self.pending = children, grace, pending
        self.translate, self.outermost = translate, outermost
        self.signum: int | None = None  # first stop signal received
        self.failed: Child | None = None  # first child that failed on its own
        self.deadline: float | None = None  # end of the grace period, once stopping
        self.killed = False

    def run(self) -> int:
        """Supervise until every child and what it started is gone; returns the exit code."""
        while True:
            self._take_signals()
            self._take_failure()
            if not self._live():
                break
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self._kill(f"grace period of {self.grace:g} s over")
            time.sleep(POLL_S)
        for c in self.children:
            left = c.kill()
            if left:
                _say(f"{c.label} left {left} process(es) running; SIGKILLed them")
        return self._code()

    def _live(self) -> list[Child]:
        """The children still running."""
        return [c for c in self.children if c.running()]

    def _stop(self, signum: int) -> str:
        """Send ``signum`` to every child still running, start the grace period; says what it did."""
        live = self._live()
        margin = RELAY_MARGIN_S if any(c.relays for c in live) else 0.0
        self.deadline = time.monotonic() + self.grace + margin
        for c in live:
            c.signal(signum)
        if not live:
            return ""
        return f": {signal.Signals(signum).name} to {_describe(live)}, SIGKILL after {self.grace:g} s"

    def _take_signals(self) -> None:
        """Act on the stop signals received since the last look."""
        while self.pending:
            signum = self.pending.pop(0)
            if self.deadline is None:
                self.signum = signum
                done = self._stop(self.translate(signum))
                if self.outermost:
                    _say(f"got {signal.Signals(signum).name}{done}")
            elif signum == signal.SIGINT or not self.outermost:
                self._kill(f"second stop signal ({signal.Signals(signum).name})")

    def _take_failure(self) -> None:
        """Before any stop: a child that ended non-zero stops the others and is named."""
        if self.deadline is not None:
            return  # already stopping: exits are expected
        failed = next((c for c in self.children if c.proc.poll() not in (None, 0)), None)
        if failed is None:
            return
        self.failed = failed
        done = self._stop(signal.SIGTERM)
        if not failed.relays:
            _say(f"{failed.label} (pid {failed.proc.pid}) {how_it_ended(failed.proc.returncode)}{done}")

    def _kill(self, why: str) -> None:
        """SIGKILL every child still running with all it started, once; says why and whom."""
        if self.killed:
            return
        self.killed = True
        live = self._live()
        for c in live:
            c.kill()
        if live:
            _say(f"{why}: SIGKILL to {', '.join(c.label for c in live)}")

    def _code(self) -> int:
        """128+signum after a stop signal (outermost), else the failed child's code, else the worst."""
        if self.signum is not None and self.outermost:
            return 128 + self.signum
        if self.failed is not None:
            return exit_code(self.failed.proc.returncode)
        return max(exit_code(c.proc.returncode) for c in self.children)


def _say(message: str) -> None:
    """One line on stderr, as lars-run."""
    print(f"lars-run: {message}", file=sys.stderr, flush=True)
