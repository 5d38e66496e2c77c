"""Stopping and failing jobs with real processes: lars-run forwards SIGTERM/SIGINT/SIGHUP to every
rank under each launcher, SIGKILLs what outlives the grace period, ends the job when one rank
fails and names it, and leaves no process behind. The ranks are a tiny program, not training.

Each test prints ``TIMING <launcher> <event> <seconds>`` (see with ``pytest -s``): from the
signal, or from a rank's death, until every process of the job is gone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ALLOWED = sorted(os.sched_getaffinity(0))
MPIEXEC = Path(sys.executable).parent / "mpiexec.hydra"
LAUNCHERS = {
    "local": ["--ninstances", "2"],
    "torchrun-env": ["--launcher", "torchrun-env", "--nprocs-per-node", "2"],
    "mpi": ["--launcher", "mpi", "--nprocs-per-node", "2"],
}
HOST = {"local": "localhost", "torchrun-env": "localhost", "mpi": socket.gethostname()}
LAST = 1  # the rank pinned to the last allowed CPU, which the modes below single out
pytestmark = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 allowed CPUs")

# argv: OUT_DIR MODE NRANKS. Writes pid_<pid> ("pid sid last") when up, saved_<pid> (the signal's name)
# when its SIGTERM/SIGINT handler runs. Modes: save; ignore-last (the rank on the last CPU ignores
# SIGTERM and SIGINT); fail-last (that rank exits 3 once all NRANKS are up). Never runs past 60 s.
RANK = """\
import os, signal, sys, time
out, mode, nranks = sys.argv[1], sys.argv[2], int(sys.argv[3])
last = max(os.sched_getaffinity(0)) == %d
def save(signum, frame):
    with open(os.path.join(out, f"saved_{os.getpid()}"), "w") as f:
        f.write(signal.Signals(signum).name)
    sys.exit(0)
handler = signal.SIG_IGN if mode == "ignore-last" and last else save
signal.signal(signal.SIGTERM, handler)
signal.signal(signal.SIGINT, handler)
tmp = os.path.join(out, f"tmp_{os.getpid()}")
with open(tmp, "w") as f:
    f.write(f"{os.getpid()} {os.getsid(0)} {int(last)}")
os.rename(tmp, os.path.join(out, f"pid_{os.getpid()}"))
end = time.time() + 60
while time.time() < end:
    if mode == "fail-last" and last and len([n for n in os.listdir(out) if n.startswith("pid_")]) == nranks:
        sys.exit(3)
    time.sleep(0.02)
""" % ALLOWED[-1]


def default_stop_signals() -> None:
    """preexec_fn: lars-run keeps a stop signal it inherits as ignored, so hand it the defaults."""
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def launcher_params(*names: str) -> list:
    skip_mpi = pytest.mark.skipif(not MPIEXEC.exists(), reason="impi-rt (mpiexec.hydra) not in this venv")
    return [pytest.param(n, marks=skip_mpi) if n == "mpi" else n for n in names]


def live_pids(sids: set[int], pids: set[int]) -> set[int]:
    """Processes (not zombies) that are in one of ``sids`` or are one of ``pids``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _, _, sid = stat[stat.rindex(")") + 2 :].split()[:4]
        if state != "Z" and (int(sid) in sids or int(entry) in pids):
            found.add(int(entry))
    return found


class Job:
    """lars-run started in a session of its own on the rank program, with its ranks once they are up."""

    def __init__(self, tmp_path: Path, launcher: str, mode: str, *flags: str) -> None:
        self.out = tmp_path / "ranks"
        self.out.mkdir()
        script = tmp_path / "rank.py"
        script.write_text(RANK)
        self.log = open(tmp_path / "lars-run.err", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launchers", *LAUNCHERS[launcher], *flags, str(script), str(self.out), mode, "2"],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            start_new_session=True,
            preexec_fn=default_stop_signals,
        )
        self.ranks: dict[int, tuple[int, bool]] = {}  # pid -> (session, is the last-CPU rank)

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + 30
        while len(self.ranks) < 2 and time.monotonic() < deadline and self.proc.poll() is None:
            for f in self.out.glob("pid_*"):
                pid, sid, last = map(int, f.read_text().split())
                self.ranks[pid] = (sid, bool(last))
            time.sleep(0.02)
        assert len(self.ranks) == 2, self.stderr()

    def pid_of_last(self) -> int:
        return next(pid for pid, (_, last) in self.ranks.items() if last)

    def saved(self) -> dict[int, str]:
        """pid -> signal name, for every rank whose handler ran."""
        return {
            pid: (self.out / f"saved_{pid}").read_text() for pid in self.ranks if (self.out / f"saved_{pid}").exists()
        }

    def alive(self) -> set[int]:
        return live_pids({self.proc.pid} | {sid for sid, _ in self.ranks.values()}, set(self.ranks))

    def wait_all_gone(self, timeout: float) -> float:
        """Wait until lars-run and every process of the job are gone; returns when that was."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not self.alive():
                return time.monotonic()
            time.sleep(0.01)
        raise AssertionError(f"still running after {timeout} s: {sorted(self.alive())}; {self.stderr()}")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def cleanup(self) -> None:
        for pid in self.alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self.log.close()


def lars_run_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("lars-run: ") and "note:" not in line]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
@pytest.mark.parametrize("launcher", launcher_params("local", "torchrun-env", "mpi"))
def test_stop_signal_reaches_every_rank_which_saves_and_exits(tmp_path, launcher, sig):
    job = Job(tmp_path, launcher, "save")
    try:
        job.wait_until_up()
        start = time.monotonic()
        job.proc.send_signal(sig)
        gone = job.wait_all_gone(20)
        print(f"TIMING {launcher} {sig.name}-to-all-gone {gone - start:.2f}")
        assert job.proc.returncode == 128 + sig
        expected = "SIGINT" if sig == signal.SIGINT else "SIGTERM"  # SIGHUP arrives as SIGTERM
        assert job.saved() == {pid: expected for pid in job.ranks}, job.stderr()
        assert f"lars-run: got {sig.name}" in job.stderr()
    finally:
        job.cleanup()


@pytest.mark.parametrize("launcher", launcher_params("local", "torchrun-env", "mpi"))
def test_rank_ignoring_sigterm_is_sigkilled_after_the_grace_period(tmp_path, launcher):
    job = Job(tmp_path, launcher, "ignore-last", "--grace-period", "2")
    try:
        job.wait_until_up()
        start = time.monotonic()
        job.proc.send_signal(signal.SIGTERM)
        gone = job.wait_all_gone(15)
        print(f"TIMING {launcher} SIGTERM-grace-2s-to-all-gone {gone - start:.2f}")
        assert gone - start >= 2
        assert job.proc.returncode == 143
        assert set(job.saved()) == set(job.ranks) - {job.pid_of_last()}
        assert "grace period of 2 s over: SIGKILL to " in job.stderr()
    finally:
        job.cleanup()


@pytest.mark.parametrize("launcher", launcher_params("local", "torchrun-env", "mpi"))
def test_rank_exiting_3_stops_the_others_and_is_named_in_one_line(tmp_path, launcher):
    job = Job(tmp_path, launcher, "fail-last")
    try:
        job.wait_until_up()
        job.wait_all_gone(20)
        assert job.proc.returncode == 3
        failed = job.pid_of_last()
        assert job.saved() == {pid: "SIGTERM" for pid in job.ranks if pid != failed}
        lines = [line for line in lars_run_lines(job.stderr()) if f"rank {LAST} " in line]
        assert len(lines) == 1 and lines[0].startswith(f"lars-run: rank {LAST} on {HOST[launcher]} (pid ")
        assert "exited with code 3" in lines[0]
    finally:
        job.cleanup()


@pytest.mark.parametrize("launcher", launcher_params("local", "torchrun-env", "mpi"))
def test_sigkilled_rank_stops_the_others(tmp_path, launcher):
    job = Job(tmp_path, launcher, "save")
    try:
        job.wait_until_up()
        start = time.monotonic()
        os.kill(job.pid_of_last(), signal.SIGKILL)
        gone = job.wait_all_gone(20)
        print(f"TIMING {launcher} rank-SIGKILL-to-all-gone {gone - start:.2f}")
        assert job.proc.returncode == 128 + signal.SIGKILL
        assert set(job.saved()) == set(job.ranks) - {job.pid_of_last()}
        assert (
            f"lars-run: rank {LAST} on {HOST[launcher]} (pid {job.pid_of_last()}) was killed by SIGKILL" in job.stderr()
        )
    finally:
        job.cleanup()


@pytest.mark.parametrize("launcher", launcher_params("local", "mpi"))
def test_second_ctrl_c_kills_at_once(tmp_path, launcher):
    job = Job(tmp_path, launcher, "ignore-last")  # default grace period: 30 s
    try:
        job.wait_until_up()
        start = time.monotonic()
        job.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        job.proc.send_signal(signal.SIGINT)
        assert job.wait_all_gone(10) - start < 10
        assert job.proc.returncode == 130
        assert "second stop signal (SIGINT): SIGKILL to " in job.stderr()
    finally:
        job.cleanup()


@pytest.mark.parametrize("launcher", launcher_params("local", "mpi"))
def test_killing_lars_run_leaves_no_rank_behind(tmp_path, launcher):
    """What lars-run started gets SIGKILL when lars-run is SIGKILLed. mpiexec's proxy then sends its ranks
    I_MPI_JOB_ABORT_SIGNAL, SIGTERM as lars-run sets it, so they still save; their guards enforce the grace
    period, as the proxy is gone."""
    job = Job(tmp_path, launcher, "save")
    try:
        job.wait_until_up()
        job.proc.kill()
        job.wait_all_gone(15)
        assert job.saved() == ({pid: "SIGTERM" for pid in job.ranks} if launcher == "mpi" else {})
    finally:
        job.cleanup()


def run_guard(tmp_path: Path, mode: str, *flags: str) -> tuple[subprocess.Popen, Path]:
    """A Slurm-style rank: the guard lars-run puts in srun's command, around the rank program."""
    out = tmp_path / "ranks"
    out.mkdir()
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = dict(os.environ, SLURM_PROCID="5")
    env.pop("PMI_FD", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launchers.guard",
            *flags,
            "--",
            "taskset",
            "-c",
            str(ALLOWED[-1]),
            sys.executable,
            str(script),
            str(out),
            mode,
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=default_stop_signals,
    )
    return proc, out


@pytest.mark.parametrize(
    "mode,grace,signals,code,saved",
    [
        ("save", "1", 1, 0, True),  # forwarded; the program's own exit code passes through
        ("ignore-last", "1", 1, 137, False),  # SIGKILLed after the grace period
        ("ignore-last", "30", 2, 137, False),  # SIGKILLed at a second signal (hydra's proxy when mpiexec is gone)
    ],
)
def test_guard_forwards_sigterm_and_enforces_the_grace_period(tmp_path, mode, grace, signals, code, saved):
    proc, out = run_guard(tmp_path, mode, "--grace-period", grace)
    try:
        deadline = time.monotonic() + 20
        while not list(out.glob("pid_*")) and time.monotonic() < deadline:
            time.sleep(0.02)
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == code, err
        assert bool(list(out.glob("saved_*"))) == saved
        assert not live_pids({proc.pid}, set())
    finally:
        for pid in live_pids({proc.pid}, set()):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def test_guard_names_a_failed_rank_in_one_line(tmp_path):
    proc, _ = run_guard(tmp_path, "fail-last")
    try:
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 3
        assert err.splitlines() == [line for line in err.splitlines() if line.startswith("lars-run: ")]
        assert len(err.splitlines()) == 1
        assert err.startswith(f"lars-run: rank 5 on {socket.gethostname()} (pid ") and "exited with code 3" in err
    finally:
        proc.kill()
        proc.wait()
