"""Training at scale with real rank processes: evaluation split across ranks, resume agreed by all ranks."""

from __future__ import annotations

import json
import shutil
import socket
import time

import pytest
import torch
from cli_runner import SCRIPT
from dist_workers import harness

from ipex_lars.train import checkpoint, resume
from ipex_lars.train.config import TrainConfig, load_config
from ipex_lars.train.engine import train
from ipex_lars.train.evaluate import evaluate, share
from ipex_lars.train.resume import Decision


def test_shares_partition_the_samples_with_no_repeats():
    for n in (0, 1, 7, 359, 360):
        for world in (1, 2, 3, 5, 8):
            shares = [share(n, r, world) for r in range(world)]
            assert [i for s in shares for i in s] == list(range(n)), (n, world)
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def _results(ranks: list[harness.Rank]) -> list[dict]:
    return [
        json.loads(line[len("RESULT ") :]) for r in ranks for line in r.out.splitlines() if line.startswith("RESULT ")
    ]


@pytest.mark.parametrize("backend,world", [("gloo", 2), ("oneccl", 2)])
def test_split_evaluation_equals_one_process_on_the_averaged_model(tmp_path, backend, world):
    if backend == "oneccl":
        from ipex_lars.distributed import backend as oneccl

        if reason := oneccl.unavailable_reason():
            pytest.skip(reason)
        from ipex_lars import ext

        ext.build(oneccl.SPEC)  # once, before the ranks start
    from dist_workers.split_eval import VAL_SIZE, held_out, model

    ranks = harness.torchrun_style("split_eval.py", [backend, str(tmp_path)], world)
    assert [r.rc for r in ranks] == [0] * world, harness.describe(ranks)
    results = _results(ranks)
    assert len(results) == world and all(r == results[0] for r in results), results
    assert results[0]["images"] == VAL_SIZE  # every held-out image once, none repeated to pad a share

    before = [torch.load(tmp_path / f"before-rank{r}.pt") for r in range(world)]
    evaluated = torch.load(tmp_path / "evaluated.pt")
    for key in before[0]:
        assert not torch.equal(before[0][key], before[1][key]), f"{key}: the ranks' statistics should differ"
        torch.testing.assert_close(
            evaluated[key], torch.stack([b[key] for b in before]).mean(0), msg=f"{key} is not the mean over ranks"
        )

    net = model()
    net.load_state_dict(evaluated)
    whole = evaluate(net, held_out(), TrainConfig(workers=0))
    assert whole["images"] == VAL_SIZE
    assert results[0]["top1"] == whole["top1"] and results[0]["top5"] == whole["top5"]
    assert results[0]["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def _train_ranks(tmp_path, *args: str, timeout: float = 120) -> list[harness.Rank]:
    """`ipex-lars train ARGS` as 2 ranks (torchrun-style) on gloo, rank r in its own --out-dir tmp_path/r<r>:
    two hosts' views of one path without a shared filesystem."""
    command = ["sh", "-c", f'exec "$0" train --out-dir {tmp_path}/r$RANK "$@"', str(SCRIPT), *args]
    return harness.torchrun_command(command, world=2, timeout=timeout)


def test_resume_is_refused_on_every_rank_when_one_cannot_read_rank0s_checkpoint(tmp_path):
    common = [
        "--epochs",
        "2",
        "--global-batch",
        "128",
        "--checkpoint-every",
        "2",
        "--dist-backend",
        "gloo",
        "--resume",
        "auto",
        "--no-progress",
    ]
    train(
        load_config(
            "digits",
            {
                "out_dir": str(tmp_path / "r0"),
                "threads": 1,
                "epochs": 2,
                "global_batch": 128,
                "checkpoint_every": 2,
                "max_steps": 2,
                "progress": False,
            },
        )
    )
    (tmp_path / "r1").mkdir()
    started = time.monotonic()
    refused = _train_ranks(tmp_path, *common, "--max-steps", "4")
    assert time.monotonic() - started < 100
    assert [r.rc for r in refused] == [2, 2], harness.describe(refused)
    host = socket.gethostname()
    for r in refused:
        lines = [line for line in r.err.splitlines() if "error:" in line]
        assert len(lines) == 1 and "Traceback" not in r.err, r.err
        assert f"rank 1 (host {host}) cannot resume: {tmp_path}/r1/ckpt-00000002.pt does not exist there" in lines[0]
        assert f"rank 0 resumes from {host}:{tmp_path}/r0/ckpt-00000002.pt (step 2)" in lines[0]
        assert lines[0].endswith("a filesystem all ranks share, or copy that file into every rank's --out-dir")

    shutil.copy(tmp_path / "r0" / "ckpt-00000002.pt", tmp_path / "r1")
    resumed = _train_ranks(tmp_path, *common, "--max-steps", "4")
    assert [r.rc for r in resumed] == [0, 0], harness.describe(resumed)
    assert "resumed from" in resumed[0].out and "at step 2" in resumed[0].out
    assert json.loads(resumed[0].out.strip().splitlines()[-1])["steps"] == 4
    assert [json.loads(line)["step"] for line in (tmp_path / "r0" / "metrics-rank0.jsonl").open()] == [1, 2, 3, 4]


def test_a_rank_refuses_a_different_checkpoint_of_the_same_name(tmp_path):
    train(
        load_config(
            "digits",
            {"out_dir": str(tmp_path / "a"), "threads": 1, "max_steps": 1, "checkpoint_every": 1, "progress": False},
        )
    )
    train(
        load_config(
            "digits",
            {
                "out_dir": str(tmp_path / "b"),
                "threads": 1,
                "max_steps": 1,
                "seed": 5,
                "checkpoint_every": 1,
                "progress": False,
            },
        )
    )
    ours, theirs = tmp_path / "a" / "ckpt-00000001.pt", tmp_path / "b" / "ckpt-00000001.pt"
    decision = Decision(path=str(ours), in_out_dir=True, step=1, sha256=checkpoint.saved_sha256(ours), host="h0")
    assert resume._read_same(ours, decision)[1] is None
    state, problem = resume._read_same(theirs, decision)
    assert state is None and "is another checkpoint than rank 0's (SHA-256 differs)" in problem


def test_an_error_on_one_rank_ends_the_others_at_once_naming_it(tmp_path):
    # rank 1's data folder is missing on its host: it stops with the one-line error (exit 2), and rank 0,
    # already waiting in a collective, ends at once naming rank 1 and why, instead of a gloo traceback
    command = [
        "sh",
        "-c",
        f'[ "$RANK" = 1 ] && set -- "$@" --data imagefolder --data-dir {tmp_path}/missing; '
        f'exec "$0" train --out-dir {tmp_path}/r$RANK "$@"',
        str(SCRIPT),
        "--dist-backend",
        "gloo",
        "--max-steps",
        "1",
        "--no-progress",
    ]
    started = time.monotonic()
    ranks = harness.torchrun_command(command, world=2, timeout=60)
    assert time.monotonic() - started < 60
    assert [r.rc for r in ranks] == [1, 2], harness.describe(ranks)
    assert f"error: --data-dir {tmp_path}/missing does not exist" in ranks[1].err
    named = [line for line in ranks[0].err.splitlines() if "rank 1 (host" in line]
    assert len(named) == 1 and f"failed: ValueError: --data-dir {tmp_path}/missing does not exist" in named[0]
    assert "Traceback" not in ranks[0].err + ranks[1].err


def test_shares_of_an_image_folder_are_its_images_in_order(tmp_path):
    from PIL import Image

    from ipex_lars.data import eval_batches
    from ipex_lars.data.folder import ImageFolderData

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(4 if label == "a" else 3):
            Image.new("RGB", (8, 8), (40 * i, 100 if label == "a" else 200, 7)).save(tmp_path / label / f"{i}.png")
    data = ImageFolderData(tmp_path, 8, train=False)

    def images(part=None):
        return torch.cat([x for x, _, _ in eval_batches(data, batch=2, part=part)])

    whole = images()
    assert len(whole) == 7
    assert torch.equal(torch.cat([images(share(7, r, 3)) for r in range(3)]), whole)
