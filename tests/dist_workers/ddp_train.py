"""Train a tiny CNN with DistributedDataParallel and save the final parameters.

Usage: ddp_train.py BACKEND STEPS OUT_DIR. Every rank takes its contiguous shard of
one fixed global batch per step and writes OUT_DIR/rank<r>.pt. Run as a single
process (no launcher variables), it trains on the whole batch, which is what DDP's
gradient averaging must reproduce.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import ipex_lars.distributed as ild

GLOBAL_BATCH = 8


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))


def main() -> None:
    backend, steps, out_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    ild.init(backend=backend, verbose=False)
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    net = model()
    if rank != 0:  # DDP's construction broadcast must make every replica equal to rank 0's
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
    ddp = nn.parallel.DistributedDataParallel(net, bucket_cap_mb=0.001)  # several buckets
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    shard = GLOBAL_BATCH // world
    for _ in range(steps):
        x = torch.randn(GLOBAL_BATCH, 1, 6, 6, generator=data)
        y = torch.randint(0, 10, (GLOBAL_BATCH,), generator=data)
        lo = rank * shard
        loss = nn.functional.cross_entropy(ddp(x[lo : lo + shard]), y[lo : lo + shard])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()
    print(f"RANK {rank} TRAINED", flush=True)


if __name__ == "__main__":
    main()
