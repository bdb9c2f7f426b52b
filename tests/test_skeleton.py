"""Every optimizer family updates through the one skeleton, ``TreeOptimizer.update``."""

import optree
import pytest
import torch

import functim as ft
from functim.optimizer import TreeOptimizer
from functim.optimizers.sophia import SophiaOptimizer
from functim.state import StateSpec

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


F32, F64, I32, I64 = torch.float32, torch.float64, torch.int32, torch.int64
W, B = ((4, 3), F32), ((3,), F32)
# each family's state on {"w": (4, 3), "b": (3,)}: keys in order, then {key: {path: leaf}}
STATE_LAYOUTS = {
    "adamw": (["step", "hyperparams", "exp_avg", "exp_avg_sq", "made_by"],
              {"exp_avg": {"b": B, "w": W}, "exp_avg_sq": {"b": B, "w": W}}),
    "schedule_free_adamw": (
        ["step", "hyperparams", "lr_max", "weight_sum", "z", "exp_avg_sq", "made_by"],
        {"lr_max": {"": ((), F64)}, "weight_sum": {"": ((), F64)}, "z": {"b": B, "w": W},
         "exp_avg_sq": {"b": B, "w": W}}),
    "muon": (["step", "hyperparams", "momentum_buffer", "exp_avg", "exp_avg_sq", "made_by"],
             {"momentum_buffer": {"b": None, "w": W}, "exp_avg": {"b": B, "w": None},
              "exp_avg_sq": {"b": B, "w": None}}),
    "scion": (["step", "hyperparams", "momentum_buffer", "made_by"],
              {"momentum_buffer": {"b": B, "w": W}}),
    "soap": (["step", "calls", "hyperparams", "exp_avg", "exp_avg_sq", "GG", "Q", "made_by"],
             {"calls": {"": ((), I64)}, "exp_avg": {"b": B, "w": W},
              "exp_avg_sq": {"b": B, "w": W},
              "GG": {"w.0": ((4, 4), F32), "w.1": ((3, 3), F32)},
              "Q": {"w.0": ((4, 4), F32), "w.1": ((3, 3), F32)}}),
    "kron": (["step", "hyperparams", "prob_step", "update_counter", "precond_updates", "rng",
              "momentum_buffer", "Q", "made_by"],
             {"prob_step": {"": ((), I64)}, "update_counter": {"": ((), I64)},
              "precond_updates": {"": ((), I64)}, "momentum_buffer": {"b": B, "w": W},
              "Q": {"b.0": ((3,), F32), "w.0": ((4, 4), F32), "w.1": ((3, 3), F32)}}),
}


@pytest.mark.parametrize("name", STATE_LAYOUTS)
def test_state_layout_is_declared_and_unchanged(name):
    opt = FAMILIES[name]()
    assert isinstance(opt.state_spec, StateSpec)
    state = opt.init_state({"w": torch.ones(4, 3), "b": torch.ones(3)})
    keys, layout = STATE_LAYOUTS[name]
    assert list(state) == keys
    assert set(opt.state_spec.keys) <= set(keys)
    assert state["step"].shape == () and state["step"].dtype == I32
    for key, leaves in layout.items():
        flat = optree.tree_flatten_with_path(state[key], none_is_leaf=True)
        got = {".".join(map(str, p)): None if x is None else (tuple(x.shape), x.dtype)
               for p, x in zip(flat[0], flat[1])}
        assert got == leaves, key
    for key in opt.state_spec.counters:
        assert state[key].device.type == "cpu"
    if name == "kron":
        assert state["rng"].dtype == torch.uint8 and state["rng"].ndim == 1
