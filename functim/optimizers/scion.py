"""Scion: steepest descent under a per-layer norm, through its linear minimisation oracle (LMO).

Update, per leaf, with ``α`` = ``momentum`` in the reference's parametrisation (1 − the usual
momentum; 1.0 = no momentum, no state)::

    d ← (1−α)·d + α·g ; dir = d          (dir = g when the optimizer was built with momentum=1)
    U = scale · lmo(dir)                  (per-norm scale = the radius ρ of the norm ball)
    p ← (1−η)·p                           (constrained, the default: a Frank–Wolfe step)
    p ← p − η·U

The LMOs act on the leaf's matrix view ``(d_out, d_in)``: ``Spectral`` ``NS5(g)·s`` with
``s = sqrt(d_out/d_in)`` (``max=True``: ``max(1, s)``), ``Sign`` ``sign(g)/d_in`` (normalised) or
``sign(g)``, ``ColNorm``/``RowNorm`` columns/rows scaled to unit RMS/norm, ``BiasRMS``
``g / (RMS(g) + 1e-8)`` for vectors. Constrained Scion is decoupled weight decay with ``λ = 1``.

Paper: Pethick et al. 2025, "Training Deep Learning Models with Norm-Constrained LMOs",
arXiv 2502.07529. Reference code: LIONS-EPFL/scion@f58a393 ``scion.py`` (``Scion`` and its norms).

Choices against the reference:

- Each leaf is routed to a norm by functim's rules (:func:`functim.lm_routing` by default: hidden
  matrices ``Spectral``, input embeddings ``ColNorm(transpose=True)`` (one RMS-normalised vector
  per token, the reference's advice for ``(vocab, dim)`` embeddings), the output head ``Sign``,
  biases/norms/ndim < 2 ``BiasRMS``); the reference chooses a norm per param group.
- Matrix norms act on the leaf's matrix view (2-D leaves as they are; N-D leaves declared with
  ``matrix_dims``, batched over its batch dims). ``SpectralConv`` is ``Spectral`` on a declared
  conv view (its ``/k²`` factor is a ``scale``).
- The reference's ``init()`` (re-initialising weights to each norm's ball) is not part of the
  optimizer.
- Newton–Schulz is functim's shared eager iteration (:func:`functim.orthogonalize`: bfloat16 on
  CUDA as the reference, at least float32 elsewhere; ``ns_dtype`` overrides). The reference
  wraps it in ``torch.compile``, whose bfloat16 results are not bitwise the eager ones.
- The Levanter "scion" used by Wen et al. (arXiv 2509.02046) is a different algorithm (Muon on
  hidden matrices + Signum elsewhere); it composes from :func:`functim.muon` routing and
  :func:`functim.signum`.

Reductions (docs/algorithms.md): R14, R15 (Scion ≡ Muon variants), R16 (Sign ≡ Signum), R37.

State: ``step``, ``hyperparams`` (``lr``, ``momentum``), and ``momentum_buffer`` for every leaf
unless the optimizer was built with ``momentum=1``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..hyperparams import NONNEGATIVE, UNIT, ScalarOrSchedule, check_option
from ..linalg import NS5_COEFFICIENTS, from_matrix, to_matrix
from ..listops import ListOps
from ..numerics import widen
from ..rules import Rule, lm_routing
from ..runtime import group_by_device_and_dtype, needs_per_tensor
from ._routed import (
    LeafRoute,
    MatrixDimsSpec,
    RoutedOptimizer,
    apply_update,
    by_buffer_dtype,
    orthogonalized_update,
    select,
)

LMO_EPS = 1e-8  # the reference's eps in ColNorm, RowNorm and BiasRMS


@dataclass(frozen=True)
class Spectral:
    """``NS5(g)·s``, ``s = sqrt(d_out/d_in)`` (``normalized``) or ``sqrt(d_out)``; ``max``:
    ``s = max(1, s)``."""

    max: bool = False
    normalized: bool = True
    scale: float = 1.0
    matrix = True

    def factor(self, rows: int, cols: int) -> float:
        s = (rows / cols) ** 0.5 if self.normalized else rows ** 0.5
        return (max(1.0, s) if self.max else s) * self.scale


@dataclass(frozen=True)
class Sign:
    """``sign(g)/d_in`` (``normalized``) or ``sign(g)``."""

    normalized: bool = True
    scale: float = 1.0
    matrix = True

    def lmo(self, m: torch.Tensor) -> torch.Tensor:
        factor = self.scale / m.size(-1) if self.normalized else self.scale
        return torch.sign(m) * factor


def _divide_vectors(m: torch.Tensor, divisor: Callable[[torch.Tensor], torch.Tensor],
                    transpose: bool, scale: float) -> torch.Tensor:
    """``scale · m / (divisor(m) + 1e-8)``, on ``mᵀ`` (transposed back) when ``transpose``:
    the shared body of ColNorm and RowNorm."""
    if transpose:
        m = m.mT
    out = m / (divisor(m) + LMO_EPS)
    out = out.mT if transpose else out
    return out * scale if scale != 1.0 else out


@dataclass(frozen=True)
class ColNorm:
    """Each column divided by its RMS (``‖g_{:,j}‖/sqrt(d_out)``, times ``d_in`` when
    ``normalized``) plus 1e-8; ``transpose`` works on ``gᵀ`` (for ``(vocab, dim)`` embeddings)."""

    normalized: bool = False
    transpose: bool = False
    scale: float = 1.0
    matrix = True

    def lmo(self, m: torch.Tensor) -> torch.Tensor:
        def col_rms(x):
            rms = torch.linalg.vector_norm(x, dim=-2, keepdim=True) / x.size(-2) ** 0.5
            return rms * x.size(-1) if self.normalized else rms

        return _divide_vectors(m, col_rms, self.transpose, self.scale)


@dataclass(frozen=True)
class RowNorm:
    """Each row divided by its ℓ2 norm (times ``sqrt(d_in)`` when ``normalized``) plus 1e-8;
    ``transpose`` works on ``gᵀ``."""

    normalized: bool = True
    transpose: bool = False
    scale: float = 1.0
    matrix = True

    def lmo(self, m: torch.Tensor) -> torch.Tensor:
        def row_norm(x):
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            return norm * x.size(-1) ** 0.5 if self.normalized else norm

        return _divide_vectors(m, row_norm, self.transpose, self.scale)


@dataclass(frozen=True)
class BiasRMS:
    """``g / (sqrt(mean(g², dim=0)) + 1e-8)`` (for a 1-D leaf: divided by its RMS)."""

    scale: float = 1.0
    matrix = False

    def lmo(self, g: torch.Tensor) -> torch.Tensor:
        if g.ndim == 0:
            rms = g.abs()
        else:
            rms = torch.sqrt(torch.mean(g * g, dim=0, keepdim=True))
        out = g / (rms + LMO_EPS)
        return out * self.scale if self.scale != 1.0 else out


NORMS = (Spectral, Sign, ColNorm, RowNorm, BiasRMS)


def default_norms() -> dict[str, Any]:
    return {"hidden": Spectral(), "embedding": ColNorm(transpose=True), "output": Sign(),
            "vector": BiasRMS()}


class Scion(RoutedOptimizer):
    """See the module docstring; build with :func:`functim.scion`."""

    name = "scion"

    def __init__(self, *, norms, routing, hyperparams, ranges, matrix_dims, state_dtype,
                 unconstrained, stateful, ns):
        self.norms = dict(norms)
        self.labels = tuple(self.norms)
        self.matrix_labels = tuple(lab for lab, n in self.norms.items() if n.matrix)
        super().__init__(routing=routing, hyperparams=hyperparams, ranges=ranges,
                         buffers={"momentum_buffer": self.labels} if stateful else {},
                         matrix_dims=matrix_dims, state_dtype=state_dtype)
        self.unconstrained = unconstrained
        self.stateful = stateful
        self.ns = dict(ns)

    def __repr__(self) -> str:
        return (f"scion(lr={self.hyperparams['lr']!r}, momentum={self.hyperparams['momentum']!r}"
                f", unconstrained={self.unconstrained}, norms={self.norms!r})")

    def step_leaves(self, p_leaves, g_leaves, bufs, plans, hp, step, *, donate):
        idx = select(plans, p_leaves, g_leaves, lambda pl: True)
        new_p = list(p_leaves)
        new_bufs = {b: list(v) for b, v in bufs.items()}
        if not idx:
            return new_p, new_bufs
        ps = [p_leaves[i] for i in idx]
        gs = [g_leaves[i] for i in idx]
        ops = ListOps(per_tensor=needs_per_tensor(ps, gs, scalars=list(hp.values())))
        lr = hp["lr"]
        # constrained Scion is decoupled weight decay with λ = 1
        weight_decay = None if self.unconstrained else 1.0
        if self.stateful:
            ds = [bufs["momentum_buffer"][i] for i in idx]
            groups = by_buffer_dtype(group_by_device_and_dtype([ps, gs, ds]))
        else:
            groups = ((k, (p, g, None), sub) for k, (p, g), sub in
                      group_by_device_and_dtype([ps, gs]))
        for (_, pdtype), (p, g, d), sub in groups:
            work = d[0].dtype if d is not None else self.buffer_dtype(pdtype)
            g = widen(g, work)
            if d is not None:  # d ← (1−α)·d + α·g: a lerp by α itself (α = 1 − β)
                d = ops.lerp(d, g, hp["momentum"], inplace=donate)
                for j, x in zip(sub, d):
                    new_bufs["momentum_buffer"][idx[j]] = x
            direction = d if d is not None else g
            upd = self._lmos([plans[idx[j]] for j in sub], direction)
            out = apply_update(ops, p, upd, lr, weight_decay, donate=donate, work_dtype=work)
            for j, x in zip(sub, out):
                new_p[idx[j]] = x
        return new_p, new_bufs

    def _lmos(self, plans: Sequence[LeafRoute], xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``scale·lmo(x)`` per leaf; the spectral ones share batched Newton–Schulz runs."""
        out: list[torch.Tensor | None] = [None] * len(xs)
        spectral = [k for k, pl in enumerate(plans) if isinstance(self.norms[pl.label], Spectral)]
        if spectral:
            res = orthogonalized_update(
                [plans[k] for k in spectral], [xs[k] for k in spectral],
                [self.norms[plans[k].label].factor(plans[k].rows, plans[k].cols)
                 for k in spectral], self.ns)
            for k, r in zip(spectral, res):
                out[k] = r
        for k, (pl, x) in enumerate(zip(plans, xs)):
            if out[k] is not None:
                continue
            norm = self.norms[pl.label]
            if norm.matrix:
                out[k] = from_matrix(norm.lmo(to_matrix(x, pl.dims)), x.shape, pl.dims)
            else:
                out[k] = norm.lmo(x)
        return out


def scion(
    lr: ScalarOrSchedule = 1e-3,
    momentum: ScalarOrSchedule = 1.0,
    unconstrained: bool = False,
    *,
    norms: Mapping[str, Any] | None = None,
    routing: Sequence[Rule] | Mapping[str, Any] | None = None,
    matrix_dims: MatrixDimsSpec = None,
    ns_steps: int = 5,
    ns_dtype: torch.dtype | None = None,
    eps: float = 1e-7,
    state_dtype: torch.dtype | None = None,
) -> Scion:
    """Scion with the reference's defaults (lr 1e-3, momentum 1.0 = none, constrained);
    see :mod:`functim.optimizers.scion`.

    ``norms``: ``{label: Spectral(...) | Sign(...) | ColNorm(...) | RowNorm(...) |
    BiasRMS(...)}`` (each with its ``scale``); default labels ``hidden``, ``embedding``,
    ``output``, ``vector`` (given labels replace those defaults; with your own labels pass
    ``routing``). ``routing``: ordered :class:`functim.Rule` list or ``{label: selector}``
    (default :func:`functim.lm_routing`). ``ns_steps``/``ns_dtype``/``eps``: the Newton–Schulz
    settings of the spectral LMO (reference: 5 steps, bfloat16 on CUDA, eps 1e-7).
    """
    if not isinstance(unconstrained, bool):
        raise TypeError(f"scion: unconstrained must be a bool, got {unconstrained!r}")
    base = default_norms()
    if norms is not None:
        if not isinstance(norms, Mapping) or not norms:
            raise TypeError("scion: norms must be a non-empty dict {label: norm}")
        if routing is None:
            unknown = sorted(set(norms) - set(base))
            if unknown:
                raise ValueError(f"scion: norms has labels {unknown} that the default routing "
                                 f"does not use ({sorted(base)}); pass routing= as well")
            base.update(norms)
        else:
            base = dict(norms)
    for lab, n in base.items():
        if not isinstance(n, NORMS):
            raise TypeError(f"scion: norms[{lab!r}] must be one of "
                            f"{[c.__name__ for c in NORMS]}, got {n!r}")
        if not n.scale >= 0:
            raise ValueError(f"scion: norms[{lab!r}].scale must be >= 0, got {n.scale!r}")
    if routing is None:
        routing = lm_routing(hidden="hidden", vector="vector", embedding="embedding",
                             output="output")
    if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps < 0:
        raise ValueError(f"scion: ns_steps must be an int >= 0, got {ns_steps!r}")
    check_option("scion", "eps", eps, NONNEGATIVE)
    stateful = not (isinstance(momentum, (int, float)) and float(momentum) == 1.0)
    return Scion(norms=base, routing=routing,
                 hyperparams={"lr": lr, "momentum": momentum},
                 ranges={"lr": NONNEGATIVE, "momentum": UNIT}, matrix_dims=matrix_dims,
                 state_dtype=state_dtype, unconstrained=unconstrained, stateful=stateful,
                 ns={"steps": ns_steps, "coefficients": NS5_COEFFICIENTS,
                     "eps": float(eps), "dtype": ns_dtype})
