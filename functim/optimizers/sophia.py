"""Sophia (SophiaG): a clipped diagonal-Newton step with an EMA of a Hessian-diagonal estimate.

Per step (``t`` is not used: no bias correction)::

    p ← p·(1 − η·λ)                                   # decoupled weight decay, before (reference)
    m ← β1·m + (1 − β1)·g                             # a lerp, as functim's Lion
    u = clamp(m / max(ρ·bs·h, ε), −1, 1)              # = sign(m)·min(|m|/max(ρ·bs·h, ε), 1)
    p ← p − η·u

Hessian EMA (a separate pure function, :meth:`SophiaOptimizer.update_hessian`)::

    h ← β2·h + (1 − β2)·ĥ                             # a lerp

``ĥ`` is a curvature estimate from :mod:`functim.hessian` (GNB for SophiaG, or Hutchinson).

Paper: Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training", arXiv 2305.14342. Reference code: Liuhong99/Sophia@a7e1572 ``sophia.py``
(``SophiaG``) and its training loop ``train_sophiag.py``.

Choices against the reference:

- Denominator ``max(ρ·bs·h, ε)`` with ``ε = 1e-15`` (the reference adds 1e-15: equal for
  ``h ≥ 0`` up to 1e-15). A negative curvature estimate (Hutchinson) gives the clipped sign step
  instead of the reference's ascent step. ``m`` is not bias-corrected (reference).
- ``sign(m)·min(|m|/d, 1)`` is computed as ``clamp(m/d, −1, 1)``: the same numbers (IEEE
  division is sign-symmetric), one pass fewer. With ``h = 0`` (before the first Hessian update)
  or ``ρ = 0`` the update is bitwise ``functim.lion(lr, (β1, β1), λ)`` wherever ``|m| ≥ ε``
  (docs/algorithms.md, reduction R12).
- ``bs`` (the reference's ``step(bs=...)`` argument, tokens per step) defaults to **1**, not
  the reference's 5120: functim's estimators (:mod:`functim.hessian`) return the paper's
  ``ĥ = B·ĝ⊙ĝ``, which already carries the batch factor, so ``ρ`` keeps the reference's
  meaning with ``bs = 1``. To feed raw ``ĝ⊙ĝ`` as the reference's ``update_hessian()`` does,
  set ``bs`` to the number of tokens per batch, as the reference does.
- Cadence (reference): the EMA is updated after steps ``k, 2k, …`` (``k = hessian_interval``,
  default 10) with an estimate computed at the params *after* that step, so steps ``1..k`` run
  with ``h = 0``. Functionally: pass the estimate to the *next* ``update`` as
  ``update(params, grads, state, hessian=est)``; the EMA is applied first, then the step, which
  is exactly the reference's order, and the estimate is computed at the same params as the
  gradients. :meth:`SophiaOptimizer.hessian_due` says when (``state["step"]`` is a positive
  multiple of ``k``). Calling ``state = opt.update_hessian(state, est)`` right after the update
  is the same.
- RNG (label sampling, probes): ``state["rng"]``, a key of :func:`functim.hessian.rng_key`
  (``seed`` argument). ``update`` never reads or changes it; the estimators take it and return
  the advanced key, which goes back into the state, so save → load → continue is bitwise.

State: ``step`` (int32), ``hyperparams`` (lr, beta1, beta2, rho, weight_decay, bs, eps as
float64 0-d), ``exp_avg`` and ``hessian`` (like params; float32 for bfloat16/float16 params
unless ``state_dtype``), ``rng`` (int64 ``(2,)``).

Functional loop (see ``examples/sophia_loop.py``)::

    opt = ft.sophia(lr=1e-3, rho=0.04, weight_decay=0.1)
    state = opt.init_state(params)
    for t, (x, y) in enumerate(batches):  # t = completed updates
        grads = torch.func.grad(loss_fn)(params, x, y)
        hess = None
        if opt.hessian_due(t):            # or opt.hessian_due(state): one host read
            hess, rng = ft.gnb_hessian(logits_fn, params, x, state["rng"])
            state = {**state, "rng": rng}
        params, state = opt.update(params, grads, state, hessian=hess)
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import optree
import torch

from .. import _tree
from ..elementwise import ElementwiseOptimizer
from ..hessian import check_key, rng_key
from ..hyperparams import (
    BETA,
    HPARAMS_KEY,
    NONNEGATIVE,
    POSITIVE,
    ScalarOrSchedule,
    check_betas,
    check_hyperparam,
    resolve_hyperparams,
)
from ..listops import ListOps
from ..numerics import ema
from ..optimizer import State
from ..runtime import group_by_device_and_dtype, needs_per_tensor
from ..state import check_state_keys, state_device
from .lion import decay_then_step

RNG_KEY = "rng"


def _sophia_kernel(ops, p, g, b, s, *, decay, inplace, maximize):
    if maximize:
        g = ops.neg(g)
    m = ema(ops, b["exp_avg"], g, s["beta1"], inplace=inplace)
    denom = ops.maximum(ops.mul(b["hessian"], s["rho"] * s["bs"]), s["eps"], inplace=True)
    ratio = ops.clamp_min(ops.clamp_max(ops.div(m, denom), 1.0, inplace=True), -1.0,
                          inplace=True)
    p = decay_then_step(ops, p, ratio, s, decay=decay, inplace=inplace)
    return p, {"exp_avg": m, "hessian": b["hessian"]}


def hessian_ema(hessian: Sequence[torch.Tensor | None], estimate: Sequence[torch.Tensor | None],
                beta2: float | torch.Tensor, *, donate: bool = False) -> list:
    """``h ← β2·h + (1 − β2)·ĥ`` (a lerp) on flat lists; where ``h`` or ``ĥ`` is ``None`` the
    entry is returned unchanged. ``donate``: overwrite ``h`` in place (where the execution path
    allows; the returned list is authoritative). The one definition of Sophia's Hessian EMA,
    used by :meth:`SophiaOptimizer.update_hessian` and by the torch.optim adapter."""
    out = list(hessian)
    idx = [i for i, (h, e) in enumerate(zip(hessian, estimate)) if h is not None and e is not None]
    if not idx:
        return out
    hs = [hessian[i] for i in idx]
    es = [estimate[i] if (estimate[i].dtype, estimate[i].device) == (h.dtype, h.device)
          else estimate[i].to(device=h.device, dtype=h.dtype) for i, h in zip(idx, hs)]
    ops = ListOps(per_tensor=needs_per_tensor(hs, es, scalars=[beta2]))
    for (device, _), (h_sub, e_sub), sub_idx in group_by_device_and_dtype([hs, es]):
        b2 = beta2.to(device) if isinstance(beta2, torch.Tensor) else beta2
        new = ema(ops, h_sub, e_sub, b2, inplace=donate)
        for j, t in zip(sub_idx, new):
            out[idx[j]] = t
    return out


class SophiaOptimizer(ElementwiseOptimizer):
    """The optimizer :func:`sophia` returns: an :class:`~functim.ElementwiseOptimizer` whose
    state also holds the estimators' RNG key, with ``update(..., hessian=...)``,
    :meth:`update_hessian` and :meth:`hessian_due` (see the module docstring)."""

    def __init__(self, *, hessian_interval: int, seed: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.hessian_interval = hessian_interval
        self.seed = seed

    # -- state -----------------------------------------------------------------------------
    def init_state(self, params: Any) -> State:
        state = super().init_state(params)
        leaves, _ = _tree.flatten(params)
        state[RNG_KEY] = rng_key(self.seed, device=state_device(leaves))
        return state

    def state_keys(self) -> list[str]:
        return [*super().state_keys(), RNG_KEY]

    def check_state(self, params: Any, p_leaves: list, spec: optree.PyTreeSpec,
                    state: State) -> dict[str, list]:
        bufs = super().check_state(params, p_leaves, spec, state)
        check_key(self.name, state[RNG_KEY], f"state[{RNG_KEY!r}]")
        return bufs

    # -- Hessian EMA -----------------------------------------------------------------------
    def _check_estimate(self, state, estimate) -> tuple[list, list, Any]:
        """(hessian leaves, estimate leaves, spec) after checking the estimate's structure and
        shapes against ``state["hessian"]`` (which has the params' structure)."""
        try:
            h_leaves, e_leaves, spec = _tree.check_same_structure(
                state["hessian"], estimate, ref_name="params", other_name="hessian")
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        for i, (h, e) in enumerate(zip(h_leaves, e_leaves)):
            if e is None:
                continue
            if h is None or not isinstance(e, torch.Tensor) or e.shape != h.shape:
                path = _tree.leaf_paths_on_error(state["hessian"], i)
                raise ValueError(
                    f"{self.name}: hessian estimate at {path!r} is {_tree.describe_leaf(e)}, "
                    "expected " + ("None (the param is None)" if h is None else
                                   f"a tensor of shape {tuple(h.shape)} or None"))
            if not e.is_floating_point():
                path = _tree.leaf_paths_on_error(state["hessian"], i)
                raise TypeError(f"{self.name}: hessian estimate at {path!r} must be floating "
                                f"point, got {e.dtype}")
        return h_leaves, e_leaves, spec

    def update_hessian(self, state: State, estimate: Any, *, donate: bool = False) -> State:
        """A new state with ``h ← β2·h + (1 − β2)·estimate`` (``estimate``: a tree like params,
        e.g. from :func:`functim.gnb_hessian`; ``None`` leaves keep their ``h``). Nothing else
        changes (not ``step``, not ``rng``). ``donate=True`` updates ``h`` in place."""
        check_state_keys(self.name, state, self.state_keys(), identified=True)
        h_leaves, e_leaves, spec = self._check_estimate(state, estimate)
        hp = resolve_hyperparams(self.hyperparams, state[HPARAMS_KEY], state["step"])
        new_h = hessian_ema(h_leaves, e_leaves, hp["beta2"], donate=donate)
        return {**state, "hessian": _tree.unflatten(spec, new_h)}

    def hessian_due(self, step: int | torch.Tensor | State) -> bool:
        """Whether the next ``update`` should get ``hessian=``: ``step`` (completed updates: an
        int, the state's ``step`` tensor, or the state) is a positive multiple of
        ``hessian_interval``. Host-side by design (it decides whether to run the estimator); a
        tensor is read once (a device sync on an accelerator; pass your loop's int to avoid it)."""
        if isinstance(step, dict):
            step = step["step"]
        n = int(step)
        return n > 0 and n % self.hessian_interval == 0

    # -- update ----------------------------------------------------------------------------
    def update(self, params: Any, grads: Any, state: State, *, donate: bool = False,
               hessian: Any = None, **extra: Any) -> tuple[Any, State]:
        """One Sophia step; with ``hessian=`` (a tree like params) the Hessian EMA is applied
        first (the reference's order: see the module docstring)."""
        if hessian is not None:
            self.validate(params, grads, state)
            self._check_estimate(state, hessian)  # everything is checked before any write
            state = self.update_hessian(state, hessian, donate=donate)
        new_params, new_state = super().update(params, grads, state, donate=donate, **extra)
        new_state[RNG_KEY] = state[RNG_KEY]
        return new_params, new_state


def sophia(
    lr: ScalarOrSchedule = 1e-4,
    betas: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.965, 0.99),
    rho: ScalarOrSchedule = 0.04,
    weight_decay: ScalarOrSchedule = 1e-1,
    *,
    bs: ScalarOrSchedule = 1.0,
    eps: ScalarOrSchedule = 1e-15,
    hessian_interval: int = 10,
    seed: int = 0,
    maximize: bool = False,
    state_dtype: torch.dtype | None = None,
    weight_decay_mask: Any = None,
    compile: bool = False,
) -> SophiaOptimizer:
    """SophiaG with the reference's defaults (lr 1e-4, betas (0.965, 0.99), rho 0.04,
    weight_decay 0.1), except ``bs = 1`` (module docstring: functim's estimators include the
    batch factor). ``eps``: the denominator floor ``max(ρ·bs·h, eps)``. ``hessian_interval``
    (k, default 10 as ``train_sophiag.py``): used by :meth:`SophiaOptimizer.hessian_due`.
    ``seed``: of the RNG key in ``state["rng"]``. ``weight_decay_mask`` as in
    :func:`functim.adamw`.
    """
    beta1, beta2 = check_betas("sophia", betas)
    check_hyperparam("sophia", "eps", eps, POSITIVE)
    if isinstance(hessian_interval, bool) or not isinstance(hessian_interval, int) or \
            hessian_interval < 1:
        raise ValueError(f"sophia: hessian_interval must be an int >= 1, got {hessian_interval!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"sophia: seed must be an int in [0, 2**63), got {seed!r}")
    if not isinstance(maximize, bool):
        raise TypeError(f"sophia: 'maximize' must be a bool, got {maximize!r}")
    return SophiaOptimizer(
        name="sophia",
        hyperparams={"lr": lr, "beta1": beta1, "beta2": beta2, "rho": rho,
                     "weight_decay": weight_decay, "bs": bs, "eps": eps},
        ranges={"lr": NONNEGATIVE, "beta1": BETA, "beta2": BETA, "rho": NONNEGATIVE,
                "weight_decay": NONNEGATIVE, "bs": NONNEGATIVE, "eps": POSITIVE},
        buffers=("exp_avg", "hessian"),
        kernel=partial(_sophia_kernel, maximize=maximize),
        state_dtype=state_dtype,
        weight_decay_mask=weight_decay_mask,
        options={"maximize": maximize, "hessian_interval": hessian_interval, "seed": seed},
        compile=compile,
        hessian_interval=hessian_interval,
        seed=seed,
    )


__all__ = ["SophiaOptimizer", "hessian_ema", "sophia"]
