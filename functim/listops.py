"""List operations: elementwise maths on lists of same-device, same-dtype tensors.

Every optimizer's kernel is written against :class:`ListOps`, as its update rule reads
(``ops.lerp(m, g, 1 − β1)``, ``ops.sqrt(v)``, ...). How the ops execute is chosen by
:mod:`functim.execution` when it builds the ``ListOps`` for a step, never by the kernel:

- multi-tensor (default): ``torch._foreach_*`` kernels, like torch.optim's foreach paths;
- per tensor (``per_tensor=True``): a loop of ordinary out-of-place ops, for ``torch.func``
  transforms (no foreach op has a vmap batching rule) and for a step recorded by autograd;
- scalars on the host (``host_scalars=True``): a tensor scalar in CPU memory, read as a Python
  float where an op takes one (a memory load, not a device sync);
- results into a scratch pool (``scratch=``, :mod:`functim.tiling` only).

Each op takes ``inplace``: True overwrites the first list (and returns it), False returns a new
list and leaves its inputs untouched. A kernel passes its own ``inplace`` (the caller donated
params and state) for ops on params and state, and ``inplace=True`` only on temporaries it made.

Scalars may be Python floats, 0-d tensors, or lists of per-leaf 0-d tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from .runtime import (
    compiled_scalars,
    foreach_copy_,
    is_dtensor,
    replicate_partials,
    under_torch_func,
)

Scalar = Union[float, torch.Tensor]
TensorList = list[torch.Tensor]

# foreach ops whose out-of-place form has no DTensor sharding strategy (their in-place form has)
_NO_DTENSOR_OUT_OF_PLACE = frozenset({"addcdiv"})
# ops whose last scalar (``value``, a Python float) is keyword-only in their per-tensor torch form
_VALUE_LAST = frozenset({"addcdiv", "addcmul"})


def _cast_scalars(a, dtype):
    """Cast a 0-d tensor scalar, or a list of per-leaf 0-d scalars, to ``dtype``."""
    if isinstance(a, torch.Tensor):
        return a.to(dtype) if a.dtype != dtype else a
    if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) and a[0].ndim == 0 \
            and a[0].dtype != dtype:
        if all(t is a[0] for t in a):  # one scalar broadcast to every leaf: cast it once
            return [a[0].to(dtype)] * len(a)
        return [t.to(dtype) for t in a]
    return a


def _as_tensor(s, like: torch.Tensor) -> torch.Tensor:
    """A float or 0-d tensor scalar as a 0-d tensor of ``like``'s dtype and device."""
    if isinstance(s, torch.Tensor):
        return s.to(device=like.device, dtype=like.dtype)
    return torch.tensor(s, dtype=like.dtype, device=like.device)


def _per_elem(args, i):
    return [a[i] if isinstance(a, (list, tuple)) else a for a in args]


def _per_tensor_call(name: str, x: torch.Tensor, elem: list, **out) -> torch.Tensor:
    """``torch.<name>(x, *elem)``, the trailing Python-float ``value`` of ``addcdiv``/``addcmul``
    passed by keyword (it is keyword-only there)."""
    fn = getattr(torch, name)
    if name in _VALUE_LAST and len(elem) == 3 and isinstance(elem[2], float):
        return fn(x, *elem[:2], value=elem[2], **out)
    return fn(x, *elem, **out)


# elements per chunk of a chunked norm (a divisor of functim.tiling.TILE_NUMEL)
NORM_CHUNK = 1 << 15


# -- chunked norms (eager CPU; see ListOps.norm) ------------------------------------------------
def chunked_norms_apply(xs: Sequence[torch.Tensor], ord: float,
                        dtype: torch.dtype | None = None) -> bool:
    """Whether per-leaf norms of ``xs`` (of ``dtype`` if given: the dtype the normed values
    will have) are taken chunk by chunk: eager CPU, contiguous float32, ``ord`` 1 or 2, leaves
    larger than a chunk on average. There ``_foreach_norm(dtype=float64)`` would first copy
    every leaf to float64 (dearer than the norm itself); float32 chunk norms combined in float64
    keep counts exact (a chunk's sum is below 2^24) and an L2 norm within a few float32 ulps of
    the float64 one."""
    if ord not in (1, 2) or is_dtensor(xs[0]) or torch.compiler.is_compiling():
        return False
    if xs[0].device.type != "cpu":  # the float64 copy is a CPU cost; elsewhere one fused kernel
        return False
    if (dtype or xs[0].dtype) != torch.float32:  # (a bfloat16 chunk norm would round to 8 bits)
        return False
    if sum(x.numel() for x in xs) <= NORM_CHUNK * len(xs):
        return False  # small leaves: the float64 copies are cheap
    return all(x.is_contiguous() for x in xs)


def _rows_norm(x: torch.Tensor, ord: float, dim: int | None) -> torch.Tensor:
    """``vector_norm(x, ord, dim)`` of an ``|x|`` already taken for ``ord=1``: the sum (torch's
    CPU L1 norm has no vectorised loop and runs several times slower than ``abs`` + ``sum``)."""
    if ord == 1:
        return x.sum() if dim is None else x.sum(dim)
    return torch.linalg.vector_norm(x, ord, dim=dim)


def chunk_norms(xs: Sequence[torch.Tensor], ord: float,
                owners: Sequence[int] | None = None, *,
                nonnegative: bool = False) -> tuple[torch.Tensor, list[int]]:
    """The float32 norms of the :data:`NORM_CHUNK`-element chunks of every (contiguous)
    ``xs[i]``, in order, and the owner of each chunk (``owners[i]``, default ``i``).
    ``nonnegative``: no element of ``xs`` is negative, so for ``ord=1`` no ``|x|``.

    The whole chunks of a leaf are reduced as the rows of one matrix (one call, each row by the
    same serial loop); a one-row matrix is given a second, repeated row, since a single-output
    reduction may split its elements across threads and round differently. The remainder is its
    own chunk (shorter than torch's parallel grain, so serial too). So a chunk's norm does not
    depend on which other chunks it was computed with: a leaf cut into tiles at chunk boundaries
    gets bitwise its whole-leaf chunk norms."""
    parts: list[torch.Tensor] = []
    chunk_owner: list[int] = []
    for i, x in enumerate(xs):
        owner = i if owners is None else owners[i]
        flat = x.view(-1)
        if ord == 1 and not nonnegative:
            flat = flat.abs()
        rows = flat.numel() // NORM_CHUNK
        if rows:
            block = flat[:rows * NORM_CHUNK].view(rows, NORM_CHUNK)
            if rows == 1:
                block = block.expand(2, NORM_CHUNK)
            parts.append(_rows_norm(block, ord, 1)[:rows])
            chunk_owner.extend([owner] * rows)
        if flat.numel() > rows * NORM_CHUNK or not rows:
            parts.append(_rows_norm(flat[rows * NORM_CHUNK:], ord, None).view(1))
            chunk_owner.append(owner)
    return torch.cat(parts), chunk_owner


def combine_norms(partial: torch.Tensor, owner: Sequence[int], n: int,
                  ord: float) -> list[torch.Tensor]:
    """Per-owner norms (``n`` float64 0-d tensors) from chunk norms: ``Σ r`` for ``ord=1``,
    ``sqrt(Σ r²)`` for ``ord=2``, accumulated in float64 in chunk order."""
    partial = partial.to(torch.float64)
    if ord == 2:
        partial = partial * partial
    index = torch.tensor(owner, device=partial.device, dtype=torch.long)
    total = torch.zeros(n, dtype=torch.float64, device=partial.device)
    total.index_add_(0, index, partial)
    if ord == 2:
        total = total.sqrt()
    return list(total.unbind())


def chunked_norms(xs: Sequence[torch.Tensor], ord: float, *,
                  nonnegative: bool = False) -> list[torch.Tensor]:
    """Per-leaf float64 norms of whole leaves, chunk by chunk (see :func:`chunked_norms_apply`)."""
    return combine_norms(*chunk_norms(xs, ord, nonnegative=nonnegative), len(xs), ord)


class ListOps:
    """Elementwise ops on lists of same-device, same-dtype tensors (see the module docstring).

    ``per_tensor``: a loop of out-of-place torch ops instead of foreach kernels.
    ``host_scalars``: tensor scalars are in CPU memory and may be read as floats (eager only).
    ``scratch``: new results of large leaves are written into tensors of this pool (see
    :class:`functim.tiling.ScratchPool`).
    """

    def __init__(self, per_tensor: bool, *, host_scalars: bool = False, scratch=None):
        self.per_tensor = per_tensor
        self.host_scalars = host_scalars and not per_tensor
        self.scratch = None if per_tensor else scratch

    # -- execution -----------------------------------------------------------------------
    def _run(self, name: str, xs: TensorList, *args, inplace: bool = False,
             **kwargs) -> TensorList:
        if not xs:
            return xs
        # a float64 0-d hyperparameter (or per-leaf scalar) must not promote a 0-d leaf
        dtype = xs[0].dtype
        args = tuple(_cast_scalars(a, dtype) for a in args)
        if self.per_tensor:
            return [_per_tensor_call(name, x, _per_elem(args, i), **kwargs)
                    for i, x in enumerate(xs)]
        if xs[0].device.type == "cpu" and not is_dtensor(xs[0]):
            # one 0-d tensor for every leaf, as a list: torch's CPU _foreach_mul_(xs, tensor)
            # runs several times slower than _foreach_mul_(xs, [tensor, ...])
            args = tuple([a] * len(xs) if isinstance(a, torch.Tensor) else a for a in args)
        if inplace:
            getattr(torch, f"_foreach_{name}_")(xs, *map(compiled_scalars, args), **kwargs)
            return xs
        if self.scratch is not None and self.scratch.applies(xs):
            target = self.scratch.take(xs)
            for i, (x, o) in enumerate(zip(xs, target)):
                _per_tensor_call(name, x, _per_elem(args, i), out=o, **kwargs)
            return target
        if name in _NO_DTENSOR_OUT_OF_PLACE and is_dtensor(xs[0]):
            # DTensor (torch 2.13) has a sharding strategy for _foreach_addcdiv_ but none for the
            # out-of-place _foreach_addcdiv: the same maths, in place on a copy
            xs = [x.clone() for x in xs]
            getattr(torch, f"_foreach_{name}_")(xs, *args)
            return xs
        return list(getattr(torch, f"_foreach_{name}")(xs, *map(compiled_scalars, args),
                                                        **kwargs))

    def _on_host(self, scale, n: int) -> list[float] | None:
        """``scale`` (a float, a 0-d tensor or ``n`` per-leaf ones) as ``n`` Python floats
        where this ListOps may read scalars on the host; else None."""
        if isinstance(scale, (int, float)):
            return [float(scale)] * n
        if not self.host_scalars or self.per_tensor:
            return None
        return read_on_host(scale if isinstance(scale, list) else [scale] * n)

    # -- binary / scalar ops -------------------------------------------------------------
    def mul(self, xs: TensorList, other, *, inplace: bool = False) -> TensorList:
        """``x · other`` (``other``: a list of tensors — 0-d per-leaf scalars broadcast —, a
        float, or a 0-d tensor)."""
        return self._run("mul", xs, other, inplace=inplace)

    def sub(self, xs: TensorList, ys: TensorList, *, inplace: bool = False) -> TensorList:
        """``x - y`` for two lists."""
        return self._run("sub", xs, ys, inplace=inplace)

    def div(self, xs: TensorList, other, *, inplace: bool = False) -> TensorList:
        return self._run("div", xs, other, inplace=inplace)

    def add(self, xs: TensorList, other, *, inplace: bool = False) -> TensorList:
        """``x + other`` (``other``: list, float, or 0-d tensor)."""
        if isinstance(other, torch.Tensor) and not self.per_tensor:
            # as a list: dynamo traces _foreach_add(xs, 0-d tensor) through .item(), a host
            # read (a device sync on CUDA) in every compiled step
            other = [other] * len(xs)
        return self._run("add", xs, other, inplace=inplace)

    def lerp(self, xs: TensorList, ys: TensorList, weight: Scalar, *,
             inplace: bool = False) -> TensorList:
        """``x + weight·(y - x)``; a tensor weight is broadcast to every leaf."""
        if isinstance(weight, torch.Tensor) and not self.per_tensor and xs:
            if torch.compiler.is_compiling():
                # inductor has no lowering for _foreach_lerp with tensor weights (it would call
                # the eager kernel into new memory); per tensor, lerp fuses with its neighbours
                w = compiled_scalars(weight.to(xs[0].dtype))
                if inplace:
                    for x, y in zip(xs, ys):
                        x.lerp_(y, w)
                    return xs
                return [torch.lerp(x, y, w) for x, y in zip(xs, ys)]
            weight = [weight.to(xs[0].dtype)] * len(xs)
        return self._run("lerp", xs, ys, weight, inplace=inplace)

    def maximum(self, xs: TensorList, other, *, inplace: bool = False) -> TensorList:
        """``max(x, other)`` (``other``: a list, a float or a 0-d tensor); NaN propagates."""
        if isinstance(other, (int, float)):
            return self._run("clamp_min", xs, float(other), inplace=inplace)
        if isinstance(other, torch.Tensor):
            other = [other] * len(xs)
        return self._run("maximum", xs, other, inplace=inplace)

    def addcdiv(self, xs: TensorList, a: TensorList, b: TensorList, *, value=1.0,
                inplace: bool = False) -> TensorList:
        """``x + value·a/b`` (``value``: a float, a 0-d tensor, or per-leaf 0-d tensors).

        ``value`` rides in torch's ``addcdiv`` where it can be read on the host (a float, or
        ``host_scalars``: torch.optim's non-capturable foreach form). Elsewhere (CUDA scalars,
        compiled) it scales ``b`` first, ``x + a/(b/value)`` (the capturable form), and per
        tensor the step is scaled explicitly, ``x + (a/b)·value``, so that d/d(value) stays
        finite at value = 0. The three round differently (a few ulps)."""
        return self._add_product("addcdiv", xs, a, b, value, inplace)

    def addcmul(self, xs: TensorList, a: TensorList, b: TensorList, *, value=1.0,
                inplace: bool = False) -> TensorList:
        """``x + value·a·b`` (``value`` as for :meth:`addcdiv`)."""
        return self._add_product("addcmul", xs, a, b, value, inplace)

    def _add_product(self, name: str, xs, a, b, value, inplace: bool) -> TensorList:
        """``x + value·(a/b)`` (``addcdiv``) or ``x + value·a·b`` (``addcmul``), ``value`` on
        the host where it can be read there (see :meth:`addcdiv`)."""
        divide = name == "addcdiv"
        if self.per_tensor and isinstance(value, torch.Tensor | list):
            product = self.div(a, b) if divide else self.mul(a, b)
            return self.add(xs, self.mul(product, value), inplace=inplace)
        values = self._on_host(value, len(xs))
        if values is not None:
            scale = () if all(v == 1.0 for v in values) else (values,)
            return self._run(name, xs, a, b, *scale, inplace=inplace)
        if divide:
            return self._run(name, xs, a, self.div(b, value), inplace=inplace)
        return self._run(name, xs, self.mul(a, value), b, inplace=inplace)

    def add_scaled(self, xs: TensorList, ys: TensorList, scale, *,
                   inplace: bool = False) -> TensorList:
        """``x + y·scale`` in one pass (``scale``: a float, a 0-d tensor, or a list of per-leaf
        0-d tensors), as ``addcmul``: rounded once (a fused multiply-add), so it can
        differ from ``add(x, mul(y, scale))`` by an ulp (not where ``y·scale`` is exact, e.g.
        ``y ∈ {−1, 0, 1}``). DTensors take ``add(x, mul(y, scale))``. ``ys`` is only read."""
        if not xs:
            return xs
        if is_dtensor(xs[0]):  # no sharding rule for addcmul with a plain 0-d tensor
            return self.add(xs, self.mul(ys, scale), inplace=inplace)
        if isinstance(scale, (int, float)):
            # torch's add(x, y, alpha=s) rounds x + s·y once too (bitwise addcmul: tested), and
            # a float alpha costs no per-tensor scalar operand
            return self._run("add", xs, ys, inplace=inplace, alpha=float(scale))
        if not isinstance(scale, list):
            scale = [_as_tensor(scale, xs[0])] * len(xs)
        return self._run("addcmul", xs, ys, scale, inplace=inplace)

    # -- unary ops -----------------------------------------------------------------------
    def greater_than_zero(self, xs: TensorList, *, inplace: bool = False) -> TensorList:
        """``1[x > 0]`` in ``x``'s dtype (0 where ``x`` is NaN). Eager on plain tensors, one
        ``torch.gt(x, 0, out=o)`` pass per leaf (torch has no foreach comparison; a float
        ``out`` takes the bool result); elsewhere ``(x > 0).to(dtype)``, which
        ``torch.compile`` fuses."""
        if self.per_tensor or not xs or is_dtensor(xs[0]) or torch.compiler.is_compiling():
            return [(x > 0).to(x.dtype) for x in xs]
        if inplace:
            out = xs
        elif self.scratch is not None and self.scratch.applies(xs):
            out = self.scratch.take(xs)
        else:
            out = [torch.empty_like(x) for x in xs]
        for x, o in zip(xs, out):
            torch.gt(x, 0, out=o)
        return out

    def neg(self, xs: TensorList, *, inplace: bool = False) -> TensorList:
        return self._run("neg", xs, inplace=inplace)

    def sqrt(self, xs: TensorList, *, inplace: bool = False) -> TensorList:
        return self._run("sqrt", xs, inplace=inplace)

    def sign(self, xs: TensorList, *, inplace: bool = False) -> TensorList:
        return self._run("sign", xs, inplace=inplace)

    def clamp_min(self, xs: TensorList, low: float, *, inplace: bool = False) -> TensorList:
        return self._run("clamp_min", xs, low, inplace=inplace)

    def clamp_max(self, xs: TensorList, high: float, *, inplace: bool = False) -> TensorList:
        return self._run("clamp_max", xs, high, inplace=inplace)

    def copy(self, dst: TensorList, src: TensorList, *, inplace: bool = False) -> TensorList:
        """``src``'s values: written into ``dst`` when ``inplace``, else new tensors (never an
        alias of ``src``)."""
        if not src:
            return src
        if inplace and not self.per_tensor:
            foreach_copy_(dst, src)  # (DTensor-aware)
            return dst
        return [x.clone() for x in src]

    # -- per-leaf reductions -------------------------------------------------------------
    def norm(self, xs: TensorList, ord: float = 2.0) -> TensorList:
        """Per-leaf vector norm of each whole tensor, accumulated and returned in float64 (a
        list of 0-d tensors). float32 accumulation is not enough: summing 4e7 ones in float32
        gives 2^25. The norm of a sharded DTensor leaf is the whole tensor's, replicated on
        every rank. Eager on the CPU, large float32 leaves take the chunked form
        (:func:`chunked_norms_apply`), which a tiled step (:mod:`functim.tiling`) reproduces
        bitwise."""
        return self._reduce(xs, ord, nonnegative=False)

    def sum(self, xs: TensorList) -> TensorList:
        """Per-leaf sum of a list whose elements are never negative (a 0/1 mask: the count),
        in float64 like :meth:`norm`."""
        return self._reduce(xs, 1.0, nonnegative=True)

    def numels(self, xs: TensorList) -> list[float]:
        """The number of elements of each leaf, as floats."""
        return [float(x.numel()) for x in xs]

    def _reduce(self, xs: TensorList, ord: float, *, nonnegative: bool) -> TensorList:
        if not xs:
            return []
        if self.per_tensor or torch.compiler.is_compiling():
            # (compiled: inductor has no lowering for _foreach_norm; per tensor, it fuses the
            # float64 cast into each reduction)
            out = [torch.linalg.vector_norm(x, ord, dtype=torch.float64) for x in xs]
        elif chunked_norms_apply(xs, ord):
            out = chunked_norms(xs, ord, nonnegative=nonnegative)
        else:
            out = list(torch._foreach_norm(xs, ord, dtype=torch.float64))
        return replicate_partials(out) if is_dtensor(xs[0]) else out

    # -- mixed precision -----------------------------------------------------------------
    def write_back(self, params: TensorList, work: TensorList, *, donate: bool) -> TensorList:
        """Round results computed in a wider dtype (``work``, e.g. float32 for bfloat16 params)
        into the params' dtype, once: into ``params`` themselves when they were donated (and
        this path writes in place), else as new tensors. Returns the new param list."""
        if donate and not self.per_tensor:
            foreach_copy_(params, work)
            return list(params)
        return [w.to(p.dtype) for w, p in zip(work, params)]


def read_on_host(scalars: Sequence) -> list[float] | None:
    """0-d tensor scalars as Python floats where reading them costs no device sync and no
    trace: eager, outside torch.func, plain tensors in CPU memory (a load, not a sync), not
    recorded by autograd. Else None. The one place functim reads a scalar on the host inside
    ``update``."""
    if torch.compiler.is_compiling() or under_torch_func():
        return None
    if any(type(t) is not torch.Tensor or t.device.type != "cpu" or t.requires_grad
           for t in scalars):
        return None
    if scalars and all(t is scalars[0] for t in scalars):
        return [float(scalars[0])] * len(scalars)
    return torch.stack(list(scalars)).tolist() if scalars else []
