"""Schedule-Free AdamW (docs/algorithms.md section 13, R27, R28, R41, R42): functional core and
torch.optim adapter.

The references are written here from the update rule (one leaf at a time, float64, Python-float
scalars as the reference code keeps them): the memory-efficient form (y, z, v) and the
three-sequence form (z, x, y) that defines what the memory-efficient one computes.
"""

from __future__ import annotations

import io

import optree
import pytest
import torch
from conftest import (
    assert_trees_equal,
    clone_tree,
    pytrees,
    random_like_tree,
    tensor_leaves,
    tree_map,
)
from functim.adapters.schedule_free import ScheduleFreeAdamW
from hypothesis import given
from hypothesis import strategies as st

import functim as ft
from functim.optimizers.schedule_free import (
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_train_params,
)

F64 = torch.float64
N_STEPS = 10
seeds = st.integers(0, 2**31 - 1)


# -- references (the update rule, docs/algorithms.md section 13) ---------------------------------
def _scalars(k, lr, warmup, r, wlp, lr_max, weight_sum):
    sched = (k + 1) / warmup if k < warmup else 1.0
    gamma = lr * sched
    lr_max = max(lr_max, gamma)
    weight = ((k + 1) ** r) * (lr_max**wlp)
    weight_sum = weight_sum + weight
    try:
        c = weight / weight_sum
    except ZeroDivisionError:
        c = 0.0
    return gamma, c, lr_max, weight_sum


def reference_memory_efficient(ps, grads_seq, *, lr, betas, eps, weight_decay, warmup_steps, r,
                               weight_lr_power):
    """Returns (y, z, v, lr_max, weight_sum) after the steps; ``ps``/``grads_seq`` are lists of
    tensors (one leaf at a time)."""
    beta1, beta2 = betas
    ys = [p.clone() for p in ps]
    zs = [p.clone() for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    lr_max, weight_sum = -1.0, 0.0
    for k, gs in enumerate(grads_seq):
        gamma, c, lr_max, weight_sum = _scalars(k, lr, warmup_steps, r, weight_lr_power, lr_max,
                                                weight_sum)
        bc2 = 1 - beta2 ** (k + 1)
        for y, z, v, g in zip(ys, zs, vs, gs):
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            d = g / (v / bc2).sqrt().add(eps)
            if weight_decay != 0:
                d = d + weight_decay * y
            y.lerp_(z, c).add_(d, alpha=gamma * (beta1 * (1 - c) - 1))
            z.sub_(d, alpha=gamma)
    return ys, zs, vs, lr_max, weight_sum


def reference_three_sequences(ps, grads_seq, *, lr, betas, eps, weight_decay, warmup_steps, r,
                              weight_lr_power):
    """The defining form: z ← z − γ·d; x ← (1−c)·x + c·z; y = (1−β1)·z + β1·x, d taken at y.
    Yields (y, z, x) after every step."""
    beta1, beta2 = betas
    zs = [p.clone() for p in ps]
    xs = [p.clone() for p in ps]
    ys = [p.clone() for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    lr_max, weight_sum = -1.0, 0.0
    for k, gs in enumerate(grads_seq):
        gamma, c, lr_max, weight_sum = _scalars(k, lr, warmup_steps, r, weight_lr_power, lr_max,
                                                weight_sum)
        bc2 = 1 - beta2 ** (k + 1)
        for i, g in enumerate(gs):
            vs[i] = beta2 * vs[i] + (1 - beta2) * g * g
            d = g / ((vs[i] / bc2).sqrt() + eps) + weight_decay * ys[i]
            zs[i] = zs[i] - gamma * d
            xs[i] = (1 - c) * xs[i] + c * zs[i]
            ys[i] = (1 - beta1) * zs[i] + beta1 * xs[i]
        yield [y.clone() for y in ys], [z.clone() for z in zs], [x.clone() for x in xs]


# -- helpers ------------------------------------------------------------------------------------
@st.composite
def sf_hparams(draw, beta1=None):
    return dict(
        lr=draw(st.floats(1e-3, 0.1)),
        betas=(draw(st.sampled_from([0.9, 0.0]) | st.floats(0.0, 0.99)) if beta1 is None
               else draw(beta1),
               draw(st.sampled_from([0.999, 0.95]) | st.floats(0.5, 0.9999))),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        weight_decay=draw(st.sampled_from([0.0, 0.1]) | st.floats(0.0, 0.5)),
        warmup_steps=draw(st.integers(0, 6)),
        r=draw(st.sampled_from([0.0, 0.5, 2.0])),
        weight_lr_power=draw(st.sampled_from([2.0, 0.0, 1.5])),
    )


def grad_sequence(params, seed: int, n: int = N_STEPS) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [random_like_tree(params, gen) for _ in range(n)]


def run(opt, params, grads_seq, *, donate=False):
    state = opt.init_state(params)
    for g in grads_seq:
        params, state = opt.update(params, g, state, donate=donate)
    return params, state


def gamma_schedule(hp, n):
    """γ_k = lr·sched(k) for k = 0..n-1."""
    w = hp["warmup_steps"]
    return [hp["lr"] * ((k + 1) / w if k < w else 1.0) for k in range(n)]


def assert_close64(ours, ref, what, rtol=1e-12, atol=1e-13):
    assert len(ours) == len(ref), what
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol,
                                   msg=lambda m, i=i: f"{what}[{i}]: {m}")


# -- functional: against the references ---------------------------------------------------------
REF_HP = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, warmup_steps=4, r=0.5,
              weight_lr_power=2.0)


def _check_against_reference(params, hp, grads):
    ours, state = run(schedule_free_adamw(**hp), params, grads)
    ref_y, ref_z, ref_v, lr_max, weight_sum = reference_memory_efficient(
        tensor_leaves(params), [tensor_leaves(g) for g in grads], **hp)
    assert_close64(tensor_leaves(ours), ref_y, "y")
    assert_close64(tensor_leaves(state["z"]), ref_z, "z")
    assert_close64(tensor_leaves(state["exp_avg_sq"]), ref_v, "exp_avg_sq")
    assert int(state["step"]) == len(grads)
    torch.testing.assert_close(state["lr_max"], torch.tensor(lr_max, dtype=F64), rtol=1e-15,
                               atol=0)
    torch.testing.assert_close(state["weight_sum"], torch.tensor(weight_sum, dtype=F64),
                               rtol=1e-14, atol=0)


def test_matches_reference_with_warmup_r_and_weight_decay():
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 3, generator=gen, dtype=F64),
              "b": torch.randn(3, generator=gen, dtype=F64), "s": torch.randn((), dtype=F64)}
    _check_against_reference(params, REF_HP, grad_sequence(params, 1))


@given(params=pytrees(dtypes=(F64,)), hp=sf_hparams(), seed=seeds)
def test_matches_reference(params, hp, seed):
    _check_against_reference(params, hp, grad_sequence(params, seed))


@given(params=pytrees(dtypes=(F64,), allow_none=False), seed=seeds,
       hp=sf_hparams(beta1=st.sampled_from([0.9, 0.5]) | st.floats(0.5, 0.98)))
def test_r28_y_is_interpolation_of_z_and_x_and_train_eval_round_trip(params, hp, seed):
    """R28: at all times y = (1−β1)·z + β1·x (x from the three-sequence form), eval(y) = x and
    train(eval(y)) = y."""
    grads = grad_sequence(params, seed)
    opt = schedule_free_adamw(**hp)
    beta1 = hp["betas"][0]
    y, state = params, opt.init_state(params)
    refs = reference_three_sequences(tensor_leaves(params), [tensor_leaves(g) for g in grads],
                                     **hp)
    for g, (ref_y, ref_z, ref_x) in zip(grads, refs):
        y, state = opt.update(y, g, state)
        ys, zs = tensor_leaves(y), tensor_leaves(state["z"])
        assert_close64(zs, ref_z, "z")
        assert_close64(ys, ref_y, "y")
        assert_close64(ys, [(1 - beta1) * z + beta1 * x for z, x in zip(zs, ref_x)], "y = lerp")
        x = schedule_free_eval_params(y, state)
        assert_close64(tensor_leaves(x), ref_x, "x")
        assert_close64(tensor_leaves(schedule_free_train_params(x, state)), ys, "train(eval(y))",
                       rtol=1e-13, atol=1e-15)


@given(params=pytrees(dtypes=(F64,)), hp=sf_hparams(beta1=st.just(0.0)), seed=seeds)
def test_r27_beta1_zero_is_adamw_with_beta1_zero(params, hp, seed):
    """R27: with β1 = 0 the training params are AdamW(β1 = 0, same β2, ε, λ) driven by the lr
    sequence γ_k (warmup included); z = y bitwise and the second moments are bitwise AdamW's."""
    grads = grad_sequence(params, seed)
    sf = schedule_free_adamw(**hp)
    adamw = ft.adamw(lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                     weight_decay=hp["weight_decay"], fused=False)
    y, s_sf = params, sf.init_state(params)
    p, s_a = params, adamw.init_state(params)
    for g, gamma in zip(grads, gamma_schedule(hp, len(grads))):
        y, s_sf = sf.update(y, g, s_sf)
        p, s_a = adamw.update(p, g, ft.set_hyperparams(s_a, lr=gamma))
        assert_trees_equal(y, s_sf["z"])
        assert_trees_equal(s_sf["exp_avg_sq"], s_a["exp_avg_sq"])
    assert_close64(tensor_leaves(y), tensor_leaves(p), "y vs adamw")


@pytest.mark.parametrize("weight_lr_power", [2.0, 0.0])
def test_constant_lr_average_is_the_mean_of_the_z_iterates(weight_lr_power):
    """R28: r = 0, constant γ, no warmup: x_T = mean(z_1..z_T) at every T."""
    gen = torch.Generator().manual_seed(4)
    params = {"w": torch.randn(4, 3, generator=gen, dtype=F64)}
    opt = schedule_free_adamw(lr=0.03, weight_decay=0.05, weight_lr_power=weight_lr_power)
    y, state = params, opt.init_state(params)
    zs = []
    for g in grad_sequence(params, 5, n=12):
        y, state = opt.update(y, g, state)
        zs.append(state["z"]["w"])
        x = schedule_free_eval_params(y, state)["w"]
        torch.testing.assert_close(x, torch.stack(zs).mean(0), rtol=1e-12, atol=1e-14)


def test_uniform_average_during_warmup_when_weight_lr_power_is_zero():
    """R42: weight_lr_power = 0 and r = 0 give uniform weights even while γ warms up; with
    the default power 2 the early (small-γ) iterates weigh less."""
    gen = torch.Generator().manual_seed(6)
    params = {"w": torch.randn(6, generator=gen, dtype=F64)}
    grads = grad_sequence(params, 7, n=8)
    for power in (0.0, 2.0):
        opt = schedule_free_adamw(lr=0.05, warmup_steps=6, weight_lr_power=power)
        y, state = params, opt.init_state(params)
        zs = []
        for g in grads:
            y, state = opt.update(y, g, state)
            zs.append(state["z"]["w"])
        x = schedule_free_eval_params(y, state)["w"]
        mean = torch.stack(zs).mean(0)
        if power == 0.0:
            torch.testing.assert_close(x, mean, rtol=1e-12, atol=1e-14)
            assert float(state["weight_sum"]) == len(grads)
        else:
            assert not torch.allclose(x, mean, rtol=1e-6, atol=0)


@given(params=pytrees(dtypes=(F64, torch.float32)), hp=sf_hparams(), seed=seeds)
def test_first_step_has_no_averaging(params, hp, seed):
    """R41: at step 1 c = 1, so x_1 = z_1 = y_1 (bitwise: the lerp weight is exactly 1)."""
    opt = schedule_free_adamw(**hp)
    y, state = opt.update(params, grad_sequence(params, seed, n=1)[0], opt.init_state(params))
    assert_trees_equal(y, state["z"])
    if hp["betas"][0] > 0:
        assert_trees_equal(schedule_free_eval_params(y, state), y)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_first_step_eval_params_with_a_tiny_beta1_is_finite(dtype):
    """Hypothesis found β1 = 8e-120: the x-from-y weight 1 − 1/β1 overflows float32 to −inf and
    x = y + w·(z − y) became NaN where z = y; at step 1 x must equal y."""
    params = {"w": torch.randn(4, dtype=dtype)}
    opt = schedule_free_adamw(betas=(8e-120, 0.999))
    y, state = opt.update(params, grad_sequence(params, 0, n=1)[0], opt.init_state(params))
    assert_trees_equal(schedule_free_eval_params(y, state), y)


def test_zero_lr_gives_zero_average_weight_and_no_motion():
    """γ = 0 makes w = W = 0, so c = 0 (the reference's ZeroDivisionError branch), without NaNs."""
    params = {"w": torch.randn(3, dtype=F64)}
    opt = schedule_free_adamw(lr=0.0)
    y, state = run(opt, params, grad_sequence(params, 0, n=3))
    assert torch.equal(y["w"], params["w"])
    assert float(state["weight_sum"]) == 0.0 and float(state["lr_max"]) == 0.0


# -- functional: modes, state, transforms --------------------------------------------------------
@given(params=pytrees(dtypes=(torch.float32, F64, torch.bfloat16)), hp=sf_hparams(), seed=seeds)
def test_pure_and_donate_bitwise_equal_and_pure_touches_nothing(params, hp, seed):
    opt = schedule_free_adamw(**hp)
    grads = grad_sequence(params, seed, n=4)
    p_pure, s_pure = params, opt.init_state(params)
    p_don, s_don = clone_tree(params), opt.init_state(params)
    for g in grads:
        inputs = (p_pure, g, s_pure)
        snapshot = clone_tree(inputs)
        p_pure, s_pure = opt.update(p_pure, g, s_pure)
        assert_trees_equal(inputs, snapshot)
        p_don, s_don = opt.update(p_don, g, s_don, donate=True)
        assert_trees_equal(g, snapshot[1])
        assert_trees_equal(p_pure, p_don)
        assert_trees_equal(s_pure, s_don)
    if hp["betas"][0] > 0:
        before = clone_tree(p_pure), clone_tree(s_pure)
        x = schedule_free_eval_params(p_pure, s_pure)
        assert_trees_equal((p_pure, s_pure), before)
        x_don = schedule_free_eval_params(p_don, s_don, donate=True)
        assert_trees_equal(x, x_don)
        assert_trees_equal(x_don, p_don)  # donated: the params tensors now hold x
        y_back = schedule_free_train_params(x, s_pure)
        assert_trees_equal(y_back, schedule_free_train_params(p_don, s_don, donate=True))


def test_state_layout_and_low_precision_params():
    params = {"w": torch.randn(3, 2, dtype=torch.bfloat16), "b": torch.randn(2), "n": None}
    opt = schedule_free_adamw()
    state = opt.init_state(params)
    assert set(state) == {"step", "hyperparams", "z", "exp_avg_sq", "lr_max", "weight_sum",
                          "made_by"}
    assert set(state["hyperparams"]) == {"lr", "beta1", "beta2", "eps", "weight_decay",
                                         "warmup_steps", "r", "weight_lr_power"}
    assert state["z"]["w"].dtype == torch.float32 and state["z"]["n"] is None
    assert torch.equal(state["z"]["w"], params["w"].float())
    assert state["z"]["w"] is not params["w"] and state["z"]["b"] is not params["b"]
    assert state["lr_max"].dtype == F64 and float(state["lr_max"]) == -1.0
    assert state["weight_sum"].dtype == F64 and float(state["weight_sum"]) == 0.0
    grads = tree_map(torch.ones_like, params)
    new, state = opt.update(params, grads, state)
    assert new["w"].dtype == torch.bfloat16 and new["n"] is None
    x = schedule_free_eval_params(new, state)
    assert x["w"].dtype == torch.bfloat16 and x["n"] is None
    assert schedule_free_adamw(state_dtype=F64).init_state(params)["z"]["b"].dtype == F64


@pytest.mark.parametrize("donate", [False, True])
def test_functional_resume_is_bitwise(donate):
    gen = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    grads = grad_sequence(params, 3, n=8)
    opt = schedule_free_adamw(lr=0.01, weight_decay=0.1, warmup_steps=3, r=0.5)
    p_full, s_full = run(opt, clone_tree(params), grads, donate=donate)
    p, s = run(opt, clone_tree(params), grads[:4], donate=donate)
    buf = io.BytesIO()
    torch.save({"params": p, "state": s}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    p, s = loaded["params"], loaded["state"]
    for g in grads[4:]:
        p, s = opt.update(p, g, s, donate=donate)
    assert_trees_equal(p, p_full)
    assert_trees_equal(s, s_full)


def test_weight_decay_mask_and_chain():
    gen = torch.Generator().manual_seed(8)
    params = {"w": torch.randn(3, 3, generator=gen, dtype=F64),
              "bias": torch.randn(3, generator=gen, dtype=F64)}
    grads = grad_sequence(params, 9, n=5)
    masked = schedule_free_adamw(lr=0.02, weight_decay=0.3,
                                 weight_decay_mask={"w": True, "bias": False})
    y, _ = run(masked, params, grads)
    y_decay, _ = run(schedule_free_adamw(lr=0.02, weight_decay=0.3), params, grads)
    y_plain, _ = run(schedule_free_adamw(lr=0.02), params, grads)
    assert torch.equal(y["w"], y_decay["w"]) and torch.equal(y["bias"], y_plain["bias"])
    chained = ft.chain(ft.clip_by_global_norm(0.5), schedule_free_adamw(lr=0.02))
    y_c, s_c = run(chained, params, grads)
    assert int(s_c["optimizer"]["step"]) == 5
    x = schedule_free_eval_params(y_c, s_c["optimizer"])
    assert all(torch.isfinite(t).all() for t in tensor_leaves(x))


def test_vmap_over_ensemble_equals_loop():
    opt = schedule_free_adamw(lr=0.02, weight_decay=0.1, warmup_steps=2, r=1.0)
    gen = torch.Generator().manual_seed(0)
    stacked = {"w": torch.randn(3, 4, 2, generator=gen, dtype=F64)}
    grads_seq = [{"w": torch.randn(3, 4, 2, generator=gen, dtype=F64)} for _ in range(4)]
    lrs = torch.tensor([1e-3, 1e-2, 0.1], dtype=F64)
    v_state = ft.set_hyperparams(torch.func.vmap(opt.init_state)(stacked), lr=lrs)
    v_params = stacked
    models = [{"w": stacked["w"][i]} for i in range(3)]
    states = [ft.set_hyperparams(opt.init_state(m), lr=lrs[i]) for i, m in enumerate(models)]
    for g in grads_seq:
        v_params, v_state = torch.func.vmap(opt.update)(v_params, g, v_state)
        for i in range(3):
            models[i], states[i] = opt.update(models[i], {"w": g["w"][i]}, states[i])
    torch.testing.assert_close(v_params["w"], torch.stack([m["w"] for m in models]),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v_state["weight_sum"], torch.stack([s["weight_sum"]
                                                                   for s in states]))


def test_grad_wrt_lr_matches_finite_difference():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(8, 3, generator=gen, dtype=F64)
    t = torch.randn(8, generator=gen, dtype=F64)
    p0 = {"w": torch.zeros(3, dtype=F64)}
    opt = schedule_free_adamw(lr=0.5, warmup_steps=2, weight_decay=0.1)
    mse = lambda p: ((X @ p["w"] - t) ** 2).mean()

    def loss(lr):
        p, s = p0, ft.set_hyperparams(opt.init_state(p0), lr=lr)
        for _ in range(4):
            p, s = opt.update(p, torch.func.grad(mse)(p), s)
        return mse(schedule_free_eval_params(p, s))

    lr = torch.tensor(0.05, dtype=F64)
    d = torch.func.grad(loss)(lr)
    h = 1e-6
    fd = (loss(lr + h) - loss(lr - h)) / (2 * h)
    assert abs(float(d)) > 1e-3
    torch.testing.assert_close(d, fd, rtol=1e-6, atol=1e-10)


def test_beta1_zero_eval_raises_and_train_is_z():
    params = {"w": torch.randn(3, dtype=F64)}
    opt = schedule_free_adamw(betas=(0.0, 0.99))
    y, state = run(opt, params, grad_sequence(params, 0, n=2))
    with pytest.raises(ValueError, match="beta1 = 0"):
        schedule_free_eval_params(y, state)
    assert torch.equal(schedule_free_train_params(y, state)["w"], state["z"]["w"])


@pytest.mark.parametrize("kw", [
    {"lr": -1e-3}, {"betas": (1.0, 0.999)}, {"betas": (0.9, 1.0)}, {"betas": (-0.1, 0.9)},
    {"eps": -1.0}, {"weight_decay": -0.1}, {"warmup_steps": -1}, {"r": -0.5},
    {"weight_lr_power": -1.0}, {"lr": float("nan")},
])
def test_invalid_hyperparameters_raise(kw):
    with pytest.raises(ValueError, match="schedule_free_adamw"):
        schedule_free_adamw(**kw)
    with pytest.raises(ValueError):
        ScheduleFreeAdamW([torch.nn.Parameter(torch.zeros(2))], **kw)


def test_state_and_params_mismatch_errors():
    params = {"w": torch.randn(3)}
    opt = schedule_free_adamw()
    state = opt.init_state(params)
    with pytest.raises(ValueError, match="expected keys"):
        opt.update(params, params, {k: v for k, v in state.items() if k != "lr_max"})
    with pytest.raises(ValueError, match="state"):
        opt.update({"v": torch.randn(3)}, {"v": torch.randn(3)}, state)
    with pytest.raises(ValueError, match="z"):
        schedule_free_eval_params({"v": torch.randn(3)}, state)
    with pytest.raises(ValueError, match="state must be"):
        schedule_free_eval_params(params, ft.adamw().init_state(params))


# -- adapter -------------------------------------------------------------------------------------
def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 2)).to(dtype)


def _batches(n, seed=123, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 5, generator=g, dtype=dtype) for _ in range(n)]


def _train(model, opt, batches):
    for x in batches:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


ADAPTER_KW = dict(lr=0.02, betas=(0.9, 0.99), weight_decay=0.1, warmup_steps=3, r=0.5)


def test_adapter_equals_functional_bitwise_two_groups_with_scheduler():
    model = _model()
    params = dict(model.named_parameters())
    names = list(params)
    first, second = names[:2], names[2:]
    opt = ScheduleFreeAdamW([{"params": [(n, params[n]) for n in first]},
                             {"params": [(n, params[n]) for n in second], "lr": 0.01,
                              "betas": (0.8, 0.999), "weight_decay": 0.0}], **ADAPTER_KW)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    fopts = [schedule_free_adamw(**ADAPTER_KW),
             schedule_free_adamw(**{**ADAPTER_KW, "lr": 0.01, "betas": (0.8, 0.999),
                                    "weight_decay": 0.0})]
    fparams = [{n: params[n].detach().clone() for n in grp} for grp in (first, second)]
    fstates = [o.init_state(p) for o, p in zip(fopts, fparams)]
    for x in _batches(7):
        lrs = [g["lr"] for g in opt.param_groups]
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        grads = [{n: params[n].grad.clone() for n in grp} for grp in (first, second)]
        opt.step()
        sched.step()
        for i in range(2):
            fstates[i] = ft.set_hyperparams(fstates[i], lr=lrs[i])
            fparams[i], fstates[i] = fopts[i].update(fparams[i], grads[i], fstates[i])
    for i, grp in enumerate((first, second)):
        for n in grp:
            st_ = opt.state[params[n]]
            assert set(st_) == {"step", "z", "exp_avg_sq", "lr_max", "weight_sum"}
            assert torch.equal(fparams[i][n], params[n].detach()), n
            for key in ("z", "exp_avg_sq"):
                assert torch.equal(fstates[i][key][n], st_[key]), (n, key)
            for key in ("step", "lr_max", "weight_sum"):
                assert torch.equal(fstates[i][key], st_[key]), (n, key)
    # eval() puts schedule_free_eval_params(y, state) into the model, bitwise; twice = once
    opt.eval()
    once = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    assert all(torch.equal(a, b) for a, b in zip(once, model.parameters()))
    for i, grp in enumerate((first, second)):
        x = schedule_free_eval_params(fparams[i], fstates[i])
        for n in grp:
            assert torch.equal(x[n], params[n].detach()), n
    assert [g["train_mode"] for g in opt.param_groups] == [False, False]
    # train() brings y back (up to rounding); twice = once
    opt.train()
    back = [p.detach().clone() for p in model.parameters()]
    opt.train()
    assert all(torch.equal(a, b) for a, b in zip(back, model.parameters()))
    for i, grp in enumerate((first, second)):
        y = schedule_free_train_params(schedule_free_eval_params(fparams[i], fstates[i]),
                                       fstates[i])
        for n in grp:
            assert torch.equal(y[n], params[n].detach()), n
            torch.testing.assert_close(y[n], fparams[i][n], rtol=1e-6, atol=1e-7)


def test_adapter_step_in_eval_mode_raises():
    model = _model()
    opt = ScheduleFreeAdamW(model.parameters())
    opt.eval()
    model(_batches(1)[0]).sum().backward()
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    opt.train()
    opt.step()


def test_adapter_state_dict_saved_in_eval_mode_resumes_bitwise():
    """Save (model, optimizer) in eval mode, load both into fresh objects, train() and continue:
    bitwise the run that did eval()/train() at that point without stopping, and close to the run
    that never left train mode."""
    batches = _batches(10)
    m_ref, m_plain, m1 = _model(), _model(), _model()
    o_ref = ScheduleFreeAdamW(m_ref.named_parameters(), **ADAPTER_KW)
    o_plain = ScheduleFreeAdamW(m_plain.named_parameters(), **ADAPTER_KW)
    o1 = ScheduleFreeAdamW(m1.named_parameters(), **ADAPTER_KW)
    _train(m_ref, o_ref, batches[:5])
    o_ref.eval()
    o_ref.train()
    _train(m_ref, o_ref, batches[5:])
    _train(m_plain, o_plain, batches)

    _train(m1, o1, batches[:5])
    o1.eval()
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["opt"]["param_groups"][0]["train_mode"] is False
    m2 = _model(seed=99)
    m2.load_state_dict(ckpt["model"])
    o2 = ScheduleFreeAdamW(m2.named_parameters(), **ADAPTER_KW)
    o2.load_state_dict(ckpt["opt"])
    assert o2.param_groups[0]["train_mode"] is False
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(o1.state[a]["lr_max"], o2.state[b]["lr_max"])
        assert o2.state[b]["lr_max"].dtype == F64 and o2.state[b]["step"].dtype == torch.int32
    o2.eval()  # already in eval mode: a no-op
    o2.train()
    _train(m2, o2, batches[5:])
    for a, b, c in zip(m_ref.parameters(), m2.parameters(), m_plain.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)


def test_adapter_state_dict_saved_in_train_mode_resumes_bitwise():
    batches = _batches(8)
    m_ref, m1 = _model(), _model()
    o_ref = ScheduleFreeAdamW(m_ref.named_parameters(), **ADAPTER_KW)
    _train(m_ref, o_ref, batches)
    o1 = ScheduleFreeAdamW(m1.named_parameters(), **ADAPTER_KW)
    _train(m1, o1, batches[:3])
    sd_model, sd_opt = m1.state_dict(), o1.state_dict()
    buf = io.BytesIO()
    torch.save({"model": sd_model, "opt": sd_opt}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m2 = _model(seed=5)
    o2 = ScheduleFreeAdamW(m2.named_parameters(), **ADAPTER_KW)
    o2.load_state_dict(ckpt["opt"])
    m2.load_state_dict(ckpt["model"])
    _train(m2, o2, batches[3:])
    for a, b in zip(m_ref.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_adapter_z_starts_at_the_params_of_the_first_step():
    """Weights loaded into the model after the optimizer was built are where z starts (the
    reference creates z at the first step); eval()/train() before any step move nothing."""
    src, model = _model(seed=1), _model(seed=2)
    opt = ScheduleFreeAdamW(model.named_parameters(), **ADAPTER_KW)
    model.load_state_dict(src.state_dict())
    for mode in (opt.eval, opt.train):
        mode()
        assert all(torch.equal(a, b) for a, b in zip(src.parameters(), model.parameters()))
    params = {n: p.detach().clone() for n, p in src.named_parameters()}
    fopt = schedule_free_adamw(**ADAPTER_KW)
    p, s = params, fopt.init_state(params)
    for x in _batches(4):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters()}
        opt.step()
        p, s = fopt.update(p, grads, s)
    for n, q in model.named_parameters():
        assert torch.equal(p[n], q.detach()), n
        assert torch.equal(s["z"][n], opt.state[q]["z"]), n


def test_adapter_beta1_zero_trains_and_eval_raises():
    model = _model(dtype=F64)
    opt = ScheduleFreeAdamW(model.parameters(), betas=(0.0, 0.99), lr=0.01)
    _train(model, opt, _batches(3, dtype=F64))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="beta1 = 0"):
        opt.eval()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.param_groups[0]["train_mode"] is True


def test_adapter_bf16_model_keeps_fp32_state():
    model = _model(dtype=torch.bfloat16)
    opt = ScheduleFreeAdamW(model.parameters(), lr=0.01)
    _train(model, opt, _batches(3, dtype=torch.bfloat16))
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["z"].dtype == torch.float32
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
    opt.eval()
    opt.train()


def test_adapter_state_visible_to_distributed_checkpoint_and_groups_validated():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = _model()
    opt = ScheduleFreeAdamW(model.named_parameters())
    osd = get_optimizer_state_dict(model, opt)  # before any step: the state exists eagerly
    assert set(osd["state"]["0.weight"]) == {"step", "z", "exp_avg_sq", "lr_max", "weight_sum"}
    assert osd["param_groups"][0]["train_mode"] is True
    extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [extra], "lr": -1.0})
    opt.add_param_group({"params": [("extra", extra)], "lr": 0.5})
    assert opt.param_groups[-1]["train_mode"] is True
    assert set(opt.state[extra]) == {"step", "z", "exp_avg_sq", "lr_max", "weight_sum"}


@pytest.mark.slow
def test_compiled_update_matches_eager_without_recompiling():
    import torch._dynamo.testing

    opt = schedule_free_adamw(lr=1e-2, weight_decay=0.1, warmup_steps=2)
    params = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    grads = grad_sequence(params, 0, n=3)
    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(opt.update, backend=cnt, fullgraph=True)
    p_c, s_c = params, opt.init_state(params)
    p_e, s_e = params, opt.init_state(params)
    first = None
    for lr, g in zip((1e-3, 3e-3, 2e-2), grads):
        s_c, s_e = ft.set_hyperparams(s_c, lr=lr), ft.set_hyperparams(s_e, lr=lr)
        with torch._dynamo.config.patch(error_on_recompile=first is not None):
            p_c, s_c = compiled(p_c, g, s_c)
        first = cnt.frame_count if first is None else first
        p_e, s_e = opt.update(p_e, g, s_e)
        for a, b in zip(optree.tree_leaves((p_c, s_c)), optree.tree_leaves((p_e, s_e))):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert cnt.frame_count == first
