"""Every optimizer of the elementwise family meets the same contract: vmap over an ensemble
equals a loop, a compiled update does not recompile when the lr changes, and the torch.optim
adapter resumes bitwise from ``state_dict`` into fresh objects."""

import io

import optree
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

import functim as ft
from functim import adapters

FUNCTIONAL = {
    "adamw": lambda: ft.adamw(lr=1e-2, weight_decay=0.1),
    "sgd": lambda: ft.sgd(lr=1e-2, momentum=0.9, weight_decay=0.1),
    "nadamw": lambda: ft.nadamw(lr=1e-2),
    "nadamw_torch": lambda: ft.nadamw(lr=1e-2, variant="torch"),
    "nadamw_timm": lambda: ft.nadamw(lr=1e-2, variant="timm"),
    "cautious_adamw": lambda: ft.cautious_adamw(lr=1e-2, weight_decay=0.1),
    "cautious_lion": lambda: ft.cautious_lion(lr=1e-2, weight_decay=0.1),
    "lion": lambda: ft.lion(lr=1e-2, weight_decay=0.1),
    "signsgd": lambda: ft.signsgd(lr=1e-2, weight_decay=0.1),
    "signum": lambda: ft.signum(lr=1e-2, weight_decay=0.1),
    "mars": lambda: ft.mars(lr=1e-2, weight_decay=0.1),
    "schedule_free_adamw": lambda: ft.schedule_free_adamw(lr=1e-2, warmup_steps=2),
    "muon": lambda: ft.muon(lr=1e-2, weight_decay=0.1, adamw_weight_decay=0.1),
    "muon_sum_moonlight": lambda: ft.muon(lr=1e-2, momentum_form="sum", scale_mode="moonlight"),
    "scion": lambda: ft.scion(lr=1e-2, momentum=0.1),
    "scion_unconstrained": lambda: ft.scion(lr=1e-2, unconstrained=True),
    "sophia": lambda: ft.sophia(lr=1e-2, weight_decay=0.1),
    "kron": lambda: ft.kron(lr=1e-2, weight_decay=0.1),
    "soap": lambda: ft.soap(lr=1e-2, weight_decay=0.1, precondition_frequency=2,
                            precondition_1d=True),
}

ADAPTERS = {
    "AdamW": lambda ps: adapters.AdamW(ps, lr=1e-2),
    "SGD": lambda ps: adapters.SGD(ps, lr=1e-2, momentum=0.9),
    "NAdamW": lambda ps: adapters.NAdamW(ps, lr=1e-2, variant="torch"),
    "CautiousAdamW": lambda ps: adapters.CautiousAdamW(ps, lr=1e-2),
    "CautiousLion": lambda ps: adapters.CautiousLion(ps, lr=1e-2),
    "Lion": lambda ps: adapters.Lion(ps, lr=1e-2, weight_decay=0.1),
    "SignSGD": lambda ps: adapters.SignSGD(ps, lr=1e-2),
    "Signum": lambda ps: adapters.Signum(ps, lr=1e-2),
    "Mars": lambda ps: adapters.Mars(ps, lr=1e-2),
    "ScheduleFreeAdamW": lambda ps: adapters.ScheduleFreeAdamW(ps, lr=1e-2, warmup_steps=2),
    "Muon": lambda ps: adapters.Muon(ps, lr=1e-2, weight_decay=0.1),
    "Scion": lambda ps: adapters.Scion(ps, lr=1e-2, momentum=0.1),
    "Sophia": lambda ps: adapters.Sophia(ps, lr=1e-2, weight_decay=0.1),
    "Kron": lambda ps: adapters.Kron(ps, lr=1e-2, weight_decay=0.1, balance_every=2),
    "Soap": lambda ps: adapters.Soap(ps, lr=1e-2, precondition_frequency=2),
}

# optimizers whose update cannot be traced by vmap / compile(fullgraph=True), and why
UNTRACEABLE = {
    "kron": "whether the preconditioner update runs is host control flow on CPU counters in "
            "the state, and its probes come from a torch.Generator (random ops are refused "
            "under vmap's default randomness='error'; see functim/optimizers/kron.py)",
}


def _params(dtype=torch.float64, lead=()):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(*lead, 4, 3, generator=g, dtype=dtype),
            "b": torch.randn(*lead, 3, generator=g, dtype=dtype)}


def _grads(seed, dtype=torch.float64, lead=()):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(*lead, 4, 3, generator=g, dtype=dtype),
            "b": torch.randn(*lead, 3, generator=g, dtype=dtype)}


# states with None leaves (a Muon AdamW-side leaf has no momentum buffer) need ft.ensemble's
# None-aware in/out dims; the others vmap as they are
HAS_NONE_IN_STATE = {"muon", "muon_sum_moonlight", "scion", "scion_unconstrained"}


@pytest.mark.parametrize("name", list(FUNCTIONAL))
@pytest.mark.parametrize("how", ["vmap", "ensemble"])
def test_vmap_over_ensemble_equals_loop(name, how):
    if name in UNTRACEABLE:
        pytest.skip(UNTRACEABLE[name])
    opt = FUNCTIONAL[name]()
    if how == "vmap" and name in HAS_NONE_IN_STATE:
        pytest.skip("torch.func.vmap rejects None leaves; ft.ensemble handles them")
    init, update = ((torch.func.vmap(opt.init_state), torch.func.vmap(opt.update))
                    if how == "vmap" else (ft.ensemble(opt).init_state, ft.ensemble(opt).update))
    n = 3
    params = _params(lead=(n,))
    state = init(params)
    loop = [({k: v[i] for k, v in params.items()},) for i in range(n)]
    loop = [(p, opt.init_state(p)) for (p,) in loop]
    for t in range(3):
        grads = _grads(t, lead=(n,))
        params, state = update(params, grads, state)
        loop = [opt.update(p, {k: v[i] for k, v in grads.items()}, s)
                for i, (p, s) in enumerate(loop)]
    for i, (p, _) in enumerate(loop):
        for k in p:
            torch.testing.assert_close(params[k][i], p[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_compiled_update_matches_eager_without_recompiling(name):
    if name in UNTRACEABLE:
        pytest.skip(UNTRACEABLE[name])
    opt = FUNCTIONAL[name]()
    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def record(gm, _):
        graphs.append(gm)
        return gm

    compiled = torch.compile(opt.update, fullgraph=True, backend=aot_autograd(fw_compiler=record))
    params = _params(torch.float32)
    state = opt.init_state(params)
    p_c, s_c = compiled(params, _grads(0, torch.float32), state)
    p_e, s_e = opt.update(params, _grads(0, torch.float32), state)
    try:
        torch._dynamo.config.error_on_recompile = True
        for t, lr in enumerate((2e-3, 3e-3), start=1):
            s_c, s_e = ft.set_hyperparams(s_c, lr=lr), ft.set_hyperparams(s_e, lr=lr)
            p_c, s_c = compiled(p_c, _grads(t, torch.float32), s_c)
            p_e, s_e = opt.update(p_e, _grads(t, torch.float32), s_e)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == 1
    for k in params:
        torch.testing.assert_close(p_c[k], p_e[k], rtol=1e-6, atol=1e-7)
    # nothing in the traced step reads a tensor on the host (a device sync on CUDA, e.g. a 0-d
    # tensor hyperparameter passed where torch wants a Scalar), and no op that inductor cannot
    # lower (it would run the eager kernel into fresh memory instead of fusing)
    code = "\n".join(gm.code for gm in graphs)
    for op in ("_local_scalar_dense", "_foreach_norm", "_foreach_lerp"):
        assert op not in code, f"{name}: the compiled step calls aten.{op}"
    # the multi-tensor kernels' scalar coefficients are computed once per step, into buffers
    # (functim.runtime.compiled_scalars), not inlined into every element's arithmetic
    if isinstance(opt, ft.ElementwiseOptimizer):
        assert "functim.materialize" in code, f"{name}: scalars are not materialised"


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _run(model, opt, batches):
    for x in batches:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_resume_is_bitwise(name):
    batches = [torch.randn(6, 5, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    ref = _model()
    _run(ref, ADAPTERS[name](ref.named_parameters()), batches)

    model = _model()
    opt = ADAPTERS[name](model.named_parameters())
    _run(model, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = _model()
    model2.load_state_dict(saved["model"])
    opt2 = ADAPTERS[name](model2.named_parameters())
    opt2.load_state_dict(saved["opt"])
    _run(model2, opt2, batches[3:])
    for a, b in zip(ref.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    leaves = optree.tree_leaves(opt2.state_dict()["state"])
    assert all(not isinstance(x, torch.Tensor) or torch.isfinite(x).all() for x in leaves)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_per_leaf_norms_count_exactly_beyond_float32(per_tensor):
    """The cautious mask's mean and MARS's clip norm accumulate in float64: in float32, summing
    2^25 + 7 ones gives 2^25 (it once made cautious_adamw's mask scale wrong on embeddings)."""
    from functim.listops import ListOps
    from functim.optimizers.cautious import mask_and_scale

    n = 2**25 + 7
    ones = torch.ones(n)
    ops = ListOps(per_tensor=per_tensor)
    assert float(ops.norm([ones], 1.0)[0]) == n
    mask, scale = mask_and_scale(ops, [ones], [ones], "mean", 0.0)
    scaled = ops.div(mask, scale)[0]
    assert scaled.dtype == torch.float32 and bool((scaled == 1.0).all())
