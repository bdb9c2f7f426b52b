"""functim.adamw / functim.sgd against torch.optim, and the closed-form AdamW properties.

docs/algorithms.md section 3 (AdamW) and reductions R2, R3 and R31 (amsgrad).

Tolerances: float64 1e-12 relative, float32 1e-6 relative, plus a small absolute floor (float64
1e-14, float32 1e-7). For params and first-moment buffers (signed running sums) the relative error
is measured against the element's *trajectory scale* ``S = max_t |x_t|`` (the largest magnitude
that element had along the reference run), not against its final value:
``|ours - ref| <= atol + rtol · max(|ref|, S)``. A param that wanders to |p| ≈ 3 and comes back to
0.04 carries the rounding errors of every step taken at |p| ≈ 3 (≈ 2 ulp(3) ≈ 4e-7 in float32
after 20 SGD steps, seen with lr·|g| ≈ 0.35 per step), which no relative tolerance on the final
0.04 can describe; the difference is then only in elements that ended near zero. Where the
trajectory stays at the final magnitude this is the plain ``rtol·|ref|`` test. Second moments
are sums of squares (no cancellation) and are compared against their final value only.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_trees_equal,
    clone_tree,
    pytrees,
    random_like_tree,
    tensor_leaves,
    tree_dtype,
    tree_map,
)
from hypothesis import assume, given
from hypothesis import strategies as st

import functim as ft

N_STEPS = 20

# (rtol, atol) per dtype (see the module docstring). atol: float64 ~45 ulp(1),
# float32 ~ 1 ulp(1).
TOL = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-6, 1e-7)}


# -- strategies ---------------------------------------------------------------------------------
@st.composite
def adamw_hparams(draw):
    return dict(
        lr=draw(st.floats(1e-4, 0.1)),
        betas=(
            draw(st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.99)),
            draw(st.sampled_from([0.999, 0.95]) | st.floats(0.5, 0.9999)),
        ),
        eps=draw(st.sampled_from([0.0, 1e-8, 1e-6, 1e-3])),
        weight_decay=draw(st.sampled_from([0.0, 1e-2]) | st.floats(0.0, 0.5)),
        amsgrad=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )


@st.composite
def sgd_hparams(draw):
    momentum = draw(st.sampled_from([0.0, 0.9]) | st.floats(0.05, 0.99))
    dampening = draw(st.sampled_from([0.0, 0.0, 0.5]) | st.floats(0.0, 0.9))
    nesterov = momentum > 0 and dampening == 0 and draw(st.booleans())
    return dict(
        lr=draw(st.floats(1e-4, 0.1)),
        momentum=momentum,
        dampening=dampening,
        weight_decay=draw(st.sampled_from([0.0, 1e-2]) | st.floats(0.0, 0.1)),
        nesterov=nesterov,
        maximize=draw(st.booleans()),
    )


grad_scales = st.sampled_from([1e-3, 1.0, 1e2])
seeds = st.integers(0, 2**31 - 1)


def grad_sequence(params, seed: int, n: int = N_STEPS, scale: float = 1.0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [tree_map(lambda g: g * scale, random_like_tree(params, gen)) for _ in range(n)]


# -- runners ------------------------------------------------------------------------------------
def run_functim(opt, params, grads_seq, *, donate: bool = False):
    state = opt.init_state(params)
    for g in grads_seq:
        params, state = opt.update(params, g, state, donate=donate)
    return params, state


def run_torch(cls, params, grads_seq, **kw):
    """torch.optim over the non-None leaves. Returns (params, optimizer, scales) where
    ``scales[name][i]`` is the elementwise max of |x| over the trajectory for leaf i of the params
    (name "params") and of each state buffer (see the module docstring)."""
    ps = [torch.nn.Parameter(x.clone()) for x in tensor_leaves(params)]
    scales: dict[str, list] = {"params": [p.detach().abs() for p in ps]}

    def track(name, i, x):
        row = scales.setdefault(name, [torch.zeros_like(p) for p in ps])
        row[i] = torch.maximum(row[i], x.detach().abs())

    opt = cls(ps, **kw)
    for g in grads_seq:
        for p, gi in zip(ps, tensor_leaves(g)):
            p.grad = gi.clone()
        opt.step()
        for i, p in enumerate(ps):
            track("params", i, p)
            for name, buf in opt.state[p].items():
                if name != "step" and isinstance(buf, torch.Tensor) and buf.shape == p.shape:
                    track(name, i, buf)
    return ps, opt, scales


def assert_leaves_close(ours: list, ref: list, dtype: torch.dtype, what: str,
                        scales: list | None = None) -> None:
    """``|ours - ref| <= atol + rtol·max(|ref|, S)`` elementwise, S = trajectory scale (or 0)."""
    rtol, atol = TOL[dtype]
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        b = b.detach()
        assert a.dtype == dtype, f"{what}[{i}] dtype {a.dtype} (expected {dtype})"
        assert a.shape == b.shape, f"{what}[{i}] shape {a.shape} vs {b.shape}"
        mag = b.abs() if scales is None else torch.maximum(b.abs(), scales[i])
        err = (a.double() - b.double()).abs()
        bound = atol + rtol * mag.double()
        bad = ~(err <= bound)
        if bad.any():
            j = int(torch.argmax(torch.where(bad, err / bound, 0.0).flatten()))
            raise AssertionError(
                f"{what}[{i}]: {int(bad.sum())}/{b.numel()} elements off; worst at flat index {j}: "
                f"ours {a.flatten()[j].item()!r}, ref {b.flatten()[j].item()!r}, "
                f"|diff| {err.flatten()[j].item():.3g} > bound {bound.flatten()[j].item():.3g} "
                f"(rtol {rtol}, atol {atol}, scale {mag.flatten()[j].item():.3g})")


# -- torch.optim parity -------------------------------------------------------------------------
@given(params=pytrees(), hp=adamw_hparams(), seed=seeds, scale=grad_scales)
def test_adamw_matches_torch(params, hp, seed, scale):
    dtype = tree_dtype(params)
    grads = grad_sequence(params, seed, scale=scale)
    ours, state = run_functim(ft.adamw(**hp), params, grads)
    assert int(state["step"]) == N_STEPS
    ours_l = tensor_leaves(ours)
    for foreach in (True, False):
        ref_ps, ref_opt, scales = run_torch(torch.optim.AdamW, params, grads, foreach=foreach,
                                            **hp)
        tag = f"adamw foreach={foreach}"
        assert_leaves_close(ours_l, ref_ps, dtype, f"{tag} params", scales["params"])
        bufs = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hp["amsgrad"] else [])
        for b in bufs:
            ref_b = [ref_opt.state[p][b] for p in ref_ps]
            # second moments are sums of squares (no cancellation): their final value
            sc = scales[b] if b == "exp_avg" else None
            assert_leaves_close(tensor_leaves(state[b]), ref_b, dtype, f"{tag} {b}", sc)


@given(params=pytrees(), hp=sgd_hparams(), seed=seeds, scale=grad_scales)
def test_sgd_matches_torch(params, hp, seed, scale):
    dtype = tree_dtype(params)
    grads = grad_sequence(params, seed, scale=scale)
    ours, state = run_functim(ft.sgd(**hp), params, grads)
    assert int(state["step"]) == N_STEPS
    assert ("momentum_buffer" in state) == (hp["momentum"] != 0)
    ours_l = tensor_leaves(ours)
    for foreach in (True, False):
        ref_ps, ref_opt, scales = run_torch(torch.optim.SGD, params, grads, foreach=foreach, **hp)
        tag = f"sgd foreach={foreach}"
        assert_leaves_close(ours_l, ref_ps, dtype, f"{tag} params", scales["params"])
        if hp["momentum"] != 0:
            ref_b = [ref_opt.state[p]["momentum_buffer"] for p in ref_ps]
            assert_leaves_close(tensor_leaves(state["momentum_buffer"]), ref_b, dtype,
                                f"{tag} momentum_buffer", scales["momentum_buffer"])


@given(params=pytrees(), hp=sgd_hparams(), seed=seeds, scale=grad_scales)
def test_sgd_multi_tensor_kernel_is_bitwise_torch_foreach(params, hp, seed, scale):
    """``fused=False`` runs functim's own kernel: without Nesterov its ops are torch.optim.SGD's
    foreach ops in torch's order (the step rounded once, as ``add_(g, alpha=−η)``), so the
    results are equal bitwise, not only within a tolerance. (Nesterov's ``p − η·(g + μ·buf)`` is
    two steps in functim, with no temporary: within the tolerance of the test above.)"""
    assume(not hp["nesterov"])
    grads = grad_sequence(params, seed, scale=scale)
    ours, state = run_functim(ft.sgd(**hp, fused=False), params, grads)
    ref_ps, ref_opt, _ = run_torch(torch.optim.SGD, params, grads, foreach=True, **hp)
    for a, b in zip(tensor_leaves(ours), ref_ps):
        assert torch.equal(a, b.detach())
    if hp["momentum"] != 0:
        for a, p in zip(tensor_leaves(state["momentum_buffer"]), ref_ps):
            assert torch.equal(a, ref_opt.state[p]["momentum_buffer"])


def test_adamw_defaults_match_torch():
    """The constructor defaults are torch.optim.AdamW's."""
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 4, generator=gen, dtype=torch.float64),
              "b": torch.randn(4, generator=gen, dtype=torch.float64)}
    grads = grad_sequence(params, 1)
    ours, _ = run_functim(ft.adamw(), params, grads)
    ref_ps, _, _ = run_torch(torch.optim.AdamW, params, grads)
    assert_leaves_close(tensor_leaves(ours), ref_ps, torch.float64, "params")


# -- pure vs donated ----------------------------------------------------------------------------
optimizers = st.one_of(
    adamw_hparams().map(lambda hp: ft.adamw(**hp)),
    sgd_hparams().map(lambda hp: ft.sgd(**hp)),
)


@given(params=pytrees(dtypes=(torch.float32, torch.float64, torch.bfloat16)), opt=optimizers,
       seed=seeds)
def test_pure_and_donate_bitwise_equal_and_pure_touches_nothing(params, opt, seed):
    """Pure mode never writes its inputs; donate=True gives bitwise the same results; grads are
    never written in either mode."""
    grads = grad_sequence(params, seed, n=5)
    p_pure, s_pure = params, opt.init_state(params)
    p_don, s_don = clone_tree(params), opt.init_state(params)
    for g in grads:
        inputs = (p_pure, g, s_pure)
        snapshot = clone_tree(inputs)
        p_pure, s_pure = opt.update(p_pure, g, s_pure)
        # pure mode: params, grads and state are untouched
        assert_trees_equal(inputs, snapshot)
        g_before = clone_tree(g)
        p_don, s_don = opt.update(p_don, g, s_don, donate=True)
        # grads are never modified, even when donating
        assert_trees_equal(g, g_before)
        assert_trees_equal(p_pure, p_don)
        assert_trees_equal(s_pure, s_don)


# -- closed-form properties (docs/algorithms.md R2, R3, R31) -------------------------------------
@given(params=pytrees(), hp=adamw_hparams(), seed=seeds)
def test_adamw_maximize_is_minimize_of_negated_grads_bitwise(params, hp, seed):
    """R2: AdamW(maximize=True, g) ≡ AdamW(maximize=False, −g), bitwise."""
    grads = grad_sequence(params, seed)
    neg = [tree_map(torch.neg, g) for g in grads]
    hp = {**hp, "maximize": False}
    p_max, s_max = run_functim(ft.adamw(**{**hp, "maximize": True}), params, grads)
    p_min, s_min = run_functim(ft.adamw(**hp), params, neg)
    assert_trees_equal(p_max, p_min)
    assert_trees_equal(s_max, s_min)


@given(params=pytrees(), hp=sgd_hparams(), seed=seeds)
def test_sgd_maximize_is_minimize_of_negated_grads_bitwise(params, hp, seed):
    grads = grad_sequence(params, seed)
    neg = [tree_map(torch.neg, g) for g in grads]
    hp = {**hp, "maximize": False}
    p_max, s_max = run_functim(ft.sgd(**{**hp, "maximize": True}), params, grads)
    p_min, s_min = run_functim(ft.sgd(**hp), params, neg)
    assert_trees_equal(p_max, p_min)
    assert_trees_equal(s_max, s_min)


@given(params=pytrees(dtypes=(torch.float64,)), hp=adamw_hparams(), seed=seeds,
       scale=grad_scales)
def test_adamw_first_step_is_signsgd_with_decoupled_decay(params, hp, seed, scale):
    """R3: at t=1 with eps=0 and g≠0, Δp = −lr·(λ·p + sign(g)) (sign(−g) when maximizing)."""
    hp = {**hp, "eps": 0.0}
    g = tree_map(lambda x: torch.where(x == 0, 1.0, x) * scale,
                 random_like_tree(params, torch.Generator().manual_seed(seed)))
    opt = ft.adamw(**hp)
    new, _ = opt.update(params, g, opt.init_state(params))
    lr, wd = hp["lr"], hp["weight_decay"]
    sgn = -1.0 if hp["maximize"] else 1.0
    expected = tree_map(lambda p, gi: p - lr * (wd * p + sgn * torch.sign(gi)), params, g)
    for a, b in zip(tensor_leaves(new), tensor_leaves(expected)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@given(params=pytrees(), hp=adamw_hparams(), seed=seeds,
       c0=st.floats(1e-3, 10.0), growth=st.floats(1.01, 2.0))
def test_amsgrad_equals_plain_when_grad_magnitude_grows(params, hp, seed, c0, growth):
    """R31: g_t = c_t·s with c_t increasing (constant sign) makes v non-decreasing, so the
    running max is v itself and amsgrad takes exactly the plain steps."""
    s = random_like_tree(params, torch.Generator().manual_seed(seed))
    s = tree_map(lambda x: torch.where(x == 0, 1.0, x).to(x.dtype), s)
    grads = [tree_map(lambda x, t=t: x * (c0 * growth**t), s) for t in range(N_STEPS)]
    p_a, s_a = run_functim(ft.adamw(**{**hp, "amsgrad": True}), params, grads)
    p_p, s_p = run_functim(ft.adamw(**{**hp, "amsgrad": False}), params, grads)
    assert_trees_equal(p_a, p_p)
    assert_trees_equal(s_a["exp_avg"], s_p["exp_avg"])
    assert_trees_equal(s_a["exp_avg_sq"], s_p["exp_avg_sq"])
    assert_trees_equal(s_a["max_exp_avg_sq"], s_p["exp_avg_sq"])


# -- low precision params -----------------------------------------------------------------------
buffered_optimizers = st.one_of(
    adamw_hparams().map(lambda hp: ft.adamw(**hp)),
    sgd_hparams().filter(lambda hp: hp["momentum"] != 0).map(lambda hp: ft.sgd(**hp)),
)


@pytest.mark.parametrize("donate", [False, True])
@given(params=pytrees(dtypes=(torch.bfloat16,)), opt=buffered_optimizers, seed=seeds)
def test_bf16_params_keep_dtype_with_float32_state(params, opt, seed, donate):
    """bf16 params: buffers default to float32; the param stays bf16 and is exactly the float32
    update of the upcast param, rounded to bf16 (the float32 state carries across steps)."""
    grads = grad_sequence(params, seed, n=5)
    state = opt.init_state(params)
    assert opt.buffer_names
    for name in opt.buffer_names:
        assert all(b.dtype == torch.float32 for b in tensor_leaves(state[name])), name
    to32 = lambda t: tree_map(lambda x: x.float(), t)
    p32, s32 = to32(params), opt.init_state(to32(params))
    p = params
    for g in grads:
        p, state = opt.update(p, g, state, donate=donate)
        new32, s32 = opt.update(p32, to32(g), s32)
        p32 = to32(tree_map(lambda x: x.to(torch.bfloat16), new32))
        assert all(x.dtype == torch.bfloat16 for x in tensor_leaves(p))
        assert_trees_equal(to32(p), p32)
        assert_trees_equal(state, s32)


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_sgd_without_momentum_matches_torch(dtype, donate):
    """Plain SGD keeps no buffer; on bf16/fp16 params it still computes in float32 (the buffer
    dtype it would use) and rounds the new param once, exactly ``(p32 - lr·g32).to(dtype)``.
    torch.optim.SGD also computes in float32 but its vectorised low-precision kernel rounds a few
    elements differently (measured: 1 of 1000 here, identically for foreach and for-loop), so
    against torch the check is torch's own default bf16/fp16 tolerance."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(1000, generator=gen).to(dtype)
    g = torch.randn(1000, generator=gen).to(dtype)
    lr = 0.09375
    opt = ft.sgd(lr=lr)
    new, _ = opt.update({"w": p0.clone()}, {"w": g}, opt.init_state({"w": p0}), donate=donate)
    assert new["w"].dtype == dtype
    assert torch.equal(new["w"], (p0.float() + g.float() * -lr).to(dtype))
    for foreach in (True, False):
        ref = torch.nn.Parameter(p0.clone())
        ref.grad = g.clone()
        torch.optim.SGD([ref], lr=lr, foreach=foreach).step()
        torch.testing.assert_close(new["w"], ref.detach())


# -- 0-d leaves ---------------------------------------------------------------------------------
@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("make_opt", [
    lambda: ft.adamw(), lambda: ft.adamw(amsgrad=True), lambda: ft.sgd(lr=0.1),
    lambda: ft.sgd(lr=0.1, momentum=0.9, weight_decay=0.1),
], ids=["adamw", "adamw-amsgrad", "sgd", "sgd-momentum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_dim_params_keep_dtype(make_opt, dtype, donate):
    """A 0-d param (a learnable scalar such as a logit scale) keeps its dtype, and so do its
    buffers, whatever the (0-d float64) hyperparameters are; its value matches torch.optim."""
    opt = make_opt()
    params = {"scale": torch.tensor(1.5, dtype=dtype), "w": torch.ones(2, dtype=dtype)}
    grads = {"scale": torch.tensor(0.3, dtype=dtype), "w": torch.full((2,), 0.3, dtype=dtype)}
    state = opt.init_state(params)
    new, state = opt.update(clone_tree(params), grads, state, donate=donate)
    assert new["scale"].dtype == dtype
    for name in opt.buffer_names:
        assert state[name]["scale"].dtype == state[name]["w"].dtype, name
    # the scalar leaf gets bitwise the update of the same value held as a 1-element leaf
    as_1d = lambda t: {k: v.reshape(-1) for k, v in t.items()}
    new_1d, _ = opt.update(as_1d(params), as_1d(grads), opt.init_state(as_1d(params)))
    assert torch.equal(new["scale"].reshape(1), new_1d["scale"])


def test_state_dtype_overrides_buffer_dtype():
    params = {"w": torch.randn(3, 2, dtype=torch.bfloat16), "b": torch.randn(2)}
    opt = ft.adamw(state_dtype=torch.float64)
    state = opt.init_state(params)
    assert state["exp_avg"]["w"].dtype == torch.float64
    assert state["exp_avg_sq"]["b"].dtype == torch.float64
    new, state = opt.update(params, tree_map(torch.ones_like, params), state)
    assert new["w"].dtype == torch.bfloat16 and new["b"].dtype == torch.float32
    assert state["exp_avg"]["w"].dtype == torch.float64
    # default: float32 buffers for bf16, the param dtype otherwise
    state = ft.adamw().init_state(params)
    assert state["exp_avg"]["w"].dtype == torch.float32
    assert state["exp_avg"]["b"].dtype == torch.float32
