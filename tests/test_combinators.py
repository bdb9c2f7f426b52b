"""chain / clip_by_global_norm / partition (+explain) / weight-decay masks / accumulate /
skip_nonfinite."""

import math

import pytest
import torch

import functim as ft


def _params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 4, generator=g, dtype=dtype),
        "blocks.0.attn.w": torch.randn(4, 4, generator=g, dtype=dtype),
        "blocks.0.attn.bias": torch.randn(4, generator=g, dtype=dtype),
        "blocks.0.ln.weight": torch.randn(4, generator=g, dtype=dtype),
        "lm_head.weight": torch.randn(10, 4, generator=g, dtype=dtype),
    }


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


def _equal_trees(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# -- clip_by_global_norm --------------------------------------------------------------------
def test_clip_matches_torch_clip_grad_norm():
    params = _params()
    grads = {k: 3 * v for k, v in _grads(params, 1).items()}
    opt = ft.chain(ft.clip_by_global_norm(0.5), ft.sgd(lr=1.0))
    state = opt.init_state(params)
    new, state = opt.update(params, grads, state)
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    for k, v in ref.items():
        v.grad = grads[k].clone()
    total = torch.nn.utils.clip_grad_norm_(list(ref.values()), 0.5)
    for k in params:
        torch.testing.assert_close(new[k], params[k] - ref[k].grad, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(state["transforms"][0]["grad_norm"].double(), total.double(),
                               rtol=1e-6, atol=0)


def test_clip_inactive_below_threshold_is_identity():
    params = _params()
    grads = _grads(params, 2)
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    opt = ft.chain(ft.clip_by_global_norm(norm * 10), ft.sgd(lr=1.0))
    new, _ = opt.update(params, grads, opt.init_state(params))
    plain, _ = ft.sgd(lr=1.0).update(params, grads, ft.sgd(lr=1.0).init_state(params))
    assert _equal_trees(new, plain)


# -- partition --------------------------------------------------------------------------------
def test_partition_routes_and_matches_separate_optimizers():
    params = _params()
    rules = [ft.Rule("sgd", path="blocks.*.attn.w", ndim=2), ft.Rule("adamw")]
    opt = ft.partition(rules, {"sgd": ft.sgd(lr=0.1, momentum=0.9), "adamw": ft.adamw(lr=1e-2)})
    state = opt.init_state(params)
    sgd_only = {k: v for k, v in params.items() if k == "blocks.0.attn.w"}
    adam_only = {k: v for k, v in params.items() if k != "blocks.0.attn.w"}
    s_sgd = ft.sgd(lr=0.1, momentum=0.9).init_state(sgd_only)
    s_adam = ft.adamw(lr=1e-2).init_state(adam_only)
    p = dict(params)
    for t in range(4):
        grads = _grads(params, 10 + t)
        p, state = opt.update(p, grads, state)
        sgd_only, s_sgd = ft.sgd(lr=0.1, momentum=0.9).update(
            sgd_only, {k: grads[k] for k in sgd_only}, s_sgd)
        adam_only, s_adam = ft.adamw(lr=1e-2).update(
            adam_only, {k: grads[k] for k in adam_only}, s_adam)
    assert _equal_trees({**sgd_only, **adam_only}, p)
    # each optimizer's buffers keep the full params structure, None where it does not own a leaf
    assert state["partition"]["sgd"]["momentum_buffer"]["embed.weight"] is None
    assert state["partition"]["adamw"]["exp_avg"]["blocks.0.attn.w"] is None


def test_explain_reports_rule_and_shadowed_matches():
    params = _params()
    opt = ft.partition([ft.Rule("matrix", ndim=2, path="blocks.*"), ft.Rule("rest")],
                       {"matrix": ft.sgd(), "rest": ft.adamw()})
    rows = {a.path: a for a in opt.explain(params)}
    assert rows["blocks.0.attn.w"].label == "matrix"
    assert rows["blocks.0.attn.w"].rule.startswith("rule 0")
    assert rows["blocks.0.attn.w"].shadowed  # the catch-all also matched
    assert rows["embed.weight"].label == "rest"
    text = str(opt.explain(params))
    assert "blocks.0.attn.w" in text and "matrix" in text


def test_partition_errors():
    params = _params()
    with pytest.raises(ValueError, match="claimed by no rule.*lm_head.weight"):
        ft.partition([ft.Rule("a", path=["embed.*", "blocks.*"])],
                     {"a": ft.sgd()}).init_state(params)
    with pytest.raises(ValueError, match=r"more than one label.*blocks.0.attn.w \(a, b\)"):
        ft.partition({"a": "blocks.*", "b": ["*attn*", "embed*", "lm_head*"]},
                     {"a": ft.sgd(), "b": ft.sgd()}).init_state(params)
    with pytest.raises(ValueError, match="no optimizer"):
        ft.partition([ft.Rule("missing")], {"a": ft.sgd()})
    with pytest.raises(TypeError):
        ft.partition([ft.Rule("a")], {"a": "sgd"})


def test_rule_criteria():
    w = torch.zeros(3, 4)
    assert ft.Rule("x", shape=(3, None)).matches("a", w)
    assert not ft.Rule("x", shape=(4, None)).matches("a", w)
    assert ft.Rule("x", ndim=(1, 2)).matches("a", w)
    assert not ft.Rule("x", ndim=lambda n: n < 2).matches("a", w)
    assert ft.Rule("x", path=["*.w", "b*"]).matches("layer.w", w)
    assert not ft.Rule("x", path="*.w").matches("layer.weight", w)


# -- weight-decay mask ----------------------------------------------------------------------
def test_default_weight_decay_mask():
    params = _params()
    decays = {k: ft.default_weight_decay_mask(k, v) for k, v in params.items()}
    assert decays == {"embed.weight": False, "blocks.0.attn.w": True, "blocks.0.attn.bias": False,
                      "blocks.0.ln.weight": False, "lm_head.weight": True}


@pytest.mark.parametrize("make", [
    lambda **k: ft.adamw(lr=1e-2, weight_decay=0.5, **k),
    lambda **k: ft.sgd(lr=1e-2, momentum=0.9, weight_decay=0.5, **k),
])
def test_weight_decay_mask_equals_zero_decay_on_masked_leaves(make):
    params = _params()
    masked = make(weight_decay_mask=ft.default_weight_decay_mask)
    s = masked.init_state(params)
    p = dict(params)
    for t in range(3):
        p, s = masked.update(p, _grads(params, t), s)
    for k, v in params.items():
        decays = ft.default_weight_decay_mask(k, v)
        single = make() if decays else make(weight_decay_mask=lambda path, x: False)
        q = {k: v}
        sq = single.init_state(q)
        for t in range(3):
            q, sq = single.update(q, {k: _grads(params, t)[k]}, sq)
        assert torch.equal(q[k], p[k]), k


# -- accumulate -------------------------------------------------------------------------------
def test_accumulate_equals_one_step_on_mean_gradient():
    params = _params()
    k = 3
    acc = ft.accumulate(ft.adamw(lr=1e-2), every=k)
    s = acc.init_state(params)
    ref = ft.adamw(lr=1e-2)
    rs = ref.init_state(params)
    p, q = dict(params), dict(params)
    for cycle in range(2):
        micro = [_grads(params, 100 * cycle + i) for i in range(k)]
        for i, g in enumerate(micro):
            before = p
            p, s = acc.update(p, g, s)
            if i < k - 1:
                assert all(p[n] is before[n] for n in p)  # no step mid-cycle
        total = {n: micro[0][n] + micro[1][n] for n in params}
        total = {n: total[n] + micro[2][n] for n in params}
        mean = {n: total[n] / k for n in params}
        q, rs = ref.update(q, mean, rs)
        assert _equal_trees(p, q)
    assert int(s["micro_step"]) == 0 and int(s["optimizer"]["step"]) == 2


def test_accumulate_donated_equals_pure():
    params = _params()
    acc = ft.accumulate(ft.sgd(lr=0.1, momentum=0.9), every=2)
    s1, s2 = acc.init_state(params), acc.init_state(params)
    p1 = dict(params)
    p2 = {k: v.clone() for k, v in params.items()}
    for t in range(4):
        g = _grads(params, t)
        p1, s1 = acc.update(p1, g, s1)
        p2, s2 = acc.update(p2, g, s2, donate=True)
    assert _equal_trees(p1, p2)


# -- skip_nonfinite -------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("donate", [False, True])
def test_skip_nonfinite(bad, donate):
    params = _params()
    opt = ft.skip_nonfinite(ft.adamw(lr=1e-2))
    s = opt.init_state(params)
    p = {k: v.clone() for k, v in params.items()}
    p, s = opt.update(p, _grads(params, 0), s, donate=donate)
    snap_p = {k: v.clone() for k, v in p.items()}
    snap_s = {k: v.clone() for k, v in s["optimizer"]["exp_avg"].items()}
    g = _grads(params, 1)
    g["blocks.0.attn.w"][1, 2] = bad
    p, s = opt.update(p, g, s, donate=donate)
    assert _equal_trees(p, snap_p)
    assert _equal_trees(s["optimizer"]["exp_avg"], snap_s)
    assert int(s["skipped_steps"]) == 1 and int(s["optimizer"]["step"]) == 1
    # a finite step afterwards equals the plain optimizer that never saw the bad step
    ref = ft.adamw(lr=1e-2)
    q, rs = ref.update(params, _grads(params, 0), ref.init_state(params))
    g2 = _grads(params, 2)
    q, rs = ref.update(q, g2, rs)
    p, s = opt.update(p, g2, s, donate=donate)
    assert _equal_trees(p, q)
    assert int(s["skipped_steps"]) == 1


# -- hyperparameter access ----------------------------------------------------------------------
def test_get_and_set_hyperparams():
    params = _params()
    opt = ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(lr=1e-3))
    s = opt.init_state(params)
    hp = ft.get_hyperparams(s)
    assert set(hp) == {"transforms.0.max_norm", "optimizer.lr", "optimizer.beta1",
                       "optimizer.beta2", "optimizer.eps", "optimizer.weight_decay"}
    s2 = ft.set_hyperparams(s, lr=0.5, **{"transforms.0.max_norm": 2.0})
    assert float(ft.get_hyperparams(s2)["optimizer.lr"]) == 0.5
    assert float(ft.get_hyperparams(s2)["transforms.0.max_norm"]) == 2.0
    assert float(ft.get_hyperparams(s)["optimizer.lr"]) == 1e-3  # pure
    with pytest.raises(ValueError, match="no hyperparameter named"):
        ft.set_hyperparams(s, learning_rate=1.0)


def test_none_leaves_and_empty_trees_pass_through():
    opt = ft.adamw()
    s = opt.init_state({})
    p, s = opt.update({}, {}, s)
    assert p == {} and int(s["step"]) == 1
    params = {"a": torch.ones(2), "frozen": None, "b": [torch.ones(3)]}
    grads = {"a": torch.ones(2), "frozen": None, "b": [None]}
    s = opt.init_state(params)
    assert s["exp_avg"]["frozen"] is None
    p, s = opt.update(params, grads, s)
    assert p["frozen"] is None and p["b"][0] is params["b"][0]
    assert not torch.equal(p["a"], params["a"])
