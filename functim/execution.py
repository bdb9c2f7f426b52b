"""How an elementwise step executes: the one module that knows the execution paths exist.

An elementwise optimizer is its per-step scalars and a kernel of list operations
(:class:`~functim.elementwise.ElementwiseOptimizer`). :func:`step_leaves` runs it over flat
leaf lists. Once per step it reads what it can on the host, then, for each group of leaves of
one (device, dtype, buffer dtype, decay flag, leaf kind), takes the first path that applies:

1. **torch's fused kernel** (AdamW, SGD): ``fused`` is not False, the hyperparameters are known
   on the host (the torch.optim adapter's param groups; CPU state in eager mode), the kernel
   computes this maths for these values, and its preconditions hold (:func:`fused_layout_applies`);
2. **compiled** (the optimizer was built with ``compile=True``): the kernel traced by
   ``torch.compile``, inductor fusing its passes into one loop; hyperparameters stay tensors,
   so changing one never recompiles;
3. **tiled** (donated, eager, large contiguous CPU leaves): the same kernel tile by tile
   (:mod:`functim.tiling`);
4. **multi-tensor foreach**, or **per tensor** under ``torch.func`` transforms and when
   autograd records the step (:class:`~functim.listops.ListOps`).

A step inside ``torch.compile`` (e.g. ``torch.compile(opt.update)``) takes path 4's foreach ops,
which the compiler traces. Mixed precision (bfloat16 params, float32 state) is the same on every
path: inputs widened to the state dtype, the kernel, one rounding back into the params.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from .listops import ListOps, read_on_host
from .numerics import widen
from .runtime import group_by_device_and_dtype, has_dtensor, needs_per_tensor
from .tiling import run_tiled, tiling_applies

if TYPE_CHECKING:
    from .elementwise import ElementwiseOptimizer


# -- torch's fused kernels -------------------------------------------------------------------
def _fused_adamw(opt, p, g, b, hp, step, *, decay):
    # one step tensor per param (float32, as torch's)
    steps = [step.to(torch.float32)] * len(p)
    torch._fused_adamw_(
        p, g, b["exp_avg"], b["exp_avg_sq"], b.get("max_exp_avg_sq", []), steps,
        lr=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"],
        weight_decay=hp["weight_decay"] if decay else 0.0, eps=hp["eps"],
        amsgrad=opt.options["amsgrad"], maximize=opt.options["maximize"])


def _fused_sgd(opt, p, g, b, hp, step, *, decay):
    # dampening is 0 where this runs (see _fused_sgd_applies), so is_first_step=False gives the
    # first step's buffer, μ·0 + g = g
    has_momentum = "momentum_buffer" in b
    torch._fused_sgd_(
        p, g, b["momentum_buffer"] if has_momentum else [],
        weight_decay=hp["weight_decay"] if decay else 0.0,
        momentum=hp["momentum"] if has_momentum else 0.0, lr=hp["lr"],
        dampening=hp["dampening"], nesterov=opt.options["nesterov"],
        maximize=opt.options["maximize"], is_first_step=False)


def _fused_sgd_applies(opt, hp, params) -> bool:
    """torch's fused SGD computes functim's for these values: no momentum buffer, or
    momentum ≠ 0 with dampening 0 (and it has no DTensor sharding rule in torch 2.13)."""
    if has_dtensor(params):
        return False
    return not opt.buffer_names or (hp["momentum"] != 0.0 and hp["dampening"] == 0.0)


# optimizer name -> (torch's fused kernel, whether it computes this optimizer's maths)
TORCH_FUSED: dict[str, tuple[Callable, Callable]] = {
    "adamw": (_fused_adamw, lambda opt, hp, params: True),
    "sgd": (_fused_sgd, _fused_sgd_applies),
}


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


# -- one step --------------------------------------------------------------------------------
class _StepPlan:
    """What :func:`step_leaves` decided for this step, before any group runs."""

    def __init__(self, opt, scalars, host_hp, *, per_tensor, fused):
        self.opt = opt
        self.per_tensor = per_tensor
        # everything read on the host at once (CPU state, eager): kernels then get floats
        self.host = None if per_tensor or opt.compile else _host_dict(scalars)
        known = host_hp if host_hp is not None else self.host
        # the hyperparameters torch's fused kernel takes (floats), where it may run
        self.fused_hp = (known if fused is not False and opt.name in TORCH_FUSED
                         and known is not None and not per_tensor
                         and not torch.compiler.is_compiling() else None)
        # a weight decay known to be exactly 0 skips its pass over the params
        self.no_decay = known is not None and bool(opt.decay_hyperparams) and all(
            known.get(k, 1.0) == 0.0 for k in opt.decay_hyperparams)
        self.scalars = scalars
        self._on_device: dict[torch.device, dict] = {}

    def scalars_on(self, device: torch.device) -> dict:
        if self.host is not None:
            return self.host
        s = self._on_device.get(device)
        if s is None:
            s = self._on_device[device] = {
                k: v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v
                for k, v in self.scalars.items()}
        return s


def _host_dict(scalars: Mapping[str, Any]) -> dict | None:
    tensors = {k: v for k, v in scalars.items() if isinstance(v, torch.Tensor)}
    values = read_on_host(list(tensors.values()))
    if values is None:
        return None
    return {**scalars, **dict(zip(tensors, values))}


def step_leaves(opt: ElementwiseOptimizer, p_leaves: list, g_leaves: list,
                bufs: dict[str, list], scalars: Mapping[str, Any], step: torch.Tensor,
                decay: list[bool], *, donate: bool, host_hp: Mapping[str, float] | None = None,
                fused: bool | None = None) -> tuple[list, dict[str, list]]:
    """One update of ``opt`` on flat leaf lists (``None`` = skip that leaf): ``scalars`` are
    the kernel's (hyperparameters and this step's scalars, 0-d tensors), ``step`` the 1-based
    index of this update (for torch's fused AdamW), ``decay`` per-leaf weight-decay flags.
    ``host_hp``: the hyperparameters as Python floats where the caller has them (the adapter's
    param groups); ``fused``: False never runs torch's fused kernel, None/True where it
    applies. Returns ``(new params, new buffers)``."""
    active = [i for i, (p, g) in enumerate(zip(p_leaves, g_leaves))
              if p is not None and g is not None]
    new_p = list(p_leaves)
    new_bufs = {b: list(v) for b, v in bufs.items()}
    if not active:
        return new_p, new_bufs
    names = opt.buffer_names
    lists = [[p_leaves[i] for i in active], [g_leaves[i] for i in active]]
    lists += [[bufs[b][i] for i in active] for b in names]
    tensors = [v for v in scalars.values() if isinstance(v, torch.Tensor)]
    per_tensor = needs_per_tensor(*lists[:2], scalars=tensors)
    plan = _StepPlan(opt, scalars, host_hp, per_tensor=per_tensor,
                     fused=opt.fused if fused is None else fused)
    if plan.no_decay:
        decay = [False] * len(decay)
    for (device, pdtype), sub, idx in group_by_device_and_dtype(lists):
        buckets: dict[tuple, list[int]] = {}
        for j, k in enumerate(idx):
            bdt = sub[2][j].dtype if names else opt.buffer_dtype(pdtype)
            kind = opt.leaf_kind(sub[0][j]) if opt.leaf_kind else None
            buckets.setdefault((bdt, decay[active[k]], kind), []).append(j)
        for (work_dtype, dec, kind), js in buckets.items():
            p = [sub[0][j] for j in js]
            g = [sub[1][j] for j in js]
            b = {n: [sub[2 + m][j] for j in js] for m, n in enumerate(names)}
            out_p, out_b = _run_group(plan, kind, p, g, b, step, device, work_dtype, dec, donate)
            for j, q in zip(js, out_p):
                new_p[active[idx[j]]] = q
            for n in names:
                for j, t in zip(js, out_b[n]):
                    new_bufs[n][active[idx[j]]] = t
    return new_p, new_bufs


def _run_group(plan: _StepPlan, kind, p, g, b, step, device, work_dtype, decay, donate):
    opt = plan.opt
    kernel = opt.kernel if kind is None else partial(opt.kernel, kind=kind)
    if plan.fused_hp is not None:
        run, applies = TORCH_FUSED[opt.name]
        if (device.type in ("cpu", "cuda") and applies(opt, plan.fused_hp, p)
                and fused_layout_applies([p, g, *b.values()])):
            return _run_fused(run, opt, p, g, b, plan.fused_hp, step.to(device), work_dtype,
                              decay, donate)
    scalars = plan.scalars_on(device)
    if opt.compile and not torch.compiler.is_compiling() and not plan.per_tensor:
        return _compiled(opt, kind)(p, g, b, scalars, work_dtype=work_dtype, decay=decay,
                                    donate=donate)
    reductions = (opt.reductions.get(kind, 0) if isinstance(opt.reductions, Mapping)
                  else opt.reductions)
    if (donate and opt.tile and plan.host is not None
            and tiling_applies(plan.per_tensor, [p, g, *b.values()], work_dtype, reductions)):
        return run_tiled(kernel, p, g, b, scalars, decay=decay, work_dtype=work_dtype,
                         reductions=reductions)
    ops = ListOps(per_tensor=plan.per_tensor, host_scalars=plan.host is not None)
    return apply_kernel(kernel, ops, p, g, b, scalars, work_dtype=work_dtype, decay=decay,
                        donate=donate)


def apply_kernel(kernel: Callable, ops: ListOps, p: list, g: list, b: dict, scalars: Mapping,
                 *, work_dtype: torch.dtype, decay: bool, donate: bool):
    """The kernel on one group, in the working dtype: params and grads widened to it, and the
    new params rounded back once (into the donated params themselves)."""
    out_p, out_b = kernel(ops, widen(p, work_dtype), widen(g, work_dtype), b, scalars,
                          decay=decay, inplace=donate)
    if p[0].dtype != work_dtype:
        out_p = ops.write_back(p, out_p, donate=donate)
    return out_p, out_b


def _run_fused(run, opt, p, g, b, hp, step, work_dtype, decay, donate):
    pw, gw = widen(p, work_dtype), widen(g, work_dtype)
    mixed = p[0].dtype != work_dtype
    if not donate:  # pure: the fused kernel updates fresh copies
        pw = pw if mixed else [x.clone() for x in pw]
        b = {k: [x.clone() for x in v] for k, v in b.items()}
    run(opt, pw, gw, b, hp, step, decay=decay)
    if mixed:
        pw = ListOps(per_tensor=False).write_back(p, pw, donate=donate)
    return pw, b


def _compiled_group(kernel, p, g, b, scalars, *, work_dtype, decay, donate):
    ops = ListOps(per_tensor=False)
    return apply_kernel(kernel, ops, p, g, b, scalars, work_dtype=work_dtype, decay=decay,
                        donate=donate)


# optimizer -> {leaf kind: its compiled group function}
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled(opt: ElementwiseOptimizer, kind) -> Callable:
    """``opt``'s kernel for one leaf kind under ``torch.compile``, compiled once per optimizer
    (recompiled only for new shapes, dtypes or flags, never for new hyperparameter values)."""
    per_kind = _COMPILED.setdefault(opt, {})
    fn = per_kind.get(kind)
    if fn is None:
        kernel = opt.kernel if kind is None else partial(opt.kernel, kind=kind)
        fn = per_kind[kind] = torch.compile(partial(_compiled_group, kernel))
    return fn
