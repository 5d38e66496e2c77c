"""Training runs as users start them: short, real, on the embedded digits and on synthetic data."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runner import SCRIPT, run_cli
from dist_workers import harness

from affinity.machine import this_machine
from ipex_lars import cli
from ipex_lars.train import checkpoint
from ipex_lars.train.config import TrainConfig, load_config
from ipex_lars.train.engine import train


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(recipe="digits")
    base.update(kw)
    recipe = base.pop("recipe")
    return load_config(recipe, {"out_dir": str(tmp_path), "threads": 1, **base})


def _weights(path: Path) -> dict:
    return checkpoint.load(path)["model"]


def test_resume_continues_bit_for_bit(tmp_path):
    straight = _cfg(tmp_path / "a", epochs=4, checkpoint_every=1)
    train(straight)
    half = _cfg(tmp_path / "b", epochs=4, max_steps=4, checkpoint_every=1)
    train(half)
    resumed = _cfg(tmp_path / "b", epochs=4, resume="auto", checkpoint_every=1)
    result = train(resumed)
    assert result["steps"] == 8
    a, b = _weights(tmp_path / "a" / "ckpt-00000008.pt"), _weights(tmp_path / "b" / "ckpt-00000008.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert len(checkpoint.all_checkpoints(tmp_path / "b")) == straight.keep_checkpoints


@pytest.mark.parametrize("model,size", [("resnet50", 32), ("alexnet_bn", 64), ("digits_cnn", 8)])
def test_each_model_trains_a_few_steps_on_synthetic_data(tmp_path, model, size):
    cfg = _cfg(
        tmp_path,
        model=model,
        data="synthetic",
        image_size=size,
        num_samples=8,
        num_classes=5,
        global_batch=4,
        epochs=1,
        precision="bf16",
        channels_last=True,
        lr=0.5,
    )
    result = train(cfg)
    assert result["steps"] == 2 and result["skipped_steps"] == 0
    state = _weights(checkpoint.all_checkpoints(tmp_path)[-1])
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_precision_auto_is_resolved_for_this_cpu_printed_and_recorded(tmp_path, capsys):
    train(_cfg(tmp_path, precision="auto", max_steps=1))
    expected = "bf16" if this_machine().cpu.native_bf16 else "fp32"
    assert f"precision auto -> {expected}: " in capsys.readouterr().out
    assert checkpoint.load(checkpoint.all_checkpoints(tmp_path)[-1])["config"]["precision"] == expected


def test_non_finite_gradients_skip_the_step_and_are_counted(tmp_path):
    cfg = _cfg(tmp_path, epochs=1, lr=1e30, optimizer="sgd", warmup_epochs=0)
    result = train(cfg)
    assert result["skipped_steps"] >= 1


def test_packaged_recipes_load():
    for name in ("digits", "resnet50-32k", "alexnet-bn-32k", "resnet50-mlperf"):
        cfg = load_config(name)
        assert cfg.optimizer == "lars"
    mlperf = load_config("resnet50-mlperf")
    assert (mlperf.global_batch, mlperf.lr, mlperf.label_smoothing, mlperf.end_lr) == (3264, 10.5, 0.1, 1e-4)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("train", *args, env={"OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--recipe", "nosuch"], "unknown recipe 'nosuch'"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--global-batch", "5000"], "larger than the 1437 training samples"),
        (["--global-batch", "100", "--accum-steps", "3"], "does not split into 1 rank(s) x 3"),
        (["--overlap-optimizer", "--optimizer", "sgd"], "use optimizer lars"),
        (["--overlap-optimizer", "--execution", "ipex", "--precision", "bf16"], "cannot update IPEX's bf16 master"),
    ],
)
def test_bad_configuration_is_a_clear_error(tmp_path, args, message, capsys):

    code = cli.main(["train", *args, "--threads", "1", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ipex-lars train: error: ") and message in err[0]


def test_bad_recipe_file_is_a_clear_error_from_the_installed_command(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 0.1\n")
    out = _cli("--recipe", str(bad), "--out-dir", str(tmp_path))
    assert out.returncode == 2 and "unknown setting(s) learning_rate" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    proc = subprocess.Popen(
        [str(SCRIPT), "train", "--out-dir", str(tmp_path), "--epochs", "200", "--checkpoint-every", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    metrics = tmp_path / "metrics-rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    saved = checkpoint.all_checkpoints(tmp_path)
    assert len(saved) == 1
    step = checkpoint.load(saved[0])["step"]
    assert step >= 5 and step == len(metrics.read_text().splitlines())
    assert "continue with --resume auto" in out + err
    done = _cli("--out-dir", str(tmp_path), "--epochs", "200", "--resume", "auto", "--max-steps", str(step + 2))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == step + 2


def _two_ranks(*args: str) -> tuple[dict, list[str]]:
    """Run `ipex-lars train ARGS` as 2 ranks (torchrun-style variables); return rank 0's result, their stderr."""
    ranks = harness.torchrun_command([str(SCRIPT), "train", *args], world=2, timeout=300)
    assert [r.rc for r in ranks] == [0, 0], harness.describe(ranks)
    return json.loads(ranks[0].out.strip().splitlines()[-1]), [r.err for r in ranks]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["oneccl", "gloo"])
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, backend):
    common = ["--epochs", "1", "--max-steps", "3", "--global-batch", "128", "--checkpoint-every", "3"]
    one = _cli(*common, "--accum-steps", "2", "--out-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    result, errs = _two_ranks(*common, "--dist-backend", backend, "--out-dir", str(tmp_path / "two"))
    assert f"backend {backend}" in errs[0]
    assert result["val_images"] == 360  # the held-out digits, split between the ranks, each counted once
    a, b = _weights(tmp_path / "one" / "ckpt-00000003.pt"), _weights(tmp_path / "two" / "ckpt-00000003.pt")
    for key in a:
        if a[key].is_floating_point() and "running" not in key:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    # the logged loss is the whole global batch's, not rank 0's half of it
    one_loss, two_loss = (
        [json.loads(line)["loss"] for line in (tmp_path / run / "metrics-rank0.jsonl").open()] for run in ("one", "two")
    )
    assert two_loss == pytest.approx(one_loss, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,extra",
    [("oneccl", ()), ("gloo", ()), ("oneccl", ("--precision", "bf16", "--channels-last", "--accum-steps", "2"))],
)
def test_overlapping_the_optimizer_with_allreduce_gives_the_same_weights(tmp_path, backend, extra):
    # 20 KB buckets split the digits CNN's 0.23 MB of gradients, so LARS runs during backward
    common = [
        "--epochs",
        "1",
        "--max-steps",
        "4",
        "--global-batch",
        "256",
        "--checkpoint-every",
        "4",
        "--dist-backend",
        backend,
        "--bucket-cap-mb",
        "0.02",
        *extra,
    ]
    after, _ = _two_ranks(*common, "--out-dir", str(tmp_path / "after"))
    overlap, _ = _two_ranks(*common, "--overlap-optimizer", "--out-dir", str(tmp_path / "overlap"))
    assert after["overlapped_bucket_steps"] == 0
    assert overlap["overlapped_bucket_steps"] > 4, "more than one bucket per step was stepped from the hook"
    a = checkpoint.load(tmp_path / "after" / "ckpt-00000004.pt")
    b = checkpoint.load(tmp_path / "overlap" / "ckpt-00000004.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for pid, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(b["optimizer"]["state"][pid][key], value), (pid, key)
    for run in ("after", "overlap"):  # with 2 ranks, every step has an allreduce phase
        lines = (tmp_path / run / "metrics-rank0.jsonl").read_text().splitlines()
        assert all(json.loads(line)["allreduce_seconds"] > 0 for line in lines)


@pytest.mark.slow
def test_overlap_skips_buckets_with_non_finite_gradients(tmp_path):
    result, _ = _two_ranks(
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--global-batch",
        "256",
        "--lr",
        "1e30",
        "--warmup-epochs",
        "0",
        "--bucket-cap-mb",
        "0.02",
        "--overlap-optimizer",
        "--dist-backend",
        "oneccl",
        "--out-dir",
        str(tmp_path),
    )
    assert result["skipped_steps"] >= 1 and result["steps"] == 3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ipex_backend_trains_and_resumes_exactly(tmp_path, precision):
    pytest.importorskip("intel_extension_for_pytorch", reason="IPEX is only in the ipex stack")
    missing = this_machine().cpu.ipex_bf16_missing()
    if precision == "bf16" and missing:
        pytest.skip(
            f"IPEX's bf16 weight prepack needs {missing[0]}, which this CPU lacks "
            "(the refusal is tested in test_machine.py)"
        )
    kw = dict(execution="ipex", precision=precision, epochs=3, checkpoint_every=1)
    train(_cfg(tmp_path / "a", **kw))
    train(_cfg(tmp_path / "b", max_steps=3, **kw))
    result = train(_cfg(tmp_path / "b", resume="auto", **kw))
    assert result["steps"] == 6 and result["optimizer_impl"] == "fused"
    a, b = _weights(tmp_path / "a" / "ckpt-00000006.pt"), _weights(tmp_path / "b" / "ckpt-00000006.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ipex_execution_on_the_native_stack_is_a_clear_error(tmp_path, capsys):
    try:
        import intel_extension_for_pytorch  # noqa: F401

        pytest.skip("this stack has IPEX")
    except ImportError:
        pass
    assert cli.main(["train", "--execution", "ipex", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "use the ipex stack" in err


def test_saving_never_deletes_a_newer_checkpoint_or_the_one_just_written(tmp_path):
    for step in (900, 1000):
        checkpoint.save(tmp_path, step, {"step": step}, keep=2)
    path = checkpoint.save(tmp_path, 100, {"step": 100}, keep=2)  # a branch from an earlier checkpoint
    assert path.exists()
    assert [checkpoint.step_of(p) for p in checkpoint.all_checkpoints(tmp_path)] == [100, 900, 1000]
    for step in (200, 300):
        checkpoint.save(tmp_path, step, {"step": step}, keep=2)
    assert [checkpoint.step_of(p) for p in checkpoint.all_checkpoints(tmp_path)] == [200, 300, 900, 1000]


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    train(_cfg(tmp_path, epochs=1))
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume auto"):
        train(_cfg(tmp_path, epochs=1))


def test_resume_refuses_a_changed_schedule_and_rewinds_metrics(tmp_path):
    train(_cfg(tmp_path, epochs=4, max_steps=3, checkpoint_every=1))
    with pytest.raises(ValueError, match="epochs=4.*8"):
        train(_cfg(tmp_path, epochs=8, resume="auto"))
    train(_cfg(tmp_path, epochs=4, resume=str(tmp_path / "ckpt-00000002.pt"), checkpoint_every=1))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics-rank0.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)), "steps re-run after the checkpoint are logged once"
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == steps, "the CSV holds the same steps as the JSON lines"
    assert float(rows[-1]["images_per_second"]) > 0 and float(rows[-1]["forward_seconds"]) > 0
    assert float(rows[-1]["val_top1"]) >= 0 and rows[0]["val_top1"] == "", "held-out accuracy at epoch ends"


def test_recipe_numbers_in_exponent_form_are_read_as_numbers(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("weight_decay: 5e-5\nend_lr: 1e-4\nepochs: 3\n")
    cfg = load_config(str(recipe))
    assert (cfg.weight_decay, cfg.end_lr, cfg.epochs) == (5e-5, 1e-4, 3)
    recipe.write_text("epochs: many\n")
    with pytest.raises(ValueError, match="epochs must be int, got 'many'"):
        load_config(str(recipe))


def test_a_recipe_whose_optional_package_is_missing_names_the_extra(tmp_path, monkeypatch, capsys):

    monkeypatch.setitem(sys.modules, "torchvision", None)  # as after `pip install ipex-lars`
    code = cli.main(
        [
            "train",
            "--recipe",
            "resnet50-32k",
            "--data",
            "synthetic",
            "--num-samples",
            "8",
            "--image-size",
            "32",
            "--global-batch",
            "4",
            "--epochs",
            "1",
            "--threads",
            "1",
            "--out-dir",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "'torchvision'" in err[0] and "pip install 'ipex-lars[data]'" in err[0]


def test_warmup_starts_from_warmup_start_lr_and_lars_eps_reaches_the_optimizer(tmp_path):
    train(
        _cfg(
            tmp_path,
            lr=2.0,
            warmup_epochs=1.0,
            warmup_start_lr=0.5,
            lars_eps=1e-5,
            max_steps=2,
            global_batch=512,
            progress=False,
        )
    )
    with open(tmp_path / "metrics.csv", newline="") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs[0] == 0.5 and 0.5 < lrs[1] < 2.0  # the first step runs at the start lr, then it ramps
    saved = checkpoint.load(sorted(tmp_path.glob("*.pt"))[-1])
    assert saved["optimizer"]["param_groups"][0]["eps"] == 1e-5


def test_the_old_backend_name_still_works_with_a_warning(tmp_path, capsys):

    recipe = tmp_path / "old.yaml"
    recipe.write_text("backend: native\nepochs: 1\nmax_steps: 1\nthreads: 1\nprogress: false\n")
    assert load_config(str(recipe)).execution == "native"
    assert "'backend' is now called 'execution'" in capsys.readouterr().err
    code = cli.main(
        [
            "train",
            "--backend",
            "native",
            "--max-steps",
            "1",
            "--threads",
            "1",
            "--no-progress",
            "--out-dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0 and "--backend is now called --execution" in capsys.readouterr().err
