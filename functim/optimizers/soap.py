"""SOAP: Adam run in the eigenbasis of a Shampoo preconditioner, refreshed every few steps.

Per leaf, with ``G`` the gradient in the preconditioner's view (``merge_dims``) and ``Q_i`` the
eigenbasis of the Gram statistic ``L_i`` of every preconditioned dim ``i`` (``G_(i)G_(i)ᵀ``: ``G``
contracted with itself over every other dim):

- **first call** (the reference's "first step is skipped"): ``L_i ← lerp(L_i, G_(i)G_(i)ᵀ,
  1−β_s)``, ``Q_i ← eigh(L_i + 1e-30·I)`` with the columns in descending eigenvalue order. The
  params, moments and ``step`` are untouched (no update, no weight decay): the optimizer lags the
  lr schedule by one call, as the reference.
- **every later call** (``t`` = 1-based index of the real update)::

      G' = project(G)                              # Q_Lᵀ·G·Q_R for a matrix
      m ← lerp(m, G', 1−β1);  v ← lerp(v, G'², 1−β2)          # both in the current eigenbasis
      N = project_back(m / (sqrt(v) + ε))          # ε on the raw root, not bias-corrected
      if normalize_grads: N ← N / (1e-30 + RMS(N))
      p ← p − η·sqrt(1−β2^t)/(1−β1^t)·N            # η alone if correct_bias=False
      p ← p − η·λ·p                                # weight decay AFTER the update
      L_i ← lerp(L_i, G_(i)G_(i)ᵀ, 1−β_s)
      if t % precondition_frequency == 0:          # refresh (functim.linalg.power_qr_refresh)
          m ← project_back(m) with the old bases
          per dim i: σ = argsort(diag(Q_iᵀL_iQ_i), desc); v ← v.index_select(i, σ);
                     Q_i ← qr(L_i·Q_i[:, σ]).Q
          m ← project(m) with the new bases      # momentum rotated, v only reordered

  ``β_s`` = ``shampoo_beta`` if ≥ 0 else β2. The bias correction is folded into the step size and
  ε is added to the uncorrected ``sqrt(v)`` (Hugging Face AdamW's placement; torch's AdamW adds ε
  to ``sqrt(v/(1−β2^t))``). Leaves with no preconditioned dim are therefore exactly that Adam,
  with weight decay after the update (docs/algorithms.md, reduction R17).

Which dims are preconditioned (the reference's rules): 1-D leaves only with
``precondition_1d=True`` and ``d ≤ max_precond_dim``; other leaves every dim of size
``≤ max_precond_dim`` of the (merged, with ``merge_dims``) shape — one-sided SOAP for an
embedding whose vocab dim is larger. ``merge_dims`` uses :func:`functim.linalg.soap_merge_shape`
(after the reference's ``(0, 3, 1, 2)`` permutation of 4-D leaves with
``data_format="channels_last"``); 0-D leaves go through it too, as in the reference.

Paper: Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv 2409.11321.
Reference code: nikhilvyas/SOAP@a1e5535 ``soap.py`` (class ``SOAP``); functim follows it exactly
where it makes a choice (first call skipped, weight decay after the update, ε on the raw root,
no blocking).

Choices against the reference (where it leaves one, or where functim differs):

- Eigensolve precision ``precond_dtype``: float32 (the reference's) for float32, bfloat16 and
  float16 params; **float64 for float64 params** (the reference would round the statistics to
  float32; float64 maths keeps float64 tests tight). Pass ``precond_dtype=torch.float32`` to
  round like the reference for float64 params. ``L_i`` and ``Q_i`` are stored in it, and every
  projection is computed in it.
- Moments ``exp_avg``/``exp_avg_sq`` are float32 for bfloat16/float16 params and the param dtype
  otherwise (``state_dtype`` overrides); the update is computed in that dtype and rounded into
  the param once.
- The reference projects the momentum back and forth (``project(project_back(m))``) after
  *every* step; that is the identity except when the basis changed, so here it runs only on
  refresh steps (the results differ by rounding only).
- ``diag(QᵀLQ)`` is computed as ``Σ Q ⊙ (LQ)`` and the power-iteration product ``L·Q[:, σ]`` as
  ``(L·Q)[:, σ]`` (one ``d³`` product instead of three; same values up to rounding).
- Weight decay is ``p·(1 − η·λ)`` (the reference's ``p.add_(p, alpha=−η·λ)``; equal up to
  rounding) and skipped on leaves excluded by ``weight_decay_mask``.
- One ``step`` counts the real updates of the whole tree (functim's convention; the reference
  counts per parameter). A leaf whose gradient is ``None`` on a call is left untouched, and one
  whose gradient is ``None`` on the *first* call keeps the identity basis that ``init_state``
  stores (Adam in its own coordinates) until the next refresh replaces it by ``qr(L·I)``.
- ``block_size`` (Levanter's block-diagonal SOAP, which Wen et al. 2025, arXiv 2509.02046, ran)
  is not implemented, and neither is a first call that also updates: the reference skips it on
  purpose so that a gradient never enters its own projection.

Host reads and syncs: the decisions "first call?" and "refresh on this call?" depend on the call
count only, which the state keeps on the CPU (``state["calls"]``, int64): eager ``update`` reads
that CPU tensor (a memory read, not a device sync). Under ``torch.compile`` the two decisions are
``torch.cond`` on that CPU predicate (one graph for every call, no recompiles); under ``torch.func``
transforms where the counter is batched (``vmap`` over an ensemble) both branches are computed and
selected with ``torch.where`` (correct, but every call then pays an ``eigh`` and a QR). The first
call's ``torch.linalg.eigh`` synchronises on CUDA (the solver's convergence flag is checked on the
host; the reference retries a failed solve in float64, and so does this); ordinary steps and
refresh steps (matmuls, ``argsort``, ``index_select``, QR) read no device value on the host in
this code. Whether torch's CUDA QR synchronises internally is checked by
``tests/test_soap.py::test_cuda_steady_state_does_not_sync`` where a GPU is present.

Sharded params (DTensor, e.g. FSDP2's ``fully_shard`` shards): ``init_state`` makes the moments
with ``zeros_like``, so they are sharded like the params, and ``GG``/``Q`` are plain tensors that
every rank holds whole (``torch.distributed.checkpoint`` saves them once and loads them on any
number of ranks). An eager call on DTensor leaves runs the leaves without a basis (Adam) on each
rank's shard; each preconditioned leaf is one :func:`functim.distributed.owner_compute` job: its
param, gradient and moments are gathered whole on an owner rank (round-robin over the ranks), the
unsharded code above runs there once, the param and moments go back to the shards and the new
``GG`` (and, on the first and refresh calls, ``Q``) to every rank. "First call?" and "refresh?"
come from the CPU call counter, the same on every rank. The result equals the unsharded
optimizer's (``tests/test_distributed.py``). The exchange is simple rather than minimal (the
param and both moments travel too; the gradient and the normalised direction would do on
non-refresh calls). DTensor leaves are taken in eager mode only (not under ``torch.compile`` or
``vmap``).

State: ``step`` (int32, real updates), ``calls`` (int64 on the CPU, calls made, the first
included), ``hyperparams`` (lr, beta1, beta2, shampoo_beta, eps, weight_decay), ``exp_avg`` and
``exp_avg_sq`` (in the eigenbasis, shaped like the param), ``GG`` and ``Q``: per leaf a list with
one ``(d_i, d_i)`` matrix per preconditioned dim, in dim order (``[]`` for a leaf with none).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optree
import torch

from .. import _tree
from ..hyperparams import (
    BETA,
    HPARAMS_KEY,
    NONNEGATIVE,
    Range,
    ScalarOrSchedule,
    _is_functorch_wrapped,
    check_betas,
    check_hyperparam,
    init_hyperparams,
)
from ..linalg.eigen import eigh_descending, gram, power_qr_refresh, project, project_back
from ..linalg.shapes import soap_merge_shape
from ..listops import ListOps
from ..numerics import (
    LOW_PRECISION,
    adam_denominator,
    bias_correction,
    buffer_dtype,
    decoupled_decay,
    ema,
    ema_of_squares,
    precond_dtype,
    widen,
)
from ..optimizer import State, TreeOptimizer
from ..runtime import has_dtensor, is_dtensor, needs_per_tensor
from ..state import (
    MADE_BY_KEY,
    Buffer,
    StateSpec,
    cached_decay_flags,
    check_dtype_options,
    check_param_leaves,
    check_state_entries,
    check_state_keys,
    init_state_entries,
    made_by,
    state_device,
)

DATA_FORMATS = ("channels_first", "channels_last")
NORMALIZE_EPS = 1e-30  # the reference's ``norm_grad / (1e-30 + RMS)``
BUFFERS = ("exp_avg", "exp_avg_sq", "GG", "Q")
STATE_KEYS = ("step", "calls", HPARAMS_KEY, *BUFFERS)
# the moments and the call counter; the preconditioner lists GG/Q are SOAP's own
STATE_SPEC = StateSpec(
    buffers={"exp_avg": Buffer(), "exp_avg_sq": Buffer()}, counters={"calls": 0},
    memory_format=torch.contiguous_format,
    counters_on_cpu="it is read on the host at every call to decide the first call and the "
                    "refreshes")


@dataclass(frozen=True)
class SoapLeafLayout:
    """How SOAP sees one leaf: ``view`` is the shape the preconditioner works on (the param
    shape, or its merged form), ``perm`` the permutation applied before merging (channels_last
    4-D leaves) and ``precond`` which dims of ``view`` have a basis."""

    shape: tuple[int, ...]
    perm: tuple[int, ...] | None
    view: tuple[int, ...]
    precond: tuple[bool, ...]

    @property
    def dims(self) -> tuple[int, ...]:
        """Sizes of the preconditioned dims (the shapes of ``GG``/``Q``), in order."""
        return tuple(d for d, on in zip(self.view, self.precond) if on)

    @property
    def any(self) -> bool:
        return any(self.precond)

    def to_view(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.permute(self.perm)
        return x.reshape(self.view) if tuple(x.shape) != self.view else x

    def from_view(self, y: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            permuted = [self.shape[d] for d in self.perm]
            inverse = [self.perm.index(d) for d in range(len(self.perm))]
            return y.reshape(permuted).permute(inverse)
        return y.reshape(self.shape) if tuple(y.shape) != self.shape else y

    def bases(self, mats: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """One entry per dim of ``view``: the next matrix of ``mats`` or None (identity)."""
        it = iter(mats)
        return [next(it) if on else None for on in self.precond]


class SoapOptimizer(TreeOptimizer):
    """SOAP; see :mod:`functim.optimizers.soap`. Build with :func:`functim.soap`."""

    name = "soap"

    def __init__(self, *, hyperparams: Mapping[str, Any], ranges: Mapping[str, Range],
                 precondition_frequency: int, max_precond_dim: int, merge_dims: bool,
                 precondition_1d: bool, normalize_grads: bool, data_format: str,
                 correct_bias: bool, precond_dtype: torch.dtype | None,
                 state_dtype: torch.dtype | None, weight_decay_mask: Any):
        self.hyperparams = dict(hyperparams)
        self.ranges = dict(ranges)
        self.precondition_frequency = precondition_frequency
        self.max_precond_dim = max_precond_dim
        self.merge_dims = merge_dims
        self.precondition_1d = precondition_1d
        self.normalize_grads = normalize_grads
        self.data_format = data_format
        self.correct_bias = correct_bias
        self.precond_dtype = precond_dtype
        self.state_dtype = state_dtype
        self.weight_decay_mask = weight_decay_mask
        self.options = {
            "precondition_frequency": precondition_frequency, "max_precond_dim": max_precond_dim,
            "merge_dims": merge_dims, "precondition_1d": precondition_1d,
            "normalize_grads": normalize_grads, "data_format": data_format,
            "correct_bias": correct_bias, "precond_dtype": precond_dtype,
            "state_dtype": state_dtype,
        }
        self._plan_cache: dict[tuple[int, ...], SoapLeafLayout] = {}
        self._mask_cache: dict = {}
        self.state_spec = STATE_SPEC

    def __repr__(self) -> str:
        args = {**self.hyperparams, **self.options}
        return "soap(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"

    def hyperparam_ranges(self) -> dict[str, Range]:
        return dict(self.ranges)

    # -- layout --------------------------------------------------------------------------
    def leaf_plan(self, shape: Sequence[int]) -> SoapLeafLayout:
        """The preconditioner layout of a leaf of this shape (the reference's rules)."""
        shape = tuple(int(d) for d in shape)
        plan = self._plan_cache.get(shape)
        if plan is None:
            mx = self.max_precond_dim
            perm = None
            if len(shape) == 1:
                view = shape
                precond = (self.precondition_1d and shape[0] <= mx,)
            else:
                view = shape
                if self.merge_dims:
                    if self.data_format == "channels_last" and len(shape) == 4:
                        perm = (0, 3, 1, 2)
                        view = tuple(shape[d] for d in perm)
                    view = soap_merge_shape(view, mx)
                precond = tuple(d <= mx for d in view)
            plan = self._plan_cache[shape] = SoapLeafLayout(shape, perm, view, precond)
        return plan

    def buffer_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        return buffer_dtype(param_dtype, self.state_dtype)

    def preconditioner_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        return precond_dtype(param_dtype, self.precond_dtype)

    # -- state ---------------------------------------------------------------------------
    def init_state(self, params: Any) -> State:
        leaves, spec = check_param_leaves("soap", params, self.state_dtype)
        device = state_device(leaves)
        entries = init_state_entries(self.state_spec, params, device, dtype=self.buffer_dtype)

        def mats(x, fill):
            pd = self.preconditioner_dtype(x.dtype)
            return [fill(d, dtype=pd, device=x.device) for d in self.leaf_plan(x.shape).dims]

        return {
            "step": torch.zeros((), dtype=torch.int32, device=device),
            "calls": entries["calls"],
            HPARAMS_KEY: init_hyperparams(self.hyperparams, device),
            "exp_avg": entries["exp_avg"],
            "exp_avg_sq": entries["exp_avg_sq"],
            "GG": _tree.map_tree(lambda x: mats(x, lambda d, **kw: torch.zeros(d, d, **kw)),
                                 params),
            # the identity: a leaf whose first gradient is None keeps Adam's coordinates
            "Q": _tree.map_tree(lambda x: mats(x, torch.eye), params),
            MADE_BY_KEY: made_by(self.name),
        }

    def check_state(self, params: Any, p_leaves: list, spec: optree.PyTreeSpec,
                    state: State) -> dict[str, list]:
        """The buffers' leaves, ``{name: leaves}``, after checking the state."""
        check_state_keys(self.name, state, STATE_KEYS, identified=True)
        stored = state[HPARAMS_KEY]
        if not isinstance(stored, Mapping) or set(stored) != set(self.hyperparams):
            got = sorted(stored) if isinstance(stored, Mapping) else stored
            raise ValueError(f"soap: state['{HPARAMS_KEY}'] must have "
                             f"{sorted(self.hyperparams)}, got {got}")
        bufs = check_state_entries(self.name, self.state_spec, params, p_leaves, state)
        for b in ("GG", "Q"):
            try:
                leaves = spec.flatten_up_to(state[b])
            except (ValueError, TypeError):
                raise ValueError(f"soap: state[{b!r}] must be shaped like params with a list of "
                                 "matrices at every leaf (was the state made for other "
                                 "params?)") from None
            for i, (p, s) in enumerate(zip(p_leaves, leaves)):
                if p is None:
                    continue
                want = self.leaf_plan(p.shape).dims
                pd = self.preconditioner_dtype(p.dtype)
                ok = isinstance(s, (list, tuple)) and len(s) == len(want) and all(
                    isinstance(m, torch.Tensor) and tuple(m.shape) == (d, d) and m.dtype == pd
                    and m.device == p.device for m, d in zip(s, want))
                if not ok:
                    got = ([_tree.describe_leaf(m) for m in s] if isinstance(s, (list, tuple))
                           else _tree.describe_leaf(s))
                    raise ValueError(
                        f"soap: state[{b!r}] at {_tree.leaf_paths_on_error(params, i)!r} is "
                        f"{got}, expected a list of {len(want)} {pd} square matrices on "
                        f"{p.device} of sizes "
                        f"{list(want)} (this configuration's preconditioned dims of shape "
                        f"{tuple(p.shape)})")
            bufs[b] = [list(s) if s is not None else None for s in leaves]
        return bufs

    def _decay_flags(self, params, p_leaves, spec) -> list[bool]:
        return cached_decay_flags(self._mask_cache, self.weight_decay_mask, params, p_leaves,
                                  spec)

    # -- update --------------------------------------------------------------------------
    def step_tree(self, params: Any, p_leaves: list, g_leaves: list, spec: optree.PyTreeSpec,
                  checked: dict[str, list], hp: dict[str, torch.Tensor], state: State, *,
                  donate: bool, **extra: Any) -> tuple[list, State]:
        """The first call or a real update (decided from the CPU call counter, or traced; see
        the module docstring) on the leaves that have a gradient."""
        step, calls = state["step"], state["calls"]
        decay = self._decay_flags(params, p_leaves, spec)
        active = [i for i, (p, g) in enumerate(zip(p_leaves, g_leaves))
                  if p is not None and g is not None]
        leaves = _Leaves(
            plans=[self.leaf_plan(p_leaves[i].shape) for i in active],
            p=[p_leaves[i] for i in active], g=[g_leaves[i] for i in active],
            m=[checked["exp_avg"][i] for i in active],
            v=[checked["exp_avg_sq"][i] for i in active],
            GG=[checked["GG"][i] for i in active], Q=[checked["Q"][i] for i in active],
            decay=[decay[i] for i in active])
        out, new_step = self._step_active_leaves(leaves, hp, step, calls, donate=donate)
        new_p, new_b = list(p_leaves), {b: list(v) for b, v in checked.items()}
        for j, i in enumerate(active):
            new_p[i] = out[0][j]
            for k, b in enumerate(BUFFERS):
                new_b[b][i] = out[1 + k][j]
        new_state: State = {
            "step": new_step, "calls": calls + 1, HPARAMS_KEY: hp,
            "exp_avg": _tree.unflatten(spec, new_b["exp_avg"]),
            "exp_avg_sq": _tree.unflatten(spec, new_b["exp_avg_sq"]),
            "GG": _tree.unflatten(spec, new_b["GG"]),
            "Q": _tree.unflatten(spec, new_b["Q"]),
        }
        return new_p, new_state

    def _step_active_leaves(self, leaves: _Leaves, hp, step: torch.Tensor, calls: torch.Tensor,
                            *, donate: bool) -> tuple[tuple, torch.Tensor]:
        """(the new leaves: params, exp_avg, exp_avg_sq, GG, Q; the new ``step``) of this
        call, in eager, ``torch.cond`` (compiled) or ``torch.where`` (batched) mode."""
        if torch.compiler.is_compiling():
            mode = "cond"
        elif _is_functorch_wrapped(calls):
            mode = "where"
        else:
            mode = "eager"
        inplace = donate and mode == "eager"
        t = step + 1
        if mode != "eager" and (has_dtensor(leaves.p) or has_dtensor(leaves.g)):
            raise TypeError("soap: DTensor parameters or gradients (sharded training) are taken "
                            "in eager mode only, not under torch.compile or torch.func "
                            "transforms")
        if mode != "eager":
            return self._traced_call(leaves, hp, step, calls, mode)
        c = int(calls)  # a CPU tensor: a memory read, not a device sync
        if has_dtensor(leaves.p) or has_dtensor(leaves.g):
            out = self._sharded_call(leaves, hp, t, inplace, first=c == 0,
                                     refresh=c % self.precondition_frequency == 0)
            return out, (step if c == 0 else t)
        if c == 0:
            return self._first_call(leaves, hp, inplace), step
        return self._real_step(leaves, hp, t, inplace, c % self.precondition_frequency == 0), t

    # -- the two kinds of call -----------------------------------------------------------
    def _beta_shampoo(self, hp):
        return torch.where(hp["shampoo_beta"] >= 0, hp["shampoo_beta"], hp["beta2"])

    def _grad_views(self, lv: _Leaves, dtypes: Sequence[torch.dtype] | None = None
                    ) -> list[torch.Tensor | None]:
        """Each preconditioned leaf's gradient in its view, in the preconditioner dtype (of the
        params' ``dtypes``; default ``lv.p``'s)."""
        dtypes = [p.dtype for p in lv.p] if dtypes is None else dtypes
        return [pl.to_view(g.to(self.preconditioner_dtype(dt))) if pl.any else None
                for pl, dt, g in zip(lv.plans, dtypes, lv.g)]

    def _accumulate(self, lv: _Leaves, gv, hp, inplace: bool) -> list[list[torch.Tensor]]:
        """``L_i ← lerp(L_i, G_(i)G_(i)ᵀ, 1−β_s)`` for every preconditioned dim."""
        w = 1 - self._beta_shampoo(hp)
        weights: dict[tuple, torch.Tensor] = {}  # w cast once per (device, dtype)
        out = []
        for pl, G, GG in zip(lv.plans, gv, lv.GG):
            if not pl.any:
                out.append(GG)
                continue
            dims = [d for d, on in enumerate(pl.precond) if on]
            new = []
            for d, L in zip(dims, GG):
                key = (L.device, L.dtype)
                if key not in weights:
                    weights[key] = w.to(device=L.device, dtype=L.dtype)
                wd = weights[key]
                new.append(L.lerp_(gram(G, d), wd) if inplace else torch.lerp(L, gram(G, d), wd))
            out.append(new)
        return out

    def _first_call(self, lv: _Leaves, hp, inplace: bool,
                    dtypes: Sequence[torch.dtype] | None = None) -> tuple:
        """Statistics from the first gradient and their eigenbases; nothing else changes
        (``dtypes``: the params' dtypes when ``lv.p`` does not hold the params)."""
        GG = self._accumulate(lv, self._grad_views(lv, dtypes), hp, inplace)
        Q = []
        for Ls, Qs in zip(GG, lv.Q):
            new = [eigh_descending(L) for L in Ls]
            if inplace:
                for old, q in zip(Qs, new):
                    old.copy_(q)
                new = Qs
            Q.append(new)
        return lv.p, lv.m, lv.v, GG, Q

    def _real_step(self, lv: _Leaves, hp, t, inplace: bool, refresh) -> tuple:
        """One update; ``refresh`` is a bool (eager) or a CPU bool tensor (traced modes)."""
        gv = self._grad_views(lv)
        gp = self._projected_grads(lv, gv)
        new_p, new_m, new_v = self._adam_in_eigenbasis(lv, gp, hp, t, inplace)
        GG, Q = self._update_bases(lv, gv, hp, inplace, refresh, new_m, new_v)
        return new_p, new_m, new_v, GG, Q

    def _projected_grads(self, lv: _Leaves, gv: list) -> list[torch.Tensor]:
        """Step 1: the gradient in the eigenbasis, shaped like the param, in the buffer dtype."""
        gp = []
        for pl, g, G, Qs, m in zip(lv.plans, lv.g, gv, lv.Q, lv.m):
            x = pl.from_view(project(G, pl.bases(Qs))) if pl.any else g
            gp.append(x if x.dtype == m.dtype else x.to(m.dtype))
        return gp

    def _adam_in_eigenbasis(self, lv: _Leaves, gp: list, hp, t, inplace: bool
                            ) -> tuple[list, list, list]:
        """Steps 2–4, per (device, buffer dtype, param dtype, decay) bucket: Adam on the
        projected gradients, its direction back in the param's coordinates, then
        ``p ← p − step_size·N`` and ``p ← p·(1 − η·λ)``. Returns (params, exp_avg, exp_avg_sq)."""
        lr = hp["lr"]
        beta1, beta2 = hp["beta1"], hp["beta2"]
        if self.correct_bias:
            step_size = lr * torch.sqrt(bias_correction(beta2, t)) / bias_correction(beta1, t)
        else:
            step_size = lr
        n = len(lv.p)
        new_p, new_m, new_v = [None] * n, [None] * n, [None] * n
        # under torch.compile this runs inside torch.cond, whose functionalisation does not take
        # foreach ops (their list outputs): per-tensor ops there (inductor fuses them anyway)
        per_tensor = torch.compiler.is_compiling() or needs_per_tensor(
            lv.p, lv.g, scalars=list(hp.values()))
        ops = ListOps(per_tensor=per_tensor)
        own = inplace and not per_tensor
        for idx in _buckets(lv):
            g = [gp[i] for i in idx]
            m = ema(ops, [lv.m[i] for i in idx], g, beta1, inplace=own)
            v = ema_of_squares(ops, [lv.v[i] for i in idx], g, beta2, inplace=own)
            denom = adam_denominator(ops, v, hp["eps"])  # ε on the raw root
            upd = self._to_param_coords(ops, lv, idx, ops.div(m, denom))
            pw = _step_params(ops, [lv.p[i] for i in idx], upd, step_size, lr,
                              hp["weight_decay"], m[0].dtype, decay=lv.decay[idx[0]], own=own,
                              donate=inplace)
            for j, i in enumerate(idx):
                new_p[i], new_m[i], new_v[i] = pw[j], m[j], v[j]
        return new_p, new_m, new_v

    def _to_param_coords(self, ops: ListOps, lv: _Leaves, idx: list[int], x: list
                         ) -> list[torch.Tensor]:
        """Step 3: the Adam direction of the leaves ``idx`` back in the param's coordinates
        (normalised with ``normalize_grads``)."""
        upd = []
        for i, xi in zip(idx, x):
            pl = lv.plans[i]
            if pl.any:
                pd = lv.Q[i][0].dtype
                y = pl.from_view(project_back(pl.to_view(xi.to(pd)), pl.bases(lv.Q[i])))
                xi = y if y.dtype == xi.dtype else y.to(xi.dtype)
            upd.append(xi)
        if self.normalize_grads:  # N / (1e-30 + RMS(N)), the RMS accumulated in float64
            denoms = [NORMALIZE_EPS + nr / float(max(u.numel(), 1)) ** 0.5
                      for nr, u in zip(ops.norm(upd), upd)]
            upd = ops.div(upd, denoms, inplace=True)
        return upd

    def _update_bases(self, lv: _Leaves, gv: list, hp, inplace: bool, refresh,
                      new_m: list, new_v: list) -> tuple[list, list]:
        """Step 5: the statistics, then (on refresh calls) the new bases. Returns (GG, Q); on a
        refresh the preconditioned leaves' entries of ``new_m``/``new_v`` are replaced by the
        rotated momentum and the reordered second moment."""
        GG = self._accumulate(lv, gv, hp, inplace)
        pre = [i for i in range(len(lv.p)) if lv.plans[i].any]
        Q = list(lv.Q)
        if pre:
            sub = ([GG[i] for i in pre], [Q[i] for i in pre], [new_m[i] for i in pre],
                   [new_v[i] for i in pre])
            plans = [lv.plans[i] for i in pre]
            if isinstance(refresh, bool):
                out = self._refresh(plans, *sub, inplace=inplace) if refresh else sub[1:]
            else:
                out = _branch(refresh, lambda *a: self._refresh(plans, *a, inplace=False),
                              lambda G_, Q_, m_, v_: _clone((Q_, m_, v_)), sub,
                              "cond" if torch.compiler.is_compiling() else "where")
            for j, i in enumerate(pre):
                Q[i], new_m[i], new_v[i] = out[0][j], out[1][j], out[2][j]
        return GG, Q

    def _refresh(self, plans, GG, Q, m, v, *, inplace: bool) -> tuple:
        """Rotate the momentum into the refreshed bases and reorder the second moment."""
        new_Q, new_m, new_v = [], [], []
        for pl, Ls, Qs, mi, vi in zip(plans, GG, Q, m, v):
            pd = Qs[0].dtype
            back = pl.from_view(project_back(pl.to_view(mi.to(pd)), pl.bases(Qs)))
            vv = pl.to_view(vi)
            qs = []
            dims = [d for d, on in enumerate(pl.precond) if on]
            for d, L, q in zip(dims, Ls, Qs):
                qn, order = power_qr_refresh(L, q)
                vv = vv.index_select(d, order)
                qs.append(qn)
            mm = pl.from_view(project(pl.to_view(back), pl.bases(qs))).to(mi.dtype)
            vv = pl.from_view(vv)
            if inplace:
                for old, q in zip(Qs, qs):
                    old.copy_(q)
                mi.copy_(mm)
                vi.copy_(vv)
                qs, mm, vv = Qs, mi, vi
            new_Q.append(qs)
            new_m.append(mm)
            new_v.append(vv)
        return new_Q, new_m, new_v

    def _sharded_call(self, lv: _Leaves, hp, t, inplace: bool, *, first: bool,
                      refresh: bool) -> tuple:
        """A call on DTensor leaves (FSDP2 shards). Leaves without a basis are Adam, elementwise,
        on the shards. Each preconditioned leaf's whole step (projections, statistics, bases) is
        one :func:`functim.distributed.owner_compute` job: gathered whole on its owner rank,
        computed there by the unsharded code, and scattered back (param and moments to their
        shards, ``GG`` and on first/refresh calls ``Q`` broadcast as plain tensors); ``first``
        and ``refresh`` come from the CPU call counter, the same on every rank."""
        from ..distributed import owner_compute

        n = len(lv.p)
        out = [list(lv.p), list(lv.m), list(lv.v), list(lv.GG), list(lv.Q)]
        rest = [i for i in range(n) if not lv.plans[i].any]
        if rest:
            sub = lv.select(rest)
            res = (self._first_call(sub, hp, inplace) if first
                   else self._real_step(sub, hp, t, inplace, False))
            for k in range(5):
                for j, i in enumerate(rest):
                    out[k][i] = res[k][j]
        pre = [i for i in range(n) if lv.plans[i].any]
        if not pre:
            return tuple(out)
        sub = lv.select(pre)
        K = max(len(pl.dims) for pl in sub.plans)
        new_q = first or refresh  # otherwise the bases do not change: nothing to send

        def pad(mats, on=True):
            return [mats[k] if on and k < len(mats) else None for k in range(K)]

        gg_out = [list(col) for col in zip(*[pad(Ls) for Ls in sub.GG])]
        q_out = [list(col) for col in zip(*[pad(Qs, new_q) for Qs in sub.Q])]
        if first:  # the params and moments are untouched: only the gradients travel
            def fn(g, GG, Q, plans, dtypes):
                w = _Leaves(plans=plans, p=g, g=g, m=g, v=g, GG=GG, Q=Q, decay=[False] * len(g))
                r = self._first_call(w, hp, False, dtypes)
                return [(*pad(a), *pad(b)) for a, b in zip(r[3], r[4])]

            res = owner_compute(fn, sub.g, sub.GG, sub.Q, sub.plans, [p.dtype for p in sub.p],
                                out=(*gg_out, *q_out))
            res = [(p, m, v, *r) for p, m, v, r in zip(sub.p, sub.m, sub.v, res)]
        else:
            def fn(p, g, m, v, GG, Q, plans, decay):
                r = self._real_step(_Leaves(plans=plans, p=p, g=g, m=m, v=v, GG=GG, Q=Q,
                                            decay=decay), hp, t, False, refresh)
                return [(r[0][j], r[1][j], r[2][j], *pad(r[3][j]), *pad(r[4][j], new_q))
                        for j in range(len(p))]

            res = owner_compute(fn, sub.p, sub.g, sub.m, sub.v, sub.GG, sub.Q, sub.plans,
                                sub.decay, out=(sub.p, sub.m, sub.v, *gg_out, *q_out))
        for j, i in enumerate(pre):
            r = res[j]
            out[0][i], out[1][i], out[2][i] = r[0], r[1], r[2]
            out[3][i] = [x for x in r[3:3 + K] if x is not None]
            if new_q:
                out[4][i] = [x for x in r[3 + K:] if x is not None]
        return tuple(out)

    def _traced_call(self, lv: _Leaves, hp, step, calls, mode):
        """Both kinds of call in one traced graph: ``torch.cond`` under ``torch.compile``
        (``mode="cond"``), both computed and ``torch.where``-selected under a batching
        transform (``mode="where"``)."""
        first = calls == 0
        refresh = calls % self.precondition_frequency == 0
        t = step + 1
        operands = (lv.p, lv.m, lv.v, lv.GG, lv.Q)

        def rebuild(p, m, v, GG, Q):
            return _Leaves(plans=lv.plans, p=p, g=lv.g, m=m, v=v, GG=GG, Q=Q, decay=lv.decay)

        def init_fn(p, m, v, GG, Q):
            out = self._first_call(rebuild(p, m, v, GG, Q), hp, inplace=False)
            return (_clone(out[0]), _clone(out[1]), _clone(out[2]), out[3], out[4])

        def step_fn(p, m, v, GG, Q):
            return self._real_step(rebuild(p, m, v, GG, Q), hp, t, False, refresh)

        out = _branch(first, init_fn, step_fn, operands, mode)
        new_step = torch.where(first.to(step.device), step, t)
        return out, new_step


@dataclass
class _Leaves:
    """The leaves being updated (params and grads not None), as parallel lists."""

    plans: list[SoapLeafLayout]
    p: list
    g: list
    m: list
    v: list
    GG: list
    Q: list
    decay: list[bool]

    def select(self, idx: Sequence[int]) -> _Leaves:
        return _Leaves(*([getattr(self, f)[i] for i in idx] for f in
                         ("plans", "p", "g", "m", "v", "GG", "Q", "decay")))


def _buckets(lv: _Leaves) -> list[list[int]]:
    """Indices grouped so that each group's lists share device, dtypes and tensor type (foreach
    ops; DTensor shards and plain tensors apart)."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, m, v, d) in enumerate(zip(lv.p, lv.m, lv.v, lv.decay)):
        groups.setdefault((p.device, p.dtype, m.dtype, v.dtype, d, is_dtensor(p)), []).append(i)
    return list(groups.values())


def _step_params(ops: ListOps, p: list, upd: list, step_size, lr, weight_decay,
                 work: torch.dtype, *, decay: bool, own: bool, donate: bool) -> list:
    """Step 4: ``p ← p − step_size·upd``, then ``p ← p·(1 − η·λ)`` where ``decay``, computed in
    ``work`` and rounded into ``p`` once. ``upd`` is a temporary."""
    mixed = p[0].dtype != work
    pw = widen(p, work)
    upd = ops.mul(upd, -step_size, inplace=True)
    pw = ops.add(pw, upd, inplace=own or mixed)
    # pw is donated or a new tensor here: decayed in place
    pw = decoupled_decay(ops, pw, lr, weight_decay, decay=decay, inplace=True)
    if mixed:
        pw = ops.write_back(p, pw, donate=donate)
    return pw


def _clone(tree):
    return optree.tree_map(torch.clone, tree)


def _branch(pred: torch.Tensor, true_fn: Callable, false_fn: Callable, operands: tuple,
            mode: str):
    if mode == "cond":
        return torch.cond(pred, true_fn, false_fn, operands)
    a, b = true_fn(*operands), false_fn(*operands)
    return optree.tree_map(lambda x, y: torch.where(pred.to(x.device), x, y), a, b)


def soap(
    lr: ScalarOrSchedule = 3e-3,
    betas: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.95, 0.95),
    shampoo_beta: ScalarOrSchedule = -1.0,
    eps: ScalarOrSchedule = 1e-8,
    weight_decay: ScalarOrSchedule = 0.01,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    data_format: str = "channels_first",
    correct_bias: bool = True,
    *,
    precond_dtype: torch.dtype | None = None,
    state_dtype: torch.dtype | None = None,
    weight_decay_mask: Any = None,
) -> SoapOptimizer:
    """SOAP with the reference's keywords and defaults (nikhilvyas/SOAP ``SOAP``); see
    :mod:`functim.optimizers.soap` for the update and every choice made.

    ``shampoo_beta`` < 0 means β2. ``precond_dtype``: dtype of the statistics, bases and
    projections (default float32, float64 for float64 params). ``state_dtype``: dtype of the
    moments (default float32 for bfloat16/float16 params, else the param dtype).
    ``weight_decay_mask`` as in :func:`functim.adamw`.
    """
    for name, flag in (("merge_dims", merge_dims), ("precondition_1d", precondition_1d),
                       ("normalize_grads", normalize_grads), ("correct_bias", correct_bias)):
        if not isinstance(flag, bool):
            raise TypeError(f"soap: {name!r} must be a bool, got {flag!r}")
    for name, value, low in (("precondition_frequency", precondition_frequency, 1),
                             ("max_precond_dim", max_precond_dim, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"soap: {name!r} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"soap: {name!r} must be >= {low}, got {value}")
    if data_format not in DATA_FORMATS:
        raise ValueError(f"soap: data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    check_dtype_options("soap", precond_dtype=precond_dtype, state_dtype=state_dtype)
    if precond_dtype in LOW_PRECISION:
        raise ValueError(f"soap: precond_dtype={precond_dtype} is not supported (torch's eigh "
                         "and QR need float32 or float64)")
    beta1, beta2 = check_betas("soap", betas)
    hyperparams = {"lr": lr, "beta1": beta1, "beta2": beta2, "shampoo_beta": shampoo_beta,
                   "eps": eps, "weight_decay": weight_decay}
    ranges = {"lr": NONNEGATIVE, "beta1": BETA, "beta2": BETA,
              "shampoo_beta": Range(high=1.0, high_open=True), "eps": NONNEGATIVE,
              "weight_decay": NONNEGATIVE}
    for k, v in hyperparams.items():
        check_hyperparam("soap", k, v, ranges[k])
    return SoapOptimizer(
        hyperparams=hyperparams, ranges=ranges, precondition_frequency=precondition_frequency,
        max_precond_dim=max_precond_dim, merge_dims=merge_dims, precondition_1d=precondition_1d,
        normalize_grads=normalize_grads, data_format=data_format, correct_bias=correct_bias,
        precond_dtype=precond_dtype, state_dtype=state_dtype,
        weight_decay_mask=weight_decay_mask)
