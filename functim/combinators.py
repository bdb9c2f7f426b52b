"""Combinators: build optimizers from optimizers (optax-style); each result is again an
:class:`functim.Optimizer` with pure ``init_state``/``update``.

- :func:`chain` — gradient transforms (e.g. :func:`clip_by_global_norm`) then an optimizer;
- :func:`partition` — route leaves to optimizers by path/ndim/shape rules (:mod:`functim.rules`);
- :func:`accumulate` — gradient accumulation over ``every`` calls (optax ``MultiSteps``);
- :func:`skip_nonfinite` — a step whose grads hold NaN/Inf changes nothing and is counted.

Every per-parameter buffer keeps the full params structure (``None`` where a leaf is not
handled), so nested states still line up with the params tree.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import _tree
from .hyperparams import (
    HPARAMS_KEY,
    POSITIVE,
    ScalarOrSchedule,
    check_hyperparam,
    init_hyperparams,
    resolve_hyperparams,
)
from .optimizer import Optimizer, State
from .rules import Explanation, Rule, explain, rule_labels
from .runtime import needs_per_tensor
from .schedules import Schedule
from .state import check_state_keys

PyTree = Any


# -- gradient transforms ------------------------------------------------------------------
class GradientTransform(abc.ABC):
    """A pure gradient pre-processing step:
    ``transform(grads, state, params) -> (grads, state)``."""

    name = "transform"

    @abc.abstractmethod
    def init_state(self, params: PyTree) -> State:
        """The transform's complete state."""

    @abc.abstractmethod
    def transform(self, grads: PyTree, state: State, params: PyTree,
                  step: torch.Tensor | None = None) -> tuple[PyTree, State]:
        """``step``: completed updates of the optimizer it precedes (for schedules)."""

    def hyperparam_ranges(self) -> dict:
        return {}

    def hyperparam_schedules(self) -> dict:
        """As :meth:`functim.Optimizer.hyperparam_schedules`."""
        return {}


def _prefixed(prefix: str, ranges: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in ranges.items()}


def _norms(grads: list[torch.Tensor], ord: float) -> list[torch.Tensor]:
    """Per-tensor vector norms (one multi-tensor kernel per (device, dtype) group)."""
    if needs_per_tensor(grads):
        return [torch.linalg.vector_norm(g, ord) for g in grads]
    out: list[torch.Tensor] = [None] * len(grads)  # type: ignore[list-item]
    groups: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault((g.device, g.dtype), []).append(i)
    for idx in groups.values():
        for i, n in zip(idx, torch._foreach_norm([grads[i] for i in idx], ord)):
            out[i] = n
    return out


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all tensors together, in float32 (or float64 if any grad is float64)."""
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    norms = [n.to(device) for n in _norms(grads, 2.0)]
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]), 2.0)


class _ClipByGlobalNorm(GradientTransform):
    name = "clip_by_global_norm"

    def __init__(self, max_norm: ScalarOrSchedule):
        check_hyperparam(self.name, "max_norm", max_norm, POSITIVE)
        self.max_norm = max_norm

    def hyperparam_ranges(self):
        return {"max_norm": POSITIVE}

    def hyperparam_schedules(self):
        return {"max_norm": self.max_norm} if isinstance(self.max_norm, Schedule) else {}

    def init_state(self, params):
        leaves, _ = _tree.flatten(params)
        device = next((x.device for x in leaves if x is not None), torch.device("cpu"))
        return {HPARAMS_KEY: init_hyperparams({"max_norm": self.max_norm}, device),
                "grad_norm": torch.zeros((), dtype=torch.float32, device=device)}

    def transform(self, grads, state, params, step=None):
        check_state_keys(self.name, state, [HPARAMS_KEY, "grad_norm"])
        g_leaves, spec = _tree.flatten(grads)
        present = [g for g in g_leaves if g is not None]
        hp = resolve_hyperparams({"max_norm": self.max_norm}, state[HPARAMS_KEY],
                                 step if step is not None else torch.zeros((), dtype=torch.int32))
        if not present:
            return grads, {HPARAMS_KEY: hp, "grad_norm": state["grad_norm"]}
        total = global_norm(present)
        # torch.nn.utils.clip_grad_norm_: coef = max_norm / (total + 1e-6), clamped to 1
        coef = torch.clamp(hp["max_norm"].to(total.device) / (total + 1e-6), max=1.0)
        scaled = iter(_scale(present, coef))
        out = [None if g is None else next(scaled) for g in g_leaves]
        return _tree.unflatten(spec, out), {
            HPARAMS_KEY: hp, "grad_norm": total.to(state["grad_norm"].dtype)}


def _scale(xs: list[torch.Tensor], coef: torch.Tensor) -> list[torch.Tensor]:
    if needs_per_tensor(xs, scalars=[coef]):
        return [x * coef.to(x.dtype) for x in xs]
    out = list(xs)
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault((x.device, x.dtype), []).append(i)
    for (dev, dt), idx in groups.items():
        for i, y in zip(idx, torch._foreach_mul([xs[i] for i in idx], coef.to(dev, dt))):
            out[i] = y
    return out


def clip_by_global_norm(max_norm: ScalarOrSchedule) -> GradientTransform:
    """Scale all grads by ``min(1, max_norm / (‖g‖₂ + 1e-6))`` (torch ``clip_grad_norm_``).
    The state records the pre-clip ``grad_norm`` for logging."""
    return _ClipByGlobalNorm(max_norm)


class Chain(Optimizer):
    name = "chain"

    def __init__(self, transforms: Sequence[GradientTransform], optimizer: Optimizer):
        self.transforms = tuple(transforms)
        self.optimizer = optimizer

    def __repr__(self):
        return f"chain({', '.join(map(repr, self.transforms))}, {self.optimizer!r})"

    def hyperparam_ranges(self):
        out = _prefixed("optimizer", self.optimizer.hyperparam_ranges())
        for i, t in enumerate(self.transforms):
            out.update(_prefixed(f"transforms.{i}", t.hyperparam_ranges()))
        return out

    def hyperparam_schedules(self):
        out = _prefixed("optimizer", self.optimizer.hyperparam_schedules())
        for i, t in enumerate(self.transforms):
            out.update(_prefixed(f"transforms.{i}", t.hyperparam_schedules()))
        return out

    def init_state(self, params):
        return {"transforms": [t.init_state(params) for t in self.transforms],
                "optimizer": self.optimizer.init_state(params)}

    def _check(self, params, grads, state):
        check_state_keys(self.name, state, ["transforms", "optimizer"])
        if len(state["transforms"]) != len(self.transforms):
            raise ValueError(f"chain: state has {len(state['transforms'])} transform states, "
                             f"this chain has {len(self.transforms)} transforms")
        _tree.check_grads(self.name, params, grads)

    def validate(self, params, grads, state):
        self._check(params, grads, state)
        self.optimizer.validate(params, grads, state["optimizer"])

    def update(self, params, grads, state, *, donate=False, **extra):
        # transforms are pure; the optimizer validates its own inputs before writing
        self._check(params, grads, state)
        step = _find_step(state["optimizer"])
        new_t = []
        for t, s in zip(self.transforms, state["transforms"]):
            grads, s = t.transform(grads, s, params, step=step)
            new_t.append(s)
        params, opt_state = self.optimizer.update(params, grads, state["optimizer"],
                                                  donate=donate, **extra)
        return params, {"transforms": new_t, "optimizer": opt_state}


def _find_step(state: Any) -> torch.Tensor | None:
    """The inner optimizer's step counter (for schedules inside transforms)."""
    if isinstance(state, Mapping):
        if "step" in state and isinstance(state["step"], torch.Tensor):
            return state["step"]
        for v in state.values():
            s = _find_step(v)
            if s is not None:
                return s
    return None


def chain(*parts: GradientTransform | Optimizer) -> Optimizer:
    """``chain(t1, t2, ..., optimizer)``: apply gradient transforms in order, then the optimizer.
    State: ``{"transforms": [state of t1, ...], "optimizer": state of optimizer}``."""
    if not parts or not isinstance(parts[-1], Optimizer):
        raise TypeError("chain(...) must end with a functim Optimizer, e.g. "
                        "chain(clip_by_global_norm(1.0), adamw(...))")
    for p in parts[:-1]:
        if not isinstance(p, GradientTransform):
            raise TypeError(f"chain: {p!r} is not a GradientTransform; only the last argument "
                            "may be an Optimizer")
    return Chain(parts[:-1], parts[-1])


# -- partition ----------------------------------------------------------------------------
class Partition(Optimizer):
    """Route each leaf to one optimizer by rules (see :mod:`functim.rules`).

    Each optimizer sees the full params tree with ``None`` at leaves it does not own, so its
    buffers keep the params structure. State: ``{"partition": {label: state}}``.
    """

    name = "partition"

    def __init__(self, rules: Sequence[Rule] | Mapping[str, Any],
                 optimizers: Mapping[str, Optimizer]):
        if not isinstance(optimizers, Mapping) or not optimizers:
            raise TypeError("partition: optimizers must be a non-empty dict {label: Optimizer}")
        for lab, o in optimizers.items():
            if not isinstance(o, Optimizer):
                raise TypeError(f"partition: optimizers[{lab!r}] is not a functim Optimizer")
        labels = rule_labels(self.name, rules)
        unknown = sorted(set(labels) - set(optimizers))
        if unknown:
            raise ValueError(f"partition: rules name labels {unknown} that have no optimizer "
                             f"(optimizers: {sorted(optimizers)})")
        self.rules = rules if isinstance(rules, Mapping) else tuple(rules)
        self.optimizers = dict(optimizers)
        self._cache: dict = {}

    def __repr__(self):
        return f"partition({self.rules!r}, {self.optimizers!r})"

    def hyperparam_ranges(self):
        out = {}
        for lab, o in self.optimizers.items():
            out.update(_prefixed(f"partition.{lab}", o.hyperparam_ranges()))
        return out

    def hyperparam_schedules(self):
        out = {}
        for lab, o in self.optimizers.items():
            out.update(_prefixed(f"partition.{lab}", o.hyperparam_schedules()))
        return out

    def explain(self, params: PyTree) -> Explanation:
        """Which rule claimed each leaf (raises for unclaimed or doubly-claimed leaves)."""
        return explain(self.rules, params)

    def _labels(self, params) -> list[str | None]:
        leaves, spec = _tree.flatten(params)
        key = (spec, tuple(None if x is None else tuple(x.shape) for x in leaves))
        labels = self._cache.get(key)
        if labels is None:
            labels = [a.label for a in self.explain(params)]
            self._cache[key] = labels
        return labels

    def _masked(self, tree, spec, leaves, labels, label):
        return _tree.unflatten(spec, [x if lab == label else None
                                      for x, lab in zip(leaves, labels)])

    def init_state(self, params):
        labels = self._labels(params)
        leaves, spec = _tree.flatten(params)
        return {"partition": {
            lab: o.init_state(self._masked(params, spec, leaves, labels, lab))
            for lab, o in self.optimizers.items()}}

    def validate(self, params, grads, state):
        check_state_keys(self.name, state, ["partition"])
        check_state_keys(self.name + " labels", state["partition"], list(self.optimizers))
        p_leaves, g_leaves, spec = _tree.check_grads(self.name, params, grads)
        labels = self._labels(params)
        for lab, o in self.optimizers.items():
            o.validate(self._masked(params, spec, p_leaves, labels, lab),
                       self._masked(grads, spec, g_leaves, labels, lab), state["partition"][lab])

    def update(self, params, grads, state, *, donate=False, **extra):
        if donate:  # check every label before the first one writes in place
            self.validate(params, grads, state)
        check_state_keys(self.name, state, ["partition"])
        check_state_keys(self.name + " labels", state["partition"], list(self.optimizers))
        p_leaves, g_leaves, spec = _tree.check_grads(self.name, params, grads, donate=donate)
        labels = self._labels(params)
        out = list(p_leaves)
        new_states = {}
        for lab, o in self.optimizers.items():
            sub_p = self._masked(params, spec, p_leaves, labels, lab)
            sub_g = self._masked(grads, spec, g_leaves, labels, lab)
            new_p, new_states[lab] = o.update(sub_p, sub_g, state["partition"][lab],
                                              donate=donate, **extra)
            for i, (x, lab_i) in enumerate(zip(_tree.flatten(new_p)[0], labels)):
                if lab_i == lab:
                    out[i] = x
        return _tree.unflatten(spec, out), {"partition": new_states}


def partition(rules: Sequence[Rule] | Mapping[str, Any],
              optimizers: Mapping[str, Optimizer]) -> Partition:
    """Route leaves to ``optimizers[label]`` by ``rules`` (ordered :class:`Rule` list, first match
    wins; or ``{label: selector}``, exclusive). ``.explain(params)`` prints the routing table."""
    return Partition(rules, optimizers)


# -- accumulate ---------------------------------------------------------------------------
class Accumulate(Optimizer):
    """Gradient accumulation (optax ``MultiSteps``): grads are summed over ``every`` calls; the
    last call of each cycle runs the inner optimizer on their mean, the others return the params
    unchanged.

    The cycle position ``micro_step`` is an int32 tensor kept **on the CPU**, so deciding whether
    this call steps reads host memory only (no device synchronisation). That decision is
    data-dependent Python control flow, so this combinator is for eager loops: it does not run
    under ``torch.compile(fullgraph=True)`` or ``vmap``. A leaf whose grad is ``None`` on the
    stepping call is not updated that step.
    """

    name = "accumulate"

    def __init__(self, optimizer: Optimizer, every: int):
        if not isinstance(optimizer, Optimizer):
            raise TypeError("accumulate: optimizer must be a functim Optimizer")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"accumulate: 'every' must be an int >= 1, got {every!r}")
        self.optimizer, self.every = optimizer, every

    def __repr__(self):
        return f"accumulate({self.optimizer!r}, every={self.every})"

    def hyperparam_ranges(self):
        return _prefixed("optimizer", self.optimizer.hyperparam_ranges())

    def hyperparam_schedules(self):
        return _prefixed("optimizer", self.optimizer.hyperparam_schedules())

    def init_state(self, params):
        return {
            "micro_step": torch.zeros((), dtype=torch.int32),
            "grad_sum": _tree.map_tree(lambda p: torch.zeros_like(
                p, dtype=torch.float32 if p.dtype in (torch.bfloat16, torch.float16)
                else p.dtype), params),
            "optimizer": self.optimizer.init_state(params),
        }

    def validate(self, params, grads, state):
        check_state_keys(self.name, state, ["micro_step", "grad_sum", "optimizer"])
        p_leaves, _, _ = _tree.check_grads(self.name, params, grads)
        _, s_leaves, _ = _tree.check_same_structure(
            params, state["grad_sum"], ref_name="params", other_name="state['grad_sum']")
        for i, (p, s) in enumerate(zip(p_leaves, s_leaves)):
            if p is not None and (not isinstance(s, torch.Tensor) or s.shape != p.shape):
                raise ValueError(
                    f"{self.name}: state['grad_sum'] at {_tree.leaf_paths_on_error(params, i)!r} "
                    f"is {_tree.describe_leaf(s)}, expected shape {tuple(p.shape)}")
        self.optimizer.validate(params, grads, state["optimizer"])

    def update(self, params, grads, state, *, donate=False, **extra):
        self.validate(params, grads, state)
        _, g_leaves, spec = _tree.check_grads(self.name, params, grads, donate=donate)
        s_leaves, _ = _tree.flatten(state["grad_sum"])
        new_sum = []
        for s, g in zip(s_leaves, g_leaves):
            if s is None or g is None:
                new_sum.append(s)
            elif donate:
                new_sum.append(s.add_(g))
            else:
                new_sum.append(s + g)
        micro = state["micro_step"] + 1
        if int(micro) < self.every:  # CPU tensor: a host read, not a device sync
            return params, {"micro_step": micro, "grad_sum": _tree.unflatten(spec, new_sum),
                            "optimizer": state["optimizer"]}
        mean = [None if (s is None or g is None) else (s / self.every).to(g.dtype)
                for s, g in zip(new_sum, g_leaves)]
        params, opt_state = self.optimizer.update(params, _tree.unflatten(spec, mean),
                                                  state["optimizer"], donate=donate, **extra)
        zeroed = [None if s is None else (s.zero_() if donate else torch.zeros_like(s))
                  for s in new_sum]
        return params, {"micro_step": torch.zeros_like(micro),
                        "grad_sum": _tree.unflatten(spec, zeroed), "optimizer": opt_state}


def accumulate(optimizer: Optimizer, every: int) -> Accumulate:
    """Accumulate gradients over ``every`` calls, then step on their mean."""
    return Accumulate(optimizer, every)


# -- skip non-finite ----------------------------------------------------------------------
class SkipNonFinite(Optimizer):
    """A step whose grads contain NaN or Inf leaves the params and the inner state unchanged and
    increments ``skipped_steps``; decided on the device with ``torch.where`` (no host sync).

    Cost: the inner update runs out of place and the result is selected, one extra read/write of
    the params and state per step.
    """

    name = "skip_nonfinite"

    def __init__(self, optimizer: Optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError("skip_nonfinite: optimizer must be a functim Optimizer")
        self.optimizer = optimizer

    def __repr__(self):
        return f"skip_nonfinite({self.optimizer!r})"

    def hyperparam_ranges(self):
        return _prefixed("optimizer", self.optimizer.hyperparam_ranges())

    def hyperparam_schedules(self):
        return _prefixed("optimizer", self.optimizer.hyperparam_schedules())

    def init_state(self, params):
        inner = self.optimizer.init_state(params)
        leaves, _ = _tree.flatten(params)
        device = next((x.device for x in leaves if x is not None), torch.device("cpu"))
        return {"skipped_steps": torch.zeros((), dtype=torch.int32, device=device),
                "optimizer": inner}

    def validate(self, params, grads, state):
        check_state_keys(self.name, state, ["skipped_steps", "optimizer"])
        self.optimizer.validate(params, grads, state["optimizer"])

    def update(self, params, grads, state, *, donate=False, **extra):
        check_state_keys(self.name, state, ["skipped_steps", "optimizer"])
        _, g_leaves, _ = _tree.check_grads(self.name, params, grads, donate=donate)
        # every tensor input of the step: the grads and any estimate passed along (Sophia's
        # hessian=), which would otherwise carry a NaN into the state
        present = [g for g in g_leaves if g is not None] + _extra_tensors(extra)
        device = state["skipped_steps"].device
        if present:
            finite = torch.stack([n.to(device) for n in _norms(present, float("inf"))]
                                 ).isfinite().all()
        else:
            finite = torch.ones((), dtype=torch.bool, device=device)
        params_out, inner_out = gated_update(self.optimizer, finite, params, grads,
                                             state["optimizer"], donate=donate, **extra)
        skipped = state["skipped_steps"] + (~finite).to(state["skipped_steps"].dtype)
        return params_out, {"skipped_steps": skipped, "optimizer": inner_out}


def _extra_tensors(extra: Mapping[str, Any]) -> list[torch.Tensor]:
    """The floating-point tensors in the extra keyword arguments of an update (trees of them,
    such as Sophia's ``hessian=``; callables and other values are not inputs to check)."""
    return [x for v in extra.values() for x in _tree.flatten(v)[0]
            if isinstance(x, torch.Tensor) and x.is_floating_point()]


def gated_update(optimizer: Optimizer, take: torch.Tensor, params: PyTree, grads: PyTree,
                 state: State, *, donate: bool = False, **extra: Any) -> tuple[PyTree, State]:
    """``optimizer.update`` applied where ``take`` (a 0-d bool tensor) is True; where it is False
    the params and ``state`` come back bitwise unchanged, decided on the device (no host sync).
    The update runs out of place and each tensor is selected with ``torch.where`` (into the old
    tensor when ``donate``). ``optimizer`` checks its inputs before anything is computed, and
    nothing is written before it returns."""
    new_params, new_state = optimizer.update(params, grads, state, donate=False, **extra)
    g_leaves = [g for g in _tree.flatten(grads)[0] if g is not None]
    in_place = donate and not needs_per_tensor(g_leaves)

    def select(new: Any, old: Any) -> Any:
        if not isinstance(new, torch.Tensor) or new is old:
            return new
        keep_new = take if take.device == new.device else take.to(new.device)
        if in_place and isinstance(old, torch.Tensor) and old.shape == new.shape \
                and old.dtype == new.dtype:
            return torch.where(keep_new, new, old, out=old)
        return torch.where(keep_new, new, old)

    return (_tree.map_leaves(select, new_params, params),
            _tree.map_leaves(select, new_state, state))


def skip_nonfinite(optimizer: Optimizer) -> SkipNonFinite:
    """Wrap ``optimizer`` so that a step with any NaN/Inf grad changes nothing (counted)."""
    return SkipNonFinite(optimizer)
