"""Every optimizer family updates through the one skeleton, ``TreeOptimizer.update``."""

import pytest
import torch

import functim as ft
from functim.optimizer import TreeOptimizer
from functim.optimizers.sophia import SophiaOptimizer

FAMILIES = {
    "adamw": ft.adamw,
    "sgd": lambda: ft.sgd(momentum=0.9),
    "nadamw": ft.nadamw,
    "lion": ft.lion,
    "cautious_adamw": ft.cautious_adamw,
    "mars": ft.mars,
    "schedule_free_adamw": ft.schedule_free_adamw,
    "sophia": ft.sophia,
    "muon": ft.muon,
    "scion": lambda: ft.scion(momentum=0.1),
    "soap": ft.soap,
    "kron": ft.kron,
}


def _overrides(cls: type, method: str) -> list[type]:
    """The classes before ``TreeOptimizer`` in ``cls``'s MRO that define ``method``."""
    mro = cls.__mro__
    return [c for c in mro[:mro.index(TreeOptimizer)] if method in vars(c)]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_updates_through_the_skeleton(name):
    opt = FAMILIES[name]()
    assert isinstance(opt, TreeOptimizer)
    expected = [SophiaOptimizer] if name == "sophia" else []
    assert _overrides(type(opt), "update") == expected
    assert _overrides(type(opt), "validate") == []


def test_sophia_update_calls_the_skeleton(monkeypatch):
    calls = []
    skeleton = TreeOptimizer.update

    def spy(self, *args, **kwargs):
        calls.append(type(self))
        return skeleton(self, *args, **kwargs)

    monkeypatch.setattr(TreeOptimizer, "update", spy)
    opt = ft.sophia()
    params = {"w": torch.ones(3, 2)}
    grads = {"w": torch.full((3, 2), 0.5)}
    state = opt.init_state(params)
    opt.update(params, grads, state, hessian={"w": torch.ones(3, 2)})
    assert calls == [SophiaOptimizer]
