"""Newton–Schulz, Muon (with its AdamW fallback) and Scion: reference parity and the reductions of
docs/algorithms.md (R14–R16, R21–R24, R37), routing, N-D views, surfaces and state."""

import io

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import functim as ft
from functim import adapters
from functim.linalg import orthogonalize

F64 = torch.float64


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _with_singular_values(m: int, n: int, s: list[float], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, V = _orthogonal(m, gen)[:, :k], _orthogonal(n, gen)[:, :k]
    return U @ torch.diag(torch.tensor(s[:k], dtype=F64)) @ V.T


# -- Newton–Schulz ------------------------------------------------------------------------------
@given(m=st.integers(2, 12), n=st.integers(2, 12), seed=st.integers(0, 2**16),
       s=st.lists(st.floats(0.01, 1.0), min_size=12, max_size=12))
def test_r21_ns5_singular_values_in_band(m, n, s, seed):
    G = _with_singular_values(m, n, s, seed)
    sv = torch.linalg.svdvals(G)
    assume(bool((sv / torch.linalg.matrix_norm(G) >= 3e-3).all()))
    out = torch.linalg.svdvals(orthogonalize(G, dtype=F64))
    assert out.min() >= 0.6818 and out.max() <= 1.2024, out


@given(m=st.integers(2, 9), n=st.integers(2, 9), seed=st.integers(0, 2**16),
       c=st.floats(1e-3, 1e3))
def test_r22_ns5_scale_transpose_orthogonal_equivariance(m, n, seed, c):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(m, n, generator=gen, dtype=F64)
    ns = lambda x: orthogonalize(x, dtype=F64, eps=0.0)  # noqa: E731
    out = ns(G)
    torch.testing.assert_close(ns(c * G), out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ns(G.T), out.T, rtol=1e-10, atol=1e-12)
    U, V = _orthogonal(m, gen), _orthogonal(n, gen)
    torch.testing.assert_close(ns(U @ G @ V), U @ out @ V, rtol=1e-10, atol=1e-10)


def test_ns5_batched_equals_one_by_one_and_default_dtypes():
    G = torch.randn(3, 5, 4, dtype=F64)
    batched = orthogonalize(G)
    assert batched.dtype == F64  # float64 stays float64 on CPU
    for i in range(3):
        torch.testing.assert_close(batched[i], orthogonalize(G[i]), rtol=1e-13, atol=1e-14)
    assert orthogonalize(G.float()).dtype == torch.float32
    assert orthogonalize(G.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="matrix"):
        orthogonalize(torch.ones(3))


# -- Muon vs torch.optim.Muon (R23) -------------------------------------------------------------
def _torch_ns_float64(grad, ns_coefficients, ns_steps, eps):
    """torch.optim._muon's Newton–Schulz, in float64 instead of bfloat16 (the test's reference)."""
    a, b, c = ns_coefficients
    X = grad.to(F64)
    if grad.size(0) > grad.size(1):
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(ns_steps):
        A = X @ X.T
        X = a * X + torch.addmm(A, A, A, beta=b, alpha=c) @ X
    if grad.size(0) > grad.size(1):
        X = X.T
    return X


@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
@given(shapes=st.lists(st.tuples(st.integers(2, 10), st.integers(2, 10)), min_size=1,
                       max_size=3), seed=st.integers(0, 2**16),
       nesterov=st.booleans(), wd=st.sampled_from([0.0, 0.1]))
def test_r23_muon_matches_torch_optim_muon(adjust, shapes, seed, nesterov, wd):
    from unittest import mock
    with mock.patch("torch.optim._muon._zeropower_via_newtonschulz", _torch_ns_float64):
        _check_against_torch_muon(adjust, shapes, seed, nesterov, wd)


def _check_against_torch_muon(adjust, shapes, seed, nesterov, wd):
    gen = torch.Generator().manual_seed(seed)
    init = {f"w{i}": torch.randn(*s, generator=gen, dtype=F64) for i, s in enumerate(shapes)}
    grads = [{k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in init.items()}
             for _ in range(10)]
    ref = {k: v.clone().requires_grad_() for k, v in init.items()}
    topt = torch.optim.Muon(list(ref.values()), lr=0.02, weight_decay=wd, nesterov=nesterov,
                            adjust_lr_fn=adjust, eps=0.0)
    # eps=0 on both sides: torch clamps the norm at eps, Keller (functim) adds eps
    opt = ft.muon(lr=0.02, weight_decay=wd, nesterov=nesterov, eps=0.0, ns_dtype=F64,
                  muon_params="*", scale_mode="keller" if adjust is None else "moonlight")
    params, state = init, opt.init_state(init)
    for g in grads:
        for k, p in ref.items():
            p.grad = g[k].clone()
        topt.step()
        params, state = opt.update(params, g, state)
    for k in init:
        torch.testing.assert_close(params[k], ref[k].detach(), rtol=1e-10, atol=1e-12)


def _muon_run(opt, params, grads):
    state = opt.init_state(params)
    for g in grads:
        params, state = opt.update(params, g, state)
    return params, state


def _random(shapes, steps, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(*s, generator=gen, dtype=dtype) for k, s in shapes.items()}
    grads = [{k: torch.randn(*s, generator=gen, dtype=dtype) for k, s in shapes.items()}
             for _ in range(steps)]
    return params, grads


@given(seed=st.integers(0, 2**16), beta=st.floats(0.5, 0.99), nesterov=st.booleans())
def test_r24_ema_momentum_equals_sum_momentum(seed, beta, nesterov):
    params, grads = _random({"a": (6, 4), "b": (3, 7)}, 6, seed)
    kw = dict(momentum=beta, nesterov=nesterov, ns_dtype=F64, muon_params="*")
    ema, _ = _muon_run(ft.muon(eps=0.0, **kw), params, grads)
    total, _ = _muon_run(ft.muon(eps=0.0, momentum_form="sum", **kw), params, grads)
    for k in params:  # exact up to rounding without the NS epsilon
        torch.testing.assert_close(ema[k], total[k], rtol=1e-10, atol=1e-12)
    ema, _ = _muon_run(ft.muon(**kw), params, grads)
    total, _ = _muon_run(ft.muon(momentum_form="sum", **kw), params, grads)
    for k in params:  # the default eps=1e-7 makes them differ by about eps/‖u‖
        torch.testing.assert_close(ema[k], total[k], rtol=1e-5, atol=1e-7)


def test_scale_modes_are_the_documented_multiples_of_keller():
    params, grads = _random({"tall": (12, 3), "wide": (3, 12), "sq": (5, 5)}, 1, 0)
    deltas = {}
    for mode in ("keller", "moonlight", "consistent_rms", "none"):
        out, _ = _muon_run(ft.muon(scale_mode=mode, consistent_rms=0.3, ns_dtype=F64,
                                   muon_params="*"), params, grads)
        deltas[mode] = {k: out[k] - params[k] for k in params}
    for k, (r, c) in {"tall": (12, 3), "wide": (3, 12), "sq": (5, 5)}.items():
        keller = max(1, r / c) ** 0.5
        for mode, mult in (("moonlight", 0.2 * max(r, c) ** 0.5),
                           ("consistent_rms", 0.3 * max(r, c) ** 0.5), ("none", 1.0)):
            torch.testing.assert_close(deltas[mode][k], deltas["keller"][k] * (mult / keller),
                                       rtol=1e-12, atol=1e-15)


# -- routing and the AdamW side -----------------------------------------------------------------
LM = {"wte.weight": (16, 8), "blocks.0.attn.wq.weight": (8, 8), "blocks.0.mlp.fc.weight": (32, 8),
      "blocks.0.mlp.fc.bias": (32,), "blocks.0.ln_1.weight": (8,), "lm_head.weight": (16, 8)}


def test_default_routing_table():
    params = {k: torch.zeros(s) for k, s in LM.items()}
    labels = ft.muon().explain(params).labels()
    assert labels == {"wte.weight": "adamw", "blocks.0.attn.wq.weight": "muon",
                      "blocks.0.mlp.fc.weight": "muon", "blocks.0.mlp.fc.bias": "adamw",
                      "blocks.0.ln_1.weight": "adamw", "lm_head.weight": "adamw"}
    table = str(ft.muon().explain(params))
    assert "lm_head.weight" in table and "claimed by" in table


def test_megalodon_routing_by_globs():
    names = ["layers.0.attn.wz", "layers.0.attn.wv", "layers.0.attn.wr", "layers.0.attn.wh1",
             "layers.0.attn.wh2", "layers.0.attn.cema.alpha", "layers.0.ffn.fc1",
             "layers.0.ffn.fc2", "layers.0.ffn.fc3", "layers.0.ffn.norm.weight", "embed.weight",
             "lm_head"]
    params = {n: torch.zeros(4, 4) if not n.endswith(("alpha", "norm.weight")) else
              torch.zeros(4, 4, 1) for n in names}
    opt = ft.muon(muon_params=["*attn.w[zvr]", "*attn.wh[12]", "*ffn.fc[123]", "lm_head"])
    labels = opt.explain(params).labels()
    assert {n for n, lab in labels.items() if lab == "muon"} == {
        n for n in names if n.split(".")[-1] in ("wz", "wv", "wr", "wh1", "wh2", "fc1", "fc2",
                                                 "fc3") or n == "lm_head"}
    state = opt.init_state(params)  # 3-D AdamW leaves need no matrix view
    assert state["momentum_buffer"]["layers.0.attn.cema.alpha"] is None


def test_adamw_side_is_adamw_with_ratio_lr_and_schedule_drives_both():
    params, grads = _random({"h.w": (6, 4), "h.b": (4,), "wte.weight": (10, 4)}, 4, 1)
    sched = ft.warmup_cosine(0.02, warmup_steps=2, total_steps=10)
    opt = ft.muon(lr=sched, adamw_lr_ratio=0.5, adamw_betas=(0.8, 0.9), adamw_eps=1e-9,
                  adamw_weight_decay=0.1, fused=False)
    out, state = _muon_run(opt, params, grads)
    side = {"h.b", "wte.weight"}
    ref_opt = ft.adamw(lr=ft.warmup_cosine(0.01, warmup_steps=2, total_steps=10), betas=(0.8, 0.9),
                       eps=1e-9, weight_decay=0.1, fused=False)
    ref, _ = _muon_run(ref_opt, {k: params[k] for k in side},
                       [{k: g[k] for k in side} for g in grads])
    for k in side:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-14, atol=1e-16)
    assert state["exp_avg"]["h.w"] is None and state["momentum_buffer"]["h.b"] is None
    # an absolute adamw_lr instead of the ratio
    opt2 = ft.muon(lr=0.02, adamw_lr=3e-3, fused=False)
    assert "adamw_lr" in ft.get_hyperparams(opt2.init_state(params))


def test_nd_leaves_need_declared_matrix_dims():
    params = {"conv.weight": torch.randn(8, 3, 3, 3, dtype=F64),
              "experts.w": torch.randn(4, 6, 5, dtype=F64)}
    with pytest.raises(ValueError, match="conv.weight.*matrix_dims"):
        ft.muon(muon_params="*").init_state(params)
    dims = {"conv.*": ft.MatrixDims(), "experts.*": ft.MatrixDims(batch=(0,), rows=(1,))}
    opt = ft.muon(muon_params="*", matrix_dims=dims, ns_dtype=F64)
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(3)]
    out, _ = _muon_run(opt, params, grads)
    # conv: the same as Muon on the (out, in·k·k) matrix; experts: as Muon on each expert
    flat = ft.muon(muon_params="*", ns_dtype=F64)
    conv, _ = _muon_run(flat, {"w": params["conv.weight"].reshape(8, 27)},
                        [{"w": g["conv.weight"].reshape(8, 27)} for g in grads])
    torch.testing.assert_close(out["conv.weight"], conv["w"].reshape(8, 3, 3, 3),
                               rtol=1e-12, atol=1e-14)
    for e in range(4):
        one, _ = _muon_run(flat, {"w": params["experts.w"][e]},
                           [{"w": g["experts.w"][e]} for g in grads])
        torch.testing.assert_close(out["experts.w"][e], one["w"], rtol=1e-12, atol=1e-14)


def test_bfloat16_params_keep_float32_momentum():
    params = {"w": torch.randn(8, 4).bfloat16(), "b": torch.randn(4).bfloat16()}
    opt = ft.muon(muon_params="w")
    state = opt.init_state(params)
    assert state["momentum_buffer"]["w"].dtype == torch.float32
    assert state["exp_avg"]["b"].dtype == torch.float32
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    new, state = opt.update(params, grads, state)
    assert new["w"].dtype == torch.bfloat16 and not torch.equal(new["w"], params["w"])


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": -1.0}, "lr"), ({"momentum": 1.0}, "momentum"), ({"scale_mode": "kimi"}, "scale_mode"),
    ({"momentum_form": "heavy"}, "momentum_form"), ({"adamw_betas": (0.9, 1.0)}, "adamw_beta2"),
    ({"ns_steps": -1}, "ns_steps"), ({"routing": [ft.Rule("sgd")]}, "labels"),
])
def test_bad_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ft.muon(**kwargs)


def test_bad_inputs_fail_before_anything_is_written():
    params = {"w": torch.randn(4, 4), "v": torch.randn(4)}
    opt = ft.muon(muon_params="*")
    with pytest.raises(ValueError, match="'v'.*needs a matrix"):
        opt.init_state(params)
    opt = ft.muon()
    with pytest.raises(ValueError, match="was not made by muon"):
        opt.update(params, params, ft.adamw().init_state(params))
    state = opt.init_state(params)
    before = {k: v.clone() for k, v in params.items()}
    with pytest.raises(ValueError):
        opt.update(params, {"w": torch.randn(4, 4)}, state, donate=True)
    assert all(torch.equal(params[k], before[k]) for k in params)


# -- Scion --------------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**16), alpha=st.floats(0.05, 1.0), lr=st.floats(1e-3, 0.5),
       constrained=st.booleans())
def test_r14_r15_scion_spectral_is_muon_without_nesterov(seed, alpha, lr, constrained):
    params, grads = _random({"a": (6, 4), "b": (3, 7)}, 5, seed)
    scion = ft.scion(lr=lr, momentum=alpha, unconstrained=not constrained,
                     norms={"hidden": ft.Spectral(max=True)}, ns_dtype=F64)
    muon = ft.muon(lr=lr, momentum=1 - alpha, nesterov=False, weight_decay=float(constrained),
                   ns_dtype=F64, muon_params="*")
    a, _ = _muon_run(scion, params, grads)
    b, _ = _muon_run(muon, params, grads)
    for k in params:
        torch.testing.assert_close(a[k], b[k], rtol=1e-13, atol=1e-14)


@given(seed=st.integers(0, 2**16), alpha=st.floats(0.05, 0.95), scale=st.floats(0.1, 10.0))
def test_r16_scion_sign_unconstrained_is_signum(seed, alpha, scale):
    params, grads = _random({"a": (6, 4), "b": (3, 7)}, 5, seed)
    scion = ft.scion(lr=0.01, momentum=alpha, unconstrained=True,
                     norms={"hidden": ft.Sign(normalized=False, scale=scale)})
    a, _ = _muon_run(scion, params, grads)
    b, _ = _muon_run(ft.signum(lr=0.01 * scale, beta=1 - alpha), params, grads)
    for k in params:
        torch.testing.assert_close(a[k], b[k], rtol=1e-14, atol=1e-15)


def test_scion_without_momentum_has_no_state_and_uses_the_gradient():
    params, grads = _random({"h.w": (6, 4), "h.b": (4,)}, 1, 3)
    opt = ft.scion(lr=0.1, unconstrained=True)
    state = opt.init_state(params)
    assert set(state) == {"step", "hyperparams", "made_by"}
    out, _ = opt.update(params, grads[0], state)
    g = grads[0]["h.b"]
    torch.testing.assert_close(out["h.b"], params["h.b"] - 0.1 * g / (g.pow(2).mean().sqrt()
                                                                    + 1e-8))


def test_scion_lmo_normalisations():
    from functim.optimizers.scion import BiasRMS, ColNorm, RowNorm
    g = torch.randn(7, 5, dtype=F64)
    col = ColNorm().lmo(g)
    torch.testing.assert_close(col.pow(2).mean(0).sqrt(), torch.ones(5, dtype=F64))
    torch.testing.assert_close(ColNorm(normalized=True).lmo(g).pow(2).mean(0).sqrt(),
                               torch.full((5,), 1 / 5, dtype=F64))
    torch.testing.assert_close(ColNorm(transpose=True).lmo(g).pow(2).mean(1).sqrt(),
                               torch.ones(7, dtype=F64))
    torch.testing.assert_close(RowNorm().lmo(g).norm(dim=1), torch.full((7,), 5 ** -0.5,
                                                                        dtype=F64))
    torch.testing.assert_close(RowNorm(normalized=False).lmo(g).norm(dim=1),
                               torch.ones(7, dtype=F64))
    b = torch.randn(9, dtype=F64)
    torch.testing.assert_close(BiasRMS().lmo(b).pow(2).mean().sqrt(), torch.tensor(1.0, dtype=F64))


def test_scion_constrained_sign_stays_in_the_ball():
    """R37: with η ∈ [0, 1] and Sign(normalized), max|p| ≤ scale/d_in is kept forever."""
    scale, d_in = 3.0, 4
    gen = torch.Generator().manual_seed(0)
    params = {"w": (torch.rand(5, d_in, generator=gen, dtype=F64) * 2 - 1) * scale / d_in}
    opt = ft.scion(lr=0.3, momentum=0.5, norms={"hidden": ft.Sign(scale=scale)})
    state = opt.init_state(params)
    for _ in range(20):
        params, state = opt.update(params, {"w": torch.randn(5, d_in, generator=gen,
                                                               dtype=F64)}, state)
        assert params["w"].abs().max() <= scale / d_in * (1 + 1e-12)


def test_scion_default_routing_and_errors():
    params = {k: torch.zeros(s) for k, s in LM.items()}
    labels = ft.scion().explain(params).labels()
    assert labels["wte.weight"] == "embedding" and labels["lm_head.weight"] == "output"
    assert labels["blocks.0.mlp.fc.weight"] == "hidden" and labels["blocks.0.ln_1.weight"] == \
        "vector"
    with pytest.raises(ValueError, match="routing"):
        ft.scion(norms={"mine": ft.Sign()})
    with pytest.raises(TypeError, match="norms"):
        ft.scion(norms={"hidden": "Spectral"})
    with pytest.raises(ValueError, match="momentum"):
        ft.scion(momentum=1.5)


# -- surfaces and state -------------------------------------------------------------------------
def _lm_model():
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(16, 8)
            self.fc = torch.nn.Linear(8, 8)
            self.ln = torch.nn.LayerNorm(8)
            self.lm_head = torch.nn.Linear(8, 16, bias=False)

        def forward(self, x):
            return self.lm_head(self.ln(torch.tanh(self.fc(self.wte(x)))))

    return Tiny()


def _loss(model, x):
    return torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


BATCHES = [torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(i))
           for i in range(6)]


@pytest.mark.parametrize("make", [
    lambda: (ft.muon(lr=0.02, weight_decay=0.1),
             lambda ps: adapters.Muon(ps, lr=0.02, weight_decay=0.1)),
    lambda: (ft.scion(lr=0.01, momentum=0.1),
             lambda ps: adapters.Scion(ps, lr=0.01, momentum=0.1)),
], ids=["muon", "scion"])
def test_functional_equals_adapter_bitwise_and_resume(make):
    functional, adapter = make()
    model = _lm_model()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = functional.init_state(params)
    for x in BATCHES:
        grads = torch.func.grad(_loss_functional, argnums=1)(model, params, x)
        params, state = functional.update(params, grads, state)

    m2 = _lm_model()
    opt = adapter(m2.named_parameters())
    for i, x in enumerate(BATCHES):
        if i == 3:  # save, rebuild everything, load, continue
            buf = io.BytesIO()
            torch.save({"m": m2.state_dict(), "o": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            m2 = _lm_model()
            m2.load_state_dict(saved["m"])
            opt = adapter(m2.named_parameters())
            opt.load_state_dict(saved["o"])
        opt.zero_grad()
        _loss(m2, x).backward()
        opt.step()
    for k, v in m2.named_parameters():
        assert torch.equal(v.detach(), params[k]), k


def _loss_functional(model, params, x):
    return torch.nn.functional.cross_entropy(
        torch.func.functional_call(model, params, (x[:, :-1],)).flatten(0, 1), x[:, 1:].flatten())


def test_functional_state_resume_is_bitwise():
    params, grads = _random({"h.w": (6, 4), "h.b": (4,), "wte.weight": (10, 4)}, 6, 5)
    opt = ft.muon(weight_decay=0.1)
    full, _ = _muon_run(opt, params, grads)
    p, s = _muon_run(opt, params, grads[:3])
    buf = io.BytesIO()
    torch.save({"p": p, "s": s}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    p, s = saved["p"], saved["s"]
    for g in grads[3:]:
        p, s = opt.update(p, g, s)
    assert all(torch.equal(p[k], full[k]) for k in p)


def test_adapter_needs_names_with_default_routing():
    model = _lm_model()
    with pytest.raises(ValueError, match="named_parameters"):
        adapters.Muon(model.parameters())
    opt = adapters.Muon(model.named_parameters())
    assert "lm_head.weight" in opt.explain()
    # a scheduler scales group["lr"], and with it the AdamW side (lr ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert opt.param_groups[0]["lr"] == 0.01 and sched.get_last_lr() == [0.01]
