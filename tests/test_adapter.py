"""The torch.optim adapter: parity with torch.optim, functional ≡ adapter, torch.optim protocol."""

import copy
import pathlib
import re

import pytest
import torch
from conftest import assert_trees_equal
from functim.adapters import SGD, AdamW, FunctimOptimizer

import functim as ft


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3)).to(dtype)


def _batches(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(123)
    return [torch.randn(8, 6, generator=g, dtype=dtype) for _ in range(n)]


def _train(model, opt, batches, sched=None):
    for x in batches:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("kw", [{}, {"amsgrad": True}, {"maximize": True}, {"weight_decay": 0.0}])
def test_adamw_fused_default_matches_torch_fused_bitwise(kw):
    m1, m2 = _model(), _model()
    batches = _batches(10)
    _train(m1, torch.optim.AdamW(m1.parameters(), lr=1e-2, fused=True, **kw), batches)
    _train(m2, AdamW(m2.named_parameters(), lr=1e-2, **kw), batches)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [{}, {"amsgrad": True}])
def test_adamw_unfused_matches_torch(kw):
    m1, m2 = _model(torch.float64), _model(torch.float64)
    batches = _batches(20, torch.float64)
    _train(m1, torch.optim.AdamW(m1.parameters(), lr=1e-2, foreach=True, **kw), batches)
    _train(m2, AdamW(m2.named_parameters(), lr=1e-2, fused=False, **kw), batches)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True,
                                                        "weight_decay": 0.01},
                                {"momentum": 0.9, "maximize": True, "weight_decay": 0.1}])
def test_sgd_fused_default_matches_torch_fused_bitwise(kw):
    m1, m2, m3 = _model(), _model(), _model()
    batches = _batches(10)
    _train(m1, torch.optim.SGD(m1.parameters(), lr=1e-2, fused=True, **kw), batches)
    _train(m2, SGD(m2.named_parameters(), lr=1e-2, **kw), batches)
    # the functional update takes the same kernel (CPU state: the hyperparameters are host
    # values), and leaves the grads alone
    opt = ft.sgd(lr=1e-2, **kw)
    params = {n: p.detach() for n, p in m3.named_parameters()}
    state = opt.init_state(params)
    for x in batches:
        m3.zero_grad()
        m3(x).pow(2).mean().backward()
        grads = {n: p.grad for n, p in m3.named_parameters()}
        before = {n: g.clone() for n, g in grads.items()}
        params, state = opt.update(params, grads, state, donate=True)
        assert all(torch.equal(before[n], grads[n]) for n in grads)
    for a, b, c in zip(m1.parameters(), m2.parameters(), m3.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_sgd_fused_only_where_it_computes_functims_maths():
    """Dampening (torch's fused kernel needs the step count for the first step's buffer) and a
    momentum of 0 with a buffer (it would not update the buffer) take functim's kernel, bitwise
    fused=False; without them torch's fused kernel runs, which rounds p − η·g once, as functim's
    kernel does: bitwise the same."""
    m1, m2 = _model(), _model()
    batches = _batches(6)
    kw = {"momentum": 0.9, "dampening": 0.5}
    _train(m1, SGD(m1.parameters(), lr=1e-2, **kw), batches)
    _train(m2, SGD(m2.parameters(), lr=1e-2, fused=False, **kw), batches)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    params = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
    grads = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(1))}
    runs = {}
    for name, opt in (("scheduled-momentum-0", ft.sgd(lr=0.1, momentum=ft.constant_schedule(0.0))),
                      ("fused-off", ft.sgd(lr=0.1, momentum=ft.constant_schedule(0.0),
                                           fused=False)),
                      ("fused", ft.sgd(lr=0.1)), ("unfused", ft.sgd(lr=0.1, fused=False))):
        runs[name] = opt.update(params, grads, opt.init_state(params))
    assert_trees_equal(runs["scheduled-momentum-0"], runs["fused-off"])
    assert_trees_equal(runs["fused"], runs["unfused"])


@pytest.mark.parametrize("kw", [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True,
                                                    "weight_decay": 0.01}, {}])
def test_sgd_matches_torch(kw):
    m1, m2 = _model(torch.float64), _model(torch.float64)
    batches = _batches(20, torch.float64)
    _train(m1, torch.optim.SGD(m1.parameters(), lr=1e-2, **kw), batches)
    _train(m2, SGD(m2.named_parameters(), lr=1e-2, **kw), batches)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fused", [None, False])
def test_functional_equals_adapter_bitwise_two_groups_with_scheduler(fused):
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    first, second = names[:2], names[2:]
    params = dict(model.named_parameters())
    opt = AdamW([{"params": [(n, params[n]) for n in first]},
                 {"params": [(n, params[n]) for n in second], "lr": 3e-3, "betas": (0.8, 0.99),
                  "weight_decay": 0.0}],
                lr=1e-2, weight_decay=0.1, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * 0.97 ** s)
    fopts = [ft.adamw(lr=1e-2, weight_decay=0.1, fused=fused),
             ft.adamw(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.0, fused=fused)]
    fparams = [{n: params[n].detach().clone() for n in grp} for grp in (first, second)]
    fstates = [o.init_state(p) for o, p in zip(fopts, fparams)]
    for x in _batches(8):
        lrs = [g["lr"] for g in opt.param_groups]
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        grads = [{n: params[n].grad.clone() for n in grp} for grp in (first, second)]
        opt.step()
        sched.step()
        for i in range(2):
            fstates[i] = ft.set_hyperparams(fstates[i], lr=lrs[i])
            fparams[i], fstates[i] = fopts[i].update(fparams[i], grads[i], fstates[i])
    for i, grp in enumerate((first, second)):
        for n in grp:
            assert torch.equal(fparams[i][n], params[n].detach()), n
            assert torch.equal(fstates[i]["exp_avg"][n], opt.state[params[n]]["exp_avg"])
            assert torch.equal(fstates[i]["exp_avg_sq"][n], opt.state[params[n]]["exp_avg_sq"])


def test_generic_adapter_equals_functional_bitwise():
    model = _model()
    fopt = ft.chain(ft.clip_by_global_norm(0.1),
                    ft.partition([ft.Rule("sgd", ndim=2), ft.Rule("adamw")],
                                 {"sgd": ft.sgd(lr=0.05, momentum=0.9),
                                  "adamw": ft.adamw(lr=1e-2)}))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = fopt.init_state(params)
    opt = FunctimOptimizer(model.named_parameters(), fopt)
    assert {"max_norm", "momentum"} <= set(opt.param_groups[0])
    for x in _batches(5):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        params, state = fopt.update(params, grads, state)
    for n, p in model.named_parameters():
        assert torch.equal(params[n], p.detach()), n


def test_params_without_grad_are_skipped_like_torch():
    m1, m2 = _model(), _model()
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2, fused=True)
    o2 = AdamW(m2.named_parameters(), lr=1e-2)
    for i, x in enumerate(_batches(6)):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            if i % 2 == 0:
                m[0].weight.grad = None  # this param skips every other step
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert float(o2.state[m2[0].weight]["step"]) == 3.0
    assert float(o2.state[m2[2].weight]["step"]) == 6.0


def test_state_is_eager_and_torch_shaped():
    model = _model()
    opt = AdamW(model.named_parameters(), lr=1e-3)
    for p in model.parameters():
        st = opt.state[p]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
        assert st["step"].dtype == torch.float32 and st["step"].device.type == "cpu"
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    extra = torch.nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [("extra", extra)], "lr": 0.5})
    assert set(opt.state[extra]) == {"step", "exp_avg", "exp_avg_sq"}


def test_hooks_and_closure():
    model = _model()
    opt = SGD(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    x = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert calls == ["pre", "post"]
    assert isinstance(loss, torch.Tensor)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lr_scheduler_drives_group_lr():
    model = _model()
    opt = AdamW(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen = []
    for x in _batches(3):
        opt.zero_grad()
        model(x).sum().backward()
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [1.0, 0.5, 0.25]


def test_distributed_checkpoint_state_dict_api():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = _model()
    opt = AdamW(model.named_parameters(), lr=1e-3)
    osd = get_optimizer_state_dict(model, opt)  # before any step: state exists eagerly
    assert set(osd["state"]) == {n for n, _ in model.named_parameters()}
    assert set(osd["state"]["0.weight"]) == {"step", "exp_avg", "exp_avg_sq"}


def test_deepcopy_and_repr():
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-3)
    copy.deepcopy(opt.state_dict())
    assert "AdamW" in repr(opt)


def test_readme_quickstarts_run(tmp_path, monkeypatch):
    # every ```python block runs here; ```py blocks are sketches (FSDP under torchrun) or the
    # OLMo-core training script (run in its own process by test_olmo.py)
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)


def test_generic_adapter_checks_group_hyperparameters():
    model = _model()
    opt = FunctimOptimizer(model.named_parameters(),
                           ft.chain(ft.clip_by_global_norm(1.0), ft.adamw()))
    extra = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="'lr'"):
        opt.add_param_group({"params": [("extra", extra)], "lr": -1.0})
    with pytest.raises(ValueError, match="'max_norm'"):
        opt.add_param_group({"params": [("extra", extra)], "max_norm": 0.0})
    assert len(opt.param_groups) == 1


def test_callable_weight_decay_mask_follows_names_not_flatten_order():
    """Regression: the adapter paired sorted leaf paths with params in named_parameters() order,
    so a callable mask decayed the wrong params when the two orders differ."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(5, 3)   # sorts last, comes first
            self.fc = torch.nn.Linear(3, 3)
            self.a_ln = torch.nn.LayerNorm(3)      # sorts first, comes last

    net = Net()
    opt = AdamW(net.named_parameters(), lr=0.1, weight_decay=0.5,
                weight_decay_mask=ft.default_weight_decay_mask)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    opt.step()
    moved = {k for k, v in net.named_parameters() if not torch.equal(before[k], v)}
    assert moved == {"fc.weight"}
