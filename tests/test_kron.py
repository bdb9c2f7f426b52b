"""Kron / PSGD (docs/algorithms.md section 9): reductions R19, R20, R39, the factor maths against
explicit matrices, the update schedule, the factor layout, a float64 golden run against a
plain-torch transcription of the kron_torch reference, dtypes, state, and the torch.optim adapter.

The transcription (:func:`reference_kron`) is written from the update rule with explicit
matrices (mode products by ``tensordot``, ``Q^{-T}`` by ``torch.linalg.inv``), not from functim's
code. It draws the probes exactly as functim documents: one ``randn`` of the merged shape per leaf
with a gradient, in tree order, from a CPU ``torch.Generator`` seeded with ``seed``, on every
preconditioner-update step. It adds the probe damping to a copy (functim's documented choice; the
reference adds it in place).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from conftest import assert_trees_equal, clone_tree, tensor_leaves, tree_map
from functim.adapters import Kron
from hypothesis import given, settings
from hypothesis import strategies as st

import functim as ft
from functim.linalg import (
    balance_factors,
    kron_apply,
    kron_precondition,
    kron_solve_transposed,
    norm_lower_bound,
    update_factors,
)
from functim.optimizers.kron import (
    diagonal_dims,
    kron,
    precond_update_prob_schedule,
    update_decision,
)

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: with several intra-op threads on a loaded machine each parallel op (triu,
    reductions) can wait milliseconds for a thread; the maths is the same with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
seeds = st.integers(0, 2**31 - 1)
shapes_st = st.lists(st.integers(1, 5), max_size=3).map(tuple)


def randn(shape, gen, dtype=F64):
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype)


def mixed_params(gen, dtype=F64):
    """2-D matrices, a bias, a 0-d scalar, a 3-D tensor, a 4-D conv kernel, and a None leaf."""
    shapes = {"w": (5, 4), "b": (4,), "s": (), "t": (3, 2, 2), "conv": (4, 2, 3, 3)}
    p = {k: randn(s, gen, dtype) for k, s in shapes.items()}
    p["frozen"] = None
    return p


def grad_seq(params, gen, n, dtype=None):
    scales = (0.1, 1.0, 10.0)
    return [tree_map(lambda p, s=scales[t % 3]: randn(p.shape, gen, dtype or p.dtype) * s, params)
            for t in range(n)]


def run(opt, params, grads, *, donate=False, state=None):
    state = opt.init_state(params) if state is None else state
    for g in grads:
        params, state = opt.update(params, g, state, donate=donate)
    return params, state


# -- an independent float64 transcription of kron_torch's update rule -----------------------------
def ref_merge(shape, merge):
    if not merge or len(shape) <= 2:
        return tuple(shape) if shape else (1,)
    s1 = (math.prod(shape[:-1]), shape[-1])
    s2 = (shape[0], math.prod(shape[1:]))
    return s1 if np.diff(s1)[0] <= np.diff(s2)[0] else s2


def ref_diag(shape, max_size, min_ndim, mode):
    k = len(shape)
    flags = [False] * k
    if mode == "all_diag":
        flags = [True] * k
    elif mode in ("one_diag", "smart_one_diag"):
        order = np.argsort(np.array(shape), kind="stable")[::-1]
        srt = sorted(shape)
        if mode == "one_diag" or (k > 1 and srt[-1] > srt[-2]):
            flags[order[0]] = True
    return [s == 1 or s > max_size or k < min_ndim or f for s, f in zip(shape, flags)]


def mode_mul(x, m, i):
    """``x ×_i m``: ``y[.., a, ..] = Σ_b m[a, b] x[.., b, ..]``."""
    return torch.movedim(torch.tensordot(m, x, dims=([1], [i])), 0, i)


def unfold(x, i):
    return torch.movedim(x, i, 0).reshape(x.shape[i], -1)


def ref_lb(s):
    mx = s.abs().max()
    a = s / mx
    j = int(torch.argmax((a * a).sum(0)))
    x = a[:, j] @ a
    x = x / x.norm()
    return (a @ x).norm() * mx


def reference_kron(params, grads, *, lr=3e-4, b1=0.9, weight_decay=0.0, prob=None,
                   max_size_triangular=8192, min_ndim_triangular=2, memory_save_mode=None,
                   momentum_into_precond_update=True, precond_lr=0.1, precond_init_scale=1.0,
                   merge_dims=True, balance_every=100, seed=42):
    """float64; every leaf gets a gradient at every step (the tree step is the leaf step)."""
    prob = precond_update_prob_schedule() if prob is None else prob
    gen = torch.Generator().manual_seed(seed)
    names = [k for k in sorted(params) if params[k] is not None]
    p = {k: params[k].clone() for k in names}
    st_ = {}
    for k in names:
        shape = ref_merge(tuple(p[k].shape), merge_dims)
        diag = ref_diag(shape, max_size_triangular, min_ndim_triangular, memory_save_mode)
        sc = precond_init_scale ** (1 / len(shape))
        q = [sc * (torch.ones(d, dtype=F64) if dg else torch.eye(d, dtype=F64))
             for d, dg in zip(shape, diag)]
        st_[k] = {"shape": shape, "m": torch.zeros(shape, dtype=F64), "Q": q}
    n = ctr = n_upd = 0
    log = []
    for t, gt in enumerate(grads, start=1):
        pr = prob(torch.tensor(float(n), dtype=F32)) if callable(prob) else prob
        ctr += 1
        do = float(ctr) >= float(np.float32(1 / np.float32(pr))) if float(pr) > 0 else False
        if do:
            ctr = 0
        n += 1
        bal = do and balance_every > 0 and (n_upd + 1) % balance_every == 0
        n_upd += int(do)
        log.append((do, bal))
        for k in names:
            s = st_[k]
            G = gt[k].to(F64).reshape(s["shape"])
            s["m"] = b1 * s["m"] + (1 - b1) * G
            mh = s["m"] / (1 - b1**t)
            Q = s["Q"]
            if bal and len(Q) > 1:
                norms = [q.abs().max() for q in Q]
                gm = math.prod(norms) ** (1 / len(Q))
                Q = [q * (gm / nq) for q, nq in zip(Q, norms)]
            if do:
                V = torch.randn(s["shape"], generator=gen, dtype=F64)
                Gs = mh if momentum_into_precond_update else G
                Gs = Gs + math.sqrt(torch.finfo(F32).eps) * Gs.abs().mean() * V
                A, B = Gs, V
                for i, q in enumerate(Q):
                    A = mode_mul(A, torch.diag(q) if q.ndim == 1 else q, i)
                    B = mode_mul(B, torch.diag(1 / q) if q.ndim == 1 else torch.linalg.inv(q).T,
                                 i)
                newQ = []
                for i, q in enumerate(Q):
                    T1 = unfold(A, i) @ unfold(A, i).T
                    T2 = unfold(B, i) @ unfold(B, i).T
                    if q.ndim == 1:
                        T1, T2 = torch.diag(T1), torch.diag(T2)
                        newQ.append(q - precond_lr * (T1 - T2) * q / (T1 + T2).abs().max())
                    else:
                        newQ.append(q - precond_lr * torch.triu(T1 - T2) @ q / ref_lb(T1 + T2))
                Q = newQ
            s["Q"] = Q
            U = mh
            for i, q in enumerate(Q):
                U = mode_mul(U, torch.diag(q * q) if q.ndim == 1 else q.T @ q, i)
            rms = U.square().mean().sqrt()
            U = U * min(1.0, 1.1 / (float(rms) + 1e-12))
            U = U.reshape(p[k].shape)
            if p[k].ndim >= 2:
                U = U + weight_decay * p[k]
            p[k] = p[k] - lr * U
    out = {k: (p[k] if k in p else None) for k in params}
    return out, {k: st_[k]["Q"] for k in names}, log


def assert_close_tree(a, b, rtol, atol):
    for x, y in zip(tensor_leaves(a), tensor_leaves(b), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# -- the factor maths against explicit matrices -----------------------------------------------
def tri_factor(d, gen, dtype=F64):
    return (torch.eye(d, dtype=F64) + 0.3 * torch.triu(randn((d, d), gen))).to(dtype)


@st.composite
def factors_and_tensor(draw, min_ndim=1):
    shape = draw(st.lists(st.integers(1, 5), min_size=min_ndim, max_size=3))
    gen = torch.Generator().manual_seed(draw(seeds))
    diag = [draw(st.booleans()) for _ in shape]
    q = [(1 + randn(d, gen).abs()) if dg else tri_factor(d, gen) for d, dg in zip(shape, diag)]
    return q, randn(tuple(shape), gen)


def dense(q):
    return torch.diag(q) if q.ndim == 1 else q


def explicit_kron(mats):
    out = torch.ones(1, 1, dtype=F64)
    for m in mats:
        out = torch.kron(out, m)
    return out


@given(factors_and_tensor())
def test_mode_products_equal_the_explicit_kronecker_matrices(qx):
    """vec(X ×_i M_i) = (⊗_i M_i)·vec(X) (row-major vec) for M_i = Q_i, Q_i^{-T}, Q_iᵀQ_i."""
    q, x = qx
    cases = [(kron_apply, [dense(f) for f in q]),
             (kron_solve_transposed, [torch.linalg.inv(dense(f)).T for f in q]),
             (kron_precondition, [dense(f).T @ dense(f) for f in q])]
    for fn, mats in cases:
        want = (explicit_kron(mats) @ x.reshape(-1)).reshape(x.shape)
        torch.testing.assert_close(fn(q, x), want, rtol=1e-10, atol=1e-10)


@given(seeds, st.integers(1, 6), st.integers(1, 6), st.booleans(), st.booleans())
def test_precond_grad_2d_is_q1tq1_g_q2tq2(seed, m, n, diag1, diag2):
    """R39: P·G = Q1ᵀQ1·G·Q2ᵀQ2 (a diagonal factor is diag(q))."""
    gen = torch.Generator().manual_seed(seed)
    q1 = (1 + randn(m, gen).abs()) if diag1 else tri_factor(m, gen)
    q2 = (1 + randn(n, gen).abs()) if diag2 else tri_factor(n, gen)
    g = randn((m, n), gen)
    d1, d2 = dense(q1), dense(q2)
    torch.testing.assert_close(kron_precondition([q1, q2], g), d1.T @ d1 @ g @ d2.T @ d2,
                               rtol=1e-12, atol=1e-12)
    g32 = g.float()
    want = (d1.T @ d1 @ g @ d2.T @ d2).float()
    torch.testing.assert_close(kron_precondition([q1.float(), q2.float()], g32), want,
                               rtol=1e-5, atol=1e-5)


@given(seeds, st.integers(1, 8))
def test_norm_lower_bound_bounds_the_spectral_norm(seed, d):
    gen = torch.Generator().manual_seed(seed)
    a = randn((d, d + 2), gen)
    s = a @ a.T  # PSD, like T1 + T2
    sigma = torch.linalg.matrix_norm(s, 2)
    lb = norm_lower_bound(s)
    assert float(lb) <= float(sigma) * (1 + 1e-12)
    assert float(lb) >= float(sigma) / math.sqrt(d) * (1 - 1e-12)
    torch.testing.assert_close(lb, ref_lb(s), rtol=1e-13, atol=0)


@given(seeds, st.lists(st.integers(1, 5), min_size=2, max_size=3),
       st.lists(st.floats(-6, 6), min_size=3, max_size=3))
def test_r20_balancing_preserves_the_kronecker_product(seed, shape, log_scales):
    gen = torch.Generator().manual_seed(seed)
    q = [tri_factor(d, gen) * 10.0**s if i % 2 == 0 else (1 + randn(d, gen).abs()) * 10.0**s
         for i, (d, s) in enumerate(zip(shape, log_scales))]
    # each factor takes two roundings (its float64-computed scale, then the product): ≤ 2k ulps
    for dtype, tol in ((F64, 1e-13), (F32, 2 * len(shape) * 2.0**-24 * 1.01)):
        qd = [f.to(dtype) for f in q]
        b = balance_factors(qd)
        before = explicit_kron([dense(f).double() for f in qd])
        after = explicit_kron([dense(f).double() for f in b])
        rel = (after - before).abs().max() / before.abs().max()
        assert float(rel) <= tol
        norms = torch.stack([f.abs().max() for f in b]).double()
        torch.testing.assert_close(norms, norms.mean().expand_as(norms), rtol=1e-5, atol=0)


def test_update_factors_leaves_its_inputs_alone_and_keeps_triangles():
    gen = torch.Generator().manual_seed(3)
    q = [tri_factor(4, gen), 1 + randn(3, gen).abs()]
    g, v = randn((4, 3), gen), randn((4, 3), gen)
    copies = [x.clone() for x in (*q, g, v)]
    new = update_factors(q, g, v, torch.tensor(0.1, dtype=F64))
    for a, b in zip((*q, g, v), copies):
        assert torch.equal(a, b)
    assert torch.equal(new[0], torch.triu(new[0])) and new[1].shape == (3,)
    # S = 0 (zero gradient and zero probe) is a no-op, not a NaN
    zero = update_factors(q, torch.zeros(4, 3, dtype=F64), torch.zeros(4, 3, dtype=F64), 0.1)
    for a, b in zip(zero, q):
        assert torch.equal(a, b)


# -- R19 / R20 on the optimizer ------------------------------------------------------------------
@given(seeds, st.lists(shapes_st, min_size=1, max_size=3), st.floats(1e-3, 0.1),
       st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.0, 0.1, 0.7]),
       st.sampled_from([F64, F32]), st.sampled_from([0.01, 1.0, 30.0]))
def test_r19_without_preconditioner_updates_it_is_clipped_ema_sgd(seed, shapes, lr, b1, wd,
                                                                   dtype, gscale):
    """R19: probability 0 and init scale 1 ⇒ Δp = −η·(clip_1.1(m̂) + λ·p·[ndim ≥ 2])."""
    gen = torch.Generator().manual_seed(seed)
    params = {f"p{i}": randn(s, gen, dtype) for i, s in enumerate(shapes)}
    opt = kron(lr=lr, b1=b1, weight_decay=wd, preconditioner_update_probability=0.0)
    state = opt.init_state(params)
    m = {k: torch.zeros(v.shape, dtype=F64) for k, v in params.items()}
    p = params
    for t in range(1, 5):
        g = {k: randn(v.shape, gen, dtype) * gscale for k, v in params.items()}
        new, state = opt.update(p, g, state)
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k].double()
            mh = m[k] / (1 - b1**t)
            u = mh * min(1.0, 1.1 / (float(mh.square().mean().sqrt()) + 1e-12))
            if p[k].ndim >= 2:
                u = u + wd * p[k].double()
            want = p[k].double() - lr * u
            tol = 1e-12 if dtype == F64 else 2e-6
            torch.testing.assert_close(new[k].double(), want, rtol=tol, atol=tol)
        p = new
    assert int(state["precond_updates"]) == 0


@settings(max_examples=10)
@given(seeds, st.lists(st.integers(1, 6), min_size=1, max_size=3), st.booleans(),
       st.sampled_from([None, "smart_one_diag", "one_diag"]), st.sampled_from([1, 3, 1000]))
def test_r20_triangular_factors_and_the_rms_clip_over_many_updates(seed, shape, merge, mode,
                                                                   balance_every):
    """R20: triangular factors stay upper-triangular after every update (with balancing)
    and RMS(U) ≤ 1.1·(1+1e-6) at every step (λ = 0, so U = −Δp/η)."""
    gen = torch.Generator().manual_seed(seed)
    params = {"x": randn(tuple(shape), gen)}
    lr = 0.05
    opt = kron(lr=lr, merge_dims=merge, memory_save_mode=mode, balance_every=balance_every,
               precond_lr=0.5, preconditioner_update_probability=1.0)
    state = opt.init_state(params)
    p = params
    for g in grad_seq(params, gen, 25):
        new, state = opt.update(p, g, state)
        u = (p["x"] - new["x"]) / lr
        assert float(u.square().mean().sqrt()) <= 1.1 * (1 + 1e-6)
        for q in state["Q"]["x"]:
            assert q.ndim == 1 or torch.equal(q, torch.triu(q))
            assert torch.isfinite(q).all()
        p = new
    assert int(state["precond_updates"]) == 25


# -- the schedule ---------------------------------------------------------------------------------
def test_default_schedule_values():
    sched = precond_update_prob_schedule()
    got = [float(sched(torch.tensor(float(n)))) for n in (0, 500, 1000, 2000, 3000, 4000, 9000)]
    want = [1.0, 1.0, 0.607, 0.223, 0.082, 0.030, 0.03]
    for g, w in zip(got, want):
        assert abs(g - w) < 5e-4, (got, want)
    assert sched(torch.tensor(1000.0)).dtype == F32


def _transcribed_decisions(prob_of_n, steps):
    """The reference's counter rule in numpy float32: ctr += 1; update iff ctr ≥ 1/prob."""
    out, ctr = [], 0
    for n in range(steps):
        pr = np.float32(prob_of_n(n))
        ctr += 1
        do = bool(pr > 0) and np.float32(ctr) >= np.float32(1) / pr
        if do:
            ctr = 0
        out.append(do)
    return out


def test_deterministic_period_of_the_default_schedule():
    sched = precond_update_prob_schedule()
    ours, ctr = [], 0
    for n in range(6000):
        do, ctr = update_decision(sched, n, ctr)
        ours.append(do)
    np_prob = lambda n: np.clip(np.float32(1.0) * np.exp(np.float32(-0.001) * (  # noqa: E731
        np.float32(n) - np.float32(500))), np.float32(0.03), np.float32(1.0))
    assert ours == _transcribed_decisions(np_prob, 6000)
    assert all(ours[:501])                       # every step while the probability is 1
    gaps = np.diff(np.flatnonzero(ours[4500:]))
    assert set(gaps.tolist()) == {34}           # 1/0.03 = 33.3 → every 34th step


@pytest.mark.parametrize("prob, period", [(1.0, 1), (0.5, 2), (0.3, 4), (0.25, 4), (0.1, 10)])
def test_constant_probability_is_a_period(prob, period):
    ours, ctr = [], 0
    for n in range(40):
        do, ctr = update_decision(prob, n, ctr)
        ours.append(do)
    assert [i + 1 for i, d in enumerate(ours) if d] == list(range(period, 41, period))


def test_the_optimizer_follows_the_schedule_and_balances_deterministically():
    """Q changes exactly on the update steps; balancing before every 3rd update; the counters
    are CPU tensors."""
    sched = precond_update_prob_schedule(min_prob=0.2, decay=0.05, flat_start=5)
    want = _transcribed_decisions(lambda n: float(sched(torch.tensor(float(n)))), 60)
    gen = torch.Generator().manual_seed(0)
    params = {"w": randn((4, 3), gen)}
    opt = kron(preconditioner_update_probability=sched, balance_every=3)
    state = opt.init_state(params)
    got = []
    for g in grad_seq(params, gen, 60):
        before = state["Q"]["w"]
        params, state = opt.update(params, g, state)
        got.append(not all(torch.equal(a, b) for a, b in zip(before, state["Q"]["w"])))
        for k in ("prob_step", "update_counter", "precond_updates", "rng"):
            assert state[k].device.type == "cpu"
    assert got == want and int(state["precond_updates"]) == sum(want)
    assert int(state["prob_step"]) == 60


def test_probability_callable_is_checked():
    params = {"w": torch.ones(2, 2)}
    opt = kron(preconditioner_update_probability=lambda n: 1.5)
    state = opt.init_state(params)
    with pytest.raises(ValueError, match="preconditioner_update_probability"):
        opt.update(params, {"w": torch.ones(2, 2)}, state)
    assert int(state["prob_step"]) == 0
    with pytest.raises(ValueError):
        kron(preconditioner_update_probability=1.5)


# -- factor layout --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, kw, want", [
    ((5, 4), {}, (False, False)),
    ((5, 4), {"memory_save_mode": "one_diag"}, (True, False)),
    ((4, 4), {"memory_save_mode": "one_diag"}, (False, True)),          # ties: the last dim
    ((4, 4), {"memory_save_mode": "smart_one_diag"}, (False, False)),   # no strict largest
    ((4, 6), {"memory_save_mode": "smart_one_diag"}, (False, True)),
    ((5, 4), {"memory_save_mode": "all_diag"}, (True, True)),
    ((5, 4), {"max_size_triangular": 4}, (True, False)),
    ((1, 4), {}, (True, False)),                                        # size-1 dims
    ((7,), {}, (True,)),                                                # 1-D: ndim < 2
    ((3, 4, 5), {"min_ndim_triangular": 4}, (True, True, True)),
    ((3, 4, 5), {"memory_save_mode": "one_diag"}, (False, False, True)),
])
def test_diagonal_or_triangular(shape, kw, want):
    args = {"max_size_triangular": 8192, "min_ndim_triangular": 2, "memory_save_mode": None, **kw}
    assert diagonal_dims(shape, **args) == want
    assert tuple(ref_diag(shape, args["max_size_triangular"], args["min_ndim_triangular"],
                          args["memory_save_mode"])) == want
    opt = kron(merge_dims=False, **kw)
    q = opt.init_state({"x": torch.zeros(shape)})["Q"]["x"]
    assert tuple(f.ndim == 1 for f in q) == want
    assert all(torch.equal(f, torch.ones(f.shape[0]) if f.ndim == 1 else torch.eye(f.shape[0]))
               for f in q)


@pytest.mark.parametrize("shape, merged", [
    ((64, 32, 3, 3), (6144, 3)), ((3, 2, 2), (6, 2)), ((2, 3, 4), (6, 4)),
    ((8, 16, 2), (128, 2)), ((5, 4), (5, 4)), ((7,), (7,)), ((), (1,))])
def test_merged_shapes_and_factor_shapes(shape, merged):
    opt = kron(max_size_triangular=100)
    q = opt.init_state({"x": torch.zeros(shape)})["Q"]["x"]
    assert opt.plan(shape).merged_shape == merged == ref_merge(shape, True)
    assert [tuple(f.shape) for f in q] == [(d,) if (d > 100 or d == 1 or len(merged) < 2)
                                           else (d, d) for d in merged]
    q = kron(merge_dims=False).init_state({"x": torch.zeros(shape)})["Q"]["x"]
    assert len(q) == max(len(shape), 1)


def test_init_scale_is_split_over_the_factors():
    q = kron(precond_init_scale=8.0).init_state({"x": torch.zeros(3, 4, 5)})["Q"]["x"]
    assert [tuple(f.shape) for f in q] == [(12, 12), (5, 5)]  # merged to (12, 5)
    torch.testing.assert_close(q[0], 8.0 ** 0.5 * torch.eye(12))
    torch.testing.assert_close(q[0][0, 0] * q[1][0, 0], torch.tensor(8.0))


def test_data_derived_init_scale_is_psgd_rule():
    """precond_init_scale=None: s = (max_leaf mean|g|⁴ + 1e-36)^(-1/8) on the first step;
    factor i becomes s^(1/k)·I."""
    gen = torch.Generator().manual_seed(5)
    params = {"w": randn((4, 3), gen), "b": randn((3,), gen)}
    g = {"w": randn((4, 3), gen) * 3, "b": randn((3,), gen)}
    opt = kron(precond_init_scale=None, preconditioner_update_probability=0.0)
    _, state = opt.update(params, g, opt.init_state(params))
    s = max(float(x.abs().pow(4).mean()) for x in g.values()) ** (-1 / 8)
    torch.testing.assert_close(state["Q"]["w"][0], s ** 0.5 * torch.eye(4, dtype=F64))
    torch.testing.assert_close(state["Q"]["w"][1], s ** 0.5 * torch.eye(3, dtype=F64))
    torch.testing.assert_close(state["Q"]["b"][0], s * torch.ones(3, dtype=F64))
    # only the first step rescales
    _, state2 = opt.update(params, g, state)
    assert all(torch.equal(a, b) for a, b in zip(state["Q"]["w"], state2["Q"]["w"]))


# -- golden: 20 steps against the float64 transcription -----------------------------------------
@settings(max_examples=6)
@given(seeds, st.sampled_from([None, "smart_one_diag", "one_diag", "all_diag"]),
       st.booleans(), st.booleans(), st.sampled_from([1.0, 0.5, 0.3, None]),
       st.sampled_from([0, 2, 100]), st.sampled_from([0.0, 0.1]), st.sampled_from([1.0, 0.3]))
def test_golden_float64_against_the_reference_transcription(seed, mode, momentum_into, merge,
                                                            prob, balance_every, wd, init):
    gen = torch.Generator().manual_seed(seed)
    params = mixed_params(gen)
    grads = grad_seq(params, gen, 20)
    kw = dict(lr=0.02, b1=0.9, weight_decay=wd, memory_save_mode=mode, merge_dims=merge,
              momentum_into_precond_update=momentum_into, precond_lr=0.2,
              precond_init_scale=init, balance_every=balance_every, max_size_triangular=5)
    new, state = run(kron(preconditioner_update_probability=prob, **kw), params, grads)
    want, want_q, log = reference_kron(params, grads, prob=prob, **kw)
    assert_close_tree(new, want, rtol=1e-10, atol=1e-12)
    for k, qs in want_q.items():
        for a, b in zip(state["Q"][k], qs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert int(state["precond_updates"]) == sum(d for d, _ in log)


def test_golden_annealed_schedule_with_balancing():
    """150 steps of a schedule with kron_torch's form (a flat start of 20 steps, then periods
    growing to 5), balancing before every 8th update. (The default schedule's decisions are
    checked over 6000 steps in test_deterministic_period_of_the_default_schedule.)"""
    gen = torch.Generator().manual_seed(11)
    params = {"w": randn((3, 2), gen), "b": randn((2,), gen), "t": randn((2, 2, 2), gen)}
    grads = grad_seq(params, gen, 150)
    kw = dict(lr=0.01, weight_decay=0.1, balance_every=8)
    sched = precond_update_prob_schedule(min_prob=0.2, decay=0.03, flat_start=20)
    new, state = run(kron(preconditioner_update_probability=sched, **kw), params, grads)
    want, _, log = reference_kron(params, grads, prob=sched, **kw)
    assert_close_tree(new, want, rtol=1e-9, atol=1e-11)
    n_updates = sum(d for d, _ in log)
    assert int(state["precond_updates"]) == n_updates < 100
    assert sum(b for _, b in log) == n_updates // 8


# -- purity, dtypes -------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum_into", [True, False])
@pytest.mark.parametrize("donate", [False, True])
def test_grads_are_never_mutated_and_pure_mode_writes_nothing(momentum_into, donate):
    gen = torch.Generator().manual_seed(2)
    params = mixed_params(gen, F32)
    grads = grad_seq(params, gen, 3)
    opt = kron(lr=0.05, momentum_into_precond_update=momentum_into, balance_every=1,
               weight_decay=0.1)
    state = opt.init_state(params)
    g_copy = clone_tree(grads)
    ref_p, ref_s = run(opt, clone_tree(params), clone_tree(grads))
    p, s = clone_tree(params), state
    for g in grads:
        p_in, s_in = clone_tree(p), clone_tree(s)
        p_keep, s_keep = p, s
        p, s = opt.update(p, g, s, donate=donate)
        if not donate:
            assert_trees_equal(p_keep, p_in)
            assert_trees_equal(s_keep, s_in)
    assert_trees_equal(grads, g_copy)
    assert_trees_equal(p, ref_p)
    assert_trees_equal(s, ref_s)


def test_bfloat16_params_float32_maths_rounded_once():
    """bf16 params: momentum and factors are float32, and every step is exactly the float32
    computation on the bf16 values, rounded once to bf16."""
    gen = torch.Generator().manual_seed(4)
    p16 = mixed_params(gen, BF16)
    grads = grad_seq(p16, gen, 12)
    opt = kron(lr=0.05, weight_decay=0.1, preconditioner_update_probability=0.5, balance_every=2)
    s16 = opt.init_state(p16)
    s32 = opt.init_state(tree_map(lambda x: x.float(), p16))
    assert all(x.dtype == F32 for x in tensor_leaves(s16["momentum_buffer"]))
    assert all(f.dtype == F32 for q in tensor_leaves(s16["Q"]) for f in q)
    for g in grads:
        p32 = tree_map(lambda x: x.float(), p16)
        p16, s16 = opt.update(p16, g, s16)
        p32, s32 = opt.update(p32, tree_map(lambda x: x.float(), g), s32)
        assert_trees_equal(p16, tree_map(lambda x: x.to(BF16), p32))
        assert_trees_equal(s16["Q"], s32["Q"])
    assert all(x.dtype == BF16 for x in tensor_leaves(p16))


def test_float64_params_get_float64_factors_unless_asked():
    p = {"w": torch.zeros(3, 2, dtype=F64), "h": torch.zeros(3, 2, dtype=torch.float16)}
    q = kron().init_state(p)["Q"]
    assert q["w"][0].dtype == F64 and q["h"][0].dtype == F32
    opt = kron(precond_dtype=F32, lr=1e-3, preconditioner_update_probability=0.0)
    q = opt.init_state(p)["Q"]
    assert q["w"][0].dtype == F32
    # float32 maths, but the step is applied to the float64 param in float64
    w = {"w": torch.full((3, 2), 1.0 + 2.0**-40, dtype=F64)}
    new, _ = opt.update(w, {"w": torch.ones(3, 2, dtype=F64)}, opt.init_state(w))
    torch.testing.assert_close(new["w"], w["w"] - 1e-3, rtol=0, atol=1e-15)
    with pytest.raises(TypeError, match="precond_dtype"):
        kron(precond_dtype=BF16)


def test_none_and_empty_leaves_pass_through():
    gen = torch.Generator().manual_seed(1)
    params = {"w": randn((3, 2), gen), "frozen": None, "e": torch.zeros(0, 3, dtype=F64),
              "nograd": randn((2,), gen)}
    opt = kron(lr=0.1)
    state = opt.init_state(params)
    g = {"w": randn((3, 2), gen), "frozen": None, "e": torch.zeros(0, 3, dtype=F64),
         "nograd": None}
    new, state = opt.update(params, g, state)
    assert new["frozen"] is None and new["nograd"] is params["nograd"] and new["e"] is params["e"]
    assert not torch.equal(new["w"], params["w"])


# -- state: save / resume, errors ------------------------------------------------------------------
def test_functional_save_resume_is_bitwise_including_rng_and_counters():
    gen = torch.Generator().manual_seed(8)
    params = mixed_params(gen, F32)
    grads = grad_seq(params, gen, 14)
    opt = kron(lr=0.05, weight_decay=0.1, preconditioner_update_probability=0.5, balance_every=2)
    ref_p, ref_s = run(opt, params, grads)
    p, s = run(opt, params, grads[:5])
    buf = io.BytesIO()
    torch.save({"p": p, "s": s}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    p2, s2 = run(kron(lr=0.05, weight_decay=0.1, preconditioner_update_probability=0.5,
                      balance_every=2), saved["p"], grads[5:], state=saved["s"])
    assert_trees_equal(p2, ref_p)
    assert_trees_equal(s2, ref_s)
    # and the probes matter: another seed gives other factors
    _, s3 = run(kron(lr=0.05, weight_decay=0.1, preconditioner_update_probability=0.5,
                     balance_every=2, seed=7), params, grads)
    assert not torch.equal(s3["Q"]["w"][0], ref_s["Q"]["w"][0])


def test_bad_options_and_states_raise_before_writing():
    with pytest.raises(ValueError, match="memory_save_mode"):
        kron(memory_save_mode="some_diag")
    with pytest.raises(ValueError, match="b1"):
        kron(b1=1.0)
    with pytest.raises(ValueError, match="precond_init_scale"):
        kron(precond_init_scale=0.0)
    with pytest.raises(TypeError, match="max_size_triangular"):
        kron(max_size_triangular=2.5)
    params = {"w": torch.ones(3, 2)}
    state = kron().init_state(params)
    bad = kron(memory_save_mode="all_diag")
    with pytest.raises(ValueError, match=r"state\['Q'\] at 'w'"):
        bad.update(params, {"w": torch.ones(3, 2)}, state)
    with pytest.raises(ValueError, match="grad at 'w'"):
        kron().update(params, {"w": torch.ones(2, 3)}, state)
    with pytest.raises(ValueError, match="expected keys"):
        kron().update(params, {"w": torch.ones(3, 2)}, {"step": state["step"]})
    assert int(state["prob_step"]) == 0 and torch.equal(params["w"], torch.ones(3, 2))


def test_lr_schedule_and_set_hyperparams():
    gen = torch.Generator().manual_seed(9)
    params = {"w": randn((3, 2), gen)}
    grads = grad_seq(params, gen, 4)
    # lr(s) = 0.05·s for s < 2 completed steps, then 0.1: the first step does not move
    opt = kron(lr=ft.linear_warmup(0.1, 2), weight_decay=0.1)
    state = opt.init_state(params)
    new, state = opt.update(params, grads[0], state)
    assert torch.equal(new["w"], params["w"])
    new, state = run(opt, new, grads[1:], state=state)
    assert float(state["hyperparams"]["lr"]) == pytest.approx(0.1)
    # the same steps with constant lrs set in the state
    const = kron(lr=0.0, weight_decay=0.1)
    p, s = params, const.init_state(params)
    for g, lr in zip(grads, (0.0, 0.05, 0.1, 0.1)):
        p, s = const.update(p, g, ft.set_hyperparams(s, lr=lr))
    assert torch.equal(p["w"], new["w"])


def test_grad_through_update_and_compile_fall_back_to_eager():
    """d(params)/d(lr) through a preconditioner-update step matches central differences; a
    compiled caller runs ``update`` eagerly (it is torch.compiler.disable'd) with equal results."""
    gen = torch.Generator().manual_seed(12)
    params = {"w": randn((4, 3), gen), "b": randn((3,), gen)}
    grads = grad_seq(params, gen, 2)
    opt = kron(weight_decay=0.1, preconditioner_update_probability=1.0)

    def loss(lr):
        p, s = params, ft.set_hyperparams(opt.init_state(params), lr=lr)
        for g in grads:
            p, s = opt.update(p, g, s)
        return sum((v * v).sum() for v in p.values())

    lr = torch.tensor(0.01, dtype=F64)
    d = torch.func.grad(loss)(lr)
    fd = (loss(lr + 1e-6) - loss(lr - 1e-6)) / 2e-6
    torch.testing.assert_close(d, fd, rtol=1e-6, atol=1e-9)
    torch._dynamo.reset()
    compiled = torch.compile(lambda p, g, s: opt.update(p, g, s), backend="aot_eager")
    pc, sc = params, opt.init_state(params)
    pe, se = params, opt.init_state(params)
    for g in grads:
        pc, sc = compiled(pc, g, sc)
        pe, se = opt.update(pe, g, se)
    assert_trees_equal(pc, pe)


# -- the torch.optim adapter ---------------------------------------------------------------------
def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 3)).to(dtype)


def _batches(dtype, n=8):
    return [torch.randn(6, 5, generator=torch.Generator().manual_seed(i)).to(dtype)
            for i in range(n)]


def _train(model, opt, batches):
    for x in batches:
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()


KW = dict(lr=1e-2, weight_decay=0.1, preconditioner_update_probability=0.5, balance_every=2)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_adapter_is_bitwise_the_functional_update(dtype):
    model = _model(dtype)
    opt = Kron(model.named_parameters(), **KW)
    ref = _model(dtype)
    params = {k: v.detach().clone() for k, v in ref.named_parameters()}
    f = kron(**KW)
    state = f.init_state(params)
    for x in _batches(dtype):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
        params, state = f.update(params, grads, state)
        for k, p in model.named_parameters():
            assert torch.equal(p.detach(), params[k])
    for k, p in model.named_parameters():
        assert len(_factors(opt.state[p])) == len(state["Q"][k])
        for a, b in zip(_factors(opt.state[p]), state["Q"][k]):
            assert torch.equal(a, b)


def _factors(entry: dict) -> list:
    """The adapter's per-parameter factors: tensors under ``Q.0``, ``Q.1``, ..."""
    return [entry[f"Q.{i}"] for i in range(sum(k.startswith("Q.") for k in entry))]


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_adapter_resume_is_bitwise(dtype):
    batches = _batches(dtype, 10)
    ref = _model(dtype)
    _train(ref, Kron(ref.named_parameters(), **KW), batches)
    model = _model(dtype)
    opt = Kron(model.named_parameters(), **KW)
    _train(model, opt, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = _model(dtype)
    model2.load_state_dict(saved["model"])
    opt2 = Kron(model2.named_parameters(), **KW)
    opt2.load_state_dict(saved["opt"])
    st2 = opt2.state[model2[0].weight]
    assert all(f.dtype == F32 for f in _factors(st2)) and st2["momentum_buffer"].dtype == F32
    assert all(st2[k].device.type == "cpu" and not st2[k].is_floating_point()
               for k in ("prob_step", "update_counter", "precond_updates", "rng"))
    _train(model2, opt2, batches[4:])
    for a, b in zip(ref.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_adapter_lr_scheduler_and_options():
    model = _model(F32)
    opt = Kron(model.parameters(), lr=0.1, memory_save_mode="all_diag")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s == 0 else 0.0)
    assert all(f.ndim == 1 for f in _factors(opt.state[model[0].weight]))
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, _batches(F32, 1))  # lr 0.1 at step 1
    sched.step()                           # lr 0 from now on
    after1 = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, _batches(F32, 2)[1:])
    assert not all(torch.equal(a, b) for a, b in zip(before, after1))
    assert all(torch.equal(a, b.detach()) for a, b in zip(after1, model.parameters()))
    with pytest.raises(ValueError):
        Kron(model.parameters(), memory_save_mode="nope")


# -- convergence -----------------------------------------------------------------------------------
def _train_best(make_model, loss_fn, lrs, steps):
    """(first loss, best final loss over the lr grid, the model trained at that lr)."""
    best = None
    for lr in lrs:
        torch.manual_seed(0)
        model = make_model()
        opt = Kron(model.named_parameters(), lr=lr, weight_decay=0.01)
        first = None
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(model)
            loss.backward()
            opt.step()
            first = float(loss) if first is None else first
        final = float(loss_fn(model))
        if best is None or final < best[1]:
            best = (first, final, model)
    return best


def test_trains_a_small_mlp_classifier():
    """A 3-class problem (labels from a random linear map), at the best lr of a small grid."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    y = (x @ torch.randn(10, 3, generator=gen)).argmax(1)

    def make():
        return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.GELU(),
                                   torch.nn.Linear(32, 3))

    def loss_fn(m):
        return torch.nn.functional.cross_entropy(m(x), y)

    first, final, model = _train_best(make, loss_fn, (3e-3, 1e-2, 3e-2), 150)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert final < 0.05 * first and acc > 0.99, (first, final, acc)


class _TinyTransformer(torch.nn.Module):
    def __init__(self, vocab=16, d=32, t=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.zeros(t, d))
        self.layer = torch.nn.TransformerEncoderLayer(d, 2, 64, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, x):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.layer(self.emb(x) + self.pos, src_mask=mask, is_causal=True))


def test_trains_a_tiny_transformer():
    """Next-token prediction of sequences x_{t+1} = perm[x_t] (a causal 1-layer transformer,
    3-D-free but with embeddings, attention projections, norms and biases), best lr of a grid."""
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(16, generator=gen)
    seq = [torch.randint(0, 16, (64, 1), generator=gen)]
    for _ in range(8):
        seq.append(perm[seq[-1]])
    seq = torch.cat(seq, 1)
    x, y = seq[:, :-1], seq[:, 1:]

    def loss_fn(m):
        return torch.nn.functional.cross_entropy(m(x).reshape(-1, 16), y.reshape(-1))

    first, final, _ = _train_best(_TinyTransformer, loss_fn, (3e-3, 1e-2), 80)
    assert final < 0.02 * first, (first, final)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steady_state_does_not_sync():
    """Update and ordinary steps read no device value on the host (bf16 params on CUDA)."""
    gen = torch.Generator().manual_seed(16)
    params = {k: v.cuda() for k, v in mixed_params(gen, BF16).items() if v is not None}
    grads = [{k: v.cuda() for k, v in g.items()} for g in
             grad_seq({k: v.cpu() for k, v in params.items()}, gen, 8)]
    opt = kron(preconditioner_update_probability=0.5, balance_every=2, weight_decay=0.1)
    state = opt.init_state(params)
    params, state = opt.update(params, grads[0], state, donate=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for g in grads[1:]:
            params, state = opt.update(params, g, state, donate=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(v.float()).all() for v in params.values())
