"""Eigenbases of per-dimension Gram statistics, for the Shampoo-family preconditioners (SOAP).

Follows nikhilvyas/SOAP@a1e5535 ``soap.py`` (docs/algorithms.md section 8):

- :func:`gram`: ``G_(i) G_(i)ᵀ``, the contraction of a tensor with itself over every dim but ``i``
  (the reference's ``tensordot(G, G, dims=[others]*2)``, written as one matmul of the unfolding);
- :func:`eigh_descending`: the eigenvectors of ``L + 1e-30·I`` with the columns ordered by
  *descending* eigenvalue (the reference flips ``torch.linalg.eigh``'s ascending order), retried in
  float64 if the solver fails, as the reference does;
- :func:`power_qr_refresh`: one power-iteration step followed by a QR decomposition,
  ``Q ← qr(L·Q[:, σ]).Q`` with ``σ`` the order of ``diag(QᵀLQ)`` descending (the reference's
  ``get_orthogonal_matrix_QR``); it also returns ``σ`` so the caller can reorder whatever is
  indexed by the basis (SOAP's second moment);
- :func:`project` / :func:`project_back`: contract every dim ``i`` of a tensor with its basis,
  ``x ← Q_iᵀ x`` along dim ``i`` (``project``) or ``x ← Q_i x`` (``project_back``); a ``None``
  basis is the identity. For a matrix: ``Q_Lᵀ X Q_R`` and ``Q_L X Q_Rᵀ``.

Nothing here reads a device value on the host (``torch.linalg.eigh``'s own convergence check
aside, see :func:`eigh_descending`); everything works under ``torch.func`` transforms and
``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EIGH_JITTER = 1e-30  # the reference's ``m + 1e-30 * eye`` before eigh


def gram(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x_(dim) x_(dim)ᵀ``: ``x`` contracted with itself over every dim except ``dim``; a
    ``(x.shape[dim], x.shape[dim])`` matrix. For a matrix ``X``: ``X Xᵀ`` (dim 0), ``Xᵀ X``
    (dim 1); for a vector: the outer product ``x xᵀ``."""
    if x.ndim == 1:
        return torch.outer(x, x)
    if x.ndim == 2:
        return x @ x.transpose(-2, -1) if dim == 0 else x.transpose(-2, -1) @ x
    y = x.movedim(dim, 0).reshape(x.shape[dim], -1)
    return y @ y.transpose(-2, -1)


def eigh_descending(L: torch.Tensor, *, jitter: float = EIGH_JITTER) -> torch.Tensor:
    """Eigenvectors of the symmetric ``L + jitter·I`` as columns, ordered by descending
    eigenvalue (``L``'s dtype; batched over leading dims).

    As the reference, a solver failure (``torch.linalg.LinAlgError``, raised in eager mode) is
    retried in float64 and the result cast back. ``torch.linalg.eigh`` checks its convergence flag
    on the host, so on CUDA every call synchronises; SOAP calls it only on its first update.
    """
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    try:
        vecs = torch.linalg.eigh(L + jitter * eye).eigenvectors
    except torch.linalg.LinAlgError:
        if L.dtype == torch.float64:
            raise
        vecs = torch.linalg.eigh(L.double() + jitter * eye.double()).eigenvectors.to(L.dtype)
    return vecs.flip(-1).contiguous()  # row-major, like the buffers it is copied into


def power_qr_refresh(L: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One power-iteration + QR update of the eigenbasis ``Q`` of ``L`` (the SOAP reference's
    ``get_orthogonal_matrix_QR``).

    ``σ = argsort(diag(QᵀLQ), descending)``, ``Q_new = qr(L·Q[:, σ]).Q``. Returns
    ``(Q_new, σ)``; ``σ`` (int64, on ``Q``'s device) reorders anything indexed by the columns of
    ``Q``. ``L·Q`` is computed once: ``diag(QᵀLQ) = Σ_rows Q ⊙ (L·Q)`` and ``L·Q[:, σ] =
    (L·Q)[:, σ]``. No host sync."""
    LQ = L @ Q
    est = (Q * LQ).sum(-2)
    order = torch.argsort(est, dim=-1, descending=True)
    Q_new = torch.linalg.qr(LQ.index_select(-1, order))[0]
    return Q_new.contiguous(), order  # LAPACK's Q is column-major


def _contract(x: torch.Tensor, bases: Sequence[torch.Tensor | None], back: bool) -> torch.Tensor:
    if len(bases) != x.ndim:
        raise ValueError(f"project: {len(bases)} bases for a tensor of shape {tuple(x.shape)}; "
                         "expected one per dim (None for the identity)")
    if x.ndim == 1:
        Q = bases[0]
        if Q is None:
            return x
        return Q @ x if back else x @ Q
    if x.ndim == 2:
        QL, QR = bases
        if QL is not None:
            x = QL @ x if back else QL.transpose(-2, -1) @ x
        if QR is not None:
            x = x @ QR.transpose(-2, -1) if back else x @ QR
        return x
    # the reference's loop: each step contracts dim 0 and appends the result as the last dim, so
    # after every dim has been visited the order is the original one (tensordot(x, Q, [[0], [0]])
    # written as one matmul: torch.tensordot's own overhead dominates on small tensors)
    for Q in bases:
        if Q is None:
            x = x.movedim(0, -1)
        else:
            rest = x.shape[1:]
            flat = x.reshape(x.shape[0], -1).transpose(-2, -1)
            x = (flat @ (Q.transpose(-2, -1) if back else Q)).reshape(*rest, Q.shape[0])
    return x


def project(x: torch.Tensor, bases: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``x`` in the eigenbases: along every dim ``i``, ``x ← Q_iᵀ x`` (``None``: identity). For a
    matrix ``Q_Lᵀ X Q_R``. ``bases`` has one entry per dim of ``x``."""
    return _contract(x, bases, back=False)


def project_back(x: torch.Tensor, bases: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Inverse of :func:`project` for orthonormal bases: along every dim ``x ← Q_i x``; for a
    matrix ``Q_L X Q_Rᵀ``."""
    return _contract(x, bases, back=True)
