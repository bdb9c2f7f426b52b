"""The engine of the routed matrix optimizers (Muon with its AdamW fallback, Scion): every leaf is
claimed by one label through functim's path rules (:mod:`functim.rules`), labels decide the
maths, and one explicit state holds every per-leaf buffer (``None`` where a label has none).

State: ``{"step": int32 0-d, "hyperparams": {name: float64 0-d}, <buffer>: tree like params}``.
Subclasses give the hyperparameters, which labels own which buffers, and ``step_leaves``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optree
import torch

from .. import _tree
from ..hyperparams import (
    HPARAMS_KEY,
    Range,
    check_hyperparam,
    init_hyperparams,
)
from ..linalg import MatrixDims, from_matrix, matrix_shape, orthogonalize_many, to_matrix
from ..listops import ListOps, Scalar
from ..numerics import buffer_dtype, decoupled_decay, widen
from ..optimizer import State, TreeOptimizer
from ..rules import Explanation, Rule, explain, rule_labels
from ..runtime import has_dtensor
from ..state import (
    MADE_BY_KEY,
    Buffer,
    StateSpec,
    check_dtype_options,
    check_state_entries,
    check_state_keys,
    init_state_entries,
    made_by,
    state_device,
)

MatrixDimsSpec = Any  # None | {glob: MatrixDims} | callable (path, leaf) -> MatrixDims | None


@dataclass(frozen=True)
class LeafRoute:
    """What the optimizer does with one leaf: its label and, for matrix labels, its matrix view
    (``dims``; ``rows``/``cols`` of the view, ``batch`` its leading batch shape)."""

    path: str
    label: str | None
    dims: MatrixDims | None = None
    batch: tuple[int, ...] = ()
    rows: int = 0
    cols: int = 0


def matrix_dims_for(owner: str, spec: MatrixDimsSpec, path: str, leaf: torch.Tensor
                    ) -> MatrixDims:
    """The declared matrix view of a leaf: 2-D leaves default to ``(out, in)``; an N-D leaf
    must be declared through ``matrix_dims`` (nothing is guessed)."""
    dims = None
    if callable(spec):
        dims = spec(path, leaf)
    elif isinstance(spec, Mapping):
        import fnmatch
        for glob, d in spec.items():
            if fnmatch.fnmatchcase(path, glob):
                dims = d
                break
    elif spec is not None:
        raise TypeError(f"{owner}: matrix_dims must be None, a dict {{glob: MatrixDims}} or a "
                        f"callable (path, leaf) -> MatrixDims, got {spec!r}")
    if dims is None:
        if leaf.ndim == 2:
            return MatrixDims()
        raise ValueError(
            f"{owner}: parameter {path!r} has shape {tuple(leaf.shape)}; say how to view it as "
            "a matrix with matrix_dims={glob: functim.MatrixDims(...)} (a conv kernel "
            "(out, in, kh, kw) as the Muon reference does: MatrixDims(); stacked experts "
            "(E, out, in): MatrixDims(batch=(0,), rows=(1,))), or route it elsewhere")
    if not isinstance(dims, MatrixDims):
        raise TypeError(f"{owner}: matrix_dims for {path!r} must be a functim.MatrixDims, "
                        f"got {dims!r}")
    return dims


class RoutedOptimizer(TreeOptimizer):
    """Routes leaves to labels by ordered rules (or an exclusive ``{label: selector}`` map).

    Subclasses set ``name``, ``labels`` (allowed label names), ``matrix_labels`` (labels whose
    leaves are viewed as matrices), ``buffers`` ``{buffer name: labels that own it}`` and
    implement :meth:`step_leaves`.
    """

    labels: tuple[str, ...] = ()
    matrix_labels: tuple[str, ...] = ()

    def __init__(self, *, routing: Sequence[Rule] | Mapping[str, Any],
                 hyperparams: Mapping[str, Any], ranges: Mapping[str, Range],
                 buffers: Mapping[str, Sequence[str]], matrix_dims: MatrixDimsSpec = None,
                 state_dtype: torch.dtype | None = None):
        for k, v in hyperparams.items():
            check_hyperparam(self.name, k, v, ranges[k])
        used = rule_labels(f"{self.name}: routing", routing)
        unknown = sorted(set(used) - set(self.labels))
        if unknown:
            raise ValueError(f"{self.name}: routing names labels {unknown}; the labels are "
                             f"{list(self.labels)}")
        check_dtype_options(self.name, state_dtype=state_dtype)
        if matrix_dims is not None and not (callable(matrix_dims)
                                            or isinstance(matrix_dims, Mapping)):
            matrix_dims_for(self.name, matrix_dims, "", torch.empty(0))  # raises TypeError
        self.routing = routing if isinstance(routing, Mapping) else tuple(routing)
        self.hyperparams = dict(hyperparams)
        self.ranges = dict(ranges)
        self.buffers = {b: tuple(labs) for b, labs in buffers.items()}
        self.state_spec = StateSpec(
            buffers={b: Buffer(owners=labs) for b, labs in self.buffers.items()})
        self.matrix_dims = matrix_dims
        self.state_dtype = state_dtype
        self._plans: dict = {}

    # -- routing -------------------------------------------------------------------------
    def explain(self, params: Any) -> Explanation:
        """The routing table: which rule sent each parameter to which label."""
        return explain(self.routing, params, owner=self.name)

    def plan(self, params: Any) -> list[LeafRoute]:
        """Per-leaf plans (cached per tree structure and shapes); raises for unclaimed leaves,
        labels that cannot take a leaf, and undeclared N-D matrix views."""
        leaves, _ = _tree.flatten(params)
        # keyed by paths and shapes (strings and ints: torch.compile can trace the lookup)
        key = (tuple(_tree.paths(params)),
               tuple(None if x is None else tuple(x.shape) for x in leaves))
        plans = self._plans.get(key)
        if plans is None:
            plans = []
            for row, x in zip(self.explain(params), leaves):
                if x is not None and not (isinstance(x, torch.Tensor) and x.is_floating_point()):
                    raise TypeError(f"{self.name}: parameter {row.path!r} must be a "
                                    f"floating-point tensor or None, got "
                                    f"{_tree.describe_leaf(x)}")
                plans.append(self._leaf_plan(row.path, row.label, x))
            self._plans[key] = plans
        return plans

    def _leaf_plan(self, path: str, label: str | None, x: torch.Tensor | None) -> LeafRoute:
        if x is None or label not in self.matrix_labels:
            return LeafRoute(path, label)
        if x.ndim < 2:
            raise ValueError(
                f"{self.name}: parameter {path!r} (shape {tuple(x.shape)}) was routed to "
                f"{label!r}, which needs a matrix; route ndim < 2 leaves to another label")
        dims = matrix_dims_for(self.name, self.matrix_dims, path, x)
        batch, rows, cols = matrix_shape(x.shape, dims, where=f"{self.name}: {path!r}")
        return LeafRoute(path, label, dims, batch, rows, cols)

    # -- state ---------------------------------------------------------------------------
    def buffer_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        return buffer_dtype(param_dtype, self.state_dtype)

    def init_state(self, params: Any) -> State:
        plans = self.plan(params)
        device = state_device(_tree.flatten(params)[0])
        state: State = {
            "step": torch.zeros((), dtype=torch.int32, device=device),
            HPARAMS_KEY: init_hyperparams(self.hyperparams, device),
            **init_state_entries(self.state_spec, params, device, dtype=self.buffer_dtype,
                                 labels=[pl.label for pl in plans]),
        }
        state[MADE_BY_KEY] = made_by(self.name)
        return state

    def check_state(self, params: Any, p_leaves: list, spec: optree.PyTreeSpec, state: State
                    ) -> tuple[list[LeafRoute], dict[str, list]]:
        """(the leaves' plans, the buffers' leaves) after checking the routing and the state."""
        plans = self.plan(params)
        check_state_keys(self.name, state, ["step", HPARAMS_KEY, *self.buffers],
                         hyperparams=self.hyperparams, identified=True)
        bufs = check_state_entries(self.name, self.state_spec, params, p_leaves, state,
                                   labels=[pl.label for pl in plans])
        return plans, bufs

    def hyperparam_ranges(self) -> dict[str, Range]:
        return dict(self.ranges)

    # -- update --------------------------------------------------------------------------
    def step_tree(self, params: Any, p_leaves: list, g_leaves: list, spec: optree.PyTreeSpec,
                  checked: tuple[list[LeafRoute], dict[str, list]],
                  hp: dict[str, torch.Tensor], state: State, *, donate: bool, **extra: Any
                  ) -> tuple[list, State]:
        """:meth:`step_leaves` on the routed leaves; ``checked`` from :meth:`check_state`."""
        plans, bufs = checked
        step = state["step"] + 1
        new_p, new_bufs = self.step_leaves(p_leaves, g_leaves, bufs, plans, hp, step,
                                           donate=donate)
        new_state: State = {"step": step, HPARAMS_KEY: hp}
        for b in self.buffers:
            new_state[b] = _tree.unflatten(spec, new_bufs[b])
        return new_p, new_state

    @abc.abstractmethod
    def step_leaves(self, p_leaves: list, g_leaves: list, bufs: dict[str, list],
                    plans: list[LeafRoute], hp: dict[str, torch.Tensor], step: torch.Tensor,
                    *, donate: bool) -> tuple[list, dict[str, list]]:
        """One update on flat leaf lists (``None`` params/grads are skipped); ``step`` is the
        1-based index of this update. Returns (new params, {buffer: new leaves})."""


def select(plans: Sequence[LeafRoute], p_leaves: list, g_leaves: list,
           where: Callable[[LeafRoute], bool]) -> list[int]:
    """Indices of the leaves to update that satisfy ``where``. An empty leaf (a matrix with no
    rows or no columns) is never updated: there is nothing to update, and its matrix scale
    (``rows/cols``) would be undefined."""
    return [i for i, (pl, p, g) in enumerate(zip(plans, p_leaves, g_leaves))
            if p is not None and g is not None and p.numel() > 0 and where(pl)]


def orthogonalized_update(plans: Sequence[LeafRoute], u: list[torch.Tensor],
                          scales: list[float], ns: Mapping[str, Any]) -> list[torch.Tensor]:
    """``scale_i · NS(u_i)`` in each leaf's shape; leaves of equal matrix shape share one
    batched Newton–Schulz iteration. Used by Muon and Scion's spectral LMO.

    Sharded leaves (DTensors, e.g. FSDP2's) are orthogonalised whole, each once, on an owner rank
    (round-robin), and scattered back: :func:`functim.distributed.owner_compute`."""
    if has_dtensor(u):
        from ..distributed import owner_compute

        return owner_compute(lambda xs, pls, scs: orthogonalized_update(pls, xs, scs, ns),
                             u, list(plans), list(scales))
    mats = [to_matrix(x, pl.dims) for x, pl in zip(u, plans)]
    out = orthogonalize_many(mats, scales, **ns)
    return [from_matrix(o, x.shape, pl.dims) for o, x, pl in zip(out, u, plans)]


def apply_update(ops: ListOps, p: list, upd: list, lr: torch.Tensor,
                 weight_decay: Scalar | None, *, donate: bool, work_dtype: torch.dtype) -> list:
    """``p ← p·(1 − lr·weight_decay) − lr·upd`` computed in ``work_dtype`` and rounded into
    ``p`` once (``weight_decay`` None: no decay). ``upd`` is a temporary and may be
    overwritten."""
    mixed = p[0].dtype != work_dtype
    pw = widen(p, work_dtype)
    own = mixed  # pw is ours to overwrite
    if weight_decay is not None:
        pw = decoupled_decay(ops, pw, lr, weight_decay, decay=True, inplace=donate or own)
        own = True
    upd = ops.mul(upd, lr, inplace=True)
    pw = ops.sub(pw, upd, inplace=donate or own)
    return ops.write_back(p, pw, donate=donate) if mixed else pw


def by_buffer_dtype(groups):
    """Split (device, param dtype) groups of ``[params, grads, buffers]`` by the buffers' dtype
    (a loaded state may hold another dtype than ``init_state`` would make)."""
    for key, (p, g, b), idx in groups:
        by: dict[torch.dtype, list[int]] = {}
        for j, x in enumerate(b):
            by.setdefault(x.dtype, []).append(j)
        for js in by.values():
            yield key, ([p[j] for j in js], [g[j] for j in js], [b[j] for j in js]), \
                [idx[j] for j in js]
