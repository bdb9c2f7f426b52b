"""Where a step runs: the run-context questions every execution path asks (inside a
``torch.func`` transform? recorded by autograd? under ``torch.compile``? on DTensors?) and the
DTensor-aware helpers that go with them. No maths lives here."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype


def under_torch_func() -> bool:
    """True exactly when running inside a torch.func transform (vmap, grad, jvp, ...).

    Under ``torch.compile`` this is always False: dynamo does not answer
    ``peek_interpreter_stack()`` faithfully (it reads as non-None even outside any transform),
    and a compiled update must take the foreach path so that the graph updates donated buffers
    in place instead of allocating a second copy of params and state. So ``torch.compile`` of a
    function that calls ``torch.func.vmap``/``grad`` over a functim update is not supported
    (foreach ops have no batching rule); run such transforms eagerly.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None


def is_dtensor(x: object) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 shard, say). Does not
    import ``torch.distributed.tensor``: if nothing imported it, no DTensor can exist."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def has_dtensor(xs: Sequence) -> bool:
    """Whether any element of ``xs`` is a DTensor (see :func:`is_dtensor`). Checks the set of
    types (built at C speed), so the non-distributed hot path pays microseconds per step."""
    mod = sys.modules.get("torch.distributed.tensor")
    if mod is None:
        return False
    dt = mod.DTensor
    return any(issubclass(t, dt) for t in set(map(type, xs)))


def foreach_copy_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every ``i``: one ``torch._foreach_copy_`` for plain tensors, a
    loop of ``copy_`` for DTensors (torch 2.13 has no DTensor sharding strategy for
    ``_foreach_copy_``)."""
    if has_dtensor(dst):
        for d, s in zip(dst, src):
            d.copy_(s)
    else:
        torch._foreach_copy_(dst, src)


def replicate_partials(xs: list) -> list:
    """DTensor reductions (``_foreach_norm`` of FSDP2 shards) come back ``Partial``: each rank
    holds a piece, reduced lazily. In-place ops on them fail ("in-place operations that require
    placement changes are not supported"), so make them ``Replicate`` right away: one collective
    per (mesh, placements) group of leaves, through DTensor's own redistribution."""
    from torch.distributed.tensor import Partial, Replicate

    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        if is_dtensor(x) and any(isinstance(p, Partial) for p in x.placements):
            groups.setdefault((x.device_mesh, x.placements), []).append(i)
    out = list(xs)
    for (mesh, _), idx in groups.items():
        rep = [Replicate()] * mesh.ndim
        if len(idx) == 1:
            out[idx[0]] = xs[idx[0]].redistribute(mesh, rep)
        else:
            for i, r in zip(idx, torch.stack([xs[i] for i in idx]).redistribute(mesh, rep)):
                out[i] = r
    return out


def needs_per_tensor(*lists: Sequence[torch.Tensor], scalars: Sequence = ()) -> bool:
    """Whether the foreach path must be avoided: inside torch.func, or when autograd records."""
    if under_torch_func():
        return True
    if not torch.is_grad_enabled():
        return False
    for t in scalars:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return any(t.requires_grad for lst in lists for t in lst)


@torch.library.custom_op("functim::materialize", mutates_args=())
def _materialize(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x``. To inductor an opaque op, so its input and output are real buffers."""
    return x.clone()


@_materialize.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


_materialize.register_autograd(lambda ctx, grad: grad)


def compiled_scalars(a):
    """Under ``torch.compile``: a 0-d tensor scalar (or a list of per-leaf 0-d scalars) computed
    once per step into a buffer that the fused elementwise kernel only loads. Inductor otherwise
    inlines a scalar's whole expression (``−η/(1 − β1^t)``: a ``pow`` and a division in float64)
    into the kernel's inner loop, where it is evaluated again for every vector of elements; for
    AdamW that recomputation cost more than the memory traffic. Eager: ``a`` unchanged."""
    if not torch.compiler.is_compiling():
        return a
    if isinstance(a, torch.Tensor) and a.ndim == 0:
        return _materialize(a)
    if isinstance(a, list) and a and all(isinstance(t, torch.Tensor) and t.ndim == 0
                                          for t in a):
        if all(t is a[0] for t in a):
            return [_materialize(a[0])] * len(a)
        return list(_materialize(torch.stack(a)).unbind())
    return a


def group_by_device_and_dtype(
    lists: Sequence[Sequence[torch.Tensor | None]],
) -> list[tuple[tuple[torch.device, torch.dtype], list[list], list[int]]]:
    """Split parallel lists into runs with the same (device, dtype) as the first list.

    Returns ``[(key, [sublist per input list], indices into the original lists)]``. DTensors
    (FSDP2 shards) and plain tensors of one (device, dtype) go to separate runs with the same key
    (a foreach op cannot mix them).
    """
    if not lists or not lists[0]:
        return []
    first = lists[0]
    key0 = (first[0].device, first[0].dtype)
    if all((t.device, t.dtype) == key0 for t in first):
        grouped = [(key0, [list(lst) for lst in lists], list(range(len(first))))]
    else:
        grouped = [(key, sub, idx) for key, (sub, idx) in _group_tensors_by_device_and_dtype(
            [list(lst) for lst in lists], with_indices=True).items()]
    if not has_dtensor(first):
        return grouped
    out = []
    for key, sub, idx in grouped:
        flags = [is_dtensor(t) for t in sub[0]]
        for want in (True, False):
            js = [j for j, f in enumerate(flags) if f is want]
            if len(js) == len(flags):
                out.append((key, sub, idx))
            elif js:
                out.append((key, [[lst[j] for j in js] for lst in sub], [idx[j] for j in js]))
    return out
