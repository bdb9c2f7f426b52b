"""Odd-but-legal and bad inputs on the functional surface, for every optimizer: each rejected call
raises the stated error naming the leaf, with params and state bitwise unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_trees_equal, clone_tree
from test_adapter_safety import ADAPTERS, FUNCTIONAL, _backward, _model, _snapshot, _train

import functim as ft
from functim import adapters


@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_one_tensor_under_two_names_is_refused_in_place(name):
    opt = FUNCTIONAL[name]()
    shared = torch.ones(3, 2)
    params = {"a": shared, "b": shared}
    state = opt.init_state(params)
    grads = {"a": torch.ones(3, 2), "b": torch.full((3, 2), 2.0)}
    before = clone_tree((params, state))
    with pytest.raises(ValueError, match="params 'a' and 'b' are the same tensor"):
        opt.update(params, grads, state, donate=True)
    assert_trees_equal((params, state), before)


@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_one_tensor_under_two_names_out_of_place_gives_independent_leaves(name):
    """Out of place, each name is its own leaf: the same as two separate tensors."""
    opt = FUNCTIONAL[name]()
    grads = {"a": torch.ones(3, 2), "b": torch.full((3, 2), 2.0)}
    shared = torch.linspace(-1, 1, 6).reshape(3, 2)
    aliased = {"a": shared, "b": shared}
    separate = {"a": shared.clone(), "b": shared.clone()}
    got, _ = opt.update(aliased, grads, opt.init_state(aliased))
    want, _ = opt.update(separate, grads, opt.init_state(separate))
    assert_trees_equal(got, want)
    assert torch.equal(shared, torch.linspace(-1, 1, 6).reshape(3, 2))


def test_skip_nonfinite_checks_sophias_hessian_estimate():
    opt = ft.skip_nonfinite(ft.sophia(lr=1e-2))
    params = {"w": torch.ones(3, 2)}
    state = opt.init_state(params)
    grads = {"w": torch.ones(3, 2)}
    estimate = {"w": torch.full((3, 2), float("nan"))}
    new_params, new_state = opt.update(params, grads, state, hessian=estimate)
    assert torch.equal(new_params["w"], params["w"])
    assert int(new_state["skipped_steps"]) == 1
    assert_trees_equal(new_state["optimizer"], state["optimizer"])


@pytest.mark.parametrize("value", ["x", float("inf"), -1.0])
def test_nadamw_momentum_decay_checked_for_every_variant(value):
    with pytest.raises((TypeError, ValueError), match="'momentum_decay'"):
        ft.nadamw(momentum_decay=value)
    with pytest.raises((TypeError, ValueError), match="'momentum_decay'"):
        ft.nadamw(momentum_decay=value, variant="torch")


RULE_CASES = {
    "tuple-rule": ([("sgd", "0.*"), ft.Rule("adamw")], TypeError, "rule 0 must be a functim.Rule"),
    "str-rules": ("adamw", TypeError, "rules must be a list"),
    "none-rules": (None, TypeError, "rules must be a list"),
    "dict-rule-item": ([{"label": "adamw"}], TypeError, "rule 0 must be a functim.Rule"),
    "bad-selector": ({"adamw": 3}, TypeError, "selector for label 'adamw'"),
}


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_malformed_rules_are_a_type_error_at_construction(case):
    rules, exc, match = RULE_CASES[case]
    with pytest.raises(exc, match=match):
        ft.partition(rules, {"sgd": ft.sgd(lr=0.1), "adamw": ft.adamw()})
    if rules is not None:  # (muon's routing=None is its default routing)
        with pytest.raises(exc, match=match):
            ft.muon(routing=rules)


@pytest.mark.parametrize("kw, match", [({"ndim": "2"}, "ndim"), ({"shape": 3}, "shape"),
                                       ({"path": 5}, "path"), ({"ndim": [2, "3"]}, "ndim")])
def test_rule_criteria_of_the_wrong_type_are_refused(kw, match):
    with pytest.raises(TypeError, match=f"Rule\\('x'\\): {match}"):
        ft.Rule("x", **kw)


OPTION_CASES = {
    "scion-eps-negative": (lambda: ft.scion(eps=-1.0), ValueError, "eps"),
    "scion-eps-nan": (lambda: ft.scion(eps=float("nan")), ValueError, "eps"),
    "scion-eps-str": (lambda: ft.scion(eps="0.1"), TypeError, "eps"),
    "scion-eps-none": (lambda: ft.scion(eps=None), TypeError, "eps"),
    "muon-eps-str": (lambda: ft.muon(eps="x"), TypeError, "eps"),
    "muon-eps-bool": (lambda: ft.muon(eps=True), TypeError, "eps"),
    "muon-eps-vector": (lambda: ft.muon(eps=torch.ones(1)), TypeError, "eps"),
    "muon-consistent-rms-none": (lambda: ft.muon(consistent_rms=None), TypeError,
                                 "consistent_rms"),
    "muon-consistent-rms-zero": (lambda: ft.muon(consistent_rms=0.0), ValueError,
                                 "consistent_rms"),
    "muon-ns-coefficients-int": (lambda: ft.muon(ns_coefficients=5), TypeError,
                                 "ns_coefficients"),
    "muon-ns-coefficients-nan": (lambda: ft.muon(ns_coefficients=(float("nan"), 1, 1)),
                                 ValueError, r"ns_coefficients\[0\]"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_matrix_optimizer_options_are_checked_naming_them(case):
    make, exc, match = OPTION_CASES[case]
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("make", [lambda: ft.muon(lr=0.02), lambda: ft.scion(lr=0.02)],
                         ids=["muon", "scion"])
@pytest.mark.parametrize("shape", [(6, 0), (0, 6)])
def test_empty_matrices_are_no_ops(make, shape):
    opt = make()
    params = {"blocks.0.w": torch.zeros(shape), "blocks.0.v": torch.ones(4, 3)}
    state = opt.init_state(params)
    grads = {"blocks.0.w": torch.zeros(shape), "blocks.0.v": torch.ones(4, 3)}
    new, _ = opt.update(params, grads, state)
    assert new["blocks.0.w"].shape == shape
    assert not torch.equal(new["blocks.0.v"], params["blocks.0.v"])


@pytest.mark.parametrize("make, option", [
    (lambda: ft.muon(adamw_betas=(0.9,)), "adamw_betas"),
    (lambda: ft.mars(betas_1d=0.9), "betas_1d"),
    (lambda: ft.adamw(betas=(0.9, 0.99, 0.999)), "betas"),
], ids=["muon-adamw-betas", "mars-betas-1d", "adamw-betas"])
def test_betas_of_the_wrong_form_name_their_option(make, option):
    with pytest.raises(TypeError, match=f"'{option}' must be a tuple of 2 values"):
        make()


@pytest.mark.parametrize("make, option", [
    (lambda ps: adapters.Mars(ps, betas=0.9), "betas"),
    (lambda ps: adapters.Mars(ps, betas_1d=0.9), "betas_1d"),
    (lambda ps: adapters.Soap(ps, betas=0.9), "betas"),
    (lambda ps: adapters.Muon(ps, adamw_betas=0.9), "adamw_betas"),
    (lambda ps: adapters.Muon(ps, adamw_betas=(0.9, 0.95, 0.99)), "adamw_betas"),
    (lambda ps: adapters.AdamW(ps, betas=0.9), "betas"),
], ids=["mars-betas", "mars-betas-1d", "soap-betas", "muon-adamw-betas", "muon-adamw-betas-3",
        "adamw-betas"])
def test_adapter_betas_of_the_wrong_form_are_the_core_s_error(make, option):
    params = [("w", torch.nn.Parameter(torch.ones(3, 2)))]
    with pytest.raises(TypeError, match=f"'{option}' must be a tuple of 2 values"):
        make(params)


# -- the sweep: every optimizer, both surfaces, one bad input of each class -----------------------
# Each rejected call raises the stated error, its message names the parameter (or the option), and
# params, grads and state are bitwise what they were. Functional: the optimizers of FUNCTIONAL (the
# 15 families and the combinators) on a two-leaf tree; torch.optim: every adapter class of
# ADAPTERS on a small model.
def _functional_case(name):
    opt = FUNCTIONAL[name]()
    params = {"a": torch.linspace(-1, 1, 6).reshape(3, 2), "b": torch.ones(3, 2)}
    grads = {"a": torch.ones(3, 2), "b": torch.full((3, 2), 0.5)}
    return opt, params, grads, opt.init_state(params)


def _assert_refused(call, exc, match, trees):
    before = clone_tree(trees)
    with pytest.raises(exc, match=match):
        call()
    assert_trees_equal(trees, before)


FUNCTIONAL_BAD = {
    "grad-wrong-shape": (lambda p, g: {**g, "b": torch.ones(2, 3)}, ValueError,
                         r"grad at 'b' is tensor\(shape=\(2, 3\)"),
    "grad-other-device": (lambda p, g: {**g, "b": torch.ones(3, 2, device="meta")}, ValueError,
                          r"grad at 'b' is on meta"),
    "grad-integer": (lambda p, g: {**g, "b": torch.ones(3, 2, dtype=torch.int64)}, TypeError,
                     r"grad at 'b' must be floating point"),
    "grad-missing-leaf": (lambda p, g: {"a": g["a"]}, ValueError, r"missing from grads: \['b'\]"),
}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donate"])
@pytest.mark.parametrize("case", list(FUNCTIONAL_BAD))
@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_sweep_functional_bad_grads(name, case, donate):
    opt, params, grads, state = _functional_case(name)
    make, exc, match = FUNCTIONAL_BAD[case]
    bad = make(params, grads)
    _assert_refused(lambda: opt.update(params, bad, state, donate=donate), exc, match,
                    (params, grads, state))


# (optimizers without per-parameter state have no state of "other params" to refuse)
@pytest.mark.parametrize("name", [n for n in FUNCTIONAL
                                  if n not in ("sgd-plain", "signsgd", "skip_nonfinite")])
def test_sweep_functional_state_of_other_params(name):
    opt, params, grads, _ = _functional_case(name)
    other = opt.init_state({"a": torch.ones(3, 2), "c": torch.ones(3, 2)})
    _assert_refused(lambda: opt.update(params, grads, other, donate=True), ValueError,
                    r"'b'|'c'", (params, grads, other))


# a state is refused by every other optimizer, even one with the same keys (AdamW, NAdamW and
# Cautious AdamW keep step, hyperparams, exp_avg, exp_avg_sq); combinators name their child
LEAF_OPTIMIZERS = [n for n in FUNCTIONAL if n not in ("chain", "skip_nonfinite", "partition")]


@pytest.mark.parametrize("maker", LEAF_OPTIMIZERS)
def test_sweep_functional_state_made_by_another_optimizer(maker):
    _, params, grads, state = _functional_case(maker)
    made_by = next(iter(state["made_by"]))
    for name in LEAF_OPTIMIZERS:
        opt = FUNCTIONAL[name]()
        if opt.name == made_by:  # (the same optimizer with other settings)
            continue
        _assert_refused(lambda opt=opt: opt.update(params, grads, state, donate=True), ValueError,
                        rf"but by '{made_by}'|expected keys|must have", (params, grads, state))


@pytest.mark.parametrize("pair", [("adamw-foreach", "nadamw"),
                                  ("adamw-foreach", "cautious_adamw"),
                                  ("nadamw", "cautious_adamw")])
def test_same_keys_other_optimizer_is_refused_naming_the_maker(pair):
    maker, user = pair
    _, params, grads, state = _functional_case(maker)
    opt = FUNCTIONAL[user]()
    _assert_refused(lambda: opt.update(params, grads, state), ValueError,
                    rf"{opt.name}: this state was not made by {opt.name}.init_state but by "
                    rf"'{FUNCTIONAL[maker]().name}'",
                    (params, grads, state))


def test_state_identity_is_kept_by_update_and_a_state_without_it_still_loads():
    opt, params, grads, state = _functional_case("nadamw")
    _, new = opt.update(params, grads, state)
    assert new["made_by"] == {"nadamw": {}}
    assert ft.set_hyperparams(new, lr=0.1)["made_by"] == {"nadamw": {}}
    legacy = {k: v for k, v in state.items() if k != "made_by"}  # made before it existed
    _, new = opt.update(params, grads, legacy)
    assert "made_by" not in new  # (the state keeps its structure)
    # the marker holds no tensor: vmap over stacked models (ft.ensemble) keeps it as it is
    stacked = {"w": torch.ones(2, 3, 2)}
    ens = ft.ensemble(opt)
    ens_state = ens.init_state(stacked)
    _, ens_state = ens.update(stacked, {"w": torch.ones(2, 3, 2)}, ens_state)
    assert ens_state["made_by"] == {"nadamw": {}}


@pytest.mark.parametrize("name", list(FUNCTIONAL))
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_sweep_functional_set_hyperparams_out_of_range(name, value):
    opt, params, grads, state = _functional_case(name)
    lr_path = next(k for k in ft.get_hyperparams(state) if k.rsplit(".", 1)[-1] == "lr")
    _assert_refused(lambda: ft.set_hyperparams(state, optimizer=opt, **{lr_path: value}),
                    ValueError, f"'{lr_path}'", state)


ADAPTER_BAD = {
    "group-lr-negative": lambda opt, m: opt.param_groups[0].__setitem__("lr", -1.0),
    "group-lr-inf": lambda opt, m: opt.param_groups[0].__setitem__("lr", float("inf")),
    "group-lr-str": lambda opt, m: opt.param_groups[0].__setitem__("lr", "1e-3"),
}


@pytest.mark.parametrize("case", list(ADAPTER_BAD))
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_sweep_adapter_group_values_set_later(name, case):
    m = _model()
    opt = ADAPTERS[name](m.named_parameters())
    _train(m, opt, 1)
    ADAPTER_BAD[case](opt, m)
    _backward(m, 1)
    params, state = [p.detach().clone() for p in m.parameters()], _snapshot(opt)["state"]
    with pytest.raises((TypeError, ValueError), match=r"param group 0.*'lr'"):
        opt.step()
    for p, q in zip(m.parameters(), params):
        assert torch.equal(p, q)
    assert_trees_equal(_snapshot(opt)["state"], state)


@pytest.mark.parametrize("name", [n for n in ADAPTERS if n != "SignSGD"])
def test_sweep_adapter_state_dict_of_another_shape(name):
    """A state dict saved for a model of other shapes is refused naming the param."""
    m = _model()
    opt = ADAPTERS[name](m.named_parameters())
    _train(m, opt, 1)
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    other_opt = ADAPTERS[name](other.named_parameters())
    _train(other, other_opt, 1)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"param '0\.(weight|bias)'"):
        opt.load_state_dict(other_opt.state_dict())
    assert_trees_equal(_snapshot(opt), before)
