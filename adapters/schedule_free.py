"""``ScheduleFreeAdamW``: the torch.optim adapter over :func:`functim.schedule_free_adamw`.

Same signature, defaults and protocol as the reference ``schedulefree.AdamWScheduleFree``
(facebookresearch/schedule_free@70785b5): the params hold the training point ``y`` in train
mode and the average ``x`` in eval mode; call ``optimizer.train()`` before training steps and
``optimizer.eval()`` before evaluating or saving a checkpoint. Both are idempotent, and the mode is
kept per param group in ``group["train_mode"]``, so it travels with ``state_dict()``. Save the
model and the optimizer in the same mode (both state dicts together).

The maths is the functional optimizer's: each ``step()`` calls its ``update`` in donated (in-place)
mode through :class:`~functim.adapters.FunctimOptimizer`'s generic path, and ``train()``/``eval()``
call :func:`functim.schedule_free_train_params` / :func:`functim.schedule_free_eval_params` with
``donate=True``. Per-parameter state (torch's ``self.state[p]``, created at construction so
``torch.distributed.checkpoint`` sees it): ``z``, ``exp_avg_sq``, and the group's scalars
``step`` (int32), ``lr_max`` and ``weight_sum`` (float64), the same values stored with each param
of the group.

Like the reference, ``z`` is the params as they are at a group's *first* step (the reference
creates it then): weights loaded into the model after the optimizer was built are picked up.
Before the first step ``x = y = z``, so ``train()``/``eval()`` only switch the mode flag.
"""

from __future__ import annotations

from typing import Any

import torch

from functim.hyperparams import HPARAM_DTYPE, HPARAMS_KEY
from functim.optimizers.schedule_free import (
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_train_params,
)

from .torch_optim import NamedAdapter

__all__ = ["ScheduleFreeAdamW"]

MODE_KEY = "train_mode"


class ScheduleFreeAdamW(NamedAdapter):
    """``schedulefree.AdamWScheduleFree``'s signature over :func:`functim.schedule_free_adamw`.

    ``state_dtype`` and ``weight_decay_mask`` as in the functional constructor. Every other
    keyword is a param-group hyperparameter read at each step (LR schedulers drive ``lr``; the
    built-in warmup multiplies it).
    """

    functional = staticmethod(schedule_free_adamw)
    static_options = ("state_dtype",)

    def __init__(self, params, lr: float = 0.0025, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, *, state_dtype: torch.dtype | None = None,
                 weight_decay_mask: Any = None):
        self._started: dict[int, bool] = {}  # group index -> has taken a step (host flag)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                         state_dtype=state_dtype, weight_decay_mask=weight_decay_mask)

    # -- groups and state ----------------------------------------------------------------------
    def _ctor_kwargs(self, group: dict) -> dict:
        return {k: v for k, v in super()._ctor_kwargs(group).items() if k != MODE_KEY}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault(MODE_KEY, True)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._started.clear()
        for group in self.param_groups:
            group.setdefault(MODE_KEY, True)

    def _has_started(self, gi: int, group: dict) -> bool:
        started = self._started.get(gi)
        if started is None:
            params = group["params"]
            # one read per group (at the first step, or after loading a state dict)
            started = bool(params) and int(self.state[params[0]]["step"]) > 0
            self._started[gi] = started
        return started

    # -- modes ---------------------------------------------------------------------------------
    def _swap(self, gi: int, group: dict, fn) -> None:
        if not self._has_started(gi, group):
            return  # x = y = z: nothing to move
        params = group["params"]
        tree = dict(enumerate(params))
        state = {"z": {i: self.state[p]["z"] for i, p in tree.items()},
                 HPARAMS_KEY: {"beta1": torch.as_tensor(group["betas"][0], dtype=HPARAM_DTYPE)}}
        fn(tree, state, donate=True)

    @torch.no_grad()
    def eval(self) -> None:
        """Put the averaged params ``x`` into the model (no-op in eval mode)."""
        todo = [(gi, g) for gi, g in enumerate(self.param_groups) if g[MODE_KEY]]
        for gi, g in todo:  # check every group before moving any
            if float(g["betas"][0]) == 0.0:
                raise ValueError(
                    f"ScheduleFreeAdamW.eval(): param group {gi} has beta1 = 0, so the averaged "
                    "params x cannot be recovered from y and z (the training params y = z are "
                    "the only point there is)")
        for gi, g in todo:
            self._swap(gi, g, schedule_free_eval_params)
            g[MODE_KEY] = False

    @torch.no_grad()
    def train(self) -> None:
        """Put the training params ``y`` back into the model (no-op in train mode)."""
        for gi, g in enumerate(self.param_groups):
            if not g[MODE_KEY]:
                self._swap(gi, g, schedule_free_train_params)
                g[MODE_KEY] = True

    # -- step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        self._check_compilable()
        self._check_changed_groups()
        for gi, group in enumerate(self.param_groups):
            if not group[MODE_KEY]:
                raise RuntimeError(
                    f"ScheduleFreeAdamW.step(): param group {gi} is in eval mode (its params hold "
                    "the average x); call optimizer.train() before training steps and "
                    "optimizer.eval() before evaluating or saving")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_dense_grads([[p.grad for p in g["params"]] for g in self.param_groups])
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            if all(p.grad is None for p in params):
                continue
            if not self._has_started(gi, group):
                # z starts at the params of the first step, as the reference's lazy init
                for p in params:
                    self.state[p]["z"].copy_(p)
            self._step_generic(gi, group, self._group_optimizer(group))
            self._started[gi] = True
        return loss
