"""A rank that joins the job and then keeps it busy, for stop and failure tests across nodes.

Usage: cluster_rank.py BACKEND OUT_DIR. After ``init`` it writes OUT_DIR/up_<rank>_<pid>, then
allreduces every 50 ms for up to 120 s. SIGTERM/SIGINT write OUT_DIR/saved_<rank> and exit 0.
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ipex_lars.distributed as ild


def main() -> None:
    backend, out = sys.argv[1], Path(sys.argv[2])
    ild.init(backend=backend, verbose=False, timeout=60)
    rank = dist.get_rank()

    def save(signum, frame):
        (out / f"saved_{rank}").write_text(signal.Signals(signum).name)
        os._exit(0)

    signal.signal(signal.SIGTERM, save)
    signal.signal(signal.SIGINT, save)
    (out / f"up_{rank}_{os.getpid()}").write_text("")
    t = torch.ones(4)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        dist.all_reduce(t)
        t.fill_(1)
        time.sleep(0.05)


if __name__ == "__main__":
    main()
