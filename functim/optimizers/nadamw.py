"""NAdamW: Adam with Nesterov momentum and decoupled weight decay — three published forms
(docs/algorithms.md, section 4), one kernel.

All forms: ``p ← p·(1 − η·λ)`` first (DWD), ``m ← lerp(m, g, 1 − β1)``,
``v ← lerp(v, g², 1 − β2)``, and ``p ← p − η·(a·g + b·m)/(sqrt(v)/sqrt(1 − β2^t) + ε)`` (ε
outside the square root)
with coefficients per form:

- ``variant="optax"`` (default; form B, optax ``scale_by_adam(nesterov=True)`` + DWD, the form of
  Wen et al.'s "Fantastic Pretraining Optimizers" NAdamW via Levanter):
  ``a = (1 − β1)/(1 − β1^t)``, ``b = β1/(1 − β1^(t+1))``;
- ``variant="torch"`` (form A, ``torch.optim.NAdam(decoupled_weight_decay=True)``): the
  momentum-decay schedule ``μ_t = β1·(1 − ½·0.96^(t·ψ))`` with ``ψ = momentum_decay`` and the
  running product ``Π_t = Π_{t−1}·μ_t`` kept in the state as ``mu_product``:
  ``a = (1 − μ_t)/(1 − Π_t)``, ``b = μ_{t+1}/(1 − Π_t·μ_{t+1})``;
- ``variant="timm"`` (form C, timm ``NAdamW`` = the AlgoPerf baseline, "lerp twice"):
  ``a = (1 − β1)/(1 − β1^t)``, ``b = β1/(1 − β1^t)``.

With ``ψ → ∞`` form A is form B (reduction R5 of docs/algorithms.md); with ``β1 = 0`` every form
is AdamW(β1 = 0) (R4).

``mu_product`` is a float64 0-d tensor. torch keeps it in the default dtype (float32 unless
changed), so float64 parameters agree with torch.optim.NAdam to ~1e-15 only when torch's default
dtype is float64; with float32 it rounds Π and the coefficients to ~1e-7 relative.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..base import ElementwiseOptimizer
from ..hyperparams import BETA, NONNEGATIVE, ScalarOrSchedule, check_betas, check_hyperparam
from .adamw import adam_denominator, adaptive_step, decoupled_decay, second_moment

VARIANTS = ("optax", "torch", "timm")


def _coefficients(hp, step, variant):
    beta1 = hp["beta1"]
    if variant == "torch":
        return hp["nesterov_g"], hp["nesterov_m"]
    a = (1 - beta1) / (1 - beta1**step)
    if variant == "optax":
        return a, beta1 / (1 - beta1 ** (step + 1))
    return a, beta1 / (1 - beta1**step)


def _torch_schedule(hp, step, scalars):
    """torch NAdam's μ_t, μ_{t+1} and the running product Π_t (the scalar state)."""
    beta1, psi = hp["beta1"], hp["momentum_decay"]
    mu = beta1 * (1 - 0.5 * 0.96 ** (step * psi))
    mu_next = beta1 * (1 - 0.5 * 0.96 ** ((step + 1) * psi))
    product = scalars["mu_product"] * mu
    extra = {"nesterov_g": (1 - mu) / (1 - product),
             "nesterov_m": mu_next / (1 - product * mu_next)}
    return extra, {"mu_product": product}


def _nadamw_kernel(ops, p, g, b, hp, step, *, decay, inplace, variant):
    lr = hp["lr"]
    m = ops.lerp(b["exp_avg"], g, 1 - hp["beta1"], inplace=inplace)
    v, new_b, denom = second_moment(ops, g, b, hp["beta2"], inplace=inplace)
    denom, c = adam_denominator(ops, v, denom, hp, step)
    coef_g, coef_m = _coefficients(hp, step, variant)
    if ops.per_tensor:
        numer = ops.add(ops.mul(m, coef_m), ops.mul(g, coef_g), inplace=True)
        p = adaptive_step(ops, p, numer, denom, hp, -lr * c, decay=decay, inplace=inplace)
        return p, {"exp_avg": m, **new_b}
    # no temporary for a·g + b·m: two steps through the one denominator,
    # p ← p·(1 − η·λ) + g/(denom/(−η·c·a)) + m/(denom/(−η·c·b))
    p, inplace = decoupled_decay(ops, p, hp, decay=decay, inplace=inplace)
    scale_g, scale_m = -lr * c * coef_g, -lr * c * coef_m
    values_g, values_m = ops.host_values(scale_g, len(p)), ops.host_values(scale_m, len(p))
    if values_g is not None and values_m is not None:  # (CPU scalars, eager: see adaptive_step)
        p = ops.addcdiv(p, g, denom, value=values_g, inplace=inplace)
        return ops.addcdiv(p, m, denom, value=values_m, inplace=True), {"exp_avg": m, **new_b}
    denom = ops.div(denom, scale_g, inplace=True)
    p = ops.addcdiv(p, g, denom, inplace=inplace)
    denom = ops.mul(denom, coef_g / coef_m, inplace=True)
    p = ops.addcdiv(p, m, denom, inplace=True)
    return p, {"exp_avg": m, **new_b}


def nadamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.9, 0.999),
    eps: ScalarOrSchedule = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-2,
    *,
    variant: str = "optax",
    momentum_decay: ScalarOrSchedule = 4e-3,
    state_dtype: torch.dtype | None = None,
    weight_decay_mask: Any = None,
) -> ElementwiseOptimizer:
    """NAdamW; ``variant`` picks the form (see the module docstring); ``momentum_decay`` (ψ) is
    used by ``variant="torch"`` only."""
    if variant not in VARIANTS:
        raise ValueError(f"nadamw: variant must be one of {VARIANTS}, got {variant!r}")
    beta1, beta2 = check_betas("nadamw", betas)
    hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay}
    ranges = {"lr": NONNEGATIVE, "beta1": BETA, "beta2": BETA, "eps": NONNEGATIVE,
              "weight_decay": NONNEGATIVE, "momentum_decay": NONNEGATIVE}
    torch_form = variant == "torch"
    # checked whatever the variant (a bad value is a mistake even where it is not used)
    check_hyperparam("nadamw", "momentum_decay", momentum_decay, NONNEGATIVE)
    if torch_form:
        hyper["momentum_decay"] = momentum_decay
    else:
        del ranges["momentum_decay"]
    return ElementwiseOptimizer(
        "nadamw",
        hyperparams=hyper,
        ranges=ranges,
        buffers=("exp_avg", "exp_avg_sq"),
        kernel=partial(_nadamw_kernel, variant=variant),
        state_dtype=state_dtype,
        weight_decay_mask=weight_decay_mask,
        scalars={"mu_product": 1.0} if torch_form else None,
        prepare=_torch_schedule if torch_form else None,
        options={"variant": variant},
        tileable=True,
    )
