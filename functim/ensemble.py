"""``ensemble(opt)``: the same optimizer over a stack of models, with ``torch.func.vmap``.

``torch.func.vmap`` refuses ``None`` leaves with a batch dim, and functim states hold ``None``
where a parameter is frozen or has no buffer of that kind (Muon's AdamW leaves have no
``momentum_buffer``, ``partition`` masks the other labels' leaves). :func:`ensemble` computes the
matching ``in_dims``/``out_dims`` (0 for tensors, ``None`` for ``None`` leaves) so that every
functim optimizer vmaps the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _tree
from .optimizer import Optimizer, State


def vmap_axes(tree: Any, axis: int | None = 0) -> Any:
    """``tree`` with every tensor replaced by ``axis`` and every ``None`` kept ``None``: the
    ``in_dims``/``out_dims`` torch.func.vmap needs for a functim pytree."""
    return _tree.map_tree(lambda x: axis, tree)


class Ensemble(Optimizer):
    """``opt`` applied independently to each member of a stacked ensemble (leading dim of every
    leaf), vectorised with ``torch.func.vmap``; identical to a Python loop over the members."""

    def __init__(self, optimizer: Optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"ensemble: expected a functim Optimizer, got {optimizer!r}")
        self.optimizer = optimizer
        self.name = f"ensemble({optimizer.name})"

    def hyperparam_ranges(self):
        return self.optimizer.hyperparam_ranges()

    def hyperparam_schedules(self):
        return self.optimizer.hyperparam_schedules()

    def _member_state_axes(self, params: Any) -> Any:
        member = _tree.map_tree(lambda x: torch.empty(x.shape[1:], dtype=x.dtype,
                                                      device="meta"), params)
        return vmap_axes(self.optimizer.init_state(member))

    def init_state(self, params: Any) -> State:
        return torch.func.vmap(self.optimizer.init_state, in_dims=(vmap_axes(params),),
                               out_dims=self._member_state_axes(params))(params)

    def update(self, params, grads, state, *, donate: bool = False, **extra):
        state_axes = vmap_axes(state)

        def one(p, g, s):
            return self.optimizer.update(p, g, s, **extra)

        return torch.func.vmap(one, in_dims=(vmap_axes(params), vmap_axes(grads), state_axes),
                               out_dims=(vmap_axes(params), state_axes))(params, grads, state)


def ensemble(optimizer: Optimizer) -> Ensemble:
    """Train a stack of models at once: every leaf of params/grads/state has a leading member
    dim. ``ft.ensemble(ft.muon()).update(params, grads, state)`` ≡ a loop over members."""
    return Ensemble(optimizer)
