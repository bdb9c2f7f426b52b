"""What torch.optim's own generic optimizer tests expect of an optimizer, checked on the adapters
that stand in for torch's: ``AdamW``, ``SGD`` and ``NAdamW(variant="torch")``.

Checkpoints (round trip through deepcopy and ``torch.save``, params of another dtype, a float
``step``), hooks (step pre/post, global, state_dict and load_state_dict), ``zero_grad``, param
groups added later, LR schedulers, closures, float64 parity with torch over many steps, empty
and missing grads, ``maximize``, tensor learning rates, and the bad inputs torch refuses. Also
``FunctimOptimizer``'s group keys: a group ``lr`` scaling every learning rate of a partition,
unknown keys refused."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import functim as ft
from functim import adapters

# adapter and the torch.optim optimizer it matches, same maths and defaults
PAIRS = {
    "AdamW": (lambda ps, **kw: adapters.AdamW(ps, **kw),
              lambda ps, **kw: torch.optim.AdamW(ps, foreach=False, **kw)),
    "SGD": (lambda ps, **kw: adapters.SGD(ps, **kw),
            lambda ps, **kw: torch.optim.SGD(ps, foreach=False, **kw)),
    "NAdamW": (lambda ps, **kw: adapters.NAdamW(ps, variant="torch", **kw),
               lambda ps, **kw: torch.optim.NAdam(ps, decoupled_weight_decay=True,
                                                  foreach=False, **kw)),
}
# per optimizer: option sets that each turn on another part of the maths
OPTIONS = {
    "AdamW": [{"lr": 1e-2}, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},
              {"lr": 1e-2, "maximize": True, "betas": (0.8, 0.99)}],
    "SGD": [{"lr": 1e-2}, {"lr": 1e-2, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1},
            {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "maximize": True}],
    # (torch.optim.NAdam's weight decay defaults to 0, NAdamW's to 1e-2)
    "NAdamW": [{"lr": 1e-2, "weight_decay": 0.0},
               {"lr": 1e-2, "weight_decay": 0.1, "momentum_decay": 6e-3}],
}
CASES = [(name, i) for name, opts in OPTIONS.items() for i in range(len(opts))]


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=dtype)),
            torch.nn.Parameter(torch.randn(3, generator=g, dtype=dtype))]


def _set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)  # the same values in any dtype


def _train(opt, params, steps, first=0):
    for s in range(first, first + steps):
        _set_grads(params, s)
        opt.step()


def _assert_state_dicts_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid, entry in a["state"].items():
        assert entry.keys() == b["state"][pid].keys()
        assert all(torch.equal(v, b["state"][pid][k]) for k, v in entry.items())


def _make(name, params, **kw):
    return PAIRS[name][0](params, **kw)


@pytest.fixture
def float64_default():
    """torch.optim.NAdam keeps its momentum product in the default dtype; float64 parity needs
    it in float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# -- maths: float64 parity with torch.optim over many steps ----------------------------------
@pytest.mark.parametrize(("name", "case"), CASES)
def test_float64_matches_torch_over_many_steps(name, case, float64_default):
    ours, theirs = _params(torch.float64), _params(torch.float64)
    kw = OPTIONS[name][case]
    opt, ref = PAIRS[name][0](ours, **kw), PAIRS[name][1](theirs, **kw)
    for s in range(60):
        _set_grads(ours, s)
        _set_grads(theirs, s)
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(PAIRS))
def test_scheduler_driven_lr_matches_torch(name, float64_default):
    ours, theirs = _params(torch.float64), _params(torch.float64)
    opt = PAIRS[name][0](ours, lr=0.05, weight_decay=0.0)
    ref = PAIRS[name][1](theirs, lr=0.05, weight_decay=0.0)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (opt, ref)]
    for s in range(12):
        for params, o, sched in zip((ours, theirs), (opt, ref), scheds):
            _set_grads(params, s)
            o.step()
            sched.step()
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.05 * 0.5**4
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


# -- tensor learning rates -------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_one_element_tensor_lr_steps_as_the_float(name, shape):
    a, b = _params(), _params()
    opt_float = _make(name, a, lr=1e-2)
    opt_tensor = _make(name, b, lr=torch.full(shape, 1e-2))
    _train(opt_float, a, 5)
    _train(opt_tensor, b, 5)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)
    assert opt_tensor.param_groups[0]["lr"].shape == shape  # kept as given, as torch does


@pytest.mark.parametrize("name", list(PAIRS))
def test_two_element_tensor_lr_is_a_value_error(name):
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        _make(name, _params(), lr=torch.tensor([1e-3, 1e-3]))


def test_two_element_tensor_lr_set_later_is_refused_before_any_step():
    params = _params()
    opt = adapters.AdamW(params, lr=1e-2)
    opt.param_groups[0]["lr"] = torch.tensor([1e-3, 1e-3])
    _set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


# -- checkpoints -----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "case"), CASES)
def test_state_dict_round_trip_continues_identically(name, case):
    kw = OPTIONS[name][case]
    params = _params()
    opt = _make(name, params, **kw)
    _train(opt, params, 4)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_c = _make(name, copies, **kw)
    saved = copy.deepcopy(opt.state_dict())
    opt_c.load_state_dict(saved)
    _assert_state_dicts_equal(saved, opt.state_dict())  # loading left the given dict as it was
    _train(opt, params, 4, first=4)
    _train(opt_c, copies, 4, first=4)
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
    _assert_state_dicts_equal(opt.state_dict(), opt_c.state_dict())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    _assert_state_dicts_equal(torch.load(buf, weights_only=True), opt.state_dict())


@pytest.mark.parametrize("name", list(PAIRS))
def test_float_step_in_a_checkpoint_loads_and_steps(name):
    params = _params()
    opt = _make(name, params, lr=1e-2)
    _train(opt, params, 3)
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        entry["step"] = entry["step"].item()
    opt.load_state_dict(sd)
    _train(opt, params, 1, first=3)
    assert all(float(opt.state[p]["step"]) == 4 for p in params)


@pytest.mark.parametrize("name", list(PAIRS))
def test_checkpoint_loads_into_params_of_another_dtype(name):
    params = _params(torch.float32)
    opt = _make(name, params, lr=1e-2)
    _train(opt, params, 3)
    wide = [torch.nn.Parameter(p.detach().double()) for p in params]
    opt64 = _make(name, wide, lr=1e-2)
    # (a deepcopy, as torch.load gives: loading keeps the saved float32 buffers, uncopied)
    opt64.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt64.state[wide[0]]["exp_avg" if name != "SGD" else "step"].dtype == torch.float32
    _train(opt64, wide, 2, first=3)
    _train(opt, params, 2, first=3)
    for p, q in zip(params, wide):
        torch.testing.assert_close(q.float(), p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(PAIRS))
def test_state_dict_pre_hook_may_add_its_own_entry(name):
    params = _params()
    opt = _make(name, params, lr=1e-2)
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("note", 1))
    assert opt.state_dict()["state"]["note"] == 1


@pytest.mark.parametrize("name", list(PAIRS))
def test_load_state_dict_hooks_run_in_order(name):
    opt = _make(name, _params(), lr=1e-2)
    sd = opt.state_dict()
    seen = []

    def set_lr(o, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.002

    opt.register_load_state_dict_pre_hook(set_lr)
    opt.register_load_state_dict_post_hook(lambda o: seen.append(o.param_groups[0]["lr"]))
    opt.load_state_dict(sd)
    assert seen == [0.002]


# -- hooks, closures, zero_grad, groups ------------------------------------------------------
@pytest.mark.parametrize("name", list(PAIRS))
def test_step_hooks_fire_in_order_and_unregister(name):
    params = _params()
    opt = _make(name, params, lr=1e-2)
    order = []
    handles = [register_optimizer_step_pre_hook(
                   lambda *a: order.append("global pre")),
               opt.register_step_pre_hook(lambda *a: order.append("pre")),
               opt.register_step_post_hook(lambda *a: order.append("post")),
               register_optimizer_step_post_hook(
                   lambda *a: order.append("global post"))]
    try:
        opt.step()
        assert order == ["global pre", "pre", "post", "global post"]
    finally:
        for h in handles:
            h.remove()
    opt.step()
    assert len(order) == 4


@pytest.mark.parametrize("name", list(PAIRS))
def test_closure_runs_with_grad_enabled_and_its_loss_is_returned(name):
    params = _params()
    opt = _make(name, params, lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = sum(p.pow(2).sum() for p in params)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.requires_grad and float(opt.state[params[0]]["step"]) == 1


@pytest.mark.parametrize("name", list(PAIRS))
def test_zero_grad_sets_none_by_default_and_zeros_when_asked(name):
    params = _params()
    opt = _make(name, params, lr=1e-2)
    _set_grads(params, 0)
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("name", list(PAIRS))
def test_param_group_added_later_steps_with_its_own_lr(name):
    a, b = _params(), _params(seed=1)
    opt = _make(name, a, lr=1e-2)
    _train(opt, a, 2)
    opt.add_param_group({"params": b, "lr": 0.0})
    before = [p.detach().clone() for p in b]
    _set_grads(a + b, 5)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(b, before))
    assert all(float(opt.state[p]["step"]) == 1 for p in b)
    assert all(float(opt.state[p]["step"]) == 3 for p in a)


@pytest.mark.parametrize("name", list(PAIRS))
def test_params_without_grads_are_left_alone_and_grads_never_written(name):
    params = _params()
    opt = _make(name, params, lr=1e-2, weight_decay=0.1)
    opt.step()  # no grads at all: nothing moves
    params[1].grad = torch.randn(3)
    before, version = params[0].detach().clone(), params[1].grad._version
    opt.step()
    assert torch.equal(params[0], before) and float(opt.state[params[0]]["step"]) == 0
    assert params[1].grad._version == version


@pytest.mark.parametrize("name", list(PAIRS))
def test_empty_params_step(name):
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.empty(0)),
              torch.nn.Parameter(torch.tensor(1.5))]
    opt = _make(name, params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert params[1].shape == (0,) and float(opt.state[params[2]]["step"]) == 1


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_maximize_climbs(name):
    w = torch.nn.Parameter(torch.ones(3))
    opt = _make(name, [w], lr=1e-1, maximize=True)
    for _ in range(5):
        opt.zero_grad()
        w.pow(2).sum().backward()
        opt.step()
    assert float(w.pow(2).sum()) > 3


# -- bad inputs, refused as torch refuses them -----------------------------------------------
@pytest.mark.parametrize("name", list(PAIRS))
def test_a_tensor_for_params_is_a_type_error_in_torchs_words(name):
    with pytest.raises(TypeError, match="should be an iterable of Tensors or dicts"):
        _make(name, torch.nn.Parameter(torch.ones(2)))


def test_mixed_named_and_plain_params_is_torchs_value_error_too():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
        adapters.SGD([("weight", a), b])


@pytest.mark.parametrize("name", list(PAIRS))
def test_duplicate_params_across_groups_is_refused(name):
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="more than one parameter group"):
        _make(name, [{"params": [p]}, {"params": [p]}])


def test_sparse_grad_is_refused_before_any_group_steps():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = adapters.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad = torch.ones(3)
    b.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="dense gradients only"):
        opt.step()
    assert torch.equal(a, torch.ones(3))


@pytest.mark.parametrize("name", list(PAIRS))
def test_complex_params_are_refused_at_construction(name):
    with pytest.raises(TypeError, match="floating-point"):
        _make(name, [torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))])


# -- FunctimOptimizer over several learning rates --------------------------------------------
def _partition(sgd_lr=0.1, adamw_lr=1e-2):
    return ft.partition([ft.Rule("sgd", ndim=2), ft.Rule("adamw")],
                        {"sgd": ft.sgd(lr=sgd_lr), "adamw": ft.adamw(lr=adamw_lr)})


def _named():
    return [(n, p) for n, p in zip(("weight", "bias"), _params())]


def test_group_lr_scales_every_learning_rate_of_a_partition():
    scaled, base = _named(), _named()
    opt = adapters.FunctimOptimizer(scaled, _partition())
    ref = adapters.FunctimOptimizer(base, _partition(sgd_lr=0.05, adamw_lr=5e-3))
    assert opt.param_groups[0]["lr"] == 1.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert opt.param_groups[0]["lr"] == 0.5
    params, ref_params = [p for _, p in scaled], [p for _, p in base]
    for s in range(3):
        _set_grads(params, s)
        _set_grads(ref_params, s)
        opt.step()
        ref.step()
        sched.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("key", ["momentum_", "learning_rate"])
def test_unknown_group_key_is_a_value_error(key):
    with pytest.raises(ValueError, match=f"param group key '{key}' is not a hyperparameter"):
        adapters.FunctimOptimizer(_named(), _partition(), **{key: 0.9})
    opt = adapters.FunctimOptimizer(_named(), _partition())
    with pytest.raises(ValueError, match=f"'{key}'"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], key: 0.9})


def test_unknown_group_key_set_later_is_refused_at_the_next_step():
    named = _named()
    opt = adapters.FunctimOptimizer(named, ft.adamw(lr=1e-2))
    opt.param_groups[0]["learning_rate"] = 0.5
    params = [p for _, p in named]
    _set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="param group 0: .*'learning_rate'"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_negative_group_lr_scale_is_refused():
    with pytest.raises(ValueError, match="'lr'"):
        adapters.FunctimOptimizer(_named(), _partition(), lr=-1.0)


# -- steps counted per parameter, as torch.optim counts them --------------------------------------
@pytest.mark.parametrize("make", [
    lambda ps: adapters.Muon(ps, lr=0.02),
    lambda ps: adapters.Soap(ps, lr=1e-2, precondition_frequency=2),
    lambda ps: adapters.Kron(ps, lr=1e-2),
], ids=["Muon", "Soap", "Kron"])
def test_a_param_unfrozen_late_starts_at_step_one(make):
    """Progressive unfreezing: a param that gets its first grad after 5 steps of the others
    takes the step a fresh optimizer would take on it (its own step count, from 1), and the
    others keep counting."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    late = torch.nn.Parameter(torch.randn(3))
    g = torch.Generator().manual_seed(1)
    opt = make([("blocks.0.w", w), ("blocks.0.bias", late)])
    for _ in range(5):
        w.grad = torch.randn(4, 3, generator=g)
        opt.step()
    late_grad = torch.randn(3, generator=g)
    fresh_late = torch.nn.Parameter(late.detach().clone())
    fresh = make([("blocks.0.bias", fresh_late)])
    fresh_late.grad = late_grad.clone()
    fresh.step()
    w.grad, late.grad = torch.randn(4, 3, generator=g), late_grad.clone()
    steps_of_w = int(opt.state[w]["step"])
    opt.step()
    assert torch.equal(late.detach(), fresh_late.detach())
    assert int(opt.state[late]["step"]) == int(fresh.state[fresh_late]["step"])
    assert int(opt.state[w]["step"]) == steps_of_w + 1
