"""SOAP (docs/algorithms.md section 8): R17 and R18, the first-call skip, the refresh schedule,
rotation equivariance with a frozen preconditioner (R38), ``merge_dims``/``data_format`` layouts,
1-D leaves, bfloat16 params, a float64 transcription of the reference's maths, the eigenbasis
tracking its statistics, and the functional/adapter/resume surfaces.

The two references below are written from the update rule in plain torch, one leaf at a
time, not from functim's code:

- :func:`hf_adamw_run`: HF-style AdamW (ε on the raw root, weight decay after the update, first
  call a no-op), what SOAP must reduce to without preconditioned dims (R17);
- :func:`reference_soap_run`: SOAP in the "momentum in original coordinates" form that preceded
  the reference's commit f42d296 (mathematically the same optimizer; a different arithmetic
  path from functim's momentum-in-the-eigenbasis form), with each dim contracted in place by
  ``tensordot`` + ``movedim`` rather than the reference's cyclic contraction.

Parity needs statistics with distinct eigenvalues (the null-space eigenvectors of a
rank-deficient statistic are arbitrary, so two correct implementations differ by rounding
there): the parity leaves are square matrices, 3-D/4-D kernels whose every unfolding is full rank
after one step, and vectors without ``precondition_1d``.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import assert_trees_equal, clone_tree
from functim.adapters.soap import Soap
from hypothesis import given, settings
from hypothesis import strategies as st

import functim as ft
from functim.linalg import eigh_descending, power_qr_refresh, project, project_back
from functim.optimizers.soap import soap

F64 = torch.float64
seeds = st.integers(0, 2**31 - 1)
FAST = settings(max_examples=8, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The matrices here are tiny; with 2 intra-op threads on a loaded 2-core machine LAPACK's
    QR took 12 ms instead of 5 µs (threads waiting on each other), which made this file slow."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randn(shape, gen, dtype=F64):
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype)


def grads_for(params, gen, n, dtype=None):
    return [{k: randn(v.shape, gen, dtype or v.dtype) for k, v in params.items()}
            for _ in range(n)]


def run(opt, params, grads, state=None, donate=False):
    state = opt.init_state(params) if state is None else state
    for g in grads:
        params, state = opt.update(params, g, state, donate=donate)
    return params, state


def assert_close_trees(a, b, rtol, atol):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# -- references written from the update rule --------------------------------------------------
def hf_adamw_run(params, grads, *, lr, betas, eps, wd, correct_bias=True, normalize=False):
    """AdamW with ε on the raw sqrt(v) and weight decay after the update; the first call only
    initialises (nothing moves)."""
    b1, b2 = betas
    p = {k: v.clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    for c, g in enumerate(grads):
        if c == 0:
            continue
        t = c
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
            step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if correct_bias else lr
            u = m[k] / (v2[k].sqrt() + eps)
            if normalize:
                u = u / (1e-30 + u.pow(2).mean().sqrt())
            p[k] = p[k] - step * u
            p[k] = p[k] - lr * wd * p[k]
    return p


def _contract(x, mats, transpose):
    """Contract every dim i of x with mats[i] in place (None: identity)."""
    for i, Q in enumerate(mats):
        if Q is not None:
            A = Q.T if transpose else Q
            x = torch.movedim(torch.tensordot(A, x, dims=([1], [i])), 0, i)
    return x


def reference_soap_run(params, grads, *, lr, betas, shampoo_beta, eps, wd, freq,
                       max_precond_dim=10000, correct_bias=True, normalize=False):
    """SOAP (no merge_dims, no precondition_1d) with the momentum kept in original coordinates
    and projected at each step; returns the final params and the bases."""
    b1, b2 = betas
    bs = shampoo_beta if shampoo_beta >= 0 else b2
    p = {k: v.clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    L, Q = {}, {}
    for k, x in p.items():
        on = [x.ndim != 1 and d <= max_precond_dim for d in x.shape]
        L[k] = [torch.zeros(d, d, dtype=x.dtype) if o else None for d, o in zip(x.shape, on)]

    def grams(g):
        out = []
        for i in range(g.ndim):
            gi = torch.movedim(g, i, 0).reshape(g.shape[i], -1)
            out.append(gi @ gi.T)
        return out

    for c, g in enumerate(grads):
        if c == 0:
            for k in p:
                for i, G in enumerate(grams(g[k])):
                    if L[k][i] is not None:
                        L[k][i] = (1 - bs) * G
                Q[k] = [None if Li is None else torch.linalg.eigh(
                    Li + 1e-30 * torch.eye(Li.shape[0], dtype=Li.dtype)).eigenvectors.flip(1)
                    for Li in L[k]]
            continue
        t = c
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            gp = _contract(g[k], Q[k], transpose=True)
            v2[k] = b2 * v2[k] + (1 - b2) * gp ** 2
            mp = _contract(m[k], Q[k], transpose=True)
            N = _contract(mp / (v2[k].sqrt() + eps), Q[k], transpose=False)
            if normalize:
                N = N / (1e-30 + N.pow(2).mean().sqrt())
            step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if correct_bias else lr
            p[k] = p[k] - step * N
            p[k] = p[k] - lr * wd * p[k]
            for i, G in enumerate(grams(g[k])):
                if L[k][i] is not None:
                    L[k][i] = bs * L[k][i] + (1 - bs) * G
            if t % freq == 0:
                for i, Li in enumerate(L[k]):
                    if Li is None:
                        continue
                    est = torch.diag(Q[k][i].T @ Li @ Q[k][i])
                    order = torch.argsort(est, descending=True)
                    v2[k] = v2[k].index_select(i, order)
                    Q[k][i] = torch.linalg.qr(Li @ Q[k][i][:, order]).Q
    return p, Q


# -- R17: no preconditioned dims ≡ HF-AdamW ----------------------------------------------------
SHAPES = [(), (5,), (4, 3), (2, 3, 2), (3, 1, 2, 2)]


@FAST
@given(seed=seeds, lr=st.sampled_from([1e-3, 3e-2]), b1=st.sampled_from([0.0, 0.9, 0.95]),
       b2=st.sampled_from([0.95, 0.999]), eps=st.sampled_from([1e-8, 1e-3]),
       wd=st.sampled_from([0.0, 0.1]), correct_bias=st.booleans(), merge=st.booleans(),
       normalize=st.booleans(), n=st.integers(1, 7))
def test_r17_no_preconditioned_dims_is_hf_adamw(seed, lr, b1, b2, eps, wd, correct_bias, merge,
                                                normalize, n):
    gen = torch.Generator().manual_seed(seed)
    params = {f"p{i}": randn(s, gen) for i, s in enumerate(SHAPES)}
    grads = grads_for(params, gen, n)
    opt = soap(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, max_precond_dim=0,
               merge_dims=merge, correct_bias=correct_bias, normalize_grads=normalize,
               precondition_frequency=2)
    got, state = run(opt, params, grads)
    want = hf_adamw_run(params, grads, lr=lr, betas=(b1, b2), eps=eps, wd=wd,
                        correct_bias=correct_bias, normalize=normalize)
    assert_close_trees(got, want, rtol=1e-13, atol=1e-15)
    assert int(state["step"]) == n - 1 and int(state["calls"]) == n
    assert all(q == [] for q in state["Q"].values())


@FAST
@given(seed=seeds, n=st.integers(2, 6))
def test_r17_vectors_without_precondition_1d_are_hf_adamw(seed, n):
    """The default max_precond_dim preconditions matrices, never vectors (precondition_1d=False):
    the vector leaves follow HF-AdamW exactly, whatever the matrices do."""
    gen = torch.Generator().manual_seed(seed)
    params = {"b": randn(7, gen), "c": randn(1, gen), "w": randn((3, 3), gen)}
    grads = grads_for(params, gen, n)
    opt = soap(lr=1e-2, weight_decay=0.1)
    got, _ = run(opt, params, grads)
    want = hf_adamw_run({k: params[k] for k in "bc"}, [{k: g[k] for k in "bc"} for g in grads],
                        lr=1e-2, betas=(0.95, 0.95), eps=1e-8, wd=0.1)
    assert_close_trees({k: got[k] for k in "bc"}, want, rtol=1e-13, atol=1e-15)


# -- the first call ------------------------------------------------------------------------
@pytest.mark.parametrize("donate", [False, True])
def test_first_call_only_initialises(donate):
    gen = torch.Generator().manual_seed(0)
    params = {"w": randn((5, 4), gen, torch.float32), "b": randn(3, gen, torch.float32),
              "k": randn((2, 3, 2), gen, torch.float32)}
    before = clone_tree(params)
    g = grads_for(params, gen, 1)[0]
    opt = soap(weight_decay=0.5, lr=0.1, shampoo_beta=0.8, precondition_1d=True)
    state = opt.init_state(params)
    new_p, new_s = opt.update(params, g, state, donate=donate)
    assert_trees_equal(new_p, before)  # bitwise, weight decay included
    assert int(new_s["step"]) == 0 and int(new_s["calls"]) == 1
    for k in params:
        assert not new_s["exp_avg"][k].any() and not new_s["exp_avg_sq"][k].any()
        for i, (L, Q) in enumerate(zip(new_s["GG"][k], new_s["Q"][k])):
            dims = [d for d in range(g[k].ndim) if d != i]
            want = 0.2 * torch.tensordot(g[k], g[k], dims=(dims, dims))
            torch.testing.assert_close(L, want, rtol=1e-6, atol=1e-6)
            vals = torch.diagonal(Q.T @ L @ Q)
            assert (vals[:-1] >= vals[1:] - 1e-5).all()  # descending
            torch.testing.assert_close(L @ Q, Q * vals, rtol=1e-4, atol=1e-5)


# -- R18 and the refresh schedule ----------------------------------------------------------
@FAST
@given(seed=seeds, shape=st.sampled_from([(6, 4), (3, 7), (5,), (2, 3, 4), (3, 2, 2, 2)]),
       freq=st.integers(1, 4), n=st.integers(2, 9))
def test_r18_bases_orthonormal_and_projections_invert(seed, shape, freq, n):
    gen = torch.Generator().manual_seed(seed)
    params = {"x": randn(shape, gen, torch.float32)}
    opt = soap(precondition_frequency=freq, precondition_1d=True)
    state = opt.init_state(params)
    for g in grads_for(params, gen, n):
        params, state = opt.update(params, g, state)
        Qs = state["Q"]["x"]
        assert len(Qs) == len(shape)
        for Q in Qs:
            eye = torch.eye(Q.shape[0])
            torch.testing.assert_close(Q.T @ Q, eye, rtol=0, atol=1e-5)
        X = randn(shape, gen, torch.float32)
        torch.testing.assert_close(project_back(project(X, Qs), Qs), X, rtol=0, atol=1e-5)
        torch.testing.assert_close(project(project_back(X, Qs), Qs), X, rtol=0, atol=1e-5)


def test_project_matches_explicit_products():
    gen = torch.Generator().manual_seed(1)
    QL = torch.linalg.qr(randn((4, 4), gen))[0]
    QR = torch.linalg.qr(randn((3, 3), gen))[0]
    X = randn((4, 3), gen)
    torch.testing.assert_close(project(X, [QL, QR]), QL.T @ X @ QR)
    torch.testing.assert_close(project_back(X, [QL, QR]), QL @ X @ QR.T)
    torch.testing.assert_close(project(X, [None, QR]), X @ QR)
    T = randn((4, 2, 3), gen)
    want = torch.einsum("abc,ai,ck->ibk", T, QL, QR)
    torch.testing.assert_close(project(T, [QL, None, QR]), want)


def test_power_qr_refresh_sorts_and_orthonormalises():
    gen = torch.Generator().manual_seed(2)
    A = randn((5, 5), gen)
    L = A @ A.T
    Q = torch.linalg.qr(randn((5, 5), gen))[0]
    Qn, order = power_qr_refresh(L, Q)
    est = torch.diag(Q.T @ L @ Q)
    assert torch.equal(order, torch.argsort(est, descending=True))
    torch.testing.assert_close(Qn.T @ Qn, torch.eye(5, dtype=F64), rtol=0, atol=1e-12)
    # the column spaces of the power iteration are kept: Qn R = L Q[:, order]
    R = Qn.T @ (L @ Q[:, order])
    torch.testing.assert_close(torch.triu(R), R, rtol=0, atol=1e-10)
    torch.testing.assert_close(eigh_descending(L) @ torch.diag(torch.linalg.eigvalsh(L).flip(0)),
                               L @ eigh_descending(L))


@pytest.mark.parametrize("freq", [1, 3])
def test_refresh_only_when_t_is_a_multiple_of_the_frequency(freq):
    gen = torch.Generator().manual_seed(3)
    params = {"w": randn((4, 3), gen), "k": randn((2, 2, 3), gen)}
    opt = soap(precondition_frequency=freq)
    state = opt.init_state(params)
    grads = grads_for(params, gen, 10)
    params, state = opt.update(params, grads[0], state)
    for c, g in enumerate(grads[1:], start=1):  # call c is the real update t = c
        old = clone_tree(state["Q"])
        params, state = opt.update(params, g, state)
        changed = [not torch.equal(a, b) for k in old for a, b in zip(old[k], state["Q"][k])]
        if c % freq == 0:
            assert all(changed), c
        else:
            assert not any(changed), c
            assert_trees_equal(state["Q"], old)


def test_second_moment_is_reordered_not_rotated_on_refresh():
    """On a refresh call the second moment is only permuted: it equals the permutation (by σ)
    of the v that the same call makes without a refresh; the momentum is rotated."""
    gen = torch.Generator().manual_seed(4)
    params = {"w": randn((4, 4), gen)}
    grads = grads_for(params, gen, 4)
    opt_r = soap(precondition_frequency=3)
    opt_n = soap(precondition_frequency=1000)
    _, s = run(opt_r, params, grads[:3])
    p_r, s_r = opt_r.update(params, grads[3], clone_tree(s))
    p_n, s_n = opt_n.update(params, grads[3], clone_tree(s))
    assert torch.equal(p_r["w"], p_n["w"])  # the refresh happens after the update
    v = s_n["exp_avg_sq"]["w"]
    for i, (L, Q) in enumerate(zip(s_n["GG"]["w"], s["Q"]["w"])):
        order = torch.argsort(torch.diag(Q.T @ L @ Q), descending=True)
        v = v.index_select(i, order)
    torch.testing.assert_close(s_r["exp_avg_sq"]["w"], v, rtol=0, atol=0)
    # the momentum is rotated into the new bases: the same vector in original coordinates
    m_orig_r = project_back(s_r["exp_avg"]["w"], s_r["Q"]["w"])
    m_orig_n = project_back(s_n["exp_avg"]["w"], s_n["Q"]["w"])
    torch.testing.assert_close(m_orig_r, m_orig_n, rtol=1e-12, atol=1e-14)


# -- R38: rotation equivariance with a frozen preconditioner -----------------------------------
@FAST
@given(seed=seeds, n=st.integers(2, 6), wd=st.sampled_from([0.0, 0.1]))
def test_rotation_equivariance_with_frozen_bases(seed, n, wd):
    gen = torch.Generator().manual_seed(seed)
    params = {"w": randn((4, 3), gen), "b": randn(5, gen)}
    U = torch.linalg.qr(randn((4, 4), gen))[0]
    V = torch.linalg.qr(randn((3, 3), gen))[0]
    W = torch.linalg.qr(randn((5, 5), gen))[0]
    grads = grads_for(params, gen, n + 1)
    opt = soap(lr=1e-2, betas=(0.9, 0.99), weight_decay=wd, precondition_frequency=10_000,
               precondition_1d=True)
    params1, state = opt.update(params, grads[0], opt.init_state(params))
    state["Q"] = {"w": [U.clone(), V.clone()], "b": [W.clone()]}  # frozen: no refresh ahead
    got, _ = run(opt, params1, grads[1:], state)
    # Adam on the rotated gradients, its direction rotated back; decay after the update
    rot = [{"w": U.T @ g["w"] @ V, "b": W.T @ g["b"]} for g in grads]
    p = clone_tree(params)
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    for t, g in enumerate(rot[1:], start=1):
        for k in p:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            v2[k] = 0.99 * v2[k] + 0.01 * g[k] ** 2
            d = m[k] / (v2[k].sqrt() + 1e-8)
            d = U @ d @ V.T if k == "w" else W @ d
            p[k] = p[k] - 1e-2 * math.sqrt(1 - 0.99 ** t) / (1 - 0.9 ** t) * d
            p[k] = p[k] - 1e-2 * wd * p[k]
    assert_close_trees(got, p, rtol=1e-12, atol=1e-14)


# -- parity with the float64 transcription of the reference ---------------------------------
@settings(max_examples=6, deadline=None)
@given(seed=seeds, freq=st.sampled_from([1, 3, 7]), shampoo_beta=st.sampled_from([-1.0, 0.9]),
       wd=st.sampled_from([0.0, 0.1]), correct_bias=st.booleans(), normalize=st.booleans())
def test_parity_with_reference_transcription_float64(seed, freq, shampoo_beta, wd, correct_bias,
                                                     normalize):
    """20 calls on 2-D, 3-D, 4-D and 1-D leaves (distinct eigenvalues; see the module doc)."""
    gen = torch.Generator().manual_seed(seed)
    params = {"w": randn((5, 5), gen), "t": randn((3, 4, 5), gen),
              "conv": randn((4, 3, 2, 2), gen), "b": randn(6, gen)}
    grads = grads_for(params, gen, 20)
    kw = dict(lr=3e-3, betas=(0.9, 0.95), shampoo_beta=shampoo_beta, eps=1e-8, weight_decay=wd)
    opt = soap(**kw, precondition_frequency=freq, correct_bias=correct_bias,
               normalize_grads=normalize)
    got, state = run(opt, params, grads)
    want, Q = reference_soap_run(params, grads, lr=3e-3, betas=(0.9, 0.95),
                                 shampoo_beta=shampoo_beta, eps=1e-8, wd=wd, freq=freq,
                                 correct_bias=correct_bias, normalize=normalize)
    assert_close_trees(got, want, rtol=1e-9, atol=1e-11)
    # the bases agree up to the sign of each column
    for k in ("w", "t", "conv"):
        for a, b in zip(state["Q"][k], Q[k]):
            torch.testing.assert_close((a * b).sum(0).abs(), torch.ones(a.shape[0], dtype=F64),
                                       rtol=0, atol=1e-8)


def test_one_sided_when_a_dim_is_too_large():
    """A dim above max_precond_dim stays the identity (e.g. an embedding's vocab dim)."""
    gen = torch.Generator().manual_seed(5)
    params = {"emb": randn((9, 4), gen)}
    grads = grads_for(params, gen, 6)
    got, state = run(soap(max_precond_dim=8, precondition_frequency=2), params, grads)
    assert [tuple(q.shape) for q in state["Q"]["emb"]] == [(4, 4)]
    # the transcription has the same rule; the 4x4 right statistic is full rank after a step
    want, _ = reference_soap_run(params, grads, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1,
                                 eps=1e-8, wd=0.01, freq=2, max_precond_dim=8)
    assert_close_trees(got, want, rtol=1e-9, atol=1e-11)


def test_eigenbasis_tracks_the_statistics():
    """With gradients from a fixed anisotropic distribution, the refreshed bases converge to
    the eigenvectors of the accumulated statistics (compared with torch.linalg.eigh)."""
    gen = torch.Generator().manual_seed(6)
    UL = torch.linalg.qr(randn((4, 4), gen))[0]
    UR = torch.linalg.qr(randn((3, 3), gen))[0]
    SL, SR = torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=F64)), \
        torch.diag(torch.tensor([5.0, 2.0, 1.0], dtype=F64))
    params = {"w": torch.zeros(4, 3, dtype=F64)}
    opt = soap(precondition_frequency=2, shampoo_beta=0.99, lr=1e-3)
    state = opt.init_state(params)
    for _ in range(60):
        g = {"w": UL @ SL @ randn((4, 3), gen) @ SR @ UR.T}
        params, state = opt.update(params, g, state)
    assert int(state["calls"]) % 2 == 0  # the last call refreshed
    for L, Q in zip(state["GG"]["w"], state["Q"]["w"]):
        E = torch.linalg.eigh(L).eigenvectors.flip(1)
        cos = (Q * E).sum(0).abs()
        assert (cos > 0.999).all(), cos


# -- layouts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,max_dim,view", [
    ((64, 32, 3, 3), 8192, (6144, 3)), ((3, 3, 64, 128), 10000, (576, 128)),
    ((8, 8, 8), 10000, (512,)), ((1, 20000), 10000, (20000,)), ((50304, 768), 10000,
                                                               (50304, 768)),
    ((), 10000, (1,))])
def test_merge_dims_layout(shape, max_dim, view):
    pl = soap(merge_dims=True, max_precond_dim=max_dim).leaf_plan(shape)
    assert pl.view == view
    assert pl.precond == tuple(d <= max_dim for d in view)


def test_merge_dims_conv_kernel_equals_the_merged_matrix():
    """(8, 4, 3, 3) with max 40 is preconditioned as the (32, 9) matrix: bitwise the update of
    that matrix without merge_dims."""
    gen = torch.Generator().manual_seed(7)
    params = {"conv": randn((8, 4, 3, 3), gen, torch.float32)}
    grads = grads_for(params, gen, 7)
    kw = dict(max_precond_dim=40, precondition_frequency=2, weight_decay=0.1)
    got, state = run(soap(merge_dims=True, **kw), params, grads)
    assert [tuple(q.shape) for q in state["Q"]["conv"]] == [(32, 32), (9, 9)]
    flat, fstate = run(soap(**kw), {"conv": params["conv"].reshape(32, 9)},
                       [{"conv": g["conv"].reshape(32, 9)} for g in grads])
    assert torch.equal(got["conv"], flat["conv"].reshape(8, 4, 3, 3))
    assert torch.equal(state["exp_avg"]["conv"], fstate["exp_avg"]["conv"].reshape(8, 4, 3, 3))
    # without merge_dims every dim ≤ 40 gets its own basis
    _, s4 = run(soap(**kw), params, grads[:2])
    assert [tuple(q.shape) for q in s4["Q"]["conv"]] == [(8, 8), (4, 4), (3, 3), (3, 3)]


def test_channels_last_is_channels_first_on_the_permuted_kernel():
    gen = torch.Generator().manual_seed(8)
    params = {"conv": randn((6, 2, 2, 5), gen, torch.float32)}  # (out, kh, kw, in)
    grads = grads_for(params, gen, 5)
    kw = dict(max_precond_dim=12, merge_dims=True, precondition_frequency=2)
    got, _ = run(soap(data_format="channels_last", **kw), params, grads)
    perm = (0, 3, 1, 2)
    want, _ = run(soap(**kw), {"conv": params["conv"].permute(perm)},
                  [{"conv": g["conv"].permute(perm)} for g in grads])
    assert torch.equal(got["conv"], want["conv"].permute(0, 2, 3, 1))


@pytest.mark.parametrize("precondition_1d", [False, True])
def test_vectors(precondition_1d):
    gen = torch.Generator().manual_seed(9)
    params = {"b": randn(6, gen, torch.float32), "big": randn(12, gen, torch.float32)}
    opt = soap(precondition_1d=precondition_1d, max_precond_dim=10, precondition_frequency=2)
    got, state = run(opt, params, grads_for(params, gen, 5))
    assert [tuple(q.shape) for q in state["Q"]["b"]] == ([(6, 6)] if precondition_1d else [])
    assert state["Q"]["big"] == []  # 12 > max_precond_dim
    assert all(torch.isfinite(x).all() for x in got.values())


# -- dtypes, surfaces, state ---------------------------------------------------------------
def test_bfloat16_params_use_float32_maths_rounded_once():
    gen = torch.Generator().manual_seed(10)
    params = {"w": randn((5, 4), gen, torch.bfloat16), "b": randn(4, gen, torch.bfloat16)}
    opt = soap(lr=1e-2, weight_decay=0.1, precondition_frequency=2, precondition_1d=True)
    state = opt.init_state(params)
    for b in ("exp_avg", "exp_avg_sq"):
        assert all(x.dtype == torch.float32 for x in state[b].values())
    assert all(q.dtype == torch.float32 for qs in state["Q"].values() for q in qs)
    for g in grads_for(params, gen, 6, dtype=torch.bfloat16):
        p32 = {k: v.float() for k, v in params.items()}
        g32 = {k: v.float() for k, v in g.items()}
        want_p, want_s = opt.update(p32, g32, clone_tree(state))
        params, state = opt.update(params, g, state)
        assert all(v.dtype == torch.bfloat16 for v in params.values())
        assert_trees_equal(params, {k: v.to(torch.bfloat16) for k, v in want_p.items()})
        assert_trees_equal(state, want_s)


def test_float64_params_get_float64_preconditioner_unless_asked():
    p = {"w": torch.zeros(3, 3, dtype=F64)}
    assert soap().init_state(p)["Q"]["w"][0].dtype == F64
    st32 = soap(precond_dtype=torch.float32).init_state(p)
    assert st32["Q"]["w"][0].dtype == torch.float32
    gen = torch.Generator().manual_seed(11)
    params = {"w": randn((4, 4), gen)}
    got, s = run(soap(precond_dtype=torch.float32, precondition_frequency=2), params,
                 grads_for(params, gen, 5))
    assert got["w"].dtype == F64 and s["exp_avg"]["w"].dtype == F64


def test_donate_is_bitwise_pure_and_none_leaves_pass_through():
    gen = torch.Generator().manual_seed(12)
    params = {"w": randn((5, 3), gen, torch.float32), "k": randn((2, 3, 2), gen, torch.float32),
              "b": randn(3, gen, torch.float32), "frozen": None}
    grads = [{**g, "frozen": None} for g in grads_for(
        {k: v for k, v in params.items() if v is not None}, gen, 8)]
    grads[4]["b"] = None  # a leaf without gradient on one call is left untouched
    opt = soap(precondition_frequency=3, weight_decay=0.1, precondition_1d=True)
    pure, s_pure = run(opt, params, grads)
    donated, s_don = run(opt, clone_tree(params), grads, donate=True)
    assert_trees_equal(pure, donated)
    assert_trees_equal(s_pure, s_don)
    assert pure["frozen"] is None and s_pure["GG"]["frozen"] is None


def test_weight_decay_mask():
    gen = torch.Generator().manual_seed(13)
    params = {"w": randn((3, 3), gen), "b": randn(3, gen)}
    grads = grads_for(params, gen, 4)
    masked, _ = run(soap(weight_decay=0.5, weight_decay_mask={"w": True, "b": False}), params,
                    grads)
    plain, _ = run(soap(weight_decay=0.5), params, grads)
    nodecay, _ = run(soap(weight_decay=0.0), params, grads)
    assert torch.equal(masked["w"], plain["w"]) and torch.equal(masked["b"], nodecay["b"])


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 3)).to(dtype)


def _batches(n):
    return [torch.randn(6, 5, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _adapter_run(model, opt, batches):
    for x in batches:
        opt.zero_grad()
        model(x.to(next(model.parameters()).dtype)).float().pow(2).mean().backward()
        opt.step()


KW = dict(lr=1e-2, weight_decay=0.1, precondition_frequency=2, precondition_1d=True)


def test_adapter_is_bitwise_the_functional_update():
    model = _model()
    opt = Soap(model.named_parameters(), **KW)
    fopt = soap(**KW)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = fopt.init_state(params)
    for x in _batches(7):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        grads = {k: v.grad.clone() for k, v in model.named_parameters()}
        opt.step()
        params, state = fopt.update(params, grads, state)
        for k, v in model.named_parameters():
            assert torch.equal(v, params[k]), k
    p0 = next(model.parameters())
    assert opt.state[p0]["calls"].device.type == "cpu"
    assert torch.equal(opt.state[p0]["exp_avg"], state["exp_avg"]["0.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_resume_is_bitwise(dtype):
    batches = _batches(8)  # refreshes on calls 2, 4, 6: the split (after call 3) is between
    ref = _model(dtype)
    _adapter_run(ref, Soap(ref.named_parameters(), **KW), batches)
    model = _model(dtype)
    opt = Soap(model.named_parameters(), **KW)
    _adapter_run(model, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = _model(dtype)
    model2.load_state_dict(saved["model"])
    opt2 = Soap(model2.named_parameters(), **KW)
    opt2.load_state_dict(saved["opt"])
    p0 = next(model2.parameters())
    assert opt2.state[p0]["GG.0"].dtype == torch.float32  # not cast to the param dtype
    assert opt2.state[p0]["calls"].device.type == "cpu"
    _adapter_run(model2, opt2, batches[3:])
    for a, b in zip(ref.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_adapter_with_dtype_options():
    """precond_dtype/state_dtype travel in the param groups (by name) and take effect."""
    model = _model(F64)
    opt = Soap(model.named_parameters(), precond_dtype=torch.float32, **KW)
    _adapter_run(model, opt, _batches(3))
    p0 = next(model.parameters())
    assert opt.state[p0]["Q.0"].dtype == torch.float32
    assert opt.state[p0]["exp_avg"].dtype == F64
    opt2 = Soap(_model(F64).named_parameters(), precond_dtype=torch.float32, **KW)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["precond_dtype"] == opt.param_groups[0]["precond_dtype"]


def test_functional_save_resume_is_bitwise():
    gen = torch.Generator().manual_seed(14)
    params = {"w": randn((4, 3), gen, torch.float32), "b": randn(3, gen, torch.float32)}
    grads = grads_for(params, gen, 9)
    opt = soap(precondition_frequency=3, precondition_1d=True)
    full, full_s = run(opt, params, grads)
    half, half_s = run(opt, params, grads[:5])
    buf = io.BytesIO()
    torch.save({"p": half, "s": half_s}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, res_s = run(opt, saved["p"], grads[5:], saved["s"])
    assert_trees_equal(resumed, full)
    assert_trees_equal(res_s, full_s)


def test_lr_schedule_and_set_hyperparams():
    gen = torch.Generator().manual_seed(15)
    params = {"w": randn((3, 3), gen)}
    grads = grads_for(params, gen, 4)
    sched = ft.linear_warmup(peak=1e-2, warmup_steps=4)
    got, s = run(soap(lr=sched), params, grads)
    assert float(s["hyperparams"]["lr"]) == pytest.approx(sched(torch.tensor(2)).item())
    s2 = ft.set_hyperparams(soap().init_state(params), lr=0.5)
    assert float(s2["hyperparams"]["lr"]) == 0.5


# -- errors ------------------------------------------------------------------------------------
def test_bad_options_and_states_raise_before_writing():
    with pytest.raises(ValueError, match="precondition_frequency"):
        soap(precondition_frequency=0)
    with pytest.raises(TypeError, match="max_precond_dim"):
        soap(max_precond_dim=1.5)
    with pytest.raises(ValueError, match="data_format"):
        soap(data_format="nhwc")
    with pytest.raises(ValueError, match="shampoo_beta"):
        soap(shampoo_beta=1.0)
    with pytest.raises(ValueError, match="precond_dtype"):
        soap(precond_dtype=torch.bfloat16)
    params = {"w": torch.ones(3, 2)}
    grads = {"w": torch.ones(3, 2)}
    opt = soap()
    state = opt.init_state(params)
    bad = dict(state, calls=torch.zeros((), dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="calls"):
        opt.update(params, grads, bad)
    bad = dict(state, Q={"w": [torch.eye(3)]})
    with pytest.raises(ValueError, match=r"state\['Q'\] at 'w'"):
        opt.update(params, grads, bad)
    bad = dict(state, GG={"w": [torch.zeros(3, 3, dtype=F64), torch.zeros(2, 2)]})
    with pytest.raises(ValueError, match="float32"):
        opt.update(params, grads, bad)
    with pytest.raises(ValueError, match="grad at 'w'"):
        opt.update(params, {"w": torch.ones(2, 3)}, state)
    assert int(state["calls"]) == 0 and torch.equal(params["w"], torch.ones(3, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steady_state_does_not_sync():
    """Ordinary and refresh calls read no device value on the host (the first call's eigh
    does); a bf16 model on CUDA."""
    gen = torch.Generator().manual_seed(16)
    params = {"w": randn((64, 48), gen, torch.bfloat16).cuda(),
              "k": randn((8, 4, 3, 3), gen, torch.bfloat16).cuda(),
              "b": randn(48, gen, torch.bfloat16).cuda()}
    grads = [{k: v.cuda() for k, v in g.items()} for g in
             grads_for({k: v.cpu() for k, v in params.items()}, gen, 7, torch.bfloat16)]
    opt = soap(precondition_frequency=2, merge_dims=True, max_precond_dim=100)
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
