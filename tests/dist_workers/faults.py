"""Ranks that never arrive, die, fail or stop, for the no-hang and isolation tests.

Usage: faults.py MODE BACKEND TIMEOUT_S [STOP_FILE [FAILING_RANK]], MODE one of:
  arrive  join the process group (some ranks of the job are deliberately never started)
  die     all ranks all_reduce once; then the last rank is SIGKILLed while the others
          enter a second all_reduce
  loop    print READY after the first all_reduce, then all_reduce until STOP_FILE exists
          (rank 0 decides, so all ranks stop after the same step) and print DONE; the
          tests kill or stop ranks from outside meanwhile
  fail    as loop, but rank FAILING_RANK raises ValueError right after READY

A RendezvousError ends the rank with one line and exit code 2, as ``ipex-lars train`` does.
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ipex_lars.distributed as ild

LONGEST_S = 90  # a loop that nobody stops ends itself (exit 3), so a broken test leaves nothing behind


def loop(rank: int, stop_file: Path, fail: bool) -> None:
    t = torch.ones(16)
    print(f"RANK {rank} READY {os.getpid()}", flush=True)
    if fail:
        raise ValueError("a bug in rank code")
    start = time.monotonic()
    while time.monotonic() - start < LONGEST_S:
        flag = torch.tensor([float(rank == 0 and stop_file.exists())])
        dist.all_reduce(flag)
        if flag.item() > 0:
            print(f"RANK {rank} DONE", flush=True)
            return
        dist.all_reduce(t)
        time.sleep(0.02)  # leave the two cores to the other jobs
    sys.exit(3)


def main() -> None:
    mode, backend, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    print(f"INIT {time.time():.3f}", flush=True)  # for the tests' timings, without the imports
    try:
        ild.init(backend=backend, timeout=timeout, verbose=False)
    except ild.RendezvousError as exc:
        print(f"faults.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.ones(1000)
    dist.all_reduce(t)
    print(f"RANK {rank} JOINED", flush=True)
    if mode == "die":
        if rank == world - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.all_reduce(t)
        dist.all_reduce(t)
        print(f"RANK {rank} SURVIVED", flush=True)
    if mode in ("loop", "fail"):
        loop(rank, Path(sys.argv[4]), fail=mode == "fail" and rank == int(sys.argv[5]))


if __name__ == "__main__":
    main()
