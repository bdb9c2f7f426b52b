"""functim/execution.py: the one place that chooses how an elementwise step runs. ``compile=True``
runs the compiled kernel (close to eager, params and state updated in place when donated, no
recompile when a hyperparameter changes); the options are checked at construction."""

from __future__ import annotations

import pytest
import torch

import functim as ft
from functim import adapters

MAKERS = {
    "adamw": lambda **k: ft.adamw(lr=1e-2, weight_decay=0.1, **k),
    "cautious_adamw": lambda **k: ft.cautious_adamw(lr=1e-2, **k),
    "mars": lambda **k: ft.mars(lr=1e-2, **k),
}


def _tree(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(5, generator=gen)}


@pytest.mark.parametrize("name", list(MAKERS))
def test_compiled_update_matches_eager_and_does_not_recompile(name):
    torch._dynamo.reset()
    own_kernel = {"fused": False} if name == "adamw" else {}  # (not torch's fused AdamW)
    eager, compiled = MAKERS[name](**own_kernel), MAKERS[name](compile=True)
    p_e, p_c = _tree(), _tree()
    s_e, s_c = eager.init_state(p_e), compiled.init_state(p_c)
    before = {k: v for k, v in p_c.items()}
    for step in range(3):
        g = _tree(seed=10 + step)
        p_e, s_e = eager.update(p_e, g, s_e, donate=True)
        p_c, s_c = compiled.update(p_c, g, s_c, donate=True)
        if step == 0:
            frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        # a new learning rate is a new value in a 0-d tensor, not a new graph
        s_e = ft.set_hyperparams(s_e, lr=1e-3 * (step + 2))
        s_c = ft.set_hyperparams(s_c, lr=1e-3 * (step + 2))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    assert all(p_c[k] is before[k] for k in p_c)  # donated: updated in place
    for k in p_e:
        torch.testing.assert_close(p_c[k], p_e[k], rtol=1e-6, atol=1e-7)


def test_adapter_compile_option_runs_the_compiled_kernel():
    torch._dynamo.reset()
    ps = [torch.nn.Parameter(t) for t in _tree().values()]
    ref = [torch.nn.Parameter(t) for t in _tree().values()]
    opt = adapters.Lion(ps, lr=1e-2, compile=True)
    eager = adapters.Lion(ref, lr=1e-2)
    for step in range(2):
        for p, q, g in zip(ps, ref, _tree(seed=20 + step).values()):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        eager.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_execution_options_are_checked_at_construction():
    with pytest.raises(TypeError, match="compile must be a bool"):
        ft.adamw(compile="yes")
    with pytest.raises(ValueError, match="fused=True and compile=True"):
        ft.adamw(fused=True, compile=True)
    with pytest.raises(ValueError, match="no fused kernel"):
        ft.ElementwiseOptimizer("lion", hyperparams={}, ranges={}, buffers=(),
                                kernel=None, fused=True)
    with pytest.raises(ValueError, match="buffer inits"):
        ft.ElementwiseOptimizer("x", hyperparams={}, ranges={}, buffers={"m": "ones"},
                                kernel=None)
