"""Elementwise optimizers: an update rule that is per-step scalars plus a kernel of list ops.

An :class:`ElementwiseOptimizer` is declared, not programmed: its hyperparameters and their
ranges, its state (per-parameter buffers and how each starts, scalar state), a function of the
step that gives this step's scalars (bias corrections, step sizes, ...: computed once per step,
not per group, tile or op), and a kernel that states the update rule in list operations::

    kernel(ops, params, grads, buffers, s, *, decay, inplace) -> (new_params, new_buffers)

``ops`` is a :class:`~functim.listops.ListOps`; ``s`` maps the hyperparameters and this step's
scalars to floats or 0-d tensors; ``decay`` says whether weight decay applies to these leaves;
``inplace`` whether params and buffers may be overwritten (the caller donated them). How the
kernel executes (torch's fused kernel, compiled, tiled, foreach, per tensor) is chosen by
:mod:`functim.execution`; the kernel never knows.

The update is :class:`~functim.optimizer.TreeOptimizer`'s skeleton; the elementwise step computes
this step's scalars, then steps the leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optree
import torch

from . import _tree, execution
from .hyperparams import (
    HPARAMS_KEY,
    Range,
    check_hyperparam,
    init_hyperparams,
)
from .numerics import buffer_dtype
from .optimizer import PyTree, State, TreeOptimizer
from .state import (
    BUFFER_INITS,
    MADE_BY_KEY,
    Buffer,
    StateSpec,
    cached_decay_flags,
    check_dtype_options,
    check_param_leaves,
    check_state_entries,
    check_state_keys,
    init_state_entries,
    made_by,
    state_device,
)


class ElementwiseOptimizer(TreeOptimizer):
    """An optimizer whose maths is one elementwise kernel over lists of leaves (see the module
    docstring for the kernel's signature).

    - ``buffers``: the per-parameter buffers, a sequence of names (each starts at zeros) or
      ``{name: "zeros" | "param"}``. Their dtype is :func:`functim.numerics.buffer_dtype`
      (``state_dtype`` overrides).
    - ``scalar_state``: other scalar state, ``{name: initial value}``, kept as float64 0-d
      tensors next to ``step``.
    - ``step_scalars(hp, step, scalar_state) -> (scalars, new_scalar_state)``: this step's
      scalars for the kernel (merged with ``hp``) and the new scalar state; ``step`` is the
      1-based index of this update (int32 0-d tensor). Default: none.
    - ``reductions``: how many per-leaf reductions (``ops.norm``/``ops.sum``) the kernel takes
      before any element can step (Cautious's mask count, MARS's clip norm); a tiled step
      measures them first (:mod:`functim.tiling`); ``{kind: count}`` with ``leaf_kind``.
    - ``tile``: whether a donated CPU step may run tile by tile (:mod:`functim.tiling`); a
      kernel that makes no param-sized temporary gains nothing from it.
    - ``leaf_kind``: ``(param) -> key``, a static class of leaves the kernel treats differently
      (MARS's 2-D and other leaves): each kind is stepped apart, the kernel gets ``kind=key``.
    - ``fused``: None (default) runs torch's fused kernel where torch has one for this
      optimizer and it applies (see :mod:`functim.execution`); False never; True requires that
      torch has one.
    - ``compile``: run the kernel compiled by ``torch.compile`` (eager is the default).

    One ``step`` counts the updates of the whole tree (optax's convention), so a leaf whose grad
    was ``None`` on some steps gets the tree's bias correction; the torch.optim adapter keeps
    torch's per-parameter steps instead.
    """

    # in the torch.optim adapter each param keeps its own scalar state (as torch NAdam's
    # mu_product); False: the scalar state belongs to the whole tree (a param group there)
    scalar_state_per_param = True

    def __init__(
        self,
        name: str,
        *,
        hyperparams: Mapping[str, Any],
        ranges: Mapping[str, Range],
        buffers: Sequence[str] | Mapping[str, str],
        kernel: Callable,
        step_scalars: Callable | None = None,
        scalar_state: Mapping[str, float] | None = None,
        state_dtype: torch.dtype | None = None,
        weight_decay_mask: Any = None,
        decay_hyperparams: Sequence[str] = ("weight_decay",),
        reductions: int | Mapping[Any, int] = 0,
        tile: bool = True,
        leaf_kind: Callable | None = None,
        options: Mapping[str, Any] | None = None,
        fused: bool | None = None,
        compile: bool = False,
    ):
        self.name = name
        for k, v in hyperparams.items():
            check_hyperparam(name, k, v, ranges[k])
        check_dtype_options(name, state_dtype=state_dtype)
        if weight_decay_mask is not None and "weight_decay" not in hyperparams:
            raise ValueError(f"{name}: weight_decay_mask given but {name} has no weight decay")
        if fused not in (None, True, False):
            raise TypeError(f"{name}: fused must be None, True or False, got {fused!r}")
        if fused and name not in execution.TORCH_FUSED:
            raise ValueError(f"{name}: torch has no fused kernel for this optimizer")
        if not isinstance(compile, bool):
            raise TypeError(f"{name}: compile must be a bool, got {compile!r}")
        if fused and compile:
            raise ValueError(f"{name}: fused=True and compile=True exclude each other")
        inits = dict(buffers) if isinstance(buffers, Mapping) else dict.fromkeys(buffers, "zeros")
        bad = {k: v for k, v in inits.items() if v not in BUFFER_INITS}
        if bad:
            raise ValueError(f"{name}: buffer inits must be one of {BUFFER_INITS}, got {bad}")
        self.hyperparams = dict(hyperparams)
        self.ranges = dict(ranges)
        self.buffer_inits = inits
        self.buffer_names = tuple(inits)
        self.kernel = kernel
        self.step_scalars_fn = step_scalars
        self.scalar_state = dict(scalar_state or {})
        self.state_dtype = state_dtype
        self.weight_decay_mask = weight_decay_mask
        self.decay_hyperparams = tuple(decay_hyperparams)
        self.reductions = reductions
        self.tile = tile
        self.leaf_kind = leaf_kind
        self.options = dict(options or {})
        self.fused = fused
        self.compile = compile
        self.state_spec = StateSpec(buffers={b: Buffer(init) for b, init in inits.items()},
                                    scalars=self.scalar_state)
        self._mask_cache: dict = {}

    def __repr__(self) -> str:
        args = {**self.hyperparams, **self.options}
        return f"{self.name}(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"

    # -- state ---------------------------------------------------------------------------
    def buffer_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        return buffer_dtype(param_dtype, self.state_dtype)

    def init_state(self, params: PyTree) -> State:
        leaves, _ = check_param_leaves(self.name, params,
                                       self.state_dtype if self.buffer_names else None)
        device = state_device(leaves)
        state: State = {
            "step": torch.zeros((), dtype=torch.int32, device=device),
            HPARAMS_KEY: init_hyperparams(self.hyperparams, device),
        }
        state.update(init_state_entries(self.state_spec, params, device,
                                        dtype=self.buffer_dtype))
        state[MADE_BY_KEY] = made_by(self.name)
        return state

    def state_keys(self) -> list[str]:
        """The state's top-level keys (besides ``made_by``)."""
        return ["step", HPARAMS_KEY, *self.scalar_state, *self.buffer_names]

    def check_state(self, params: PyTree, p_leaves: list, spec: optree.PyTreeSpec,
                    state: State) -> dict[str, list]:
        """The buffers' leaves, ``{name: leaves}``, after checking the state."""
        check_state_keys(self.name, state, self.state_keys(), hyperparams=self.hyperparams,
                         identified=True)
        return check_state_entries(self.name, self.state_spec, params, p_leaves, state)

    # -- update --------------------------------------------------------------------------
    def step_tree(self, params: PyTree, p_leaves: list, g_leaves: list,
                  spec: optree.PyTreeSpec, checked: dict[str, list], hp: dict[str, torch.Tensor],
                  state: State, *, donate: bool, **extra: Any) -> tuple[list, State]:
        """This step's scalars (:meth:`step_scalars`), then :meth:`step_leaves`; ``checked``
        holds the buffers' leaves."""
        step = state["step"] + 1
        scalars, new_scalar_state = self.step_scalars(
            hp, step, {k: state[k] for k in self.scalar_state})
        decay = self.decay_flags(params, p_leaves, spec)
        new_p, new_bufs = self.step_leaves(p_leaves, g_leaves, checked, scalars, step, decay,
                                           donate=donate)
        new_state: State = {"step": step, HPARAMS_KEY: hp, **new_scalar_state}
        for b in self.buffer_names:
            new_state[b] = _tree.unflatten(spec, new_bufs[b])
        return new_p, new_state

    def step_scalars(self, hp: Mapping[str, torch.Tensor], step: torch.Tensor,
                     scalar_state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        """(the kernel's scalars: ``hp`` and this step's, the new scalar state) for the update
        with 1-based index ``step``."""
        if self.step_scalars_fn is None:
            return dict(hp), {}
        extra, new = self.step_scalars_fn(hp, step, scalar_state)
        return {**hp, **extra}, new

    def step_leaves(self, p_leaves: list, g_leaves: list, bufs: dict[str, list],
                    scalars: Mapping[str, Any], step: torch.Tensor, decay: list[bool], *,
                    donate: bool, host_hp: Mapping[str, float] | None = None,
                    fused: bool | None = None) -> tuple[list, dict[str, list]]:
        """One update on flat leaf lists (``None`` = skip that leaf), ``scalars`` from
        :meth:`step_scalars`; see :func:`functim.execution.step_leaves`. Used by
        :meth:`update`, the torch.optim adapter and Muon's AdamW side."""
        return execution.step_leaves(self, p_leaves, g_leaves, bufs, scalars, step, decay,
                                     donate=donate, host_hp=host_hp, fused=fused)

    def decay_flags(self, params, p_leaves, spec) -> list[bool]:
        """Per-leaf weight-decay flags (``weight_decay_mask``), cached per tree structure."""
        return cached_decay_flags(self._mask_cache, self.weight_decay_mask, params, p_leaves,
                                  spec)

    def hyperparam_ranges(self) -> dict[str, Range]:
        return dict(self.ranges)
