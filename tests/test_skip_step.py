"""Skip-step on loss spikes (functim.skip_step, functim.adapters.with_skip_step, the OLMo-core
configs' ``skip_step`` field): the rule against OLMo-core 3.0.0's ``SkipStepOptimizer``, a
skipped step changes nothing for every optimizer on every surface, checkpoints taken mid-window
resume bitwise, compile/vmap, the OLMo-core protocol and trainer, and every bad input."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
import torch._dynamo
from conftest import assert_trees_equal, clone_tree
from devices import HostTransfers
from hypothesis import given
from hypothesis import strategies as st
from test_family_contract import _grads, _params
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

import functim as ft
from functim import adapters
from functim.skip_step import WINDOW_KEYS

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
with_skip_step = adapters.with_skip_step

# one constructor per optimizer (all 15), settings that exercise their state
FUNCTIONAL = {
    "adamw": lambda: ft.adamw(lr=1e-2, weight_decay=0.1),
    "sgd": lambda: ft.sgd(lr=1e-2, momentum=0.9, weight_decay=0.1),
    "nadamw": lambda: ft.nadamw(lr=1e-2, variant="torch"),
    "cautious_adamw": lambda: ft.cautious_adamw(lr=1e-2, weight_decay=0.1),
    "cautious_lion": lambda: ft.cautious_lion(lr=1e-2, weight_decay=0.1),
    "lion": lambda: ft.lion(lr=1e-2, weight_decay=0.1),
    "signsgd": lambda: ft.signsgd(lr=1e-2, weight_decay=0.1),
    "signum": lambda: ft.signum(lr=1e-2, weight_decay=0.1),
    "mars": lambda: ft.mars(lr=1e-2, weight_decay=0.1),
    "schedule_free_adamw": lambda: ft.schedule_free_adamw(lr=1e-2, warmup_steps=2),
    "muon": lambda: ft.muon(lr=1e-2, weight_decay=0.1, adamw_weight_decay=0.1),
    "scion": lambda: ft.scion(lr=1e-2, momentum=0.1),
    "soap": lambda: ft.soap(lr=1e-2, weight_decay=0.1, precondition_frequency=2,
                            precondition_1d=True),
    "kron": lambda: ft.kron(lr=1e-2, weight_decay=0.1, balance_every=2),
    "sophia": lambda: ft.sophia(lr=1e-2, weight_decay=0.1),
}

ADAPTERS = {
    "AdamW": (adapters.AdamW, dict(lr=1e-2)),
    "SGD": (adapters.SGD, dict(lr=1e-2, momentum=0.9)),
    "NAdamW": (adapters.NAdamW, dict(lr=1e-2, variant="torch")),
    "CautiousAdamW": (adapters.CautiousAdamW, dict(lr=1e-2)),
    "CautiousLion": (adapters.CautiousLion, dict(lr=1e-2)),
    "Lion": (adapters.Lion, dict(lr=1e-2, weight_decay=0.1)),
    "SignSGD": (adapters.SignSGD, dict(lr=1e-2)),
    "Signum": (adapters.Signum, dict(lr=1e-2)),
    "Mars": (adapters.Mars, dict(lr=1e-2)),
    "ScheduleFreeAdamW": (adapters.ScheduleFreeAdamW, dict(lr=1e-2, warmup_steps=2)),
    "Muon": (adapters.Muon, dict(lr=1e-2, weight_decay=0.1)),
    "Scion": (adapters.Scion, dict(lr=1e-2, momentum=0.1)),
    "Soap": (adapters.Soap, dict(lr=1e-2, precondition_frequency=2)),
    "Kron": (adapters.Kron, dict(lr=1e-2, weight_decay=0.1, balance_every=2)),
    "Sophia": (adapters.Sophia, dict(lr=1e-2, weight_decay=0.1)),
}

WINDOW = 4  # the check starts with 2 earlier observations (max(2, 4 // 2 - 1))
LOSSES = [2.0, 2.2, 1.9, 2.1, 2.0, 2.05, 1.95, 2.1]  # a calm run; tests put spikes in
SPIKE = 100.0


def _losses(spikes=()):
    """LOSSES with SPIKE at the steps in ``spikes``."""
    return [SPIKE if t in spikes else loss for t, loss in enumerate(LOSSES)]


def _skip(opt, **kw):
    return ft.skip_spikes(opt, window=WINDOW, **kw)


# -- the rule, against OLMo-core 3.0.0's SkipStepOptimizer ---------------------------------------
observations = st.one_of(st.integers(0, 20).map(float), st.just(1000.0))


@pytest.mark.filterwarnings("ignore:std_mean")  # OLMo-core's std of one value (NaN)
@given(window=st.integers(2, 12), sigma=st.sampled_from([1.0, 2.5, 6.0]),
       values=st.lists(st.tuples(observations, observations), min_size=2, max_size=24))
def test_decisions_are_olmo_cores_for_finite_values(window, sigma, values):
    """Step by step, the same decision as OLMo-core's get_step_factor() fed the same losses and
    grad norms — except where OLMo-core compares against one earlier value (rolling interval < 6,
    second step), whose unbiased std is NaN so that it skips: here that step is not checked."""
    olmo = pytest.importorskip("olmo_core.optim.skip_step_optimizer")
    reference = olmo.SkipStepOptimizer([torch.zeros(1)], {}, rolling_interval_length=window,
                                       sigma_factor=sigma)
    opt = ft.skip_spikes(ft.sgd(lr=0.1), sigma_factor=sigma, window=window)
    params = {"x": torch.zeros(1)}
    state = opt.init_state(params)
    skipped = 0
    for t, (loss, norm) in enumerate(values):
        reference.latest_loss = torch.tensor(loss)
        reference.latest_grad_norm = torch.tensor(norm)
        olmo_took = bool(reference.get_step_factor() == 1.0)
        params, state = opt.update(params, {"x": torch.ones(1)}, state, loss=loss,
                                   grad_norm=torch.tensor(norm))
        took = not bool(state["step_skipped"])
        skipped += not took
        if window < 6 and t == 1:
            assert took and not olmo_took
        else:
            assert took == olmo_took, f"step {t}: functim took={took}, OLMo-core={olmo_took}"
    assert int(state["skipped_steps"]) == skipped
    assert int(state["observations"]) == len(values)  # skipped steps' values entered too
    assert int(state["optimizer"]["step"]) == len(values) - skipped


def test_window_holds_the_last_values_and_the_check_starts_after_half_of_them():
    """window 8: steps 0-2 are not checked (min history 3: 50.0 at step 2 is taken); a spike at
    step 4 is skipped and still enters the window; the window keeps the last 8 values (a ring
    buffer)."""
    opt = ft.skip_spikes(ft.sgd(lr=0.1), window=8)
    params = {"x": torch.zeros(1)}
    state = opt.init_state(params)
    losses = [1.0, 1.2, 50.0, 0.9, 1e4, 1.1, 0.9, 1.0, 1.05, 0.95]
    skipped = []
    for loss in losses:
        params, state = opt.update(params, {"x": torch.ones(1)}, state, loss=loss,
                                   grad_norm=1.0)
        skipped.append(bool(state["step_skipped"]))
    assert skipped == [False] * 4 + [True] + [False] * 5
    assert int(state["skipped_steps"]) == 1 and int(state["observations"]) == 10
    # slots hold observations k % 8: the last 8 losses, 90.0 included (OLMo-core keeps it too)
    ring = state["loss_window"].tolist()
    assert sorted(ring) == sorted(torch.tensor(losses[2:], dtype=torch.float32).tolist())
    assert ring[:2] == torch.tensor(losses[8:], dtype=torch.float32).tolist()


def test_grad_norm_defaults_to_the_global_norm_of_the_grads_and_its_spikes_skip():
    opt = _skip(ft.sgd(lr=0.1))
    params = _params()
    state = opt.init_state(params)
    norms = []
    for t in range(6):
        grads = _grads(t)
        if t == 5:
            grads = {k: 1e3 * g for k, g in grads.items()}
        params, state = opt.update(params, grads, state, loss=1.0)
        norms.append(float(ft.global_norm(list(grads.values()))))
        assert bool(state["step_skipped"]) == (t == 5)
    stored = state["grad_norm_window"].tolist()
    assert sorted(stored) == sorted(torch.tensor(norms[2:], dtype=torch.float32).tolist())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["loss", "grad_norm"])
def test_non_finite_observation_is_a_skipped_step_that_stays_out_of_the_window(bad, which):
    """Not an error: the step is skipped (also before the window has history, where OLMo-core
    would take it), nothing is recorded, and the next finite step is compared as before."""
    opt = _skip(ft.adamw(lr=1e-2))
    params = _params()
    state = opt.init_state(params)
    for t in range(4):
        before_p, before_s = clone_tree(params), clone_tree(state)
        values = {"loss": LOSSES[t], "grad_norm": 1.0}
        if t in (0, 3):  # no history yet / a full check
            values[which] = torch.tensor(bad)
        params, state = opt.update(params, _grads(t), state, **values)
        if t in (0, 3):
            assert_trees_equal(params, before_p)
            assert_trees_equal(state["optimizer"], before_s["optimizer"])
            for k in ("loss_window", "grad_norm_window", "observations"):
                assert torch.equal(state[k], before_s[k]), k
            assert float(state["step_skipped"]) == 1.0
    assert int(state["skipped_steps"]) == 2 and int(state["observations"]) == 2
    assert torch.isfinite(state["loss_window"]).all()


def test_sigma_factor_is_a_state_hyperparameter():
    opt = _skip(ft.sgd(lr=0.1))
    params = {"x": torch.zeros(1)}
    state = opt.init_state(params)
    for loss in [1.0, 1.2, 0.8]:
        params, state = opt.update(params, {"x": torch.ones(1)}, state, loss=loss, grad_norm=1.0)
    names = set(ft.get_hyperparams(state))
    assert "sigma_factor" in names and "optimizer.lr" in names
    assert all(n == "sigma_factor" or n.startswith("optimizer.") for n in names)
    assert state["hyperparams"]["sigma_factor"].dtype == torch.float64
    # 1.3 is 1.5 std above the mean 1.0 (std 0.2): skipped with sigma 1, taken with sigma 6
    _, low = opt.update(params, {"x": torch.ones(1)}, ft.set_hyperparams(state, sigma_factor=1.0),
                        loss=1.3, grad_norm=1.0)
    _, high = opt.update(params, {"x": torch.ones(1)}, state, loss=1.3, grad_norm=1.0)
    assert float(low["step_skipped"]) == 1.0 and float(high["step_skipped"]) == 0.0


# -- every optimizer, functional -----------------------------------------------------------------
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donate"])
@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_spike_changes_nothing_and_the_run_equals_one_without_that_step(name, donate):
    inner = FUNCTIONAL[name]()
    opt = _skip(inner)
    spike = 4
    params = _params()
    state = opt.init_state(params)
    ref_params = _params()
    ref_state = inner.init_state(ref_params)
    for t, loss in enumerate(_losses({spike})):
        grads = _grads(t)
        before_p, before_s = clone_tree(params), clone_tree(state)
        params, state = opt.update(params, grads, state, loss=torch.tensor(loss),
                                   grad_norm=1.0, donate=donate)
        assert float(state["step_skipped"]) == float(t == spike)
        if t == spike:  # bitwise: params, and the inner state (its step included)
            assert_trees_equal(params, before_p)
            assert_trees_equal(state["optimizer"], before_s["optimizer"])
        else:
            ref_params, ref_state = inner.update(ref_params, grads, ref_state)
    assert_trees_equal(params, ref_params)
    assert_trees_equal(state["optimizer"], ref_state)
    assert int(state["skipped_steps"]) == 1 and int(state["observations"]) == len(LOSSES)


RESUME_LOSSES = [2.0, 2.2, 1.9, 2.1, SPIKE, 2.0, 2.05, 1.95]  # window 8: min history 3
RESUME_AT = 4  # the spike right after resuming is caught only with the saved window


def _saved_and_loaded(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_resume_mid_window_is_bitwise(name):
    opt = ft.skip_spikes(FUNCTIONAL[name](), window=8)

    def run(params, state, steps):
        for t in steps:
            params, state = opt.update(params, _grads(t), state, loss=RESUME_LOSSES[t],
                                       grad_norm=1.0)
        return params, state

    ref = run(_params(), opt.init_state(_params()), range(len(RESUME_LOSSES)))
    params, state = run(_params(), opt.init_state(_params()), range(RESUME_AT))
    params, state = _saved_and_loaded((params, state))
    # the saved window is what catches the spike: a fresh one has no history yet
    _, fresh = opt.update(params, _grads(RESUME_AT), opt.init_state(params), loss=SPIKE,
                          grad_norm=1.0)
    assert float(fresh["step_skipped"]) == 0.0
    resumed = run(params, state, range(RESUME_AT, len(RESUME_LOSSES)))
    assert_trees_equal(resumed, ref)
    assert int(ref[1]["skipped_steps"]) == 1


def _compile_recording():
    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def record(gm, _):
        graphs.append(gm)
        return gm

    return aot_autograd(fw_compiler=record), graphs


@pytest.mark.parametrize("name,given_norm", [("adamw", True), ("lion", False)])
def test_compiled_update_equals_eager_without_recompiling(name, given_norm):
    """Losses (a spike among them) and sigma_factor change between calls: one graph, no
    recompilation, no host read in it; the same decisions as eager, and params within the
    tolerance of compiled against eager elsewhere in the tests (inductor fuses differently)."""
    opt = _skip(FUNCTIONAL[name]())
    backend, graphs = _compile_recording()
    compiled = torch.compile(opt.update, fullgraph=True, backend=backend)
    params = _params(torch.float32)
    p_c, s_c = params, opt.init_state(params)
    p_e, s_e = params, opt.init_state(params)
    for t, loss in enumerate(_losses({4})):
        extra = {"loss": torch.tensor(loss)}
        if given_norm:
            extra["grad_norm"] = torch.tensor(1.0)
        if t == 6:
            s_c = ft.set_hyperparams(s_c, sigma_factor=3.0)
            s_e = ft.set_hyperparams(s_e, sigma_factor=3.0)
        with torch._dynamo.config.patch(error_on_recompile=t > 0):
            p_c, s_c = compiled(p_c, _grads(t, torch.float32), s_c, **extra)
        p_e, s_e = opt.update(p_e, _grads(t, torch.float32), s_e, **extra)
        assert torch.equal(s_c["step_skipped"], s_e["step_skipped"]), t
        assert float(s_c["step_skipped"]) == float(t == 4)
        for k in params:
            torch.testing.assert_close(p_c[k], p_e[k], rtol=1e-6, atol=1e-7)
    assert counters["stats"]["unique_graphs"] == 1
    assert "_local_scalar_dense" not in "\n".join(gm.code for gm in graphs)
    assert torch.equal(s_c["loss_window"], s_e["loss_window"])
    assert int(s_c["optimizer"]["step"]) == len(LOSSES) - 1


def test_vmap_over_an_ensemble_equals_a_loop():
    """Each member has its own losses (its spike at its own step) and its grad norm from its own
    grads: decisions and params as a Python loop over the members."""
    opt = _skip(ft.adamw(lr=1e-2, weight_decay=0.1))
    n = 3
    losses = torch.tensor([_losses({3 + i}) for i in range(n)])  # (members, steps)
    params = _params(lead=(n,))
    state = torch.func.vmap(opt.init_state)(params)
    update = torch.func.vmap(lambda p, g, s, loss: opt.update(p, g, s, loss=loss))
    loop = [({k: v[i] for k, v in params.items()},) for i in range(n)]
    loop = [(p, opt.init_state(p)) for (p,) in loop]
    for t in range(losses.shape[1]):
        grads = _grads(t, lead=(n,))
        params, state = update(params, grads, state, losses[:, t])
        loop = [opt.update(p, {k: v[i] for k, v in grads.items()}, s, loss=losses[i, t])
                for i, (p, s) in enumerate(loop)]
        assert state["step_skipped"].tolist() == [float(t == 3 + i) for i in range(n)]
        assert state["step_skipped"].tolist() == [float(s["step_skipped"]) for _, s in loop]
    for i, (p, s) in enumerate(loop):
        for k in p:
            torch.testing.assert_close(params[k][i], p[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state["grad_norm_window"][i], s["grad_norm_window"])


# -- every adapter -------------------------------------------------------------------------------
def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _batch(t):
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(100 + t))


def _backward(model, t):
    for p in model.parameters():
        p.grad = None
    loss = model(_batch(t)).pow(2).mean()
    loss.backward()
    return loss.detach()


def _skip_adapter(name, model, **kw):
    cls, kwargs = ADAPTERS[name]
    return with_skip_step(cls)(model.named_parameters(), **{**kwargs, **kw})


def _own_state(opt):
    """Each param's state without the window."""
    return [{k: v.clone() for k, v in opt.state[p].items() if not k.startswith("skip_step.")}
            for g in opt.param_groups for p in g["params"]]


def _model_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_spike_changes_nothing_and_equals_the_plain_adapter_without_that_step(name):
    spike = 4
    model, plain_model = _model(), _model()
    opt = _skip_adapter(name, model, rolling_interval_length=WINDOW)
    cls, kwargs = ADAPTERS[name]
    plain = cls(plain_model.named_parameters(), **kwargs)
    for t, loss in enumerate(_losses({spike})):
        _backward(model, t)
        _backward(plain_model, t)
        before_p, before_s = _model_params(model), _own_state(opt)
        opt.latest_loss = loss
        opt.latest_grad_norm = 1.0
        opt.step()
        assert float(opt.step_skipped) == float(t == spike)
        if t == spike:
            assert_trees_equal(_model_params(model), before_p)
            assert_trees_equal(_own_state(opt), before_s)
        else:
            plain.step()
    assert_trees_equal(_model_params(model), _model_params(plain_model))
    assert int(opt.state[model[0].weight]["skip_step.skipped_steps"]) == 1


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_resume_mid_window_is_bitwise(name):
    """state_dict after step 4 of 8 (window 8), through torch.save, into a fresh model and
    optimizer: the rest equals the uninterrupted run, params and state_dict, and the spike right
    after resuming is skipped (the window came back with the state)."""
    def run(model, opt, steps):
        for t in steps:
            _backward(model, t)
            opt.latest_loss = RESUME_LOSSES[t]
            opt.latest_grad_norm = 1.0
            opt.step()
            assert float(opt.step_skipped) == float(RESUME_LOSSES[t] == SPIKE)

    ref_model = _model()
    ref = _skip_adapter(name, ref_model, rolling_interval_length=8)
    run(ref_model, ref, range(len(RESUME_LOSSES)))
    model = _model()
    opt = _skip_adapter(name, model, rolling_interval_length=8)
    run(model, opt, range(RESUME_AT))
    saved = _saved_and_loaded({"model": model.state_dict(), "opt": opt.state_dict()})
    model = _model(seed=1)  # other weights: everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    opt = _skip_adapter(name, model, rolling_interval_length=8)
    opt.load_state_dict(saved["opt"])
    run(model, opt, range(RESUME_AT, len(RESUME_LOSSES)))
    assert_trees_equal(_model_params(model), _model_params(ref_model))
    assert_trees_equal(opt.state_dict(), ref.state_dict())
    # one window, shared by every param's state again
    windows = {id(opt.state[p]["skip_step.loss_window"]) for p in model.parameters()}
    assert len(windows) == 1


def test_adapter_equals_the_functional_combinator_bitwise():
    """One param group: with_skip_step(Muon) steps exactly as ft.skip_spikes(ft.muon(...)) over the
    named params, fed the real losses and the grad norm of the grads (not given)."""
    model = _model()
    opt = with_skip_step(adapters.Muon)(model.named_parameters(), lr=1e-2, weight_decay=0.1,
                                        rolling_interval_length=WINDOW, sigma_factor=2.0)
    functional = ft.skip_spikes(ft.muon(lr=1e-2, weight_decay=0.1), window=WINDOW,
                                sigma_factor=2.0)
    params = _model_params(_model())
    state = functional.init_state(params)
    for t in range(8):
        loss = _backward(model, t) * (SPIKE if t == 5 else 1.0)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.latest_loss = loss
        opt.step()
        params, state = functional.update(params, grads, state, loss=loss)
        assert torch.equal(opt.step_skipped, state["step_skipped"])
    assert float(state["skipped_steps"]) >= 1 and float(state["step_skipped"]) == 0.0
    assert_trees_equal(_model_params(model), params)
    for key in WINDOW_KEYS:
        assert torch.equal(opt.state[model[0].weight]["skip_step." + key], state[key]), key


# -- no host sync --------------------------------------------------------------------------------
@pytest.mark.parametrize("given_norm", [True, False], ids=["grad_norm", "norm_of_grads"])
def test_update_on_meta_reads_nothing_on_the_host(given_norm):
    """The CPU stand-in for a CUDA sync check: on the ``meta`` device tensors have no values, so
    a host read of the decision (``bool()``, ``.item()``) raises, and a copy between the host and
    the device is recorded."""
    opt = _skip(ft.adamw(lr=1e-2))
    params = {k: torch.empty(v.shape, device="meta") for k, v in _params().items()}
    state = opt.init_state(params)
    meta = lambda: torch.empty((), device="meta")  # noqa: E731
    extra = {"grad_norm": meta()} if given_norm else {}
    transfers = HostTransfers()
    with transfers:
        for _ in range(3):
            params, state = opt.update(params, params, state, loss=meta(), donate=True, **extra)
    assert transfers.seen == []
    assert state["step_skipped"].device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are CUDA's "
                    "(test_update_on_meta_reads_nothing_on_the_host is the CPU stand-in)")
def test_no_host_sync_on_cuda():
    """Functional (given and computed grad norms, a spike included) and adapter steps 2 to 8
    never wait for the GPU; losses and norms are tensors on the GPU, as OLMo-core feeds them."""
    opt = _skip(ft.adamw(lr=1e-2))
    params = {k: v.float().cuda() for k, v in _params().items()}
    state = opt.init_state(params)
    grads = [{k: v.float().cuda() for k, v in _grads(t).items()} for t in range(len(LOSSES))]
    losses = torch.tensor(_losses({5}), device="cuda")
    model = _model().cuda()
    adapter = _skip_adapter("AdamW", model, rolling_interval_length=WINDOW)
    batches = [_batch(t).cuda() for t in range(len(LOSSES))]

    def steps(ts):
        nonlocal params, state
        for t in ts:
            norm = {"grad_norm": losses[t] / 2} if t % 2 else {}
            params, state = opt.update(params, grads[t], state, loss=losses[t], **norm)
            adapter.zero_grad()
            model(batches[t]).pow(2).mean().backward()
            adapter.latest_loss = losses[t]
            adapter.step()

    steps([0])
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps(range(1, len(LOSSES)))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert float(state["skipped_steps"]) >= 1 and float(adapter.step_skipped) == 0.0

# -- the OLMo-core protocol ----------------------------------------------------------------------
def test_adapters_are_olmo_core_skip_step_optimizers_with_its_protocol():
    olmo = pytest.importorskip("olmo_core.optim")
    model = _model()
    opt = with_skip_step(adapters.AdamW)(model.parameters(), lr=1e-2, rolling_interval_length=4)
    assert isinstance(opt, olmo.SkipStepOptimizer) and isinstance(opt, adapters.AdamW)
    assert type(opt).__name__ == "SkipStepAdamW" and with_skip_step(adapters.AdamW) is type(opt)
    from functim.adapters.skip_step import SkipStepAdamW, SkipStepFunctimOptimizer
    assert SkipStepAdamW is type(opt)
    assert SkipStepFunctimOptimizer is with_skip_step(adapters.FunctimOptimizer)
    assert (opt.rolling_interval_length, opt.sigma_factor) == (4, 6.0)
    assert opt.latest_loss is None and float(opt.step_skipped) == 0.0
    assert float(opt.get_step_factor()) == 1.0  # nothing fed
    for t, loss in enumerate([2.0, 2.2, 1.9, SPIKE]):
        _backward(model, t)
        opt.latest_loss = torch.tensor(loss)
        opt.latest_grad_norm = torch.tensor(1.0)
        factor = opt.get_step_factor()  # the decision step() is about to make; consumes nothing
        assert factor.dtype == torch.float32 and float(factor) == float(loss != SPIKE)
        assert float(opt.get_step_factor()) == float(factor)
        opt.step()
        assert float(opt.step_skipped) == 1.0 - float(factor)
        assert float(opt.latest_loss) == pytest.approx(loss)
    # the closure's loss is used when none was fed (SPIKE is in the window now: 1e4 is a spike)
    _backward(model, 4)
    opt.latest_grad_norm = 1.0
    assert float(opt.step(lambda: torch.tensor(1e4))) == 1e4
    assert float(opt.step_skipped) == 1.0
    assert int(opt.state[model[0].weight]["skip_step.observations"]) == 5


def test_sigma_factor_can_be_changed_and_rolling_interval_length_cannot():
    model = _model()
    opt = _skip_adapter("Lion", model, rolling_interval_length=4)
    for t, loss in enumerate([1.0, 1.2, 0.8]):
        _backward(model, t)
        opt.latest_loss, opt.latest_grad_norm = loss, 1.0
        opt.step()
    _backward(model, 3)
    opt.latest_loss, opt.latest_grad_norm = 1.3, 1.0  # 1.5 std above the mean
    assert float(opt.get_step_factor()) == 1.0
    opt.sigma_factor = 1.0
    assert opt.sigma_factor == 1.0 and float(opt.get_step_factor()) == 0.0
    with pytest.raises(AttributeError, match="rolling_interval_length is the length of the"):
        opt.rolling_interval_length = 8
    assert opt.rolling_interval_length == 4


def test_step_hooks_run_once_per_step():
    model = _model()
    opt = _skip_adapter("SGD", model)
    adapters.SGD(_model().parameters(), lr=1e-2)  # (torch then wraps SGD.step with its hooks)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    _backward(model, 0)
    opt.latest_loss = 1.0
    opt.step()
    assert calls == ["pre", "post"]


def test_functim_optimizer_with_skip_step_drives_any_functional_optimizer():
    """SkipStepFunctimOptimizer(named params, ft.chain(...)) ≡ ft.skip_spikes(ft.chain(...))."""
    make = lambda: ft.chain(ft.clip_by_global_norm(0.5), ft.lion(lr=1e-2))  # noqa: E731
    model = _model()
    opt = with_skip_step(adapters.FunctimOptimizer)(model.named_parameters(), make(),
                                                    rolling_interval_length=WINDOW)
    functional = _skip(make())
    params = _model_params(_model())
    state = functional.init_state(params)
    for t, loss in enumerate(_losses({5})):
        _backward(model, t)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.latest_loss = loss
        opt.step()
        params, state = functional.update(params, grads, state, loss=loss)
        assert float(opt.step_skipped) == float(state["step_skipped"]) == float(t == 5)
    assert_trees_equal(_model_params(model), params)


def test_importing_the_adapters_does_not_need_olmo_core():
    code = ("import sys\n"
            "sys.modules['olmo_core'] = None\n"
            "import torch, functim.adapters as a\n"
            "cls = a.with_skip_step(a.AdamW)\n"
            "bases = [b.__name__ for b in cls.__bases__]\n"
            "assert bases == ['SkipStepMixin', 'AdamW'], bases\n"
            "m = torch.nn.Linear(2, 2)\n"
            "opt = cls(m.parameters(), lr=0.1)\n"
            "m(torch.ones(1, 2)).sum().backward()\n"
            "opt.latest_loss = 1.0\n"
            "opt.step()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


# -- bad input: the error type, a message naming the parameter, nothing modified ----------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sigma_factor=0.0), ValueError, "'sigma_factor' must be in"),
    (dict(sigma_factor=-1.0), ValueError, "'sigma_factor' must be in"),
    (dict(sigma_factor=math.inf), ValueError, "'sigma_factor' must be in"),
    (dict(sigma_factor=math.nan), ValueError, "'sigma_factor' must be in"),
    (dict(sigma_factor="6"), TypeError, "'sigma_factor' must be a float"),
    (dict(window=1), ValueError, "window must be an int >= 2"),
    (dict(window=0), ValueError, "window must be an int >= 2"),
    (dict(window=2.0), TypeError, "window must be an int >= 2"),
    (dict(window=True), TypeError, "window must be an int >= 2"),
])
def test_bad_options_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        ft.skip_spikes(ft.adamw(), **kwargs)


def test_wrapping_something_else_is_rejected():
    with pytest.raises(TypeError, match="skip_spikes: optimizer must be a functim Optimizer"):
        ft.skip_spikes(torch.optim.AdamW)
    with pytest.raises(TypeError, match="with_skip_step: expected a functim torch.optim adapter"):
        with_skip_step(torch.optim.AdamW)


def _functional_setup():
    opt = _skip(ft.adamw(lr=1e-2))
    params = _params()
    state = opt.init_state(params)
    params, state = opt.update(params, _grads(0), state, loss=1.0)
    return opt, params, state


@pytest.mark.parametrize("extra,grads,error,match", [
    (dict(), None, TypeError, "update needs loss="),
    (dict(loss=torch.ones(2)), None, TypeError, "loss must be a one-element floating-point"),
    (dict(loss=torch.tensor(1)), None, TypeError, "loss must be a one-element floating-point"),
    (dict(loss="1.0"), None, TypeError, "loss must be a one-element floating-point"),
    (dict(loss=True), None, TypeError, "loss must be a one-element floating-point"),
    (dict(loss=1.0, grad_norm=torch.ones(3)), None, TypeError, "grad_norm must be a one-element"),
    (dict(loss=1.0), {"w": torch.ones(4, 3, dtype=torch.float64), "b": torch.ones(2)},
     ValueError, "grad at 'b'"),
], ids=["no_loss", "loss_shape", "loss_int", "loss_str", "loss_bool", "grad_norm_shape",
        "grad_shape"])
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donate"])
def test_bad_update_inputs_raise_and_modify_nothing(extra, grads, error, match, donate):
    opt, params, state = _functional_setup()
    before_p, before_s = clone_tree(params), clone_tree(state)
    with pytest.raises(error, match=match):
        opt.update(params, grads or _grads(1), state, donate=donate, **extra)
    assert_trees_equal(params, before_p)
    assert_trees_equal(state, before_s)


def test_a_state_made_for_another_window_or_optimizer_is_rejected():
    opt, params, state = _functional_setup()
    before_p = clone_tree(params)
    other = ft.skip_spikes(ft.adamw(lr=1e-2), window=WINDOW + 1).init_state(params)
    with pytest.raises(ValueError, match=r"state\['loss_window'\] is .* for window=4"):
        opt.update(params, _grads(1), other, loss=1.0, donate=True)
    with pytest.raises(ValueError, match="expected keys"):
        opt.update(params, _grads(1), state["optimizer"], loss=1.0, donate=True)
    with pytest.raises(ValueError, match="expected keys"):
        opt.validate(params, _grads(1), {k: v for k, v in state.items() if k != "observations"})
    assert_trees_equal(params, before_p)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sigma_factor=0), ValueError, "SkipStepAdamW: hyperparameter 'sigma_factor' must be in"),
    (dict(sigma_factor=-2.0), ValueError, "'sigma_factor' must be in"),
    (dict(rolling_interval_length=1), ValueError, "rolling_interval_length must be an int >= 2"),
    (dict(rolling_interval_length=64.0), TypeError, "rolling_interval_length must be an int"),
])
def test_bad_adapter_options_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        with_skip_step(adapters.AdamW)(_model().parameters(), **kwargs)


def _adapter_after_two_steps():
    model = _model()
    opt = _skip_adapter("AdamW", model, rolling_interval_length=WINDOW)
    for t in range(2):
        _backward(model, t)
        opt.latest_loss = LOSSES[t]
        opt.step()
    _backward(model, 2)
    return model, opt


def _snapshot(model, opt):
    return _model_params(model), clone_tree(opt.state_dict())


def test_adapter_bad_calls_raise_and_modify_nothing():
    model, opt = _adapter_after_two_steps()
    before = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"SkipStepAdamW.step\(\): no loss for this step"):
        opt.step()
    with pytest.raises(TypeError, match="latest_loss must be a one-element floating-point"):
        opt.latest_loss = torch.ones(2)
    with pytest.raises(TypeError, match="latest_grad_norm must be a one-element floating-point"):
        opt.latest_grad_norm = "big"
    with pytest.raises(ValueError, match="'sigma_factor' must be in"):
        opt.sigma_factor = 0.0
    assert opt.sigma_factor == 6.0
    with pytest.raises(TypeError, match="the loss returned by closure must be a one-element"):
        opt.step(lambda: torch.ones(3))
    assert_trees_equal(_snapshot(model, opt), before)
    assert opt.latest_loss is not None and float(opt.get_step_factor()) == 1.0  # nothing pending
    # a non-finite loss is not an error: a skipped step
    opt.latest_loss = float("nan")
    opt.step()
    assert float(opt.step_skipped) == 1.0
    assert_trees_equal(_model_params(model), before[0])


def test_adapter_load_state_dict_checks_the_window_before_loading():
    model, opt = _adapter_after_two_steps()
    before = _snapshot(model, opt)
    plain = adapters.AdamW(_model().parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"has no \['skip_step.loss_window'.*without skip-step"):
        opt.load_state_dict(plain.state_dict())
    longer = _skip_adapter("AdamW", _model(), rolling_interval_length=WINDOW + 2)
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\]\['skip_step.loss_window'\] "
                                         r"is tensor\(shape=\(6,\).* for "
                                         "rolling_interval_length=4"):
        opt.load_state_dict(longer.state_dict())
    assert_trees_equal(_snapshot(model, opt), before)
    opt.latest_loss = 1.0  # and it still steps
    opt.step()


# -- OLMo-core configs ---------------------------------------------------------------------------
def _olmo():
    pytest.importorskip("olmo_core")
    import test_olmo

    return test_olmo


def test_every_config_has_olmo_cores_skip_step_fields_and_builds_the_skip_step_adapter():
    t = _olmo()
    from olmo_core.optim import OptimConfig, SkipStepAdamWConfig, SkipStepOptimizer

    ref = SkipStepAdamWConfig()
    model = t.TinyOLMo()
    for config in t.ALL_CONFIGS:
        cfg = config()
        assert (cfg.skip_step, cfg.rolling_interval_length, cfg.sigma_factor) == \
            (False, ref.rolling_interval_length, ref.sigma_factor)
        assert type(cfg.build(model)) is config.optimizer()
        on = config(skip_step=True, rolling_interval_length=16, sigma_factor=3.0)
        opt = on.build(model)
        assert type(opt) is with_skip_step(config.optimizer()) is on.optimizer_class()
        assert isinstance(opt, SkipStepOptimizer) and isinstance(opt, config.optimizer())
        assert (opt.rolling_interval_length, opt.sigma_factor) == (16, 3.0)
        d = json.loads(json.dumps(on.as_config_dict()))
        assert OptimConfig.from_dict(d) == on
        assert "skip_step" not in opt.param_groups[0]  # not a param-group key


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sigma_factor=0.0), ValueError, "AdamWConfig: hyperparameter 'sigma_factor' must be in"),
    (dict(rolling_interval_length=1), ValueError,
     "AdamWConfig: rolling_interval_length must be an int >= 2"),
    (dict(skip_step="yes"), TypeError, "AdamWConfig: skip_step must be a bool"),
])
def test_bad_config_values_are_rejected_before_building(kwargs, error, match, monkeypatch):
    t = _olmo()
    from functim.adapters.olmo import AdamWConfig

    built = []
    monkeypatch.setattr(AdamWConfig, "build_groups",
                        lambda self, *a, **k: built.append(1) or [])
    with pytest.raises(error, match=match):
        AdamWConfig(**kwargs).build(t.TinyOLMo())
    assert not built
    with pytest.raises(error, match=match):  # also with skip_step on
        AdamWConfig(**{"skip_step": True, **kwargs}).build(t.TinyOLMo())


def _fed_training(model, opt, steps):
    """Steps ``steps`` of 8, fed the real loss scaled by RESUME_LOSSES / 2 (its spike included)."""
    t = _olmo()
    batches = t._batches(len(RESUME_LOSSES))
    for s in steps:
        opt.zero_grad(set_to_none=True)
        loss = t._loss(model, batches[s])
        loss.backward()
        opt.latest_loss = loss.detach() * (RESUME_LOSSES[s] / 2.0)
        opt.latest_grad_norm = 1.0
        opt.step()


@pytest.mark.parametrize("name", ["adamw", "adamw_bf16", "muon", "soap", "kron",
                                  "schedule_free_adamw"])
def test_olmo_checkpoint_mid_window_resumes_bitwise(name, tmp_path):
    """OLMo-core's (flattened) checkpoint after step 4 of 8, window 8: the resumed run equals the
    uninterrupted one, params and state, and catches the spike that follows the resume."""
    t = _olmo()
    from olmo_core.distributed.checkpoint import (
        load_model_and_optim_state,
        save_model_and_optim_state,
    )

    case = t.CASES[name]

    def build(seed):
        model = t.TinyOLMo(seed=seed, dtype=case.dtype)
        cfg = case.build_config(group_overrides=case.overrides(), skip_step=True,
                                rolling_interval_length=8)
        return model, cfg.build(model)

    ref_model, ref_opt = build(0)
    _fed_training(ref_model, ref_opt, range(8))
    assert float(ref_opt.state[ref_model.embeddings.weight]["skip_step.skipped_steps"]) == 1
    model, opt = build(0)
    _fed_training(model, opt, range(RESUME_AT))
    save_model_and_optim_state(tmp_path / "ckpt", model, opt, flatten_optimizer_state=True)
    model, opt = build(1)
    load_model_and_optim_state(tmp_path / "ckpt", model, opt, flatten_optimizer_state=True)
    _fed_training(model, opt, range(RESUME_AT, 8))
    assert float(opt.step_skipped) == 0.0
    assert float(opt.state[model.embeddings.weight]["skip_step.skipped_steps"]) == 1
    assert_trees_equal(t._params(model), t._params(ref_model))
    assert_trees_equal(opt.state_dict(), ref_opt.state_dict())


def test_adamw_config_skips_as_olmo_cores_skip_step_adamw():
    """functim AdamWConfig(skip_step=True) and OLMo-core's SkipStepAdamWConfig, same settings and
    group overrides, fed the same losses and grad norms (a loss spike, then a grad-norm spike):
    the same steps skipped and the same params (float64 model; OLMo-core's AdamW arithmetic
    differs from torch's in rounding only)."""
    t = _olmo()
    from functim.adapters.olmo import AdamWConfig
    from olmo_core.optim import SkipStepAdamWConfig

    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                    rolling_interval_length=6, sigma_factor=4.0,
                    group_overrides=[t.OptimGroupOverride(params=t.NO_DECAY,
                                                          opts={"weight_decay": 0.0})])
    runs = {}
    for name, config in (("functim", AdamWConfig(skip_step=True, **settings)),
                         ("olmo", SkipStepAdamWConfig(**settings))):
        model = t.TinyOLMo(dtype=torch.float64)
        opt = config.build(model)
        skipped = []
        for s, x in enumerate(t._batches(12)):
            opt.zero_grad(set_to_none=True)
            loss = t._loss(model, x)
            loss.backward()
            if s == 9:  # a grad-norm spike: the grads themselves
                for p in model.parameters():
                    p.grad.mul_(1e3)
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            opt.latest_loss = loss.detach() * (50.0 if s == 7 else 1.0)
            opt.latest_grad_norm = norm
            opt.step()
            skipped.append(float(opt.step_skipped))
        runs[name] = (skipped, t._params(model))
    assert runs["functim"][0] == runs["olmo"][0]
    assert runs["functim"][0][7] == 1.0 and runs["functim"][0][9] == 1.0
    for k, v in runs["olmo"][1].items():
        torch.testing.assert_close(runs["functim"][1][k], v, msg=k)


# -- FSDP2 (2 CPU ranks, gloo) -------------------------------------------------------------------
def _fsdp_worker(out_dir: str) -> None:
    """AdamWConfig(skip_step=True) on a fully_shard-ed model, the grad norm not fed (computed
    from the DTensor grads): the same decisions, window and params as unsharded."""
    import torch.distributed as dist
    from functim.adapters.olmo import AdamWConfig
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    t = _olmo()

    def run(shard: bool):
        model = t.TinyOLMo(seed=0)
        if shard:
            fully_shard(model)
        opt = AdamWConfig(lr=1e-2, skip_step=True, rolling_interval_length=4).build(model)
        skipped = []
        for s, x in enumerate(t._batches(6, seed=7)):  # the same data on both ranks
            opt.zero_grad(set_to_none=True)
            loss = t._loss(model, x)
            loss.backward()
            opt.latest_loss = loss.detach() * (SPIKE if s == 4 else 1.0)
            opt.step()
            skipped.append(float(opt.step_skipped))
        return model, opt, skipped

    model, opt, skipped = run(True)
    ref, ref_opt, ref_skipped = run(False)
    assert skipped == ref_skipped and skipped[4] == 1.0, (skipped, ref_skipped)
    first, ref_first = next(model.parameters()), next(ref.parameters())
    window = opt.state[first]["skip_step.grad_norm_window"]
    assert not isinstance(window, DTensor)
    torch.testing.assert_close(window, ref_opt.state[ref_first]["skip_step.grad_norm_window"])
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.full_tensor(), b.detach(), msg=n)
    with open(os.path.join(out_dir, f"ok{dist.get_rank()}"), "w") as f:
        f.write("ok")


@pytest.mark.slow
def test_fsdp2_decisions_and_params_equal_unsharded(tmp_path):
    _olmo()
    from ranks import run_ranks

    run_ranks(_fsdp_worker, (str(tmp_path),), str(tmp_path))
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()

# -- OLMo-core's Trainer on CPU ------------------------------------------------------------------
TRAINER_STEPS, GRAD_SPIKE_AT, LOSS_SPIKE_AT = 10, 6, 8  # trainer steps are 1-based


def _trainer_parity_main(root: str) -> None:
    """Runs in a subprocess (OLMo-core's trainer sets process-global state): OLMo-core's
    TransformerTrainModule + Trainer with functim's AdamWConfig(skip_step=True) and with
    OLMo-core's SkipStepAdamWConfig; a callback multiplies the grads by 1e3 before the optimizer
    step at GRAD_SPIKE_AT (the train module then feeds the pre-clip norm) and the fed loss by 100
    at LOSS_SPIKE_AT, and records step_skipped after every step."""
    from functim.adapters.olmo import AdamWConfig
    from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
    from olmo_core.optim import CosWithWarmup, SkipStepAdamWConfig
    from olmo_core.train import Duration, TrainerConfig, prepare_training_environment
    from olmo_core.train.callbacks import Callback, CheckpointerCallback
    from olmo_core.train.train_module import TransformerTrainModuleConfig

    @dataclass
    class Spikes(Callback):
        skipped: list = field(default_factory=list)

        def pre_optim_step(self) -> None:
            module = self.trainer.train_module
            if self.trainer.global_step == GRAD_SPIKE_AT:
                for p in module.model.parameters():
                    p.grad.mul_(1e3)
            if self.trainer.global_step == LOSS_SPIKE_AT:
                # in place: OLMo-core's setter appends, so setting it again would add a value
                module.optim.latest_loss.mul_(100.0)

        def post_train_batch(self) -> None:
            self.skipped.append(float(self.trainer.train_module.optim.step_skipped))

    prepare_training_environment(backend=None)
    settings = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, rolling_interval_length=6,
                    sigma_factor=6)
    results = {}
    for name, optim in (("functim", AdamWConfig(skip_step=True, **settings)),
                        ("olmo", SkipStepAdamWConfig(**settings))):
        train_module = TransformerTrainModuleConfig(
            rank_microbatch_size=64, max_sequence_length=16, optim=optim, max_grad_norm=1.0,
            scheduler=CosWithWarmup(warmup=2),
        ).build(_olmo()._olmo2_1m())
        dataset = NumpyFSLDatasetConfig(
            paths=[os.path.join(root, "tokens.npy")], sequence_length=16,
            tokenizer=TokenizerConfig(vocab_size=128, eos_token_id=0, pad_token_id=1),
            work_dir=os.path.join(root, "work")).build()
        loader = NumpyDataLoaderConfig(global_batch_size=128, seed=0).build(dataset)
        trainer = TrainerConfig(
            save_folder=os.path.join(root, f"run_{name}"),
            work_dir=os.path.join(root, "work"), save_overwrite=True,
            max_duration=Duration.steps(TRAINER_STEPS),
        ).with_callback("spikes", Spikes()).with_callback(
            # no step-0 checkpoint: its torch.distributed.checkpoint state-dict call gives an
            # optimizer whose state is created lazily (OLMo-core's) a zero-gradient step that
            # advances its step counter (_init_optim_state); functim's state exists from
            # construction and takes none, so their bias corrections would differ by one step
            "checkpointer", CheckpointerCallback(enabled=False)).build(train_module, loader)
        trainer.fit()
        results[name] = {"skipped": trainer.callbacks["spikes"].skipped,
                         "optimizer": type(train_module.optim).__name__,
                         "model": train_module.model.state_dict()}
    torch.save(results, os.path.join(root, "results.pt"))


@pytest.mark.slow
def test_trainer_parity_with_olmo_cores_skip_step_adamw(tmp_path):
    """In OLMo-core's own trainer, functim's AdamWConfig(skip_step=True) skips the same steps as
    OLMo-core's SkipStepAdamWConfig (the grad-norm spike and the loss spike among them) and ends
    with the same params (float32: OLMo-core's AdamW arithmetic rounds differently)."""
    np = pytest.importorskip("numpy")
    _olmo()
    tokens = np.memmap(tmp_path / "tokens.npy", dtype=np.uint16, mode="w+", shape=(4096,))
    tokens[:] = np.random.default_rng(0).integers(2, 128, size=4096)
    tokens.flush()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_skip_step; "
            "test_skip_step._trainer_parity_main(sys.argv[2])")
    r = subprocess.run([sys.executable, "-c", code, TESTS_DIR, str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    ours, theirs = results["functim"], results["olmo"]
    assert (ours["optimizer"], theirs["optimizer"]) == ("SkipStepAdamW", "SkipStepAdamW")
    assert len(ours["skipped"]) == TRAINER_STEPS
    assert ours["skipped"] == theirs["skipped"]
    assert ours["skipped"][GRAD_SPIKE_AT - 1] == 1.0 and ours["skipped"][LOSS_SPIKE_AT - 1] == 1.0
    assert sum(ours["skipped"]) < TRAINER_STEPS / 2  # the other steps are taken
    for k, v in theirs["model"].items():
        torch.testing.assert_close(ours["model"][k], v, msg=k)
