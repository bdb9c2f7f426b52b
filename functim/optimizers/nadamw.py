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

from ..elementwise import ElementwiseOptimizer
from ..hyperparams import BETA, NONNEGATIVE, ScalarOrSchedule, check_betas, check_hyperparam
from ..numerics import adam_denominator, bias_correction, decoupled_decay, ema, ema_of_squares

VARIANTS = ("optax", "torch", "timm")


def _nadamw_scalars(hp, step, scalar_state, *, variant):
    """This step's coefficients ``a`` (of g) and ``b`` (of m), and ``sqrt(1 − β2^t)``; for
    ``variant="torch"`` also the new running product Π_t (the scalar state)."""
    beta1 = hp["beta1"]
    new_state = {}
    if variant == "torch":
        psi = hp["momentum_decay"]
        mu = beta1 * (1 - 0.5 * 0.96 ** (step * psi))
        mu_next = beta1 * (1 - 0.5 * 0.96 ** ((step + 1) * psi))
        product = scalar_state["mu_product"] * mu
        a, b = (1 - mu) / (1 - product), mu_next / (1 - product * mu_next)
        new_state["mu_product"] = product
    else:
        a = (1 - beta1) / bias_correction(beta1, step)
        b = beta1 / bias_correction(beta1, step + 1 if variant == "optax" else step)
    scalars = {"grad_coef": a, "momentum_coef": b,
               "sqrt_bias_correction2": torch.sqrt(bias_correction(hp["beta2"], step))}
    return scalars, new_state


def _nadamw_kernel(ops, p, g, b, s, *, decay, inplace):
    m = ema(ops, b["exp_avg"], g, s["beta1"], inplace=inplace)
    v = ema_of_squares(ops, b["exp_avg_sq"], g, s["beta2"], inplace=inplace)
    denom = adam_denominator(ops, v, s["eps"], s["sqrt_bias_correction2"])
    p = decoupled_decay(ops, p, s["lr"], s["weight_decay"], decay=decay, inplace=inplace)
    # p − η·(a·g + b·m)/denom, as torch's NAdam: two steps through the one denominator
    p = ops.addcdiv(p, g, denom, value=-s["lr"] * s["grad_coef"], inplace=inplace)
    p = ops.addcdiv(p, m, denom, value=-s["lr"] * s["momentum_coef"], inplace=True)
    return p, {"exp_avg": m, "exp_avg_sq": v}


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
    compile: bool = False,
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
        kernel=_nadamw_kernel,
        step_scalars=partial(_nadamw_scalars, variant=variant),
        state_dtype=state_dtype,
        weight_decay_mask=weight_decay_mask,
        scalar_state={"mu_product": 1.0} if torch_form else None,
        options={"variant": variant},
        compile=compile,
    )
