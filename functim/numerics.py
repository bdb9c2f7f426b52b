"""The numerics several optimizers share, each defined once.

Kernels call these on :class:`~functim.listops.ListOps` lists; the scalar helpers take floats or
0-d tensors (hyperparameters live in the state as float64 0-d tensors, so nothing here reads a
value on the host).

- :func:`ema`: an exponential moving average, ``a ← β·a + (1 − β)·x`` (as a lerp).
- :func:`ema_of_squares`: the same of ``x²`` (Adam's second moment).
- :func:`bias_correction`: ``1 − β^t``, the mass an EMA started at zero has after ``t`` steps.
- :func:`adam_denominator`: ``sqrt(v)/sqrt(1 − β2^t) + ε`` (ε *after* bias correction, torch's
  AdamW) or ``sqrt(v) + ε`` (ε *before* it, on the raw root: Hugging Face's AdamW, SOAP).
- :func:`decoupled_decay`: ``p·(1 − η·λ)``, weight decay decoupled from the gradient, applied
  before the step (torch's AdamW).
- :func:`buffer_dtype`, :func:`precond_dtype`: the dtypes of moments and of preconditioner
  maths for a param dtype; :func:`widen`: inputs in the working dtype (the mixed-precision apply
  is widen → step → :meth:`ListOps.write_back <functim.listops.ListOps.write_back>`).
"""

from __future__ import annotations

import torch

from .listops import ListOps, Scalar, TensorList

# param dtypes whose moments and updates are kept and computed in float32
LOW_PRECISION = (torch.bfloat16, torch.float16)


def ema(ops: ListOps, avg: TensorList, x: TensorList, beta: Scalar, *,
        inplace: bool) -> TensorList:
    """``a ← β·a + (1 − β)·x``, as ``lerp(a, x, 1 − β)`` (one pass, rounded once)."""
    return ops.lerp(avg, x, 1 - beta, inplace=inplace)


def ema_of_squares(ops: ListOps, avg: TensorList, x: TensorList, beta: Scalar, *,
                   inplace: bool) -> TensorList:
    """``v ← β·v + (1 − β)·x²``."""
    return ema(ops, avg, ops.mul(x, x), beta, inplace=inplace)


def bias_correction(beta: Scalar, step: torch.Tensor) -> torch.Tensor:
    """``1 − β^t`` for the 1-based step ``t`` (a tensor: float64 when ``β`` is)."""
    return 1 - beta ** step


def adam_denominator(ops: ListOps, v: TensorList, eps: Scalar,
                     sqrt_bias_correction2: Scalar | None = None) -> TensorList:
    """``sqrt(v)/sqrt(bc2) + ε`` (ε after bias correction; ``sqrt_bias_correction2`` is
    ``sqrt(1 − β2^t)``), or ``sqrt(v) + ε`` when it is None (ε on the raw root; the caller then
    puts ``sqrt(bc2)`` into its step size). A new list; ``v`` is only read."""
    denom = ops.sqrt(v)
    if sqrt_bias_correction2 is not None:
        denom = ops.div(denom, sqrt_bias_correction2, inplace=True)
    return ops.add(denom, eps, inplace=True)


def decoupled_decay(ops: ListOps, p: TensorList, lr: Scalar, weight_decay: Scalar, *,
                    decay: bool, inplace: bool) -> TensorList:
    """``p·(1 − η·λ)`` where ``decay`` (else ``p`` as it is)."""
    if not decay:
        return p
    return ops.mul(p, 1 - lr * weight_decay, inplace=inplace)


def buffer_dtype(param_dtype: torch.dtype, state_dtype: torch.dtype | None = None
                 ) -> torch.dtype:
    """The dtype of a param's moments: ``state_dtype`` if given, float32 for bfloat16/float16
    params, else the param's own (torch.optim keeps the param dtype throughout)."""
    if state_dtype is not None:
        return state_dtype
    return torch.float32 if param_dtype in LOW_PRECISION else param_dtype


def precond_dtype(param_dtype: torch.dtype, override: torch.dtype | None = None
                  ) -> torch.dtype:
    """The dtype of preconditioner statistics and their linear algebra (eigh, QR, triangular
    solves need float32 or float64): ``override`` if given, float64 for float64 params, else
    float32."""
    if override is not None:
        return override
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def widen(xs: list, dtype: torch.dtype) -> list:
    """``xs`` in the working dtype (e.g. float32 copies of bfloat16 params); as is if already."""
    return [x if x.dtype == dtype else x.to(dtype) for x in xs]
