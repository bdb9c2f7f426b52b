"""Shared test configuration: hypothesis profiles and pytree helpers.

Profiles: "ci" (derandomized, bounded, used when the CI environment variable is set) and "dev"
(randomized, a few more examples). Select another with ``--hypothesis-profile``.
"""

from __future__ import annotations

import os
from typing import Any

import optree
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

FLOAT_DTYPES = (torch.float32, torch.float64)


# -- pytree helpers (None leaves are kept as leaves, like functim) ------------------------------
def leaves(tree: Any) -> list:
    return optree.tree_leaves(tree, none_is_leaf=True)


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    """The non-None leaves, in flatten order."""
    return [x for x in leaves(tree) if x is not None]


def tree_map(fn, tree: Any, *rest: Any) -> Any:
    """``fn`` over leaves; ``None`` leaves of ``tree`` stay ``None``."""
    return optree.tree_map(
        lambda x, *r: None if x is None else fn(x, *r), tree, *rest, none_is_leaf=True
    )


def clone_tree(tree: Any) -> Any:
    """A deep copy of every tensor (non-tensor leaves are kept)."""
    return optree.tree_map(
        lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree, none_is_leaf=True
    )


def assert_trees_equal(a: Any, b: Any) -> None:
    """Same structure, and every tensor leaf bitwise equal (dtype and shape included)."""
    la, sa = optree.tree_flatten(a, none_is_leaf=True)
    lb, sb = optree.tree_flatten(b, none_is_leaf=True)
    assert sa == sb, f"tree structures differ: {sa} vs {sb}"
    paths = optree.tree_paths(a, none_is_leaf=True)
    for path, x, y in zip(paths, la, lb):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor), f"{path}: {type(y)}"
            assert x.dtype == y.dtype and x.shape == y.shape, f"{path}: {x.dtype} vs {y.dtype}"
            # equal_nan: a NaN in the same place is the same bits for our purposes
            same = torch.equal(x, y) or bool(
                torch.all((x == y) | (torch.isnan(x) & torch.isnan(y)))
            )
            assert same, f"{path}: max abs diff {(x - y).abs().max().item()}"
        else:
            assert x == y, f"{path}: {x!r} vs {y!r}"


def random_like_tree(tree: Any, gen: torch.Generator) -> Any:
    """A tree of standard-normal tensors shaped like ``tree`` (None leaves stay None)."""
    return tree_map(
        lambda p: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype), tree
    )


def _build(kind: str, xs: list) -> Any:
    if kind == "dict":
        return {f"p{i}": x for i, x in enumerate(xs)}
    if kind == "list":
        return list(xs)
    if kind == "tuple":
        return tuple(xs)
    # nested: {"a": {"w": x0, "b": x1}, "c": [x2, (x3,)]} -style
    half = (len(xs) + 1) // 2
    out: dict[str, Any] = {"block": {f"w{i}": x for i, x in enumerate(xs[:half])}}
    rest = xs[half:]
    if rest:
        out["head"] = [rest[0], tuple(rest[1:])]
    return out


@st.composite
def pytrees(
    draw,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    allow_none: bool = True,
    min_leaves: int = 1,
    max_leaves: int = 4,
) -> Any:
    """A pytree (dict, nested dict/list/tuple, list or tuple) of 1-4 tensors of one dtype, each
    with 0-3 dims of size 1-5, values N(0, 1); occasionally one leaf is None (then at least one
    tensor remains)."""
    n = draw(st.integers(min_leaves, max_leaves))
    dtype = draw(st.sampled_from(dtypes))
    shapes = [tuple(draw(st.lists(st.integers(1, 5), max_size=3))) for _ in range(n)]
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    xs: list = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    if allow_none and n > 1 and draw(st.integers(0, 3)) == 0:
        xs[draw(st.integers(0, n - 1))] = None
    kind = draw(st.sampled_from(["dict", "nested", "list", "tuple"]))
    return _build(kind, xs)


def tree_dtype(tree: Any) -> torch.dtype:
    return tensor_leaves(tree)[0].dtype
