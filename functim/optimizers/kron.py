"""Kron: PSGD with a Kronecker-factored whitening preconditioner (triangular "EQ" factors).

Per leaf (``G`` = the gradient viewed in its merged shape, ``t`` = 1-based update index)::

    m ← b1·m + (1−b1)·G ;  m̂ = m / (1 − b1^t)                   (m̂ in the preconditioner dtype)
    on balancing steps (≥2-D merged shape): Q_i ← Q_i·gmean_j(‖Q_j‖_max)/‖Q_i‖_max
    on preconditioner-update steps: Q ← update_factors(Q, m̂ (or g), V ~ N(0, I))
    U = P·m̂,  P = ⊗_i Q_iᵀQ_i          (2-D: Q1ᵀQ1·m̂·Q2ᵀQ2)
    U ← U·min(1, 1.1/(RMS(U) + 1e−12))  (RMS clip of the update at 1.1)
    p ← p − η·(U + λ·p·[p.ndim ≥ 2])    (weight decay after the clip, only on ≥2-D leaves)

written as ``p·(1 − η·λ) − η·s·U`` (``s`` the clip factor), the same function to rounding. The
factor update (:func:`functim.linalg.update_factors`) moves each ``Q_i`` towards whitening,
``P ≈ E[GGᵀ]^(−1/2)``, so the preconditioned update has RMS ≈ 1 (hence the clip at 1.1).

Paper: Li 2015, "Preconditioned Stochastic Gradient Descent", arXiv 1512.04202; Li 2018,
"Preconditioner on Matrix Lie Group for SGD", arXiv 1809.10232. Reference code:
evanatyourservice/kron_torch@884427c ``kron_torch/kron.py`` (= PyPI kron-torch 0.3.3), whose
keywords and defaults this follows; the factor maths lives in :mod:`functim.linalg.triangular`.

Factors: a dim gets a diagonal factor (a vector) when its size is 1, exceeds
``max_size_triangular``, the merged tensor has fewer than ``min_ndim_triangular`` dims (so every
1-D leaf), or ``memory_save_mode`` says so (``"one_diag"``: the largest dim, ties to the last, as
the reference's ``np.argsort(shape)[::-1][0]``; ``"smart_one_diag"``: the largest dim only if it
is strictly larger than the second; ``"all_diag"``); otherwise an upper-triangular matrix. Each
starts at ``precond_init_scale^(1/k)`` times the identity (``k`` dims). With ``merge_dims`` a >2-D
leaf is viewed as 2-D by kron_torch's signed-difference rule
(:func:`functim.linalg.kron_merge_shape`). A 0-d leaf is treated as shape ``(1,)`` (the same
maths as the reference's scalar case).

Preconditioner-update schedule (the reference's deterministic period, not a Bernoulli draw):
before each step, ``p = prob(n)`` with ``n`` the number of steps done (the default is
:func:`precond_update_prob_schedule`: 1.0 for the first 500 steps, then ``exp(−0.001·(n−500))``,
floored at 0.03), ``ctr ← ctr + 1``, and the preconditioner is updated iff
``ctr ≥ 1/p`` (compared in float32, as the reference), which resets ``ctr`` to 0.

Choices against the reference (where it leaves one, or where functim differs):

- The probe damping ``g + sqrt(ε_f32)·mean|g|·V`` is added to a copy: grads and momentum are
  never modified (the reference adds it in place, so its update also preconditions the noisy
  momentum, and with ``momentum_into_precond_update=False`` it writes into ``p.grad``).
- Balancing: the reference balances on a step with probability 1% (``random.Random(42)``) when
  the preconditioner is also updated, i.e. on about 1% of the preconditioner updates. Here it is
  deterministic: before every ``balance_every``-th preconditioner update (100: the same rate),
  counted by ``state["precond_updates"]``. ``balance_every=0`` never balances.
- Probes ``V`` come from a ``torch.Generator`` on the state's device whose state is kept in
  ``state["rng"]`` (``Generator.get_state()``, a uint8 CPU tensor; seeded by ``seed``); one
  ``randn`` of the merged shape, in the preconditioner dtype, per non-empty leaf that has a
  gradient, in tree order, on each update step. A resumed run therefore draws the same probes
  (bitwise, on the same device type).
- ``precond_init_scale=None``: kron_torch has no data-derived default (its scale must be a
  number); ``None`` here applies upstream PSGD's rule (lixilinx/psgd_torch@a8616f1 ``psgd.py``
  ``KronWhiten``): on the first step, ``s = (max_leaf mean|g|⁴ + 1e−36)^(−1/8)`` over the leaves
  that have a gradient, and each factor becomes ``s^(1/k)·I`` (leaves without a gradient on the
  first step keep scale 1).
- Dtypes: the factors and all preconditioner maths are float32, or float64 for float64 params
  (``precond_dtype`` overrides; the reference is always float32, and casts its triangular solves
  to float32 even for float64 factors). The momentum is float32 for bfloat16/float16 params and
  the param dtype otherwise (``mu_dtype`` overrides; the reference keeps it in the param dtype).
  The step ``p − η·U`` is computed in the wider of the param and preconditioner dtypes and
  rounded once to the param dtype (the reference rounds ``U`` to the param dtype first).
- One ``step`` counts the updates of the whole tree (bias correction), like every functim
  optimizer; the reference counts per parameter.

Host reads (no device sync): the step-count decisions are made on the host from CPU int64
counters in the state — ``prob_step`` (the reference's ``_prob_step``, steps done),
``update_counter`` (its ``_update_counter``) and ``precond_updates`` — and the generator state
``rng`` is a CPU tensor. Reading CPU tensors is a memory read, not a device sync; everything that
lives on the params' device (momentum, factors, hyperparameters, ``step``) is only used in device
ops. (A state whose counters were moved to an accelerator is read back once, with a sync.)

Sharded params (DTensor, e.g. FSDP2's ``fully_shard`` shards): the momentum is made with
``zeros_like``, so it is sharded like the params, and the factors are plain tensors that every
rank holds whole. On DTensor leaves the momentum, the RMS clip (a whole-tensor norm, the same on
every rank), the weight decay and the step run on each rank's shard; per leaf, the balancing, the
factor update and ``U = P·m̂`` are one :func:`functim.distributed.owner_compute` job: ``m̂`` (and
the gradient when ``momentum_into_precond_update=False``) gathered whole on an owner rank
(round-robin), ``U`` scattered back to the shards, the new factors sent to every rank. The probes
are drawn before the exchange, for every leaf on every rank, from the state's generator in tree
order as in the unsharded code, so the generator state stays the same on all ranks and equal to
the unsharded run's; the update and balancing decisions come from the CPU counters, the same on
every rank. The result equals the unsharded optimizer's (``tests/test_distributed.py``).

Not traceable: ``torch.func.vmap`` and ``torch.compile`` cannot trace this update, because
whether the (expensive) preconditioner update runs is host control flow on the counters, and the
probes come from a ``torch.Generator`` (random ops are refused under vmap's default
``randomness="error"``). ``update`` is ``torch.compiler.disable``d (``Kron.traceable`` is False):
inside a compiled function it runs eagerly (``fullgraph=True`` reports it). ``torch.func.grad``
through ``update`` works (e.g. d(params)/d(lr)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import optree
import torch

from .. import _tree
from ..hyperparams import (
    BETA,
    HPARAMS_KEY,
    NONNEGATIVE,
    UNIT,
    Range,
    ScalarOrSchedule,
    check_hyperparam,
    init_hyperparams,
)
from ..linalg.shapes import kron_merge_shape
from ..linalg.triangular import balance_factors, kron_precondition, update_factors
from ..listops import ListOps, read_on_host
from ..numerics import bias_correction, buffer_dtype, decoupled_decay, ema, precond_dtype, widen
from ..optimizer import TreeOptimizer
from ..runtime import group_by_device_and_dtype, has_dtensor, is_dtensor, needs_per_tensor
from ..state import (
    MADE_BY_KEY,
    Buffer,
    StateSpec,
    check_dtype_options,
    check_param_leaves,
    check_state_entries,
    check_state_keys,
    init_state_entries,
    made_by,
    state_device,
)

MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "all_diag")
RMS_CLIP = 1.1
_HOST_COUNTERS = ("prob_step", "update_counter", "precond_updates")
_INT = torch.int64
# the counters and the momentum; the factors Q and the generator state rng are Kron's own
STATE_SPEC = StateSpec(buffers={"momentum_buffer": Buffer()},
                       counters=dict.fromkeys(_HOST_COUNTERS, 0),
                       memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class PrecondUpdateProbSchedule:
    """kron_torch ``ProbScheduler``: ``clamp(max_prob·exp(−decay·(n − flat_start)), min_prob,
    max_prob)`` in float32, for ``n`` = the number of steps done (a float32 0-d tensor)."""

    max_prob: float = 1.0
    min_prob: float = 0.03
    decay: float = 0.001
    flat_start: float = 500

    def __post_init__(self):
        if not (0.0 < self.min_prob <= self.max_prob <= 1.0):
            raise ValueError("precond_update_prob_schedule: need 0 < min_prob <= max_prob <= 1, "
                             f"got min_prob={self.min_prob}, max_prob={self.max_prob}")
        if not (self.decay >= 0 and math.isfinite(self.decay)):
            raise ValueError(f"precond_update_prob_schedule: decay must be >= 0, got {self.decay}")

    def __call__(self, n: torch.Tensor | float) -> torch.Tensor:
        f32 = torch.float32
        n = torch.as_tensor(n, dtype=f32)
        mx, mn = torch.tensor(self.max_prob, dtype=f32), torch.tensor(self.min_prob, dtype=f32)
        decay = torch.tensor(self.decay, dtype=f32)
        flat = torch.tensor(self.flat_start, dtype=f32)
        prob = mx * torch.exp(-decay * (n - flat))
        return prob.clamp(min=mn, max=mx)


def precond_update_prob_schedule(max_prob: float = 1.0, min_prob: float = 0.03,
                                 decay: float = 0.001, flat_start: float = 500
                                 ) -> PrecondUpdateProbSchedule:
    """kron_torch's default preconditioner-update probability: 1.0 for ``flat_start`` steps, then
    an exponential anneal to ``min_prob`` (0.607 at n=1000, 0.223 at 2000, 0.082 at 3000, 0.03
    from about 4000)."""
    return PrecondUpdateProbSchedule(max_prob, min_prob, decay, flat_start)


def update_decision(prob_fn: Callable[[torch.Tensor], Any] | float, n: int, counter: int
                    ) -> tuple[bool, int]:
    """The reference's deterministic update rule for the step with ``n`` steps done and the
    period counter ``counter``: returns ``(update now, new counter)``. ``prob_fn`` is a float or
    a callable of the float32 0-d tensor ``n``; ``counter + 1 ≥ 1/prob`` is compared in float32
    (kron_torch compares an int32 tensor with ``1/prob``)."""
    prob = prob_fn(torch.tensor(n, dtype=torch.float32)) if callable(prob_fn) else prob_fn
    if isinstance(prob, torch.Tensor):
        prob = prob.detach()
        if prob.device.type != "cpu":
            prob = prob.cpu()
        if prob.numel() != 1:
            raise ValueError(f"kron: preconditioner_update_probability returned a tensor of "
                             f"shape {tuple(prob.shape)}, expected a scalar")
        prob = prob.reshape(()).to(torch.float32)
        bad = not bool((prob >= 0) & (prob <= 1))
    else:
        bad = not (isinstance(prob, (int, float)) and 0.0 <= prob <= 1.0)
    if bad:
        raise ValueError(f"kron: preconditioner_update_probability must be in [0, 1], got "
                         f"{prob!r} at step {n}")
    counter += 1
    inv = 1 / prob if (isinstance(prob, torch.Tensor) or prob != 0) else math.inf
    do = bool(torch.tensor(counter, dtype=torch.int32) >= inv)
    return do, (0 if do else counter)


class KronFactorLayout(NamedTuple):
    """Static layout of one leaf: its merged shape and which factors are diagonal."""

    merged_shape: tuple[int, ...]
    diagonal: tuple[bool, ...]


def diagonal_dims(shape: Sequence[int], max_size_triangular: int, min_ndim_triangular: int,
                  memory_save_mode: str | None) -> tuple[bool, ...]:
    """kron_torch ``_init_Q_exprs``'s choice of diagonal factors for a (merged) shape."""
    shape = tuple(shape)
    k = len(shape)
    flags = [False] * k
    if memory_save_mode == "all_diag":
        flags = [True] * k
    elif memory_save_mode in ("one_diag", "smart_one_diag") and k > 0:
        # np.argsort(shape)[::-1][0]: the largest dim, ties to the last one
        largest = max(range(k), key=lambda i: (shape[i], i))
        ordered = sorted(shape)
        if memory_save_mode == "one_diag" or (k > 1 and ordered[-1] > ordered[-2]):
            flags[largest] = True
    return tuple(size == 1 or size > max_size_triangular or k < min_ndim_triangular or f
                 for size, f in zip(shape, flags))


class Kron(TreeOptimizer):
    """PSGD Kron (kron_torch); see the module docstring. Build it with :func:`kron`."""

    name = "kron"
    traceable = False  # host control flow on the counters, probes from a torch.Generator

    def __init__(self, *, lr, b1, weight_decay, precond_lr, preconditioner_update_probability,
                 max_size_triangular, min_ndim_triangular, memory_save_mode,
                 momentum_into_precond_update, precond_init_scale, merge_dims, mu_dtype,
                 precond_dtype, balance_every, seed):
        self.ranges = {"lr": NONNEGATIVE, "b1": BETA, "weight_decay": NONNEGATIVE,
                       "precond_lr": NONNEGATIVE}
        self.hyperparams = {"lr": lr, "b1": b1, "weight_decay": weight_decay,
                            "precond_lr": precond_lr}
        for k, v in self.hyperparams.items():
            check_hyperparam(self.name, k, v, self.ranges[k])
        prob = preconditioner_update_probability
        if prob is None:
            prob = precond_update_prob_schedule()
        elif not callable(prob):
            check_hyperparam(self.name, "preconditioner_update_probability", prob, UNIT)
            prob = float(prob)
        self.update_probability = prob
        for name, v in (("max_size_triangular", max_size_triangular),
                        ("min_ndim_triangular", min_ndim_triangular),
                        ("balance_every", balance_every), ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TypeError(f"{self.name}: {name} must be a non-negative int, got {v!r}")
        if memory_save_mode not in MEMORY_SAVE_MODES:
            raise ValueError(f"{self.name}: invalid memory_save_mode {memory_save_mode!r}, must "
                             f"be one of {list(MEMORY_SAVE_MODES)}")
        if precond_init_scale is not None:
            check_hyperparam(self.name, "precond_init_scale", precond_init_scale,
                             Range(0.0, low_open=True))
            precond_init_scale = float(precond_init_scale)
        check_dtype_options(self.name, mu_dtype=mu_dtype, precond_dtype=precond_dtype)
        if precond_dtype is not None and precond_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{self.name}: precond_dtype must be torch.float32 or torch.float64 "
                            f"(triangular solves need them), got {precond_dtype}")
        self.max_size_triangular = max_size_triangular
        self.min_ndim_triangular = min_ndim_triangular
        self.memory_save_mode = memory_save_mode
        self.momentum_into_precond_update = bool(momentum_into_precond_update)
        self.precond_init_scale = precond_init_scale
        self.merge_dims = bool(merge_dims)
        self.mu_dtype = mu_dtype
        self.precond_dtype = precond_dtype
        self.balance_every = balance_every
        self.seed = seed
        self._plans: dict[tuple[int, ...], KronFactorLayout] = {}
        self.state_spec = STATE_SPEC

    def __repr__(self) -> str:
        opts = {**self.hyperparams, "preconditioner_update_probability": self.update_probability,
                "max_size_triangular": self.max_size_triangular,
                "min_ndim_triangular": self.min_ndim_triangular,
                "memory_save_mode": self.memory_save_mode,
                "momentum_into_precond_update": self.momentum_into_precond_update,
                "precond_init_scale": self.precond_init_scale, "merge_dims": self.merge_dims,
                "mu_dtype": self.mu_dtype, "precond_dtype": self.precond_dtype,
                "balance_every": self.balance_every, "seed": self.seed}
        return f"kron({', '.join(f'{k}={v!r}' for k, v in opts.items())})"

    def hyperparam_ranges(self) -> dict[str, Range]:
        return dict(self.ranges)

    # -- layout --------------------------------------------------------------------------------
    def plan(self, shape: Sequence[int]) -> KronFactorLayout:
        """Merged shape and diagonal flags for a param shape (computed once per shape)."""
        shape = tuple(shape)
        plan = self._plans.get(shape)
        if plan is None:
            merged = kron_merge_shape(shape) if self.merge_dims else shape
            merged = merged if merged else (1,)
            diag = diagonal_dims(merged, self.max_size_triangular, self.min_ndim_triangular,
                                 self.memory_save_mode)
            plan = self._plans[shape] = KronFactorLayout(tuple(merged), diag)
        return plan

    def momentum_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        return buffer_dtype(param_dtype, self.mu_dtype)

    def factor_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        return precond_dtype(param_dtype, self.precond_dtype)

    def _init_factors(self, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        plan = self.plan(p.shape)
        dtype = self.factor_dtype(p.dtype)
        scale = 1.0 if self.precond_init_scale is None else self.precond_init_scale
        scale = scale ** (1 / len(plan.merged_shape))
        out = []
        for size, diag in zip(plan.merged_shape, plan.diagonal):
            if diag:
                out.append(scale * torch.ones(size, dtype=dtype, device=p.device))
            else:
                out.append(scale * torch.eye(size, dtype=dtype, device=p.device))
        return tuple(out)

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, params: Any) -> dict:
        leaves, _ = check_param_leaves(self.name, params)
        device = state_device(leaves)
        gen_device = device if device.type not in ("meta",) else torch.device("cpu")
        gen = torch.Generator(device=gen_device)
        gen.manual_seed(self.seed)
        entries = init_state_entries(self.state_spec, params, device, dtype=self.momentum_dtype)
        return {
            "step": torch.zeros((), dtype=torch.int32, device=device),
            HPARAMS_KEY: init_hyperparams(self.hyperparams, device),
            **{k: entries[k] for k in _HOST_COUNTERS},
            "rng": gen.get_state(),
            "momentum_buffer": entries["momentum_buffer"],
            "Q": _tree.map_tree(self._init_factors, params),
            MADE_BY_KEY: made_by(self.name),
        }

    def check_state(self, params: Any, p_leaves: list, spec: optree.PyTreeSpec, state: dict
                    ) -> tuple[list, list, tuple[int, int, int, torch.Tensor]]:
        """(momentum leaves, factor leaves, :meth:`_host_counters`) after checking the state."""
        check_state_keys(self.name, state, ["step", HPARAMS_KEY, *_HOST_COUNTERS, "rng",
                                            "momentum_buffer", "Q"], identified=True)
        stored = state[HPARAMS_KEY]
        if not isinstance(stored, Mapping) or set(stored) != set(self.hyperparams):
            got = sorted(stored) if isinstance(stored, Mapping) else stored
            raise ValueError(f"{self.name}: state['{HPARAMS_KEY}'] must have "
                             f"{sorted(self.hyperparams)}, got {got}")
        m_leaves = check_state_entries(self.name, self.state_spec, params, p_leaves,
                                       state)["momentum_buffer"]
        v = state["step"]
        if not (isinstance(v, torch.Tensor) and v.ndim == 0 and not v.is_floating_point()):
            raise ValueError(f"{self.name}: state['step'] must be a 0-d integer tensor, got "
                             f"{_tree.describe_leaf(v)}")
        rng = state["rng"]
        if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.ndim == 1):
            raise ValueError(f"{self.name}: state['rng'] must be a torch.Generator state (a 1-D "
                             f"uint8 tensor), got {_tree.describe_leaf(rng)}")
        q_leaves = self._tree_leaves(params, state["Q"], "Q")
        for i, (p, q) in enumerate(zip(p_leaves, q_leaves)):
            if p is None:
                continue
            plan = self.plan(p.shape)
            want = [(d,) if diag else (d, d) for d, diag in zip(plan.merged_shape, plan.diagonal)]
            ok = isinstance(q, (tuple, list)) and len(q) == len(want) and all(
                isinstance(f, torch.Tensor) and f.is_floating_point() and tuple(f.shape) == w
                and f.device == p.device for f, w in zip(q, want))
            if not ok:
                where = _tree.leaf_paths_on_error(params, i)
                got = ([_tree.describe_leaf(f) for f in q] if isinstance(q, (tuple, list))
                       else _tree.describe_leaf(q))
                raise ValueError(f"{self.name}: state['Q'] at {where!r} must be "
                                 f"{len(want)} factors on {p.device} of shapes {want} (merged "
                                 f"shape {plan.merged_shape}), got {got}; was the state made by "
                                 "another configuration?")
        return m_leaves, q_leaves, self._host_counters(state)

    def _tree_leaves(self, params, sub, key) -> list:
        try:
            spec = _tree.structure(params)
            return spec.flatten_up_to(sub)
        except (ValueError, TypeError):
            raise ValueError(f"{self.name}: state[{key!r}] must have the same tree structure as "
                             "params (was the state made for other params?)") from None

    # -- host-side decisions -------------------------------------------------------------------
    def _host_counters(self, state) -> tuple[int, int, int, torch.Tensor]:
        """The counters the step decisions are made from, as ints (``prob_step``,
        ``update_counter``, ``precond_updates``), and the generator state ``rng``, on the CPU."""
        vals = []
        for k in _HOST_COUNTERS:
            v = state[k]
            vals.append(int(v if v.device.type == "cpu" else v.cpu()))
        rng = state["rng"]
        if rng.device.type != "cpu":
            rng = rng.cpu()
        return vals[0], vals[1], vals[2], rng

    @staticmethod
    def _generator(rng: torch.Tensor, device: torch.device) -> torch.Generator:
        """A generator holding ``rng``: on ``device`` when that is its kind, else on the CPU."""
        for dev in dict.fromkeys([device, torch.device("cpu")]):
            if dev.type == "meta":
                continue
            gen = torch.Generator(device=dev)
            try:
                gen.set_state(rng)
            except (RuntimeError, ValueError, TypeError):
                continue
            return gen
        raise ValueError(f"kron: state['rng'] ({rng.numel()} bytes) is not a torch.Generator "
                         f"state for {device} or the CPU")

    # -- update --------------------------------------------------------------------------------
    def step_tree(self, params: Any, p_leaves: list, g_leaves: list, spec: optree.PyTreeSpec,
                  checked: tuple[list, list, tuple[int, int, int, torch.Tensor]],
                  hp: dict[str, torch.Tensor], state: dict, *, donate: bool, **extra: Any
                  ) -> tuple[list, dict]:
        """The host-side decisions (preconditioner update, balancing) from the CPU counters,
        then :meth:`_step` on the non-empty leaves that have a gradient."""
        m_leaves, q_leaves, (n, counter, n_updates, rng) = checked
        do_update, new_counter = update_decision(self.update_probability, n, counter)
        balance = (do_update and self.balance_every > 0
                   and (n_updates + 1) % self.balance_every == 0)
        device = state["step"].device
        gen = self._generator(rng, device) if do_update else None

        step = state["step"] + 1
        active = [i for i, (p, g) in enumerate(zip(p_leaves, g_leaves))
                  if p is not None and g is not None and p.numel() > 0]
        new_p, new_m, new_q = list(p_leaves), list(m_leaves), list(q_leaves)
        if active:
            ps = [p_leaves[i] for i in active]
            gs = [g_leaves[i] for i in active]
            ops = ListOps(per_tensor=needs_per_tensor(ps, gs, scalars=list(hp.values())))
            out_p, out_m, out_q = self._step(ops, ps, gs, [m_leaves[i] for i in active],
                                             [q_leaves[i] for i in active], hp, step, gen,
                                             do_update=do_update, balance=balance,
                                             first=n == 0, donate=donate)
            for j, i in enumerate(active):
                new_p[i], new_m[i], new_q[i] = out_p[j], out_m[j], out_q[j]

        new_state = {
            "step": step,
            HPARAMS_KEY: hp,
            "prob_step": torch.tensor(n + 1, dtype=_INT),
            "update_counter": torch.tensor(new_counter, dtype=_INT),
            "precond_updates": torch.tensor(n_updates + int(do_update), dtype=_INT),
            "rng": gen.get_state() if gen is not None else state["rng"],
            "momentum_buffer": _tree.unflatten(spec, new_m),
            "Q": _tree.unflatten(spec, new_q),
        }
        return new_p, new_state

    def _step(self, ops, ps, gs, ms, qs, hp, step, gen, *, do_update, balance, first, donate):
        new_m, m_hat = self._momentum(ops, ps, gs, ms, hp["b1"], step, donate=donate)
        updates, factors = self._preconditioned(ps, gs, m_hat, qs, hp, gen, do_update=do_update,
                                                balance=balance, first=first)
        new_p = self._apply_updates(ops, ps, updates, hp, donate=donate)
        return new_p, new_m, factors

    def _momentum(self, ops, ps, gs, ms, b1, step, *, donate) -> tuple[list, list]:
        """Step 1: the momentum and its bias correction ``m̂`` (in the preconditioner dtype),
        multi-tensor per (device, momentum dtype). Returns ``(momentum, m̂)``."""
        new_m: list = [None] * len(ps)
        m_hat: list = [None] * len(ps)
        for (dev, mdt), (msub, gsub), idx in group_by_device_and_dtype([ms, gs]):
            gsub = widen(gsub, mdt)
            b1_d = b1 if b1.device == dev else b1.to(dev)
            step_d = step if step.device == dev else step.to(dev)
            mnew = ema(ops, msub, gsub, b1_d, inplace=donate)
            mh = ops.div(mnew, bias_correction(b1_d, step_d))
            for j, a, b in zip(idx, mnew, mh):
                new_m[j] = a
                pd = self.factor_dtype(ps[j].dtype)
                m_hat[j] = b if b.dtype == pd else b.to(pd)
        return new_m, m_hat

    def _preconditioned(self, ps, gs, m_hat, qs, hp, gen, *, do_update, balance, first
                        ) -> tuple[list, list]:
        """Step 2: the factors (data-derived initial scale, balancing, preconditioner update),
        then ``U = P·m̂``. Returns ``(updates, factors)``."""
        factors = [list(q) for q in qs]
        if first and self.precond_init_scale is None:
            factors = self._data_init_scale(ps, gs, factors)
        srcs = [None] * len(ps) if self.momentum_into_precond_update else gs
        if has_dtensor(m_hat):
            return self._sharded_precondition(ps, m_hat, srcs, factors, hp["precond_lr"], gen,
                                              do_update=do_update, balance=balance)
        # the probes are drawn leaf by leaf, in tree order
        probes = [self._probe(p, gen) if do_update else None for p in ps]
        return self._precondition([tuple(p.shape) for p in ps], m_hat, srcs, factors, probes,
                                  hp["precond_lr"], do_update=do_update, balance=balance)

    def _apply_updates(self, ops, ps, updates, hp, *, donate) -> list:
        """Step 3: RMS clip at 1.1, weight decay on ≥2-D leaves, step, in the wider of the param
        and preconditioner dtypes (float32 for bf16 params, float64 for float64 params); per
        (device, that dtype)."""
        for j, (u, p) in enumerate(zip(updates, ps)):
            work = torch.promote_types(u.dtype, p.dtype)
            if u.dtype != work:
                updates[j] = u.to(work)
        new_p: list = [None] * len(ps)
        for (dev, pd), (usub, psub), idx in group_by_device_and_dtype([updates, ps]):
            lr = hp["lr"].to(dev)
            wd = hp["weight_decay"].to(dev)
            # RMS = ‖U‖/sqrt(numel), float64; the sizes are kernel scalars (no host-to-device copy)
            norms = ops.norm(usub)
            roots = [math.sqrt(u.numel()) for u in usub]
            rms = torch.stack(ops.div(norms, roots) if not ops.per_tensor else
                              [x / r for x, r in zip(norms, roots)])
            clip = (RMS_CLIP / (rms + 1e-12)).clamp(max=1.0)
            coefs = list((-lr * clip).unbind())
            usub = ops.mul(usub, coefs, inplace=not ops.per_tensor)
            decay_flags = [p.ndim >= 2 for p in psub]
            decay_on = any(decay_flags) and read_on_host([hp["weight_decay"]]) != [0.0]
            mixed = [p.dtype != pd for p in psub]
            pw = widen(psub, pd)
            # in place only on donated params of the working dtype (others are fresh copies)
            owned = [mx or donate for mx in mixed]
            out: list = [None] * len(psub)
            for (decay, own), ks in _partition(
                    [(decay_on and f, o) for f, o in zip(decay_flags, owned)]):
                xs = decoupled_decay(ops, [pw[k] for k in ks], lr, wd, decay=decay, inplace=own)
                xs = ops.add(xs, [usub[k] for k in ks], inplace=own or decay)
                for k, x in zip(ks, xs):
                    out[k] = x
            for j, o, p, mx in zip(idx, out, psub, mixed):
                new_p[j] = ops.write_back([p], [o], donate=donate)[0] if mx else o
        return new_p

    def _probe(self, p: torch.Tensor, gen: torch.Generator) -> Callable[[], torch.Tensor]:
        """The probe ``V ~ N(0, I)`` of a leaf (its merged shape, in the preconditioner dtype),
        drawn from ``gen`` when called."""
        shape = self.plan(p.shape).merged_shape
        dtype = self.factor_dtype(p.dtype)
        return lambda: torch.randn(shape, generator=gen, dtype=dtype, device=gen.device)

    def _precondition(self, shapes, m_hat, srcs, factors, probes, precond_lr, *, do_update,
                      balance) -> tuple[list, list]:
        """The whole-matrix part of a step, per leaf: balancing, the factor update from the
        probe, then ``U = P·m̂`` (param-shaped, in the preconditioner dtype). ``srcs``: the
        gradients when the factors learn from them (``momentum_into_precond_update=False``),
        else ``None``s; ``probes``: the leaves' ``V`` (tensors, or callables drawing them), used
        on update steps. Returns ``(updates, factors)``."""
        updates, new_q = [], []
        for shape, mh, g, q, v in zip(shapes, m_hat, srcs, factors, probes):
            plan = self.plan(shape)
            mh = mh.reshape(plan.merged_shape)
            q = list(q)
            if balance and len(plan.merged_shape) > 1:
                q = balance_factors(q)
            if do_update:
                pd = mh.dtype
                src = mh if g is None else g.to(pd).reshape(plan.merged_shape)
                v = v() if callable(v) else v
                if v.device != mh.device:
                    v = v.to(mh.device)
                q = update_factors(q, src, v, precond_lr.to(mh.device))
            new_q.append(tuple(q))
            updates.append(kron_precondition(q, mh).reshape(shape))
        return updates, new_q

    def _sharded_precondition(self, ps, m_hat, srcs, factors, precond_lr, gen, *, do_update,
                              balance) -> tuple[list, list]:
        """:meth:`_precondition` on DTensor leaves (FSDP2 shards), each leaf one
        :func:`functim.distributed.owner_compute` job: ``m̂`` (and the gradient if the factors
        learn from it) gathered whole on the leaf's owner rank, ``U`` scattered back to the
        shards, the new factors broadcast (only on calls that change them). The probes are drawn
        here for every leaf, on every rank, in tree order (the unsharded draws), so the
        generator state stays the same on all ranks and equals the unsharded run's."""
        from ..distributed import owner_compute

        shapes = [tuple(p.shape) for p in ps]
        probes = [self._probe(p, gen)() if do_update else None for p in ps]
        changed = do_update or (balance and any(len(self.plan(s).merged_shape) > 1
                                                for s in shapes))
        K = max(len(q) for q in factors)

        def pad(q):
            return [q[k] if k < len(q) else None for k in range(K)]

        q_out = [list(col) for col in zip(*[pad(q) if changed else [None] * K for q in factors])]

        def fn(shapes_, m_hat_, srcs_, factors_, probes_):
            u, q = self._precondition(shapes_, m_hat_, srcs_, factors_, probes_, precond_lr,
                                      do_update=do_update, balance=balance)
            return [(a, *pad(b)) for a, b in zip(u, q)]

        res = owner_compute(fn, shapes, m_hat, srcs, factors, probes, out=(m_hat, *q_out))
        updates = [r[0] for r in res]
        new_q = [tuple(x for x in r[1:] if x is not None) if changed else tuple(q)
                 for r, q in zip(res, factors)]
        return updates, new_q

    def _data_init_scale(self, ps, gs, factors):
        """PSGD's data-derived initial scale (see the module docstring), applied to identity-scale
        factors on the first step."""
        dev = ps[0].device
        m4 = [g.to(self.factor_dtype(p.dtype)).abs().pow(4).mean() for p, g in zip(ps, gs)]
        # a DTensor leaf's mean is the whole tensor's, replicated: as a plain value here
        m4 = torch.stack([(x.full_tensor() if is_dtensor(x) else x).to(
            dtype=torch.float64, device=dev) for x in m4])
        scale = (m4.amax() + 1e-36) ** (-1 / 8)
        out = []
        for p, q in zip(ps, factors):
            k = len(self.plan(p.shape).merged_shape)
            s = scale ** (1 / k)
            out.append([f * s.to(device=f.device, dtype=f.dtype) for f in q])
        return out


def _partition(keys: Sequence) -> list[tuple[Any, list[int]]]:
    """The indices of ``keys`` grouped by key, in first-seen order: ``[(key, indices), ...]``."""
    groups: dict = {}
    for k, key in enumerate(keys):
        groups.setdefault(key, []).append(k)
    return list(groups.items())


def kron(
    lr: ScalarOrSchedule = 3e-4,
    b1: ScalarOrSchedule = 0.9,
    weight_decay: ScalarOrSchedule = 0.0,
    preconditioner_update_probability: float | Callable[[torch.Tensor], Any] | None = None,
    max_size_triangular: int = 8192,
    min_ndim_triangular: int = 2,
    memory_save_mode: str | None = None,
    momentum_into_precond_update: bool = True,
    precond_lr: ScalarOrSchedule = 0.1,
    precond_init_scale: float | None = 1.0,
    merge_dims: bool = True,
    mu_dtype: torch.dtype | None = None,
    precond_dtype: torch.dtype | None = None,
    *,
    balance_every: int = 100,
    seed: int = 42,
) -> Kron:
    """PSGD Kron with kron_torch's keywords and defaults (see the module docstring).

    ``preconditioner_update_probability``: ``None`` (the reference's schedule,
    :func:`precond_update_prob_schedule`), a number in [0, 1] (0: never update), or a callable of
    the float32 0-d tensor ``n`` (steps done) returning a number or a CPU tensor (the reference's
    contract; it is called on the host every step, and a tensor on an accelerator would sync).
    ``lr``, ``b1``, ``weight_decay`` and ``precond_lr`` are hyperparameters (numbers, 0-d tensors
    or functim schedules) stored in the state. ``balance_every`` and ``seed``: see the module
    docstring. README: lr about 3× smaller than Adam's, weight decay 3–10× larger.
    """
    return Kron(lr=lr, b1=b1, weight_decay=weight_decay, precond_lr=precond_lr,
                preconditioner_update_probability=preconditioner_update_probability,
                max_size_triangular=max_size_triangular, min_ndim_triangular=min_ndim_triangular,
                memory_save_mode=memory_save_mode,
                momentum_into_precond_update=momentum_into_precond_update,
                precond_init_scale=precond_init_scale, merge_dims=merge_dims, mu_dtype=mu_dtype,
                precond_dtype=precond_dtype, balance_every=balance_every, seed=seed)
