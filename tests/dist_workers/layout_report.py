"""Join a job through ``init`` and report what it chose for this rank.

Usage: layout_report.py BACKEND. Prints ``LAYOUT <json>`` with the rank, the backend and
its reason, the hosts and CPU sharers ``init`` found, the CPUs this rank may use, the
OMP_NUM_THREADS it ended with and torch's thread count; then runs one allreduce on the
chosen backend.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

import ipex_lars.distributed as ild


def main() -> None:
    info = ild.init(backend=sys.argv[1])
    t = torch.ones(1)
    dist.all_reduce(t)
    print(
        "LAYOUT "
        + json.dumps(
            {
                "rank": dist.get_rank(),
                "backend": info.backend,
                "reason": info.reason,
                "hosts": info.hosts,
                "cpu_sharers": info.cpu_sharers,
                "cpus": sorted(os.sched_getaffinity(0)),
                "omp": os.environ.get("OMP_NUM_THREADS"),
                "threads": torch.get_num_threads(),
                "sum": t.item(),
            }
        ),
        flush=True,
    )
    ild.shutdown()


if __name__ == "__main__":
    main()
