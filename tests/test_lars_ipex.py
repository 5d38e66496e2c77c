"""Our LARS with momentum_style="sgd" against IPEX's Lars, on the ipex stack.

IPEX has two LARS paths that disagree on one point: its Python ``Lars.step``
applies no weight decay in ``lars=False`` groups, while the fused step that
``ipex.optimize`` installs does (it hands those groups to its SGD). Ours decays
``lars=False`` groups by their own ``weight_decay``, like IPEX's fused path.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ipex_lars.optim import LARS

ipex = pytest.importorskip("intel_extension_for_pytorch", reason="IPEX is only in the ipex stack")
from intel_extension_for_pytorch.optim._lars import Lars  # noqa: E402

pytestmark = pytest.mark.ipex
LR, MOMENTUM, WD = 0.5, 0.9, 1e-3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _groups(model: nn.Module, bias_wd: float) -> list[dict]:
    """IPEX's bn_bias_separately layout: adapted weights, BN (no decay), biases (not adapted)."""
    weights = [model[0].weight, model[3].weight]
    bn = [model[1].weight, model[1].bias]
    biases = [model[0].bias, model[3].bias]
    return [
        dict(params=weights),
        dict(params=bn, weight_decay=0.0, lars=False),
        dict(params=biases, weight_decay=bias_wd, lars=False),
    ]


def _data() -> list:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(32, 12, generator=gen), torch.randint(0, 4, (32,), generator=gen)) for _ in range(20)]


def _run(model: nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    for x, y in _data():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _ours(bias_wd: float, impl: str = "fused") -> torch.Tensor:
    model = _model()
    opt = LARS(_groups(model, bias_wd), lr=LR, momentum=MOMENTUM, weight_decay=WD, momentum_style="sgd", impl=impl)
    return _run(model, opt)


def _ipex_python(bias_wd: float) -> torch.Tensor:
    model = _model()
    return _run(model, Lars(_groups(model, bias_wd), lr=LR, momentum=MOMENTUM, weight_decay=WD))


def _ipex_fused(bias_wd: float) -> torch.Tensor:
    model = _model()
    opt = Lars(_groups(model, bias_wd), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt = ipex.optimize(model, optimizer=opt, dtype=torch.float32, weights_prepack=False)
    assert opt.fused
    return _run(model, opt)


@pytest.mark.parametrize("impl", ("fused", "reference"))
def test_same_trajectory_as_ipex_where_the_formulas_agree(impl):
    ours = _ours(bias_wd=0.0, impl=impl)
    torch.testing.assert_close(ours, _ipex_python(bias_wd=0.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, _ipex_fused(bias_wd=0.0), rtol=1e-5, atol=1e-6)


def test_decayed_unadapted_groups_follow_ipex_fused_not_its_python_path():
    ours = _ours(bias_wd=WD)
    torch.testing.assert_close(ours, _ipex_fused(bias_wd=WD), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, _ipex_python(bias_wd=WD), rtol=1e-5, atol=1e-6)
