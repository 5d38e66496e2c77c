"""A rank that ends without destroy_process_group(), as most user scripts do."""

import sys

import torch
import torch.distributed as dist

import ipex_lars.distributed as d

d.init(backend=sys.argv[1], verbose=False)
t = torch.ones(1) * (dist.get_rank() + 1)
dist.all_reduce(t)
print(f"RANK {dist.get_rank()} SUM {t.item()}", flush=True)
