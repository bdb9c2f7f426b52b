"""Kronecker-factored preconditioners with triangular or diagonal factors (PSGD "EQ" form, as
evanatyourservice/kron_torch@884427c ``kron_torch/kron.py``; docs/algorithms.md section 9).

A tensor ``X`` of shape ``(d_0, ..., d_{k-1})`` carries one factor per dim: ``Q_i`` is either an
upper-triangular ``d_i × d_i`` matrix (stored dense) or a diagonal, stored as a vector of length
``d_i``. Everything here is a mode-wise product ``X ×_i M_i`` (``M_i`` acts on the index of dim
``i``: ``Y[.., a, ..] = Σ_b M_i[a, b] X[.., b, ..]``), with ``M_i`` one of

- ``Q_i``            → :func:`kron_apply`            (PSGD's ``A = Q·G``; 2-D: ``Q1 G Q2ᵀ``),
- ``Q_i^{-T}``       → :func:`kron_solve_transposed` (``B = Q^{-T}·V``; 2-D: ``Q1^{-T} V Q2^{-1}``,
  triangular solves, never an inverse),
- ``Q_iᵀ Q_i``       → :func:`kron_precondition`     (``P·G``; 2-D: ``Q1ᵀQ1 G Q2ᵀQ2``).

No einsum strings: the dims are walked cyclically. At step ``i`` the tensor's leading dim is the
original dim ``i``; it is viewed as a ``(rest, d_i)`` matrix (a transposed view of the contiguous
``(d_i, rest)`` layout, which BLAS reads without a copy), multiplied on the right, and the result
``(rest, d_i)`` is read as the tensor with dim ``i`` moved last. After ``k`` steps the dims are back
in order. For 1-D and 2-D tensors this costs one matmul (or one broadcast multiply) per factor and
no copies. Pure functions: inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Factors = Sequence[torch.Tensor]


def is_diagonal(q: torch.Tensor) -> bool:
    """A factor stored as a vector is diagonal; a square matrix is (upper) triangular."""
    return q.ndim < 2


def _mode_products(x: torch.Tensor, factors: Factors,
                   right: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``x ×_0 M_0 ×_1 M_1 ...`` where ``right(X2, q)`` returns ``X2 @ M_iᵀ`` for the
    ``(rest, d_i)`` matrix ``X2`` (see the module docstring)."""
    if x.ndim != len(factors):
        raise ValueError(f"a {x.ndim}-D tensor needs {x.ndim} Kronecker factors, "
                         f"got {len(factors)}")
    if x.ndim == 0:
        return x
    if x.ndim == 1:
        return right(x.unsqueeze(0), factors[0]).squeeze(0)
    shape = list(x.shape)
    for q in factors:
        d = shape[0]
        y = right(x.reshape(d, -1).t(), q)        # (rest, d): dim i moved last
        shape = shape[1:] + shape[:1]
        x = y.reshape(shape)
    return x


def _apply_right(x2: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x2 * q if is_diagonal(q) else x2 @ q.t()


def _solve_right(x2: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x2 / q if is_diagonal(q) else solve_triangular_right(x2, q)


def _precond_right(x2: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    if is_diagonal(q):
        return x2 * (q * q)
    rest, d = x2.shape
    # X2 @ (QᵀQ): forming QᵀQ costs d³ and then rest·d², applying Qᵀ then Q costs 2·rest·d²
    if d < rest:
        return x2 @ (q.t() @ q)
    return (x2 @ q.t()) @ q


def kron_apply(factors: Factors, x: torch.Tensor) -> torch.Tensor:
    """``x ×_i Q_i`` for every dim (2-D: ``Q1 @ x @ Q2ᵀ``; a diagonal factor scales its dim)."""
    return _mode_products(x, factors, _apply_right)


def kron_solve_transposed(factors: Factors, x: torch.Tensor) -> torch.Tensor:
    """``x ×_i Q_i^{-T}`` for every dim (2-D: ``Q1^{-T} @ x @ Q2^{-1}``) by triangular solves
    (a diagonal factor divides its dim). The factors must be upper triangular and invertible."""
    return _mode_products(x, factors, _solve_right)


def kron_precondition(factors: Factors, x: torch.Tensor) -> torch.Tensor:
    """``x ×_i (Q_iᵀ Q_i)`` for every dim: the preconditioned gradient ``P·x`` with
    ``P = ⊗_i Q_iᵀQ_i`` (2-D: ``Q1ᵀQ1 @ x @ Q2ᵀQ2``)."""
    return _mode_products(x, factors, _precond_right)


def solve_triangular_right(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x @ q^{-1}`` for an upper-triangular ``q`` (kron_torch ``_solve_triangular_right``),
    over the last dim of ``x``."""
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.linalg.solve_triangular(q, x2, upper=True, left=False)
    return out.reshape(x.shape)


def mode_gram(x: torch.Tensor, dim: int, *, diagonal: bool) -> torch.Tensor:
    """``X_(dim) X_(dim)ᵀ``, the Gram matrix of the mode-``dim`` unfolding (sum over every other
    dim); only its diagonal (a vector) when ``diagonal``."""
    others = [d for d in range(x.ndim) if d != dim]
    if diagonal:
        return (x * x).sum(dim=others) if others else x * x
    if x.ndim == 2:
        return x @ x.t() if dim == 0 else x.t() @ x
    return torch.tensordot(x, x, dims=(others, others))


def norm_lower_bound(s: torch.Tensor, max_abs: torch.Tensor | None = None) -> torch.Tensor:
    """kron_torch ``_lb``: a cheap lower bound of the spectral norm of a symmetric matrix ``s``.

    With ``s`` scaled by ``max_abs = max|s|``: take the column ``x`` of largest norm, ``x ← sᵀx``,
    normalise, and return ``‖s·x‖·max_abs``. No host sync (``argmax`` + ``index_select``). The
    result is NaN when ``max_abs`` is 0; callers select 0 there (see :func:`update_factors`)."""
    if max_abs is None:
        max_abs = s.abs().amax()
    s = s / max_abs
    col_sq = (s * s).sum(dim=0)
    j = torch.argmax(col_sq).reshape(1)
    x = torch.index_select(s, 1, j).flatten()
    x = x @ s
    x = x / torch.linalg.vector_norm(x)
    x = s @ x
    return torch.linalg.vector_norm(x) * max_abs


def balance_factors(factors: Factors) -> list[torch.Tensor]:
    """kron_torch ``_balance_Q``: rescale every factor to the geometric mean of the factors'
    max-abs norms (``Q_i · gmean_j ‖Q_j‖_max / ‖Q_i‖_max``). The Kronecker product is unchanged
    (the scales multiply to 1) up to rounding: the scales are computed in float64 (the reference
    uses the factors' dtype, whose ``exp(mean(log))`` loses about ``|log ‖Q‖|`` ulps), so each
    factor takes two roundings, its scale's and the product's."""
    norms = torch.stack([q.abs().amax().to(torch.float64) for q in factors])
    gmean = norms.log().mean().exp()
    scales = (gmean / norms).to(factors[0].dtype)
    return [q * scales[i] for i, q in enumerate(factors)]


DAMPING_EPS = torch.finfo(torch.float32).eps ** 0.5
"""kron_torch's probe damping: ``sqrt(ε_float32)`` (≈3.45e-4) times ``mean|G|``, whatever the
preconditioner dtype (the reference builds it from ``finfo(float32)``)."""


def update_factors(factors: Factors, g: torch.Tensor, v: torch.Tensor,
                   precond_lr: torch.Tensor | float) -> list[torch.Tensor]:
    """One PSGD "EQ" update of the factors from the pair ``(v, g)`` (kron_torch
    ``_update_precond`` + ``_calc_A_and_conjB``); returns new factors, the inputs are untouched.

    ``g`` (the gradient or debiased momentum) is damped out of place:
    ``g' = g + sqrt(ε_f32)·mean|g|·v`` (the reference adds the noise in place, which also changes
    the tensor it then preconditions). With ``A = g' ×_i Q_i`` and
    ``B = v ×_i Q_i^{-T}``, for each dim ``T1 = A_(i)A_(i)ᵀ``, ``T2 = B_(i)B_(i)ᵀ``,
    ``D = lr·(T1 − T2)``, ``S = T1 + T2``:

    - diagonal ``Q_i``: ``Q_i − D⊙Q_i / max(max|S|, tiny)``;
    - triangular ``Q_i``: ``Q_i − triu(D)·Q_i / max(lb(S), tiny)`` with lb
      :func:`norm_lower_bound` (0 when ``S`` = 0).

    Every factor is updated from the same ``A`` and ``B`` (computed with the old factors).
    """
    dtype = g.dtype
    tiny = torch.finfo(dtype).tiny
    g = g + (DAMPING_EPS * g.abs().mean()) * v
    a = kron_apply(factors, g)
    b = kron_solve_transposed(factors, v)
    if isinstance(precond_lr, torch.Tensor) and precond_lr.dtype != dtype:
        precond_lr = precond_lr.to(dtype)
    out = []
    for i, q in enumerate(factors):
        diag = is_diagonal(q)
        t1 = mode_gram(a, i, diagonal=diag)
        t2 = mode_gram(b, i, diagonal=diag)
        d, s = t1 - t2, t1 + t2
        d = d * precond_lr
        norm = s.abs().amax()
        if diag:
            out.append(q - d * (q / norm.clamp(min=tiny)))
        else:
            d = torch.triu(d)
            bound = torch.where(norm > 0, norm_lower_bound(s, norm), norm).clamp(min=tiny)
            out.append(q - (d / bound) @ q)
    return out
