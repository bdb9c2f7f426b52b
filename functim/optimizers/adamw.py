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
where torch.optim keeps them in the param dtype. The kernel's ops are torch's foreach AdamW's, in
its order.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..elementwise import ElementwiseOptimizer
from ..hyperparams import BETA, NONNEGATIVE, ScalarOrSchedule, check_betas
from ..numerics import adam_denominator, bias_correction, decoupled_decay, ema, ema_of_squares


def adam_scalars(hp, step, scalar_state=None):
    """This step's bias corrections: ``bc1 = 1 − β1^t`` and ``sqrt(bc2) = sqrt(1 − β2^t)``."""
    return {"bias_correction1": bias_correction(hp["beta1"], step),
            "sqrt_bias_correction2": torch.sqrt(bias_correction(hp["beta2"], step))}, {}


def adam_moments(ops, g, b, s, *, inplace, amsgrad=False):
    """``m ← β1·m + (1 − β1)·g``, ``v ← β2·v + (1 − β2)·g²`` and, with amsgrad, the running
    max of ``v``. Returns ``(new buffers, the second moment the denominator uses)``."""
    new_b = {"exp_avg": ema(ops, b["exp_avg"], g, s["beta1"], inplace=inplace),
             "exp_avg_sq": ema_of_squares(ops, b["exp_avg_sq"], g, s["beta2"], inplace=inplace)}
    second = new_b["exp_avg_sq"]
    if amsgrad:
        second = new_b["max_exp_avg_sq"] = ops.maximum(b["max_exp_avg_sq"], second,
                                                       inplace=inplace)
    return new_b, second


def adamw_kernel(ops, p, g, b, s, *, decay, inplace, amsgrad=False, maximize=False):
    """The AdamW step on one group of leaves (also MARS's AdamW branch)."""
    if maximize:
        g = ops.neg(g)
    new_b, second = adam_moments(ops, g, b, s, inplace=inplace, amsgrad=amsgrad)
    denom = adam_denominator(ops, second, s["eps"], s["sqrt_bias_correction2"])
    p = decoupled_decay(ops, p, s["lr"], s["weight_decay"], decay=decay, inplace=inplace)
    step_size = s["lr"] / s["bias_correction1"]
    return ops.addcdiv(p, new_b["exp_avg"], denom, value=-step_size, inplace=inplace), new_b


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
    compile: bool = False,
) -> ElementwiseOptimizer:
    """AdamW with torch.optim.AdamW semantics and defaults.

    ``fused``: None (default) runs torch's fused AdamW kernel where the hyperparameters are on the
    host (CPU state, eager; see :class:`~functim.ElementwiseOptimizer`), False always runs
    functim's multi-tensor kernel (bitwise identical to ``functim.adapters.AdamW(fused=False)``).
    ``compile=True`` runs the kernel compiled by ``torch.compile`` (see :mod:`functim.execution`).

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
        kernel=partial(adamw_kernel, **flags),
        step_scalars=adam_scalars,
        state_dtype=state_dtype,
        weight_decay_mask=weight_decay_mask,
        fused=fused,
        options=flags,
        compile=compile,
    )
