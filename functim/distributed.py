"""Sharded training helpers, built on torch.distributed only (DTensor, FSDP2, DCP).

functim's optimizers take DTensor parameters (FSDP2's ``fully_shard`` shards, ``Shard(0)``) as
they take plain tensors:

- **elementwise maths** (AdamW, Lion, MARS, ... and the elementwise parts of every optimizer) runs
  on the DTensors as is: each rank updates its shard; ``init_state`` makes the buffers with
  ``zeros_like``, so the state is sharded exactly like the params. Per-leaf reductions (MARS's
  clip norm, the cautious mask's count) are whole-tensor values, replicated on every rank
  (:class:`functim.listops.ListOps`);
- **whole-matrix maths** (Muon's and Scion's Newton–Schulz, SOAP's projections, statistics and
  eigenbases, Kron's factor updates and preconditioning) goes through :func:`owner_compute`:
  each whole matrix is gathered on one *owner* rank, computed there once, and the result is
  scattered back to the shards, so a sharded run equals the unsharded one. Owners go
  round-robin over the mesh's ranks (:func:`assign_owners`), so the work is shared. The
  shard-local approximation that some libraries use (each rank orthogonalises its
  own row block) exists only as an explicit option, :func:`sharded_matrix_mode` ``("local")``;
- **checkpoints**: the functional state is a dict of tensors (DTensor buffers, plain 0-d scalars),
  so ``torch.distributed.checkpoint.save/load`` take it as is, and resharding (save on 2 ranks,
  load on 1, or the reverse) is DCP's. The torch.optim adapters' state goes through
  ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` /
  ``set_optimizer_state_dict``.

The exchange (:func:`owner_compute`). Matrices of one layout (global shape, dtype, mesh,
placements) are stacked ``W`` at a time (``W`` = ranks in the mesh), the stack's slot ``k``
holding the matrix owned by the mesh's ``k``-th rank. The stack of shards (each rank's local
pieces, ``Shard(d)`` → ``Shard(d+1)``) is redistributed by DTensor to ``Shard(0)`` on every mesh
dim, which leaves rank ``k`` with slot ``k``: its matrix, whole. The results go back the same way
(``Shard(0)`` → the output's placements shifted by one). With NCCL DTensor does that as an
all-to-all: each rank receives only the matrices it owns and sends each shard once, the least
traffic an exact owner scheme can move (the alternative, ``full_tensor()`` on every rank followed
by ``distribute_tensor(..., src_data_rank=owner)``, receives every matrix on every rank: ``W``
times more, and one collective per matrix instead of one per ``W``). On gloo (CPU) torch
implements that redistribution as all-gather + chunk (it logs "CPU process group does not support
alltoall yet"), which moves as much as ``full_tensor()``; ``benchmarks/sharded_muon.py`` measures
the split between exchange and compute.

Adopting owner_compute in a matrix optimizer (as SOAP and Kron do). Write the whole-matrix part
of the step as a function of lists (it usually is one already: the batched, unsharded code),
and, when ``has_dtensor(grads)``, call it through :func:`owner_compute`:

- arguments: the param-shaped DTensors the maths needs whole (grad, momentum, SOAP's
  ``exp_avg``/``exp_avg_sq``), whole-matrix state kept as plain tensors that every rank holds
  (SOAP's ``GG``/``Q``, Kron's factors), and plain per-leaf values (plans, scales, flags);
- outputs: ``out=(params, exp_avg, ..., GG_0, GG_1, ...)``: param-shaped results get the DTensor
  templates (scattered back to the shards), replicated state gets its plain tensors as templates
  (the owner's new value is broadcast), and ``None`` marks an output a leaf does not have (a SOAP
  leaf with one preconditioned dim has no ``GG_1``);
- anything random or decided on the host (Kron's probe vectors, SOAP's refresh step) must be the
  same on every rank: draw Kron's probes for every leaf on every rank *before* the call, from the
  state's RNG in leaf order as the unsharded code does, and pass them as plain arguments; then
  the collectives are issued in the same order everywhere and the result equals the unsharded
  optimizer's;
- ``init_state`` stays as it is: ``zeros_like`` of a DTensor is a DTensor (sharded like the
  param), and plain whole-matrix state is replicated, which ``torch.distributed.checkpoint``
  saves once and loads on any number of ranks.

Everything here is eager-mode code (DTensor redistribution and Python bookkeeping); the
collectives are issued in the same order on every rank because the owners are a deterministic
function of the leaf order and layouts.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .runtime import has_dtensor, is_dtensor

if not dist.is_available():  # pragma: no cover - torch builds without distributed support
    raise ImportError("functim.distributed needs a torch build with torch.distributed")

from torch.distributed.device_mesh import DeviceMesh  # noqa: E402
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard  # noqa: E402

__all__ = ["Layout", "OwnerStats", "assign_owners", "has_dtensor", "is_dtensor",
           "owner_compute", "owner_stats", "sharded_matrix_mode"]

MODES = ("owner", "local")
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("functim_sharded_matrix_mode",
                                                            default="owner")
_STATS: contextvars.ContextVar[tuple] = contextvars.ContextVar("functim_owner_stats", default=())


# -- options and counters ------------------------------------------------------------------------
@contextlib.contextmanager
def sharded_matrix_mode(mode: str) -> Iterator[None]:
    """How :func:`owner_compute` (and so Muon's and Scion's Newton–Schulz) treats sharded
    matrices inside the ``with`` block:

    - ``"owner"`` (the default): exact. Each whole matrix is gathered on its owner rank, computed
      once there, and scattered back; equal to the unsharded optimizer.
    - ``"local"``: an approximation, never the default. Each rank applies the function to its own
      local shard as if it were the whole matrix (for Muon on ``Shard(0)`` params: each row block
      is orthogonalised separately, so rows of different blocks are not orthogonal to each other,
      and the update differs from Muon's). No communication; the scale factors still use the
      global shape. Use it only knowingly, e.g. to compare with libraries that do this.
    """
    if mode not in MODES:
        raise ValueError(f"sharded_matrix_mode: mode must be one of {MODES}, got {mode!r}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


@dataclass
class OwnerStats:
    """What :func:`owner_compute` did on this rank inside an :func:`owner_stats` block.

    ``computed``: matrices (jobs) this rank computed whole, as their owner; ``local``: jobs
    computed on local data (plain, non-distributed tensors, or ``sharded_matrix_mode("local")``);
    ``calls``: calls to :func:`owner_compute`. With ``timing=True``, ``exchange_s`` and
    ``compute_s`` add up the wall time of the gather + scatter collectives and of the function
    (each collective is waited for before the clock stops, so they do not overlap the compute;
    CUDA is synchronised around each phase).
    """

    timing: bool = False
    computed: int = 0
    local: int = 0
    calls: int = 0
    exchange_s: float = 0.0
    compute_s: float = 0.0
    per_call: list = field(default_factory=list)  # computed count of each call, in order


@contextlib.contextmanager
def owner_stats(*, timing: bool = False) -> Iterator[OwnerStats]:
    """Count (and optionally time) the work :func:`owner_compute` does on this rank:
    ``with owner_stats() as s: opt.update(...)``; then ``s.computed`` is the number of matrices
    this rank orthogonalised. Tests compare the counts of all ranks (assert on counts, not time)."""
    stats = OwnerStats(timing=timing)
    token = _STATS.set(_STATS.get() + (stats,))
    try:
        yield stats
    finally:
        _STATS.reset(token)


def _record(computed: int = 0, local: int = 0, exchange: float = 0.0, compute: float = 0.0,
            call: bool = False) -> None:
    for s in _STATS.get():
        s.computed += computed
        s.local += local
        s.exchange_s += exchange
        s.compute_s += compute
        if call:
            s.calls += 1
            s.per_call.append(computed)


def _timing() -> bool:
    return any(s.timing for s in _STATS.get())


class _Clock:
    """Wall-clock phases for OwnerStats(timing=True); free when nobody asked for timing."""

    def __init__(self, on: bool):
        self.on = on
        self.t = time.perf_counter() if on else 0.0

    def lap(self) -> float:
        if not self.on:
            return 0.0
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


# -- layouts and owners --------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where an :func:`owner_compute` output goes: its global ``shape`` and ``dtype``, and the
    ``mesh`` and ``placements`` (``Shard``/``Replicate``) of the DTensor it becomes.
    ``Layout.of(dtensor)`` copies a DTensor's. A plain tensor given as an output template means
    "replicated, returned as a plain tensor" (e.g. a preconditioner every rank keeps whole)."""

    mesh: DeviceMesh
    placements: tuple
    shape: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(x: DTensor) -> Layout:
        return Layout(x.device_mesh, tuple(x.placements), tuple(x.shape), x.dtype)


def assign_owners(keys: Sequence[Hashable], world: int) -> list[int]:
    """The owner slot (index into the mesh's ranks, row-major) of each job: round-robin over the
    jobs taken group by group (groups of equal ``key`` in order of first appearance, jobs in
    their order inside a group). So the ``k``-th job in that order is owned by slot ``k % world``;
    deterministic given the leaf order, and the same on every rank."""
    if world < 1:
        raise ValueError(f"assign_owners: world must be >= 1, got {world}")
    groups: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    owners = [0] * len(keys)
    c = 0
    for members in groups.values():
        for i in members:
            owners[i] = c % world
            c += 1
    return owners


def _flat_index(mesh: DeviceMesh) -> int:
    coord = mesh.get_coordinate()
    if coord is None:
        raise ValueError("owner_compute: this rank is not part of the tensors' device mesh")
    idx = 0
    for c, n in zip(coord, mesh.shape):
        idx = idx * n + c
    return idx


def _shifted(placements: Sequence) -> list:
    """Placements of a stack of tensors (a new leading dim) laid out like one of them."""
    out = []
    for p in placements:
        if isinstance(p, Shard):
            if type(p) is Shard:
                out.append(Shard(p.dim + 1))
            else:  # _StridedShard (FSDP2 + TP): same split, one dim further
                out.append(type(p)(p.dim + 1, split_factor=p.split_factor))
        elif isinstance(p, (Replicate, Partial)):
            out.append(p)
        else:
            raise TypeError(f"owner_compute: unsupported DTensor placement {p!r}")
    return out


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type,
                        torch.get_device_module(mesh.device_type).current_device())


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def _layout_key(x: Any) -> Any:
    if is_dtensor(x):
        return ("dtensor", tuple(x.shape), x.dtype, tuple(x.placements))
    if isinstance(x, Layout):
        return ("dtensor", x.shape, x.dtype, x.placements)
    if isinstance(x, torch.Tensor):
        return ("plain", tuple(x.shape), x.dtype)
    return None


def _settle(t: torch.Tensor) -> torch.Tensor:
    """A collective's result as an ordinary tensor: waited for, and copied when it is a view of
    a larger buffer (gloo's all-gather fallback returns a chunk of all ``W`` matrices; keeping
    the view would keep every matrix alive until the step ends)."""
    wait = getattr(t, "wait", None)  # functional collectives return AsyncCollectiveTensor
    if callable(wait):
        t = wait()
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        t = t.clone()
    return t


# -- the owner-compute primitive -----------------------------------------------------------------
def owner_compute(
    fn: Callable[..., Sequence[Any]],
    *args: Sequence[Any],
    out: Sequence[Sequence[Any]] | None = None,
    mode: str | None = None,
) -> list[Any]:
    """Whole-matrix maths on sharded tensors, computed once per matrix on an owner rank.

    ``args`` are parallel lists with one entry per job (a matrix, or anything ``fn`` computes as a
    whole): DTensor entries are gathered whole on the job's owner, plain tensors (assumed equal
    on every rank) and other values (plans, scales) are passed as they are. ``fn(*owned)``
    receives the same lists restricted to the jobs this rank owns, in job order, with whole
    tensors, and returns one result per job: a tensor, or a tuple of tensors when several
    outputs are declared. Write ``fn`` as the batched, unsharded computation: on plain inputs
    ``owner_compute(fn, *args)`` is ``fn(*args)``.

    ``out``: one list of templates per output (default ``(args[0],)``: one output per job, laid
    out like the first argument). A template is a DTensor or :class:`Layout` (the result is
    scattered to that mesh and placements, with that global shape; it is cast to that dtype), a
    plain tensor (the result is broadcast and returned as a plain tensor on every rank), or
    ``None`` (this job has no such output: ``fn`` returns ``None`` there, and so does this).

    Jobs whose arguments and templates hold no DTensor are computed on every rank as plain code.
    Owners: :func:`assign_owners` over the jobs' layouts (round-robin, group by group); every
    rank must call with the same jobs in the same order, as SPMD code does. ``mode``: ``"owner"``
    or ``"local"``; default from :func:`sharded_matrix_mode`. Results are in job order.

    Adopting it in a matrix optimizer: see "Adopting owner_compute" in the module docstring.
    """
    templates = _checked_templates(args, out)
    mode = _MODE.get() if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"owner_compute: mode must be one of {MODES}, got {mode!r}")
    single = out is None or len(templates) == 1
    meshes = _job_meshes(args, templates)
    n = len(meshes)

    results: list[Any] = [None] * n
    plain = [i for i in range(n) if meshes[i] is None]
    if plain:
        _run(fn, args, plain, results, single)
        _record(local=len(plain))
    dist_jobs = [i for i in range(n) if meshes[i] is not None]
    if not dist_jobs:
        _record(call=True)
        return results
    if mode == "local":
        _local(fn, args, templates, dist_jobs, results, single)
        _record(local=len(dist_jobs), call=True)
        return results
    computed = _owner(fn, args, templates, dist_jobs, meshes, results, single)
    _record(call=True, computed=computed)
    return results


def _checked_templates(args: Sequence[Sequence[Any]], out: Sequence[Sequence[Any]] | None
                       ) -> tuple:
    """The output templates (``out``, or ``(args[0],)``) after checking every list has one
    entry per job."""
    if not args:
        raise TypeError("owner_compute: give at least one list of arguments")
    n = len(args[0])
    for k, a in enumerate(args):
        if len(a) != n:
            raise ValueError(f"owner_compute: argument list {k} has {len(a)} entries, "
                             f"list 0 has {n}")
    templates = tuple(out) if out is not None else (args[0],)
    if not templates:
        raise ValueError("owner_compute: out must declare at least one output")
    for k, t in enumerate(templates):
        if len(t) != n:
            raise ValueError(f"owner_compute: out[{k}] has {len(t)} templates for {n} jobs")
    return templates


def _job_meshes(args: Sequence[Sequence[Any]], templates: tuple) -> list[DeviceMesh | None]:
    """Each job's device mesh (``None``: no DTensor, a plain job), after checking that a job's
    DTensors share one mesh and that its templates can be scattered to."""
    meshes: list[DeviceMesh | None] = []
    for i in range(len(args[0])):
        ds = [a[i] for a in args if is_dtensor(a[i])]
        ds += [t[i] for t in templates if is_dtensor(t[i]) or isinstance(t[i], Layout)]
        mesh = ds[0].device_mesh if ds and is_dtensor(ds[0]) else (ds[0].mesh if ds else None)
        for d in ds:
            m = d.device_mesh if is_dtensor(d) else d.mesh
            if m != mesh:
                raise ValueError(f"owner_compute: job {i} mixes DTensors on different meshes "
                                 f"({mesh} and {m})")
        for k, t in enumerate(templates):
            if isinstance(t[i], Layout) or is_dtensor(t[i]):
                pl = t[i].placements
                if any(isinstance(p, Partial) for p in pl):
                    raise ValueError(f"owner_compute: out[{k}][{i}] has a Partial placement; "
                                     "results can be scattered to Shard or Replicate only")
            elif t[i] is not None and not isinstance(t[i], torch.Tensor):
                raise TypeError(f"owner_compute: out[{k}][{i}] must be a DTensor, a Layout, a "
                                f"tensor or None, got {type(t[i]).__name__}")
        meshes.append(mesh)
    return meshes


def _run(fn, args, idx, results, single) -> list:
    sub = [[a[i] for i in idx] for a in args]
    res = list(fn(*sub))
    if len(res) != len(idx):
        raise ValueError(f"owner_compute: fn returned {len(res)} results for {len(idx)} jobs")
    for i, r in zip(idx, res):
        results[i] = r
    return res


def _local(fn, args, templates, idx, results, single) -> None:
    """sharded_matrix_mode("local"): fn on each rank's own shards, wrapped back as DTensors."""
    sub = [[a[i].to_local() if is_dtensor(a[i]) else a[i] for i in idx] for a in args]
    res = list(fn(*sub))
    if len(res) != len(idx):
        raise ValueError(f"owner_compute: fn returned {len(res)} results for {len(idx)} jobs")
    for i, r in zip(idx, res):
        outs = (r,) if single else tuple(r)
        wrapped = []
        for t, o in zip(templates, outs):
            tmpl = t[i]
            if tmpl is None:
                wrapped.append(None)
                continue
            if not is_dtensor(tmpl):
                raise ValueError("owner_compute: sharded_matrix_mode('local') needs DTensor output "
                                 "templates (the result keeps the template's local layout)")
            if o.shape != tmpl.to_local().shape:
                raise ValueError(f"owner_compute: in 'local' mode fn must return each shard's "
                                 f"shape {tuple(tmpl.to_local().shape)}, got {tuple(o.shape)}")
            wrapped.append(DTensor.from_local(o.to(tmpl.dtype), tmpl.device_mesh, tmpl.placements,
                                              shape=tmpl.shape, stride=tmpl.stride(),
                                              run_check=False))
        results[i] = wrapped[0] if single else tuple(wrapped)


def _owner(fn, args, templates, idx, meshes, results, single) -> int:
    """The exact path: gather each job whole on its owner, compute there, scatter back.
    Returns the number of jobs this rank computed."""
    clock = _Clock(_timing())
    stacks = _stacks(args, templates, idx, meshes)
    mine = _gather(args, stacks)
    exchange = clock.lap()
    res_by_job = _compute_owned(fn, mine, len(args), len(templates), single)
    compute = clock.lap()
    _scatter(args, templates, stacks, res_by_job, results, single)
    exchange += clock.lap()
    _record(exchange=exchange, compute=compute)
    return len(mine)


Stack = tuple[DeviceMesh, list[int | None]]  # (mesh, the job held by each of its W slots)


def _stacks(args, templates, idx, meshes) -> list[Stack]:
    """The jobs ``idx`` in stacks of ``W`` (the mesh's ranks): jobs of one layout (mesh + every
    argument's and template's layout) share stacks, and the ``k``-th job of a mesh goes to slot
    ``k % W`` (round-robin, as :func:`assign_owners`)."""
    keys = [(meshes[i], tuple(_layout_key(a[i]) for a in args),
             tuple(_layout_key(t[i]) for t in templates)) for i in idx]
    stacks: list[Stack] = []
    counters: dict[DeviceMesh, int] = {}
    groups: dict[Any, list[int]] = {}
    for i, k in zip(idx, keys):
        groups.setdefault(k, []).append(i)
    for key, members in groups.items():
        mesh = key[0]
        world = mesh.size()
        for s in range(0, len(members), world):
            chunk = members[s:s + world]
            c = counters.get(mesh, 0)
            slots: list[int | None] = [None] * world
            for j, job in enumerate(chunk):
                slots[(c + j) % world] = job
            counters[mesh] = c + len(chunk)
            stacks.append((mesh, slots))
    return stacks


def _gather(args, stacks: list[Stack]) -> dict[int, list]:
    """Phase 1: each rank receives the whole arguments of the jobs it owns ({job: arguments})."""
    mine: dict[int, list] = {}
    for mesh, slots in stacks:
        me = _flat_index(mesh)
        world = len(slots)
        job = slots[me]
        first = next(j for j in slots if j is not None)
        whole = []
        for a in args:
            x0 = a[first]
            if not is_dtensor(x0):
                whole.append(a[job] if job is not None else None)
                continue
            locs = [a[j].to_local() if j is not None else torch.zeros_like(x0.to_local())
                    for j in slots]
            stacked = DTensor.from_local(
                torch.stack(locs), mesh, _shifted(x0.placements), shape=(world, *x0.shape),
                stride=_contiguous_stride((world, *x0.shape)), run_check=False)
            got = stacked.redistribute(mesh, [Shard(0)] * mesh.ndim).to_local()
            whole.append(_settle(got)[0] if job is not None else None)
        if job is not None:
            mine[job] = whole
    return mine


def _compute_owned(fn, mine: dict[int, list], n_args: int, n_out: int, single: bool
                   ) -> dict[int, tuple]:
    """Phase 2: one call of ``fn`` over every job this rank owns (``fn`` batches equal shapes);
    {job: its outputs}."""
    owned = sorted(mine)
    res_by_job: dict[int, tuple] = {}
    if owned:
        res = list(fn(*[[mine[j][k] for j in owned] for k in range(n_args)]))
        if len(res) != len(owned):
            raise ValueError(f"owner_compute: fn returned {len(res)} results for "
                             f"{len(owned)} jobs")
        for j, r in zip(owned, res):
            outs = (r,) if single else tuple(r)
            if len(outs) != n_out:
                raise ValueError(f"owner_compute: fn returned {len(outs)} outputs per job, "
                                 f"out declares {n_out}")
            res_by_job[j] = outs
    return res_by_job


def _scatter(args, templates, stacks: list[Stack], res_by_job: dict[int, tuple], results,
             single: bool) -> None:
    """Phase 3: every output goes back to its template's placements."""
    for mesh, slots in stacks:
        job = slots[_flat_index(mesh)]
        first = next(j for j in slots if j is not None)
        device = next((a[first].device for a in args if is_dtensor(a[first])),
                      None) or _mesh_device(mesh)
        for k, t in enumerate(templates):
            tmpl = t[first]
            if tmpl is None:  # no such output for these jobs (the key groups equal templates)
                for j in slots:
                    if j is not None and not single:
                        _store(results, j, k, None, single, len(templates))
                continue
            piece = res_by_job[job][k] if job is not None else None
            for j, val in zip(slots, _scatter_output(mesh, slots, tmpl, piece, k, job, device)):
                if j is not None:
                    _store(results, j, k, val, single, len(templates))


def _scatter_output(mesh: DeviceMesh, slots: list[int | None], tmpl: Any,
                    result: torch.Tensor | None, k: int, job: int | None,
                    device: torch.device) -> list[Any]:
    """One output of one stack, sent from each owner to the template's placements: the value
    for every occupied slot (a DTensor, or a plain tensor for a plain template; None for an
    empty slot). ``result`` is this rank's output ``k`` for its job ``job`` (None when it owns
    no job in this stack)."""
    world = len(slots)
    if is_dtensor(tmpl) or isinstance(tmpl, Layout):
        lay = Layout.of(tmpl) if is_dtensor(tmpl) else tmpl
        target, as_plain = _shifted(lay.placements), False
    else:  # plain template: replicated, handed back as a plain tensor
        lay = Layout(mesh, (Replicate(),) * mesh.ndim, tuple(tmpl.shape), tmpl.dtype)
        target, as_plain = list(lay.placements), True
    if job is not None:
        if tuple(result.shape) != lay.shape:
            raise ValueError(f"owner_compute: fn's output {k} for job {job} has shape "
                             f"{tuple(result.shape)}, its template {lay.shape}")
        piece = result.to(device=device, dtype=lay.dtype)
    else:
        piece = torch.zeros(lay.shape, dtype=lay.dtype, device=device)
    stacked = DTensor.from_local(
        piece.unsqueeze(0), mesh, [Shard(0)] * mesh.ndim, shape=(world, *lay.shape),
        stride=_contiguous_stride((world, *lay.shape)), run_check=False)
    back = _settle(stacked.redistribute(mesh, target).to_local())
    if as_plain:
        return [None if j is None else back[s] for s, j in enumerate(slots)]
    return [None if j is None else
            DTensor.from_local(back[s], mesh, lay.placements, shape=lay.shape,
                               stride=_contiguous_stride(lay.shape), run_check=False)
            for s, j in enumerate(slots)]


def _store(results: list, job: int, k: int, value: Any, single: bool, n_out: int) -> None:
    """Put output ``k`` of ``job`` in ``results`` (the value itself when there is one output,
    else a tuple of ``n_out``)."""
    if single:
        results[job] = value
    else:
        prev = results[job] or (None,) * n_out
        results[job] = prev[:k] + (value,) + prev[k + 1:]
