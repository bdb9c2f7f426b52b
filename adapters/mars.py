"""``Mars``: the reference MARS optimizer's signature (AGI-Arena/MARS ``MARS``) as a
``torch.optim.Optimizer`` over :func:`functim.optimizers.mars.mars`.

Keyword names and defaults are the reference's (``is_approx`` is keyword-only here and only
``True``, the reference's default, is accepted: the "exact" variant is not implemented). Group
keys: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``gamma``, ``lr_1d``, ``betas_1d``,
``weight_decay_1d`` are hyperparameters read at every step (LR schedulers drive ``lr``);
``mars_type``, ``optimize_1d``, ``amsgrad``, ``clip`` and ``state_dtype`` change the kernel or the
state layout.

The non-2-D leaves' lr is ``group["lr"]·lr_1d/lr_init`` with ``lr_init`` the constructor's ``lr``
for every group, as the reference's ``lr_1d_factor = lr_1d / self.lr``: an LR scheduler scales the
1-D lr with the group's lr.
"""

from __future__ import annotations

from typing import Any

import torch

from functim.optimizers.mars import mars

from .torch_optim import NamedAdapter


class Mars(NamedAdapter):
    """``MARS(params, lr=3e-3, betas=(0.95, 0.99), ...)`` over :func:`functim.mars`.

    The result is bitwise that of ``functim.mars(...).update`` on the same gradients (MARS has
    no fused kernel, so ``fused`` changes nothing). ``state_dtype`` and ``weight_decay_mask`` as in
    the functional constructor.
    """

    functional = staticmethod(mars)
    static_options = ("mars_type", "optimize_1d", "amsgrad", "clip", "state_dtype")

    def __init__(self, params, lr: float = 3e-3, betas=(0.95, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, gamma: float = 0.025,
                 mars_type: str = "mars-adamw", optimize_1d: bool = False, lr_1d: float = 3e-3,
                 betas_1d=(0.9, 0.95), weight_decay_1d: float = 0.1, *,
                 clip: str = "per_tensor", state_dtype: torch.dtype | None = None,
                 weight_decay_mask: Any = None, fused: bool | None = None,
                 is_approx: bool = True, compile: bool = False):
        if is_approx is not True:
            raise ValueError("functim.adapters.Mars: is_approx=False (the reference's 'exact' "
                             "variant, two backward passes per step) is not implemented")
        # the reference fixes lr_1d/lr at construction, with the constructor's lr for all groups
        self._lr_init = lr
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, gamma=gamma, mars_type=mars_type,
                         optimize_1d=optimize_1d, lr_1d=lr_1d, betas_1d=betas_1d,
                         weight_decay_1d=weight_decay_1d, clip=clip, state_dtype=state_dtype,
                         fused=fused, weight_decay_mask=weight_decay_mask, compile=compile)

    def _ctor_kwargs(self, group: dict) -> dict:
        return {**super()._ctor_kwargs(group), "lr_init": self._lr_init}

    def _group_hparams(self, group: dict) -> dict:
        out = super()._group_hparams(group)
        b1, b2 = group["betas_1d"]
        out["beta1_1d"], out["beta2_1d"] = b1, b2
        return out
