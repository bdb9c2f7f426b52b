"""Tile-by-tile execution of an elementwise kernel on the CPU (eager, donated).

A kernel run on large leaves allocates param-sized temporaries at every op; on the CPU each is
new memory (torch's CPU allocator hands large blocks straight back to the OS), so every page
faults again, and each pass streams the whole state through memory. Run tile by tile (chunks of
at most :data:`TILE_NUMEL` elements of every leaf), the *same* kernel computes exactly the same
numbers (every element sees the same ops in the same order), with tile-sized temporaries reused
from a :class:`ScratchPool`, and each pass reads what the previous one left in cache.
``benchmarks/tiling_ab.py`` measures what that is worth.

Per-leaf reductions (a Cautious mask's count, MARS's clip norm) need the whole leaf before any
element can step. A kernel declares how many it takes (``reductions``); the tiles are then swept
that many times first, pure (nothing is written), each sweep stopping at the next reduction and
recording its tiles' chunk norms; the last sweep steps with the whole leaves' values. Norms are
taken per chunk of :data:`NORM_CHUNK` elements and combined in float64, the same way on whole
leaves (:meth:`functim.listops.ListOps.norm`) as from tiles, so the result is bitwise the untiled
one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .listops import ListOps, TensorList, chunk_norms, combine_norms
from .numerics import widen
from .runtime import foreach_copy_, is_dtensor

# elements per tile: 4 MiB of float32 per tensor, so a tile's params, grads, state and
# temporaries can stay in the CPU's caches between the kernel's passes (measured on a 2-core CPU
# with 32 MiB of L3: 2^20 clearly faster than 2^18, which pays more Python per tile; 2^19..2^21
# within the noise)
TILE_NUMEL = 1 << 20
# leaves smaller than this on average are not tiled, and their temporaries not pooled: their
# allocations are cheap, and one foreach call beats a Python loop over many small leaves
MIN_MEAN_NUMEL = 1 << 16


# -- temporaries -----------------------------------------------------------------------------
class ScratchPool:
    """Temporaries reused from one tile to the next: :class:`~functim.listops.ListOps` writes
    new results of large leaves into tensors taken from the pool, and :meth:`release` (after
    each tile) makes them available again."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._taken: list[tuple[tuple, torch.Tensor]] = []

    @staticmethod
    def applies(xs: TensorList) -> bool:
        """Whether results shaped like ``xs`` come from the pool: large plain CPU leaves in
        eager mode (see :data:`MIN_MEAN_NUMEL`)."""
        if not xs or xs[0].device.type != "cpu" or is_dtensor(xs[0]):
            return False
        return sum(x.numel() for x in xs) >= MIN_MEAN_NUMEL * len(xs)

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


# -- tiles -----------------------------------------------------------------------------------
def tiling_applies(per_tensor: bool, lists: Sequence[Sequence[torch.Tensor]],
                   work_dtype: torch.dtype, reductions: int) -> bool:
    """Whether an elementwise kernel may run tile by tile over ``lists`` (params, grads,
    buffers): eager, on the multi-tensor path, plain contiguous CPU tensors, more than one
    tile's worth of elements, large leaves on average (:data:`MIN_MEAN_NUMEL`), and, for a
    kernel with per-leaf reductions, a float32 working dtype (where the chunked norms apply,
    so the tiles reproduce the whole leaves' norms)."""
    if per_tensor or torch.compiler.is_compiling() or not lists or not lists[0]:
        return False
    first = lists[0]
    total = sum(x.numel() for x in first)
    if first[0].device.type != "cpu" or total <= TILE_NUMEL:
        return False
    if total < MIN_MEAN_NUMEL * len(first):
        return False
    if reductions and work_dtype != torch.float32:
        return False
    plain = (torch.Tensor, torch.nn.Parameter)  # (not DTensors or other subclasses)
    return all(type(x) in plain and x.is_contiguous() for lst in lists for x in lst)


def tile_views(lists: Sequence[Sequence[torch.Tensor]], tile_numel: int | None = None, *,
               leaf_ids: list | None = None) -> list[list[list[torch.Tensor]]]:
    """Cut parallel lists of contiguous leaves (leaf ``i`` of every list has the same number of
    elements) into tiles of at most ``tile_numel`` elements: a larger leaf's flat view is split
    into chunks, and consecutive chunks and smaller leaves (as they are) are packed into tiles.
    Returns ``[tile][list][chunk]``. ``leaf_ids`` (an empty list) receives, per tile, the leaf
    index of each of its chunks."""
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


class _Measured(Exception):
    """Raised by :class:`_TileOps` at the reduction a measuring sweep records (see below)."""


class _TileOps(ListOps):
    """The ListOps of a tiled step: results in the scratch pool, and per-leaf reductions and
    sizes of the whole leaves, not of the tile's chunks (``ids``: the leaf of each chunk).
    ``known``: the whole leaves' values of the reductions measured so far, in call order; a
    reduction past them (a measuring sweep) records the tile's chunk norms and stops the
    kernel."""

    def __init__(self, scratch: ScratchPool, leaf_numels: list[float]):
        super().__init__(per_tensor=False, host_scalars=True, scratch=scratch)
        self.leaf_numels = leaf_numels
        self.known: list[list[torch.Tensor]] = []
        self.ids: list[int] = []
        self.calls = 0
        self.recorded: list[tuple[torch.Tensor, list[int]]] = []
        self.recorded_ord = 2.0

    def numels(self, xs):
        return [self.leaf_numels[i] for i in self.ids]

    def _reduce(self, xs, ord, *, nonnegative):
        k, self.calls = self.calls, self.calls + 1
        if k < len(self.known):
            return [self.known[k][i] for i in self.ids]
        self.recorded.append(chunk_norms(xs, ord, self.ids, nonnegative=nonnegative))
        self.recorded_ord = ord
        raise _Measured


def _store(dst: list, src: list) -> None:
    """Write ``src`` into ``dst`` where the kernel returned other tensors than the ones it was
    given to update in place (e.g. widened copies of bfloat16 params)."""
    pairs = [(d, s) for d, s in zip(dst, src) if s is not d]
    if pairs:
        foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])


def run_tiled(kernel: Callable, p: list, g: list, b: dict[str, list], scalars: dict, *,
              decay: bool, work_dtype: torch.dtype, reductions: int) -> tuple[list, dict]:
    """``kernel`` donated, tile by tile: params and buffers are updated in place (a bfloat16
    param is widened and rounded back one tile at a time). Returns ``(p, b)``."""
    names = list(b)
    leaf_ids: list[list[int]] = []
    tiles = tile_views([p, g, *b.values()], leaf_ids=leaf_ids)
    scratch = ScratchPool()
    ops = _TileOps(scratch, [float(x.numel()) for x in p])

    def sweep(inplace: bool) -> None:
        for (tp, tg, *tb), ids in zip(tiles, leaf_ids):
            ops.ids, ops.calls = ids, 0
            bufs = dict(zip(names, tb))
            try:
                out_p, out_b = kernel(ops, widen(tp, work_dtype), widen(tg, work_dtype),
                                      bufs, scalars, decay=decay, inplace=inplace)
            except _Measured:
                scratch.release()
                continue
            if inplace:
                _store(tp, out_p)
                for n in names:
                    _store(bufs[n], out_b[n])
            scratch.release()

    for _ in range(reductions):  # measuring sweeps: pure, each up to the next reduction
        sweep(inplace=False)
        partial = torch.cat([r for r, _ in ops.recorded])
        owners = [o for _, os in ops.recorded for o in os]
        ops.known.append(combine_norms(partial, owners, len(p), ops.recorded_ord))
        ops.recorded.clear()
    sweep(inplace=True)
    return p, b
