"""``ipex-lars train``: a recipe, with any of its settings overridden by flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from ipex_lars.train.config import TrainConfig, field_type
from launchers.argtypes import UsageError, renamed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe",
        default="digits",
        help="packaged recipe (digits, resnet50-32k, alexnet-bn-32k, resnet50-mlperf) "
        "or a FILE.yaml of settings (default: digits)",
    )
    group = parser.add_argument_group("settings (each overrides the recipe)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        valid = f.metadata.get("range")
        help_text = f"{f.metadata['help']} ({f'{valid}, ' if valid else ''}default {f.default!r})"
        kind = field_type(f)
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(
                flag, dest=f.name, type=kind, default=None, choices=f.metadata.get("choices"), help=help_text
            )
    group.add_argument(  # --execution's old name, still accepted with a warning
        "--backend",
        dest="execution",
        action=renamed("--execution", "[ipex-lars]"),
        choices=("native", "ipex", "compile"),
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )


def run(args: argparse.Namespace) -> int:
    from ipex_lars.distributed import RendezvousError, liveness
    from ipex_lars.ext import ExtensionBuildError
    from ipex_lars.train.checkpoint import SaveError
    from ipex_lars.train.config import load_config
    from ipex_lars.train.engine import train
    from ipex_lars.train.resume import ResumeRefused
    from ipex_lars.train.stop import Interrupted

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    try:
        cfg = load_config(args.recipe, overrides)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    start = time.perf_counter()
    try:
        result = train(cfg)
    except Interrupted:
        return 130
    except (ValueError, SaveError, RendezvousError, ExtensionBuildError) as exc:
        if not isinstance(exc, ResumeRefused):  # raised by every rank together; others alone: tell the peers
            liveness.fail(f"{type(exc).__name__}: {exc}")
        raise UsageError(str(exc)) from None
    except ModuleNotFoundError as exc:  # an optional dependency this recipe needs (torchvision, pillow)
        raise UsageError(
            f"this recipe needs the Python package '{exc.name}', which is not installed; install "
            "the data extra: pip install 'ipex-lars[data]'"
        ) from None
    if result.get("rank", 0) != 0:
        return 0  # rank 0 reports for the job
    minutes = (time.perf_counter() - start) / 60
    print(
        f"[ipex-lars] done: {result['steps']} steps in {minutes:.1f} min, held-out top-1 "
        f"{result['val_top1']:.2f}%, {result['skipped_steps']} skipped step(s), LARS impl "
        f"{result['optimizer_impl']}; metrics and checkpoints in {cfg.out_dir}"
    )
    print(json.dumps({k: v for k, v in result.items() if k != "phase_seconds"}))
    return 0
