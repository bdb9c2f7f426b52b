"""The state's description and its checks, shared by every family of optimizers: where the
scalar state lives, which param leaves are accepted, the state's keys, buffers shaped like the
params, and weight-decay flags. Every check runs before anything is written.

:class:`StateSpec` declares a family's per-parameter buffers, scalar state and host counters;
:func:`init_state_entries` builds those entries and :func:`check_state_entries` checks them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _tree
from .hyperparams import HPARAM_DTYPE, HPARAMS_KEY

PyTree = Any


def state_device(leaves: Sequence[Any]) -> torch.device:
    """Where the scalar state (step, hyperparameters) lives: with the first parameter."""
    for x in leaves:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def check_dtype_options(owner: str, **dtypes: Any) -> None:
    """Each dtype option (``state_dtype=...``, ``precond_dtype=...``) is None or a floating
    ``torch.dtype``; a TypeError names the option otherwise."""
    for option, dt in dtypes.items():
        if dt is not None and not (isinstance(dt, torch.dtype) and dt.is_floating_point):
            raise TypeError(f"{owner}: {option} must be a floating torch.dtype or None, "
                            f"got {dt!r}")


def check_param_leaves(owner: str, params: PyTree,
                       state_dtype: torch.dtype | None = None) -> tuple[list, Any]:
    """``_tree.flatten(params)`` after checking that every leaf is a floating tensor or None and,
    with ``state_dtype``, that the state dtype can hold every param (the update is computed in
    it, so it must be at least as precise)."""
    leaves, spec = _tree.flatten(params)
    for path, x in zip(_tree.paths(params), leaves):
        if x is None:
            continue
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            raise TypeError(f"{owner}: parameter {path!r} must be a floating-point tensor or "
                            f"None, got {_tree.describe_leaf(x)}")
        if state_dtype is not None and torch.promote_types(x.dtype, state_dtype) != state_dtype:
            raise TypeError(
                f"{owner}: state_dtype={state_dtype} cannot hold the {x.dtype} parameter "
                f"{path!r}: the update is computed in the state dtype, so it must be at least "
                "as precise as every parameter")
    return leaves, spec


# The key under which an optimizer's state records which optimizer made it, as
# ``{"made_by": {name: {}}}``: an empty dict holds no tensor, so the state stays a tree of tensors
# for vmap, torch.compile and checkpoints. A state without it (made before it existed) is
# accepted on its keys alone.
MADE_BY_KEY = "made_by"


def made_by(name: str) -> dict:
    """The ``state["made_by"]`` entry of a state made by the optimizer named ``name``."""
    return {name: {}}


def carry_made_by(old: Mapping, new: dict) -> dict:
    """``new`` (the next state) with ``old``'s ``made_by`` entry, where it has one."""
    if MADE_BY_KEY in old:
        new[MADE_BY_KEY] = old[MADE_BY_KEY]
    return new


def _check_made_by(owner: str, state: Mapping) -> None:
    marker = state[MADE_BY_KEY]
    if isinstance(marker, Mapping) and list(marker) == [owner] and marker[owner] == {}:
        return
    maker = next(iter(marker)) if isinstance(marker, Mapping) and len(marker) == 1 else marker
    raise ValueError(f"{owner}: this state was not made by {owner}.init_state but by "
                     f"{maker!r}'s (states of optimizers with the same buffers are not "
                     "interchangeable: their maths differ)")


def check_state_keys(owner: str, state: Any, expected: Sequence[str],
                     hyperparams: Sequence[str] | None = None, *,
                     identified: bool = False) -> None:
    """The state's top-level keys are ``expected`` (and, when ``hyperparams`` is given,
    ``state["hyperparams"]`` has exactly those names); raises naming what differs.
    ``identified``: the state may also hold ``made_by`` (see :data:`MADE_BY_KEY`), which must
    then name ``owner``."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{owner}: state must be a dict made by {owner}.init_state, got "
                        f"{type(state).__name__}")
    got, want = set(state), set(expected)
    if identified:
        got.discard(MADE_BY_KEY)
    if got != want:
        raise ValueError(
            f"{owner}: this state was not made by {owner}.init_state (or by another "
            f"configuration of it): expected keys {sorted(want)}, got {sorted(got)}"
        )
    if identified and MADE_BY_KEY in state:
        _check_made_by(owner, state)
    if hyperparams is not None:
        stored = state[HPARAMS_KEY]
        if not isinstance(stored, Mapping) or set(stored) != set(hyperparams):
            got = sorted(stored) if isinstance(stored, Mapping) else stored
            raise ValueError(f"{owner}: state['{HPARAMS_KEY}'] must have "
                             f"{sorted(hyperparams)}, got {got}")


def cached_decay_flags(cache: dict, mask: Any, params: PyTree, leaves: list, spec) -> list[bool]:
    """:func:`decay_flags`, memoised in ``cache`` per tree structure and shapes."""
    if mask is None:
        return [True] * len(leaves)
    key = (spec, tuple(None if x is None else tuple(x.shape) for x in leaves))
    flags = cache.get(key)
    if flags is None:
        flags = cache[key] = decay_flags(mask, params, leaves, spec)
    return flags


def buffer_leaves(owner: str, params: PyTree, tree: Any, name: str) -> list:
    """The leaves of the state buffer ``tree`` (``state[name]``), which must have the params'
    structure; raises a ValueError naming the buffer otherwise."""
    try:
        _, leaves, _ = _tree.check_same_structure(params, tree, ref_name="params",
                                                  other_name=f"state[{name!r}]")
    except ValueError as e:
        raise ValueError(f"{owner}: {e} (was the state made for other params?)") from None
    return leaves


def decay_flags(mask: Any, params: PyTree, leaves: list, spec) -> list[bool]:
    """Per-leaf weight-decay flags from a mask: None (every leaf decays), a pytree of bools shaped
    like params, or a callable ``(path, leaf) -> bool``."""
    if mask is None:
        return [True] * len(leaves)
    if callable(mask):
        return [x is not None and bool(mask(p, x)) for p, x in zip(_tree.paths(params), leaves)]
    _, flags, _ = _tree.check_same_structure(params, mask, ref_name="params",
                                             other_name="weight_decay_mask")
    return [bool(f) for f in flags]


# how a buffer starts: zeros, or a copy of its param (Schedule-Free's z)
BUFFER_INITS = ("zeros", "param")
COUNTER_DTYPE = torch.int64


@dataclass(frozen=True)
class Buffer:
    """A per-parameter buffer: how it starts (``"zeros"`` or ``"param"``, a copy of the param)
    and the route labels that own it (None: every param; a leaf of another label holds None)."""

    init: str = "zeros"
    owners: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.init not in BUFFER_INITS:
            raise ValueError(f"buffer init must be one of {BUFFER_INITS}, got {self.init!r}")
        if self.owners is not None:
            object.__setattr__(self, "owners", tuple(self.owners))


@dataclass(frozen=True)
class StateSpec:
    """The declared part of an optimizer's state, entries in this order:

    - ``scalars``: ``{name: initial float}``, float64 0-d tensors with the scalar state;
    - ``counters``: ``{name: initial int}``, int64 0-d tensors on the CPU, read on the host;
      with ``counters_on_cpu`` (why they are read there) a state must keep them on the CPU;
    - ``buffers``: ``{name: Buffer}``, trees shaped like the params, created in
      ``memory_format``.
    """

    buffers: Mapping[str, Buffer] = field(default_factory=dict)
    scalars: Mapping[str, float] = field(default_factory=dict)
    counters: Mapping[str, int] = field(default_factory=dict)
    memory_format: torch.memory_format = torch.preserve_format
    counters_on_cpu: str | None = None

    def __post_init__(self) -> None:
        for name in ("buffers", "scalars", "counters"):
            object.__setattr__(self, name, dict(getattr(self, name)))

    @property
    def keys(self) -> tuple[str, ...]:
        """The entries' keys: scalars, counters, buffers."""
        return (*self.scalars, *self.counters, *self.buffers)


def _new_buffer(buf: Buffer, p: torch.Tensor, dtype: torch.dtype,
                memory_format: torch.memory_format) -> torch.Tensor:
    if buf.init == "param":
        b = torch.clone(p, memory_format=memory_format)
        return b if b.dtype == dtype else b.to(dtype)
    # zeros_like: a DTensor param (an FSDP2 shard) gets a DTensor buffer
    return torch.zeros_like(p, dtype=dtype, memory_format=memory_format)


def init_state_entries(spec: StateSpec, params: PyTree, device: torch.device, *,
                       dtype: Callable[[torch.dtype], torch.dtype],
                       labels: Sequence[str | None] | None = None) -> dict[str, Any]:
    """The entries ``spec`` declares for ``params``, in :attr:`StateSpec.keys` order: scalars
    on ``device``, counters on the CPU, buffers of dtype ``dtype(param dtype)`` (``None`` where
    ``labels[i]``, leaf ``i``'s route label, does not own the buffer)."""
    entries: dict[str, Any] = {
        k: torch.tensor(v, dtype=HPARAM_DTYPE, device=device) for k, v in spec.scalars.items()}
    for k, v in spec.counters.items():
        entries[k] = torch.tensor(v, dtype=COUNTER_DTYPE)
    leaves, tree = _tree.flatten(params)
    for name, buf in spec.buffers.items():
        entries[name] = _tree.unflatten(tree, [
            None if x is None or (buf.owners is not None and labels[i] not in buf.owners)
            else _new_buffer(buf, x, dtype(x.dtype), spec.memory_format)
            for i, x in enumerate(leaves)])
    return entries


def _check_counter(owner: str, spec: StateSpec, name: str, v: Any) -> None:
    ok = isinstance(v, torch.Tensor) and v.ndim == 0 and not v.is_floating_point()
    if spec.counters_on_cpu is None:
        if not ok:
            raise ValueError(f"{owner}: state[{name!r}] must be a 0-d integer tensor, got "
                             f"{_tree.describe_leaf(v)}")
    elif not (ok and v.device.type == "cpu"):
        raise ValueError(
            f"{owner}: state[{name!r}] must be a 0-d integer tensor on the CPU "
            f"({spec.counters_on_cpu}), got {_tree.describe_leaf(v)}"
            + (f" on {v.device}" if isinstance(v, torch.Tensor) else ""))


def check_state_entries(owner: str, spec: StateSpec, params: PyTree, p_leaves: list,
                        state: Mapping, *, labels: Sequence[str | None] | None = None
                        ) -> dict[str, list]:
    """The buffers' leaves, ``{name: leaves}``, after checking the entries ``spec`` declares
    (the keys are :func:`check_state_keys`'s): scalars are 0-d floating tensors, counters 0-d
    integer tensors, buffers shaped like the params (None for a leaf whose label in
    ``labels`` does not own them)."""
    for k in spec.scalars:
        s = state[k]
        if not isinstance(s, torch.Tensor) or s.ndim != 0 or not s.is_floating_point():
            raise ValueError(f"{owner}: state[{k!r}] must be a 0-d floating tensor, "
                             f"got {_tree.describe_leaf(s)}")
    for k in spec.counters:
        _check_counter(owner, spec, k, state[k])
    bufs = {}
    for b, buf in spec.buffers.items():
        leaves = buffer_leaves(owner, params, state[b], b)
        for i, (p, s) in enumerate(zip(p_leaves, leaves)):
            if p is None:
                continue
            if buf.owners is None or labels[i] in buf.owners:
                _tree.check_like_param(owner, f"state[{b!r}]", params, i, p, s)
            elif s is not None:
                raise ValueError(f"{owner}: state[{b!r}] at "
                                 f"{_tree.leaf_paths_on_error(params, i)!r} is "
                                 f"{_tree.describe_leaf(s)}, expected None (a "
                                 f"{labels[i]!r} parameter has no {b!r})")
        bufs[b] = leaves
    return bufs
