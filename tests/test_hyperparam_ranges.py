"""Hyperparameter values the ranges must refuse at construction: non-finite values everywhere,
and SGD's momentum and dampening outside [0, 1]."""

import math

import pytest

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
