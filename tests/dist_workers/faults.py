"""Ranks that never arrive or die mid-collective, for the no-hang tests.

Usage: faults.py MODE TIMEOUT_S, MODE one of:
  arrive  join the process group (some ranks of the job are deliberately never started)
  die     all ranks all_reduce once; then the last rank is SIGKILLed while the others
          enter a second all_reduce
"""

import os
import signal
import sys

import torch
import torch.distributed as dist

import ipex_lars.distributed as ild


def main() -> None:
    mode, timeout = sys.argv[1], float(sys.argv[2])
    ild.init(backend="oneccl", timeout=timeout, verbose=False)
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


if __name__ == "__main__":
    main()
