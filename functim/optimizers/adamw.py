"""AdamW.

Update, for the ``t``-th step (1-based), learning rate ``η``, weight decay ``λ``::

    g ← −g                                        (if maximize)
    p ← p·(1 − η·λ)                               decoupled weight decay, before the step
    m ← β1·m + (1 − β1)·g ;  v ← β2·v + (1 − β2)·g²
    v̂ ← max(v̂, v)                                 (if amsgrad: the running max of the raw v)
    p ← p − (η/(1 − β1^t))·m / (sqrt(v)/sqrt(1 − β2^t) + ε)

Paper: Loshchilov & Hutter 2017, "Decoupled Weight Decay Regularization", arXiv 1711.05101.
Reference code: ``torch.optim.AdamW`` (PyTorch 2.13), whose rule this is exactly: ε outside the
square root (added to the bias-corrected root), the decay lr-coupled and applied before the
step, amsgrad on the raw second moment. See docs/algorithms.md, section 3.

Choices against the reference: bias corrections are computed in float64 from the step tensor
(no host sync); moments are float32 for bfloat16/float16 params (``state_dtype`` overrides),
where torch.optim keeps them in the param dtype.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..base import ElementwiseOptimizer
from ..hyperparams import BETA, NONNEGATIVE, ScalarOrSchedule, check_betas


def _adamw_kernel(ops, p, g, b, hp, step, *, decay, inplace, amsgrad, maximize,
                  g_owned=False):
    """``g_owned``: ``g`` is a temporary of the caller's (MARS's corrected gradient) that may be
    overwritten once the first moment has read it."""
    lr, beta1, beta2 = hp["lr"], hp["beta1"], hp["beta2"]
    if maximize:
        g = ops.neg(g)
        g_owned = True
    m = ops.lerp(b["exp_avg"], g, 1 - beta1, inplace=inplace)
    v, new_b, denom = second_moment(ops, g, b, beta2, inplace=inplace, amsgrad=amsgrad,
                                    g_owned=g_owned)
    new_b = {"exp_avg": m, **new_b}
    denom, c = adam_denominator(ops, v, denom, hp, step)
    p = adaptive_step(ops, p, m, denom, hp, -lr * c / (1 - beta1**step), decay=decay,
                      inplace=inplace)
    return p, new_b


def second_moment(ops, g, b, beta2, *, inplace, amsgrad=False, g_owned=False):
    """``v ← lerp(v, g², 1 − β2)`` (and the amsgrad running max of the raw ``v``). Returns
    ``(second, new buffers, scratch)``: ``second`` is what the denominator uses, ``scratch`` the
    temporary that held ``g²`` (``g`` itself when ``g_owned``), free for the caller to reuse."""
    g2 = ops.mul(g, g, out=g if g_owned else None)
    v = ops.lerp(b["exp_avg_sq"], g2, 1 - beta2, inplace=inplace)
    new_b = {"exp_avg_sq": v}
    second = v
    if amsgrad:
        second = new_b["max_exp_avg_sq"] = ops.maximum(b["max_exp_avg_sq"], v, inplace=inplace)
    return second, new_b, g2


def adam_denominator(ops, second, scratch, hp, step):
    """The Adam denominator ``sqrt(second)/c + ε`` (ε outside the square root,
    ``c = sqrt(1 − β2^t)``) as
    ``(sqrt(second) + ε·c, c)``: the denominator times ``c``, and ``c``, which the caller
    multiplies into its step's scale. That is the same maths with one pass fewer than dividing
    every element by ``c`` (torch's form; the two round differently, a few ulps). Written into
    ``scratch`` (an owned temporary of the same shapes, e.g. the ``g²`` of
    :func:`second_moment`) where :meth:`ListOps.writes_out` holds: no new memory."""
    c = torch.sqrt(1 - hp["beta2"] ** step)
    denom = ops.sqrt(second, out=scratch)
    return ops.add(denom, hp["eps"] * c, inplace=True), c


def decoupled_decay(ops, p, hp, *, decay, inplace):
    """``p·(1 − η·λ)`` where ``decay`` (torch's decoupled weight decay, before the step). Returns
    ``(p, inplace)``: once decayed, ``p`` is owned (updated in place or new), so the step that
    follows may write into it."""
    if not decay:
        return p, inplace
    return ops.mul(p, 1 - hp["lr"] * hp["weight_decay"], inplace=inplace), True


def adaptive_step(ops, p, numer, denom, hp, scale, *, decay, inplace):
    """The Adam-family tail shared by AdamW, NAdamW, Cautious AdamW and MARS:
    ``p ← p·(1 − η·λ) + scale·numer/denom``, with ``denom`` from :func:`adam_denominator` (an
    owned temporary, overwritten) and ``scale`` a 0-d tensor or a list of per-leaf 0-d tensors
    (``−η·c/bc1`` for AdamW, ``c`` from :func:`adam_denominator`). ``numer`` is only read.

    Eager with CPU scalars, ``scale`` is read on the host and given to ``addcdiv`` as its
    ``value`` (torch's non-capturable foreach form); where that would trace or sync (compiled,
    CUDA) it is folded into ``denom`` instead, a pass more (torch's capturable form). The two
    round differently (a few ulps)."""
    p, inplace = decoupled_decay(ops, p, hp, decay=decay, inplace=inplace)
    if ops.per_tensor:
        # differentiable path: scale the step explicitly so d/d(lr) stays finite at lr = 0
        return ops.add(p, ops.mul(ops.div(numer, denom), scale), inplace=inplace)
    values = ops.host_values(scale, len(p))
    if values is not None:
        return ops.addcdiv(p, numer, denom, value=values, inplace=inplace)
    return ops.addcdiv(p, numer, ops.div(denom, scale, inplace=True), inplace=inplace)


def _adamw_fused(p, g, b, hp, step, *, decay, amsgrad, maximize):
    # torch's fused kernel implements exactly the maths above; it reads one step per tensor.
    steps = [step.to(torch.float32)] * len(p)
    torch._fused_adamw_(
        p, g, b["exp_avg"], b["exp_avg_sq"], b.get("max_exp_avg_sq", []), steps,
        lr=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"],
        weight_decay=hp["weight_decay"] if decay else 0.0, eps=hp["eps"],
        amsgrad=amsgrad, maximize=maximize,
    )


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.9, 0.999),
    eps: ScalarOrSchedule = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-2,
    *,
    amsgrad: bool = False,
    maximize: bool = False,
    state_dtype: torch.dtype | None = None,
    weight_decay_mask: Any = None,
    fused: bool | None = None,
) -> ElementwiseOptimizer:
    """AdamW with torch.optim.AdamW semantics and defaults.

    ``fused``: None (default) runs torch's fused AdamW kernel where the hyperparameters are on the
    host (CPU state, eager; see :class:`~functim.ElementwiseOptimizer`), False always runs
    functim's multi-tensor kernel (bitwise identical to ``functim.adapters.AdamW(fused=False)``).

    ``weight_decay_mask``: a pytree of bools like params, or a callable ``(path, param) -> bool``
    (e.g. :func:`functim.default_weight_decay_mask`) choosing which leaves decay.
    """
    beta1, beta2 = check_betas("adamw", betas)
    for name, flag in (("amsgrad", amsgrad), ("maximize", maximize)):
        if not isinstance(flag, bool):
            raise TypeError(f"adamw: {name!r} must be a bool, got {flag!r}")
    flags = {"amsgrad": amsgrad, "maximize": maximize}
    return ElementwiseOptimizer(
        "adamw",
        hyperparams={"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps,
                     "weight_decay": weight_decay},
        ranges={"lr": NONNEGATIVE, "beta1": BETA, "beta2": BETA, "eps": NONNEGATIVE,
                "weight_decay": NONNEGATIVE},
        buffers=("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()),
        kernel=partial(_adamw_kernel, **flags),
        fused_kernel=partial(_adamw_fused, **flags),
        state_dtype=state_dtype,
        weight_decay_mask=weight_decay_mask,
        fused=fused,
        options=flags,
        tileable=True,
    )
