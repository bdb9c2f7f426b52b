"""The core contract: ``Optimizer`` (a pair of pure functions) and the elementwise-optimizer engine.

``update(params, grads, state, *, donate=False, **extra) -> (params, state)``:

- pure by default: inputs are never modified; new tensors are returned (leaves that are not
  updated are returned as the same objects);
- ``donate=True`` lets the optimizer overwrite ``params`` and the state's tensors in place (the
  torch.optim adapter's mode: one copy of the optimizer state in memory). The returned values are
  authoritative either way; ``grads`` are never modified;
- unknown ``**extra`` keywords are accepted and ignored, so combinators can pass things such as
  ``loss_fn`` to whichever optimizer needs them.

Every check (structure, shapes, state layout) happens before any tensor is written, so a bad call
never leaves anything half-updated.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from . import _tree
from .hyperparams import (
    HPARAM_DTYPE,
    HPARAMS_KEY,
    Range,
    check_hyperparam,
    init_hyperparams,
    resolve_hyperparams,
)
from .kernels import (
    ListOps,
    ScratchPool,
    chunk_norms,
    combine_norms,
    foreach_copy_,
    fused_layout_applies,
    group_by_device_and_dtype,
    host_floats,
    needs_per_tensor,
    tile_views,
    tiled_norms_match,
    tiling_applies,
)
from .schedules import Schedule

PyTree = Any
State = dict

LOW_PRECISION = (torch.bfloat16, torch.float16)


class Optimizer(abc.ABC):
    """A functim optimizer: pure ``init_state(params)`` and ``update(params, grads, state)``.

    Build ad-hoc ones with :meth:`from_functions`; the library's optimizers are subclasses.
    """

    name: str = "optimizer"

    @abc.abstractmethod
    def init_state(self, params: PyTree) -> State:
        """The complete state for ``params`` (every key present, correct dtypes)."""

    @abc.abstractmethod
    def update(
        self, params: PyTree, grads: PyTree, state: State, *, donate: bool = False, **extra: Any
    ) -> tuple[PyTree, State]:
        """One step: ``(new params, new state)``; see the module docstring for ``donate``."""

    def validate(self, params: PyTree, grads: PyTree, state: State) -> None:
        """Raise ValueError/TypeError if ``update`` would reject these inputs; modifies nothing.
        Combinators call it on every child before any child writes (nothing is half-updated)."""
        _tree.check_grads(self.name, params, grads)

    def hyperparam_ranges(self) -> dict[str, Range]:
        """Allowed interval of every hyperparameter, keyed like :func:`functim.get_hyperparams`
        (so adapters can check values set later, e.g. in a param group)."""
        return {}

    def hyperparam_schedules(self) -> dict[str, Schedule]:
        """The hyperparameters driven by a schedule (evaluated at every update, so a value set
        in the state would be overwritten), keyed like :meth:`hyperparam_ranges`. The default
        reads the optimizer's ``hyperparams`` specs, where it keeps them."""
        specs = getattr(self, "hyperparams", {})
        return {k: v for k, v in specs.items() if isinstance(v, Schedule)}

    @staticmethod
    def from_functions(init_state: Callable, update: Callable, name: str = "custom") -> Optimizer:
        """Wrap two functions as an Optimizer. ``update`` must accept ``donate`` and ``**extra``."""
        return _FunctionPair(init_state, update, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class _FunctionPair(Optimizer):
    def __init__(self, init_state, update, name):
        self._init, self._update, self.name = init_state, update, name

    def init_state(self, params):
        return self._init(params)

    def update(self, params, grads, state, *, donate=False, **extra):
        return self._update(params, grads, state, donate=donate, **extra)


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


def check_state_keys(owner: str, state: Any, expected: Sequence[str],
                     hyperparams: Sequence[str] | None = None) -> None:
    """The state's top-level keys are ``expected`` (and, when ``hyperparams`` is given,
    ``state["hyperparams"]`` has exactly those names); raises naming what differs."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{owner}: state must be a dict made by {owner}.init_state, got "
                        f"{type(state).__name__}")
    got, want = set(state), set(expected)
    if got != want:
        raise ValueError(
            f"{owner}: this state was not made by {owner}.init_state (or by another "
            f"configuration of it): expected keys {sorted(want)}, got {sorted(got)}"
        )
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


def _widen(xs: list, dtype: torch.dtype) -> list:
    """``xs`` in the working dtype (e.g. float32 copies of bfloat16 params); as is if already."""
    return [x if x.dtype == dtype else x.to(dtype) for x in xs]


def _store(dst: list, src: list) -> None:
    """Write ``src`` into ``dst`` where a kernel returned other tensors than the ones it was
    given to update in place (e.g. widened copies of bfloat16 params)."""
    pairs = [(d, s) for d, s in zip(dst, src) if s is not d]
    if pairs:
        foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])


class ElementwiseOptimizer(Optimizer):
    """An optimizer whose maths is one elementwise kernel over lists of leaves.

    ``kernel(ops, params, grads, buffers, hp, step, *, decay, inplace)`` receives lists of one
    (device, dtype) group, the per-parameter ``buffers`` as ``{name: list}``, the resolved
    hyperparameters ``hp`` (0-d tensors), ``step`` = the 1-based index of this update (int32
    tensor), ``decay`` (static: whether weight decay applies to this group) and ``inplace`` (the
    params and buffers may be overwritten). It returns ``(new_params, {name: new_list})``.

    ``fused_kernel(params, grads, buffers, hp_floats, step, *, decay)`` (optional) is torch's fused
    implementation of exactly the same maths. It needs the hyperparameters as Python floats, so it
    is used only where they are on the host already: the torch.optim adapter's param groups, and
    a functional ``update`` on CPU (reading a CPU tensor is a memory read, not a device sync), in
    eager mode and outside torch.func/autograd. In pure mode the outputs are fresh copies that
    the fused kernel then updates in place. ``fused=False`` turns it off (functim's multi-tensor
    kernel everywhere); ``fused=None`` (default) uses it where it applies.
    ``fused_applies(hp_floats, params) -> bool`` (optional): whether the fused kernel computes
    this maths for these hyperparameters and can run on these params (else the multi-tensor
    kernel runs).

    State: ``{"step": int32 0-d, "hyperparams": {name: float64 0-d}, <buffer>: tree like params}``.
    ``scalars`` (optional): extra per-optimizer scalar state, ``{name: initial value}``, stored as
    0-d float64 tensors next to ``step``; ``prepare(hp, step, scalars) -> (extra_hp,
    new_scalars)`` runs once per update before the kernel (e.g. torch NAdam's ``mu_product``),
    and ``extra_hp`` is merged into the kernel's ``hp``.

    ``tileable``: the kernel is purely elementwise (every output element depends only on the same
    element of its inputs and on scalars: no per-tensor reduction, no use of shapes). Then a
    donated update on the CPU runs it tile by tile (:func:`functim.kernels.tile_views`), with the
    same result and tile-sized temporaries.

    ``measure`` (with ``measure_ord``): the kernel is elementwise except for one per-tensor norm
    that every element's update needs first (Cautious's mask count, MARS's clip norm).
    ``measure(ops, params, grads, buffers, hp, step)`` (params as stored, grads in the
    buffers' dtype) returns, per leaf, the values whose norm the kernel takes (or None if this
    group needs none), modifying nothing; for ``measure_ord=1`` they are never negative (a mask:
    their norm is their sum). The kernel accepts ``norms=`` (those per-leaf float64 norms) and
    ``numels=`` (the leaves' sizes, as floats) instead of taking them from its arguments, which
    may be chunks of the leaves. A donated CPU update then sweeps the tiles twice: measure,
    then step, bitwise as untiled.

    ``leaf_kind``: ``(param) -> key``, a static class of leaves that the kernel treats
    differently (MARS's 2-D and other leaves); the leaves of each kind are stepped together and
    the kernel receives ``kind=key``.

    One ``step`` counts the updates of the whole tree (optax's convention), so a leaf whose grad
    was ``None`` on some steps gets the tree's bias correction; the torch.optim adapter keeps
    torch's per-parameter steps instead.
    Buffers are float32 for bfloat16/float16 params and the param dtype otherwise, unless
    ``state_dtype`` says otherwise.
    """

    def __init__(
        self,
        name: str,
        *,
        hyperparams: Mapping[str, Any],
        ranges: Mapping[str, Range],
        buffers: Sequence[str],
        kernel: Callable,
        fused_kernel: Callable | None = None,
        fused_applies: Callable | None = None,
        state_dtype: torch.dtype | None = None,
        weight_decay_mask: Any = None,
        fused: bool | None = None,
        scalars: Mapping[str, float] | None = None,
        prepare: Callable | None = None,
        decay_hyperparams: Sequence[str] = ("weight_decay",),
        options: Mapping[str, Any] | None = None,
        tileable: bool = False,
        measure: Callable | None = None,
        measure_ord: float = 2.0,
        leaf_kind: Callable | None = None,
    ):
        self.name = name
        self.tileable = tileable or measure is not None
        self.measure = measure
        self.measure_ord = measure_ord
        self.leaf_kind = leaf_kind
        for k, v in hyperparams.items():
            check_hyperparam(name, k, v, ranges[k])
        check_dtype_options(name, state_dtype=state_dtype)
        if weight_decay_mask is not None and "weight_decay" not in hyperparams:
            raise ValueError(f"{name}: weight_decay_mask given but {name} has no weight decay")
        self.hyperparams = dict(hyperparams)
        self.ranges = dict(ranges)
        self.buffer_names = tuple(buffers)
        self.kernel = kernel
        self.fused_kernel = fused_kernel
        self.fused_applies = fused_applies
        self.state_dtype = state_dtype
        self.weight_decay_mask = weight_decay_mask
        if fused not in (None, True, False):
            raise TypeError(f"{name}: fused must be None, True or False, got {fused!r}")
        if fused and fused_kernel is None:
            raise ValueError(f"{name}: torch has no fused kernel for this optimizer")
        self.fused = fused
        self.scalars = dict(scalars or {})
        self.decay_hyperparams = tuple(decay_hyperparams)
        self.prepare = prepare
        self.options = dict(options or {})
        self._mask_cache: dict = {}

    def __repr__(self) -> str:
        args = {**self.hyperparams, **self.options}
        return f"{self.name}(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"

    # -- state ---------------------------------------------------------------------------
    def buffer_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.float32 if param_dtype in LOW_PRECISION else param_dtype

    def init_state(self, params: PyTree) -> State:
        leaves, _ = check_param_leaves(self.name, params,
                                       self.state_dtype if self.buffer_names else None)
        device = state_device(leaves)
        state: State = {
            "step": torch.zeros((), dtype=torch.int32, device=device),
            HPARAMS_KEY: init_hyperparams(self.hyperparams, device),
        }
        for name, value in self.scalars.items():
            state[name] = torch.tensor(value, dtype=HPARAM_DTYPE, device=device)
        for b in self.buffer_names:
            state[b] = _tree.map_tree(
                lambda p: torch.zeros_like(p, dtype=self.buffer_dtype(p.dtype),
                                           memory_format=torch.preserve_format), params)
        return state

    def _check_state(self, params, p_leaves, state) -> dict[str, list]:
        check_state_keys(self.name, state,
                         ["step", HPARAMS_KEY, *self.scalars, *self.buffer_names],
                         hyperparams=self.hyperparams)
        bufs = {}
        for b in self.buffer_names:
            leaves = buffer_leaves(self.name, params, state[b], b)
            for i, (p, s) in enumerate(zip(p_leaves, leaves)):
                if p is not None:
                    _tree.check_like_param(self.name, f"state[{b!r}]", params, i, p, s)
            bufs[b] = leaves
        return bufs

    # -- update --------------------------------------------------------------------------
    def validate(self, params, grads, state) -> None:
        p_leaves, _, _ = _tree.check_grads(self.name, params, grads)
        self._check_state(params, p_leaves, state)

    def update(self, params, grads, state, *, donate: bool = False, **extra):
        p_leaves, g_leaves, spec = _tree.check_grads(self.name, params, grads, donate=donate)
        bufs = self._check_state(params, p_leaves, state)
        step = state["step"]
        hp = resolve_hyperparams(self.hyperparams, state[HPARAMS_KEY], step)
        decay = self._decay_flags(params, p_leaves, spec)
        host_hp = self._host_hparams(hp)
        kernel_hp, new_scalars = self.prepare_scalars(hp, step + 1,
                                                      {k: state[k] for k in self.scalars})
        new_p, new_bufs = self.step_leaves(p_leaves, g_leaves, bufs, kernel_hp, step + 1, decay,
                                           donate=donate, host_hp=host_hp,
                                           fused=host_hp is not None and self.fused is not False)
        new_state: State = {"step": step + 1, HPARAMS_KEY: hp, **new_scalars}
        for b in self.buffer_names:
            new_state[b] = _tree.unflatten(spec, new_bufs[b])
        return _tree.unflatten(spec, new_p), new_state

    def hyperparam_ranges(self) -> dict[str, Range]:
        return dict(self.ranges)

    def prepare_scalars(self, hp, step, scalars) -> tuple[dict, dict]:
        """(hyperparameters for the kernel, updated scalar state) for the update with 1-based
        index ``step``."""
        if self.prepare is None:
            return dict(hp), {}
        extra, new = self.prepare(hp, step, scalars)
        return {**hp, **extra}, new

    def _host_hparams(self, hp: Mapping[str, torch.Tensor]) -> dict[str, float] | None:
        """The hyperparameters as floats when that costs no device sync and no trace: CPU tensors,
        eager mode, not under torch.func, not recorded by autograd (:func:`host_floats`). For
        the fused kernel, and for every optimizer: a weight decay of exactly 0 then skips the
        decay pass."""
        values = host_floats(list(hp.values()))
        return None if values is None else dict(zip(hp, values))

    def _decay_flags(self, params, p_leaves, spec) -> list[bool]:
        return cached_decay_flags(self._mask_cache, self.weight_decay_mask, params, p_leaves,
                                  spec)

    def step_leaves(
        self,
        p_leaves: list,
        g_leaves: list,
        bufs: dict[str, list],
        hp: Mapping[str, torch.Tensor],
        step: torch.Tensor,
        decay: list[bool],
        *,
        donate: bool,
        host_hp: Mapping[str, float] | None = None,
        fused: bool = False,
    ) -> tuple[list, dict[str, list]]:
        """One update on flat leaf lists (``None`` = skip that leaf). ``step`` is the 1-based index
        of this update. Used by :meth:`update` and directly by the torch.optim adapter.

        ``host_hp``: the same hyperparameters as Python floats, when the caller has them on the
        host (the adapter's param groups). Then, if every weight decay in ``decay_hyperparams``
        is exactly 0, the decay pass over the params is skipped, and ``fused=True`` may use
        ``fused_kernel``."""
        if host_hp is not None and self.decay_hyperparams and all(
                host_hp.get(k, 1.0) == 0.0 for k in self.decay_hyperparams):
            decay = [False] * len(decay)
        active = [i for i, (p, g) in enumerate(zip(p_leaves, g_leaves))
                  if p is not None and g is not None]
        new_p = list(p_leaves)
        new_bufs = {b: list(v) for b, v in bufs.items()}
        if not active:
            return new_p, new_bufs
        names = self.buffer_names
        ps = [p_leaves[i] for i in active]
        lists = [ps, [g_leaves[i] for i in active]] + [[bufs[b][i] for i in active] for b in names]
        # group key: (device, param dtype) then split by buffer dtype and decay flag
        per_tensor = needs_per_tensor(*lists[:2], scalars=list(hp.values()))
        ops = ListOps(per_tensor=per_tensor)
        for (device, pdtype), sub, idx in group_by_device_and_dtype(lists):
            buckets: dict[tuple, list[int]] = {}
            for j, k in enumerate(idx):
                bdt = sub[2][j].dtype if names else self.buffer_dtype(pdtype)
                kind = self.leaf_kind(sub[0][j]) if self.leaf_kind else None
                buckets.setdefault((bdt, decay[active[k]], kind), []).append(j)
            for (bdtype, dec, kind), js in buckets.items():
                p = [sub[0][j] for j in js]
                g = [sub[1][j] for j in js]
                b = {n: [sub[2 + m][j] for j in js] for m, n in enumerate(names)}
                out_p, out_b = self._run_group(ops, kind, p, g, b, hp, step, device, bdtype,
                                               dec, donate, host_hp if fused else None)
                for j, op_, in zip(js, out_p):
                    new_p[active[idx[j]]] = op_
                for n in names:
                    for j, t in zip(js, out_b[n]):
                        new_bufs[n][active[idx[j]]] = t
        return new_p, new_bufs

    def _kernels(self, kind) -> tuple[Callable, Callable | None]:
        """(kernel, measure) for the leaves of one ``leaf_kind``."""
        if self.leaf_kind is None:
            return self.kernel, self.measure
        return (partial(self.kernel, kind=kind),
                self.measure and partial(self.measure, kind=kind))

    def _fused_runs(self, ops, device, lists, fused_hp) -> bool:
        """Whether torch's fused kernel takes this group (host hyperparameters ``fused_hp``):
        the optimizer has one that computes this maths for these values, and its preconditions
        hold for the tensors it would get (``lists``: params, grads, buffers)."""
        if (ops.per_tensor or self.fused_kernel is None or device.type not in ("cpu", "cuda")
                or torch.compiler.is_compiling()):
            return False
        if self.fused_applies is not None and not self.fused_applies(fused_hp, lists[0]):
            return False
        return fused_layout_applies(lists)

    def _run_group(self, ops, kind, p, g, b, hp, step, device, work_dtype, decay, donate,
                   fused_hp):
        hp = {k: (v if v.device == device else v.to(device)) for k, v in hp.items()}
        if step.device != device:
            step = step.to(device)
        mixed = p[0].dtype != work_dtype  # e.g. bf16 params with float32 state
        if fused_hp is not None and not self._fused_runs(ops, device, [p, g, *b.values()],
                                                         fused_hp):
            fused_hp = None
        if (donate and fused_hp is None and self.tileable
                and tiling_applies(ops, [p, g, *b.values()])
                and (self.measure is None or tiled_norms_match(p, work_dtype, self.measure_ord))):
            return self._run_tiled(kind, p, g, b, hp, step, work_dtype, decay)
        kernel, _ = self._kernels(kind)
        pw = _widen(p, work_dtype)
        gw = _widen(g, work_dtype)
        if fused_hp is not None:
            if not donate:  # pure: the fused kernel updates fresh copies
                pw = pw if mixed else [x.clone() for x in pw]
                b = {k: [x.clone() for x in v] for k, v in b.items()}
            self.fused_kernel(pw, gw, b, fused_hp, step, decay=decay)
            out_p, out_b = pw, b
        else:
            out_p, out_b = kernel(ops, pw, gw, b, hp, step, decay=decay, inplace=donate)
        if mixed:
            out_p = ops.write_back(p, out_p, donate=donate)
        return out_p, out_b

    def _run_tiled(self, kind, p, g, b, hp, step, work_dtype, decay):
        """The donated kernel, tile by tile (see ``tileable`` and ``measure``); params and
        buffers are updated in place, and a bfloat16 param is widened and rounded back one tile
        at a time. The tiles' temporaries come from one :class:`ScratchPool`."""
        kernel, measure = self._kernels(kind)
        names = list(b)
        leaf_ids: list[list[int]] = []
        tiles = tile_views([p, g, *b.values()], leaf_ids=leaf_ids)
        scratch = ScratchPool()
        ops = ListOps(per_tensor=False, scratch=scratch)
        norms = None
        if measure is not None:  # first sweep: the per-leaf norms, chunk by chunk
            partials, owners = [], []
            for (tp, tg, *tb), ids in zip(tiles, leaf_ids):
                xs = measure(ops, tp, _widen(tg, work_dtype), dict(zip(names, tb)), hp, step)
                if xs is None:  # (nothing to measure for this group)
                    break
                r, o = chunk_norms(xs, self.measure_ord, ids,
                                   nonnegative=self.measure_ord == 1)
                partials.append(r)
                owners.extend(o)
                scratch.release()
            else:
                norms = combine_norms(torch.cat(partials), owners, len(p), self.measure_ord)
        for (tp, tg, *tb), ids in zip(tiles, leaf_ids):
            extra = {} if norms is None else {"norms": [norms[i] for i in ids],
                                              "numels": [float(p[i].numel()) for i in ids]}
            bufs = dict(zip(names, tb))
            out_p, out_b = kernel(ops, _widen(tp, work_dtype), _widen(tg, work_dtype), bufs, hp,
                                  step, decay=decay, inplace=True, **extra)
            _store(tp, out_p)
            for n in names:
                _store(bufs[n], out_b[n])
            scratch.release()
        return p, b
