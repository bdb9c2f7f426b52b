"""The state's description and its checks, shared by every family of optimizers: where the
scalar state lives, which param leaves are accepted, the state's keys, buffers shaped like the
params, and weight-decay flags. Every check runs before anything is written."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import _tree
from .hyperparams import HPARAMS_KEY

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
