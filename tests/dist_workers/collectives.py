"""Every collective the oneccl backend offers, checked against values each rank can compute alone.

Usage: collectives.py BACKEND. Prints `RANK r OK <launcher> <backend>` when all checks pass;
any mismatch raises, so the process exits non-zero.
"""

import sys
import time

import torch
import torch.distributed as dist

import ipex_lars.distributed as ild

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32, torch.int64]


def expect(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if not torch.equal(got, want.to(got.dtype)):
        raise AssertionError(f"{what}: got {got.tolist()}, want {want.tolist()}")


def main() -> None:
    info = ild.init(backend=sys.argv[1])
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    values = torch.arange(1, world + 1, dtype=torch.float64)  # rank r contributes r + 1
    reductions = {
        dist.ReduceOp.SUM: values.sum(),
        dist.ReduceOp.PRODUCT: values.prod(),
        dist.ReduceOp.MIN: values.min(),
        dist.ReduceOp.MAX: values.max(),
    }
    for dtype in DTYPES:
        ops = dict(reductions)
        if dtype.is_floating_point:
            ops[dist.ReduceOp.AVG] = values.mean()
        for op, want in ops.items():
            t = torch.full((5,), rank + 1, dtype=dtype)
            dist.all_reduce(t, op=op)
            expect(t, torch.full((5,), want.item()), f"all_reduce {op} {dtype}")

    # Non-contiguous: a transposed view and a strided slice are reduced in place.
    base = torch.zeros(4, 6)
    view = base.t()
    view += rank + 1
    dist.all_reduce(view)
    expect(base, torch.full((4, 6), values.sum().item()), "all_reduce on a transposed view")
    strided = torch.zeros(10)
    strided[::2] = rank + 1
    dist.all_reduce(strided[::2])
    expect(strided[1::2], torch.zeros(5), "all_reduce on a strided slice touches only the slice")
    expect(strided[::2], torch.full((5,), values.sum().item()), "all_reduce on a strided slice")

    for root in range(world):
        b = torch.arange(6, dtype=torch.float32) * (rank + 1)
        dist.broadcast(b, src=root)
        expect(b, torch.arange(6) * (root + 1), f"broadcast from {root}")
    bv = torch.zeros(3, 4)
    bv.t()[:] = rank
    dist.broadcast(bv.t(), src=world - 1)
    expect(bv, torch.full((3, 4), world - 1), "broadcast into a transposed view")

    mine = torch.tensor([rank, 10 * rank], dtype=torch.int64)
    gathered = [torch.empty(2, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(gathered, mine)
    for r, g in enumerate(gathered):
        expect(g, torch.tensor([r, 10 * r]), f"all_gather slot {r}")
    flat = torch.empty(2 * world, dtype=torch.bfloat16)
    dist.all_gather_into_tensor(flat, mine.to(torch.bfloat16))
    expect(flat, torch.tensor([[r, 10 * r] for r in range(world)]).flatten(), "all_gather_into_tensor")

    contrib = torch.arange(3 * world, dtype=torch.float32) + rank
    out = torch.empty(3)
    dist.reduce_scatter_tensor(out, contrib)
    want = sum(torch.arange(3 * world, dtype=torch.float32) + r for r in range(world))[3 * rank : 3 * rank + 3]
    expect(out, want, "reduce_scatter_tensor")
    dist.reduce_scatter_tensor(out, contrib, op=dist.ReduceOp.AVG)
    expect(out, want / world, "reduce_scatter_tensor AVG")
    out_list = torch.empty(3)
    dist.reduce_scatter(out_list, list(contrib.chunk(world)))
    expect(out_list, want, "reduce_scatter (list)")

    # Asynchronous completion: the call returns while the peer is still away; the Work
    # and its Future complete once the collective does.
    if rank == world - 1:
        time.sleep(1.0)
    t = torch.full((4,), float(rank + 1))
    start = time.perf_counter()
    work = dist.all_reduce(t, async_op=True)
    returned_after = time.perf_counter() - start
    if rank == 0 and world > 1:
        assert returned_after < 0.5, f"async all_reduce blocked the caller for {returned_after:.2f} s"
        assert not work.is_completed(), "all_reduce completed before the last rank called it"
    fut_value = work.get_future().wait()
    assert work.is_completed()
    expect(fut_value[0], torch.full((4,), values.sum().item()), "Future value of async all_reduce")
    expect(t, torch.full((4,), values.sum().item()), "async all_reduce in place")

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.write(f"RANK {rank} OK {info.launch.launcher} {info.backend}\n")  # one write: ranks share the pipe
    sys.stdout.flush()


if __name__ == "__main__":
    main()
