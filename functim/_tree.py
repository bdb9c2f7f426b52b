"""Pytree walks shared by every optimizer and combinator (the only place that flattens trees).

Conventions:
- a *params tree* is any optree pytree of tensors; ``None`` leaves are allowed (frozen or absent
  parameters) and are kept as leaves (``none_is_leaf=True``) so that every per-parameter buffer tree
  has exactly the structure of the params tree;
- a leaf's *path* is its keys joined with dots: ``{"blocks": [{"w": t}]}`` gives ``"blocks.0.w"``,
  and a flat dict of FQNs from ``model.named_parameters()`` gives the FQNs themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optree
import torch

from .runtime import is_dtensor

PyTree = Any

_NONE_IS_LEAF = True


def flatten(tree: PyTree) -> tuple[list[Any], optree.PyTreeSpec]:
    """Leaves (``None`` kept as a leaf) and the tree structure."""
    return optree.tree_flatten(tree, none_is_leaf=_NONE_IS_LEAF)


def unflatten(spec: optree.PyTreeSpec, leaves: Sequence[Any]) -> PyTree:
    return optree.tree_unflatten(spec, list(leaves))


def structure(tree: PyTree) -> optree.PyTreeSpec:
    return optree.tree_structure(tree, none_is_leaf=_NONE_IS_LEAF)


def path_str(keys: Sequence[Any]) -> str:
    return ".".join(str(k) for k in keys)


def paths(tree: PyTree) -> list[str]:
    """Dotted path of every leaf, in flatten order."""
    return [path_str(p) for p in optree.tree_paths(tree, none_is_leaf=_NONE_IS_LEAF)]


def map_tree(fn, tree: PyTree, *rest: PyTree) -> PyTree:
    """``fn`` over leaves; ``None`` leaves of ``tree`` stay ``None`` (``fn`` is not called)."""
    return optree.tree_map(
        lambda x, *r: None if x is None else fn(x, *r), tree, *rest, none_is_leaf=_NONE_IS_LEAF
    )


def map_leaves(fn, tree: PyTree, *rest: PyTree) -> PyTree:
    """``fn`` over every leaf, ``None`` leaves included."""
    return optree.tree_map(fn, tree, *rest, none_is_leaf=_NONE_IS_LEAF)


def describe_leaf(x: Any) -> str:
    if x is None:
        return "None"
    if isinstance(x, torch.Tensor):
        return f"tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    return type(x).__name__


def check_same_structure(
    reference: PyTree, other: PyTree, *, ref_name: str, other_name: str
) -> tuple[list[Any], list[Any], optree.PyTreeSpec]:
    """Flatten two trees that must have the same structure; raise a ValueError naming the first
    differing path otherwise. Returns (reference leaves, other leaves, spec)."""
    ref_leaves, ref_spec = flatten(reference)
    other_leaves, other_spec = flatten(other)
    if ref_spec != other_spec:
        ref_paths, other_paths = paths(reference), paths(other)
        missing = [p for p in ref_paths if p not in set(other_paths)]
        extra = [p for p in other_paths if p not in set(ref_paths)]
        detail = []
        if missing:
            detail.append(f"missing from {other_name}: {missing[:5]}")
        if extra:
            detail.append(f"not in {ref_name}: {extra[:5]}")
        if not detail:
            where = _first_container_difference(reference, other)
            detail.append(f"at {where!r}: " if where is not None else "")
            detail[-1] += f"{ref_name} is {ref_spec}, {other_name} is {other_spec}"
        raise ValueError(
            f"{other_name} must have the same tree structure as {ref_name}; " + "; ".join(detail)
        )
    return ref_leaves, other_leaves, ref_spec


def check_grads(owner: str, params: PyTree, grads: PyTree, *,
                donate: bool = False) -> tuple[list, list, optree.PyTreeSpec]:
    """Grads must have the params' structure, a floating tensor of the param's shape and device
    (or None) at every leaf, and None where the param is None. With ``donate`` (the params will
    be written in place), every param that gets a grad must own its memory: no two of its
    elements may share one (an ``expand()``ed tensor). Returns (param leaves, grad leaves,
    spec)."""
    p_leaves, g_leaves, spec = check_same_structure(
        params, grads, ref_name="params", other_name="grads")
    for i, (p, g) in enumerate(zip(p_leaves, g_leaves)):
        if g is None:
            continue
        if p is None or not isinstance(g, torch.Tensor) or g.shape != p.shape:
            raise ValueError(
                f"{owner}: grad at {leaf_paths_on_error(params, i)!r} is {describe_leaf(g)}, "
                "expected " + ("None (the param is None)" if p is None else
                               f"a tensor of shape {tuple(p.shape)} or None"))
        if not g.is_floating_point():
            raise TypeError(f"{owner}: grad at {leaf_paths_on_error(params, i)!r} must be "
                            f"floating point, got {g.dtype}")
        if g.device != p.device:
            raise ValueError(f"{owner}: grad at {leaf_paths_on_error(params, i)!r} is on "
                             f"{g.device}, expected {p.device} like the param")
        if donate and not p.is_contiguous() and torch._debug_has_internal_overlap(p) == 1:
            raise ValueError(
                f"{owner}: param at {leaf_paths_on_error(params, i)!r} has elements that overlap "
                "in memory (e.g. made by expand()), so it cannot be updated in place; give it "
                "memory of its own (.clone()) or update it out of place (donate=False)")
    if donate:
        _check_no_aliases(owner, params, p_leaves, g_leaves)
    return p_leaves, g_leaves, spec


def _check_no_aliases(owner: str, params: PyTree, p_leaves: list, g_leaves: list) -> None:
    """No two updated params are the same memory (one tensor under two names, or two views of
    the same elements): an in-place update would apply both leaves' updates to it. (Out of place,
    leaves are independent: each name gets its own new tensor.)"""
    seen: dict[tuple, int] = {}
    for i, (p, g) in enumerate(zip(p_leaves, g_leaves)):
        if p is None or g is None:
            continue
        if is_dtensor(p):  # (a DTensor's own data_ptr says nothing: its shard's does)
            p = p.to_local()
        if p.numel() == 0:
            continue
        where = (p.device, p.data_ptr(), tuple(p.shape), p.stride())
        j = seen.setdefault(where, i)
        if j != i:
            raise ValueError(
                f"{owner}: params {leaf_paths_on_error(params, j)!r} and "
                f"{leaf_paths_on_error(params, i)!r} are the same tensor, so an in-place update "
                "(donate=True) would apply both updates to it; pass it once, or update out of "
                "place (donate=False: each name then gets its own new tensor)")


def check_like_param(owner: str, what: str, params: PyTree, index: int, p: torch.Tensor,
                     x: Any) -> None:
    """``x`` (``what`` of leaf ``index``, e.g. ``"state['exp_avg']"``) is a tensor with the
    shape and device of its param ``p``; a ValueError naming the leaf's path otherwise."""
    if not isinstance(x, torch.Tensor) or x.shape != p.shape:
        raise ValueError(f"{owner}: {what} at {leaf_paths_on_error(params, index)!r} is "
                         f"{describe_leaf(x)}, expected shape {tuple(p.shape)} like the param")
    if x.device != p.device:
        raise ValueError(f"{owner}: {what} at {leaf_paths_on_error(params, index)!r} is on "
                         f"{x.device}, expected {p.device} like the param")


def _first_container_difference(a: PyTree, b: PyTree, prefix: str = "") -> str | None:
    """The dotted path of the first node whose container type or keys differ."""
    spec_a = optree.tree_structure(a, none_is_leaf=_NONE_IS_LEAF)
    spec_b = optree.tree_structure(b, none_is_leaf=_NONE_IS_LEAF)
    if spec_a == spec_b:
        return None
    if spec_a.is_leaf() or spec_b.is_leaf() or spec_a.type != spec_b.type \
            or spec_a.num_children != spec_b.num_children:
        return prefix or "<root>"
    keys = spec_a.entries()
    if keys != spec_b.entries():
        return prefix or "<root>"
    for k, ca, cb in zip(keys, optree.tree_flatten_one_level(a, none_is_leaf=True)[0],
                         optree.tree_flatten_one_level(b, none_is_leaf=True)[0]):
        found = _first_container_difference(ca, cb, f"{prefix}.{k}" if prefix else str(k))
        if found is not None:
            return found
    return prefix or "<root>"


def leaf_paths_on_error(tree: PyTree, index: int) -> str:
    """The dotted path of leaf ``index`` (computed only when an error is being raised)."""
    p = paths(tree)
    return p[index] if index < len(p) else f"<leaf {index}>"
