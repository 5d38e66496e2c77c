"""Faults and bad input in training: a torn metrics line, a full disk, damaged checkpoints, bad settings.

Each ends in one line (a warning the run survives, or an error and exit 2), never a traceback, and
no checkpoint is lost. Runs are a few digits steps in process; the full-disk and read-only cases mount
a small tmpfs, which needs root (they skip without it).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from ipex_lars import cli
from ipex_lars.train import checkpoint
from ipex_lars.train.checkpoint import SaveError
from ipex_lars.train.config import TrainConfig, field_type, load_config
from ipex_lars.train.engine import train
from ipex_lars.train.metrics import CSV_COLUMNS, MetricsLog

RUN = ("--recipe", "digits", "--threads", "1", "--epochs", "4", "--checkpoint-every", "1", "--no-progress")


def _cfg(out: Path, **kw) -> TrainConfig:
    return load_config(
        "digits", {"out_dir": str(out), "threads": 1, "epochs": 4, "checkpoint_every": 1, "progress": False, **kw}
    )


def _train_cli(capsys, out: Path, *args: str) -> tuple[int, str, list[str]]:
    """``ipex-lars train`` in this process: exit code, stdout, and stderr's lines."""
    code = cli.main(["train", *RUN, "--out-dir", str(out), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


def _temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size_kb, *options)``: a fresh tmpfs folder (root only: skips otherwise), unmounted after the test."""
    mounted: list[Path] = []

    def mount(size_kb: int, *options: str) -> Path:
        target = tmp_path / f"tmpfs{len(mounted)}"
        target.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join((f"size={size_kb}k", *options)), "tmpfs", str(target)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=True)


def _remount(target: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes // 1024 + 1}k", str(target)], check=True)


# 1. A torn metrics line


def test_a_torn_metrics_line_is_dropped_with_a_warning_and_resume_continues(tmp_path, capsys):
    train(_cfg(tmp_path, max_steps=2))
    jsonl, table = tmp_path / "metrics-rank0.jsonl", tmp_path / "metrics.csv"
    with open(jsonl, "a") as f:
        f.write('{"step": 3, "epoch": 0, "loss": 2.3, "note": "cut sh')  # the crash, mid-line
    with open(table, "a") as f:
        f.write("3,0,2.3")
    capsys.readouterr()
    code, _, err = _train_cli(capsys, tmp_path, "--resume", "auto", "--max-steps", "3")
    assert code == 0, err
    assert len(err) == 1 and "warning: dropped 1 torn or unreadable line(s)" in err[0] and str(jsonl) in err[0]
    text = jsonl.read_text()
    assert text.endswith("\n") and [json.loads(line)["step"] for line in text.splitlines()] == [1, 2, 3]
    assert [line.split(",")[0] for line in table.read_text().splitlines()] == ["step", "1", "2", "3"]


def test_unreadable_metrics_lines_anywhere_are_dropped_once_and_the_files_rewritten(tmp_path, capsys):
    good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "metrics-rank0.jsonl").write_text(f"{good[0]}\nnot json\n{good[1]}\n\0\0\0\n{good[2]}\n" + '{"st')
    MetricsLog(tmp_path, resumed_at=3).close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "dropped 3 torn or unreadable line(s)" in err[0] and "line 2, 4, 6" in err[0]
    assert (tmp_path / "metrics-rank0.jsonl").read_text() == "".join(line + "\n" for line in good)
    rows = [f"{s},,{1.0 / s}" + "," * (len(CSV_COLUMNS) - 3) for s in (1, 2, 3)]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1:] == rows
    MetricsLog(tmp_path, resumed_at=3).close()
    assert capsys.readouterr().err == "", "a clean file draws no warning"


def test_a_full_disk_under_the_metrics_is_one_line_and_closing_them_then_does_not_raise(tmpfs):
    out = tmpfs(64)
    log = MetricsLog(out)
    (out / "filler").write_bytes(b"\0" * (os.statvfs(out).f_bavail * os.statvfs(out).f_frsize))
    with pytest.raises(SaveError, match=f"^cannot write metrics to {out}: No space left on device; free space there"):
        log.write({"step": 1, "loss": 2.0})
    log.close()


# 2. A full disk during a save


def test_a_full_disk_fails_the_save_in_one_line_keeps_the_checkpoints_and_resume_finishes(tmpfs, capsys):
    out = tmpfs(4096)
    train(_cfg(out, max_steps=1))
    size = (out / "ckpt-00000001.pt").stat().st_size
    _remount(out, os.statvfs(out).f_bsize * (os.statvfs(out).f_blocks - os.statvfs(out).f_bfree) + size // 2)
    capsys.readouterr()
    code, _, err = _train_cli(capsys, out, "--resume", "auto", "--max-steps", "3")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(
        f"ipex-lars train: error: cannot save checkpoint ckpt-00000002.pt in {out}: "
        f"No space left on device; a checkpoint needs about {checkpoint.human_size(size)} "
        "(the size of ckpt-00000001.pt)"
    ), err[0]
    assert "intact (newest ckpt-00000001.pt)" in err[0] and err[0].endswith("then continue with --resume auto")
    assert _temp_files(out) == [] and [p.name for p in checkpoint.all_checkpoints(out)] == ["ckpt-00000001.pt"]
    assert checkpoint.load(out / "ckpt-00000001.pt")["step"] == 1
    _remount(out, 8 << 20)
    code, _, err = _train_cli(capsys, out, "--resume", "auto", "--max-steps", "3")
    assert code == 0, err
    assert [checkpoint.step_of(p) for p in checkpoint.all_checkpoints(out)] == [2, 3]


class _FullFile:
    """A file that takes ``room`` bytes, then fails every write with ENOSPC, as a full disk does."""

    def __init__(self, path: Path, room: int) -> None:
        self.file, self.room = open(path, "wb"), room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_failed_save_is_a_save_error_removes_its_temp_file_and_keeps_the_older_one(tmp_path, monkeypatch, where):
    state = {"step": 1, "w": torch.arange(50_000, dtype=torch.float32)}
    checkpoint.save(tmp_path, 1, state, keep=1)
    if where == "write":  # torch.save sees the OSError and raises RuntimeError('... unexpected pos ...')
        monkeypatch.setattr(checkpoint, "open", lambda path, mode: _FullFile(path, 4096), raising=False)
    else:

        def no_space(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(checkpoint.os, "fsync", no_space)
    with pytest.raises(checkpoint.SaveError) as failed:
        checkpoint.save(tmp_path, 2, state, keep=1)
    message = str(failed.value)
    assert "\n" not in message and f"cannot save checkpoint ckpt-00000002.pt in {tmp_path}: No space left" in message
    size = checkpoint.human_size((tmp_path / "ckpt-00000001.pt").stat().st_size)
    assert f"a checkpoint needs about {size} (the size of ckpt-00000001.pt)" in message, message
    monkeypatch.undo()
    assert _temp_files(tmp_path) == []
    assert [p.name for p in checkpoint.all_checkpoints(tmp_path)] == ["ckpt-00000001.pt"]
    assert torch.equal(checkpoint.load(tmp_path / "ckpt-00000001.pt")["w"], state["w"])


def test_a_first_save_on_a_full_disk_states_the_bytes_it_attempted(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: _FullFile(path, 4096), raising=False)
    with pytest.raises(
        checkpoint.SaveError,
        match=r"^cannot save checkpoint ckpt-00000001.pt in .*: No space left on "
        r"device; a checkpoint needs more than the 20\d\.\d KB it had attempted, .* are free: free "
        r"space there or pick another --out-dir, then run again$",
    ):
        checkpoint.save(tmp_path, 1, {"w": torch.zeros(50_000)}, keep=1)
    assert list(tmp_path.iterdir()) == []


def test_temp_files_of_interrupted_saves_are_removed_at_start_with_a_note(tmp_path, capsys):
    train(_cfg(tmp_path, max_steps=1))
    (tmp_path / ".ckpt-00000002.pt.tmp-4242").write_bytes(b"\0" * 300_000)
    (tmp_path / ".ckpt-00000003.pt.tmp-4243").write_bytes(b"\0" * 1234)
    (tmp_path / "notes.tmp-1").write_text("not ours")
    capsys.readouterr()
    code, out, err = _train_cli(capsys, tmp_path, "--resume", "auto", "--max-steps", "2")
    assert code == 0, err
    assert (
        f"removed 2 temp file(s) of interrupted checkpoint saves from {tmp_path}, freeing 301234 bytes (301.2 KB)"
    ) in out
    assert _temp_files(tmp_path) == ["notes.tmp-1"]


# 3. Damaged checkpoints


def test_a_changed_byte_anywhere_in_a_checkpoint_is_detected(tmp_path):
    path = checkpoint.save(tmp_path, 1, {"step": 1, "w": torch.ones(3)}, keep=1)
    good = path.read_bytes()
    for offset in range(len(good)):
        path.write_bytes(good)
        _flip(path, offset)
        with pytest.raises(checkpoint.CorruptCheckpoint):
            checkpoint.load(path)
    for damaged in (good[:-1], good[: len(good) // 2], b"", good + b"\n"):
        path.write_bytes(damaged)
        with pytest.raises(checkpoint.CorruptCheckpoint, match=r"truncated or damaged|is damaged"):
            checkpoint.load(path)


def test_resume_auto_skips_a_damaged_newest_checkpoint_and_continues_bit_for_bit(tmp_path, capsys):
    train(_cfg(tmp_path / "straight", max_steps=3))
    train(_cfg(tmp_path / "b", max_steps=2))
    _flip(tmp_path / "b" / "ckpt-00000002.pt", 1000)
    capsys.readouterr()
    code, out, err = _train_cli(capsys, tmp_path / "b", "--resume", "auto", "--max-steps", "3")
    assert code == 0, err
    assert err == [
        f"[ipex-lars] warning: checkpoint {tmp_path / 'b' / 'ckpt-00000002.pt'} is damaged: its bytes "
        "do not match the SHA-256 saved with it; --resume auto skips it"
    ]
    assert f"resumed from {tmp_path / 'b' / 'ckpt-00000001.pt'} at step 1" in out
    a = checkpoint.load(tmp_path / "straight" / "ckpt-00000003.pt")
    b = checkpoint.load(tmp_path / "b" / "ckpt-00000003.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.parametrize("resume", ["explicit", "auto"])
def test_a_damaged_checkpoint_with_nothing_to_fall_back_to_is_one_line(tmp_path, capsys, resume):
    path = checkpoint.save(tmp_path, 1, {"step": 1}, keep=1)
    _flip(path, 10)
    code, _, err = _train_cli(capsys, tmp_path, "--resume", str(path) if resume == "explicit" else "auto")
    assert code == 2
    assert err[-1].startswith("ipex-lars train: error: ") and "Traceback" not in "\n".join(err)
    if resume == "explicit":
        assert err == [
            f"ipex-lars train: error: checkpoint {path} is damaged: its bytes do not match the SHA-256 "
            "saved with it; resume from another one, or use --resume auto for the newest intact one "
            "in --out-dir"
        ]
    else:
        assert len(err) == 2 and "--resume auto skips it" in err[0]
        assert err[1].endswith(
            f"none of the 1 checkpoint(s) in {tmp_path} is intact (see the warnings above); "
            "start afresh in a new --out-dir"
        )


def test_a_checkpoint_from_before_checksums_loads_with_a_note(tmp_path, capsys):
    path = tmp_path / "ckpt-00000001.pt"
    torch.save({"step": 1, "w": torch.ones(3)}, path)  # what save wrote before checksums
    assert checkpoint.load(path)["step"] == 1
    assert (
        capsys.readouterr().err == f"[ipex-lars] note: {path} has no checksum (it predates them), so it was "
        "loaded unverified\n"
    )


class _Payload:
    """Unpickling this runs code: it touches ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_crafted_checkpoint_with_a_valid_checksum_cannot_run_code(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "ckpt-00000001.pt"
    torch.save({"step": 1, "x": _Payload(marker)}, path)
    payload = path.read_bytes()
    path.write_bytes(payload + b"\nipex-lars sha256 " + hashlib.sha256(payload).hexdigest().encode())
    with pytest.raises(checkpoint.CorruptCheckpoint, match="not a readable ipex-lars checkpoint") as refused:
        checkpoint.load(path)
    assert "\n" not in str(refused.value)
    assert not marker.exists()


# 4. Bad input

BAD_SETTINGS = [  # flag, value, the range the error must state
    ("workers", "-1", ">= 0"),
    ("image-size", "0", ">= 1"),
    ("max-image-pixels", "0", ">= 1"),
    ("num-samples", "0", ">= 1"),
    ("num-classes", "0", ">= 1"),
    ("epochs", "0", ">= 1"),
    ("global-batch", "0", ">= 1"),
    ("accum-steps", "0", ">= 1"),
    ("lr", "-1", ">= 0"),
    ("lr", "nan", ">= 0"),
    ("momentum", "1", "in [0, 1)"),
    ("momentum", "-0.5", "in [0, 1)"),
    ("weight-decay", "-1e-4", ">= 0"),
    ("trust-coefficient", "0", "> 0"),
    ("warmup-epochs", "-1", ">= 0"),
    ("warmup-start-lr", "-0.5", ">= 0"),
    ("lars-eps", "-1e-5", ">= 0"),
    ("poly-power", "0", "> 0"),
    ("end-lr", "inf", ">= 0"),
    ("label-smoothing", "2", "in [0, 1)"),
    ("label-smoothing", "1", "in [0, 1)"),
    ("bucket-cap-mb", "0", "> 0"),
    ("seed", "-1", "in [0, 4294967295]"),
    ("seed", str(2**32), "in [0, 4294967295]"),
    ("checkpoint-every", "-1", ">= 0"),
    ("keep-checkpoints", "0", ">= 1"),
    ("max-steps", "-5", ">= 0"),
    ("threads", "-1", ">= 0"),
]


@pytest.mark.parametrize("flag,value,valid", BAD_SETTINGS, ids=[f"{f}={v}" for f, v, _ in BAD_SETTINGS])
def test_an_out_of_range_setting_is_one_line_naming_it_and_its_range(tmp_path, capsys, flag, value, valid):
    assert cli.main(["train", "--out-dir", str(tmp_path), f"--{flag}={value}"]) == 2
    name = flag.replace("-", "_")
    kind = field_type(next(f for f in dataclasses.fields(TrainConfig) if f.name == name))
    valid = f"a finite number {valid}" if kind is float else valid
    assert capsys.readouterr().err.splitlines() == [
        f"ipex-lars train: error: {name} must be {valid}, got {kind(value)!r}"
    ]
    assert not any(tmp_path.iterdir()), "nothing was started"


def test_every_numeric_setting_has_a_range_and_a_bad_value_above():
    numeric = {f.name for f in dataclasses.fields(TrainConfig) if field_type(f) in (int, float)}
    assert {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["range"] is not None} == numeric
    assert {flag.replace("-", "_") for flag, _, _ in BAD_SETTINGS} == numeric
    TrainConfig()  # the defaults are in range


def test_an_out_dir_that_is_a_file_or_under_one_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, problem in ((afile, "is a file, not a folder"), (afile / "run", "is not writable (Not a directory)")):
        assert cli.main(["train", *RUN, "--out-dir", str(out)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"ipex-lars train: error: out_dir {out} {problem}"), err


def test_an_out_dir_on_a_read_only_filesystem_is_one_line(tmpfs, capsys):
    for out in (tmpfs(64, "ro"), tmpfs(64, "ro") / "run"):
        assert cli.main(["train", *RUN, "--out-dir", str(out)]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"ipex-lars train: error: out_dir {out} is not writable (Read-only file system); pick a writable folder "
            "with --out-dir"
        ]
