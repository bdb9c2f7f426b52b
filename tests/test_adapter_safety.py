"""Unsafe paths of the torch.optim surface, each pinned by its smallest repro: checkpoints with
wrong buffers, params and grads that are not dense, ``torch.compile(opt.step)``, checkpoints that
cross between functim and torch.optim, and tensors on another device. Every rejected call raises
before anything is written, and the optimizer stays usable."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_trees_equal, clone_tree
from test_family_contract import ADAPTERS as FAMILY_ADAPTERS

import functim as ft
from functim import adapters

# every adapter class (test_family_contract's, with settings where each buffer is in use), and
# AdamW on functim's own kernel
ADAPTERS = {**FAMILY_ADAPTERS,
            "AdamW-foreach": lambda ps: adapters.AdamW(ps, lr=1e-2, fused=False)}

FUNCTIONAL = {
    "adamw": lambda: ft.adamw(lr=1e-2),
    "adamw-foreach": lambda: ft.adamw(lr=1e-2, fused=False),
    "sgd": lambda: ft.sgd(lr=1e-2, momentum=0.9),
    "sgd-plain": lambda: ft.sgd(lr=1e-2),
    "nadamw": lambda: ft.nadamw(lr=1e-2),
    "cautious_adamw": lambda: ft.cautious_adamw(lr=1e-2),
    "cautious_lion": lambda: ft.cautious_lion(lr=1e-2),
    "lion": lambda: ft.lion(lr=1e-2),
    "signsgd": lambda: ft.signsgd(lr=1e-2),
    "signum": lambda: ft.signum(lr=1e-2),
    "mars": lambda: ft.mars(lr=1e-2),
    "schedule_free_adamw": lambda: ft.schedule_free_adamw(lr=1e-2),
    "muon": lambda: ft.muon(lr=1e-2),
    "scion": lambda: ft.scion(lr=1e-2, momentum=0.1),
    "soap": lambda: ft.soap(lr=1e-2),
    "kron": lambda: ft.kron(lr=1e-2),
    "sophia": lambda: ft.sophia(lr=1e-2),
    "chain": lambda: ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(lr=1e-2)),
    "skip_nonfinite": lambda: ft.skip_nonfinite(ft.signsgd(lr=1e-2)),
    "partition": lambda: ft.partition([ft.Rule("sgd", path="a"), ft.Rule("adamw")],
                                      {"sgd": ft.sgd(lr=0.1), "adamw": ft.adamw(lr=1e-2)}),
}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def _backward(model: torch.nn.Module, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    model.zero_grad()
    dtype = next(model.parameters()).dtype
    model(torch.randn(5, 4, generator=g, dtype=dtype)).pow(2).mean().backward()


def _train(model, opt, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        _backward(model, i)
        opt.step()


def _snapshot(opt: torch.optim.Optimizer):
    return clone_tree(opt.state_dict())


# -- 1. a checkpoint with a wrong buffer ----------------------------------------------------------
def _matrix_buffer_key(opt, p) -> str:
    return next(k for k, v in opt.state[p].items()
                if isinstance(v, torch.Tensor) and v.shape == p.shape)


WITH_BUFFERS = [n for n in ADAPTERS if n != "SignSGD"]


@pytest.mark.parametrize("name", WITH_BUFFERS)
@pytest.mark.parametrize("bad", ["one-element", "transposed"])
def test_wrong_shape_buffer_in_checkpoint_is_refused_before_anything_changes(name, bad):
    model = _model()
    opt = ADAPTERS[name](model.named_parameters())
    _train(model, opt, 2)
    sd = opt.state_dict()
    weight = model[0].weight  # (6, 4)
    key = _matrix_buffer_key(opt, weight)
    sd["state"][0][key] = torch.zeros(1) if bad == "one-element" else sd["state"][0][key].t()

    fresh = _model()
    opt2 = ADAPTERS[name](fresh.named_parameters())
    _train(fresh, opt2, 1)
    before, groups = _snapshot(opt2), copy.deepcopy(opt2.param_groups)
    with pytest.raises(ValueError, match=r"0\.weight") as info:
        opt2.load_state_dict(sd)
    assert "(6, 4)" in str(info.value)
    assert_trees_equal(_snapshot(opt2), before)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt2.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in groups]
    _train(fresh, opt2, 1, start=1)  # still usable


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion", "NAdamW"])
def test_transposed_buffer_of_the_right_shape_keeps_its_values(name):
    # a square buffer stored transposed (same shape, other strides) is the same values; the
    # step must read them element by element, not in memory order
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = ADAPTERS[name]([("w", w)])
    w.grad = torch.randn(8, 8)
    opt.step()
    sd = opt.state_dict()
    key = _matrix_buffer_key(opt, w)
    strided = copy.deepcopy(sd)
    strided["state"][0][key] = sd["state"][0][key].t().contiguous().t()  # same values
    results = []
    for d in (sd, strided):
        p = torch.nn.Parameter(w.detach().clone())
        o = ADAPTERS[name]([("w", p)])
        o.load_state_dict(copy.deepcopy(d))
        p.grad = torch.ones(8, 8)
        o.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])


# -- 2. params and grads that are not dense -------------------------------------------------------
def _dense_reference(make, values: torch.Tensor, grad: torch.Tensor, steps: int = 2):
    """The same steps on a dense copy, by functim's own kernel (torch's fused kernel may round
    the last bit differently)."""
    p = torch.nn.Parameter(values.detach().clone().contiguous())
    opt = make([p], fused=False)
    for _ in range(steps):
        p.grad = grad.contiguous().clone()
        opt.step()
    return p.detach()


DENSE_CASES = {  # (``fused=False``: functim's kernel; Lion has only that one)
    "AdamW": lambda ps, **kw: adapters.AdamW(ps, lr=0.1, weight_decay=0.0, **kw),
    "AdamW-amsgrad": lambda ps, **kw: adapters.AdamW(ps, lr=0.1, amsgrad=True, **kw),
    "SGD": lambda ps, **kw: adapters.SGD(ps, lr=0.1, **kw),
    "SGD-momentum": lambda ps, **kw: adapters.SGD(ps, lr=0.1, momentum=0.9, **kw),
    "Lion": lambda ps, fused=None: adapters.Lion(ps, lr=0.1),
}


@pytest.mark.parametrize("name", list(DENSE_CASES))
def test_strided_view_params_update_only_themselves(name):
    make = DENSE_CASES[name]
    base = torch.zeros(4, 3, 2)
    a, b = torch.nn.Parameter(base[..., 0]), torch.nn.Parameter(base[..., 1])
    opt = make([a])
    grad = torch.arange(12.0).reshape(4, 3) - 5
    for _ in range(2):
        a.grad = grad.clone()
        opt.step()
    assert torch.equal(b, torch.zeros(4, 3)), "a step of a wrote into its neighbour"
    assert torch.equal(a.detach(), _dense_reference(make, torch.zeros(4, 3), grad))


@pytest.mark.parametrize("name", list(DENSE_CASES))
@pytest.mark.parametrize("layout", ["transposed-param", "transposed-grad"])
def test_params_and_grads_of_other_strides(name, layout):
    make = DENSE_CASES[name]
    values = torch.linspace(-1, 1, 12).reshape(4, 3)
    grad = torch.arange(12.0).reshape(4, 3) - 5
    if layout == "transposed-param":
        p = torch.nn.Parameter(values.t().contiguous().t())  # (4, 3) with strides (1, 4)
    else:
        p = torch.nn.Parameter(values.clone())
        grad = grad.t().contiguous().t()
    opt = make([p])
    for _ in range(2):
        p.grad = grad.clone() if layout == "transposed-param" else grad
        opt.step()
    assert torch.equal(p.detach(), _dense_reference(make, values, grad))


@pytest.mark.parametrize("make", [lambda: ft.adamw(lr=0.1), lambda: ft.sgd(lr=0.1),
                                  lambda: ft.sgd(lr=0.1, momentum=0.9)],
                         ids=["adamw", "sgd", "sgd-momentum"])
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donate"])
def test_functional_fused_default_on_strided_views(make, donate):
    base = torch.zeros(4, 3, 2)
    params = {"a": base[..., 0], "t": torch.linspace(-1, 1, 12).reshape(3, 4).t()}
    grads = {"a": torch.arange(12.0).reshape(4, 3) - 5,
             "t": (torch.arange(12.0).reshape(3, 4) - 3).t().contiguous()}
    dense = {k: v.contiguous().clone() for k, v in params.items()}
    opt, ref = make(), make()
    ref.fused = False  # (functim's kernel: torch's fused one may round the last bit otherwise)
    state, ref_state = opt.init_state(params), ref.init_state(dense)
    for _ in range(2):
        params, state = opt.update(params, grads, state, donate=donate)
        dense, ref_state = ref.update(dense, grads, ref_state)
    for k in params:
        assert torch.equal(params[k], dense[k]), k
    assert torch.equal(base[..., 1], torch.zeros(4, 3)), "the update wrote outside the param"


@pytest.mark.parametrize("name", ["AdamW", "SGD", "AdamW-foreach"])
def test_self_overlapping_param_is_refused_naming_it(name):
    p = torch.nn.Parameter(torch.zeros(4).expand(3, 4))
    opt = ADAPTERS[name]([("expanded", p)])
    p.grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match="'expanded'.*overlap"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(3, 4))


# -- 3. torch.compile(opt.step) -------------------------------------------------------------------
# the elementwise adapters compile; the others refuse
COMPILED = ["AdamW", "AdamW-foreach", "SGD", "NAdamW", "CautiousAdamW", "CautiousLion", "Lion",
            "SignSGD", "Signum", "Mars", "Sophia"]
NOT_COMPILED = [n for n in ADAPTERS if n not in COMPILED]


def _compiled_vs_eager(name):
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _model()
        opt = ADAPTERS[name](model.named_parameters())
        step = torch.compile(opt.step) if compiled else opt.step
        for i in range(3):
            _backward(model, i)
            step()
        results.append([p.detach().clone() for p in model.parameters()])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED)
def test_compiled_step_matches_eager(name):
    eager, compiled = _compiled_vs_eager(name)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(eager[0], _model()[0].weight.detach()), "nothing trained"


@pytest.mark.parametrize("name", NOT_COMPILED)
def test_compiled_step_raises_a_clear_error(name):
    torch._dynamo.reset()
    model = _model()
    opt = ADAPTERS[name](model.named_parameters())
    _backward(model, 0)
    before = [p.detach().clone() for p in model.parameters()]
    state = _snapshot(opt)
    with pytest.raises(RuntimeError, match="torch.compile"):
        torch.compile(opt.step)()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert_trees_equal(_snapshot(opt), state)
    opt.step()  # eager still works


# -- 4. checkpoints across functim and torch.optim ------------------------------------------------
CROSS = {
    # functim adapter, torch.optim class, and whether the two runs are bitwise the same maths
    "AdamW": (lambda ps: adapters.AdamW(ps, lr=1e-2, weight_decay=0.1),
              lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True)),
    "AdamW-amsgrad": (lambda ps: adapters.AdamW(ps, lr=1e-2, amsgrad=True),
                      lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, fused=True)),
    "SGD": (lambda ps: adapters.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
            lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, fused=True)),
    "SGD-plain": (lambda ps: adapters.SGD(ps, lr=1e-2),
                  lambda ps: torch.optim.SGD(ps, lr=1e-2, fused=True)),
    "NAdamW": (lambda ps: adapters.NAdamW(ps, lr=1e-2, variant="torch", weight_decay=0.1),
               lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=0.1,
                                            decoupled_weight_decay=True, foreach=True)),
}


def _double_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)).double()


def _assert_same(a, b, name):
    if name.startswith("NAdamW"):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    else:
        assert torch.equal(a, b)


def _continue_both(name, first, second):
    """3 steps with ``first``, its state_dict into ``second``; 3 more steps of each of
    (``first`` continuing, ``second`` resumed) must agree."""
    make = dict(zip(("functim", "torch"), CROSS[name]))
    m1 = _double_model()
    o1 = make[first](m1.parameters())
    _train(m1, o1, 3)
    m2 = copy.deepcopy(m1)
    o2 = make[second](m2.parameters())
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    ref = copy.deepcopy(m1)
    ref_opt = make[first](ref.parameters())
    ref_opt.load_state_dict(copy.deepcopy(o1.state_dict()))
    _train(ref, ref_opt, 3, start=3)
    _train(m2, o2, 3, start=3)
    for a, b in zip(ref.parameters(), m2.parameters()):
        _assert_same(a, b, name)


@pytest.fixture
def float64_default(request):
    """torch's NAdam keeps mu_product in the default dtype: float64 for these comparisons."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("name", list(CROSS))
def test_functim_checkpoint_continues_in_torch_optim(name, float64_default):
    _continue_both(name, "functim", "torch")


@pytest.mark.parametrize("name", list(CROSS))
def test_torch_optim_checkpoint_continues_in_functim(name, float64_default):
    _continue_both(name, "torch", "functim")


@pytest.mark.parametrize("name", ["AdamW", "NAdamW"])
def test_state_dict_holds_one_step_tensor_per_param(name):
    m = _double_model()
    opt = CROSS[name][0](m.parameters())
    _train(m, opt, 2)
    state = opt.state_dict()["state"]
    for key in ("step", "mu_product"):
        tensors = [s[key] for s in state.values() if key in s]
        assert len({id(t) for t in tensors}) == len(tensors), key


def test_old_torch_checkpoints_load():
    # torch < 1.12 stored step as a float; older AdamW groups have no 'maximize'/'foreach'
    m1 = _double_model()
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2, fused=True)
    _train(m1, o1, 3)
    sd = copy.deepcopy(o1.state_dict())
    for s in sd["state"].values():
        s["step"] = float(s["step"])
    for g in sd["param_groups"]:
        for k in ("maximize", "foreach", "capturable", "differentiable", "fused"):
            g.pop(k, None)
    m2 = copy.deepcopy(m1)
    o2 = adapters.AdamW(m2.parameters(), lr=1e-2)
    o2.load_state_dict(sd)
    _train(m1, o1, 2, start=3)
    _train(m2, o2, 2, start=3)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_incompatible_state_dict_leaves_the_optimizer_as_it_was():
    m = _model()
    lion = adapters.Lion(m.parameters(), lr=1e-3)
    _train(m, lion, 1)
    opt = adapters.AdamW(m.parameters(), lr=1e-3)
    _train(m, opt, 1)
    before, groups = _snapshot(opt), copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match="exp_avg_sq|eps|betas"):
        opt.load_state_dict(lion.state_dict())
    assert_trees_equal(_snapshot(opt), before)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    _train(m, opt, 1, start=1)


@pytest.mark.parametrize("change, match", [
    (lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0])), "group"),
    (lambda sd: sd["param_groups"][0]["params"].pop(), "param"),
    (lambda sd: sd["state"][0].pop("exp_avg"), "exp_avg"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(6, 4, dtype=torch.int64)),
     "floating"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0), "lr"),
    (lambda sd: sd["param_groups"][0].__setitem__("unknown_option", 3), "unknown_option"),
], ids=["extra-group", "missing-param", "missing-buffer", "int-buffer", "bad-lr", "unknown-key"])
def test_bad_state_dicts_are_refused_naming_the_problem(change, match):
    m = _model()
    opt = adapters.AdamW(m.named_parameters(), lr=1e-3)
    _train(m, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    change(sd)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_trees_equal(_snapshot(opt), before)
    _train(m, opt, 1, start=1)


# -- 5. grads or state on another device ----------------------------------------------------------
def _two_leaves():
    return {"a": torch.ones(3, 2), "b": torch.ones(3, 2)}


@pytest.mark.parametrize("name", list(FUNCTIONAL))
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donate"])
def test_grad_on_another_device_is_refused_before_any_write(name, donate):
    opt = FUNCTIONAL[name]()
    params = _two_leaves()
    state = opt.init_state(params)
    grads = {"a": torch.ones(3, 2), "b": torch.ones(3, 2, device="meta")}
    before = clone_tree((params, state))
    with pytest.raises(ValueError, match=r"grad at 'b' is on meta, expected cpu like the param"):
        opt.update(params, grads, state, donate=donate)
    assert_trees_equal((params, state), before)


def _first_buffer_path(state, params):
    """A key path to the state buffer of leaf 'b' (a tensor shaped like the param)."""
    def walk(node, path):
        if isinstance(node, dict):
            if set(node) == set(params) and isinstance(node.get("b"), torch.Tensor) \
                    and node["b"].shape == params["b"].shape:
                return path
            for k, v in node.items():
                found = walk(v, path + (k,))
                if found is not None:
                    return found
        return None
    return walk(state, ())


@pytest.mark.parametrize("name", [n for n in FUNCTIONAL if n not in ("sgd-plain", "signsgd",
                                                                     "skip_nonfinite")])
def test_state_buffer_on_another_device_is_refused_before_any_write(name):
    opt = FUNCTIONAL[name]()
    params = _two_leaves()
    state = opt.init_state(params)
    path = _first_buffer_path(state, params)
    assert path is not None
    node = state
    for k in path:
        node = node[k]
    node["b"] = torch.zeros(3, 2, device="meta")
    grads = {"a": torch.ones(3, 2), "b": torch.ones(3, 2)}
    for donate in (False, True):
        before = clone_tree(params)
        with pytest.raises(ValueError, match=r"at 'b' is on meta, expected cpu like the param"):
            opt.update(params, grads, state, donate=donate)
        assert_trees_equal(params, before)


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion", "Muon"])
def test_adapter_state_replaced_by_a_tensor_on_another_device_is_refused(name):
    m = _model()
    opt = ADAPTERS[name](m.named_parameters())
    _train(m, opt, 1)
    w = m[0].weight
    key = _matrix_buffer_key(opt, w)
    opt.state[w][key] = torch.zeros(6, 4, device="meta")
    _backward(m, 1)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match=r"0\.weight.*on meta"):
        opt.step()
    for p, q in zip(m.parameters(), before):
        assert torch.equal(p, q)


# -- hyperparameters and options changed on the torch.optim surface -------------------------------
CHANGED_VALUES = {
    "negative-lr": ("lr", -1.0, ValueError), "nan-lr": ("lr", float("nan"), ValueError),
    "inf-lr": ("lr", float("inf"), ValueError), "str-lr": ("lr", "0.1", TypeError),
    "inf-weight-decay": ("weight_decay", float("inf"), ValueError),
    "beta1-above-1": ("betas", (1.5, 0.9), ValueError),
    "adamw-beta1-above-1": ("adamw_betas", (1.5, 0.9), ValueError),
}


@pytest.mark.parametrize("name, case", [
    (n, c) for n in ("AdamW", "Lion", "Muon") for c in CHANGED_VALUES
    if (c == "adamw-beta1-above-1") == (n == "Muon") or not c.endswith("beta1-above-1")])
def test_group_values_changed_by_hand_are_checked_at_step(name, case):
    key, value, exc = CHANGED_VALUES[case]
    m = _model()
    opt = ADAPTERS[name](m.named_parameters())
    _train(m, opt, 1)
    opt.param_groups[0][key] = value
    _backward(m, 1)
    before, state = [p.detach().clone() for p in m.parameters()], _snapshot(opt)["state"]
    with pytest.raises(exc, match=f"param group 0.*{key.removesuffix('s')}"):
        opt.step()
    for p, q in zip(m.parameters(), before):
        assert torch.equal(p, q)
    assert_trees_equal(_snapshot(opt)["state"], state)


@pytest.mark.parametrize("name", ["SGD-momentum", "SGD-nesterov", "MomentumSGD"])
def test_sgd_momentum_turned_on_mid_run_and_one_cycle(name):
    """torch.optim.SGD handles momentum going from 0 to non-zero (by hand, or OneCycleLR's
    momentum cycling, which also adds its own keys to the groups): so must the adapter, with
    the same result."""
    results = []
    for cls in (torch.optim.SGD, adapters.SGD):
        torch.manual_seed(0)
        m = _double_model()
        opt = cls(m.parameters(), lr=1e-2)
        if name == "MomentumSGD":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
        for i in range(4):
            if name != "MomentumSGD" and i == 2:
                opt.param_groups[0]["momentum"] = 0.9
                opt.param_groups[0]["nesterov"] = name == "SGD-nesterov"
            _backward(m, i)
            opt.step()
            if name == "MomentumSGD":
                sched.step()
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_static_option_changed_mid_run_is_a_clear_error():
    m = _model()
    opt = adapters.AdamW(m.named_parameters(), lr=1e-3)
    _train(m, opt, 1)
    opt.param_groups[0]["amsgrad"] = True
    _backward(m, 1)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match=r"'0\.weight' has no state\['max_exp_avg_sq'\].*amsgrad"):
        opt.step()
    for p, q in zip(m.parameters(), before):
        assert torch.equal(p, q)


def test_mixed_named_and_unnamed_params_are_a_type_error():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match="mixes"):
        adapters.AdamW([("weight", a), b])
    with pytest.raises(TypeError, match="mixes"):
        adapters.AdamW([a, ("weight", b)])


def test_loaded_group_without_lr_is_refused():
    m = _model()
    opt = adapters.Lion(m.named_parameters(), lr=1e-3)
    _train(m, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    del sd["param_groups"][0]["lr"]
    with pytest.raises(ValueError, match="has no 'lr'"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("name", ["Muon", "Soap", "Kron"])
def test_truncated_state_dict_resumes_each_param_from_its_own_state(name):
    """A state dict missing one param's state (torch.optim's layout allows it): the others resume
    from their own counters, and the missing one starts as a fresh optimizer would."""
    m = _model()
    opt = ADAPTERS[name](m.named_parameters())
    _train(m, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][1]  # 0.bias
    resumed = copy.deepcopy(m)
    opt2 = ADAPTERS[name](resumed.named_parameters())
    opt2.load_state_dict(sd)
    weight, bias = resumed[0].weight, resumed[0].bias
    assert int(opt2.state[weight]["step"]) == int(opt.state[m[0].weight]["step"])
    assert int(opt2.state[bias]["step"]) == 0
    fresh_bias = torch.nn.Parameter(bias.detach().clone())
    fresh = ADAPTERS[name]([("0.bias", fresh_bias)])
    _backward(resumed, 2)
    fresh_bias.grad = bias.grad.clone()
    opt2.step()
    fresh.step()
    assert torch.equal(bias.detach(), fresh_bias.detach())
    if name != "Kron":  # (Kron's probes come from one generator drawn in param order)
        _backward(m, 2)
        opt.step()
        assert torch.equal(weight.detach(), m[0].weight.detach())
