"""Multi-tensor elementwise kernels: the one place that chooses how list-of-tensor math executes.

Every elementwise optimizer writes its maths once against :class:`ListOps`. The same definition
runs three ways, chosen here and nowhere else:

- ``foreach`` (default, eager and ``torch.compile``): ``torch._foreach_*`` kernels over leaves
  grouped by (device, dtype), like torch.optim's foreach paths;
- ``per_tensor``: a loop of ordinary out-of-place ops, used under ``torch.func`` transforms
  (``vmap``/``grad``/``jvp``; no foreach op has a vmap batching rule, and ``grad`` into a 0-d
  tensor scalar of a foreach op fails) and whenever autograd records the update (a
  differentiable optimizer step);
- and, per op, *pure* (a new list, inputs untouched) or *in place* (the first argument is
  overwritten). Optimizers ask for in-place writes on their state and params only when the caller
  donated them (``update(..., donate=True)``, the torch.optim adapter's mode) and on temporaries
  they own; in ``per_tensor`` mode everything is out of place.

Scalars may be Python floats or 0-d tensors (hyperparameters live in the state as 0-d float64
tensors, so changing the learning rate never recompiles and never syncs).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from typing import Union

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

Scalar = Union[float, torch.Tensor]
TensorList = list[torch.Tensor]


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


def _replicate_partials(xs: list) -> list:
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


def host_floats(scalars: Sequence) -> list[float] | None:
    """0-d tensor scalars as Python floats where reading them costs no device sync and no
    trace: eager, outside torch.func, plain tensors in CPU memory (a load, not a sync), not
    recorded by autograd. Else None. The one place functim reads a scalar on the host inside
    ``update``: for torch's fused kernels (which take floats), to skip a decay pass when λ is
    exactly 0, and for a scale given to an op as its ``value``."""
    if torch.compiler.is_compiling() or under_torch_func():
        return None
    if any(type(t) is not torch.Tensor or t.device.type != "cpu" or t.requires_grad
           for t in scalars):
        return None
    if scalars and all(t is scalars[0] for t in scalars):
        return [float(scalars[0])] * len(scalars)
    return torch.stack(list(scalars)).tolist() if scalars else []


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


# foreach ops whose out-of-place form has no DTensor sharding strategy (their in-place form has)
_NO_DTENSOR_OUT_OF_PLACE = frozenset({"addcdiv"})
# ops whose last scalar (``value``, a Python float) is keyword-only in their per-tensor torch form
_VALUE_LAST = frozenset({"addcdiv", "addcmul"})
# ``out=`` is honoured (see ListOps.writes_out) when the leaves hold this many elements on average
_OUT_MIN_NUMEL = 1 << 16


_NORM_CHUNK = 1 << 15


def chunked_norm_applies(xs: Sequence[torch.Tensor], ord: float,
                         dtype: torch.dtype | None = None) -> bool:
    """Whether :meth:`ListOps.norm` takes the chunked CPU form for ``xs`` (of ``dtype`` if
    given: the dtype the normed values will have)."""
    if ord not in (1, 2) or is_dtensor(xs[0]) or torch.compiler.is_compiling():
        return False
    if xs[0].device.type != "cpu":  # the float64 copy is a CPU cost; elsewhere one fused kernel
        return False
    if (dtype or xs[0].dtype) != torch.float32:  # (a bfloat16 chunk norm would round to 8 bits)
        return False
    if sum(x.numel() for x in xs) <= _NORM_CHUNK * len(xs):
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
    """The float32 norms of the ``2^15``-element chunks of every (contiguous) ``xs[i]``, in
    order, and the owner of each chunk (``owners[i]``, default ``i``). See :func:`combine_norms`.
    ``nonnegative``: no element of ``xs`` is negative (a mask), so for ``ord=1`` no ``|x|``.

    The whole chunks of a leaf are reduced as the rows of one matrix (one call, each row by the
    same serial loop); a one-row matrix is given a second, repeated row, since a single-output
    reduction may split its elements across threads and round differently. The remainder is
    its own chunk (shorter than torch's parallel grain, so serial too). So a chunk's norm does
    not depend on which other chunks it was computed with: a leaf cut into tiles at chunk
    boundaries gets bitwise its whole-leaf chunk norms."""
    parts: list[torch.Tensor] = []
    chunk_owner: list[int] = []
    for i, x in enumerate(xs):
        owner = i if owners is None else owners[i]
        flat = x.view(-1)
        if ord == 1 and not nonnegative:
            flat = flat.abs()
        rows = flat.numel() // _NORM_CHUNK
        if rows:
            block = flat[:rows * _NORM_CHUNK].view(rows, _NORM_CHUNK)
            if rows == 1:
                block = block.expand(2, _NORM_CHUNK)
            parts.append(_rows_norm(block, ord, 1)[:rows])
            chunk_owner.extend([owner] * rows)
        if flat.numel() > rows * _NORM_CHUNK or not rows:
            parts.append(_rows_norm(flat[rows * _NORM_CHUNK:], ord, None).view(1))
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


class ScratchPool:
    """Temporaries reused from one tile to the next (see :func:`tile_views`): ops give their
    results in tensors taken from the pool, and :meth:`release` (after each tile, once nothing
    of the tile's temporaries is needed any more) makes them available again. Without it, each
    tile's temporaries are freed and allocated anew, and when several are alive the C allocator
    hands their pages back to the OS in between, so every tile pays the page faults again."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._taken: list[tuple[tuple, torch.Tensor]] = []

    def take(self, like: TensorList) -> TensorList:
        out = []
        for x in like:
            key = (x.shape, x.dtype, x.device)
            free = self._free.get(key)
            t = free.pop() if free else torch.empty(x.shape, dtype=x.dtype, device=x.device)
            self._taken.append((key, t))
            out.append(t)
        return out

    def release(self) -> None:
        for key, t in self._taken:
            self._free.setdefault(key, []).append(t)
        self._taken.clear()


class ListOps:
    """Elementwise ops on lists of same-device, same-dtype tensors.

    Methods take ``inplace``: when True (and the path allows it) the first list is overwritten
    and returned; otherwise a new list is returned and the inputs are untouched.

    ``scratch`` (eager CPU, tile by tile only): new results of large leaves (where
    :meth:`writes_out` holds) are written into tensors of this :class:`ScratchPool` (which the
    caller releases after each tile); small ones are left to the foreach ops, whose allocations
    are cheap and whose one call beats a Python loop over many leaves.
    """

    def __init__(self, per_tensor: bool, scratch: ScratchPool | None = None):
        self.per_tensor = per_tensor
        self.scratch = None if per_tensor else scratch

    def _run(self, name: str, xs: TensorList, *args, inplace: bool = False,
             out: TensorList | None = None) -> TensorList:
        if not xs:
            return xs
        # a float64 0-d hyperparameter (or per-leaf scalar) must not promote a 0-d leaf
        dtype = xs[0].dtype
        args = tuple(_cast_scalars(a, dtype) for a in args)
        if self.per_tensor:
            return [_per_tensor_call(name, x, _per_elem(args, i)) for i, x in enumerate(xs)]
        if xs[0].device.type == "cpu" and not is_dtensor(xs[0]):
            # one 0-d tensor for every leaf, as a list: torch's CPU _foreach_mul_(xs, tensor)
            # runs several times slower than _foreach_mul_(xs, [tensor, ...])
            args = tuple([a] * len(xs) if isinstance(a, torch.Tensor) else a for a in args)
        target = self._target(xs, inplace, out)
        if target is xs:
            getattr(torch, f"_foreach_{name}_")(xs, *map(compiled_scalars, args))
            return xs
        if target is not None:
            for i, (x, o) in enumerate(zip(xs, target)):
                _per_tensor_call(name, x, _per_elem(args, i), out=o)
            return target
        if name in _NO_DTENSOR_OUT_OF_PLACE and is_dtensor(xs[0]):
            # DTensor (torch 2.13) has a sharding strategy for _foreach_addcdiv_ but none for the
            # out-of-place _foreach_addcdiv: the same maths, in place on a copy
            xs = [x.clone() for x in xs]
            getattr(torch, f"_foreach_{name}_")(xs, *args)
            return xs
        return list(getattr(torch, f"_foreach_{name}")(xs, *map(compiled_scalars, args)))

    def _target(self, xs: TensorList, inplace: bool, out: TensorList | None) -> TensorList | None:
        """Where an op on the multi-tensor path writes its result: ``xs`` itself (in place),
        ``out`` or a scratch tensor (where :meth:`writes_out` holds), or None (new tensors)."""
        if inplace or out is xs:
            return xs
        if (out is not None or self.scratch is not None) and self.writes_out(xs):
            return self.scratch.take(xs) if out is None else out
        return None

    def writes_out(self, xs: TensorList) -> bool:
        """Whether an op given ``out=`` writes its result into those tensors (else it returns a
        new list and ``out`` is left alone).

        Only for large CPU leaves in eager mode: there a fresh temporary costs a page fault per
        page (torch's CPU allocator hands large blocks straight back to the OS, so every step's
        temporaries are new memory, several times dearer than a pass over warm memory), and a
        CPU ``_foreach_*`` op is a loop of per-tensor kernels anyway, so looping over
        ``torch.<op>(x, out=o)`` runs the same kernels. Elsewhere ``torch.compile`` fuses the
        temporaries away, CUDA's caching allocator reuses them, DTensor has no ``out=`` sharding
        rules, and for many small leaves the Python loop would cost more than the allocations.
        """
        if self.per_tensor or not xs or xs[0].device.type != "cpu" or is_dtensor(xs[0]):
            return False
        if torch.compiler.is_compiling():
            return False
        return sum(x.numel() for x in xs) >= _OUT_MIN_NUMEL * len(xs)

    # -- binary / scalar ops -------------------------------------------------------------
    # ``out``: a list of temporaries the caller owns (same shapes and dtype as the result); the
    # result may be written into them (see :meth:`writes_out`) — always use the returned list.
    def mul(self, xs: TensorList, other, *, inplace: bool = False, out=None) -> TensorList:
        """``x · other`` (``other``: a list of tensors — 0-d per-leaf scalars broadcast —, a
        float, or a 0-d tensor)."""
        return self._run("mul", xs, other, inplace=inplace, out=out)

    def sub(self, xs: TensorList, ys: TensorList, *, inplace: bool = False,
            out=None) -> TensorList:
        """``x - y`` for two lists."""
        return self._run("sub", xs, ys, inplace=inplace, out=out)

    def div(self, xs: TensorList, other, *, inplace: bool = False, out=None) -> TensorList:
        return self._run("div", xs, other, inplace=inplace, out=out)

    def add(self, xs: TensorList, other, *, inplace: bool = False, out=None) -> TensorList:
        """``x + other`` (``other``: list, float, or 0-d tensor)."""
        if isinstance(other, torch.Tensor) and not self.per_tensor:
            # as a list: dynamo traces _foreach_add(xs, 0-d tensor) through .item(), a host
            # read (a device sync on CUDA) in every compiled step
            other = [other] * len(xs)
        return self._run("add", xs, other, inplace=inplace, out=out)

    def lerp(self, xs: TensorList, ys: TensorList, weight: Scalar, *, inplace: bool = False,
             out=None):
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
        return self._run("lerp", xs, ys, weight, inplace=inplace, out=out)

    def maximum(self, xs: TensorList, ys: TensorList, *, inplace: bool = False,
                out=None) -> TensorList:
        return self._run("maximum", xs, ys, inplace=inplace, out=out)

    def addcdiv(self, xs: TensorList, a: TensorList, b: TensorList, *,
                value: list[float] | None = None, inplace: bool = False, out=None):
        """``x + a/b``, or ``x + value·a/b`` with per-leaf Python floats ``value`` (see
        :meth:`host_values`)."""
        return self._run("addcdiv", xs, a, b, *([] if value is None else [value]),
                         inplace=inplace, out=out)

    def host_values(self, scale, n: int) -> list[float] | None:
        """``scale`` (a 0-d tensor, or a list of ``n`` per-leaf ones) as ``n`` Python floats
        where reading it costs no device sync and no trace: eager, on the multi-tensor path,
        scalars in CPU memory, not recorded by autograd. Else None. (A float scalar can then
        ride along in an op, ``addcdiv(..., value=)``, instead of costing a pass of its own.)
        See :func:`host_floats`."""
        if self.per_tensor:
            return None
        return host_floats(scale if isinstance(scale, list) else [scale] * n)

    def addcmul(self, xs: TensorList, a: TensorList, b: TensorList, *,
                value: list[float] | None = None, inplace: bool = False, out=None):
        """``x + a·b``, or ``x + value·a·b`` with per-leaf Python floats ``value`` (see
        :meth:`host_values`)."""
        return self._run("addcmul", xs, a, b, *([] if value is None else [value]),
                         inplace=inplace, out=out)

    def add_scaled(self, xs: TensorList, ys: TensorList, scale, *,
                   inplace: bool = False) -> TensorList:
        """``x + y·scale`` in one pass (``scale``: a float, a 0-d tensor, or a list of per-leaf
        0-d tensors), as ``addcmul``: rounded once (a fused multiply-add on CPU), so it can
        differ from ``add(x, mul(y, scale))`` by an ulp (not where ``y·scale`` is exact, e.g.
        ``y ∈ {−1, 0, 1}``). DTensors take ``add(x, mul(y, scale))``. ``ys`` is only read."""
        if not xs:
            return xs
        if is_dtensor(xs[0]):  # no sharding rule for addcmul with a plain 0-d tensor
            return self.add(xs, self.mul(ys, scale), inplace=inplace)
        if not isinstance(scale, list):
            scale = [_as_tensor(scale, xs[0])] * len(xs)
        return self._run("addcmul", xs, ys, scale, inplace=inplace)

    # -- unary ops -----------------------------------------------------------------------
    def positive(self, xs: TensorList, *, inplace: bool = False, out=None) -> TensorList:
        """``1[x > 0]`` in ``x``'s dtype (0 where ``x`` is NaN). Eager on plain tensors, one
        ``torch.gt(x, 0, out=o)`` pass per leaf (torch has no foreach comparison; the float
        ``out`` takes the bool result); elsewhere ``(x > 0).to(dtype)``, which ``torch.compile``
        fuses."""
        plain = not (self.per_tensor or not xs or is_dtensor(xs[0])
                     or torch.compiler.is_compiling())
        target = self._target(xs, inplace, out) if plain else None
        if target is None:
            return [(x > 0).to(x.dtype) for x in xs]
        for x, o in zip(xs, target):
            torch.gt(x, 0, out=o)
        return target

    def neg(self, xs: TensorList, *, inplace: bool = False, out=None) -> TensorList:
        return self._run("neg", xs, inplace=inplace, out=out)

    def sqrt(self, xs: TensorList, *, inplace: bool = False, out=None) -> TensorList:
        return self._run("sqrt", xs, inplace=inplace, out=out)

    def sign(self, xs: TensorList, *, inplace: bool = False, out=None) -> TensorList:
        return self._run("sign", xs, inplace=inplace, out=out)

    def clamp_min(self, xs: TensorList, low: float, *, inplace: bool = False,
                  out=None) -> TensorList:
        return self._run("clamp_min", xs, low, inplace=inplace, out=out)

    def clamp_max(self, xs: TensorList, high: float, *, inplace: bool = False,
                  out=None) -> TensorList:
        return self._run("clamp_max", xs, high, inplace=inplace, out=out)

    def norm(self, xs: TensorList, ord: float = 2.0) -> TensorList:
        """Per-leaf vector norm of each whole tensor, accumulated and returned in float64 (a list
        of 0-d tensors, one pass). float32 accumulation is not enough: summing 4e7 ones in
        float32 gives 2^25. The norm of a sharded DTensor leaf is the whole tensor's, replicated
        on every rank.

        Eager on the CPU, for contiguous float32 leaves and ``ord`` 1 or 2, the leaves are
        cut into chunks of ``2^15`` elements whose norms are taken in float32 and combined
        in float64: ``_foreach_norm(dtype=float64)`` would first copy every leaf to float64 (a
        new 8-byte array per element, dearer than the norm itself). Counts (``ord=1`` of a 0/1
        mask) stay exact (each chunk's sum is below 2^24); an L2 norm is within a few float32
        ulps of the float64 one."""
        if not xs:
            return []
        if self.per_tensor or torch.compiler.is_compiling():
            # (compiled: inductor has no lowering for _foreach_norm; per tensor, it fuses the
            # float64 cast into each reduction)
            out = [torch.linalg.vector_norm(x, ord, dtype=torch.float64) for x in xs]
        elif chunked_norm_applies(xs, ord):
            out = combine_norms(*chunk_norms(xs, ord), len(xs), ord)
        else:
            out = list(torch._foreach_norm(xs, ord, dtype=torch.float64))
        return _replicate_partials(out) if is_dtensor(xs[0]) else out

    def write_back(self, params: TensorList, work: TensorList, *, donate: bool) -> TensorList:
        """Round results computed in a wider dtype (``work``, e.g. float32 for bfloat16 params)
        into the params' dtype, once: into ``params`` themselves when they were donated (and
        this path writes in place), else as new tensors. Returns the new param list."""
        if donate and not self.per_tensor:
            foreach_copy_(params, work)
            return list(params)
        return [w.to(p.dtype) for w, p in zip(work, params)]


# elements per tile of a tiled step (see tile_views): 4 MiB of float32 per tensor, so a tile's
# params, grads, state and temporaries can stay in the CPU's caches between the kernel's passes
# (measured on a 2-core CPU with 32 MiB of L3: 2^20 clearly faster than 2^18, which pays more
# Python per tile; 2^19..2^21 within the noise)
TILE_NUMEL = 1 << 20


def tiling_applies(ops: ListOps, lists: Sequence[Sequence[torch.Tensor]]) -> bool:
    """Whether an elementwise kernel may run tile by tile over ``lists`` (see
    :func:`tile_views`): eager, on the multi-tensor path, plain contiguous CPU tensors, more than
    one tile's worth of elements (else tiling changes nothing), and large leaves on average, as
    for :meth:`ListOps.writes_out` (small leaves' temporaries are cheap, and cutting a list of
    many small leaves into tiles only adds per-tile Python)."""
    if ops.per_tensor or torch.compiler.is_compiling() or not lists or not lists[0]:
        return False
    first = lists[0]
    total = sum(x.numel() for x in first)
    if first[0].device.type != "cpu" or total <= TILE_NUMEL:
        return False
    if total < _OUT_MIN_NUMEL * len(first):
        return False
    plain = (torch.Tensor, torch.nn.Parameter)  # (not DTensors or other subclasses)
    return all(type(x) in plain and x.is_contiguous() for lst in lists for x in lst)


def tiled_norms_match(leaves: Sequence[torch.Tensor], dtype: torch.dtype, ord: float) -> bool:
    """Whether per-leaf norms of values of ``dtype`` shaped like ``leaves`` come out bitwise the
    same from tiles (:func:`chunk_norms` of each tile, combined) as from whole leaves
    (:meth:`ListOps.norm`): when the latter takes the chunked form and tiles are cut at chunk
    boundaries."""
    return TILE_NUMEL % _NORM_CHUNK == 0 and chunked_norm_applies(leaves, ord, dtype)


def tile_views(lists: Sequence[Sequence[torch.Tensor]], tile_numel: int | None = None, *,
               leaf_ids: list | None = None) -> list[list[list[torch.Tensor]]]:
    """Cut parallel lists of contiguous leaves (leaf ``i`` of every list has the same number of
    elements) into tiles of at most ``tile_numel`` elements: a larger leaf's flat view is split
    into chunks, and consecutive chunks and smaller leaves (as they are) are packed into tiles.
    Returns ``[tile][list][chunk]``.

    An elementwise kernel run tile by tile computes exactly what it computes on the whole leaves
    (every element sees the same ops in the same order), but its temporaries are tile-sized
    (reused from tile to tile through a :class:`ScratchPool`), not fresh param-sized memory
    (which costs a page fault per page on the CPU), and each of its passes reads and writes
    memory the previous pass just touched (in cache, as far as a shared cache allows).
    ``leaf_ids`` (an empty list) receives, per tile, the leaf index of each of its chunks.
    """
    tile_numel = tile_numel or TILE_NUMEL
    tiles: list[list[list[torch.Tensor]]] = []
    current: list[list[torch.Tensor]] = [[] for _ in lists]
    ids: list[int] = []
    size = 0
    for i in range(len(lists[0])):
        n = lists[0][i].numel()
        if n > tile_numel:
            pieces = [lst[i].view(-1).split(tile_numel) for lst in lists]
        else:  # whole (an elementwise kernel does not care about the shape)
            pieces = [(lst[i],) for lst in lists]
        for k in range(len(pieces[0])):
            k_numel = pieces[0][k].numel()
            if size and size + k_numel > tile_numel:
                tiles.append(current)
                if leaf_ids is not None:
                    leaf_ids.append(ids)
                current, ids, size = [[] for _ in lists], [], 0
            for views, chunks in zip(current, pieces):
                views.append(chunks[k])
            ids.append(i)
            size += k_numel
    if size or current[0]:
        tiles.append(current)
        if leaf_ids is not None:
            leaf_ids.append(ids)
    return tiles


def fused_layout_applies(lists: Sequence[Sequence[torch.Tensor]]) -> bool:
    """Whether torch's fused optimizer kernels (``_fused_adamw_``, ``_fused_sgd_``) may take
    these parallel lists (params, grads, state buffers). They walk each tensor's memory in order
    from its first element and pair the i-th element of every list, so each tensor must be dense
    and non-overlapping (its elements fill one block of memory) with the strides of its param.
    torch.optim never picks them by default for this reason."""
    if all(map(torch.Tensor.is_contiguous, itertools.chain.from_iterable(lists))):
        return True  # (the common case, checked in one C-level loop: paid at every step)
    for ts in zip(*lists):
        p = ts[0]
        if p.is_contiguous():
            if not all(t.is_contiguous() for t in ts[1:]):
                return False
        elif not (_non_overlapping_and_dense(p) and all(t.stride() == p.stride()
                                                         for t in ts[1:])):
            return False
    return True


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``t.numel()`` consecutive places in memory, in some order
    of its dimensions (a permuted contiguous tensor), each exactly once."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


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
