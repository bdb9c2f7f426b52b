"""MARS (Yuan et al. 2024, arXiv 2411.10438), following the reference ``update_fn`` / ``MARS`` of
AGI-Arena/MARS@4831e28 ``MARS/optimizers/mars.py`` (docs/algorithms.md, section 6). ``mars_type``
"mars-adamw"
(default) and "mars-lion"; "mars-shampoo" is not implemented yet (it raises).

Per leaf, with ``last_grad`` starting at zero and ``t`` the 1-based step:

- MARS branch (every leaf with ``ndim == 2`` exactly, or every leaf when ``optimize_1d=True``)::

      c ← g + γ·(β1/(1−β1))·(g − last_grad)   # one pass: lerp(last_grad, g, 1 + γβ1/(1−β1))
      c ← c / max(1, ‖c‖_F)                  # per-tensor unit-norm clip, no eps (reference)
      m ← β1·m + (1−β1)·c
      mars-adamw: v ← β2·v + (1−β2)·c²  (amsgrad: running max of the raw v)
                  p ← p·(1 − η·λ) − (η/bc1)·m / (sqrt(v)/sqrt(bc2) + ε)
      mars-lion:  p ← p·(1 − η·λ) − η·sign(m)

- AdamW branch (every other leaf — 0-d, 1-D, 3-D, 4-D ... — when ``optimize_1d=False``): plain
  AdamW on ``g`` with ``betas_1d``, ``eps``, lr ``η·lr_1d/lr_init`` and weight decay
  ``weight_decay_1d``.
- Every leaf: ``last_grad ← g`` (a copy).

Choices against the reference:

- The clip is the reference's per-tensor unit Frobenius-norm clip, written without a host sync:
  ``c / max(1, ‖c‖)`` per leaf with 0-d per-leaf norms. It is bitwise the reference's
  ``if ‖c‖ > 1: c = c/‖c‖`` (dividing by 1.0 is exact). ``clip="global"`` (Levanter's global-norm
  clip of ``c``) is not implemented: it needs the norm of every leaf before any leaf steps.
- The 2-D test is ``ndim == 2`` exactly (conv kernels and other N-D leaves take the AdamW branch,
  as in the reference). The split is made from the leaves' static shapes (the engine steps each
  kind of leaves as a group).
- ``last_grad`` is a copy of the gradient (the reference stores a reference to ``p.grad``, which
  silently becomes the current gradient if the caller zeroes grads in place). It is written for
  every leaf, as the reference does, although the AdamW branch never reads it.
- Weight decay is decoupled and lr-coupled (DWD): the reference's ``p − η·(λ·p + u)`` written as
  ``p·(1 − η·λ)`` followed by the step, exactly as :func:`functim.adamw` (the same kernel runs
  both AdamW-type updates: one definition of the maths). ε is outside the square root (added
  to the bias-corrected root, as torch's AdamW).
- The AdamW branch's lr follows the lr schedule proportionally, as the reference's fixed ratio
  ``lr_1d_factor = lr_1d / lr``: ``η_1d = η_t · lr_1d / lr_init``. ``lr_init`` is the
  constructor's ``lr`` (for a schedule, its ``max_value()``, the peak lr); pass ``lr_init=``
  to choose another reference value. Changing ``state["hyperparams"]["lr"]`` (e.g. an LR
  scheduler in the torch.optim adapter) scales the 1-D lr with it, as in the reference.
- ``weight_decay_1d`` applies to the AdamW-branch leaves whatever ``weight_decay`` is (the
  reference ignores the group's weight decay there, so a "no decay" param group still decays its
  biases and norms with ``weight_decay_1d``). An explicit ``weight_decay_mask`` is honoured by
  both branches: a masked-out leaf gets no decay from either.
- ``maximize`` is not offered (the reference has none); the reference's ``is_approx=False``
  ("exact" variant, a second backward pass per step) is not implemented.
- State: ``exp_avg``, ``exp_avg_sq`` (+ ``max_exp_avg_sq`` if amsgrad) and ``last_grad``, in the
  buffer dtype (float32 for bfloat16/float16 params unless ``state_dtype``). The reference always
  allocates ``exp_avg_sq``; here it (and ``max_exp_avg_sq``) is left out when nothing reads it,
  i.e. for "mars-lion" with ``optimize_1d=True``. With "mars-lion" and ``optimize_1d=False`` it is
  read only by the non-2-D leaves (the 2-D leaves' entries stay zero).
- One ``step`` counts the updates of the whole tree (bias corrections use it); the torch.optim
  adapter keeps torch's per-parameter steps, as the reference does.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from ..elementwise import ElementwiseOptimizer
from ..hyperparams import (
    BETA,
    NONNEGATIVE,
    ScalarOrSchedule,
    _is_functorch_wrapped,
    check_betas,
    check_hyperparam,
)
from ..numerics import bias_correction, ema
from ..schedules import Schedule
from .adamw import adamw_kernel
from .lion import decay_then_step

MARS_TYPES = ("mars-adamw", "mars-lion")
CLIPS = ("per_tensor",)


def _mars_scalars(hp, step, scalar_state, *, lr_init):
    """This step's bias corrections for both branches, the 1-D branch's learning rate and the
    weight of the gradient correction."""
    if isinstance(lr_init, torch.Tensor):
        lr_init = lr_init.to(device=hp["lr"].device, dtype=hp["lr"].dtype)
    beta1 = hp["beta1"]
    return {
        "bias_correction1": bias_correction(beta1, step),
        "sqrt_bias_correction2": torch.sqrt(bias_correction(hp["beta2"], step)),
        "bias_correction1_1d": bias_correction(hp["beta1_1d"], step),
        "sqrt_bias_correction2_1d": torch.sqrt(bias_correction(hp["beta2_1d"], step)),
        "lr_1d_now": hp["lr"] * (hp["lr_1d"] / lr_init),
        # c = g + γ·β1/(1−β1)·(g − last_grad) = lerp(last_grad, g, 1 + γ·β1/(1−β1))
        "correction_weight": 1 + hp["gamma"] * (beta1 / (1 - beta1)),
    }, {}


def _mars_branch(ops, p, g, b, s, *, decay, inplace, mars_type, amsgrad):
    c = ops.lerp(b["last_grad"], g, s["correction_weight"])  # the corrected gradient
    c = ops.div(c, ops.clamp_min(ops.norm(c), 1.0), inplace=True)  # c / max(1, ‖c‖), per leaf
    if mars_type == "mars-adamw":
        bufs = {k: b[k] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in b}
        return adamw_kernel(ops, p, c, bufs, s, decay=decay, inplace=inplace, amsgrad=amsgrad)
    # mars-lion: sign of the EMA itself (one β)
    m = ema(ops, b["exp_avg"], c, s["beta1"], inplace=inplace)
    return decay_then_step(ops, p, ops.sign(m), s, decay=decay, inplace=inplace), {"exp_avg": m}


def _adamw_branch(ops, p, g, b, s, *, decay, inplace, amsgrad):
    s_1d = {"lr": s["lr_1d_now"], "beta1": s["beta1_1d"], "beta2": s["beta2_1d"],
            "eps": s["eps"], "weight_decay": s["weight_decay_1d"],
            "bias_correction1": s["bias_correction1_1d"],
            "sqrt_bias_correction2": s["sqrt_bias_correction2_1d"]}
    bufs = {k: b[k] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in b}
    return adamw_kernel(ops, p, g, bufs, s_1d, decay=decay, inplace=inplace, amsgrad=amsgrad)


def _leaf_kind(p: torch.Tensor, *, optimize_1d: bool) -> str:
    """The reference's static split by shape: ``"mars"`` for 2-D leaves (every leaf with
    ``optimize_1d``), ``"adamw"`` for the others."""
    return "mars" if optimize_1d or p.ndim == 2 else "adamw"


def _mars_kernel(ops, p, g, b, s, *, decay, inplace, kind, mars_type, amsgrad):
    """One kind of leaves (the engine groups them by :func:`_leaf_kind`)."""
    if kind == "mars":
        out_p, out_b = _mars_branch(ops, p, g, b, s, decay=decay, inplace=inplace,
                                    mars_type=mars_type, amsgrad=amsgrad)
    else:
        out_p, out_b = _adamw_branch(ops, p, g, b, s, decay=decay, inplace=inplace,
                                     amsgrad=amsgrad)
    # last_grad is read above (c), so it is overwritten only now; buffers this kind of leaves
    # does not use (MARS-Lion's exp_avg_sq) pass through
    return out_p, {**b, **out_b, "last_grad": ops.copy(b["last_grad"], g, inplace=inplace)}


def _initial_lr(lr: Any) -> float | torch.Tensor:
    if isinstance(lr, Schedule):
        return float(lr.max_value())
    if isinstance(lr, torch.Tensor):
        if _is_functorch_wrapped(lr) or lr.device.type == "meta":
            return lr  # a traced value: used as a tensor
        return float(lr.detach().cpu())
    return float(lr)


def mars(
    lr: ScalarOrSchedule = 3e-3,
    betas: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.95, 0.99),
    eps: ScalarOrSchedule = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    amsgrad: bool = False,
    gamma: ScalarOrSchedule = 0.025,
    mars_type: str = "mars-adamw",
    optimize_1d: bool = False,
    lr_1d: ScalarOrSchedule = 3e-3,
    betas_1d: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.9, 0.95),
    weight_decay_1d: ScalarOrSchedule = 0.1,
    *,
    clip: str = "per_tensor",
    lr_init: float | None = None,
    state_dtype: torch.dtype | None = None,
    weight_decay_mask: Any = None,
    compile: bool = False,
) -> ElementwiseOptimizer:
    """MARS with the reference's keywords and defaults (AGI-Arena/MARS ``MARS``).

    ``mars_type``: "mars-adamw" or "mars-lion". ``optimize_1d=False`` (default) sends every leaf
    whose ``ndim != 2`` to AdamW with ``betas_1d``, lr ``lr_t·lr_1d/lr_init`` and weight decay
    ``weight_decay_1d``; ``optimize_1d=True`` runs MARS on every leaf.

    ``lr_init``: the lr that ``lr_1d`` is relative to (default: ``lr``; a schedule's
    ``max_value()``). ``clip``: "per_tensor" (the reference's unit-norm clip of the corrected
    gradient, per leaf). ``weight_decay_mask`` as in :func:`functim.adamw` (applies to both
    branches). See the module docstring for every choice made against the reference.
    """
    if not isinstance(mars_type, str):
        raise TypeError(f"mars: 'mars_type' must be a string, got {mars_type!r}")
    if mars_type == "mars-shampoo":
        raise ValueError("mars: mars_type='mars-shampoo' is not implemented yet; use "
                         "'mars-adamw' or 'mars-lion'")
    if mars_type not in MARS_TYPES:
        raise ValueError(f"mars: unknown mars_type {mars_type!r}; expected one of {MARS_TYPES}")
    if clip == "global":
        raise ValueError("mars: clip='global' (Levanter's global-norm clip of the corrected "
                         "gradient) is not implemented yet; use clip='per_tensor'")
    if clip not in CLIPS:
        raise ValueError(f"mars: unknown clip {clip!r}; expected one of {CLIPS}")
    for name, flag in (("amsgrad", amsgrad), ("optimize_1d", optimize_1d)):
        if not isinstance(flag, bool):
            raise TypeError(f"mars: {name!r} must be a bool, got {flag!r}")
    beta1, beta2 = check_betas("mars", betas)
    beta1_1d, beta2_1d = check_betas("mars", betas_1d, names=("beta1_1d", "beta2_1d"),
                                     option="betas_1d")
    hyperparams = {
        "lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay,
        "gamma": gamma, "lr_1d": lr_1d, "beta1_1d": beta1_1d, "beta2_1d": beta2_1d,
        "weight_decay_1d": weight_decay_1d,
    }
    ranges = {
        "lr": NONNEGATIVE, "beta1": BETA, "beta2": BETA, "eps": NONNEGATIVE,
        "weight_decay": NONNEGATIVE, "gamma": NONNEGATIVE, "lr_1d": NONNEGATIVE,
        "beta1_1d": BETA, "beta2_1d": BETA, "weight_decay_1d": NONNEGATIVE,
    }
    for k, v in hyperparams.items():
        check_hyperparam("mars", k, v, ranges[k])
    if lr_init is not None and (isinstance(lr_init, bool) or not isinstance(
            lr_init, (int, float, torch.Tensor))):
        raise TypeError(f"mars: 'lr_init' must be a float, got {lr_init!r}")
    lr_init = _initial_lr(lr if lr_init is None else lr_init)
    if not optimize_1d and not isinstance(lr_init, torch.Tensor) and not (
            0 < lr_init < math.inf):
        raise ValueError(
            f"mars: with optimize_1d=False the non-2-D leaves use lr·lr_1d/lr_init, so lr_init "
            f"(default: lr, a schedule's max_value()) must be finite and > 0, got {lr_init}")
    reads_v = mars_type == "mars-adamw" or not optimize_1d
    buffers = ("exp_avg",) + (("exp_avg_sq",) if reads_v else ()) + ("last_grad",)
    if amsgrad and reads_v:
        buffers += ("max_exp_avg_sq",)
    flags = {"mars_type": mars_type, "optimize_1d": optimize_1d, "amsgrad": amsgrad}
    return ElementwiseOptimizer(
        "mars",
        hyperparams=hyperparams,
        ranges=ranges,
        buffers=buffers,
        kernel=partial(_mars_kernel, mars_type=mars_type, amsgrad=amsgrad),
        step_scalars=partial(_mars_scalars, lr_init=lr_init),
        reductions={"mars": 1, "adamw": 0},
        leaf_kind=partial(_leaf_kind, optimize_1d=optimize_1d),
        state_dtype=state_dtype,
        weight_decay_mask=weight_decay_mask,
        # the 1-D branch decays with weight_decay_1d whatever weight_decay is
        decay_hyperparams=("weight_decay", "weight_decay_1d"),
        options={**flags, "clip": clip, "lr_init": lr_init},
        compile=compile,
    )
