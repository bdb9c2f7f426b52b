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
  elementwise maths is one multi-tensor kernel (:func:`_schedule_free_adamw_kernel`). Both serve
  the functional optimizer and the torch.optim adapter ``functim.adapters.ScheduleFreeAdamW``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .. import _tree
from ..base import ElementwiseOptimizer, Optimizer, State, check_state_keys
from ..hyperparams import (
    BETA,
    HPARAM_DTYPE,
    HPARAMS_KEY,
    NONNEGATIVE,
    ScalarOrSchedule,
    check_betas,
    resolve_hyperparams,
)
from ..kernels import ListOps, group_by_device_and_dtype, needs_per_tensor

NAME = "schedule_free_adamw"
BUFFERS = ("z", "exp_avg_sq")
SCALARS = ("lr_max", "weight_sum")
LR_MAX_INIT = -1.0

__all__ = [
    "ScheduleFreeOptimizer",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_train_params",
]


# -- the maths ------------------------------------------------------------------------------------
def _schedule_free_scalars(
    hp: dict, step: torch.Tensor, lr_max: torch.Tensor, weight_sum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-update scalars: ``(γ, c, new lr_max, new weight_sum)``, float64 0-d tensors.

    ``step`` = updates completed before this one (``k``). Branches are ``torch.where`` with safe
    denominators, so there is no host sync and gradients stay finite (e.g. d/d lr)."""
    k = step.to(HPARAM_DTYPE)
    kp1 = k + 1
    warmup = hp["warmup_steps"]
    in_warmup = k < warmup
    sched = torch.where(in_warmup, kp1 / torch.where(in_warmup, warmup, 1.0), 1.0)
    gamma = hp["lr"] * sched
    lr_max = torch.maximum(lr_max, gamma)
    weight = kp1 ** hp["r"] * lr_max ** hp["weight_lr_power"]
    weight_sum = weight_sum + weight
    positive = weight_sum > 0
    ckp1 = torch.where(positive, weight / torch.where(positive, weight_sum, 1.0), 0.0)
    return gamma, ckp1, lr_max, weight_sum


def _schedule_free_adamw_kernel(ops, p, g, b, hp, step, *, decay, inplace):
    """One update on lists of one (device, dtype) group. ``p`` holds y; ``hp`` carries the
    resolved hyperparameters plus this update's ``gamma`` and ``ckp1`` (= c); ``step`` = k+1."""
    beta1, beta2, gamma, ckp1 = hp["beta1"], hp["beta2"], hp["gamma"], hp["ckp1"]
    # sqrt(v/bc2) + ε = (sqrt(v) + ε·c)/c with c = sqrt(bc2): the kernel computes d/c and
    # folds c into the scales below (a pass fewer than dividing v by bc2)
    c = torch.sqrt(1 - beta2**step)
    # one temporary (g², then the denominator, then d/c), reused in place where
    # ListOps.writes_out holds
    t = ops.mul(g, g)
    v = ops.lerp(b["exp_avg_sq"], t, 1 - beta2, inplace=inplace)
    t = ops.sqrt(v, out=t)
    t = ops.add(t, hp["eps"] * c, inplace=True)
    d = ops.div(g, t, out=t)
    if decay:  # d = g/denom + λ·y: weight decay evaluated at y (before y moves)
        d = ops.add_scaled(d, p, hp["weight_decay"] / c, inplace=True)
    y = ops.lerp(p, b["z"], ckp1, inplace=inplace)  # the old z
    y = ops.add_scaled(y, d, gamma * c * (beta1 * (1 - ckp1) - 1), inplace=True)
    z = ops.add_scaled(b["z"], d, -gamma * c, inplace=inplace)
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
class ScheduleFreeOptimizer(Optimizer):
    """The functional Schedule-Free AdamW (see :func:`schedule_free_adamw`).

    State: ``{"step": int32 0-d, "hyperparams": {...}, "z": tree, "exp_avg_sq": tree,
    "lr_max": float64 0-d, "weight_sum": float64 0-d}``. The elementwise part runs on
    :class:`~functim.ElementwiseOptimizer`'s engine (grouping, mixed precision, donation, the
    foreach / per-tensor choice); this class adds the per-optimizer scalars around it.
    """

    name = NAME

    def __init__(self, hyperparams: dict, ranges: dict, *, state_dtype: torch.dtype | None,
                 weight_decay_mask: Any):
        common = dict(hyperparams=hyperparams, ranges=ranges, state_dtype=state_dtype,
                      weight_decay_mask=weight_decay_mask)
        self._engine = ElementwiseOptimizer(NAME, buffers=BUFFERS,
                                            kernel=_schedule_free_adamw_kernel, tileable=True,
                                            **common)
        # the same checks and leaves, without allocating a zero z that init_state would replace
        self._init_engine = ElementwiseOptimizer(NAME, buffers=("exp_avg_sq",), kernel=None,
                                                 **common)
        self.hyperparams = self._engine.hyperparams
        self.buffer_names = BUFFERS
        self.state_dtype = state_dtype
        self.weight_decay_mask = weight_decay_mask

    def __repr__(self) -> str:
        return repr(self._engine)

    def hyperparam_ranges(self):
        return self._engine.hyperparam_ranges()

    def buffer_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        return self._engine.buffer_dtype(param_dtype)

    # -- state ---------------------------------------------------------------------------
    def init_state(self, params) -> State:
        base = self._init_engine.init_state(params)  # validates leaves and state_dtype
        device = base["step"].device

        def z0(p):
            z = torch.clone(p, memory_format=torch.preserve_format)
            bdt = self.buffer_dtype(p.dtype)
            return z if z.dtype == bdt else z.to(bdt)

        return {
            "step": base["step"],
            HPARAMS_KEY: base[HPARAMS_KEY],
            "z": _tree.map_tree(z0, params),
            "exp_avg_sq": base["exp_avg_sq"],
            "lr_max": torch.full((), LR_MAX_INIT, dtype=HPARAM_DTYPE, device=device),
            "weight_sum": torch.zeros((), dtype=HPARAM_DTYPE, device=device),
        }

    def _check_state(self, params, p_leaves, state) -> dict[str, list]:
        check_state_keys(NAME, state, ["step", HPARAMS_KEY, *BUFFERS, *SCALARS])
        for k in SCALARS:
            s = state[k]
            if not isinstance(s, torch.Tensor) or s.ndim != 0 or not s.is_floating_point():
                raise ValueError(f"{NAME}: state[{k!r}] must be a 0-d floating tensor, got "
                                 f"{_tree.describe_leaf(s)}")
        sub = {k: state[k] for k in ("step", HPARAMS_KEY, *BUFFERS)}
        return self._engine._check_state(params, p_leaves, sub)

    # -- update --------------------------------------------------------------------------
    def validate(self, params, grads, state) -> None:
        p_leaves, _, _ = _tree.check_grads(NAME, params, grads)
        self._check_state(params, p_leaves, state)

    def update(self, params, grads, state, *, donate: bool = False, **extra):
        p_leaves, g_leaves, spec = _tree.check_grads(NAME, params, grads, donate=donate)
        bufs = self._check_state(params, p_leaves, state)
        step = state["step"]
        hp = resolve_hyperparams(self.hyperparams, state[HPARAMS_KEY], step)
        gamma, ckp1, lr_max, weight_sum = _schedule_free_scalars(
            hp, step, state["lr_max"], state["weight_sum"])
        decay = self._engine._decay_flags(params, p_leaves, spec)
        # λ on the host (where reading it is free) lets λ = 0 skip its pass over the params
        host_wd = self._engine._host_hparams({"weight_decay": hp["weight_decay"]})
        new_p, new_bufs = self._engine.step_leaves(
            p_leaves, g_leaves, bufs, {**hp, "gamma": gamma, "ckp1": ckp1}, step + 1, decay,
            donate=donate, host_hp=host_wd, fused=False)
        new_state: State = {"step": step + 1, HPARAMS_KEY: hp}
        for b in BUFFERS:
            new_state[b] = _tree.unflatten(spec, new_bufs[b])
        new_state["lr_max"] = lr_max
        new_state["weight_sum"] = weight_sum
        return _tree.unflatten(spec, new_p), new_state


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
