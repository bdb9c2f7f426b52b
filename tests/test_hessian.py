"""functim.hessian: the GNB and Hutchinson estimators against exact curvature, and the
counter-based RNG they draw from (docs/algorithms.md section 12)."""

import math

import pytest
import torch
import torch.nn.functional as F

import functim as ft
from functim.hessian import (
    rademacher_like,
    rng_key,
    sample_categorical,
    squared_gradients,
)

D = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: threads only add overhead (and noise on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- a small MLP and its exact Hessian ------------------------------------------------------------
def _mlp_params():
    g = torch.Generator().manual_seed(0)
    return {"l1": {"w": torch.randn(3, 4, generator=g, dtype=D) * 0.8,
                   "b": torch.randn(4, generator=g, dtype=D) * 0.3},
            "l2": {"w": torch.randn(4, 2, generator=g, dtype=D) * 0.8,
                   "b": torch.randn(2, generator=g, dtype=D) * 0.3}}


def _mlp_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, generator=g, dtype=D), torch.randn(5, 2, generator=g, dtype=D)


def _mlp_loss(p, batch):
    x, y = batch
    h = torch.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
    return ((h @ p["l2"]["w"] + p["l2"]["b"] - y) ** 2).mean()


def _flat_hessian(loss, params, batch):
    """The exact Hessian over all parameters, flattened in pytree order (torch.func.hessian)."""
    leaves, spec = ft._tree.flatten(params)
    sizes = [x.numel() for x in leaves]

    def f(v):
        parts = torch.split(v, sizes)
        return loss(ft._tree.unflatten(spec, [q.reshape(x.shape) for q, x in zip(parts, leaves)]),
                    batch)

    return torch.func.hessian(f)(torch.cat([x.reshape(-1) for x in leaves]))


def _flat(tree):
    return torch.cat([x.reshape(-1) for x in ft._tree.flatten(tree)[0]])


def _keys(seed, n):
    """Keys [seed, 0..n-1]: key j's first draw is draw j of key [seed, 0]."""
    return torch.stack([torch.full((n,), seed, dtype=torch.int64),
                        torch.arange(n, dtype=torch.int64)], 1)


def test_hutchinson_converges_to_the_exact_diagonal_like_one_over_sqrt_probes():
    params, batch = _mlp_params(), _mlp_batch()
    hess = _flat_hessian(_mlp_loss, params, batch)
    diag = hess.diagonal()
    # one Rademacher probe: var(u_i (Hu)_i) = sum_{j != i} H_ij^2, exactly
    sigma = ((hess**2).sum(1) - diag**2).sqrt()
    assert (sigma > 1e-3).all()  # the off-diagonal part is not trivial: the test can fail
    # single-probe estimates for 4096 keys at once (the estimator is pure: it vmaps over keys)
    singles = torch.func.vmap(
        lambda k: _flat(ft.hutchinson_hessian(_mlp_loss, params, batch, k)[0]))(_keys(7, 4096))
    normalized = {}
    for probes in (16, 256, 4096):
        err = (singles[:probes].mean(0) - diag).abs()
        tol = 5.0 * sigma / math.sqrt(probes)
        assert (err <= tol).all(), (probes, (err / tol).max())
        normalized[probes] = float((err / sigma).pow(2).mean().sqrt())
    # the error itself shrinks (its RMS in units of sigma ~ 1/sqrt(probes))
    assert normalized[4096] < normalized[16] / 4
    # num_probes=P from key [7, 0] is the mean of those P single-probe estimates (P draws)
    est, key = ft.hutchinson_hessian(_mlp_loss, params, batch, rng_key(7), num_probes=16)
    torch.testing.assert_close(_flat(est), singles[:16].mean(0), rtol=1e-12, atol=1e-14)
    assert key.tolist() == [7, 16]


def test_hutchinson_is_exact_for_a_diagonal_hessian_with_one_probe():
    c = torch.tensor([0.5, -2.0, 3.0], dtype=D)
    params = {"a": torch.tensor([1.0, 2.0, -1.0], dtype=D), "frozen": None}

    def loss(p, batch):
        return (c * p["a"] ** 2).sum() / 2 + p["a"].sum() * batch

    est, _ = ft.hutchinson_hessian(loss, params, torch.tensor(3.0, dtype=D), rng_key(0))
    assert est["frozen"] is None
    assert torch.equal(est["a"], c)  # u_i^2 = 1: exact, negative curvature included


def _softmax_regression():
    g = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(3, 4, generator=g, dtype=D), "b": torch.randn(4, generator=g,
                                                                              dtype=D)}
    x = torch.randn(6, 3, generator=g, dtype=D)
    return params, x


def _logits(p, x):
    return x @ p["w"] + p["b"]


def _gauss_newton_diagonal(params, x):
    """Closed form for mean CE of softmax regression: GN = (1/B) sum_n J_n^T (diag p - p p^T) J_n,
    whose diagonal is x_na^2 p_nc (1 - p_nc) for W_ac and p_nc (1 - p_nc) for b_c."""
    p = torch.softmax(_logits(params, x), -1)
    v = p * (1 - p)                                  # (B, C)
    return {"w": (x**2).T @ v / x.shape[0], "b": v.mean(0)}


def test_gnb_expectation_is_the_exact_gauss_newton_diagonal():
    params, x = _softmax_regression()
    exact = _gauss_newton_diagonal(params, x)
    samples = 4000
    # vmap over keys: the estimator is a pure tensor function of its key
    est = torch.func.vmap(lambda k: ft.gnb_hessian(_logits, params, x, k)[0])(_keys(11, samples))
    for name in ("w", "b"):
        s = est[name]
        mean, std = s.mean(0), s.std(0)
        assert (std > 0).all()
        tol = 5.0 * std / math.sqrt(samples)
        assert ((mean - exact[name]).abs() <= tol).all(), name
    # and the estimates differ from sample to sample (the labels are random)
    assert not torch.equal(est["w"][0], est["w"][1])


def test_gnb_is_batch_times_squared_gradient_of_the_sampled_label_loss():
    params, x = _softmax_regression()
    key = rng_key(3)
    labels, _ = sample_categorical(_logits(params, x), key)  # the same draw the estimator makes
    for clip in (None, 0.05):
        est, new = ft.gnb_hessian(_logits, params, x, key, clip_norm=clip)
        g = torch.func.grad(lambda p: F.cross_entropy(_logits(p, x), labels))(params)
        if clip is not None:
            norm = torch.cat([g["w"].reshape(-1), g["b"]]).norm()
            assert norm > clip  # the clip is active
            g = {k: v * (clip / (norm + 1e-6)) for k, v in g.items()}
        for k in g:
            torch.testing.assert_close(est[k], x.shape[0] * g[k] ** 2, rtol=1e-12, atol=1e-15)
        assert new.tolist() == [3, 1]


def test_gnb_over_sequence_positions_and_float32():
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(10, 6, generator=g)
    params = {"emb": emb, "head": torch.randn(6, 10, generator=g)}
    tokens = torch.randint(0, 10, (2, 5), generator=g)

    def logits_fn(p, t):
        return p["emb"][t] @ p["head"]                  # (2, 5, 10): B = 10 positions

    est, key = ft.gnb_hessian(logits_fn, params, tokens, rng_key(0))
    labels, _ = sample_categorical(logits_fn(params, tokens), rng_key(0))
    grads = torch.func.grad(lambda p: F.cross_entropy(logits_fn(p, tokens).flatten(0, 1),
                                                      labels.flatten()))(params)
    for k in params:
        assert est[k].dtype == torch.float32
        torch.testing.assert_close(est[k], 10 * grads[k] ** 2, rtol=1e-5, atol=1e-7)


def test_categorical_sampler_follows_the_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, -30.0])
    n = 50_000
    rows = logits.expand(n, 5).contiguous()
    labels, key = sample_categorical(rows, rng_key(5))
    assert labels.shape == (n,) and labels.dtype == torch.int64
    freq = torch.bincount(labels, minlength=5).double() / n
    p = torch.softmax(logits.double(), 0)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all()
    # deterministic in the key; a new counter gives new labels
    assert torch.equal(sample_categorical(rows, rng_key(5))[0], labels)
    assert not torch.equal(sample_categorical(rows, key)[0], labels)


def test_rademacher_probes_are_balanced_and_independent():
    params = {"a": torch.zeros(300, 100), "b": None, "c": torch.zeros((), dtype=D),
              "d": torch.zeros(0, 3)}
    probes, key = rademacher_like(params, rng_key(9))
    assert probes["b"] is None and probes["d"].shape == (0, 3)
    assert probes["c"].dtype == D and probes["c"].abs() == 1
    u = probes["a"].reshape(-1).double()
    n = u.numel()
    assert set(u.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(u.mean())) < 5 / math.sqrt(n)
    for lag in (1, 31, 32, 33, 100):  # neighbours within and across hashed words
        assert abs(float((u[:-lag] * u[lag:]).mean())) < 5 / math.sqrt(n - lag)
    assert key.tolist() == [9, 1]
    again, _ = rademacher_like(params, rng_key(9))
    other, _ = rademacher_like(params, rng_key(10))
    assert torch.equal(again["a"], probes["a"]) and not torch.equal(other["a"], probes["a"])


def test_gnb_compiles_fullgraph_to_the_same_bits():
    """The hash RNG, the sampler and the vjp trace into one graph (no host sync, no
    torch.Generator)."""
    params, x = _softmax_regression()
    fn = torch.compile(lambda p, b, k: ft.gnb_hessian(_logits, p, b, k), fullgraph=True,
                       backend="aot_eager")
    eager, k1 = ft.gnb_hessian(_logits, params, x, rng_key(1))
    compiled, k2 = fn(params, x, rng_key(1))
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=0)
    assert torch.equal(k1, k2)


def test_squared_gradients():
    g = [torch.tensor([1.0, -2.0], dtype=torch.bfloat16), None]
    out = squared_gradients(g, 3.0)
    assert out[1] is None and out[0].dtype == torch.float32
    assert out[0].tolist() == [3.0, 12.0]


def test_bad_inputs_raise_naming_the_problem():
    params, x = _softmax_regression()
    with pytest.raises(ValueError, match="key"):
        ft.gnb_hessian(_logits, params, x, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="key"):
        ft.gnb_hessian(_logits, params, x, [0, 0])
    with pytest.raises(TypeError, match="'w'"):
        ft.gnb_hessian(_logits, {"w": torch.zeros(3, 4, dtype=torch.int64)}, x, rng_key(0))
    with pytest.raises(TypeError, match="logits"):
        ft.gnb_hessian(lambda p, b: (_logits(p, b),), params, x, rng_key(0))
    with pytest.raises(ValueError, match="clip_norm"):
        ft.gnb_hessian(_logits, params, x, rng_key(0), clip_norm=0.0)
    with pytest.raises(ValueError, match="num_probes"):
        ft.hutchinson_hessian(_mlp_loss, _mlp_params(), _mlp_batch(), rng_key(0), num_probes=0)
    with pytest.raises(ValueError, match="seed"):
        rng_key(-1)
