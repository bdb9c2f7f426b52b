"""SGD with momentum, dampening, Nesterov and (coupled, L2) weight decay, as torch.optim.SGD.

Follows ``torch.optim.sgd``: ``g ← −g`` if maximize; ``g ← g + λ·p``; the momentum buffer is
``g`` itself on the first step and ``μ·buf + (1 − dampening)·g`` afterwards (written without a
branch: the weight on ``g`` is 1 at step 1); Nesterov uses ``g + μ·buf``; ``p ← p − η·g``.

The momentum buffer exists only when ``momentum`` is not the constant 0 (as torch, which stores
``None``); with ``momentum=0`` the state has no buffer and its ``momentum`` entry has no effect.

``fused=None`` (default) runs torch's fused SGD kernel (``torch.optim.SGD(fused=True)``'s) where
the hyperparameters are on the host (see :class:`~functim.ElementwiseOptimizer`) and it computes
this maths: no momentum buffer, or momentum ≠ 0 with dampening 0 (its first step, ``μ·0 + g``,
is then exactly ``g``, so it needs no step count). It rounds ``p − η·g`` as one fused
multiply-add, so it can differ from the multi-tensor kernel (``fused=False``, two roundings,
bitwise the closed form ``p − η·g``) by an ulp.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..base import ElementwiseOptimizer
from ..hyperparams import NONNEGATIVE, UNIT, ScalarOrSchedule
from ..kernels import has_dtensor


def _sgd_kernel(ops, p, g, b, hp, step, *, decay, inplace, has_momentum, nesterov, maximize):
    # ``g + λ·p`` and the momentum updates are ``add_scaled`` (rounded once, like torch's
    # ``add_(b, alpha=c)``); ``owned``: g is a temporary of ours by now and may be overwritten
    lr = hp["lr"]
    owned = False
    if maximize:
        g, owned = ops.neg(g), True
    if decay:
        g = ops.add_scaled(g, p, hp["weight_decay"], inplace=owned)
        owned = True
    new_b = {}
    if has_momentum:
        mu = hp["momentum"]
        g_weight = torch.where(step == 1, torch.ones_like(mu), 1 - hp["dampening"])
        buf = ops.mul(b["momentum_buffer"], mu, inplace=inplace)
        buf = ops.add_scaled(buf, g, g_weight, inplace=True)
        new_b["momentum_buffer"] = buf
        if nesterov:  # (a new list when g was not ours)
            g, owned = ops.add_scaled(g, buf, mu, inplace=owned), True
        else:
            g, owned = buf, False
    # the step is rounded twice, p + (−η·g), exactly as the closed form p − η·g (schedule tests
    # compare plain SGD bitwise against it); g is scaled in place when it is ours
    p = ops.add(p, ops.mul(g, -lr, inplace=owned), inplace=inplace)
    return p, new_b


def _sgd_fused(p, g, b, hp, step, *, decay, has_momentum, nesterov, maximize):
    # (see _fused_applies: dampening is 0, so is_first_step=False gives the first step's g)
    torch._fused_sgd_(
        p, g, b["momentum_buffer"] if has_momentum else [],
        weight_decay=hp["weight_decay"] if decay else 0.0,
        momentum=hp["momentum"] if has_momentum else 0.0, lr=hp["lr"],
        dampening=hp["dampening"], nesterov=nesterov, maximize=maximize, is_first_step=False,
    )


def _fused_applies(hp, params, *, has_momentum):
    """torch's fused kernel computes functim's SGD for these host hyperparameters (and has no
    DTensor sharding rule in torch 2.13)."""
    if has_dtensor(params):
        return False
    return not has_momentum or (hp["momentum"] != 0.0 and hp["dampening"] == 0.0)


def sgd(
    lr: ScalarOrSchedule = 1e-3,
    momentum: ScalarOrSchedule = 0.0,
    dampening: ScalarOrSchedule = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
    state_dtype: torch.dtype | None = None,
    weight_decay_mask: Any = None,
    fused: bool | None = None,
) -> ElementwiseOptimizer:
    """SGD with torch.optim.SGD semantics and defaults. ``fused``: see the module docstring."""
    for name, flag in (("nesterov", nesterov), ("maximize", maximize)):
        if not isinstance(flag, bool):
            raise TypeError(f"sgd: {name!r} must be a bool, got {flag!r}")
    has_momentum = not (isinstance(momentum, (int, float)) and momentum == 0)
    if nesterov and (not has_momentum or not (
            isinstance(dampening, (int, float)) and dampening == 0)):
        raise ValueError("sgd: nesterov=True requires momentum > 0 and dampening = 0 "
                         f"(got momentum={momentum!r}, dampening={dampening!r})")
    flags = {"has_momentum": has_momentum, "nesterov": nesterov, "maximize": maximize}
    return ElementwiseOptimizer(
        "sgd",
        hyperparams={"lr": lr, "momentum": momentum, "dampening": dampening,
                     "weight_decay": weight_decay},
        ranges={"lr": NONNEGATIVE, "momentum": UNIT, "dampening": UNIT,
                "weight_decay": NONNEGATIVE},
        buffers=("momentum_buffer",) if has_momentum else (),
        kernel=partial(_sgd_kernel, **flags),
        fused_kernel=partial(_sgd_fused, **flags),
        fused_applies=partial(_fused_applies, has_momentum=has_momentum),
        state_dtype=state_dtype,
        weight_decay_mask=weight_decay_mask,
        fused=fused,
        options={"nesterov": nesterov, "maximize": maximize},
        tileable=True,
    )
