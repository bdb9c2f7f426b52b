"""Sophia (docs/algorithms.md section 12): reductions R12, R13, R36, the reference's Hessian
cadence, the Hessian EMA, training with the GNB estimator, functional ≡ torch.optim adapter
(bitwise), and save → load → continue (bitwise, RNG included)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_trees_equal, clone_tree, pytrees, random_like_tree, tensor_leaves
from functim.adapters import Sophia
from hypothesis import assume, given
from hypothesis import strategies as st

import functim as ft
from functim.hessian import rng_key, sample_categorical, squared_gradients

seeds = st.integers(0, 2**31 - 1)
betas = st.floats(0.0, 0.999)
lrs = st.floats(1e-4, 0.5)
wds = st.floats(0.0, 0.5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: threads only add overhead (and noise on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- R12: h = 0 (or rho = 0) => Sophia == Lion(beta1, beta1) --------------------------------------
@given(params=pytrees(), seed=seeds, lr=lrs, wd=wds, b1=betas, b2=betas,
       rho=st.floats(0.0, 10.0), bs=st.floats(0.0, 1e4), zero_rho=st.booleans())
def test_r12_sophia_without_curvature_is_lion(params, seed, lr, wd, b1, b2, rho, bs, zero_rho):
    """Before the first Hessian update (h = 0), or with rho = 0 whatever h is, Sophia is
    bitwise Lion(lr, (b1, b1), wd), exactly where |m| >= eps (1e-15)."""
    sophia = ft.sophia(lr=lr, betas=(b1, b2), rho=0.0 if zero_rho else rho, weight_decay=wd,
                       bs=bs)
    lion = ft.lion(lr=lr, betas=(b1, b1), weight_decay=wd)
    s_state, l_state = sophia.init_state(params), lion.init_state(params)
    p_s, p_l = params, params
    gen = torch.Generator().manual_seed(seed)
    for _ in range(4):
        grads = random_like_tree(params, gen)
        hess = None
        if zero_rho:  # a positive curvature estimate every step: rho = 0 ignores it
            hess = ft._tree.map_tree(lambda x: x.abs() + 1.0, random_like_tree(params, gen))
        p_s, s_state = sophia.update(p_s, grads, s_state, hessian=hess)
        p_l, l_state = lion.update(p_l, grads, l_state)
        # precondition (exact conditions of R12): no 0 < |m| < eps
        assume(all(bool(((m.abs() >= 1e-15) | (m == 0)).all())
                   for m in tensor_leaves(s_state["exp_avg"])))
        assert_trees_equal(p_s, p_l)
        assert_trees_equal(s_state["exp_avg"], l_state["exp_avg"])


# -- R13: |dp + lr*wd*p| <= lr elementwise, always ------------------------------------------------
@given(params=pytrees(dtypes=(torch.float64,)), seed=seeds, lr=lrs, wd=wds, b1=betas,
       rho=st.floats(0.0, 100.0), bs=st.sampled_from([1.0, 7.0, 5120.0]),
       eps=st.sampled_from([1e-15, 1e-12, 1e-3]), zero_p=st.booleans())
def test_r13_every_step_is_bounded_by_lr(params, seed, lr, wd, b1, rho, bs, eps, zero_p):
    gen = torch.Generator().manual_seed(seed)
    if zero_p:
        params = ft._tree.map_tree(torch.zeros_like, params)
    opt = ft.sophia(lr=lr, betas=(b1, 0.9), rho=rho, weight_decay=wd, bs=bs, eps=eps)
    state = opt.init_state(params)
    # arbitrary momentum and curvature, including zeros and negative curvature (Hutchinson)
    state["exp_avg"] = random_like_tree(params, gen)
    scale = torch.tensor([0.0, 1e-6, 1.0, 1e3], dtype=torch.float64)
    state["hessian"] = ft._tree.map_tree(
        lambda x: x * scale[torch.randint(0, 4, x.shape, generator=gen)],
        random_like_tree(params, gen))
    grads = ft._tree.map_tree(lambda x: x * 100, random_like_tree(params, gen))
    new, _ = opt.update(params, grads, state)
    for p, q in zip(tensor_leaves(params), tensor_leaves(new)):
        decayed = p * (1 - lr * wd)
        if zero_p:  # q = -lr*u exactly: the bound holds without rounding slack
            assert bool((q.abs() <= lr).all())
        else:  # one rounding of the final addition
            ulp = torch.nextafter(q.abs(), torch.tensor(float("inf"), dtype=q.dtype)) - q.abs()
            assert bool(((q - decayed).abs() <= lr * (1 + 2**-50) + ulp).all())


@given(params=pytrees(dtypes=(torch.float64,)), seed=seeds, lr=lrs, wd=wds, b1=betas)
def test_diagonal_newton_regime(params, seed, lr, wd, b1):
    """R36: where |m| <= rho*bs*h, dp = -lr*m/(rho*bs*h) - lr*wd*p."""
    gen = torch.Generator().manual_seed(seed)
    opt = ft.sophia(lr=lr, betas=(b1, 0.9), rho=0.5, weight_decay=wd, bs=4.0)
    state = opt.init_state(params)
    grads = random_like_tree(params, gen)
    m = ft._tree.map_tree(lambda p, g: torch.lerp(torch.zeros_like(g), g, 1 - b1), params, grads)
    state["hessian"] = ft._tree.map_tree(lambda x: x.abs() + 0.1, m)  # 2*h > |m|
    new, _ = opt.update(params, grads, state)
    for p, q, mm, h in zip(*(tensor_leaves(t) for t in (params, new, m, state["hessian"]))):
        expected = p * (1 - lr * wd) - lr * mm / (0.5 * 4.0 * h)
        torch.testing.assert_close(q, expected, rtol=1e-12, atol=1e-14)


# -- the Hessian EMA and the reference cadence ----------------------------------------------------
def _tiny(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=g, dtype=dtype),
            "b": torch.randn(3, generator=g, dtype=dtype), "frozen": None}


def test_hessian_ema_and_update_with_hessian():
    params = _tiny()
    gen = torch.Generator().manual_seed(1)
    opt = ft.sophia(lr=1e-2, betas=(0.9, 0.8), rho=0.1)
    state = opt.init_state(params)
    state["hessian"] = ft._tree.map_tree(lambda x: x.abs(), random_like_tree(params, gen))
    est = ft._tree.map_tree(lambda x: x.abs(), random_like_tree(params, gen))
    est["b"] = None  # a None estimate leaves that h alone
    grads = random_like_tree(params, gen)

    new = opt.update_hessian(state, est)
    torch.testing.assert_close(new["hessian"]["w"],
                               0.8 * state["hessian"]["w"] + 0.2 * est["w"], rtol=1e-14,
                               atol=0)
    assert new["hessian"]["b"] is state["hessian"]["b"] and new["hessian"]["frozen"] is None
    assert new["step"] is state["step"] and new["rng"] is state["rng"]
    # update(hessian=) applies the EMA first, then the step
    p1, s1 = opt.update(params, grads, state, hessian=est)
    p2, s2 = opt.update(params, grads, new)
    assert_trees_equal((p1, s1), (p2, s2))
    # donated: the same numbers, written in place; pure: inputs untouched
    before = clone_tree(state)
    p3, s3 = opt.update(clone_tree(params), grads, clone_tree(state), hessian=est, donate=True)
    assert_trees_equal((p3, s3), (p1, s1))
    assert_trees_equal(state, before)
    h = clone_tree(state)
    h_w = h["hessian"]["w"]
    out = opt.update_hessian(h, est, donate=True)
    assert out["hessian"]["w"] is h_w and torch.equal(h_w, new["hessian"]["w"])


def test_reference_cadence_h_changes_after_steps_k_2k():
    """With hessian_due driving the estimates, h changes only at the updates right after steps
    k, 2k (h is zero during steps 1..k, which are Lion steps)."""
    k = 3
    params = _tiny()
    opt = ft.sophia(lr=1e-2, hessian_interval=k)
    lion = ft.lion(lr=1e-2, betas=(0.965, 0.965), weight_decay=0.1)
    state, l_state, p_l = opt.init_state(params), lion.init_state(params), params
    gen = torch.Generator().manual_seed(2)
    changed = []
    for t in range(10):  # t completed updates before this one
        assert opt.hessian_due(t) == opt.hessian_due(state) == (t in (3, 6, 9))
        grads = random_like_tree(params, gen)
        hess = (ft._tree.map_tree(lambda x: x.abs() + 1, random_like_tree(params, gen))
                if opt.hessian_due(state) else None)
        old_h = state["hessian"]["w"]
        params, state = opt.update(params, grads, state, hessian=hess)
        changed.append(not torch.equal(state["hessian"]["w"], old_h))
        if t < k:
            p_l, l_state = lion.update(p_l, grads, l_state)
            assert_trees_equal(params, p_l)
    assert [t for t, c in enumerate(changed) if c] == [3, 6, 9]
    assert int(state["step"]) == 10 and state["rng"].tolist() == [0, 0]


def test_bad_inputs_raise_before_anything_is_written():
    params = _tiny()
    opt = ft.sophia(lr=1e-2)
    state = opt.init_state(params)
    grads = ft._tree.map_tree(torch.ones_like, params)
    before_p, before_s = clone_tree(params), clone_tree(state)
    bad = {"w": torch.ones(3, 4, dtype=torch.float64), "b": None, "frozen": None}
    with pytest.raises(ValueError, match="'w'"):
        opt.update(params, grads, state, hessian=bad, donate=True)
    with pytest.raises(ValueError, match="structure"):
        opt.update_hessian(state, {"w": torch.ones(4, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="frozen"):
        opt.update_hessian(state, {**bad, "w": None, "frozen": torch.ones(1)})
    with pytest.raises(TypeError, match="floating"):
        opt.update_hessian(state, {**bad, "w": torch.ones(4, 3, dtype=torch.int64)})
    assert_trees_equal((params, state), (before_p, before_s))
    no_rng = {k: v for k, v in state.items() if k != "rng"}
    with pytest.raises(ValueError, match="rng"):
        opt.update(params, grads, no_rng)
    with pytest.raises(ValueError, match="rng"):
        opt.update(params, grads, {**state, "rng": torch.zeros(2)})
    with pytest.raises(ValueError, match="eps"):
        ft.sophia(eps=0.0)
    with pytest.raises(ValueError, match="hessian_interval"):
        ft.sophia(hessian_interval=0)
    with pytest.raises(ValueError, match="seed"):
        ft.sophia(seed=-1)
    with pytest.raises(ValueError, match="beta2"):
        ft.sophia(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="capturable"):
        Sophia([torch.nn.Parameter(torch.ones(2))], capturable=True)


# -- training -------------------------------------------------------------------------------------
def _mlp_params(gen):
    return {"w1": torch.randn(8, 16, generator=gen) * 0.3, "b1": torch.zeros(16),
            "w2": torch.randn(16, 4, generator=gen) * 0.3, "b2": torch.zeros(4)}


def _mlp_logits(p, x):
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def test_200_steps_with_gnb_lower_the_loss():
    gen = torch.Generator().manual_seed(0)
    x_all = torch.randn(256, 8, generator=gen)
    y_all = (x_all @ (torch.randn(8, 4, generator=gen) * 2)).argmax(-1)  # a teacher's labels
    params = _mlp_params(gen)

    def loss_fn(p, x, y):
        return F.cross_entropy(_mlp_logits(p, x), y)

    opt = ft.sophia(lr=1e-2, rho=0.04, weight_decay=0.0)
    state = opt.init_state(params)
    initial = float(loss_fn(params, x_all, y_all))
    estimates = 0
    for t in range(200):
        idx = torch.arange(t * 32, t * 32 + 32) % 256
        x, y = x_all[idx], y_all[idx]
        grads = torch.func.grad(loss_fn)(params, x, y)
        hess = None
        if opt.hessian_due(t):
            hess, rng = ft.gnb_hessian(_mlp_logits, params, x, state["rng"])
            state = {**state, "rng": rng}
            estimates += 1
        params, state = opt.update(params, grads, state, hessian=hess)
    final = float(loss_fn(params, x_all, y_all))
    assert estimates == 19 and state["rng"].tolist() == [0, 19]
    assert all(bool((h > 0).any()) for h in tensor_leaves(state["hessian"]))
    assert final < 0.1 * initial, (initial, final)


# -- functional == adapter, bitwise ---------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _batches(n=9):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
            for _ in range(n)]


def _hutch_loss(y):
    return lambda out: F.cross_entropy(out, y)


def _adapter_run(model, opt, batches, estimator):
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if opt.hessian_due():
            if estimator == "gnb":
                opt.update_hessian(model=model, inputs=x, clip_norm=0.5)
            elif estimator == "hutchinson":
                opt.update_hessian(model=model, inputs=x, estimator="hutchinson",
                                   loss_fn=_hutch_loss(y), num_probes=2)
            else:  # the reference's protocol: sampled labels, backward, update_hessian()
                logits = model(x)
                F.cross_entropy(logits, opt.sample_labels(logits)).backward()
                opt.update_hessian()
                opt.zero_grad()


def _functional_run(model, opt, params, state, batches, estimator):
    """The same loop with the functional API; grads come from the same module code (loaded with
    the functional params), so both sides see bitwise the same gradients."""
    def forward(ps, inputs):
        return torch.func.functional_call(model, ps, inputs)

    def grads_of(loss_of_logits, x):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n])
        loss_of_logits(model(x)).backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        return g

    for x, y in batches:
        params, state = opt.update(params, grads_of(_hutch_loss(y), x), state)
        if opt.hessian_due(state):
            if estimator == "gnb":
                est, rng = ft.gnb_hessian(forward, params, (x,), state["rng"], clip_norm=0.5)
            elif estimator == "hutchinson":
                est, rng = ft.hutchinson_hessian(
                    lambda ps, inp, y=y: F.cross_entropy(forward(ps, inp), y), params, (x,),
                    state["rng"], num_probes=2)
            else:
                labels, rng = sample_categorical(forward(params, (x,)), state["rng"])
                g = grads_of(lambda out, labels=labels: F.cross_entropy(out, labels), x)
                leaves, spec = ft._tree.flatten(g)
                est = ft._tree.unflatten(spec, squared_gradients(leaves))
            state = opt.update_hessian({**state, "rng": rng}, est)
    return params, state


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson", "reference"])
def test_functional_and_adapter_agree_bitwise(estimator):
    kw = dict(lr=1e-2, betas=(0.9, 0.95), rho=0.05, weight_decay=0.1, hessian_interval=2,
              seed=5, bs=6.0 if estimator == "reference" else 1.0)
    batches = _batches()
    model = _model()
    opt = Sophia(model.named_parameters(), **kw)
    _adapter_run(model, opt, batches, estimator)

    fmodel = _model()
    fopt = ft.sophia(**kw)
    params = {n: p.detach().clone() for n, p in fmodel.named_parameters()}
    params, state = _functional_run(fmodel, fopt, params, fopt.init_state(params), batches,
                                    estimator)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert torch.equal(opt.state[p]["hessian"], state["hessian"][n]), n
        assert torch.equal(opt.state[p]["exp_avg"], state["exp_avg"][n]), n
        assert bool((state["hessian"][n] != 0).any())  # the estimates did reach h
    assert torch.equal(opt.rng, state["rng"]) and int(opt.rng[1]) > 0


# -- save -> load -> continue, bitwise ------------------------------------------------------------
def test_functional_resume_is_bitwise_including_the_rng():
    gen = torch.Generator().manual_seed(0)
    params0 = _mlp_params(gen)
    data = [torch.randn(16, 8, generator=gen) for _ in range(12)]
    opt = ft.sophia(lr=1e-2, hessian_interval=2)

    def run(params, state, xs):
        for x in xs:
            grads = torch.func.grad(lambda p, x=x: _mlp_logits(p, x).logsumexp(-1).mean())(params)
            hess = None
            if opt.hessian_due(state):
                hess, rng = ft.gnb_hessian(_mlp_logits, params, x, state["rng"])
                state = {**state, "rng": rng}
            params, state = opt.update(params, grads, state, hessian=hess)
        return params, state

    ref = run(params0, opt.init_state(params0), data)
    mid = run(params0, opt.init_state(params0), data[:5])
    buf = io.BytesIO()
    torch.save(mid, buf)
    buf.seek(0)
    resumed = run(*torch.load(buf, weights_only=True), data[5:])
    assert_trees_equal(resumed, ref)
    # the RNG matters: resuming with a fresh key gives other labels, other params
    p_mid, s_mid = mid
    other = run(p_mid, {**s_mid, "rng": rng_key(1)}, data[5:])
    assert not torch.equal(other[0]["w1"], ref[0]["w1"])


def test_adapter_resume_is_bitwise_including_the_rng():
    batches = _batches(12)
    ref = _model()
    ref_opt = Sophia(ref.named_parameters(), lr=1e-2, hessian_interval=2, seed=3)
    _adapter_run(ref, ref_opt, batches, "gnb")

    def resumed(keep_rng: bool):
        model = _model()
        opt = Sophia(model.named_parameters(), lr=1e-2, hessian_interval=2, seed=3)
        _adapter_run(model, opt, batches[:5], "gnb")
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        model2 = _model()
        model2.load_state_dict(saved["model"])
        opt2 = Sophia(model2.named_parameters(), lr=1e-2, hessian_interval=2, seed=3)
        opt2.load_state_dict(saved["opt"])
        assert opt2.rng.dtype == torch.int64 and opt2.rng.tolist() == [3, 2]
        assert all(opt2.state[p]["rng"] is opt2.rng for p in model2.parameters())
        if not keep_rng:
            opt2.rng.copy_(rng_key(3))
        _adapter_run(model2, opt2, batches[5:], "gnb")
        return model2, opt2

    model2, opt2 = resumed(True)
    for a, b in zip(ref.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(ref_opt.rng, opt2.rng)
    model3, _ = resumed(False)
    assert not all(torch.equal(a, b) for a, b in zip(ref.parameters(), model3.parameters()))


def test_adapter_step_bs_and_reference_update_hessian():
    model = _model()
    opt = Sophia(model.named_parameters(), lr=1e-2, hessian_interval=3)
    x, y = _batches(1)[0]
    assert not opt.hessian_due()
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
        opt.step(bs=480.0)
    assert opt.hessian_due() and all(g["bs"] == 480.0 for g in opt.param_groups)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: opt.state[p]["hessian"].clone() for n, p in model.named_parameters()}
    opt.update_hessian()  # h <- b2*h + (1-b2)*g^2, as the reference's update_hessian()
    for n, p in model.named_parameters():
        torch.testing.assert_close(opt.state[p]["hessian"],
                                   0.99 * before[n] + 0.01 * grads[n] ** 2, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="no parameter named"):
        opt.update_hessian({"nope": torch.ones(1)})
    with pytest.raises(ValueError, match="'0.weight'"):
        opt.update_hessian({"0.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="not a parameter of the model"):
        opt.update_hessian(model=torch.nn.Linear(5, 3), inputs=x)


def test_adapter_warns_when_the_hessian_is_never_updated():
    """Sophia without Hessian updates silently becomes a clipped sign method (h stays 0): the
    adapter warns once, after 2k + 1 steps without update_hessian(), and not when it is fed."""
    import warnings

    p = torch.nn.Parameter(torch.ones(3))

    def steps(opt, n, feed):
        for _ in range(n):
            p.grad = torch.ones(3)
            opt.step()
            if feed and opt.hessian_due():
                opt.update_hessian()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps(Sophia([p], hessian_interval=2), 12, feed=True)
        opt = Sophia([p], hessian_interval=2)
        steps(opt, 4, feed=False)
    with pytest.warns(UserWarning, match="5 steps without update_hessian"):
        steps(opt, 1, feed=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps(opt, 10, feed=False)  # once only
