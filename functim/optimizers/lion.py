"""Sign-based optimizers: Lion, SignSGD and Signum (docs/algorithms.md, section 11).

- **Lion** follows lucidrains/lion-pytorch ``update_fn`` (= the paper's Program 1 = optax
  ``scale_by_lion``): ``p ← p·(1 − η·λ)``; ``u = sign(β1·m + (1 − β1)·g)``; ``p ← p − η·u``;
  ``m ← β2·m + (1 − β2)·g``. Weight decay is torch-style DWD (lr-coupled); lucidrains'
  ``decoupled_weight_decay=True`` (λ/η₀, "fully decoupled" decay) is not offered.
- **SignSGD** (Bernstein et al. 2018) with decoupled weight decay:
  ``p ← p·(1 − η·λ) − η·sign(g)``.
- **Signum**: EMA momentum ``m ← β·m + (1 − β)·g`` (LEV ``scale_by_signum``), then
  ``p ← p·(1 − η·λ) − η·sign(m)``. Sum-form momentum has the same sign, so it is not offered.

``sign(0) = 0`` (torch). The EMAs are ``lerp``s, so ``lion(β, β)`` and ``signum(β)`` are
bitwise identical, and ``lion(β1=0)`` is bitwise ``signsgd`` (lerp with weight 1 returns g).
"""

from __future__ import annotations

from typing import Any

import torch

from ..elementwise import ElementwiseOptimizer
from ..hyperparams import BETA, NONNEGATIVE, ScalarOrSchedule, check_betas, check_hyperparam
from ..numerics import decoupled_decay, ema


def decay_then_step(ops, p, direction, s, *, decay, inplace, scale=1.0):
    """``p ← p·(1 − η·λ) − η·scale·direction`` (``scale``: a float or per-leaf 0-d tensors), the
    step in one pass (``addcmul``, rounded once). ``direction`` is only read."""
    p = decoupled_decay(ops, p, s["lr"], s["weight_decay"], decay=decay, inplace=inplace)
    if isinstance(scale, list):
        return ops.add_scaled(p, direction, [-s["lr"] * c for c in scale], inplace=inplace)
    return ops.add_scaled(p, direction, -s["lr"] * scale, inplace=inplace)


def _lion_kernel(ops, p, g, b, s, *, decay, inplace):
    direction = ops.sign(ops.lerp(b["exp_avg"], g, 1 - s["beta1"]), inplace=True)
    p = decay_then_step(ops, p, direction, s, decay=decay, inplace=inplace)
    return p, {"exp_avg": ema(ops, b["exp_avg"], g, s["beta2"], inplace=inplace)}


def _signsgd_kernel(ops, p, g, b, s, *, decay, inplace):
    return decay_then_step(ops, p, ops.sign(g), s, decay=decay, inplace=inplace), {}


def _signum_kernel(ops, p, g, b, s, *, decay, inplace):
    m = ema(ops, b["momentum"], g, s["beta"], inplace=inplace)
    p = decay_then_step(ops, p, ops.sign(m), s, decay=decay, inplace=inplace)
    return p, {"momentum": m}


def lion(
    lr: ScalarOrSchedule = 1e-4,
    betas: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.9, 0.99),
    weight_decay: ScalarOrSchedule = 0.0,
    *,
    state_dtype: torch.dtype | None = None,
    weight_decay_mask: Any = None,
    compile: bool = False,
) -> ElementwiseOptimizer:
    """Lion (Chen et al. 2023) with lion-pytorch's defaults."""
    beta1, beta2 = check_betas("lion", betas)
    return ElementwiseOptimizer(
        "lion",
        hyperparams={"lr": lr, "beta1": beta1, "beta2": beta2, "weight_decay": weight_decay},
        ranges={"lr": NONNEGATIVE, "beta1": BETA, "beta2": BETA, "weight_decay": NONNEGATIVE},
        buffers=("exp_avg",),
        kernel=_lion_kernel,
        state_dtype=state_dtype,
        weight_decay_mask=weight_decay_mask,
        compile=compile,
    )


def signsgd(
    lr: ScalarOrSchedule = 1e-3,
    weight_decay: ScalarOrSchedule = 0.0,
    *,
    state_dtype: torch.dtype | None = None,
    weight_decay_mask: Any = None,
    compile: bool = False,
) -> ElementwiseOptimizer:
    """signSGD with decoupled weight decay (no state besides the step)."""
    return ElementwiseOptimizer(
        "signsgd",
        hyperparams={"lr": lr, "weight_decay": weight_decay},
        ranges={"lr": NONNEGATIVE, "weight_decay": NONNEGATIVE},
        buffers=(),
        kernel=_signsgd_kernel,
        state_dtype=state_dtype,
        weight_decay_mask=weight_decay_mask,
        compile=compile,
    )


def signum(
    lr: ScalarOrSchedule = 1e-3,
    beta: ScalarOrSchedule = 0.95,
    weight_decay: ScalarOrSchedule = 0.0,
    *,
    state_dtype: torch.dtype | None = None,
    weight_decay_mask: Any = None,
    compile: bool = False,
) -> ElementwiseOptimizer:
    """Signum: sign of an EMA of the gradient (β = 0.95 as LEV ``scale_by_signum``)."""
    check_hyperparam("signum", "beta", beta, BETA)
    return ElementwiseOptimizer(
        "signum",
        hyperparams={"lr": lr, "beta": beta, "weight_decay": weight_decay},
        ranges={"lr": NONNEGATIVE, "beta": BETA, "weight_decay": NONNEGATIVE},
        buffers=("momentum",),
        kernel=_signum_kernel,
        state_dtype=state_dtype,
        weight_decay_mask=weight_decay_mask,
        compile=compile,
    )


__all__ = ["lion", "signsgd", "signum"]
