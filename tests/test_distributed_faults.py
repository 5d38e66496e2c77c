"""No hang, no orphan, no job joining another: real rank processes that die, stop, fail or go missing.

Every rank runs in its own session and is SIGKILLed with its process group when a test ends.
The measured times print with ``pytest -rA``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dist_workers import harness
from dist_workers.harness import oneccl_built  # noqa: F401  (session fixture)

from ipex_lars.bench.local_job import start_ranks
from launchers.identity import free_port

WORKER = harness.WORKERS / "faults.py"
TIMEOUT_S = 4  # the process-group timeout for the missing-rank tests
STARTUP_S = 90  # bound on two ranks importing torch and joining, on a busy 2-core machine
PROMPT_S = 15  # a rank must end within this after another rank dies
DIST_TIMEOUT = "60"  # far longer than PROMPT_S: the watcher, not a timeout, must end the ranks


@dataclass
class Proc:
    rank: int
    popen: subprocess.Popen
    out: Path
    err: Path

    def verdict(self) -> str:
        """The watcher's one line, if this rank printed one."""
        return next((line for line in self.err.read_text().splitlines() if line.startswith("[ipex-lars] rank")), "")


@contextlib.contextmanager
def ranks(
    tmp_path: Path,
    name: str,
    command: list[str],
    world: int,
    only: list[int] | None = None,
    port: int | None = None,
    **extra: str,
) -> Iterator[list[Proc]]:
    """Start ranks `only` (default all) of a `world`-rank job, torchrun-style, each in its own session
    with its output in files; kill their process groups after."""
    files = {
        r: (tmp_path / f"{name}{r}.out", tmp_path / f"{name}{r}.err") for r in (range(world) if only is None else only)
    }
    opened: list = []

    def outputs(rank: int) -> tuple:
        opened.extend(path.open("w") for path in files[rank])
        return opened[-2], opened[-1]

    procs: list[Proc] = []
    try:
        popens = start_ranks(
            command,
            world,
            env={**harness.base_env(), **extra},
            ranks=list(files),
            port=port,
            outputs=outputs,
            new_session=True,
        )
        for f in opened:
            f.close()  # the children hold their own copies
        procs = [Proc(r, popen, *files[r]) for r, popen in zip(files, popens)]
        yield procs
    finally:
        for p in procs:
            if p.popen.returncode is None:  # not reaped yet, so its process group id is still its own
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
            p.popen.wait()


def worker(*args: str) -> list[str]:
    return [sys.executable, str(WORKER), *args]


def wait_for(proc: Proc, text: str, seconds: float = STARTUP_S) -> None:
    end = time.monotonic() + seconds
    while text not in proc.out.read_text():
        assert proc.popen.poll() is None, f"rank {proc.rank} ended before {text}: {proc.err.read_text()[-3000:]}"
        assert time.monotonic() < end, f"rank {proc.rank} printed no {text} within {seconds} s"
        time.sleep(0.05)


def ended_within(proc: Proc, seconds: float) -> tuple[int, float]:
    """(exit code, seconds) of a rank that must end within `seconds`; fails the test otherwise."""
    start = time.monotonic()
    try:
        rc = proc.popen.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rank {proc.rank} still runs {seconds} s later: {proc.err.read_text()[-3000:]}")
    return rc, time.monotonic() - start


def report(what: str, seconds: float) -> None:
    print(f"[timing] {what}: {seconds:.2f} s")


def in_init(proc: Proc) -> float:
    """Seconds from the worker's call to init() until now, just after it ended."""
    stamp = next(line for line in proc.out.read_text().splitlines() if line.startswith("INIT "))
    return time.time() - float(stamp.split()[1])


@pytest.fixture(params=["gloo", "oneccl"])
def backend(request) -> str:
    if request.param == "oneccl":
        request.getfixturevalue("oneccl_built")
    return request.param


# ---------------------------------------------------------------- a rank dies, stops or fails


@pytest.mark.parametrize("victim", [1, 0], ids=["rank1-killed", "rank0-killed"])
def test_killed_rank_ends_the_other_within_seconds_naming_it(tmp_path, backend, victim):
    with ranks(tmp_path, "job", worker("loop", backend, DIST_TIMEOUT, str(tmp_path / "stop")), 2) as procs:
        for p in procs:
            wait_for(p, "READY")
        os.killpg(procs[victim].popen.pid, signal.SIGKILL)
        survivor = procs[1 - victim]
        rc, seconds = ended_within(survivor, PROMPT_S)
    report(f"{backend}: rank {victim} SIGKILLed -> rank {survivor.rank} ended", seconds)
    verdict = survivor.verdict()
    assert rc == 1, survivor.err.read_text()[-3000:]
    assert f"rank {victim} (host " in verdict and " died: " in verdict, verdict
    assert "IPEX_LARS_HEARTBEAT_TIMEOUT=30 s" in verdict
    assert "Traceback" not in survivor.err.read_text()


def test_silent_rank_is_declared_dead_after_the_heartbeat_timeout(tmp_path):
    heartbeat = 3
    with ranks(
        tmp_path,
        "job",
        worker("loop", "gloo", DIST_TIMEOUT, str(tmp_path / "stop")),
        2,
        IPEX_LARS_HEARTBEAT_TIMEOUT=str(heartbeat),
    ) as procs:
        for p in procs:
            wait_for(p, "READY")
        os.killpg(procs[1].popen.pid, signal.SIGSTOP)  # alive, but silent
        rc, seconds = ended_within(procs[0], heartbeat + PROMPT_S)
    report(f"gloo: rank 1 SIGSTOPped, heartbeat timeout {heartbeat} s -> rank 0 ended", seconds)
    verdict = procs[0].verdict()
    assert rc == 1
    assert "rank 1 (host " in verdict and "is silent: rank 0 had no heartbeat from it for" in verdict, verdict
    assert f"IPEX_LARS_HEARTBEAT_TIMEOUT={heartbeat} s" in verdict
    assert heartbeat - 0.5 < seconds < heartbeat + 5


@pytest.mark.parametrize("failing", [1, 0], ids=["rank1-raises", "rank0-raises"])
def test_rank_that_raises_ends_the_other_with_its_error(tmp_path, backend, failing):
    command = worker("fail", backend, DIST_TIMEOUT, str(tmp_path / "stop"), str(failing))
    with ranks(tmp_path, "job", command, 2) as procs:
        for p in procs:
            wait_for(p, "READY")
        other = procs[1 - failing]
        rc, seconds = ended_within(other, PROMPT_S)
        failed_rc, _ = ended_within(procs[failing], PROMPT_S)
    report(f"{backend}: rank {failing} raised -> rank {other.rank} ended", seconds)
    assert (rc, failed_rc) == (1, 1), procs[failing].err.read_text()[-3000:]
    assert f"rank {failing} (host " in other.verdict()
    assert "failed: ValueError: a bug in rank code" in other.verdict()
    assert "ValueError: a bug in rank code" in procs[failing].err.read_text()  # its own traceback
    assert not procs[failing].verdict()  # and nothing else


@pytest.mark.slow
@pytest.mark.usefixtures("oneccl_built")
def test_rank_killed_under_mpiexec_ends_the_job():
    start = time.monotonic()
    job = harness.mpiexec("faults.py", ["die", "oneccl", DIST_TIMEOUT], world=2, timeout=90)
    report("oneccl under mpiexec: job ended after a rank's SIGKILL (from launch)", time.monotonic() - start)
    assert job.rc not in (0, None), harness.describe([job])
    assert "SURVIVED" not in job.out


def test_rank_killed_under_torchrun_ends_the_job(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    out, err = tmp_path / "torchrun.out", tmp_path / "torchrun.err"
    command = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        "2",
        *worker("loop", "gloo", DIST_TIMEOUT, str(tmp_path / "stop"))[1:],
    ]
    with out.open("w") as o, err.open("w") as e:
        job = subprocess.Popen(command, env=harness.base_env(), stdout=o, stderr=e, start_new_session=True)
    proc = Proc(0, job, out, err)
    try:
        wait_for(proc, "RANK 0 READY")
        wait_for(proc, "RANK 1 READY")
        pid = next(line.split()[3] for line in out.read_text().splitlines() if line.startswith("RANK 1 READY"))
        os.kill(int(pid), signal.SIGKILL)
        rc, seconds = ended_within(proc, PROMPT_S)
    finally:
        if job.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    report("gloo under torchrun: rank 1 SIGKILLed -> torchrun ended", seconds)
    assert rc != 0 and "DONE" not in out.read_text()


# ---------------------------------------------------------------- ranks missing at start


def test_rank_that_never_starts_is_named_within_the_timeout(tmp_path, backend):
    with ranks(tmp_path, "job", worker("arrive", backend, str(TIMEOUT_S)), 2, only=[0]) as (rank0,):
        rc, _ = ended_within(rank0, STARTUP_S)
        seconds = in_init(rank0)
    report(f"{backend}: rank 1 missing, timeout {TIMEOUT_S} s -> rank 0 ended (from init)", seconds)
    assert seconds < TIMEOUT_S + 5
    err = rank0.err.read_text()
    assert rc == 2, err[-3000:]
    assert "rank(s) 1 of 2 never joined the process group" in err and "IPEX_LARS_DIST_TIMEOUT" in err
    assert "Traceback" not in err


def test_missing_rank_zero_is_named_within_the_timeout(tmp_path, backend):
    with ranks(tmp_path, "job", worker("arrive", backend, str(TIMEOUT_S)), 2, only=[1]) as (rank1,):
        rc, _ = ended_within(rank1, STARTUP_S)
        seconds = in_init(rank1)
    report(f"{backend}: rank 0 missing, timeout {TIMEOUT_S} s -> rank 1 ended (from init)", seconds)
    assert seconds < TIMEOUT_S + 5
    err = rank1.err.read_text()
    assert rc == 2, err[-3000:]
    assert "could not reach rank 0's rendezvous store" in err and "rank(s) 0 of 2 never joined" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("present", [0, 1])
def test_train_command_names_a_missing_rank_in_one_line(tmp_path, present):
    command = [
        sys.executable,
        "-m",
        "ipex_lars",
        "train",
        "--dist-backend",
        "gloo",
        "--max-steps",
        "1",
        "--out-dir",
        str(tmp_path / "run"),
    ]
    with ranks(tmp_path, "train", command, 2, only=[present], IPEX_LARS_DIST_TIMEOUT=str(TIMEOUT_S)) as (rank,):
        rc, _ = ended_within(rank, STARTUP_S)
    err = rank.err.read_text()
    assert rc == 2, err[-3000:]
    assert "ipex-lars train: error: " in err and f"rank(s) {1 - present} of 2 never joined" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- a second job on the same port


@pytest.mark.parametrize(
    "backend_name, ids",
    [("oneccl", None), ("gloo", ("job-a", "job-b"))],
    ids=["oneccl-no-job-ids", "gloo-different-job-ids"],
)
def test_second_job_on_the_same_port_fails_fast_and_the_first_completes(tmp_path, request, backend_name, ids):
    if backend_name == "oneccl":
        request.getfixturevalue("oneccl_built")
    first_id, second_id = ids or ("", "")
    stop = tmp_path / "stop"
    command = worker("loop", backend_name, DIST_TIMEOUT, str(stop))
    port = free_port()
    with ranks(tmp_path, "first", command, 2, port=port, IPEX_LARS_JOB_ID=first_id) as first:
        for p in first:
            wait_for(p, "READY")
        with ranks(tmp_path, "second", command, 2, port=port, IPEX_LARS_JOB_ID=second_id) as second:
            for p in second:
                rc, _ = ended_within(p, STARTUP_S)
                assert rc == 2, p.err.read_text()[-3000:]
                report(f"{request.node.callspec.id}: second job's rank {p.rank} refused (from init)", in_init(p))
        stop.touch()
        for p in first:
            rc, _ = ended_within(p, PROMPT_S)
            assert rc == 0 and "DONE" in p.out.read_text(), p.err.read_text()[-3000:]
    errors = [p.err.read_text() for p in second]
    assert f"port {port} is already in use" in errors[0] and "MASTER_PORT" in errors[0]
    if ids:
        assert "of another job (job-a, 2 ranks" in errors[1] and "will not join it" in errors[1]
    else:
        assert "found rank 1 taken in its rendezvous store by another process (host " in errors[1]
    assert not any("Traceback" in e for e in errors)
    assert not any(p.verdict() for p in first)
