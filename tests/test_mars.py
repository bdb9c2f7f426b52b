"""MARS (docs/algorithms.md section 6): reductions R9–R11 and R35, the per-tensor clip in closed
form, a plain-torch transcription of the reference update, state handling, and the torch.optim
adapter.

The reference loop below is written from the update rule (AGI-Arena/MARS@4831e28 ``update_fn``),
one leaf at a time in float64, with the reference's own operation order (``p − η·(λ·p + u)``,
``m·β + (1−β)·c``), so it also checks that functim's reordering (``p·(1−ηλ)`` first, ``lerp``) is
the same function to rounding. R29 (scale invariance) does not hold for MARS with its clip and
is not tested.

Tolerances: float64, ``rtol=1e-12`` with an absolute floor of ``1e-13`` (about 450 ulp(1);
params start at N(0, 1) and may end near zero after 10 steps whose rounding errors were made at
|p| ≈ 1).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import (
    assert_trees_equal,
    clone_tree,
    random_like_tree,
    tensor_leaves,
    tree_map,
)
from functim.adapters.mars import Mars
from hypothesis import given
from hypothesis import strategies as st

import functim as ft
from functim.optimizers.lion import lion
from functim.optimizers.mars import mars

F64 = torch.float64
RTOL, ATOL = 1e-12, 1e-13
N_STEPS = 10
seeds = st.integers(0, 2**31 - 1)


# -- helpers --------------------------------------------------------------------------------------
def assert_close(a, b, what=""):
    for i, (x, y) in enumerate(zip(tensor_leaves(a), tensor_leaves(b), strict=True)):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL, msg=lambda m, i=i: f"{what}[{i}]"
                                   f" {m}")


def mixed_params(gen, dtype=F64):
    """2-D matrices, a bias, a 0-d scalar, a 4-D conv kernel, a 3-D tensor and a None leaf."""
    shapes = {"w1": (4, 3), "w2": (3, 5), "b": (5,), "s": (), "conv": (2, 1, 3, 3),
              "t": (2, 2, 3)}
    p = {k: torch.randn(s, generator=gen, dtype=F64).to(dtype) for k, s in shapes.items()}
    p["frozen"] = None
    return p


def grad_seq(params, seed, n=N_STEPS, scales=(0.1, 1.0, 10.0)):
    """Random grads; step t is scaled by ``scales[t % len(scales)]`` (with the defaults the
    per-tensor clip is inactive on some steps and active on others)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        s = scales[t % len(scales)]
        out.append(tree_map(lambda g, s=s: g * s, random_like_tree(params, gen)))
    return out


def unit_clipped_seq(params, seed, n=N_STEPS):
    """Grads with ‖g‖_F ≤ 0.999 for every leaf and step (the clip is inactive when γ = 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        g = random_like_tree(params, gen)
        r = torch.rand((), generator=gen, dtype=F64).item() * 0.989 + 0.01
        out.append(tree_map(lambda x, r=r: x * (r / max(float(x.norm()), 1e-30)), g))
    return out


def run(opt, params, grads, *, donate=False, lrs=None):
    state = opt.init_state(params)
    for t, g in enumerate(grads):
        if lrs is not None:
            state = ft.set_hyperparams(state, lr=lrs[t])
        params, state = opt.update(params, g, state, donate=donate)
    return params, state


def reference_mars(params, grads, *, lr=3e-3, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.0,
                   amsgrad=False, gamma=0.025, mars_type="mars-adamw", optimize_1d=False,
                   lr_1d=3e-3, betas_1d=(0.9, 0.95), weight_decay_1d=0.1, lrs=None,
                   decay=None):
    """The MARS update rule, one leaf at a time, plain torch; ``lrs[t]`` overrides ``lr`` at step
    t+1 (a schedule) while lr_1d stays relative to the constructor ``lr``; ``decay[name]=False``
    turns off both decays for that leaf (a weight-decay mask)."""
    b1, b2 = betas
    lr_1d_factor = lr_1d / lr
    params = {k: (None if v is None else v.clone()) for k, v in params.items()}
    state = {k: dict(exp_avg=torch.zeros_like(v), exp_avg_sq=torch.zeros_like(v),
                     max_exp_avg_sq=torch.zeros_like(v), last_grad=torch.zeros_like(v))
             for k, v in params.items() if v is not None}
    for t, grads_t in enumerate(grads, start=1):
        eta = lr if lrs is None else lrs[t - 1]
        for k, p in params.items():
            if p is None:
                continue
            g, s = grads_t[k], state[k]
            m, v, vmax = s["exp_avg"], s["exp_avg_sq"], s["max_exp_avg_sq"]
            dec = decay is None or decay[k]
            wd = weight_decay if dec else 0.0
            wd_1d = weight_decay_1d if dec else 0.0
            if optimize_1d or g.ndim == 2:
                c = (g - s["last_grad"]).mul(gamma * (b1 / (1 - b1))).add(g)
                c_norm = torch.norm(c)
                if c_norm > 1:
                    c = c / c_norm
                m.mul_(b1).add_(c, alpha=1 - b1)
                if mars_type == "mars-adamw":
                    v.mul_(b2).addcmul_(c, c, value=1 - b2)
                    bc1, bc2 = 1 - b1**t, 1 - b2**t
                    if amsgrad:
                        torch.maximum(vmax, v, out=vmax)
                        vv = vmax
                    else:
                        vv = v
                    denom = vv.sqrt().mul(1 / math.sqrt(bc2)).add(eps).mul(bc1)
                    p.add_(-eta * (p * wd).add(m / denom))
                else:
                    p.add_(-eta * (p * wd).add(m.sign()))
            else:
                c1, c2 = betas_1d
                m.mul_(c1).add_(g, alpha=1 - c1)
                v.mul_(c2).addcmul_(g, g, value=1 - c2)
                bc1, bc2 = 1 - c1**t, 1 - c2**t
                if amsgrad:
                    torch.maximum(vmax, v, out=vmax)
                    vv = vmax
                else:
                    vv = v
                denom = vv.sqrt().mul(1 / math.sqrt(bc2)).add(eps).mul(bc1)
                p.add_(-eta * lr_1d_factor * (p * wd_1d).add(m / denom))
            s["last_grad"] = g.clone()
    return params, state


# -- strategies -----------------------------------------------------------------------------------
betas_st = st.tuples(st.sampled_from([0.0, 0.9, 0.95]) | st.floats(0.0, 0.99),
                     st.sampled_from([0.99, 0.95]) | st.floats(0.5, 0.999))


@st.composite
def mars_hparams(draw):
    return dict(
        lr=draw(st.floats(1e-4, 0.05)),
        betas=draw(betas_st),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        weight_decay=draw(st.sampled_from([0.0, 0.1]) | st.floats(0.0, 0.5)),
        amsgrad=draw(st.booleans()),
        gamma=draw(st.sampled_from([0.025, 0.5]) | st.floats(0.001, 1.0)),
        mars_type=draw(st.sampled_from(["mars-adamw", "mars-lion"])),
        optimize_1d=draw(st.booleans()),
        lr_1d=draw(st.floats(1e-4, 0.05)),
        betas_1d=draw(betas_st),
        weight_decay_1d=draw(st.sampled_from([0.1, 0.0]) | st.floats(0.0, 0.5)),
    )


def _params_st(dtypes=(F64,)):
    return st.builds(lambda seed, dt: mixed_params(torch.Generator().manual_seed(seed), dt),
                     seeds, st.sampled_from(dtypes))


# -- defaults and construction --------------------------------------------------------------------
def test_defaults_are_the_reference_defaults():
    opt = mars()
    assert opt.hyperparams == {
        "lr": 3e-3, "beta1": 0.95, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.0,
        "gamma": 0.025, "lr_1d": 3e-3, "beta1_1d": 0.9, "beta2_1d": 0.95,
        "weight_decay_1d": 0.1}
    assert opt.options == {"mars_type": "mars-adamw", "optimize_1d": False, "amsgrad": False,
                           "clip": "per_tensor", "lr_init": 3e-3}
    p = mixed_params(torch.Generator().manual_seed(0))
    new_ref, _ = reference_mars(p, grad_seq(p, 1))
    new, _ = run(opt, p, grad_seq(p, 1))
    assert_close(new, new_ref)


@pytest.mark.parametrize("kw, buffers", [
    ({}, {"exp_avg", "exp_avg_sq", "last_grad"}),
    ({"amsgrad": True}, {"exp_avg", "exp_avg_sq", "last_grad", "max_exp_avg_sq"}),
    ({"mars_type": "mars-lion"}, {"exp_avg", "exp_avg_sq", "last_grad"}),
    ({"mars_type": "mars-lion", "optimize_1d": True}, {"exp_avg", "last_grad"}),
    ({"mars_type": "mars-lion", "optimize_1d": True, "amsgrad": True}, {"exp_avg", "last_grad"}),
])
def test_state_is_complete_after_init(kw, buffers):
    """Every key present with the right dtype and zeros before any update; every
    hyperparameter a 0-d float64 tensor."""
    p = mixed_params(torch.Generator().manual_seed(0), torch.bfloat16)
    p["x"] = torch.ones(2, 2)
    state = mars(**kw).init_state(p)
    assert set(state) == {"step", "hyperparams", "made_by"} | buffers
    assert state["step"].dtype == torch.int32 and int(state["step"]) == 0
    assert set(state["hyperparams"]) == {"lr", "beta1", "beta2", "eps", "weight_decay", "gamma",
                                         "lr_1d", "beta1_1d", "beta2_1d", "weight_decay_1d"}
    for v in state["hyperparams"].values():
        assert v.dtype == F64 and v.shape == ()
    for b in buffers:
        assert state[b]["frozen"] is None
        for k, x in state[b].items():
            if x is not None:
                assert x.dtype == torch.float32 and x.shape == p[k].shape and not x.any()


# -- R9, R10, R11 ---------------------------------------------------------------------------------
@given(params=_params_st(), hp=mars_hparams(), seed=seeds)
def test_r9_gamma0_unclipped_equals_adamw(params, hp, seed):
    """R9: MARS-adamw(γ=0, optimize_1d=True) ≡ AdamW when every ‖g_leaf‖_F ≤ 1: bitwise against
    functim's own AdamW kernel (the same kernel runs on c = g), to 1e-12 against torch's fused
    AdamW, and to 1e-12 against torch.optim.AdamW."""
    grads = unit_clipped_seq(params, seed)
    adam_kw = {k: hp[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad")}
    ours, s = run(mars(**{**hp, "gamma": 0.0, "optimize_1d": True, "mars_type": "mars-adamw"}),
                  params, grads)
    ref, s_ref = run(ft.adamw(**adam_kw, fused=False), params, grads)
    assert_trees_equal(ours, ref)
    for b in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp["amsgrad"] else ()):
        assert_trees_equal(s[b], s_ref[b])
    ref_fused, _ = run(ft.adamw(**adam_kw, fused=True), params, grads)
    assert_close(ours, ref_fused, "fused")
    ps = [torch.nn.Parameter(x.clone()) for x in tensor_leaves(params)]
    topt = torch.optim.AdamW(ps, **adam_kw, foreach=False)
    for g in grads:
        for p, gi in zip(ps, tensor_leaves(g)):
            p.grad = gi.clone()
        topt.step()
    assert_close(ours, [p.detach() for p in ps], "torch.optim")


def test_r9_clip_active_makes_them_differ():
    """The precondition matters: with ‖g‖ > 1 the per-tensor clip changes the trajectory."""
    p = {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)}
    grads = grad_seq(p, 1, scales=(10.0,))
    ours, _ = run(mars(gamma=0.0, optimize_1d=True), p, grads)
    ref, _ = run(ft.adamw(lr=3e-3, betas=(0.95, 0.99), weight_decay=0.0), p, grads)
    assert not torch.allclose(ours["w"], ref["w"], rtol=1e-6, atol=0)


@given(params=_params_st(), hp=mars_hparams(), seed=seeds)
def test_r10_lion_gamma0_unclipped_is_signum_with_dwd(params, hp, seed):
    """R10: MARS-lion(γ=0, optimize_1d=True), ‖g_leaf‖ ≤ 1 ≡ Lion(β1, β1):
    m ← β1·m + (1−β1)·g, p ← p·(1−ηλ) − η·sign(m) (closed form, and functim's lion)."""
    grads = unit_clipped_seq(params, seed)
    ours, state = run(mars(**{**hp, "gamma": 0.0, "optimize_1d": True,
                              "mars_type": "mars-lion"}), params, grads)
    lr, b1, wd = hp["lr"], hp["betas"][0], hp["weight_decay"]
    ref = {k: None if v is None else v.clone() for k, v in params.items()}
    ms = {k: torch.zeros_like(v) for k, v in params.items() if v is not None}
    for g in grads:
        for k, m in ms.items():
            m.mul_(b1).add_(g[k], alpha=1 - b1)
            ref[k] = ref[k] * (1 - lr * wd) - lr * torch.sign(m)
    assert_close(ours, ref)
    assert_close(state["exp_avg"], {k: ms.get(k) for k in params})
    lion_p, lion_s = run(lion(lr=lr, betas=(b1, b1), weight_decay=wd), params, grads)
    assert_close(ours, lion_p, "lion")
    assert_close(state["exp_avg"], lion_s["exp_avg"], "lion exp_avg")


@given(params=_params_st(), hp=mars_hparams(), seed=seeds)
def test_r11_non_2d_leaves_are_adamw_with_the_1d_hyperparameters(params, hp, seed):
    """R11: with optimize_1d=False every leaf with ndim ≠ 2 (0-d, 1-D, 3-D, 4-D) follows
    AdamW(betas_1d, lr·lr_1d/lr_init, weight_decay_1d), bitwise (same kernel, same lr value),
    whatever γ, the clip and the 2-D leaves do."""
    hp = {**hp, "optimize_1d": False}
    grads = grad_seq(params, seed)
    ours, state = run(mars(**hp), params, grads)
    non2d = [k for k, v in params.items() if v is not None and v.ndim != 2]
    sub = lambda t: {k: t[k] for k in non2d}
    adam = ft.adamw(lr=hp["lr"] * (hp["lr_1d"] / hp["lr"]), betas=hp["betas_1d"], eps=hp["eps"],
                    weight_decay=hp["weight_decay_1d"], amsgrad=hp["amsgrad"], fused=False)
    ref, s_ref = run(adam, sub(params), [sub(g) for g in grads])
    assert_trees_equal(sub(ours), ref)
    for b in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp["amsgrad"] else ()):
        assert_trees_equal(sub(state[b]), s_ref[b])


def test_r11_lr_schedule_scales_the_1d_lr_proportionally():
    """A scheduled lr: the 1-D lr is lr_t·lr_1d/lr_init with lr_init = the schedule's
    max_value() (the peak), matching the reference driven by the same per-step lrs."""
    sched = ft.warmup_cosine(2e-2, 3, N_STEPS, floor=1e-3)
    p = mixed_params(torch.Generator().manual_seed(0))
    grads = grad_seq(p, 1)
    opt = mars(lr=sched, lr_1d=5e-3, weight_decay=0.1)
    assert opt.options["lr_init"] == 2e-2
    ours, state = run(opt, p, grads)
    lrs = [float(sched(t)) for t in range(N_STEPS)]
    ref, _ = reference_mars(p, grads, lr=2e-2, lr_1d=5e-3, weight_decay=0.1, lrs=lrs)
    assert_close(ours, ref)
    assert float(state["hyperparams"]["lr"]) == lrs[-1]
    # the same through set_hyperparams on a constant-lr optimizer (what an LR scheduler does in
    # the adapter): lr_init stays the constructor's lr
    ours2, _ = run(mars(lr=2e-2, lr_1d=5e-3, weight_decay=0.1), p, grads, lrs=lrs)
    assert_trees_equal(ours, ours2)
    # an explicit lr_init
    ours3, _ = run(mars(lr=2e-2, lr_1d=5e-3, lr_init=4e-2, weight_decay=0.1), p, grads, lrs=lrs)
    ref3, _ = reference_mars(p, grads, lr=4e-2, lr_1d=5e-3, weight_decay=0.1, lrs=lrs)
    assert_close(ours3, ref3)


# -- the clip -------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimize_1d", [False, True])
@pytest.mark.parametrize("scale", [0.05, 3.0, 1e3])
def test_first_step_closed_form(scale, optimize_1d):
    """Step 1: c = (1 + γβ1/(1−β1))·g (last_grad = 0); the moments see c/max(1, ‖c‖):
    m1 = (1−β1)·ĉ, v1 = (1−β2)·ĉ²; p1 = p·(1−ηλ) − η·ĉ/(|ĉ| + ε) (bias-corrected); last_grad = g."""
    lr, b1, b2, gamma, wd, eps = 1e-2, 0.9, 0.99, 0.5, 0.1, 1e-8
    gen = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(5, 4, generator=gen, dtype=F64), "b": torch.randn(4, generator=gen,
                                                                            dtype=F64)}
    g = tree_map(lambda x: x * scale, random_like_tree(p, gen))
    opt = mars(lr=lr, betas=(b1, b2), gamma=gamma, weight_decay=wd, eps=eps,
               optimize_1d=optimize_1d)
    new, state = opt.update(p, g, opt.init_state(p))
    mars_keys = ["w", "b"] if optimize_1d else ["w"]
    for k in mars_keys:
        c = (1 + gamma * b1 / (1 - b1)) * g[k]
        n = float(c.norm())
        c_hat = c / n if n > 1 else c
        assert float(torch.linalg.vector_norm(c_hat)) <= 1 + 1e-15
        torch.testing.assert_close(state["exp_avg"][k], (1 - b1) * c_hat, rtol=RTOL, atol=0)
        torch.testing.assert_close(state["exp_avg_sq"][k], (1 - b2) * c_hat**2, rtol=RTOL,
                                   atol=0)
        step = c_hat / (c_hat.abs() + eps)
        torch.testing.assert_close(new[k], p[k] * (1 - lr * wd) - lr * step, rtol=RTOL,
                                   atol=ATOL)
    for k in p:
        assert torch.equal(state["last_grad"][k], g[k])


def test_clipped_corrected_gradient_has_unit_norm():
    """R35 through the state: with β2 = 0 and γ > 0, v_t = c_t² so ‖sqrt(v_t)‖ = ‖c_t‖ ≤ 1
    on every step; the clip is active (‖c‖ = 1) when ‖g‖ ≫ 1."""
    p = {"w": torch.zeros(6, 3, dtype=F64)}
    grads = grad_seq(p, 3, scales=(0.01, 100.0))
    opt = mars(betas=(0.9, 0.0), gamma=0.7)
    state = opt.init_state(p)
    for t, g in enumerate(grads):
        p, state = opt.update(p, g, state)
        n = float(state["exp_avg_sq"]["w"].sqrt().norm())
        assert n <= 1 + 1e-14
        if t % 2 == 1:
            assert abs(n - 1) < 1e-14


# -- the reference transcription ------------------------------------------------------------------
@given(params=_params_st(), hp=mars_hparams(), seed=seeds)
def test_matches_reference_loop(params, hp, seed):
    """10 steps against the plain-torch transcription of the update rule: γ > 0, the clip active
    on some steps, 2-D and non-2-D leaves, both mars types, amsgrad, optimize_1d both ways."""
    grads = grad_seq(params, seed)
    ours, state = run(mars(**hp), params, grads)
    ref, ref_state = reference_mars(params, grads, **hp)
    assert_close(ours, ref, "params")
    for b in ("exp_avg", "exp_avg_sq", "last_grad", "max_exp_avg_sq"):
        if b in state:
            assert_close(state[b], {k: ref_state[k][b] if k in ref_state else None
                                    for k in params}, b)


@pytest.mark.parametrize("mars_type", ["mars-adamw", "mars-lion"])
def test_weight_decay_mask_applies_to_both_branches(mars_type):
    """A masked-out leaf gets neither weight_decay (MARS branch) nor weight_decay_1d (AdamW
    branch); weight_decay = 0 does not switch off weight_decay_1d (the reference's rule)."""
    p = mixed_params(torch.Generator().manual_seed(0))
    grads = grad_seq(p, 1)
    mask = {k: k in ("w1", "b", "conv") for k in p}
    for wd in (0.0, 0.2):
        opt = mars(weight_decay=wd, weight_decay_1d=0.3, mars_type=mars_type,
                   weight_decay_mask=mask)
        ours, _ = run(opt, p, grads)
        ref, _ = reference_mars(p, grads, weight_decay=wd, weight_decay_1d=0.3,
                                mars_type=mars_type, decay=mask)
        assert_close(ours, ref)


# -- state handling -------------------------------------------------------------------------------
@pytest.mark.parametrize("donate", [False, True])
def test_last_grad_is_a_copy(donate):
    """Writing into the grads after an update does not change the state (the reference keeps a
    reference to p.grad instead)."""
    p = mixed_params(torch.Generator().manual_seed(0))
    g = grad_seq(p, 1, n=1)[0]
    opt = mars(optimize_1d=True)
    _, state = opt.update(clone_tree(p), g, opt.init_state(p), donate=donate)
    expected = clone_tree(g)
    for x in tensor_leaves(g):
        x.mul_(-3.0).add_(1.0)
    assert_trees_equal(state["last_grad"], expected)
    for a, b in zip(tensor_leaves(state["last_grad"]), tensor_leaves(g)):
        assert a.data_ptr() != b.data_ptr()


@given(params=_params_st((torch.float32, F64, torch.bfloat16)), hp=mars_hparams(), seed=seeds)
def test_pure_and_donate_bitwise_equal_and_pure_touches_nothing(params, hp, seed):
    grads = grad_seq(params, seed, n=4)
    opt = mars(**hp)
    p_pure, s_pure = params, opt.init_state(params)
    p_don, s_don = clone_tree(params), opt.init_state(params)
    for g in grads:
        inputs = (p_pure, g, s_pure)
        snapshot = clone_tree(inputs)
        p_pure, s_pure = opt.update(p_pure, g, s_pure)
        assert_trees_equal(inputs, snapshot)
        g_before = clone_tree(g)
        p_don, s_don = opt.update(p_don, g, s_don, donate=True)
        assert_trees_equal(g, g_before)
        assert_trees_equal(p_pure, p_don)
        assert_trees_equal(s_pure, s_don)
    assert all(x.dtype == y.dtype for x, y in zip(tensor_leaves(p_pure), tensor_leaves(params)))


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("kw", [{}, {"mars_type": "mars-lion", "amsgrad": True},
                                {"optimize_1d": True, "amsgrad": True}])
def test_save_resume_is_bitwise(kw, donate):
    p = mixed_params(torch.Generator().manual_seed(0), torch.float32)
    grads = grad_seq(p, 1, n=6)
    opt = mars(weight_decay=0.1, **kw)
    full_p, full_s = run(opt, clone_tree(p), grads, donate=donate)
    half_p, half_s = run(opt, clone_tree(p), grads[:3], donate=donate)
    buf = io.BytesIO()
    torch.save({"params": half_p, "state": half_s}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    rp, rs = loaded["params"], loaded["state"]
    for g in grads[3:]:
        rp, rs = opt.update(rp, g, rs, donate=donate)
    assert_trees_equal(rp, full_p)
    assert_trees_equal(rs, full_s)


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"lr": -1e-3}, "'lr'"),
    ({"gamma": -0.1}, "'gamma'"),
    ({"betas": (1.0, 0.99)}, "'beta1'"),
    ({"betas": (0.9, -0.1)}, "'beta2'"),
    ({"betas_1d": (0.9, 1.0)}, "'beta2_1d'"),
    ({"betas_1d": (-0.5, 0.9)}, "'beta1_1d'"),
    ({"eps": -1.0}, "'eps'"),
    ({"weight_decay": -0.1}, "'weight_decay'"),
    ({"weight_decay_1d": -0.1}, "'weight_decay_1d'"),
    ({"lr_1d": -1.0}, "'lr_1d'"),
    ({"mars_type": "mars-sgd"}, "unknown mars_type"),
    ({"mars_type": "mars-shampoo"}, "not implemented yet"),
    ({"clip": "global"}, "not implemented yet"),
    ({"clip": "norm"}, "unknown clip"),
    ({"lr": 0.0}, "lr_init"),
    ({"lr": ft.linear_warmup(0.0, 10)}, "lr_init"),
])
def test_invalid_hyperparameters_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        mars(**kw)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=match):
        Mars(model.parameters(), **kw)


def test_adapter_rejects_the_exact_variant():
    Mars(torch.nn.Linear(2, 2).parameters(), is_approx=True)
    with pytest.raises(ValueError, match="is_approx=False"):
        Mars(torch.nn.Linear(2, 2).parameters(), is_approx=False)


def test_boundary_values_accepted_and_type_errors():
    mars(lr=0.0, optimize_1d=True, betas=(0.0, 0.0), gamma=0.0, eps=0.0)
    mars(lr=0.0, lr_init=1e-3)
    with pytest.raises(TypeError, match="optimize_1d"):
        mars(optimize_1d=1)
    with pytest.raises(TypeError, match="betas"):
        mars(betas=0.9)


# -- torch.func / torch.compile -------------------------------------------------------------------
def test_vmap_over_ensemble_equals_loop():
    """The kernel's per-tensor path (under vmap): each member's 2-D test and norm are its own."""
    gen = torch.Generator().manual_seed(0)
    n = 3
    members = [mixed_params(gen) for _ in range(n)]
    for m in members:
        del m["frozen"]
    opt = mars(weight_decay=0.1, gamma=0.3)
    stacked = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    grads = [{k: torch.randn(v.shape, generator=gen, dtype=F64) * 3 for k, v in stacked.items()}
             for _ in range(4)]
    v_params, v_state = stacked, torch.func.vmap(opt.init_state)(stacked)
    states = [opt.init_state(m) for m in members]
    for g in grads:
        v_params, v_state = torch.func.vmap(opt.update)(v_params, g, v_state)
        for i in range(n):
            members[i], states[i] = opt.update(members[i], {k: v[i] for k, v in g.items()},
                                               states[i])
    for k in stacked:
        torch.testing.assert_close(v_params[k], torch.stack([m[k] for m in members]),
                                   rtol=RTOL, atol=ATOL)


def test_grad_wrt_gamma_matches_finite_difference():
    """Hyperparameters are differentiable 0-d tensors (γ enters through c)."""
    p = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)}
    grads = grad_seq(p, 1, n=3, scales=(0.3,))
    opt = mars(lr=0.05)

    def loss(gamma):
        state = ft.set_hyperparams(opt.init_state(p), gamma=gamma)
        params = p
        for g in grads:
            params, state = opt.update(params, g, state)
        return (params["w"] ** 2).sum()

    x = torch.tensor(0.4, dtype=F64)
    d = torch.func.grad(loss)(x)
    h = 1e-6
    fd = (loss(x + h) - loss(x - h)) / (2 * h)
    assert abs(float(d)) > 1e-6
    torch.testing.assert_close(d, fd, rtol=1e-5, atol=1e-12)


def test_compiled_update_has_no_graph_break_and_matches_eager():
    """fullgraph=True: no host sync, no Python branch on a tensor value (clip included)."""
    gen = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    grads = [tree_map(lambda x: x * 10, random_like_tree(p, gen)) for _ in range(2)]
    opt = mars(weight_decay=0.1)
    compiled = torch.compile(opt.update, fullgraph=True)
    pc, sc = p, opt.init_state(p)
    pe, se = p, opt.init_state(p)
    for g in grads:
        pc, sc = compiled(pc, g, sc)
        pe, se = opt.update(pe, g, se)
    for a, b in zip(tensor_leaves((pc, sc)), tensor_leaves((pe, se))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -- the torch.optim adapter ----------------------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.norm = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 3)
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = self.conv(x).flatten(1)[:, :8]
        return self.fc(self.norm(h)) * self.scale


@pytest.mark.parametrize("kw", [{}, {"mars_type": "mars-lion"},
                                {"amsgrad": True, "optimize_1d": True}])
def test_adapter_equals_functional_bitwise(kw):
    """Two param groups (the second overrides lr, betas_1d and sets weight_decay 0 — its non-2-D
    leaves still decay with weight_decay_1d) and a LambdaLR scheduler. lr_init is the
    constructor's lr for both groups, as the reference's lr_1d_factor."""
    torch.manual_seed(0)
    net = _Net().double()
    named = dict(net.named_parameters())
    g1, g2 = ["conv.weight", "conv.bias", "fc.weight"], ["norm.weight", "norm.bias", "fc.bias",
                                                         "scale"]
    lr = 1e-2
    opt = Mars([{"params": [(n, named[n]) for n in g1]},
                {"params": [(n, named[n]) for n in g2], "lr": 3e-3, "betas_1d": (0.8, 0.9),
                 "weight_decay": 0.0}],
               lr=lr, weight_decay=0.1, gamma=0.3, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    fopts = [mars(lr=lr, weight_decay=0.1, gamma=0.3, **kw),
             mars(lr=3e-3, betas_1d=(0.8, 0.9), weight_decay=0.0, gamma=0.3, lr_init=lr, **kw)]
    fparams = [{n: named[n].detach().clone() for n in grp} for grp in (g1, g2)]
    fstates = [o.init_state(fp) for o, fp in zip(fopts, fparams)]
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(4, 1, 5, 5, generator=gen, dtype=F64) * (1 + 10 * (step % 2))
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        for i, grp in enumerate((g1, g2)):
            grads = {n: named[n].grad.clone() for n in grp}
            st_ = ft.set_hyperparams(fstates[i], lr=opt.param_groups[i]["lr"])
            fparams[i], fstates[i] = fopts[i].update(fparams[i], grads, st_)
        opt.step()
        sched.step()
        for i, grp in enumerate((g1, g2)):
            for n in grp:
                assert torch.equal(named[n].detach(), fparams[i][n]), (step, n)
                for b in fopts[i].buffer_names:
                    assert torch.equal(opt.state[named[n]][b], fstates[i][b][n]), (step, n, b)


def test_adapter_group_added_later_keeps_the_constructor_lr_as_lr_init():
    """A group added after a scheduler moved the lr, with another static option (so it gets its
    own functional optimizer): its 1-D lr is still relative to the constructor's lr."""
    a, b = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    opt = Mars(a.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    opt.step()
    sched.step()
    opt.add_param_group({"params": list(b.parameters()), "lr": 4e-3, "amsgrad": True})
    b0 = b.bias.detach().clone()
    b.bias.grad = torch.full_like(b.bias, 0.5)
    opt.step()
    # first AdamW step on the bias: p·(1 − η_1d·λ_1d) − η_1d·g/(|g| + ε),
    # η_1d = 4e-3·3e-3/1e-2 (not 4e-3·3e-3/5e-3, the first group's lr when the group was added)
    eta = 4e-3 * (3e-3 / 1e-2)
    expected = b0 * (1 - eta * 0.1) - eta * 0.5 / (0.5 + 1e-8)
    torch.testing.assert_close(b.bias.detach(), expected, rtol=RTOL, atol=ATOL)


def test_adapter_defaults_and_resume():
    """Reference keyword names and defaults; state_dict round trip continues bitwise."""
    net = _Net()
    opt = Mars(net.parameters())
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["amsgrad"], g["gamma"],
            g["mars_type"], g["optimize_1d"], g["lr_1d"], g["betas_1d"],
            g["weight_decay_1d"]) == (3e-3, (0.95, 0.99), 1e-8, 0.0, False, 0.025,
                                      "mars-adamw", False, 3e-3, (0.9, 0.95), 0.1)
    for p in net.parameters():
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq", "last_grad"}

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 1, 5, 5, generator=gen) for _ in range(6)]

    def train(net, opt, batch):
        for x in batch:
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()

    torch.manual_seed(0)
    n1 = _Net()
    o1 = Mars(n1.named_parameters(), lr=1e-2, gamma=0.2)
    train(n1, o1, xs)
    torch.manual_seed(0)
    n2 = _Net()
    o2 = Mars(n2.named_parameters(), lr=1e-2, gamma=0.2)
    train(n2, o2, xs[:3])
    buf = io.BytesIO()
    torch.save({"model": n2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(5)
    n3 = _Net()
    n3.load_state_dict(saved["model"])
    o3 = Mars(n3.named_parameters(), lr=1e-2, gamma=0.2)
    o3.load_state_dict(saved["opt"])
    train(n3, o3, xs[3:])
    for a, b in zip(n1.parameters(), n3.parameters()):
        assert torch.equal(a, b)
