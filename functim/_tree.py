"""Pytree walks shared by every optimizer and combinator (the only place that flattens trees).

Conventions (see design.md §2):
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
            detail.append(f"{ref_name} is {ref_spec}, {other_name} is {other_spec}")
        raise ValueError(
            f"{other_name} must have the same tree structure as {ref_name}; " + "; ".join(detail)
        )
    return ref_leaves, other_leaves, ref_spec


def leaf_paths_on_error(tree: PyTree, index: int) -> str:
    """The dotted path of leaf ``index`` (computed only when an error is being raised)."""
    p = paths(tree)
    return p[index] if index < len(p) else f"<leaf {index}>"
