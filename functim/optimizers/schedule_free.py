"""Schedule-Free AdamW (Defazio et al. 2024, arXiv 2405.15682; docs/algorithms.md, section 13).

Follows the memory-efficient form of facebookresearch/schedule_free@70785b5
``schedulefree/adamw_schedulefree.py`` (v1.3+; PyPI schedulefree 1.4.1 is the same without
``inner_momentum``, which functim does not implement). With ``k`` = updates completed before this
one::

    sched = (k+1)/warmup_steps if k < warmup_steps else 1      # warmup is inside the optimizer
    γ     = lr·sched                                           # lr may itself be a schedule
    lr_max ← max(lr_max, γ);  w = (k+1)^r · lr_max^weight_lr_power;  W ← W + w
    c     = w/W  (0 when W = 0)
    v ← β2·v + (1−β2)·g²;  d = g/(sqrt(v/(1−β2^(k+1))) + ε)    # ε outside the root; g at y
    d ← d + λ·y                                                # decay at y (hits y and z)
    y ← lerp(y, z, c) + γ·(β1·(1−c) − 1)·d                     # uses the old z
    z ← z − γ·d

The params hold ``y`` (where gradients are taken). The average ``x`` that should be evaluated
and checkpointed is not stored: :func:`schedule_free_eval_params` recovers it as
``x = lerp(y, z, 1 − 1/β1)`` and :func:`schedule_free_train_params` maps it back,
``y = lerp(x, z, 1 − β1)``.

Choices against the reference:

- v1.3+ form: ``γ`` has no ``sqrt(bc2)`` factor and the bias correction sits inside the square
  root (the ≤ v1.2 "paper" form differs in early steps).
- ``β1 = 0`` is allowed in the optimizer (it is then AdamW with β1 = 0 on ``y``, reduction R27),
  but
  ``x`` cannot be recovered from ``(y, z)``: :func:`schedule_free_eval_params` raises a ValueError
  for ``β1 = 0`` rather than storing ``x`` (a third param-sized buffer nobody else needs).
  ``β1`` should be constant: a ``β1`` that changes between updates breaks the ``x``/``y``
  relation, exactly as in the reference.
- ``lr_max`` starts at −1 (the reference's value; any γ ≥ 0 replaces it at the first update) and
  ``weight_sum`` at 0. Both are float64 0-d tensors in the state, like the hyperparameters, and
  every scalar (``sched``, ``γ``, ``c``) is computed in float64 with tensor ops: no host sync.
- ``warmup_steps``, ``r`` and ``weight_lr_power`` are hyperparameters (0-d tensors in the state,
  so they can be changed without recompiling); all must be ≥ 0.
- ``z`` starts as a copy of the params given to ``init_state`` (so pass the params training
  starts from), ``exp_avg_sq`` at zero; both are float32 for bfloat16/float16 params unless
  ``state_dtype`` says otherwise (the reference keeps them in the param dtype).
- The per-step scalars are computed once per update (:func:`_schedule_free_scalars`); the
  elementwise maths is one kernel (:func:`_schedule_free_adamw_kernel`) run by the elementwise
  engine. Both serve the functional optimizer and the torch.optim adapter
  ``functim.adapters.ScheduleFreeAdamW``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .. import _tree
from ..elementwise import ElementwiseOptimizer
from ..hyperparams import (
    BETA,
    HPARAM_DTYPE,
    HPARAMS_KEY,
    NONNEGATIVE,
    ScalarOrSchedule,
    check_betas,
)
from ..listops import ListOps
from ..numerics import adam_denominator, bias_correction, ema_of_squares
from ..runtime import group_by_device_and_dtype, needs_per_tensor

NAME = "schedule_free_adamw"
LR_MAX_INIT = -1.0

__all__ = [
    "ScheduleFreeOptimizer",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_train_params",
]


# -- the maths ------------------------------------------------------------------------------------
def _schedule_free_scalars(hp: dict, step: torch.Tensor, scalar_state: dict) -> tuple[dict, dict]:
    """This update's scalars ``γ``, ``c`` and ``sqrt(1 − β2^(k+1))``, and the new ``lr_max`` and
    ``weight_sum``: float64 0-d tensors. ``step`` = k+1 (this update's 1-based index).

    Branches are ``torch.where`` with safe denominators, so there is no host sync and gradients
    stay finite (e.g. d/d lr)."""
    kp1 = step.to(HPARAM_DTYPE)
    k = kp1 - 1
    warmup = hp["warmup_steps"]
    in_warmup = k < warmup
    sched = torch.where(in_warmup, kp1 / torch.where(in_warmup, warmup, 1.0), 1.0)
    gamma = hp["lr"] * sched
    lr_max = torch.maximum(scalar_state["lr_max"], gamma)
    weight = kp1 ** hp["r"] * lr_max ** hp["weight_lr_power"]
    weight_sum = scalar_state["weight_sum"] + weight
    positive = weight_sum > 0
    ckp1 = torch.where(positive, weight / torch.where(positive, weight_sum, 1.0), 0.0)
    scalars = {"gamma": gamma, "ckp1": ckp1,
               "sqrt_bias_correction2": torch.sqrt(bias_correction(hp["beta2"], step))}
    return scalars, {"lr_max": lr_max, "weight_sum": weight_sum}


def _schedule_free_adamw_kernel(ops, p, g, b, s, *, decay, inplace):
    """One update; ``p`` holds y, ``s["ckp1"]`` is c."""
    v = ema_of_squares(ops, b["exp_avg_sq"], g, s["beta2"], inplace=inplace)
    d = ops.div(g, adam_denominator(ops, v, s["eps"], s["sqrt_bias_correction2"]))
    if decay:  # d = g/denom + λ·y: weight decay evaluated at y (before y moves)
        d = ops.add_scaled(d, p, s["weight_decay"], inplace=True)
    gamma, ckp1 = s["gamma"], s["ckp1"]
    y = ops.lerp(p, b["z"], ckp1, inplace=inplace)  # the old z
    y = ops.add_scaled(y, d, gamma * (s["beta1"] * (1 - ckp1) - 1), inplace=True)
    z = ops.add_scaled(b["z"], d, -gamma, inplace=inplace)
    return y, {"z": z, "exp_avg_sq": v}


def _interpolate(ys: list, zs: list, weight: torch.Tensor, *, inplace: bool) -> list:
    """``lerp(y, z, weight)`` for each non-None leaf, computed in z's dtype (the state dtype) and
    returned in y's dtype. ``inplace``: overwrite the ``ys`` tensors (and return them)."""
    out = list(ys)
    idx = [i for i, y in enumerate(ys) if y is not None]
    if not idx:
        return out
    zl = [zs[i] for i in idx]
    yl = [ys[i] for i in idx]
    ops = ListOps(per_tensor=needs_per_tensor(yl, zl, scalars=[weight]))
    for (_, zdtype), (sub_z, sub_y), sub in group_by_device_and_dtype([zl, yl]):
        work = [y if y.dtype == zdtype else y.to(zdtype) for y in sub_y]
        # a weight past the state dtype's range (1 − 1/β1 for a tiny β1) would become ±inf and
        # make x = y + w·(z − y) NaN where z = y; its largest finite value keeps x = y there
        big = torch.finfo(zdtype).max
        new = ops.lerp(work, sub_z, weight.clamp(-big, big), inplace=inplace)
        for j, y, w in zip(sub, sub_y, new):
            if w.dtype != y.dtype:
                w = y.copy_(w) if inplace else w.to(y.dtype)
            out[idx[j]] = w
    return out


def _eval_weight(beta1: Any) -> torch.Tensor:
    """``1 − 1/β1`` (float64), or a ValueError for β1 = 0 (x is not recoverable from y, z)."""
    b1 = torch.as_tensor(beta1, dtype=HPARAM_DTYPE)
    traced = torch._C._functorch.is_functorch_wrapped_tensor(b1) or b1.device.type == "meta"
    if not traced and float(b1) == 0.0:  # outside update: reading the 0-d value is fine
        raise ValueError(
            f"{NAME}: with beta1 = 0 the averaged params x cannot be recovered from y and z "
            "(eval would divide by beta1); y = z is both the training and the evaluation point")
    return 1 - 1 / b1


def _train_weight(beta1: Any) -> torch.Tensor:
    return 1 - torch.as_tensor(beta1, dtype=HPARAM_DTYPE)


# -- the optimizer --------------------------------------------------------------------------------
class ScheduleFreeOptimizer(ElementwiseOptimizer):
    """The functional Schedule-Free AdamW (see :func:`schedule_free_adamw`): an elementwise
    optimizer whose ``z`` starts as a copy of the params and whose scalar state (``lr_max``,
    ``weight_sum``) belongs to the whole tree.

    State: ``{"step": int32 0-d, "hyperparams": {...}, "z": tree, "exp_avg_sq": tree,
    "lr_max": float64 0-d, "weight_sum": float64 0-d}``."""

    # the averaging weights are the whole model's (the reference keeps them per param group)
    scalar_state_per_param = False

    def __init__(self, hyperparams: dict, ranges: dict, *, state_dtype: torch.dtype | None,
                 weight_decay_mask: Any):
        super().__init__(NAME, hyperparams=hyperparams, ranges=ranges,
                         buffers={"z": "param", "exp_avg_sq": "zeros"},
                         kernel=_schedule_free_adamw_kernel,
                         step_scalars=_schedule_free_scalars,
                         scalar_state={"lr_max": LR_MAX_INIT, "weight_sum": 0.0},
                         state_dtype=state_dtype, weight_decay_mask=weight_decay_mask)


def schedule_free_adamw(
    lr: ScalarOrSchedule = 0.0025,
    betas: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.9, 0.999),
    eps: ScalarOrSchedule = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    warmup_steps: ScalarOrSchedule = 0,
    r: ScalarOrSchedule = 0.0,
    weight_lr_power: ScalarOrSchedule = 2.0,
    *,
    state_dtype: torch.dtype | None = None,
    weight_decay_mask: Any = None,
) -> ScheduleFreeOptimizer:
    """Schedule-Free AdamW with the reference's (schedulefree ≥ 1.3) maths and defaults.

    The params passed to ``update`` and returned by it are the training point ``y``; evaluate and
    checkpoint the average ``x = schedule_free_eval_params(params, state)``, and get back to ``y``
    with :func:`schedule_free_train_params`. Use the built-in linear ``warmup_steps`` rather than
    an LR schedule that starts at 0 (a zero first step gives the first average weight 0).
    ``lr`` may still be a schedule (e.g. a decay at the end); ``γ = lr·sched``.

    ``weight_decay_mask``: a pytree of bools like params, or a callable ``(path, param) -> bool``.
    ``state_dtype``: dtype of ``z`` and ``exp_avg_sq`` (default: float32 for bfloat16/float16
    params, the param dtype otherwise).
    """
    beta1, beta2 = check_betas(NAME, betas)
    hyperparams = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps,
                   "weight_decay": weight_decay, "warmup_steps": warmup_steps, "r": r,
                   "weight_lr_power": weight_lr_power}
    ranges = {"lr": NONNEGATIVE, "beta1": BETA, "beta2": BETA, "eps": NONNEGATIVE,
              "weight_decay": NONNEGATIVE, "warmup_steps": NONNEGATIVE, "r": NONNEGATIVE,
              "weight_lr_power": NONNEGATIVE}
    return ScheduleFreeOptimizer(hyperparams, ranges, state_dtype=state_dtype,
                                 weight_decay_mask=weight_decay_mask)


# -- eval / train points --------------------------------------------------------------------------
def _z_leaves(owner: str, params, state) -> tuple[list, list, Any]:
    if not isinstance(state, Mapping) or "z" not in state or HPARAMS_KEY not in state \
            or "beta1" not in state[HPARAMS_KEY]:
        raise ValueError(f"{owner}: state must be a state of schedule_free_adamw (with 'z' and "
                         f"hyperparams['beta1']), got keys "
                         f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__}")
    try:
        p_leaves, z_leaves, spec = _tree.check_same_structure(
            params, state["z"], ref_name="params", other_name="state['z']")
    except ValueError as e:
        raise ValueError(f"{owner}: {e}") from None
    for i, (p, z) in enumerate(zip(p_leaves, z_leaves)):
        if p is not None and (not isinstance(z, torch.Tensor) or z.shape != p.shape):
            raise ValueError(f"{owner}: state['z'] at {_tree.leaf_paths_on_error(params, i)!r} "
                             f"is {_tree.describe_leaf(z)}, expected shape {tuple(p.shape)}")
    return p_leaves, z_leaves, spec


def schedule_free_eval_params(params, state, *, donate: bool = False):
    """The averaged params ``x = lerp(y, z, 1 − 1/β1)`` to evaluate or checkpoint. ``params`` =
    the training params y that ``update`` returned, ``state`` its state (only ``state["z"]`` and
    ``state["hyperparams"]["beta1"]`` are read).

    Pure by default (a new tree); ``donate=True`` overwrites the ``params`` tensors in place (the
    torch.optim adapter's ``eval()``), with bitwise the same values. Raises ValueError when
    β1 = 0 (x cannot be recovered from y and z)."""
    p_leaves, z_leaves, spec = _z_leaves("schedule_free_eval_params", params, state)
    weight = _eval_weight(state[HPARAMS_KEY]["beta1"])
    return _tree.unflatten(spec, _interpolate(p_leaves, z_leaves, weight, inplace=donate))


def schedule_free_train_params(eval_params, state, *, donate: bool = False):
    """The inverse of :func:`schedule_free_eval_params`: ``y = lerp(x, z, 1 − β1)``, so
    ``schedule_free_train_params(schedule_free_eval_params(y, s), s) == y`` up to rounding.
    ``donate`` as in :func:`schedule_free_eval_params`. With β1 = 0 this gives ``y = z``."""
    p_leaves, z_leaves, spec = _z_leaves("schedule_free_train_params", eval_params, state)
    weight = _train_weight(state[HPARAMS_KEY]["beta1"])
    return _tree.unflatten(spec, _interpolate(p_leaves, z_leaves, weight, inplace=donate))
