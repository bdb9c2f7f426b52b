"""Lion, SignSGD, Signum, NAdamW (three forms) and the Cautious optimizers, against the reference
maths (docs/algorithms.md sections 4, 5, 11) and its reduction catalogue (R4–R8, R25, R26, R29,
R32–R34, R40).

Tolerances follow tests/test_reference_parity.py: float64 1e-12 relative, float32 1e-6 relative,
plus a small absolute floor (float64 1e-14, float32 1e-7); params are compared against their
*trajectory scale* ``S = max_t |p_t|`` (see that module's docstring), i.e.
``|ours - ref| <= atol + rtol · max(|ref|, S)``. "Bitwise" means ``torch.equal``.

The reference implementations below (``_ref_run``) are written from the update rules, one tensor
at a time, in plain float64 arithmetic; form (A) of NAdamW is checked against torch.optim.NAdam
itself.
"""

from __future__ import annotations

import contextlib
import io
import math

import optree
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
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
from torch._dynamo.utils import counters

import functim as ft

F32, F64 = torch.float32, torch.float64
N_STEPS = 20
TOL = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-6, 1e-7)}
EPS64 = torch.finfo(F64).eps
NORMALIZATIONS = ("mean", "paper", "eps")
NADAMW_VARIANTS = ("optax", "torch", "timm")

seeds = st.integers(0, 2**31 - 1)
grad_scales = st.sampled_from([1e-3, 1.0, 1e2])
f64_trees = pytrees(dtypes=(F64,))


# -- hyperparameter strategies (keyword names of the functional constructors) -------------------
lrs = st.sampled_from([1e-3, 0.1]) | st.floats(1e-4, 0.1)
wds = st.sampled_from([0.0, 0.1]) | st.floats(0.0, 0.5)
beta1s = st.sampled_from([0.0, 0.9, 0.95]) | st.floats(0.0, 0.99)
beta2s = st.sampled_from([0.999, 0.95, 0.98]) | st.floats(0.5, 0.9999)
lion_beta2s = st.sampled_from([0.99, 0.98, 0.0]) | st.floats(0.0, 0.999)
adam_epss = st.sampled_from([0.0, 1e-8, 1e-6, 1e-3])
momentum_decays = st.sampled_from([4e-3, 0.0, 0.1]) | st.floats(0.0, 1.0)


@st.composite
def lion_hparams(draw):
    return dict(lr=draw(lrs), betas=(draw(beta1s), draw(lion_beta2s)), weight_decay=draw(wds))


@st.composite
def signsgd_hparams(draw):
    return dict(lr=draw(lrs), weight_decay=draw(wds))


@st.composite
def signum_hparams(draw):
    return dict(lr=draw(lrs), beta=draw(beta1s), weight_decay=draw(wds))


@st.composite
def nadamw_hparams(draw, variants=NADAMW_VARIANTS):
    variant = draw(st.sampled_from(variants))
    hp = dict(lr=draw(lrs), betas=(draw(beta1s), draw(beta2s)), eps=draw(adam_epss),
              weight_decay=draw(wds), variant=variant)
    if variant == "torch":
        hp["momentum_decay"] = draw(momentum_decays)
    return hp


@st.composite
def cautious_adamw_hparams(draw, normalizations=NORMALIZATIONS):
    norm = draw(st.sampled_from(normalizations))
    # "eps" normalization divides by (mean φ + eps): eps = 0 is 0/0 on a fully masked leaf
    eps = draw(adam_epss.filter(lambda e: e > 0) if norm == "eps" else adam_epss)
    return dict(lr=draw(lrs), betas=(draw(beta1s), draw(beta2s)), eps=eps,
                weight_decay=draw(wds), normalization=norm)


@st.composite
def cautious_lion_hparams(draw, normalizations=NORMALIZATIONS):
    return dict(lr=draw(lrs), betas=(draw(beta1s), draw(lion_beta2s)), weight_decay=draw(wds),
                normalization=draw(st.sampled_from(normalizations)))


HPARAM_STRATEGIES = {
    "lion": lion_hparams(),
    "signsgd": signsgd_hparams(),
    "signum": signum_hparams(),
    "nadamw": nadamw_hparams(),
    "cautious_adamw": cautious_adamw_hparams(),
    "cautious_lion": cautious_lion_hparams(),
}


def _make(name: str, hp: dict):
    return getattr(ft, name)(**hp)


any_optimizer = st.one_of(
    *[s.map(lambda hp, n=n: (n, hp)) for n, s in HPARAM_STRATEGIES.items()])


# -- helpers ------------------------------------------------------------------------------------
def grad_sequence(params, seed: int, n: int = N_STEPS, scale: float = 1.0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [tree_map(lambda g: g * scale, random_like_tree(params, gen)) for _ in range(n)]


def nonzero(tree):
    """Replace exact zeros by 1 (the eps = 0 closed forms need g ≠ 0 elementwise)."""
    return tree_map(lambda x: torch.where(x == 0, torch.ones_like(x), x), tree)


def run_functim(opt, params, grads_seq, *, donate: bool = False):
    """Returns (params, state, scales): scales[i] = elementwise max |p| over the trajectory."""
    state = opt.init_state(params)
    scales = [p.abs() for p in tensor_leaves(params)]
    for g in grads_seq:
        params, state = opt.update(params, g, state, donate=donate)
        scales = [torch.maximum(s, p.abs()) for s, p in zip(scales, tensor_leaves(params))]
    return params, state, scales


def assert_leaves_close(ours: list, ref: list, dtype: torch.dtype, what: str,
                        scales: list | None = None) -> None:
    """``|ours - ref| <= atol + rtol·max(|ref|, S)`` elementwise, S = trajectory scale (or 0)."""
    rtol, atol = TOL[dtype]
    assert len(ours) == len(ref), f"{what}: {len(ours)} vs {len(ref)} leaves"
    for i, (a, b) in enumerate(zip(ours, ref)):
        b = b.detach()
        assert a.dtype == dtype, f"{what}[{i}] dtype {a.dtype} (expected {dtype})"
        assert a.shape == b.shape, f"{what}[{i}] shape {a.shape} vs {b.shape}"
        mag = b.abs() if scales is None else torch.maximum(b.abs(), scales[i].to(b.dtype))
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


def scales_max(a: list, b: list) -> list:
    return [torch.maximum(x, y) for x, y in zip(a, b)]


def grad_bound(grads_seq, c: float = 1.0) -> list:
    """Elementwise c·max_t |g_t| per leaf: the trajectory scale of an EMA of the grads."""
    out = [x.abs() for x in tensor_leaves(grads_seq[0])]
    for g in grads_seq[1:]:
        out = scales_max(out, [x.abs() for x in tensor_leaves(g)])
    return [c * x for x in out]


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def run_torch(cls, params, grads_seq, **kw):
    """torch.optim over the non-None leaves; returns (params, scales).

    Run with float64 as torch's default dtype: torch.optim.NAdam keeps ``mu_product`` (and
    ``step``) in the default dtype, so under float32 its Π carries float32 rounding (≈ 3e-8
    relative at t=1) that the reference maths does not have."""
    ps = [torch.nn.Parameter(x.clone()) for x in tensor_leaves(params)]
    scales = [p.detach().abs() for p in ps]
    with default_dtype(F64):
        opt = cls(ps, **kw)
        for g in grads_seq:
            for p, gi in zip(ps, tensor_leaves(g)):
                p.grad = gi.clone()
            opt.step()
            scales = [torch.maximum(s, p.detach().abs()) for s, p in zip(scales, ps)]
    return [p.detach() for p in ps], scales


# -- the reference maths, one tensor at a time (docs/algorithms.md) -----------------------------
def _normalize(phi: torch.Tensor, normalization: str, eps: float) -> torch.Tensor:
    """The cautious mask φ scaled per tensor (docs/algorithms.md section 5)."""
    if normalization == "mean":
        return phi / max(phi.mean().item(), 1e-3)
    if normalization == "paper":
        return phi * (phi.numel() / (phi.sum().item() + 1))
    assert normalization == "eps"
    return phi / (phi.mean().item() + eps)


def _ref_leaf(kind: str, hp: dict, p: torch.Tensor, gs: list) -> tuple:
    """(final p, trajectory scale, final first-moment buffer or None)."""
    lr, wd = hp["lr"], hp.get("weight_decay", 0.0)
    p = p.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    scale = p.abs()
    for t, g in enumerate(gs, 1):
        p = p * (1 - lr * wd)
        if kind == "signsgd":
            p = p - lr * torch.sign(g)
        elif kind == "signum":
            b = hp["beta"]
            m = b * m + (1 - b) * g
            p = p - lr * torch.sign(m)
        elif kind in ("lion", "cautious_lion"):
            b1, b2 = hp["betas"]
            u = torch.sign(b1 * m + (1 - b1) * g)
            if kind == "cautious_lion":
                u = u * _normalize((u * g > 0).to(p.dtype), hp["normalization"], 1e-8)
            p = p - lr * u
            m = b2 * m + (1 - b2) * g
        else:
            b1, b2 = hp["betas"]
            eps = hp["eps"]
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            denom = v.sqrt() / math.sqrt(bc2) + eps  # ε outside the square root
            if kind == "nadamw_optax":  # form (B)
                mhat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / bc1
            elif kind == "nadamw_timm":  # form (C)
                mhat = (b1 * m + (1 - b1) * g) / bc1
            else:
                assert kind == "cautious_adamw"
                phi = (m * g > 0).to(p.dtype)  # the UPDATED m and the raw g
                mhat = m * _normalize(phi, hp["normalization"], eps) / bc1
            p = p - lr * mhat / denom
        scale = torch.maximum(scale, p.abs())
    return p, scale, (None if kind in ("signsgd",) else m)


def ref_run(kind: str, hp: dict, params, grads_seq) -> tuple[list, list, list]:
    outs = [_ref_leaf(kind, hp, p, [tensor_leaves(g)[i] for g in grads_seq])
            for i, p in enumerate(tensor_leaves(params))]
    return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]


def _kind(name: str, hp: dict) -> str:
    return f"nadamw_{hp['variant']}" if name == "nadamw" else name


# ==============================================================================================
# 1. Against the reference maths / torch.optim
# ==============================================================================================
@given(params=pytrees(), hp=nadamw_hparams(variants=("torch",)), seed=seeds, scale=grad_scales)
def test_nadamw_torch_variant_matches_torch_nadam(params, hp, seed, scale):
    """Form (A): nadamw(variant="torch", momentum_decay=ψ) ≡ torch.optim.NAdam(
    decoupled_weight_decay=True, momentum_decay=ψ) over 20 steps."""
    dtype = tree_dtype(params)
    grads = grad_sequence(params, seed, scale=scale)
    ours, state, _ = run_functim(ft.nadamw(**hp), params, grads)
    assert int(state["step"]) == N_STEPS
    assert "mu_product" in state
    kw = {k: v for k, v in hp.items() if k != "variant"}
    for foreach in (False, True):
        ref, scales = run_torch(torch.optim.NAdam, params, grads, decoupled_weight_decay=True,
                                foreach=foreach, **kw)
        assert_leaves_close(tensor_leaves(ours), ref, dtype, f"nadam foreach={foreach}", scales)


@given(params=pytrees(), hp=nadamw_hparams(variants=("optax",)), seed=seeds, scale=grad_scales)
def test_r5_nadamw_optax_is_torch_nadam_with_infinite_momentum_decay(params, hp, seed, scale):
    """R5: form (B) ≡ torch.optim.NAdam(decoupled_weight_decay=True, momentum_decay=1e9)
    (0.96^(tψ) = 0, so μ_t = β1 and Π = β1^t)."""
    dtype = tree_dtype(params)
    grads = grad_sequence(params, seed, scale=scale)
    ours, _, _ = run_functim(ft.nadamw(**hp), params, grads)
    kw = {k: v for k, v in hp.items() if k != "variant"}
    ref, scales = run_torch(torch.optim.NAdam, params, grads, decoupled_weight_decay=True,
                            momentum_decay=1e9, **kw)
    assert_leaves_close(tensor_leaves(ours), ref, dtype, "nadamw optax vs NAdam(ψ=1e9)", scales)


@pytest.mark.parametrize("name", list(HPARAM_STRATEGIES))
@given(data=st.data(), params=f64_trees, seed=seeds, scale=grad_scales)
def test_matches_reference_maths(name, data, params, seed, scale):
    """Every optimizer (torch-form NAdamW excepted: see the torch.optim test) against the
    per-tensor reference written from the update rules, 20 steps, float64."""
    hp = data.draw(nadamw_hparams(variants=("optax", "timm")) if name == "nadamw"
                   else HPARAM_STRATEGIES[name])
    grads = grad_sequence(params, seed, scale=scale)
    ours, state, sc = run_functim(_make(name, hp), params, grads)
    ref, ref_sc, ref_m = ref_run(_kind(name, hp), hp, params, grads)
    assert_leaves_close(tensor_leaves(ours), ref, F64, f"{name} params", scales_max(sc, ref_sc))
    buf = {"lion": "exp_avg", "cautious_lion": "exp_avg", "signum": "momentum"}.get(name)
    if buf is not None:
        assert_leaves_close(tensor_leaves(state[buf]), ref_m, F64, f"{name} {buf}",
                            grad_bound(grads))


def test_state_layout_and_defaults():
    params = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    expected_buffers = {"lion": {"exp_avg"}, "signsgd": set(), "signum": {"momentum"}}
    for name, bufs in expected_buffers.items():
        state = getattr(ft, name)().init_state(params)
        assert set(state) - {"step", "hyperparams", "made_by"} == bufs, name
        assert state["made_by"] == {name: {}}
    hp = ft.get_hyperparams(ft.lion().init_state(params))
    assert {k: float(v) for k, v in hp.items()} == {
        "lr": 1e-4, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0}
    hp = ft.get_hyperparams(ft.signum().init_state(params))
    assert {k: float(v) for k, v in hp.items()} == {"lr": 1e-3, "beta": 0.95,
                                                    "weight_decay": 0.0}
    hp = ft.get_hyperparams(ft.cautious_lion().init_state(params))
    assert (float(hp["beta1"]), float(hp["beta2"]), float(hp["lr"])) == (0.95, 0.98, 1e-4)
    hp = ft.get_hyperparams(ft.cautious_adamw().init_state(params))
    assert (float(hp["eps"]), float(hp["weight_decay"])) == (1e-6, 0.0)
    hp = ft.get_hyperparams(ft.nadamw().init_state(params))
    assert (float(hp["lr"]), float(hp["beta1"]), float(hp["beta2"]), float(hp["eps"]),
            float(hp["weight_decay"])) == (1e-3, 0.9, 0.999, 1e-8, 1e-2)
    # the default nadamw is form (B)
    p = {"w": torch.randn(4, dtype=F64)}
    g = {"w": torch.randn(4, dtype=F64)}
    a, _ = ft.nadamw().update(p, g, ft.nadamw().init_state(p))
    o = ft.nadamw(variant="optax")
    b, _ = o.update(p, g, o.init_state(p))
    assert torch.equal(a["w"], b["w"])


# ==============================================================================================
# 2. NAdamW closed forms (R4, R32, R33)
# ==============================================================================================
@pytest.mark.parametrize("variant", NADAMW_VARIANTS)
@given(params=f64_trees, lr=lrs, beta2=beta2s, eps=adam_epss, wd=wds, psi=momentum_decays,
       seed=seeds, scale=grad_scales)
def test_r4_nadamw_with_beta1_zero_is_adamw(variant, params, lr, beta2, eps, wd, psi, seed,
                                             scale):
    """R4: forms (A), (B), (C) with β1 = 0 ≡ AdamW(β1 = 0) with the same β2, ε, λ, η."""
    grads = grad_sequence(params, seed, scale=scale)
    extra = {"momentum_decay": psi} if variant == "torch" else {}
    ours, _, sc = run_functim(ft.nadamw(lr=lr, betas=(0.0, beta2), eps=eps, weight_decay=wd,
                                        variant=variant, **extra), params, grads)
    ref, _, ref_sc = run_functim(ft.adamw(lr=lr, betas=(0.0, beta2), eps=eps, weight_decay=wd,
                                          fused=False), params, grads)
    assert_leaves_close(tensor_leaves(ours), tensor_leaves(ref), F64, f"nadamw[{variant}]",
                        scales_max(sc, ref_sc))


@given(params=f64_trees, lr=lrs, beta1=beta1s, beta2=beta2s, seed=seeds, scale=grad_scales)
def test_nadamw_forms_b_and_c_first_step_closed_form(params, lr, beta1, beta2, seed, scale):
    """R32: ε = 0, λ = 0, t = 1 (so v̂ = g²): form (B) steps −η·(1 + β1/(1+β1))·sign(g), form
    (C) −η·(1 + β1)·sign(g)."""
    g = nonzero(grad_sequence(params, seed, n=1, scale=scale)[0])
    coef = {"optax": 1 + beta1 / (1 + beta1), "timm": 1 + beta1}
    for variant, c in coef.items():
        opt = ft.nadamw(lr=lr, betas=(beta1, beta2), eps=0.0, weight_decay=0.0, variant=variant)
        new, _ = opt.update(params, g, opt.init_state(params))
        expected = tree_map(lambda p, gi, c=c: p - lr * c * torch.sign(gi), params, g)
        assert_leaves_close(tensor_leaves(new), tensor_leaves(expected), F64, variant,
                            [p.abs() for p in tensor_leaves(params)])


@pytest.mark.parametrize("variant", NADAMW_VARIANTS)
@given(params=f64_trees, lr=lrs, beta1=beta1s, beta2=beta2s, psi=momentum_decays, seed=seeds,
       scale=grad_scales)
def test_nadamw_constant_gradient_coefficients(variant, params, lr, beta1, beta2, psi, seed,
                                               scale):
    """R33: constant g ≠ 0, ε = 0, λ = 0: m_t = (1−β1^t)·g and v̂ = g², so every step is
    −η·coef(t)·sign(g) with coef_B(t) = β1(1−β1^t)/(1−β1^(t+1)) + (1−β1)/(1−β1^t),
    coef_C(t) = (1−β1^(t+1))/(1−β1^t) and (form A, from its update rule)
    coef_A(t) = (1−μ_t)/(1−Π_t) + μ_{t+1}(1−β1^t)/(1−Π_t·μ_{t+1})."""
    g = nonzero(grad_sequence(params, seed, n=1, scale=scale)[0])
    extra = {"momentum_decay": psi} if variant == "torch" else {}
    opt = ft.nadamw(lr=lr, betas=(beta1, beta2), eps=0.0, weight_decay=0.0, variant=variant,
                    **extra)
    state = opt.init_state(params)
    p = params
    mu = lambda t: beta1 * (1 - 0.5 * 0.96 ** (t * psi))
    prod = 1.0
    for t in range(1, 11):
        if variant == "optax":
            coef = beta1 * (1 - beta1**t) / (1 - beta1 ** (t + 1)) + (1 - beta1) / (1 - beta1**t)
        elif variant == "timm":
            coef = (1 - beta1 ** (t + 1)) / (1 - beta1**t)
        else:
            prod *= mu(t)
            coef = ((1 - mu(t)) / (1 - prod)
                    + mu(t + 1) * (1 - beta1**t) / (1 - prod * mu(t + 1)))
        new, state = opt.update(p, g, state)
        expected = tree_map(lambda x, gi, c=coef: x - lr * c * torch.sign(gi), p, g)
        assert_leaves_close(tensor_leaves(new), tensor_leaves(expected), F64,
                            f"{variant} t={t}", [x.abs() for x in tensor_leaves(p)])
        p = new


# ==============================================================================================
# 3. Cautious (R6–R8, R34)
# ==============================================================================================
def constant_sign_grads(params, seed: int, n: int = N_STEPS, scale: float = 1.0) -> list:
    """g_t = s ⊙ |r_t| with a fixed sign pattern s and nonzero magnitudes: every m_t (a convex
    combination of same-sign values, m_1 = (1−β1)·g_1) has the sign of g_t, so m_t ⊙ g_t > 0."""
    gen = torch.Generator().manual_seed(seed)
    s = tree_map(lambda x: torch.where(x >= 0, 1.0, -1.0).to(x.dtype),
                 random_like_tree(params, gen))
    return [tree_map(lambda si, r: si * (r.abs() + 0.1) * scale, s, random_like_tree(params, gen))
            for _ in range(n)]


@given(params=f64_trees, hp=cautious_adamw_hparams(normalizations=("mean",)), seed=seeds,
       scale=grad_scales)
def test_r6_cautious_adamw_is_adamw_when_mask_is_full(params, hp, seed, scale):
    """R6: m_t ⊙ g_t > 0 everywhere for all t (constant nonzero sign per coordinate), mean
    normalization: C-AdamW ≡ AdamW (same ε, outside the square root)."""
    grads = constant_sign_grads(params, seed, scale=scale)
    opt = ft.cautious_adamw(**hp)
    state = opt.init_state(params)
    p = params
    sc = [x.abs() for x in tensor_leaves(p)]
    for g in grads:  # check the precondition on functim's own first moment
        p, state = opt.update(p, g, state)
        sc = scales_max(sc, [x.abs() for x in tensor_leaves(p)])
        for m, gi in zip(tensor_leaves(state["exp_avg"]), tensor_leaves(g)):
            assert bool((m * gi > 0).all())
    kw = {k: v for k, v in hp.items() if k != "normalization"}
    ref, _, ref_sc = run_functim(ft.adamw(fused=False, **kw), params, grads)
    assert_leaves_close(tensor_leaves(p), tensor_leaves(ref), F64, "c-adamw(mean) vs adamw",
                        scales_max(sc, ref_sc))


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@given(params=f64_trees, hp=cautious_adamw_hparams(normalizations=("mean",)), seed=seeds,
       scale=grad_scales)
def test_r7_cautious_adamw_first_step_closed_form(normalization, params, hp, seed, scale):
    """t = 1, every g ≠ 0 (φ ≡ 1, m̂ = g, v̂ = g²): AdamW's first step g/(|g| + ε) scaled by 1
    ("mean"), n/(n+1) ("paper", n = numel of the leaf) or 1/(1 + ε) ("eps")."""
    hp = {**hp, "normalization": normalization}
    if normalization == "eps":
        hp["eps"] = max(hp["eps"], 1e-8)
    lr, wd, eps = hp["lr"], hp["weight_decay"], hp["eps"]
    g = nonzero(grad_sequence(params, seed, n=1, scale=scale)[0])
    opt = ft.cautious_adamw(**hp)
    new, _ = opt.update(params, g, opt.init_state(params))

    def expected(p, gi):
        n = p.numel()
        f = {"mean": 1.0, "paper": n / (n + 1), "eps": 1 / (1 + eps)}[normalization]
        return p * (1 - lr * wd) - lr * f * gi / (gi.abs() + eps)

    assert_leaves_close(tensor_leaves(new), tensor_leaves(tree_map(expected, params, g)), F64,
                        normalization, [p.abs() for p in tensor_leaves(params)])


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@given(params=f64_trees, hp=lion_hparams(), seed=seeds, scale=grad_scales)
def test_r7_cautious_lion_first_step_closed_form(normalization, params, hp, seed, scale):
    """R7: t = 1, g ≠ 0 (u = sign(g), so u ⊙ g > 0 everywhere): C-Lion's step is the Lion step
    −η·sign(g) scaled by n/(n+1) ("paper"), 1 ("mean") or 1/(1 + 1e-8) ("eps")."""
    lr, wd = hp["lr"], hp["weight_decay"]
    g = nonzero(grad_sequence(params, seed, n=1, scale=scale)[0])
    opt = ft.cautious_lion(**hp, normalization=normalization)
    new, _ = opt.update(params, g, opt.init_state(params))
    lion = ft.lion(**hp)
    new_lion, _ = lion.update(params, g, lion.init_state(params))

    def expected(p, gi):
        n = p.numel()
        f = {"mean": 1.0, "paper": n / (n + 1), "eps": 1 / (1 + 1e-8)}[normalization]
        return p * (1 - lr * wd) - lr * f * torch.sign(gi)

    sc = [p.abs() for p in tensor_leaves(params)]
    assert_leaves_close(tensor_leaves(new), tensor_leaves(tree_map(expected, params, g)), F64,
                        normalization, sc)
    if normalization == "mean":
        assert_leaves_close(tensor_leaves(new), tensor_leaves(new_lion), F64, "vs lion", sc)


@given(params=f64_trees, hp=cautious_lion_hparams(normalizations=("mean",)), seed=seeds,
       scale=grad_scales)
def test_cautious_lion_mean_is_lion_when_mask_is_full(params, hp, seed, scale):
    """Constant nonzero sign per coordinate keeps u = sign(g) (m has g's sign), so u ⊙ g > 0
    everywhere at every step and C-Lion(mean) ≡ Lion."""
    grads = constant_sign_grads(params, seed, scale=scale)
    ours, s1, sc = run_functim(ft.cautious_lion(**hp), params, grads)
    kw = {k: v for k, v in hp.items() if k != "normalization"}
    ref, s2, ref_sc = run_functim(ft.lion(**kw), params, grads)
    assert_leaves_close(tensor_leaves(ours), tensor_leaves(ref), F64, "c-lion vs lion",
                        scales_max(sc, ref_sc))
    assert_leaves_close(tensor_leaves(s1["exp_avg"]), tensor_leaves(s2["exp_avg"]), F64,
                        "exp_avg", grad_bound(grads))


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@given(params=f64_trees, hp=cautious_adamw_hparams(normalizations=("mean",)),
       frac=st.floats(0.0, 0.99), seed=seeds, scale=grad_scales)
def test_r8_cautious_adamw_fully_masked_step_is_pure_weight_decay(normalization, params, hp,
                                                                  frac, seed, scale):
    """R8: g_2 = −K·g_1 with 0 ≤ K < β1 leaves m_2 = (1−β1)(β1−K)·g_1 with g_1's sign, so
    m_2 ⊙ g_2 ≤ 0 everywhere and step 2 is p·(1−ηλ) only."""
    hp = {**hp, "normalization": normalization}
    if normalization == "eps":
        hp["eps"] = max(hp["eps"], 1e-8)
    b1 = hp["betas"][0]
    assume(b1 >= 0.01)  # 1 − β1 must not round to 1 (then m_2 = g_2)
    K = frac * b1
    g1 = nonzero(grad_sequence(params, seed, n=1, scale=scale)[0])
    g2 = tree_map(lambda x: -K * x, g1)
    opt = ft.cautious_adamw(**hp)
    p1, state = opt.update(params, g1, opt.init_state(params))
    p2, state = opt.update(p1, g2, state)
    for m, gi in zip(tensor_leaves(state["exp_avg"]), tensor_leaves(g2)):
        assert bool((m * gi <= 0).all()), "precondition m ⊙ g ≤ 0"
    c = 1 - hp["lr"] * hp["weight_decay"]
    for a, b in zip(tensor_leaves(p2), tensor_leaves(p1)):
        torch.testing.assert_close(a, b * c, rtol=4 * EPS64, atol=0)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@given(params=f64_trees, hp=lion_hparams(), frac=st.floats(0.0, 0.99), seed=seeds,
       scale=grad_scales)
def test_r8_cautious_lion_fully_masked_step_is_pure_weight_decay(normalization, params, hp,
                                                                 frac, seed, scale):
    """R8 for C-Lion: after step 1, m_1 = (1−β2)·g_1; g_2 = −K·g_1 with
    (1−β1)·K < β1·(1−β2) gives u_2 = sign(g_1), so u_2 ⊙ g_2 ≤ 0 and step 2 is pure decay."""
    b1, b2 = hp["betas"]
    assume(b1 >= 0.01)  # 1 − β1 must not round to 1
    K = frac * b1 * (1 - b2) / (1 - b1)
    g1 = nonzero(grad_sequence(params, seed, n=1, scale=scale)[0])
    g2 = tree_map(lambda x: -K * x, g1)
    opt = ft.cautious_lion(**hp, normalization=normalization)
    p1, state = opt.update(params, g1, opt.init_state(params))
    for m, gi in zip(tensor_leaves(state["exp_avg"]), tensor_leaves(g2)):  # precondition
        u = torch.sign(torch.lerp(m, gi, 1 - b1))
        assert bool((u * gi <= 0).all()), "precondition u ⊙ g ≤ 0"
    p2, _ = opt.update(p1, g2, state)
    c = 1 - hp["lr"] * hp["weight_decay"]
    for a, b in zip(tensor_leaves(p2), tensor_leaves(p1)):
        torch.testing.assert_close(a, b * c, rtol=4 * EPS64, atol=0)


def test_updated_momentum_decides_the_mask():
    """The mask uses the UPDATED m: g_2 = −K·g_1 with K > β1 flips m_2 to g_2's sign (φ ≡ 1, an
    AdamW step), whereas the old m_1 would have masked every element."""
    b1 = 0.5
    p = {"w": torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)}
    g1 = {"w": torch.tensor([0.3, -1.0, 2.0, -0.7], dtype=F64)}
    g2 = {"w": -2.0 * g1["w"]}
    opt = ft.cautious_adamw(lr=0.1, betas=(b1, 0.9), eps=1e-8)
    ref = ft.adamw(lr=0.1, betas=(b1, 0.9), eps=1e-8, weight_decay=0.0, fused=False)
    s, rs = opt.init_state(p), ref.init_state(p)
    q, rq = p, p
    for g in (g1, g2):
        q, s = opt.update(q, g, s)
        rq, rs = ref.update(rq, g, rs)
    torch.testing.assert_close(q["w"], rq["w"], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(q["w"], p["w"])


@pytest.mark.parametrize("name", ["cautious_adamw", "cautious_lion"])
def test_mean_normalization_floor_of_1e_3(name):
    """"mean" divides by max(mean φ, 1e-3): with 2 of 5000 elements unmasked at t = 2 (mean φ =
    4e-4) those two steps are scaled by 1000, not 2500."""
    n = 5000
    gen = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(n, generator=gen, dtype=F64)}
    g1 = {"w": torch.randn(n, generator=gen, dtype=F64).abs() + 0.1}
    keep = torch.zeros(n, dtype=torch.bool)
    keep[[7, 4000]] = True
    g2 = {"w": torch.where(keep, g1["w"], -0.01 * g1["w"])}  # masked except at `keep`
    hp = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, normalization="mean")
    if name == "cautious_adamw":
        hp["eps"] = 1e-8
    opt = getattr(ft, name)(**hp)
    p1, s = opt.update(p, g1, opt.init_state(p))
    p2, _ = opt.update(p1, g2, s)
    ref, _, _ = ref_run(name, hp, p, [g1, g2])
    assert_leaves_close([p2["w"]], ref, F64, name, [p["w"].abs()])
    c = 1 - hp["lr"] * hp["weight_decay"]
    moved = (p2["w"] - p1["w"] * c).abs() > 1e-12
    assert torch.equal(moved, keep)


@pytest.mark.parametrize("name", ["cautious_adamw", "cautious_lion"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_a_nan_gradient_entry_is_masked_like_c_optim(name, dtype):
    """C-Optim's mask ``(u * g > 0).to(dtype)`` is 0 where ``g`` is NaN, and counts as masked
    in the normalisation: the tensor's other entries step as the reference's. That entry's step
    is the reference's too: NaN for AdamW (m is NaN, NaN·0 = NaN); for Lion only its decay
    (torch's CPU ``sign(NaN)`` is 0, so u = 0)."""
    n = 4096
    gen = torch.Generator().manual_seed(1)
    p = {"w": torch.randn(n, generator=gen, dtype=dtype)}
    gs = [{"w": torch.randn(n, generator=gen, dtype=dtype)} for _ in range(2)]
    gs[1]["w"][5] = float("nan")
    hp = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, normalization="mean")
    if name == "cautious_adamw":
        hp["eps"] = 1e-6
    opt = getattr(ft, name)(**hp)
    q, s = p, opt.init_state(p)
    for g in gs:
        q, s = opt.update(q, g, s)
    ref, _, _ = ref_run(name, hp, p, gs)
    if name == "cautious_adamw":
        assert bool(q["w"][5].isnan()) and bool(ref[0][5].isnan())
    else:
        assert torch.equal(q["w"][5], ref[0][5])
    keep = torch.arange(n) != 5
    assert bool(q["w"][keep].isfinite().all())
    assert_leaves_close([q["w"][keep]], [ref[0][keep]], dtype, name, [p["w"][keep].abs()])


@pytest.mark.parametrize("name", ["cautious_adamw", "cautious_lion"])
@given(data=st.data(), params=f64_trees, seed=seeds, scale=grad_scales)
def test_cautious_update_never_opposes_the_gradient(name, data, params, seed, scale):
    """R34: ⟨p·(1−ηλ) − p_after, g⟩ ≥ 0 at every step of a random run. With λ = 0 this holds
    elementwise and exactly (rounding is monotone); with λ > 0 for the inner product up to the
    rounding of p·(1−ηλ) (4 ulp of each |p·g| term)."""
    hp = data.draw(HPARAM_STRATEGIES[name])
    grads = grad_sequence(params, seed, scale=scale)
    for wd in (0.0, hp["weight_decay"]):
        hp = {**hp, "weight_decay": wd}
        opt = getattr(ft, name)(**hp)
        state, p = opt.init_state(params), params
        c = 1 - hp["lr"] * wd
        for g in grads:
            new, state = opt.update(p, g, state)
            for a, b, gi in zip(tensor_leaves(p), tensor_leaves(new), tensor_leaves(g)):
                d = (a * c - b) * gi
                if wd == 0.0:
                    assert bool((d >= 0).all()), d
                else:
                    slack = 4 * EPS64 * float((a.abs() * gi.abs()).sum())
                    assert float(d.sum()) >= -slack
            p = new


# ==============================================================================================
# 4. Lion / SignSGD / Signum (R25, R26, R40)
# ==============================================================================================
@given(params=f64_trees, lr=lrs, beta2=lion_beta2s, wd=wds, seed=seeds, scale=grad_scales)
def test_r25_lion_with_beta1_zero_is_signsgd_bitwise(params, lr, beta2, wd, seed, scale):
    grads = grad_sequence(params, seed, scale=scale)
    a, _, _ = run_functim(ft.lion(lr=lr, betas=(0.0, beta2), weight_decay=wd), params, grads)
    b, _, _ = run_functim(ft.signsgd(lr=lr, weight_decay=wd), params, grads)
    assert_trees_equal(a, b)


@given(params=f64_trees, lr=lrs, beta=beta1s, wd=wds, seed=seeds, scale=grad_scales)
def test_r26_lion_with_equal_betas_is_signum_bitwise(params, lr, beta, wd, seed, scale):
    grads = grad_sequence(params, seed, scale=scale)
    a, sa, _ = run_functim(ft.lion(lr=lr, betas=(beta, beta), weight_decay=wd), params, grads)
    b, sb, _ = run_functim(ft.signum(lr=lr, beta=beta, weight_decay=wd), params, grads)
    assert_trees_equal(a, b)
    assert_trees_equal(sa["exp_avg"], sb["momentum"])


@pytest.mark.parametrize("name", ["lion", "signsgd", "signum"])
@given(data=st.data(), params=f64_trees, k=st.integers(-10, -1), seed=seeds, scale=grad_scales)
def test_sign_step_is_exactly_plus_minus_lr_or_zero(name, data, params, k, seed, scale):
    """R40: with λ = 0, η = 2^k and params on the grid η·Z, every step is exactly
    −η·u with u ∈ {−1, 0, 1}; zero grads at t = 1 (m = 0) give u = 0 (sign(0) = 0)."""
    hp = {**data.draw(HPARAM_STRATEGIES[name]), "lr": 2.0**k, "weight_decay": 0.0}
    lr = 2.0**k
    gen = torch.Generator().manual_seed(seed)
    p = tree_map(lambda x: torch.randint(-64, 65, x.shape, generator=gen).to(F64) * lr, params)
    grads = grad_sequence(params, seed, n=5, scale=scale)
    grads[0] = tree_map(lambda x: torch.where(x.abs() < 0.5, torch.zeros_like(x), x), grads[0])
    opt = _make(name, hp)
    state = opt.init_state(p)
    for t, g in enumerate(grads):
        new, state = opt.update(p, g, state)
        for a, b, gi in zip(tensor_leaves(p), tensor_leaves(new), tensor_leaves(g)):
            u = (b - a) / -lr
            assert bool(((u == 1) | (u == 0) | (u == -1)).all()), u
            if t == 0 or name == "signsgd":
                assert torch.equal(u, torch.sign(gi))
        p = new


@pytest.mark.parametrize("name", ["lion", "signsgd", "signum", "cautious_lion"])
@given(data=st.data(), params=f64_trees, seed=seeds)
def test_sign_step_with_weight_decay_is_lr_times_sign(name, data, params, seed):
    """(Δp + ηλp)/η ∈ {−1, 0, 1} for Lion/SignSGD/Signum, up to the rounding of p (|p|·ε/η);
    for C-Lion the nonzero values are the normalization factor instead of 1."""
    hp = data.draw(HPARAM_STRATEGIES[name])
    lr, wd = hp["lr"], hp["weight_decay"]
    grads = grad_sequence(params, seed, n=5)
    opt = _make(name, hp)
    state, p = opt.init_state(params), params
    for g in grads:
        new, state = opt.update(p, g, state)
        for a, b in zip(tensor_leaves(p), tensor_leaves(new)):
            r = (b - a * (1 - lr * wd)) / -lr
            tol = 4 * EPS64 * (a.abs() + lr) / lr
            if name == "cautious_lion":
                # φ = 0 elements: r ≈ 0; the k unmasked ones: |r| = f(k), one factor per tensor
                tol = 4 * EPS64 * (a.abs() + lr * a.numel()) / lr
                on = r.abs() > tol
                k, n = int(on.sum()), a.numel()
                f = {"mean": n / max(k, 1), "paper": n / (k + 1),
                     "eps": 1 / (k / n + 1e-8)}[hp["normalization"]]
                assert bool(((r.abs() - f).abs() <= tol)[on].all()), (r, f)
            else:
                near = torch.round(r)
                assert bool((near.abs() <= 1).all())
                assert bool(((r - near).abs() <= tol).all()), (r - near).abs().max()
        p = new


# ==============================================================================================
# 5. R29: invariance to g → c·g, c > 0
# ==============================================================================================
cs = st.sampled_from([2.0, 0.5, 1024.0, 3.7, 1e-3]) | st.floats(1e-3, 1e3)


@pytest.mark.parametrize("name", ["lion", "signsgd", "signum", "cautious_lion"])
@given(data=st.data(), params=f64_trees, c=cs, seed=seeds)
def test_r29_sign_optimizers_scale_invariant_bitwise(name, data, params, c, seed):
    hp = data.draw(HPARAM_STRATEGIES[name])
    grads = grad_sequence(params, seed)
    scaled = [tree_map(lambda x: c * x, g) for g in grads]
    a, sa, _ = run_functim(_make(name, hp), params, grads)
    b, sb, _ = run_functim(_make(name, hp), params, scaled)
    assert_trees_equal(a, b)
    for buf in _make(name, hp).buffer_names:
        expect = tree_map(lambda x: c * x, sa[buf])
        if math.log2(c).is_integer():
            assert_trees_equal(sb[buf], expect)
        else:
            assert_leaves_close(tensor_leaves(sb[buf]), tensor_leaves(expect), F64, buf,
                                grad_bound(grads, c))


@pytest.mark.parametrize("name", ["nadamw", "cautious_adamw"])
@given(data=st.data(), params=f64_trees, c=cs, seed=seeds)
def test_r29_adam_family_with_eps_zero_scale_invariant(name, data, params, c, seed):
    hp = data.draw(HPARAM_STRATEGIES[name] if name == "nadamw"
                   else cautious_adamw_hparams(normalizations=("mean", "paper")))
    hp = {**hp, "eps": 0.0}
    grads = nonzero(grad_sequence(params, seed))
    scaled = [tree_map(lambda x: c * x, g) for g in grads]
    a, _, sa = run_functim(_make(name, hp), params, grads)
    b, _, sb = run_functim(_make(name, hp), params, scaled)
    assert_leaves_close(tensor_leaves(b), tensor_leaves(a), F64, f"{name} c={c}",
                        scales_max(sa, sb))


# ==============================================================================================
# 6. Engine contract: pure vs donate, resume, validation
# ==============================================================================================
@pytest.mark.parametrize("name", list(HPARAM_STRATEGIES))
@given(data=st.data(), params=pytrees(dtypes=(torch.float32, torch.float64, torch.bfloat16)),
       seed=seeds)
def test_pure_and_donate_bitwise_equal_and_pure_touches_nothing(name, data, params, seed):
    """Pure mode never writes its inputs; donate=True gives bitwise the same results; grads are
    never written in either mode."""
    opt = _make(name, data.draw(HPARAM_STRATEGIES[name]))
    grads = grad_sequence(params, seed, n=5)
    p_pure, s_pure = params, opt.init_state(params)
    p_don, s_don = clone_tree(params), opt.init_state(params)
    for g in grads:
        inputs = (p_pure, g, s_pure)
        snapshot = clone_tree(inputs)
        p_pure, s_pure = opt.update(p_pure, g, s_pure)
        assert_trees_equal(inputs, snapshot)
        s_pure = clone_tree(s_pure)  # so a pure step that aliases its input cannot hide here
        g_before = clone_tree(g)
        p_don, s_don = opt.update(p_don, g, s_don, donate=True)
        assert_trees_equal(g, g_before)
        assert_trees_equal(p_pure, p_don)
        assert_trees_equal(s_pure, s_don)


@pytest.mark.parametrize("name", list(HPARAM_STRATEGIES))
def test_pure_update_leaves_params_and_state_untouched(name):
    """Minimal deterministic check of the pure contract, with every optimizer's defaults."""
    opt = getattr(ft, name)()
    params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5)}
    grads = [{"w": torch.tensor([0.3, -0.2]), "b": torch.tensor(-1.0)}] * 2
    state = opt.init_state(params)
    for g in grads:
        inputs = (params, g, state)
        snapshot = clone_tree(inputs)
        params, state = opt.update(params, g, state)
        assert_trees_equal(inputs, snapshot)


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donate"])
@given(params=pytrees(dtypes=(torch.float32, torch.float64)), spec=any_optimizer, seed=seeds)
def test_save_resume_is_bitwise(params, spec, seed, donate):
    opt = _make(*spec)
    grads = grad_sequence(params, seed, n=6)

    def run(p, s, gs):
        for g in gs:
            p, s = opt.update(p, g, s, donate=donate)
        return p, s

    full_p, full_s = run(clone_tree(params), opt.init_state(params), grads)
    p, s = run(clone_tree(params), opt.init_state(params), grads[:3])
    ck = _save_load({"params": p, "state": s})
    assert_trees_equal(ck, {"params": p, "state": s})
    p, s = run(ck["params"], ck["state"], grads[3:])
    assert_trees_equal(p, full_p)
    assert_trees_equal(s, full_s)
    assert int(s["step"]) == 6


BAD = [
    ("lion-lr", lambda: ft.lion(lr=-1e-4)),
    ("lion-beta1-one", lambda: ft.lion(betas=(1.0, 0.99))),
    ("lion-beta2-negative", lambda: ft.lion(betas=(0.9, -0.1))),
    ("lion-wd", lambda: ft.lion(weight_decay=-0.1)),
    ("signsgd-lr", lambda: ft.signsgd(lr=-1e-3)),
    ("signsgd-wd", lambda: ft.signsgd(weight_decay=-0.1)),
    ("signum-lr", lambda: ft.signum(lr=-1e-3)),
    ("signum-beta-one", lambda: ft.signum(beta=1.0)),
    ("signum-beta-negative", lambda: ft.signum(beta=-0.1)),
    ("nadamw-lr", lambda: ft.nadamw(lr=-1e-3)),
    ("nadamw-beta1-one", lambda: ft.nadamw(betas=(1.0, 0.999))),
    ("nadamw-beta2-big", lambda: ft.nadamw(betas=(0.9, 1.5))),
    ("nadamw-eps", lambda: ft.nadamw(eps=-1e-8)),
    ("nadamw-wd", lambda: ft.nadamw(weight_decay=-0.1)),
    ("nadamw-variant", lambda: ft.nadamw(variant="keras")),
    ("nadamw-momentum-decay", lambda: ft.nadamw(variant="torch", momentum_decay=-1.0)),
    ("cautious-adamw-lr", lambda: ft.cautious_adamw(lr=-1e-3)),
    ("cautious-adamw-beta", lambda: ft.cautious_adamw(betas=(0.9, 1.0))),
    ("cautious-adamw-eps", lambda: ft.cautious_adamw(eps=-1.0)),
    ("cautious-adamw-normalization", lambda: ft.cautious_adamw(normalization="l2")),
    ("cautious-lion-lr", lambda: ft.cautious_lion(lr=-1e-4)),
    ("cautious-lion-beta", lambda: ft.cautious_lion(betas=(-0.5, 0.98))),
    ("cautious-lion-normalization", lambda: ft.cautious_lion(normalization="none")),
]


@pytest.mark.parametrize("make", [m for _, m in BAD], ids=[i for i, _ in BAD])
def test_bad_hyperparameters_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


# ==============================================================================================
# 7. torch.func.vmap and torch.compile
# ==============================================================================================
N_MODELS = 4


def _stack(trees):
    return optree.tree_map(lambda *xs: torch.stack(xs), *trees)


def _unstack(tree, i):
    return optree.tree_map(lambda x: x[i], tree)


def _random_params(gen, lead=()):
    return {"w": torch.randn(*lead, 3, 2, generator=gen, dtype=F64),
            "b": torch.randn(*lead, 2, generator=gen, dtype=F64),
            "s": torch.randn(*lead, 1, generator=gen, dtype=F64)}


VMAP_OPTIMIZERS = {
    "lion": lambda: ft.lion(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
    "nadamw-optax": lambda: ft.nadamw(lr=1e-2, weight_decay=0.1),
    "nadamw-torch": lambda: ft.nadamw(lr=1e-2, weight_decay=0.1, variant="torch",
                                      momentum_decay=0.05),
    "nadamw-timm": lambda: ft.nadamw(lr=1e-2, weight_decay=0.1, variant="timm"),
}


@pytest.mark.parametrize("state_from", ["vmap_init", "stacked_states"])
@pytest.mark.parametrize("name", list(VMAP_OPTIMIZERS))
def test_vmap_update_over_ensemble_equals_loop(name, state_from):
    opt = VMAP_OPTIMIZERS[name]()
    gen = torch.Generator().manual_seed(0)
    stacked = _random_params(gen, lead=(N_MODELS,))
    grads_seq = [_random_params(gen, lead=(N_MODELS,)) for _ in range(5)]
    lrs_ = torch.tensor([1e-3, 1e-2, 3e-2, 0.1], dtype=F64)
    models = [_unstack(stacked, i) for i in range(N_MODELS)]
    states = [ft.set_hyperparams(opt.init_state(m), lr=lrs_[i]) for i, m in enumerate(models)]
    if state_from == "vmap_init":
        v_state = ft.set_hyperparams(torch.func.vmap(opt.init_state)(stacked), lr=lrs_)
    else:
        v_state = _stack(states)
    v_params, v_update = stacked, torch.func.vmap(opt.update)
    for grads in grads_seq:
        v_params, v_state = v_update(v_params, grads, v_state)
        for i in range(N_MODELS):
            models[i], states[i] = opt.update(models[i], _unstack(grads, i), states[i])
    loop_params, loop_state = _stack(models), _stack(states)
    assert optree.tree_structure(v_state) == optree.tree_structure(loop_state)
    for a, b in zip(optree.tree_leaves(v_params), optree.tree_leaves(loop_params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(optree.tree_leaves(v_state), optree.tree_leaves(loop_state)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_compiled_lion_does_not_recompile_when_lr_changes():
    """Same counting as tests/test_torch_func.py: one unique graph, frame_count frozen after the
    first call, and dynamo's error_on_recompile silent while the lr changes."""
    opt = ft.lion(lr=1e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    grads = [optree.tree_map(lambda p: torch.randn(p.shape, generator=gen), params)
             for _ in range(3)]
    torch._dynamo.reset()
    counters.clear()
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
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert cnt.frame_count == first
    assert cnt.frame_count in (1, 2)  # 2 only from the cold-cache restart (test_torch_func.py)
    assert int(s_c["step"]) == 3


# ==============================================================================================
# 8. torch.optim adapters ≡ functional, bitwise
# ==============================================================================================
ADAPTERS = [
    ("Lion", "lion", dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)),
    ("SignSGD", "signsgd", dict(lr=1e-3, weight_decay=0.1)),
    ("Signum", "signum", dict(lr=1e-3, beta=0.9, weight_decay=0.1)),
    ("NAdamW", "nadamw", dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)),
    ("NAdamW", "nadamw", dict(lr=1e-2, weight_decay=0.1, variant="torch", momentum_decay=0.1)),
    ("NAdamW", "nadamw", dict(lr=1e-2, weight_decay=0.0, variant="timm")),
    ("CautiousAdamW", "cautious_adamw", dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6,
                                             weight_decay=0.1)),
    ("CautiousAdamW", "cautious_adamw", dict(lr=1e-2, normalization="paper")),
    ("CautiousAdamW", "cautious_adamw", dict(lr=1e-2, weight_decay=0.1, normalization="eps")),
    ("CautiousLion", "cautious_lion", dict(lr=1e-3, betas=(0.95, 0.98), weight_decay=0.1)),
    ("CautiousLion", "cautious_lion", dict(lr=1e-3, normalization="paper")),
    ("CautiousLion", "cautious_lion", dict(lr=1e-3, weight_decay=0.1, normalization="eps")),
]


@pytest.mark.parametrize("cls_name, fname, kw", ADAPTERS,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(ADAPTERS)])
def test_adapter_equals_functional_bitwise(cls_name, fname, kw):
    import functim.adapters as adapters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    fopt = getattr(ft, fname)(**kw)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = fopt.init_state(params)
    opt = getattr(adapters, cls_name)(model.named_parameters(), **kw)
    gen = torch.Generator().manual_seed(123)
    for _ in range(5):
        x = torch.randn(8, 6, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        params, state = fopt.update(params, grads, state)
    for n, p in model.named_parameters():
        assert torch.equal(params[n], p.detach()), n
        for b in fopt.buffer_names:
            assert torch.equal(state[b][n], opt.state[p][b]), (n, b)


@pytest.mark.parametrize("make, decays", [
    (lambda: ft.lion(), False), (lambda: ft.lion(weight_decay=0.1), True),
    (lambda: ft.cautious_adamw(), False), (lambda: ft.signsgd(), False),
    (lambda: ft.adamw(weight_decay=0.0, fused=False), False),
    (lambda: ft.adamw(fused=False), True),
], ids=["lion", "lion-wd", "cautious_adamw", "signsgd", "adamw-wd0", "adamw"])
def test_zero_weight_decay_takes_no_pass_over_the_params(monkeypatch, make, decays):
    """A functional update on CPU reads its hyperparameters on the host (no sync there): a
    weight decay of exactly 0 skips the ``p·(1 − η·λ)`` pass, as in the torch.optim adapter."""
    from functim.listops import ListOps

    scaled = []
    real = ListOps._run

    def spy(self, name, xs, *args, **kw):
        if name == "mul" and xs and xs[0] is params["w"]:
            scaled.append(name)
        return real(self, name, xs, *args, **kw)

    monkeypatch.setattr(ListOps, "_run", spy)
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(8, 8, generator=gen)}
    grads = {"w": torch.randn(8, 8, generator=gen)}
    opt = make()
    opt.update(params, grads, opt.init_state(params), donate=True)
    assert bool(scaled) is decays
