"""Hyperparameter values the ranges must refuse at construction: non-finite values everywhere,
and SGD's momentum and dampening outside [0, 1]."""

import math

import pytest
import torch

import functim as ft

# (constructor, a non-negative hyperparameter it takes)
NONNEGATIVE = [
    (ft.adamw, "lr"), (ft.adamw, "weight_decay"), (ft.adamw, "eps"), (ft.sgd, "lr"),
    (ft.nadamw, "lr"), (ft.cautious_adamw, "eps"), (ft.cautious_lion, "lr"), (ft.lion, "lr"),
    (ft.signsgd, "weight_decay"), (ft.signum, "lr"), (ft.mars, "lr"),
    (ft.schedule_free_adamw, "lr"), (ft.muon, "lr"), (ft.scion, "lr"), (ft.soap, "lr"),
    (ft.kron, "lr"), (ft.sophia, "rho"), (ft.sophia, "bs"),
]


@pytest.mark.parametrize("make, name", NONNEGATIVE,
                         ids=[f"{m.__name__}-{n}" for m, n in NONNEGATIVE])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_non_finite_values_are_refused_naming_them(make, name, value):
    with pytest.raises(ValueError, match=f"'{name}'"):
        make(**{name: value})


@pytest.mark.parametrize("kw, name", [
    ({"momentum": 1.5}, "momentum"), ({"momentum": -0.1}, "momentum"),
    ({"momentum": 0.9, "dampening": 2.0}, "dampening"),
    ({"momentum": 0.9, "dampening": -0.5}, "dampening"),
])
def test_sgd_momentum_and_dampening_are_in_unit_interval(kw, name):
    with pytest.raises(ValueError, match=f"'{name}' must be in \\[0.0, 1.0\\]"):
        ft.sgd(lr=0.1, **kw)


def test_unit_interval_edges_are_accepted():
    ft.sgd(lr=0.1, momentum=1.0, dampening=1.0)
    ft.sgd(lr=0.1, momentum=0.0, dampening=0.0)


@pytest.mark.parametrize("value, exc", [(math.inf, ValueError), (math.nan, ValueError),
                                        ("0.1", TypeError)], ids=["inf", "nan", "str"])
def test_set_hyperparams_refuses_non_finite_and_non_numbers(value, exc):
    opt = ft.adamw(lr=1e-3)
    state = opt.init_state({"w": torch.ones(2)})
    with pytest.raises(exc, match="'lr'"):
        ft.set_hyperparams(state, lr=value)
    assert float(state["hyperparams"]["lr"]) == 1e-3


def test_set_hyperparams_checks_ranges_with_the_optimizer():
    opt = ft.chain(ft.clip_by_global_norm(1.0), ft.sgd(lr=0.1, momentum=0.9))
    state = opt.init_state({"w": torch.ones(2)})
    with pytest.raises(ValueError, match="'optimizer.lr' must be in"):
        ft.set_hyperparams(state, optimizer=opt, lr=-1.0)
    with pytest.raises(ValueError, match="'optimizer.momentum' must be in"):
        ft.set_hyperparams(state, optimizer=opt, momentum=1.5)
    new = ft.set_hyperparams(state, optimizer=opt, lr=0.2, momentum=0.5)
    assert float(new["optimizer"]["hyperparams"]["lr"]) == 0.2


@pytest.mark.parametrize("make, key", [
    (lambda: ft.adamw(lr=ft.warmup_cosine(1e-3, 5, 50)), "lr"),
    (lambda: ft.chain(ft.clip_by_global_norm(1.0),
                      ft.sgd(lr=ft.linear_warmup(0.1, 5))), "lr"),
    (lambda: ft.chain(ft.clip_by_global_norm(ft.constant_schedule(1.0)), ft.sgd(lr=0.1)),
     "max_norm"),
    (lambda: ft.partition([ft.Rule("a")], {"a": ft.muon(lr=ft.constant_schedule(0.02))}),
     "lr"),
], ids=["adamw", "chain", "chain-transform", "partition-muon"])
def test_set_hyperparams_refuses_a_scheduled_hyperparameter(make, key):
    opt = make()
    state = opt.init_state({"w": torch.ones(3, 2)})
    with pytest.raises(ValueError, match="driven by the schedule"):
        ft.set_hyperparams(state, optimizer=opt, **{key: 0.5})
