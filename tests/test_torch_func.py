"""functim.update under torch.func (vmap over an ensemble, grad through unrolled updates) and
torch.compile(fullgraph=True) without recompiling when the learning rate changes (hyperparameters
live in the state as 0-d tensors)."""

from __future__ import annotations

import optree
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from conftest import tensor_leaves
from torch._dynamo.utils import counters

import functim as ft

F64 = torch.float64
N_MODELS = 4

OPTIMIZERS = {
    "adamw": lambda: ft.adamw(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
    "adamw-amsgrad-maximize": lambda: ft.adamw(lr=1e-2, weight_decay=0.1, amsgrad=True,
                                               maximize=True),
    "sgd-momentum": lambda: ft.sgd(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "sgd-nesterov": lambda: ft.sgd(lr=1e-2, momentum=0.9, nesterov=True),
}


def stack_trees(trees: list):
    return optree.tree_map(lambda *xs: torch.stack(xs), *trees)


def unstack_tree(tree, i: int):
    return optree.tree_map(lambda x: x[i], tree)


def random_params(gen: torch.Generator, lead: tuple = ()):
    return {
        "w": torch.randn(*lead, 3, 2, generator=gen, dtype=F64),
        "b": torch.randn(*lead, 2, generator=gen, dtype=F64),
        "s": torch.randn(*lead, 1, generator=gen, dtype=F64),
    }


# -- (a) vmap over an ensemble ------------------------------------------------------------------
@pytest.mark.parametrize("state_from", ["vmap_init", "stacked_states"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_vmap_update_over_ensemble_equals_loop(name, state_from):
    opt = OPTIMIZERS[name]()
    gen = torch.Generator().manual_seed(0)
    stacked = random_params(gen, lead=(N_MODELS,))
    grads_seq = [random_params(gen, lead=(N_MODELS,)) for _ in range(5)]
    lrs = torch.tensor([1e-3, 1e-2, 3e-2, 0.1], dtype=F64)  # one lr per member

    models = [unstack_tree(stacked, i) for i in range(N_MODELS)]
    states = [ft.set_hyperparams(opt.init_state(m), lr=lrs[i]) for i, m in enumerate(models)]
    if state_from == "vmap_init":
        v_state = torch.func.vmap(opt.init_state)(stacked)
        v_state = ft.set_hyperparams(v_state, lr=lrs)
    else:
        v_state = stack_trees(states)
    assert v_state["hyperparams"]["lr"].shape == (N_MODELS,)
    assert v_state["step"].shape == (N_MODELS,)

    v_params = stacked
    v_update = torch.func.vmap(opt.update)
    for grads in grads_seq:
        v_params, v_state = v_update(v_params, grads, v_state)
        for i in range(N_MODELS):
            models[i], states[i] = opt.update(models[i], unstack_tree(grads, i), states[i])

    loop_params, loop_state = stack_trees(models), stack_trees(states)
    assert optree.tree_structure(v_state) == optree.tree_structure(loop_state)
    for a, b in zip(optree.tree_leaves(v_params), optree.tree_leaves(loop_params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(optree.tree_leaves(v_state), optree.tree_leaves(loop_state)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert torch.equal(v_state["step"], torch.full((N_MODELS,), 5, dtype=torch.int32))


# -- (b) grad through unrolled updates w.r.t. the learning rate ---------------------------------
def _regression_problem():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(16, 3, generator=gen, dtype=F64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.1 * torch.randn(16, generator=gen,
                                                                          dtype=F64)
    params = {"w": torch.zeros(3, dtype=F64), "b": torch.tensor([0.3], dtype=F64)}
    return X, y, params


def _mse(params, X, y):
    return ((X @ params["w"] + params["b"] - y) ** 2).mean()


def _unrolled_loss(make_opt, lr_via: str, n_steps: int = 3):
    X, y, params0 = _regression_problem()

    def loss(lr):
        if lr_via == "constructor":
            opt = make_opt(lr)
            state = opt.init_state(params0)
        else:
            opt = make_opt(0.5)
            state = ft.set_hyperparams(opt.init_state(params0), lr=lr)
        params = params0
        for _ in range(n_steps):
            g = torch.func.grad(_mse)(params, X, y)
            params, state = opt.update(params, g, state)
        return _mse(params, X, y)

    return loss


GRAD_OPTIMIZERS = {
    "adamw": lambda lr: ft.adamw(lr=lr, betas=(0.9, 0.99), weight_decay=0.1),
    "sgd-momentum": lambda lr: ft.sgd(lr=lr, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": lambda lr: ft.sgd(lr=lr, momentum=0.5, nesterov=True),
}


@pytest.mark.parametrize("lr_via", ["constructor", "set_hyperparams"])
@pytest.mark.parametrize("name", list(GRAD_OPTIMIZERS))
def test_grad_wrt_lr_matches_finite_difference(name, lr_via):
    loss = _unrolled_loss(GRAD_OPTIMIZERS[name], lr_via)
    lr = torch.tensor(0.05, dtype=F64)
    d = torch.func.grad(loss)(lr)
    h = 1e-6
    fd = (loss(lr + h) - loss(lr - h)) / (2 * h)
    assert d.dtype == F64 and d.shape == ()
    assert torch.isfinite(d)
    assert abs(float(d)) > 1e-3  # the loss really depends on the lr
    torch.testing.assert_close(d, fd, rtol=1e-6, atol=1e-10)


def test_grad_wrt_lr_under_torch_func_matches_autograd():
    """torch.func.grad and plain autograd (per-tensor path, lr.requires_grad) agree."""
    loss = _unrolled_loss(GRAD_OPTIMIZERS["adamw"], "set_hyperparams")
    lr = torch.tensor(0.05, dtype=F64)
    d_func = torch.func.grad(loss)(lr)
    lr_ag = lr.clone().requires_grad_(True)
    (d_ag,) = torch.autograd.grad(loss(lr_ag), lr_ag)
    torch.testing.assert_close(d_func, d_ag, rtol=1e-12, atol=0)


@pytest.mark.parametrize("lr", [1e-3, 0.0])
def test_grad_wrt_lr_of_first_adamw_step_matches_closed_form(lr):
    """At t=1, p1 = p·(1 − lr·λ) − lr·g/(|g| + ε) (m̂ = g, sqrt(v̂) = |g|), so
    d(sum p1)/d lr = −sum(λ·p + g/(|g| + ε)), for every lr including lr = 0 (a warmup start)."""
    p = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=F64)}
    g = {"w": torch.tensor([0.5, 0.25, -3.0], dtype=F64)}
    wd, eps = 0.1, 1e-8
    opt = ft.adamw(weight_decay=wd, eps=eps)

    def f(lr_t):
        state = ft.set_hyperparams(opt.init_state(p), lr=lr_t)
        new, _ = opt.update(p, g, state)
        return new["w"].sum()

    d = torch.func.grad(f)(torch.tensor(lr, dtype=F64))
    expected = -(wd * p["w"] + g["w"] / (g["w"].abs() + eps)).sum()
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-14)


# -- (c) torch.compile --------------------------------------------------------------------------
# Counting compilations: with a warm inductor cache ``CompileCounterWithBackend.frame_count`` is 1
# after the first call. With a cold cache (a fresh CI machine) inductor's first compile restarts
# dynamo's analysis once (``TensorifyScalarRestartAnalysis``, from the 0-d CPU hyperparameter
# tensors that dynamo reads as scalars) and the counter's backend is called twice for that one
# frame. So the tests check (1) exactly one graph was produced for the frame
# (``counters["stats"]["unique_graphs"] == 1``), (2) ``frame_count`` does not move after the
# first call, and (3) dynamo's own ``error_on_recompile`` stays silent while the lr changes.
def _compile_counted(fn):
    torch._dynamo.reset()
    counters.clear()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    return torch.compile(fn, backend=cnt, fullgraph=True), cnt


def _assert_compiled_once(cnt, frames_after_first_call):
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert cnt.frame_count == frames_after_first_call, (
        f"recompiled: {cnt.frame_count} compilations, {frames_after_first_call} after the first "
        "call")
    assert cnt.frame_count in (1, 2)  # 2 only from the cold-cache restart described above


def _small_problem(dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(4, 3, generator=gen, dtype=dtype),
              "b": torch.randn(3, generator=gen, dtype=dtype),
              "h": [torch.randn(2, 2, generator=gen, dtype=dtype)]}
    grads = [optree.tree_map(lambda p: torch.randn(p.shape, generator=gen, dtype=dtype), params)
             for _ in range(3)]
    return params, grads


@pytest.mark.parametrize("make_opt", [
    lambda: ft.adamw(lr=1e-3, weight_decay=0.1),
    lambda: ft.sgd(lr=1e-2, momentum=0.9),
], ids=["adamw", "sgd-momentum"])
def test_compiled_update_matches_eager_without_recompiling(make_opt):
    opt = make_opt()
    params, grads = _small_problem()
    compiled, cnt = _compile_counted(opt.update)

    p_c, s_c = params, opt.init_state(params)
    p_e, s_e = params, opt.init_state(params)
    first = None
    for lr, g in zip((1e-3, 3e-3, 2e-2), grads):
        s_c = ft.set_hyperparams(s_c, lr=lr)
        s_e = ft.set_hyperparams(s_e, lr=lr)
        with torch._dynamo.config.patch(error_on_recompile=first is not None):
            p_c, s_c = compiled(p_c, g, s_c)
        first = cnt.frame_count if first is None else first
        p_e, s_e = opt.update(p_e, g, s_e)
        for a, b in zip(tensor_leaves(p_c), tensor_leaves(p_e)):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        for a, b in zip(optree.tree_leaves(s_c), optree.tree_leaves(s_e)):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    _assert_compiled_once(cnt, first)
    assert int(s_c["step"]) == 3
    assert float(s_c["hyperparams"]["lr"]) == 2e-2


def test_compiled_update_with_schedule_does_not_recompile():
    """A scheduled lr is a function of the step tensor: successive steps reuse one graph."""
    sched = ft.warmup_cosine(1e-2, 1, 4)
    opt = ft.adamw(lr=sched)
    params, grads = _small_problem()
    compiled, cnt = _compile_counted(opt.update)
    p_c, s_c = params, opt.init_state(params)
    p_e, s_e = params, opt.init_state(params)
    first = None
    for k, g in enumerate(grads):
        with torch._dynamo.config.patch(error_on_recompile=first is not None):
            p_c, s_c = compiled(p_c, g, s_c)
        first = cnt.frame_count if first is None else first
        p_e, s_e = opt.update(p_e, g, s_e)
        torch.testing.assert_close(s_c["hyperparams"]["lr"], sched(k), rtol=1e-15, atol=0)
        for a, b in zip(tensor_leaves(p_c), tensor_leaves(p_e)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    _assert_compiled_once(cnt, first)
