"""Odd-but-legal and bad inputs on the functional surface, for every optimizer: each rejected call
raises the stated error naming the leaf, with params and state bitwise unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_trees_equal, clone_tree
from test_adapter_safety import FUNCTIONAL

import functim as ft


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
