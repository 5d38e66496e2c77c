"""Training configuration: one dataclass; recipes are YAML files of its fields."""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: from ``low`` up to ``high`` (None: no upper end), each end
    included unless marked open; a float must also be finite."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above_low = value > self.low or (value == self.low and not self.low_open)
        below_high = self.high is None or value < self.high or (value == self.high and not self.high_open)
        return above_low and below_high

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


AT_LEAST_0, AT_LEAST_1, ABOVE_0, FRACTION = Range(0), Range(1), Range(0, low_open=True), Range(0, 1, high_open=True)


def _opt(default, help: str, choices: tuple | None = None, valid: Range | None = None):
    return field(default=default, metadata={"help": help, "choices": choices, "range": valid})


@dataclass
class TrainConfig:
    """Every setting of a training run. ``ipex-lars train --help`` lists them with these texts."""

    model: str = _opt("digits_cnn", "network", ("digits_cnn", "alexnet_bn", "alexnet_bn_caffe", "resnet50"))
    data: str = _opt("digits", "dataset", ("digits", "synthetic", "imagefolder"))
    data_dir: str = _opt("", "imagefolder root holding train/CLASS/*.JPEG and val/CLASS/*.JPEG")
    workers: int = _opt(4, "DataLoader worker processes decoding images (imagefolder)", valid=AT_LEAST_0)
    image_size: int = _opt(224, "training crop side (imagefolder, synthetic)", valid=AT_LEAST_1)
    max_image_pixels: int = _opt(
        64_000_000,
        "imagefolder images with more pixels are skipped (and named in "
        "skipped.txt), checked from the header before decoding",
        valid=AT_LEAST_1,
    )
    num_samples: int = _opt(2048, "training samples for synthetic data", valid=AT_LEAST_1)
    num_classes: int = _opt(1000, "classes for synthetic data", valid=AT_LEAST_1)
    epochs: int = _opt(40, "training epochs", valid=AT_LEAST_1)
    global_batch: int = _opt(512, "images per optimizer step over all ranks and accumulation steps", valid=AT_LEAST_1)
    accum_steps: int = _opt(1, "micro-batches accumulated per optimizer step on each rank", valid=AT_LEAST_1)
    optimizer: str = _opt("lars", "optimizer", ("lars", "sgd"))
    lr: float = _opt(2.0, "peak learning rate (after warmup)", valid=AT_LEAST_0)
    momentum: float = _opt(0.9, "momentum", valid=FRACTION)
    weight_decay: float = _opt(5e-4, "weight decay (not applied to BN and bias)", valid=AT_LEAST_0)
    trust_coefficient: float = _opt(0.001, "LARS trust coefficient eta", valid=ABOVE_0)
    momentum_style: str = _opt("paper", "LARS momentum form", ("paper", "sgd"))
    lars_eps: float = _opt(0.0, "LARS epsilon in the trust ratio's denominator", valid=AT_LEAST_0)
    warmup_epochs: float = _opt(2.0, "linear warmup length in epochs", valid=AT_LEAST_0)
    warmup_start_lr: float = _opt(0.0, "learning rate the linear warmup starts from", valid=AT_LEAST_0)
    poly_power: float = _opt(2.0, "power of the polynomial decay after warmup", valid=ABOVE_0)
    end_lr: float = _opt(0.0, "learning rate at the end of training", valid=AT_LEAST_0)
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss", valid=FRACTION)
    precision: str = _opt(
        "fp32",
        "compute precision; auto: bf16 where the CPU computes it natively "
        "(AVX512_BF16, AVX_NE_CONVERT, AMX), else fp32",
        ("auto", "fp32", "bf16"),
    )
    channels_last: bool = _opt(False, "use the channels-last memory format")
    execution: str = _opt(
        "native",
        "how the model runs: eager PyTorch (native), through ipex.optimize (ipex stack), or torch.compile; "
        "--backend is its old name",
        ("native", "ipex", "compile"),
    )
    impl: str = _opt("auto", "LARS implementation", ("auto", "fused", "foreach", "reference"))
    overlap_optimizer: bool = _opt(
        False,
        "with several ranks, run LARS on each gradient bucket as soon as its allreduce "
        "completes, during backward (same weights; a non-finite bucket is skipped alone)",
    )
    bucket_cap_mb: float = _opt(
        25.0,
        "DDP gradient bucket size in MB: smaller buckets start allreduce (and, with "
        "overlap_optimizer, LARS) earlier in backward, at more messages per step",
        valid=ABOVE_0,
    )
    dist_backend: str = _opt(
        "auto",
        "torch.distributed backend for multi-rank runs (auto: oneccl within one "
        "host or on a fabric, gloo across hosts over TCP or without oneCCL)",
        ("auto", "oneccl", "gloo", "ccl"),
    )
    seed: int = _opt(0, "seed of initialisation, data order and dropout", valid=Range(0, 2**32 - 1))
    out_dir: str = _opt("runs/digits", "where checkpoints and metrics go")
    checkpoint_every: int = _opt(0, "steps between checkpoints; 0 = at the end of every epoch", valid=AT_LEAST_0)
    keep_checkpoints: int = _opt(2, "how many recent checkpoints to keep", valid=AT_LEAST_1)
    resume: str = _opt("", "checkpoint file to resume from, or 'auto' for the newest in out_dir")
    max_steps: int = _opt(0, "stop after this many optimizer steps in total (0 = run all epochs)", valid=AT_LEAST_0)
    skip_nonfinite: bool = _opt(True, "skip (and count) steps whose gradients are not finite")
    threads: int = _opt(0, "intra-op threads (0 = torch's default)", valid=AT_LEAST_0)
    progress: bool = _opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} = {getattr(self, f.name)!r} is not one of {', '.join(choices)}")
            valid = f.metadata.get("range")
            if valid is not None and getattr(self, f.name) not in valid:
                number = "a finite number " if field_type(f) is float else ""
                raise ValueError(f"{f.name} must be {number}{valid}, got {getattr(self, f.name)!r}")
        if self.overlap_optimizer and self.optimizer != "lars":
            raise ValueError("overlap_optimizer steps LARS bucket by bucket; use optimizer lars, or drop it")
        if self.overlap_optimizer and self.execution == "ipex" and self.precision == "bf16":
            raise ValueError(
                "overlap_optimizer cannot update IPEX's bf16 master weights, which change only in "
                "optimizer.step(); use execution native for bf16, precision fp32, or drop it"
            )


def recipe_path(name: str) -> Path:
    """A packaged recipe by name, or a YAML file path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"recipe file {path} does not exist")
        return path
    packaged = RECIPES / f"{name}.yaml"
    if not packaged.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise ValueError(f"unknown recipe {name!r}; packaged recipes: {known}; or pass a FILE.yaml")
    return packaged


def load_config(recipe: str, overrides: dict | None = None) -> TrainConfig:
    """The recipe's settings with ``overrides`` (e.g. from the command line) on top."""
    path = recipe_path(recipe)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path} must be a mapping of settings")
    if "backend" in values:  # the setting's old name
        print(f"[ipex-lars] recipe {path}: 'backend' is now called 'execution'; rename it", file=sys.stderr)
        values.setdefault("execution", values.pop("backend"))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"recipe {path} has unknown setting(s) {', '.join(unknown)}")
    values = {k: _typed(k, v, path) for k, v in values.items()}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig(**values)


def field_type(f: dataclasses.Field) -> type:
    """The Python type of a TrainConfig field (its annotation, evaluated: they are strings here)."""
    return _setting_types()[f.name]


@functools.cache
def _setting_types() -> dict[str, type]:
    return typing.get_type_hints(TrainConfig)


def _typed(name: str, value, path: Path):
    """A recipe value as its field's type: YAML reads ``5e-5`` as a string, for one."""
    kind = field_type(next(f for f in dataclasses.fields(TrainConfig) if f.name == name))
    if kind is bool and isinstance(value, bool) or kind is str and isinstance(value, str):
        return value
    try:
        if kind is float and not isinstance(value, bool):
            return float(value)
        if kind is int and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
    except (TypeError, ValueError):
        pass
    raise ValueError(f"recipe {path}: {name} must be {kind.__name__}, got {value!r}")
