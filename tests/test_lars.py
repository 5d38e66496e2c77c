"""LARS: every implementation against the per-parameter reference, and the reference against the paper."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from ipex_lars.optim import LARS, WarmupPolyLR, lars_param_groups

IMPLS = ("foreach", "fused")


class Net(nn.Module):
    """Conv, BN, linear, biases, a zero-initialised weight, a frozen weight and a sometimes-unused head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.zero = nn.Linear(6, 6)
        nn.init.zeros_(self.zero.weight)
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.aux = nn.Linear(5, 5)  # used on even steps only: its grad is None on the others

    def forward(self, x: torch.Tensor, use_aux: bool) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = h + self.zero(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        out = self.frozen(self.fc(h.flatten(1)))
        return self.aux(out) if use_aux else out


def _data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 4, 4, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(steps)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, data: list, start: int = 0) -> None:
    for i, (x, y) in enumerate(data, start):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x, use_aux=i % 2 == 0).float(), y).backward()
        opt.step()


def _make(impl: str, grouped: bool, dtype=torch.float32, **kw) -> tuple[nn.Module, LARS]:
    torch.manual_seed(0)
    model = Net().to(dtype)
    params = (
        lars_param_groups(model, weight_decay=1e-3) if grouped else [p for p in model.parameters() if p.requires_grad]
    )
    extra = {} if grouped else {"weight_decay": 1e-3}
    return model, LARS(params, lr=kw.pop("lr", 2.0), impl=impl, **extra, **kw)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def assert_rel_close(got: nn.Module, ref: nn.Module, rel: float = 1e-5) -> None:
    """Every parameter within ``rel`` of the reference, relative to that parameter's largest value."""
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        scale = q.detach().float().abs().max().item() or 1.0
        err = (p.detach().float() - q.detach().float()).abs().max().item()
        assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel} x {scale:.3g}"


CASES = list(itertools.product(("paper", "sgd"), (False, True), (False, True), (False, True)))
EPS32 = torch.finfo(torch.float32).eps


def step_float64(w: torch.Tensor, g: torch.Tensor, v: torch.Tensor, h: dict) -> None:
    """One LARS step in float64, written from the paper's formulas (not from our implementations)."""
    rate = h["lr"]
    if h["lars"]:
        wn, gn = w.norm().item(), g.norm().item()
        tau = h["trust_coefficient"] * wn / (gn + h["weight_decay"] * wn + h["eps"]) if wn > 0 and gn > 0 else 1.0
        rate = min(tau, h["lr"]) if h["clip"] else h["lr"] * tau
    d = g + h["weight_decay"] * w
    m = h["momentum"]
    if h["momentum_style"] == "paper":  # v = m v + rate d; w -= v
        u = rate * d
        v.mul_(m).add_(u)
        w.sub_(m * v + u if h["nesterov"] else v)
    else:  # v = m v + d; w -= rate v
        v.mul_(m).add_(d)
        w.sub_(rate * (m * v + d if h["nesterov"] else v))


def assert_within_float32_rounding(ps: list, opt: LARS, w64: list, v64: list, scales: list) -> None:
    """Each tensor's weights and momentum within 2 eps32 x sum over steps of (max|w_t| + max|v_t|).

    Why this bound: a step recomputes every element from w, g and v in a handful of float32
    operations, each rounding by at most eps/2 of a value bounded by |w| + |v|; the trust ratio's
    norms are accumulated in double across blocks. An error carries into the next step with a
    factor of at most 1 (w) or m (v), so errors add up over steps. Nothing here depends on
    the vector width, so the same bound holds on every ISA.
    """
    for i, p in enumerate(ps):
        state = opt.state[p]
        w = state.get("master_param", p).double()
        err = max((w - w64[i]).abs().max().item(), (state["momentum_buffer"].double() - v64[i]).abs().max().item())
        bound = 2 * EPS32 * scales[i]
        assert err <= bound, f"tensor {i} ({p.numel()} values): max error {err:.3g} > {bound:.3g}"


def run_against_float64(
    impl: str, shapes: list, hyper: dict, steps: int, dtype=torch.float32, channels_last: tuple = ()
) -> tuple[list, LARS]:
    """Step ``impl`` and the float64 reference on the same fixed gradients; check the bound; return params."""
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    ws[1].zero_()  # ||w|| = 0: trust ratio 1
    ps = [nn.Parameter(w.clone().to(dtype)) for w in ws]
    for i in channels_last:
        ps[i].data = ps[i].data.contiguous(memory_format=torch.channels_last)
    opt = LARS([{"params": ps, "lars": hyper["lars"]}], impl=impl, **{k: v for k, v in hyper.items() if k != "lars"})
    w64 = [p.detach().double() for p in ps]
    v64 = [torch.zeros_like(w) for w in w64]
    scales = [0.0] * len(ps)
    for t in range(steps):
        grads = [torch.randn(s, generator=gen).to(dtype) * (0.01 * (1 + t % 3)) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        if t == 1 and channels_last:
            ps[channels_last[0]].grad = ps[channels_last[0]].grad.contiguous()  # another layout than the weight
        opt.step()
        for i in range(len(ps)):
            step_float64(w64[i], grads[i].double(), v64[i], hyper)
            scales[i] += w64[i].abs().max().item() + v64[i].abs().max().item()
    assert_within_float32_rounding(ps, opt, w64, v64, scales)
    return ps, opt


# 16,384 values is one kernel block: tensors below, at and above it, and a tail after the vectors
SHAPES = [(7,), (300,), (4099,), (16384,), (16385,), (40001,)]


@pytest.mark.parametrize("style,nesterov,clip,lars", CASES)
def test_every_impl_and_isa_matches_float64_within_float32_rounding(impl_isa, style, nesterov, clip, lars):
    hyper = dict(
        lr=2.0,
        momentum=0.9,
        weight_decay=1e-3,
        trust_coefficient=0.001,
        eps=0.0,
        nesterov=nesterov,
        momentum_style=style,
        clip=clip,
        lars=lars,
    )
    run_against_float64(impl_isa, SHAPES, hyper, steps=10)


@pytest.mark.parametrize("impl", ("reference",) + IMPLS)
def test_frozen_unused_and_zero_initialised_parameters(impl):
    model, opt = _make(impl, True)
    frozen = model.frozen.weight.clone()
    _train(model, opt, _data(3))
    assert torch.equal(model.frozen.weight, frozen)
    assert model.frozen.weight not in opt.state
    assert model.zero.weight.abs().sum() > 0  # ||w|| = 0 takes trust ratio 1 and moves
    aux = model.aux.weight.clone()  # step 3 does not use the aux head: no grad, no update
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(_data(1)[0][0], use_aux=False), _data(1)[0][1]).backward()
    opt.step()
    assert torch.equal(model.aux.weight, aux)


@pytest.mark.parametrize("style", ("paper", "sgd"))
def test_impl_matches_reference_bf16_master(impl_isa, style):
    data = _data(20)
    ref_model, ref_opt = _make("reference", True, dtype=torch.bfloat16, momentum_style=style)
    model, opt = _make(impl_isa, True, dtype=torch.bfloat16, momentum_style=style)
    data = [(x.bfloat16(), y) for x, y in data]
    _train(ref_model, ref_opt, data)
    _train(model, opt, data)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert p.dtype == torch.bfloat16
        if p.requires_grad and p.grad is not None:
            master = opt.state[p]["master_param"]
            assert master.dtype == torch.float32
            assert torch.equal(master.bfloat16(), p), f"{name}: parameter is not its rounded master"
            torch.testing.assert_close(master, ref_opt.state[q]["master_param"], rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(p, q, rtol=2e-2, atol=1e-2)


def test_reference_matches_hand_computed_algorithm_1():
    # Two steps of Algorithm 1 (paper style) on w = (3, 4), worked out by hand.
    eta, wd, lr, m = 0.001, 0.1, 2.0, 0.9
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64).float())
    opt = LARS([w], lr=lr, momentum=m, weight_decay=wd, trust_coefficient=eta, impl="reference")
    # step 1: ||w|| = 5, g = (0.6, 0.8), ||g|| = 1, tau = 0.005 / 1.5 = 1/300,
    # d = g + 0.1 w = (0.9, 1.2), v = 2/300 * d = (0.006, 0.008), w = (2.994, 3.992)
    w.grad = torch.tensor([0.6, 0.8])
    opt.step()
    assert w.tolist() == pytest.approx([2.994, 3.992], abs=1e-6)
    assert opt.state[w]["momentum_buffer"].tolist() == pytest.approx([0.006, 0.008], abs=1e-8)
    # step 2: g = (0, 2), ||g|| = 2
    w.grad = torch.tensor([0.0, 2.0])
    wn = math.sqrt(2.994**2 + 3.992**2)  # 4.99
    tau = eta * wn / (2.0 + wd * wn)
    d = (0.0 + wd * 2.994, 2.0 + wd * 3.992)
    v = (m * 0.006 + lr * tau * d[0], m * 0.008 + lr * tau * d[1])
    opt.step()
    assert w.tolist() == pytest.approx([2.994 - v[0], 3.992 - v[1]], abs=1e-6)


def test_sgd_style_and_clip_follow_their_formulas():
    # sgd style: v = m v + d; w -= lr tau v. With clip the rate is min(tau, lr).
    for clip, lr in ((False, 2.0), (True, 2.0), (True, 1e-4)):
        w = nn.Parameter(torch.tensor([3.0, 4.0]))
        opt = LARS([w], lr=lr, momentum=0.9, weight_decay=0.1, momentum_style="sgd", clip=clip, impl="reference")
        w.grad = torch.tensor([0.6, 0.8])
        opt.step()
        tau = 1 / 300
        rate = min(tau, lr) if clip else lr * tau
        assert w.tolist() == pytest.approx([3.0 - rate * 0.9, 4.0 - rate * 1.2], abs=1e-6)


def test_zero_weight_or_zero_grad_gives_trust_ratio_one():
    for w0, g0 in (([0.0, 0.0], [1.0, 1.0]), ([1.0, 1.0], [0.0, 0.0])):
        for impl in ("reference", *IMPLS):
            w = nn.Parameter(torch.tensor(w0))
            opt = LARS([w], lr=0.5, momentum=0.0, impl=impl)
            w.grad = torch.tensor(g0)
            opt.step()
            assert w.tolist() == pytest.approx([a - 0.5 * b for a, b in zip(w0, g0)]), impl


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_large_tensors_and_layouts_match_float64(impl_isa, dtype):
    # several blocks per tensor, several cache batches, a channels-last weight, a grad in another layout
    shapes = [(700_000,), (600_000,), (33_000,), (7,), (64, 32, 3, 3)]
    hyper = dict(
        lr=1.0,
        momentum=0.9,
        weight_decay=1e-4,
        trust_coefficient=0.001,
        eps=0.0,
        nesterov=False,
        momentum_style="paper",
        clip=False,
        lars=True,
    )
    ps, opt = run_against_float64(impl_isa, shapes, hyper, steps=3, dtype=dtype, channels_last=(4,))
    if dtype == torch.bfloat16:
        assert all(torch.equal(p, opt.state[p]["master_param"].bfloat16()) for p in ps)
    assert ps[-1].is_contiguous(memory_format=torch.channels_last)


def test_fused_is_independent_of_thread_count():
    # the same gradients stepped with 1 and 2 threads: the norms are summed in a fixed block order
    shapes = [(100_000,), (40_000,), (300,)]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ps = [
                nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)
            ]
            opt = LARS(ps, lr=1.0, weight_decay=1e-4, impl="fused")
            gen = torch.Generator().manual_seed(7)
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            results.append(torch.cat([p.detach() for p in ps]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("first,second", [("fused", "foreach"), ("foreach", "fused"), ("reference", "fused")])
def test_state_dict_round_trips_across_impls(first, second):
    data = _data(20)
    ref_model, ref_opt = _make("reference", True)
    _train(ref_model, ref_opt, data)

    model, opt = _make(first, True)
    _train(model, opt, data[:10])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert all("momentum_buffer" in s for s in saved_opt["state"].values())

    resumed, opt2 = _make(second, True)
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, data[10:], start=10)
    torch.testing.assert_close(_flat(resumed), _flat(ref_model), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first,second", [("fused", "fused"), ("fused", "reference"), ("foreach", "fused")])
def test_bf16_master_survives_a_state_dict_round_trip(first, second):
    data = [(x.bfloat16(), y) for x, y in _data(4)]
    model, opt = _make(first, True, dtype=torch.bfloat16)
    _train(model, opt, data[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    masters = [s["master_param"] for s in saved_opt["state"].values()]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    resumed, opt2 = _make(second, True, dtype=torch.bfloat16)
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    for p, q in zip(resumed.parameters(), model.parameters()):
        if q in opt.state:
            assert torch.equal(opt2.state[p]["master_param"], opt.state[q]["master_param"])
    _train(model, opt, data[3:], start=3)
    _train(resumed, opt2, data[3:], start=3)
    for p, q in zip(resumed.parameters(), model.parameters()):
        if q in opt.state:  # one step from identical fp32 masters: equal to fp32 rounding
            torch.testing.assert_close(
                opt2.state[p]["master_param"], opt.state[q]["master_param"], rtol=1e-5, atol=1e-6
            )


def test_loading_new_weights_into_a_bf16_model_resyncs_the_master():
    model, opt = _make("fused", True, dtype=torch.bfloat16)
    data = [(x.bfloat16(), y) for x, y in _data(3)]
    _train(model, opt, data[:1])
    with torch.no_grad():
        model.fc.weight.fill_(0.25)  # e.g. model.load_state_dict of other weights
    _train(model, opt, data[1:2], start=1)
    master = opt.state[model.fc.weight]["master_param"]
    assert (master - 0.25).abs().max() < 0.05, "the step started from the stale master, not the new weights"


@pytest.mark.parametrize("impl", IMPLS)
def test_any_lr_scheduler_drives_every_impl(impl):
    data = _data(12)
    results = []
    for which in ("reference", impl):
        model, opt = _make(which, True)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x, use_aux=False), y).backward()
            opt.step()
            sched.step()
        results.append(_flat(model))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(lr=-0.1), "lr"),
        (dict(lr=0.1, momentum=1.0), "momentum"),
        (dict(lr=0.1, momentum=-0.5), "momentum"),
        (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
        (dict(lr=0.1, trust_coefficient=0.0), "trust_coefficient"),
        (dict(lr=0.1, eps=-1.0), "eps"),
        (dict(lr=0.1, momentum_style="adam"), "momentum_style"),
        (dict(lr=0.1, impl="cuda"), "impl"),
        (dict(lr=0.1, momentum=0.0, nesterov=True), "nesterov"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LARS([nn.Parameter(torch.ones(2))], **kwargs)


def test_float16_parameters_are_refused_clearly():
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        LARS([nn.Parameter(torch.ones(2, dtype=torch.float16))], lr=0.1)


def test_param_groups_exclude_norm_and_bias_from_adaptation_and_decay():
    model = Net()
    groups = lars_param_groups(model, weight_decay=5e-5)
    adapted, excluded = groups
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert adapted["lars"] and adapted["weight_decay"] == 5e-5
    assert not excluded["lars"] and excluded["weight_decay"] == 0.0
    assert ids(adapted["params"]) == ids([model.conv.weight, model.zero.weight, model.fc.weight, model.aux.weight])
    assert ids(excluded["params"]) == ids(
        [model.bn.weight, model.bn.bias, model.conv.bias, model.zero.bias, model.fc.bias, model.aux.bias]
    )
    only_bn = lars_param_groups(model, weight_decay=5e-5, exclude=("bn",))
    assert id(model.fc.bias) in ids(only_bn[0]["params"])
    with pytest.raises(ValueError, match="weight_decay"):
        lars_param_groups(model, weight_decay=-1)


def test_warmup_poly_schedule_values():
    opt = LARS([nn.Parameter(torch.ones(2))], lr=10.0)
    sched = WarmupPolyLR(opt, warmup_steps=5, total_steps=15, power=2.0, end_lr=1e-4)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(4.0) and lrs[5] == pytest.approx(10.0)
    assert lrs[10] == pytest.approx(1e-4 + (10.0 - 1e-4) * 0.25)
    assert all(lr == pytest.approx(1e-4) for lr in lrs[15:])
    assert all(a <= b for a, b in zip(lrs[:6], lrs[1:6])) and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    with pytest.raises(ValueError, match="total_steps"):
        WarmupPolyLR(opt, warmup_steps=5, total_steps=5)


@pytest.mark.parametrize("impl", ("reference",) + IMPLS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_stepping_buckets_of_parameters_equals_one_step(impl, dtype):
    """What --overlap-optimizer does: each DDP bucket is stepped on its own, in bucket order."""
    data = [(x.to(dtype), y) for x, y in _data(6)]
    whole_model, whole_opt = _make(impl, grouped=True, dtype=dtype)
    parts_model, parts_opt = _make(impl, grouped=True, dtype=dtype)
    _train(whole_model, whole_opt, data)
    params = list(parts_model.parameters())  # frozen one included: not in the optimizer, ignored
    buckets = [params[7:], params[3:7], params[:3]]  # last layers first, groups mixed, like DDP
    for i, (x, y) in enumerate(data):
        parts_opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(parts_model(x, use_aux=i % 2 == 0).float(), y).backward()
        for bucket in buckets:
            parts_opt.step_params(bucket)
    assert torch.equal(_flat(parts_model), _flat(whole_model))
    for p, q in zip(parts_model.parameters(), whole_model.parameters()):
        for key, value in whole_opt.state.get(q, {}).items():
            assert torch.equal(parts_opt.state[p][key], value), key


@pytest.mark.parametrize("impl", IMPLS)
def test_a_deep_copied_optimizer_keeps_working(impl):
    # copy.deepcopy, pickle and ipex.optimize rebuild an optimizer through __setstate__
    bf = [(x.bfloat16(), y) for x, y in _data(4)]
    model, opt = _make(impl, True, dtype=torch.bfloat16)
    _train(model, opt, bf[:2])
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.impl == impl
    _train(model, opt, bf[2:], start=2)
    _train(model2, opt2, bf[2:], start=2)
    assert_rel_close(model2, model)
    assert all(torch.equal(opt2.state[p]["master_param"].bfloat16(), p) for p in model2.parameters() if p in opt2.state)


@pytest.mark.parametrize("impl", IMPLS)
def test_state_from_an_fp32_model_gives_a_bf16_model_its_masters(impl):
    model, opt = _make(impl, True)
    _train(model, opt, _data(2))
    saved = opt.state_dict()
    bf_model, bf_opt = _make(impl, True, dtype=torch.bfloat16)
    bf_opt.load_state_dict(saved)
    _train(bf_model, bf_opt, [(x.bfloat16(), y) for x, y in _data(3)[2:]], start=2)
    for p in bf_model.parameters():
        if p in bf_opt.state:
            assert bf_opt.state[p]["master_param"].dtype == torch.float32
            assert torch.equal(bf_opt.state[p]["master_param"].bfloat16(), p)


@pytest.mark.parametrize("impl", IMPLS)
def test_state_of_the_wrong_shape_is_an_error_not_a_silent_skip(impl):
    p = nn.Parameter(torch.ones(4))
    opt = LARS([p], lr=0.1, impl=impl)
    opt.state[p]["momentum_buffer"] = torch.zeros(3)
    p.grad = torch.ones(4)
    with pytest.raises((ValueError, RuntimeError), match="shape|size"):
        opt.step()


def test_auto_falls_back_to_foreach_when_the_build_folder_is_unwritable():
    import subprocess
    import sys

    code = (
        "import warnings, torch; from ipex_lars.optim import LARS\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always'); o = LARS([torch.nn.Parameter(torch.ones(2))], lr=0.1)\n"
        "print(o.impl, any('IPEX_LARS_BUILD_DIR' in str(x.message) for x in w))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "IPEX_LARS_BUILD_DIR": "/proc/no-such-dir"},
    )
    assert out.stdout.split()[-2:] == ["foreach", "True"], out.stderr
