"""SGD with momentum, dampening, Nesterov and (coupled, L2) weight decay, as torch.optim.SGD.

Follows ``torch.optim.sgd``: ``g ← −g`` if maximize; ``g ← g + λ·p``; the momentum buffer is
``g`` itself on the first step and ``μ·buf + (1 − dampening)·g`` afterwards (written without a
branch: the weight on ``g`` is 1 at step 1); Nesterov uses ``g + μ·buf``; ``p ← p − η·g``.

The momentum buffer exists only when ``momentum`` is not the constant 0 (as torch, which stores
``None``); with ``momentum=0`` the state has no buffer and its ``momentum`` entry has no effect.

``fused=None`` (default) runs torch's fused SGD kernel (``torch.optim.SGD(fused=True)``'s) where
the hyperparameters are on the host (see :mod:`functim.execution`) and it computes this maths:
no momentum buffer, or momentum ≠ 0 with dampening 0 (its first step, ``μ·0 + g``, is then
exactly ``g``, so it needs no step count). It rounds ``p − η·g`` as one fused
multiply-add, so it can differ from the multi-tensor kernel (``fused=False``, two roundings,
bitwise the closed form ``p − η·g``) by an ulp.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..elementwise import ElementwiseOptimizer
from ..hyperparams import NONNEGATIVE, UNIT, ScalarOrSchedule


def _sgd_scalars(hp, step, scalar_state):
    """The weight of ``g`` in the momentum update: 1 on the first step (the buffer starts as
    ``g`` itself), ``1 − dampening`` afterwards."""
    first = torch.where(step == 1, 1.0, 1 - hp["dampening"]).to(hp["dampening"].dtype)
    return {"grad_weight": first}, {}


def _sgd_kernel(ops, p, g, b, s, *, decay, inplace, has_momentum, nesterov, maximize):
    # ``g + λ·p`` and the momentum updates are ``add_scaled`` (rounded once, like torch's
    # ``add_(b, alpha=c)``)
    if maximize:
        g = ops.neg(g)
    if decay:
        g = ops.add_scaled(g, p, s["weight_decay"])
    if not has_momentum:
        return ops.add_scaled(p, g, -s["lr"], inplace=inplace), {}
    buf = ops.mul(b["momentum_buffer"], s["momentum"], inplace=inplace)
    buf = ops.add_scaled(buf, g, s["grad_weight"], inplace=True)
    if not nesterov:
        return ops.add_scaled(p, buf, -s["lr"], inplace=inplace), {"momentum_buffer": buf}
    # p − η·(g + μ·buf) as two steps, p − η·g − η·μ·buf: no param-sized temporary
    p = ops.add_scaled(p, g, -s["lr"], inplace=inplace)
    return ops.add_scaled(p, buf, -s["lr"] * s["momentum"], inplace=True), {"momentum_buffer": buf}


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
    compile: bool = False,
) -> ElementwiseOptimizer:
    """SGD with torch.optim.SGD semantics and defaults. ``fused``: see the module docstring;
    ``compile=True`` runs the kernel compiled (see :mod:`functim.execution`)."""
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
        step_scalars=_sgd_scalars if has_momentum else None,
        state_dtype=state_dtype,
        weight_decay_mask=weight_decay_mask,
        fused=fused,
        options={"nesterov": nesterov, "maximize": maximize},
        # (the kernel makes no param-sized temporary, so tiling would only add overhead)
        tile=False,
        compile=compile,
    )
