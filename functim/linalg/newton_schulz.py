"""Newton–Schulz orthogonalisation ("NS5", docs/algorithms.md section 10.1), shared by Muon and
Scion's spectral LMOs.

Follows KellerJordan/Muon@857d1ad ``muon.py`` ``zeropower_via_newtonschulz5``: the quintic iteration
``X ← aX + (bA + cA²)X`` with ``A = XXᵀ`` and (a, b, c) = (3.4445, −4.7750, 2.0315), after
normalising by the Frobenius norm plus ``eps``; the tall case is transposed so that ``A`` is the
smaller Gram matrix; batched over every leading dimension (a norm per matrix). Per singular value
this applies the odd polynomial ``p(x) = ax + bx³ + cx⁵`` ``steps`` times, so singular vectors are
preserved and singular values land in about [0.68, 1.2] rather than exactly 1.
"""

from __future__ import annotations

import torch

NS5_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def default_ns_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """bfloat16 on CUDA (the reference's choice: NS is robust to it and twice as fast there);
    elsewhere at least float32 (float64 inputs stay float64)."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.promote_types(dtype, torch.float32)


def orthogonalize(
    G: torch.Tensor,
    *,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS5_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximately ``U Vᵀ`` for ``G = U S Vᵀ``, for every matrix in the last two dims of ``G``.

    ``dtype``: the compute dtype (``None``: :func:`default_ns_dtype`). The result has ``G``'s
    dtype. No host sync; works under ``torch.func`` transforms and ``torch.compile``.
    """
    if G.ndim < 2:
        raise ValueError(f"orthogonalize: expected a matrix or a batch of matrices, got shape "
                         f"{tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"orthogonalize: steps must be >= 0, got {steps}")
    a, b, c = coefficients
    X = G.to(dtype or default_ns_dtype(G.device, G.dtype))
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def orthogonalize_many(
    mats: list[torch.Tensor], scales: list[float] | None = None, **kwargs
) -> list[torch.Tensor]:
    """:func:`orthogonalize` every matrix of ``mats`` (each ``(*batch, rows, cols)``), running
    one batched iteration per group of equal shape, dtype and device (the matrices of a
    transformer's layers share a few shapes, so a step costs a few batched matmul chains instead
    of one chain per leaf). ``scales[i]`` (optional) multiplies output ``i``."""
    out: list[torch.Tensor | None] = [None] * len(mats)
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    for idx in groups.values():
        if len(idx) == 1:
            res = [orthogonalize(mats[idx[0]], **kwargs)]
        else:
            res = orthogonalize(torch.stack([mats[i] for i in idx]), **kwargs).unbind(0)
        for i, r in zip(idx, res):
            out[i] = r if scales is None or scales[i] == 1.0 else r * scales[i]
    return out
