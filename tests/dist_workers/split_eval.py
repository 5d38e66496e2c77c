"""Evaluate one model split across ranks whose BN statistics differ, as the training engine does.

Usage: split_eval.py BACKEND OUT_DIR. Every rank builds the same digits CNN, runs a
train-mode forward on its own random batch (so each rank's BN running statistics
differ), saves them as OUT_DIR/before-rank<r>.pt, then calls ``evaluate`` on the first
``VAL_SIZE`` held-out digits (a size no world size of 2 or 3 divides, so shares differ). Rank 0 saves the
model it evaluated (BN statistics averaged) as OUT_DIR/evaluated.pt; every rank prints
``RESULT <json>``.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import ipex_lars.distributed as ild
from ipex_lars.data import TensorData, build_datasets
from ipex_lars.models import create_model
from ipex_lars.train.config import TrainConfig
from ipex_lars.train.evaluate import evaluate

VAL_SIZE = 359


def held_out() -> TensorData:
    val = build_datasets("digits")[1]
    return TensorData(val.images[:VAL_SIZE], val.labels[:VAL_SIZE], val.num_classes)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("digits_cnn", 10, in_channels=1)


def main() -> None:
    backend, out = sys.argv[1], Path(sys.argv[2])
    ild.init(backend=backend, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    net = model()
    with torch.no_grad():
        net(torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(100 + rank)) * (1 + rank))
    buffers = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    torch.save(buffers, out / f"before-rank{rank}.pt")
    result = evaluate(net, held_out(), TrainConfig(workers=0), rank, world)
    if rank == 0:
        torch.save(net.state_dict(), out / "evaluated.pt")
    print("RESULT " + json.dumps(result), flush=True)
    ild.shutdown()


if __name__ == "__main__":
    main()
