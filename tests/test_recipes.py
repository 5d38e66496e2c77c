"""Packaged recipes carry the released values their comments cite, and the released AlexNet-BN
network has the layout of its prototxt."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ipex_lars.models import create_model
from ipex_lars.train.config import RECIPES, load_config

LARGE_BATCH = sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem != "digits")


@pytest.mark.parametrize("name", LARGE_BATCH)
def test_large_batch_recipes_load_with_auto_precision_and_state_what_to_expect(name):
    cfg = load_config(name)
    assert cfg.optimizer == "lars" and cfg.precision == "auto"
    text = (RECIPES / f"{name}.yaml").read_text()
    assert "# Expected accuracy:" in text


def test_alexnet_recipe_has_the_intel_caffe_release_values():
    cfg = load_config("alexnet-bn-32k")
    got = (
        cfg.global_batch,
        cfg.lr,
        cfg.momentum,
        cfg.weight_decay,
        cfg.trust_coefficient,
        cfg.warmup_epochs,
        cfg.poly_power,
        cfg.epochs,
        cfg.momentum_style,
        cfg.image_size,
    )
    assert got == (32768, 33.0, 0.9, 5e-4, 1e-3, 10, 2.0, 100, "paper", 227)


def test_resnet50_32k_recipe_has_the_mlperf_v06_tpu_values():
    cfg = load_config("resnet50-32k")
    got = (
        cfg.global_batch,
        cfg.lr,
        cfg.warmup_epochs,
        cfg.weight_decay,
        cfg.label_smoothing,
        cfg.end_lr,
        cfg.momentum_style,
        cfg.epochs,
    )
    assert got == (32768, 31.2, 25, 1e-4, 0.1, 1e-4, "sgd", 76)


@pytest.mark.parametrize("suffix, batch", [("512", 512), ("1k", 1024), ("4k", 4096), ("8k", 8192)])
def test_nus_family_follows_sqrt_lr_and_linear_warmup(suffix, batch):
    cfg = load_config(f"resnet50-nus-{suffix}")
    assert cfg.global_batch == batch
    assert math.isclose(cfg.lr, 4.0 * math.sqrt(batch / 512), rel_tol=1e-6)
    assert math.isclose(cfg.warmup_epochs, 0.15625 * batch / 512, rel_tol=1e-9)


def test_released_alexnet_bn_matches_its_prototxt():
    model = create_model("alexnet_bn_caffe", 1000)
    assert sum(p.numel() for p in model.parameters()) == 60_965_224  # AlexNet's count: BN adds no weights
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [b.num_features for b in bns] == [96, 256, 384, 384] and not any(b.affine for b in bns)
    assert [c.groups for c in model.modules() if isinstance(c, nn.Conv2d)] == [1, 2, 1, 2, 2]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    model.eval()
    for size in (224, 227):
        assert model.features(torch.zeros(1, 3, size, size)).shape == (1, 256, 6, 6)
    assert model(torch.zeros(2, 3, 227, 227)).shape == (2, 1000)
