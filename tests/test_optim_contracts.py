"""The contracts any torch optimizer keeps, checked for every LARS implementation.

Written for this project in the spirit of PyTorch's TestOptimRenewed and timm's optimizer
tests: state_dict round trips, hooks, strided parameters, state changed between steps,
no-op steps, printing, copying, convergence. Users drop LARS into loops written for torch's
optimizers; each test is something such a loop relies on.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
from collections import defaultdict

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from ipex_lars.optim import LARS, lars, lars_param_groups

IMPLS = ("reference", "foreach", "fused")


def _model(dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(
        dtype
    )


def _batches(n: int, dtype=torch.float32, seed: int = 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, 6, 6, generator=gen).to(dtype), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)
    ]


def _opt(model: nn.Module, impl: str, **kw) -> LARS:
    return LARS(
        lars_param_groups(model, weight_decay=kw.pop("weight_decay", 1e-3)), lr=kw.pop("lr", 1.0), impl=impl, **kw
    )


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list) -> None:
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def _same_models(a: nn.Module, b: nn.Module) -> bool:
    return torch.equal(_flat(a), _flat(b))


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    return request.param


# --- state_dict ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_state_dict_round_trip_continues_bit_for_bit(impl, dtype):
    batches = _batches(6, dtype)
    a, b = _model(dtype), _model(dtype)
    opt_a, opt_b = _opt(a, impl), _opt(b, impl)
    _train(a, opt_a, batches[:3])
    _train(b, opt_b, batches[:3])
    saved = copy.deepcopy(opt_b.state_dict())
    fresh_b = _opt(b, impl)
    fresh_b.load_state_dict(saved)
    _train(a, opt_a, batches[3:])
    _train(b, fresh_b, batches[3:])
    assert _same_models(a, b)


def test_an_older_state_dict_without_newer_settings_loads_with_their_defaults(impl):
    model = _model()
    opt = _opt(model, impl)
    _train(model, opt, _batches(2))
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["clip"], group["momentum_style"]  # as saved by a version that did not have them
    again = _opt(model, impl)
    again.load_state_dict(saved)
    assert all(g["clip"] is False and g["momentum_style"] == "paper" for g in again.param_groups)
    _train(model, again, _batches(1))


def test_state_entries_that_are_not_tensors_survive_a_load(impl):
    model = _model()
    opt = _opt(model, impl)
    _train(model, opt, _batches(1))
    saved = opt.state_dict()
    saved["state"]["hook_flag"] = True  # not a parameter's state: torch keeps such entries as they are
    saved["state"][0]["visits"] = 3
    opt.load_state_dict(saved)
    _train(model, opt, _batches(1))
    again = opt.state_dict()
    assert again["state"]["hook_flag"] is True and again["state"][0]["visits"] == 3


# --- hooks --------------------------------------------------------------------------------


def test_step_hooks_run_once_per_step(impl):
    model = _model()
    opt = _opt(model, impl)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    _train(model, opt, _batches(2))
    assert calls == ["pre", "post", "pre", "post"]


def test_state_dict_hooks_can_edit_what_is_saved(impl):
    model = _model()
    opt = _opt(model, impl)
    _train(model, opt, _batches(1))
    opt.register_state_dict_pre_hook(lambda o: o.param_groups[0].__setitem__("note", "pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    saved = opt.state_dict()
    assert saved["extra"] == 1 and saved["param_groups"][0]["note"] == "pre"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_load_hooks_see_and_edit_momentum_and_masters(impl, dtype):
    model = _model(dtype)
    opt = _opt(model, impl)
    _train(model, opt, _batches(2, dtype))
    saved = opt.state_dict()
    seen_pre, seen_post = [], []

    def pre(o, state_dict):
        seen_pre.append(sorted(state_dict["state"][0]))
        state_dict["state"][0]["momentum_buffer"] = torch.full_like(state_dict["state"][0]["momentum_buffer"], 0.5)

    def post(o):
        first = o.param_groups[0]["params"][0]
        seen_post.append({k: v.dtype for k, v in o.state[first].items()})
        o.state[first]["momentum_buffer"].mul_(2)

    fresh = _opt(model, impl)
    fresh.register_load_state_dict_pre_hook(pre)
    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(saved)
    expected = ["master_param", "momentum_buffer"] if dtype == torch.bfloat16 else ["momentum_buffer"]
    assert seen_pre == [expected]
    assert seen_post == [{k: torch.float32 for k in expected}]
    first = fresh.param_groups[0]["params"][0]
    assert torch.equal(fresh.state[first]["momentum_buffer"], torch.full_like(first, 1.0, dtype=torch.float32))


# --- steps that must not change anything -----------------------------------------------


def test_a_step_without_gradients_changes_nothing_and_creates_no_state(impl):
    model = _model()
    opt = _opt(model, impl)
    before = _flat(model)
    opt.step()
    assert torch.equal(_flat(model), before) and not opt.state


def test_a_parameter_whose_gradient_is_dropped_is_skipped_then_stepped_again(impl):
    ps = [nn.Parameter(torch.randn(40)) for _ in range(4)]
    opt = LARS(ps, lr=1.0, impl=impl)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(40)
        opt.step()
    ps[1].grad = None  # e.g. a branch of the model not used this step
    before = [(p.detach().clone(), opt.state[p]["momentum_buffer"].clone()) for p in ps]
    opt.step()
    moved = [not torch.equal(p, w) for p, (w, _) in zip(ps, before)]
    assert moved == [True, False, True, True]
    assert torch.equal(opt.state[ps[1]]["momentum_buffer"], before[1][1])
    ps[1].grad = torch.randn(40)
    kept = ps[1].detach().clone()
    opt.step()
    assert not torch.equal(ps[1], kept)


def test_a_step_after_zero_grad_set_to_none_changes_nothing(impl):
    model = _model()
    opt = _opt(model, impl)
    _train(model, opt, _batches(1))
    opt.zero_grad(set_to_none=True)
    before = _flat(model), copy.deepcopy(opt.state_dict())
    opt.step()
    assert torch.equal(_flat(model), before[0])
    for key, entry in opt.state_dict()["state"].items():
        assert torch.equal(entry["momentum_buffer"], before[1]["state"][key]["momentum_buffer"])


def test_a_step_with_zero_gradients_and_no_decay_changes_nothing(impl):
    model = _model()
    opt = _opt(model, impl, weight_decay=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = _flat(model)
    opt.step()
    assert torch.equal(_flat(model), before)


def test_gradients_are_never_modified(impl):
    model = _model(torch.bfloat16)
    opt = _opt(model, impl)
    x, y = _batches(1, torch.bfloat16)[0]
    nn.functional.cross_entropy(model(x).float(), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


# --- layouts --------------------------------------------------------------------------------


def _strided_params() -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(40, 600, generator=gen)
    return [
        nn.Parameter(base.t()),  # transposed
        nn.Parameter(torch.randn(300, 80, generator=gen)[:, ::3]),  # sliced with a step
        nn.Parameter(torch.randn(7, 1, generator=gen).expand(7, 5).clone().t()),  # expanded, materialised, viewed
        nn.Parameter(torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last)),
    ]


def test_strided_parameters_step_like_their_contiguous_twins(impl):
    strided = _strided_params()
    twins = [nn.Parameter(p.detach().contiguous()) for p in strided]
    strides = [p.stride() for p in strided]
    opt_s = LARS(strided, lr=1.0, weight_decay=1e-3, impl=impl)
    opt_t = LARS(twins, lr=1.0, weight_decay=1e-3, impl=impl)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        for p, q in zip(strided, twins):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt_s.step()
        opt_t.step()
    for p, q, stride in zip(strided, twins, strides):
        assert p.stride() == stride, "the parameter's layout changed"
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        assert not torch.equal(p.detach(), opt_s.state[p]["momentum_buffer"] * 0)  # it moved


# --- state and groups changed between steps ------------------------------------------------


def _continue_and_compare(impl: str, change, expected_restart: bool) -> None:
    batches = _batches(4)
    model = _model()
    opt = _opt(model, impl)
    _train(model, opt, batches[:2])
    change(opt)
    twin = copy.deepcopy(model)
    twin_opt = _opt(twin, impl)  # fresh state: what a momentum restart must give
    _train(model, opt, batches[2:3])
    _train(twin, twin_opt, batches[2:3])
    assert _same_models(model, twin) is expected_restart
    assert all("momentum_buffer" in s for s in opt.state_dict()["state"].values())


def test_cleared_state_restarts_momentum_at_the_next_step(impl):
    _continue_and_compare(impl, lambda opt: opt.state.clear(), expected_restart=True)


def test_replaced_momentum_buffers_are_the_ones_used(impl):
    def zero(opt):
        for p in list(opt.state):
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)

    _continue_and_compare(impl, zero, expected_restart=True)


def test_momentum_replaced_through_a_held_entry_is_the_one_used(impl):
    def zero(opt):
        entries = [opt.state[p] for p in list(opt.state)]  # a loop holds the entries, then edits them
        for p, entry in zip(list(opt.state), entries):
            entry.update(momentum_buffer=torch.zeros_like(p))

    _continue_and_compare(impl, zero, expected_restart=True)


def test_a_plain_dict_stored_as_state_is_the_one_used_and_watched(impl):
    def replace(opt):
        for p in list(opt.state):
            opt.state[p] = {"momentum_buffer": opt.state[p]["momentum_buffer"].clone()}

    _continue_and_compare(impl, replace, expected_restart=False)

    model = _model()
    opt = _opt(model, impl, weight_decay=0.0)
    _train(model, opt, _batches(2))
    plain = {p: {"momentum_buffer": opt.state[p]["momentum_buffer"].clone()} for p in list(opt.state)}
    for p, entry in plain.items():
        opt.state[p] = entry
    opt.step()  # gathers the plain dicts; their later edits must still be seen
    for p, entry in plain.items():
        entry["momentum_buffer"] = torch.zeros_like(p)
        p.grad = torch.zeros_like(p)
    before = _flat(model)
    opt.step()  # zero gradient, zero momentum, no decay: a step that moves nothing
    assert torch.equal(_flat(model), before), "the step used momentum the user had replaced"


def test_a_state_mapping_swapped_out_and_back_is_the_one_used(impl):
    model = _model()
    opt = _opt(model, impl, weight_decay=0.0)
    _train(model, opt, _batches(2))
    saved = opt.state
    opt.state = defaultdict(dict)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # the stand-in mapping gets momentum of its own
    opt.state = saved
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
        saved[p]["momentum_buffer"].zero_()  # in place: the original mapping's momentum is now zero
    before = _flat(model)
    opt.step()  # zero gradient, zero momentum: only a stale list from the stand-in would move weights
    assert torch.equal(_flat(model), before)


def test_the_state_mapping_copies_like_a_dict(impl):
    model = _model()
    opt = _opt(model, impl)
    _train(model, opt, _batches(1))
    for copied in (opt.state.copy(), copy.copy(opt.state)):
        assert dict(copied) == dict(opt.state) and copied is not opt.state


def test_a_saved_state_dict_loads_without_unpickling_code(impl, tmp_path):
    model = _model()
    opt = _opt(model, impl)
    _train(model, opt, _batches(2))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert all(type(s) is dict and "momentum_buffer" in s for s in loaded["state"].values())


def test_untouched_state_is_not_a_restart(impl):
    _continue_and_compare(impl, lambda opt: None, expected_restart=False)


def test_a_parameter_swapped_into_a_group_is_updated(impl):
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    opt = LARS([a], lr=0.5, impl=impl)
    a.grad = torch.ones(4)
    opt.step()
    opt.param_groups[0]["params"][0] = b  # in place, same list
    a_before = a.detach().clone()
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    opt.step()
    assert torch.equal(a, a_before) and not torch.equal(b, torch.ones(4))


def test_changed_hyperparameters_and_added_groups_take_effect_at_the_next_step(impl):
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    opt = LARS([a], lr=0.5, impl=impl)
    a.grad = torch.ones(4)
    opt.step()
    opt.param_groups[0]["lr"] = 0.0
    opt.param_groups[0]["momentum"] = 0.0
    opt.add_param_group({"params": [b], "lr": 0.25, "lars": False, "momentum": 0.0})
    a_before = a.detach().clone()
    b.grad = torch.ones(4)
    opt.step()
    assert torch.equal(a, a_before)
    assert torch.equal(b.detach(), torch.full((4,), 0.75))


def test_a_one_element_tensor_lr_steps_like_the_number(impl):
    p, q = nn.Parameter(torch.arange(4.0)), nn.Parameter(torch.arange(4.0))
    opt_p = LARS([p], lr=torch.tensor(0.5), impl=impl)
    opt_q = LARS([q], lr=0.5, impl=impl)
    for _ in range(2):
        p.grad, q.grad = torch.ones(4), torch.ones(4)
        opt_p.step()
        opt_q.step()
    assert torch.equal(p, q)
    with pytest.raises(ValueError, match="lr"):
        LARS([p], lr=torch.tensor([0.1, 0.2]), impl=impl)


# --- invalid input changes nothing -----------------------------------------------------------


@pytest.mark.parametrize("bad", ["shape", "dtype", "sparse"])
def test_an_invalid_input_raises_before_anything_is_written(impl, bad):
    ps = [nn.Parameter(torch.randn(50)) for _ in range(3)]
    opt = LARS(ps, lr=1.0, impl=impl)
    for p in ps:
        p.grad = torch.randn(50)
    opt.step()
    snapshot = [(p.detach().clone(), opt.state[p]["momentum_buffer"].clone()) for p in ps]
    if bad == "shape":
        opt.state[ps[2]]["momentum_buffer"] = torch.zeros(49)
    elif bad == "dtype":
        opt.state[ps[2]]["momentum_buffer"] = torch.zeros(50, dtype=torch.float64)
    else:
        ps[2].grad = torch.randn(50).to_sparse()
    for p in ps[:2]:
        p.grad = torch.randn(50)
    with pytest.raises((ValueError, RuntimeError), match="shape|float32|sparse"):
        opt.step()
    for p, (w, v) in zip(ps[:2], snapshot):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], v)


# --- copies and printing ------------------------------------------------------------------


def test_deepcopy_and_pickle_give_optimizers_that_continue_identically(impl):
    model = _model()
    opt = _opt(model, impl)
    _train(model, opt, _batches(2))
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    _train(model, opt, _batches(2, seed=3))
    for m, o in copies:
        assert o.impl == impl
        _train(m, o, _batches(2, seed=3))
        assert _same_models(m, model)


def test_printing_shows_the_settings(impl):
    text = repr(_opt(_model(), impl))
    assert text.startswith("LARS (") and "trust_coefficient: 0.001" in text and "momentum_style: paper" in text


# --- convergence --------------------------------------------------------------------------


@pytest.mark.parametrize("adapt,lr", [(True, 3e-3), (False, 1e-3)])
def test_rosenbrock_reaches_its_minimum(impl, adapt, lr):
    xy = nn.Parameter(torch.tensor([1.5, 1.5]))
    opt = LARS([{"params": [xy], "lars": adapt}], lr=lr, momentum=0.9, trust_coefficient=1.0, impl=impl)

    def rosenbrock(v: torch.Tensor) -> torch.Tensor:
        return (1 - v[0]) ** 2 + 100 * (v[1] - v[0] ** 2) ** 2

    for step in range(2000):
        opt.zero_grad()
        rosenbrock(xy).backward()
        opt.step()
        if step == 1000:
            opt.param_groups[0]["lr"] *= 0.1
    assert rosenbrock(xy).item() < 1e-3
    torch.testing.assert_close(xy.detach(), torch.ones(2), atol=0.01, rtol=0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_a_small_model_learns_separable_data(impl, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    y = (x[:, :3].sum(1) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2)).to(dtype)
    opt = LARS(lars_param_groups(model, weight_decay=1e-4), lr=5.0, momentum=0.9, impl=impl)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(dtype)).float(), y).backward()
        opt.step()
    accuracy = (model(x.to(dtype)).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9


# --- the functional step ------------------------------------------------------------------


def test_the_functional_step_is_what_the_optimizer_does(impl):
    model_a, model_b = _model(torch.bfloat16), _model(torch.bfloat16)
    opt = _opt(model_a, impl)
    x, y = _batches(1, torch.bfloat16)[0]
    for m in (model_a, model_b):
        nn.functional.cross_entropy(m(x).float(), y).backward()
    opt.step()
    for group in lars_param_groups(model_b, weight_decay=1e-3):
        ps = group["params"]
        masters = [p.detach().float() for p in ps]
        bufs = [torch.zeros_like(m) for m in masters]
        lars(
            ps,
            [p.grad for p in ps],
            bufs,
            masters,
            lr=1.0,
            momentum=0.9,
            weight_decay=group["weight_decay"],
            trust_coefficient=0.001,
            eps=0.0,
            nesterov=False,
            momentum_style="paper",
            clip=False,
            adapt=group.get("lars", True),
            impl=impl,
        )
    assert _same_models(model_a, model_b)


_FUNCTIONAL_HYPER = dict(
    lr=1.0,
    momentum=0.9,
    weight_decay=1e-3,
    trust_coefficient=0.001,
    eps=0.0,
    nesterov=False,
    momentum_style="paper",
    clip=False,
    adapt=True,
)


@pytest.mark.parametrize("grads", ["own", "list with a None"])
def test_the_functional_step_takes_each_parameters_own_gradient_and_skips_missing_ones(impl, grads):
    torch.manual_seed(0)
    ps = [torch.randn(30, 7) for _ in range(3)]
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[1].grad = None
    twins = [p.clone() for p in ps]
    hyper = dict(_FUNCTIONAL_HYPER, impl=impl)
    bufs = [torch.zeros_like(p) for p in ps]
    given = None if grads == "own" else [p.grad for p in ps]
    lars(tuple(ps), given, bufs, **hyper)  # any sequence, as torch's functional optimizers take
    twin_bufs = [torch.zeros_like(p) for p in ps]
    lars([twins[0], twins[2]], [ps[0].grad, ps[2].grad], [twin_bufs[0], twin_bufs[2]], **hyper)
    assert torch.equal(ps[0], twins[0]) and torch.equal(ps[2], twins[2])
    assert torch.equal(ps[1], twins[1]) and not bufs[1].any()


class _Wrapped(torch.Tensor):
    """A tensor subclass that runs its operations in Python (as DTensor and FakeTensor do)."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        wrapped = torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, strides=elem.stride())
        wrapped.elem = elem
        return wrapped

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(t):
            return t.elem if isinstance(t, cls) else t

        def wrap(t):
            return cls(t) if isinstance(t, torch.Tensor) and not isinstance(t, cls) else t

        return tree_map(wrap, func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {})))


def test_tensor_subclasses_step_with_foreach_and_the_fused_kernel_names_it():
    torch.manual_seed(0)
    w, g = torch.randn(10), torch.randn(10)
    plain = nn.Parameter(w.clone())
    plain.grad = g.clone()
    LARS([plain], lr=1.0, impl="foreach").step()
    for impl in ("foreach", "reference"):
        p = _Wrapped(w.clone())
        p.grad = _Wrapped(g.clone())
        LARS([p], lr=1.0, impl=impl).step()
        assert torch.allclose(p.elem, plain.detach(), rtol=1e-6, atol=1e-7)
    p = _Wrapped(w.clone())
    p.grad = _Wrapped(g.clone())
    with pytest.raises(TypeError, match="impl='foreach'"):
        LARS([p], lr=1.0, impl="fused").step()
    assert torch.equal(p.elem, w)


def test_a_dispatch_mode_sees_no_call_from_inside_the_fused_kernel():
    """The kernel borrows tensors while it holds the GIL; Python code run by a dispatch mode inside
    it could let the GIL go and another thread free one. So its own ATen calls (here the dense
    copy of a sliced weight) bypass modes, and the step is the same with or without one."""

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append(func)
            return func(*args, **(kwargs or {}))

    def run(mode):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(64, 128)[:, :64]), nn.Parameter(torch.randn(20_000))]
        bufs = [torch.zeros_like(p) for p in ps]
        grads = [torch.randn_like(p) for p in ps]
        with mode:
            lars(ps, grads, bufs, impl="fused", **_FUNCTIONAL_HYPER)
        return [p.detach() for p in ps]

    recorder = Recorder()
    stepped = run(recorder)
    assert recorder.calls == []
    assert all(torch.equal(a, b) for a, b in zip(stepped, run(contextlib.nullcontext())))
