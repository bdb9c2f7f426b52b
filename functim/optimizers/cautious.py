"""Cautious optimizers (Liang et al. 2024, arXiv 2411.16085): mask the update where its sign
disagrees with the gradient's (docs/algorithms.md, section 5).

- ``cautious_adamw`` follows C-Optim (kyleliang919/C-Optim@2c0517c) ``c_adamw.py`` (default
  foreach path): ε outside the square root, decoupled weight decay (DWD) before
  the step, mask ``φ = 1[m_t ⊙ g_t > 0]`` from the *updated* first moment and the raw gradient;
  ``p ← p·(1 − η·λ) − (η/bc1)·(m ⊙ φ̃)/(sqrt(v)/sqrt(bc2) + ε)``. Defaults are C-Optim's
  (lr 1e-3, betas (0.9, 0.999), eps 1e-6, wd 0).
- ``cautious_lion`` follows C-Optim ``c_lion.py``: ``u = sign(β1·m + (1 − β1)·g)``,
  ``φ = 1[u ⊙ g > 0]``, ``p ← p·(1 − η·λ) − η·u ⊙ φ̃``, then ``m ← β2·m + (1 − β2)·g``
  (defaults lr 1e-4, betas (0.95, 0.98), wd 0).

Mask normalisation ``φ̃`` per tensor (references disagree), ``normalization=``:
``"mean"`` (default; C-Optim's current form and timm's): ``φ / max(mean φ, 1e-3)``;
``"paper"``: ``φ·n/(Σφ + 1)`` (the original paper; C-Optim's C-Lion still uses it);
``"eps"`` (Levanter, Wen et al.): ``φ/(mean φ + eps)`` with cautious_adamw's ``eps`` (1e-8 for
cautious_lion). The mask and its mean come from multi-tensor kernels, without a host sync.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..elementwise import ElementwiseOptimizer
from ..hyperparams import BETA, NONNEGATIVE, ScalarOrSchedule, check_betas
from ..numerics import adam_denominator, decoupled_decay, ema, ema_of_squares
from .adamw import adam_scalars

NORMALIZATIONS = ("mean", "paper", "eps")
LION_EPS = 1e-8


def mask_and_scale(ops, direction, g, normalization, eps):
    """``(φ, s)``: the mask ``φ = 1[direction ⊙ g > 0]`` in the dtype of ``direction`` (0 where
    the product is NaN, as C-Optim's ``(u * g > 0).to(g.dtype)``) and the per-tensor
    normalisation ``s`` (a list of 0-d tensors), ``φ̃ = φ/s``. The kernels fold ``1/s`` into
    their step's scale instead of a pass over ``φ``."""
    mask = ops.greater_than_zero(ops.mul(direction, g), inplace=True)
    counts, n = ops.sum(mask), ops.numels(mask)  # Σφ and the size of each tensor
    if normalization == "mean":
        scale = [torch.clamp(c / k, min=1e-3) for c, k in zip(counts, n)]
    elif normalization == "paper":
        scale = [(c + 1) / k for c, k in zip(counts, n)]
    else:
        scale = [c / k + eps for c, k in zip(counts, n)]
    return mask, scale


def _cautious_adamw_kernel(ops, p, g, b, s, *, decay, inplace, normalization):
    m = ema(ops, b["exp_avg"], g, s["beta1"], inplace=inplace)
    mask, scale = mask_and_scale(ops, m, g, normalization, s["eps"])
    v = ema_of_squares(ops, b["exp_avg_sq"], g, s["beta2"], inplace=inplace)
    denom = adam_denominator(ops, v, s["eps"], s["sqrt_bias_correction2"])
    p = decoupled_decay(ops, p, s["lr"], s["weight_decay"], decay=decay, inplace=inplace)
    step_size = s["lr"] / s["bias_correction1"]
    p = ops.addcdiv(p, ops.mul(mask, m, inplace=True), denom,
                    value=[-step_size / c for c in scale], inplace=inplace)
    return p, {"exp_avg": m, "exp_avg_sq": v}


def _cautious_lion_kernel(ops, p, g, b, s, *, decay, inplace, normalization):
    u = ops.sign(ops.lerp(b["exp_avg"], g, 1 - s["beta1"]), inplace=True)
    mask, scale = mask_and_scale(ops, u, g, normalization, LION_EPS)
    p = decoupled_decay(ops, p, s["lr"], s["weight_decay"], decay=decay, inplace=inplace)
    # u ∈ {−1, 0, 1}: the step p − (η/s)·φ ⊙ u is one addcmul of φ and u, C-Optim's product
    p = ops.addcmul(p, mask, u, value=[-s["lr"] / c for c in scale], inplace=inplace)
    return p, {"exp_avg": ema(ops, b["exp_avg"], g, s["beta2"], inplace=inplace)}


def _check_normalization(owner: str, normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"{owner}: normalization must be one of {NORMALIZATIONS}, "
                         f"got {normalization!r}")


def cautious_adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.9, 0.999),
    eps: ScalarOrSchedule = 1e-6,
    weight_decay: ScalarOrSchedule = 0.0,
    *,
    normalization: str = "mean",
    state_dtype: torch.dtype | None = None,
    weight_decay_mask: Any = None,
    compile: bool = False,
) -> ElementwiseOptimizer:
    """Cautious AdamW (the C-Optim reference; ε outside the square root)."""
    _check_normalization("cautious_adamw", normalization)
    beta1, beta2 = check_betas("cautious_adamw", betas)
    return ElementwiseOptimizer(
        "cautious_adamw",
        hyperparams={"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps,
                     "weight_decay": weight_decay},
        ranges={"lr": NONNEGATIVE, "beta1": BETA, "beta2": BETA, "eps": NONNEGATIVE,
                "weight_decay": NONNEGATIVE},
        buffers=("exp_avg", "exp_avg_sq"),
        kernel=partial(_cautious_adamw_kernel, normalization=normalization),
        step_scalars=adam_scalars,
        reductions=1,
        state_dtype=state_dtype,
        weight_decay_mask=weight_decay_mask,
        options={"normalization": normalization},
        compile=compile,
    )


def cautious_lion(
    lr: ScalarOrSchedule = 1e-4,
    betas: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.95, 0.98),
    weight_decay: ScalarOrSchedule = 0.0,
    *,
    normalization: str = "mean",
    state_dtype: torch.dtype | None = None,
    weight_decay_mask: Any = None,
    compile: bool = False,
) -> ElementwiseOptimizer:
    """Cautious Lion (C-Optim reference)."""
    _check_normalization("cautious_lion", normalization)
    beta1, beta2 = check_betas("cautious_lion", betas)
    return ElementwiseOptimizer(
        "cautious_lion",
        hyperparams={"lr": lr, "beta1": beta1, "beta2": beta2, "weight_decay": weight_decay},
        ranges={"lr": NONNEGATIVE, "beta1": BETA, "beta2": BETA, "weight_decay": NONNEGATIVE},
        buffers=("exp_avg",),
        kernel=partial(_cautious_lion_kernel, normalization=normalization),
        reductions=1,
        state_dtype=state_dtype,
        weight_decay_mask=weight_decay_mask,
        options={"normalization": normalization},
        compile=compile,
    )
