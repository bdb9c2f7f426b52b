"""Viewing N-D tensors as matrices, and the dimension-merging rules of SOAP and Kron.

Nothing here guesses: Muon/Scion view a leaf as (a batch of) matrices by *declared* dimensions
(:class:`MatrixDims`), and the SOAP/Kron merge rules reproduce their references exactly
(nikhilvyas/SOAP@a1e5535 ``soap.py`` ``merge_dims``; evanatyourservice/kron_torch@884427c
``kron.py``, the merge made on a leaf's first step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MatrixDims:
    """How an N-D tensor is viewed as a batch of matrices.

    ``batch``: dims that index independent matrices (stacked layers, MoE experts);
    ``rows``: dims flattened into the rows (fan-out, torch's ``(out, in)`` layout);
    every other dim is flattened, in order, into the columns (fan-in).

    - a Linear weight ``(out, in)``: ``MatrixDims()`` (rows = dim 0);
    - a conv kernel ``(out, in, kh, kw)`` as the Muon reference does (``view(out, -1)``):
      ``MatrixDims()`` too;
    - stacked experts ``(E, out, in)``: ``MatrixDims(batch=(0,), rows=(1,))``.
    Negative dims count from the end.
    """

    batch: tuple[int, ...] = ()
    rows: tuple[int, ...] = (0,)

    def resolve(self, ndim: int, *, where: str = "tensor") -> tuple[tuple, tuple, tuple]:
        """(batch, rows, cols) as non-negative dim tuples; raises ValueError if they do not
        describe an ``ndim``-dimensional tensor with at least one row and one column dim."""
        try:
            batch = tuple(d % ndim if -ndim <= d < ndim else _bad(d) for d in self.batch)
            rows = tuple(d % ndim if -ndim <= d < ndim else _bad(d) for d in self.rows)
        except IndexError as e:
            raise ValueError(f"{where}: {self} names dim {e.args[0]} but the tensor has "
                             f"{ndim} dims") from None
        if len(set(batch + rows)) != len(batch) + len(rows):
            raise ValueError(f"{where}: {self} lists a dim twice")
        cols = tuple(d for d in range(ndim) if d not in batch and d not in rows)
        if not rows or not cols:
            raise ValueError(f"{where}: {self} leaves no {'row' if not rows else 'column'} "
                             f"dims for a {ndim}-D tensor")
        return batch, rows, cols


def _prod(xs) -> int:
    # a plain loop: torch.compile cannot trace math.prod over a generator
    out = 1
    for x in xs:
        out *= x
    return out


def _bad(d):
    raise IndexError(d)


def matrix_shape(shape: Sequence[int], dims: MatrixDims, *, where: str = "tensor"
                 ) -> tuple[tuple[int, ...], int, int]:
    """(batch shape, rows, cols) of the matrix view of a tensor of ``shape``."""
    batch, rows, cols = dims.resolve(len(shape), where=where)
    return (tuple(shape[d] for d in batch), _prod(shape[d] for d in rows),
            _prod(shape[d] for d in cols))


def _permutation(ndim: int, dims: MatrixDims) -> tuple[int, ...]:
    batch, rows, cols = dims.resolve(ndim)
    return batch + rows + cols


def to_matrix(x: torch.Tensor, dims: MatrixDims) -> torch.Tensor:
    """``x`` as ``(*batch, rows, cols)`` (a view when the dims are already in that order)."""
    perm = _permutation(x.ndim, dims)
    b, r, c = matrix_shape(x.shape, dims)
    if perm != tuple(range(x.ndim)):
        x = x.permute(perm)
    return x.reshape(*b, r, c)


def from_matrix(m: torch.Tensor, shape: Sequence[int], dims: MatrixDims) -> torch.Tensor:
    """Inverse of :func:`to_matrix` for a tensor of ``shape``."""
    perm = _permutation(len(shape), dims)
    out = m.reshape([shape[d] for d in perm])
    if perm != tuple(range(len(shape))):
        out = out.permute([perm.index(d) for d in range(len(shape))])
    return out


def soap_merge_shape(shape: Sequence[int], max_precond_dim: int) -> tuple[int, ...]:
    """SOAP reference ``merge_dims``: scan dims left to right keeping a running product while it
    stays ≤ ``max_precond_dim``; when the next dim would exceed it, emit the product (or the dim
    itself when the product is 1) and restart. Size-1 dims disappear.
    (64,32,3,3)→(6144,3) at 8192; (3,3,64,128)→(576,128); (8,8,8)→(512,)."""
    out: list[int] = []
    acc = 1
    for d in shape:
        if acc * d > max_precond_dim:
            if acc > 1:
                out.append(acc)
                acc = d
            else:
                out.append(d)
        else:
            acc *= d
    if acc > 1 or not out:
        out.append(acc)
    return tuple(out)


def kron_merge_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """kron_torch's merge of a >2-D tensor to 2-D: compare the *signed*
    differences of the two candidate splits, ``(∏shape[:-1], shape[-1])`` and
    ``(shape[0], ∏shape[1:])``, and take the first when its difference is ≤ the second's.
    (64,32,3,3)→(6144,3), as the reference does. ≤2-D shapes are returned unchanged."""
    shape = tuple(shape)
    if len(shape) <= 2:
        return shape
    s1 = (_prod(shape[:-1]), shape[-1])
    s2 = (shape[0], _prod(shape[1:]))
    return s1 if (s1[1] - s1[0]) <= (s2[1] - s2[0]) else s2
