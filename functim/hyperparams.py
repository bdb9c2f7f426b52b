"""Hyperparameters: validated at construction, stored in the state as 0-d float64 tensors.

Any float hyperparameter accepts a number, a 0-d tensor (e.g. one you differentiate through with
``torch.func.grad``) or a :class:`~functim.schedules.Schedule`. Constants live in
``state["hyperparams"]`` and are read from there by ``update`` (so editing the state, e.g. with
:func:`set_hyperparams`, changes them without recompiling); a schedule is evaluated inside
``update`` at the step count and the value used is written back to the state for logging.

float64 is used so that bias corrections and ``lr/(1-β1^t)`` round like torch.optim's Python
double arithmetic; the scalars are cast to each tensor's dtype by the elementwise kernels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch

from .schedules import Schedule

ScalarOrSchedule = Union[float, int, torch.Tensor, Schedule]

HPARAMS_KEY = "hyperparams"
HPARAM_DTYPE = torch.float64


@dataclass(frozen=True)
class Range:
    """An interval for a hyperparameter: ``low <=/< value <=/< high``, finite values only (an
    infinite learning rate, weight decay or ε turns the params into NaN)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def contains(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        lo_ok = v > self.low if self.low_open else v >= self.low
        hi_ok = v < self.high if self.high_open else v <= self.high
        return lo_ok and hi_ok

    def __str__(self) -> str:
        lo = "(" if self.low_open or math.isinf(self.low) else "["
        hi = ")" if self.high_open or math.isinf(self.high) else "]"
        return f"{lo}{self.low}, {self.high}{hi}"


NONNEGATIVE = Range(0.0)
POSITIVE = Range(0.0, low_open=True)
BETA = Range(0.0, 1.0, high_open=True)
UNIT = Range(0.0, 1.0)


def _is_functorch_wrapped(t: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def check_hyperparam(owner: str, name: str, value: Any, allowed: Range) -> None:
    """Raise TypeError/ValueError naming ``owner`` and ``name`` if ``value`` is not acceptable."""
    where = f"{owner}: hyperparameter {name!r}"
    if isinstance(value, Schedule):
        lo, hi = value.min_value(), value.max_value()
        if not (allowed.contains(lo) and allowed.contains(hi)):
            raise ValueError(f"{where} must stay in {allowed}; the schedule spans [{lo}, {hi}]")
        return
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or not value.is_floating_point():
            raise TypeError(
                f"{where} must be a 0-d floating-point tensor, got shape {tuple(value.shape)} "
                f"dtype {value.dtype}"
            )
        if _is_functorch_wrapped(value) or value.device.type == "meta":
            return  # a traced value (torch.func): its range cannot be read here
        # Construction time, not inside update: reading the value once is fine.
        v = float(value.detach().cpu())
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{where} must be a float, a 0-d tensor or a functim schedule, "
            f"got {type(value).__name__}"
        )
    else:
        v = float(value)
    if not allowed.contains(v):
        raise ValueError(f"{where} must be in {allowed}, got {v}")


def check_option(owner: str, name: str, value: Any, allowed: Range) -> float:
    """A numeric option that is not a hyperparameter (it shapes the optimizer, e.g. Newton–Schulz's
    ``eps``): a real number (not a bool or a tensor), finite and in ``allowed``. Returns it as a
    float; raises a TypeError or ValueError naming ``owner`` and ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
    if not allowed.contains(float(value)):
        raise ValueError(f"{owner}: {name} must be in {allowed}, got {value!r}")
    return float(value)


def check_betas(owner: str, betas: Any, names: tuple[str, ...] = ("beta1", "beta2"), *,
                option: str = "betas") -> tuple:
    """``betas`` (the option called ``option``) is a tuple (or list) of ``len(names)`` values,
    each checked as a β (in [0, 1)) under its hyperparameter name."""
    if not isinstance(betas, (tuple, list)) or len(betas) != len(names):
        raise TypeError(f"{owner}: {option!r} must be a tuple of {len(names)} values, got "
                        f"{betas!r}")
    for n, b in zip(names, betas):
        check_hyperparam(owner, n, b, BETA)
    return tuple(betas)


def init_hyperparams(specs: Mapping[str, ScalarOrSchedule], device: torch.device) -> dict:
    """The ``state["hyperparams"]`` dict right after ``init_state`` (schedules at step 0)."""
    out = {}
    for name, spec in specs.items():
        if isinstance(spec, Schedule):
            out[name] = spec(torch.zeros((), dtype=torch.int32, device=device))
        elif isinstance(spec, torch.Tensor):
            out[name] = spec.to(device=device, dtype=HPARAM_DTYPE)
        else:
            out[name] = torch.full((), float(spec), dtype=HPARAM_DTYPE, device=device)
    return out


def resolve_hyperparams(
    specs: Mapping[str, ScalarOrSchedule], stored: Mapping[str, torch.Tensor], step: torch.Tensor
) -> dict:
    """Values used by this update: schedules evaluated at ``step`` (completed updates), constants
    read from the state."""
    out = {}
    for name, spec in specs.items():
        if isinstance(spec, Schedule):
            out[name] = spec(step).to(HPARAM_DTYPE)
        else:
            out[name] = stored[name]
    return out


def _walk_hparams(state: Any, prefix: str = ""):
    if isinstance(state, Mapping):
        for k, v in state.items():
            p = f"{prefix}.{k}" if prefix else str(k)
            if k == HPARAMS_KEY and isinstance(v, Mapping):
                for name, _t in v.items():
                    yield (f"{prefix}.{name}" if prefix else name), name, state, v
            else:
                yield from _walk_hparams(v, p)
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from _walk_hparams(v, f"{prefix}.{i}" if prefix else str(i))


def get_hyperparams(state: Any) -> dict[str, torch.Tensor]:
    """Every hyperparameter in a (possibly nested) state, keyed by dotted path, e.g.
    ``{"lr": ...}`` for ``adamw``, ``{"optimizer.lr": ..., "transforms.0.max_norm": ...}`` for
    a chain."""
    return {path: sub[name] for path, name, _, sub in _walk_hparams(state)}


def _check_new_value(path: str, value: Any, allowed: Range) -> None:
    """A value for :func:`set_hyperparams` (see there)."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        check_hyperparam("set_hyperparams", path, value, allowed)
        return
    if not value.is_floating_point():
        raise TypeError(f"set_hyperparams: hyperparameter {path!r} must be floating point, got "
                        f"{value.dtype}")
    if value.device.type == "cpu" and not _is_functorch_wrapped(value):
        bad = [v for v in value.detach().flatten().tolist() if not allowed.contains(v)]
        if bad:
            raise ValueError(f"set_hyperparams: hyperparameter {path!r} must be in {allowed}, "
                             f"got {bad[0]} among its values")


def set_hyperparams(state: Any, *, optimizer: Any = None, **values: Any) -> Any:
    """A copy of ``state`` with hyperparameters replaced (pure: ``state`` is not modified).

    A keyword matches every hyperparameter with that name (``lr=1e-3`` sets all learning rates) or
    one full dotted path (pass it as ``**{"partition.muon.lr": 0.02}``). Unknown names raise.

    Every value is checked before anything is replaced: a finite number, or a floating tensor
    (of any shape: a vector gives each member of a :func:`functim.ensemble` its own value) whose
    elements are finite where they can be read without a device sync (on the CPU, outside
    torch.func). A TypeError or ValueError names it otherwise. With ``optimizer`` (the
    :class:`~functim.Optimizer` that made ``state``), each value must also be in that
    hyperparameter's range, as at construction (``optimizer.hyperparam_ranges()``); the state
    alone does not say which ranges apply.
    """
    ranges = optimizer.hyperparam_ranges() if optimizer is not None else {}
    schedules = optimizer.hyperparam_schedules() if optimizer is not None else {}

    def copy(s):
        if isinstance(s, Mapping):
            return {k: copy(v) for k, v in s.items()}
        if isinstance(s, list):
            return [copy(v) for v in s]
        if isinstance(s, tuple):
            return tuple(copy(v) for v in s)
        return s

    new = copy(state)
    used = set()
    for path, name, _, _sub in _walk_hparams(new):
        for key in (path, name):
            if key in values:
                if path in schedules:
                    raise ValueError(
                        f"set_hyperparams: hyperparameter {path!r} is driven by the schedule "
                        f"{schedules[path]!r}, which sets it at every update (the value set "
                        "here would be overwritten); build the optimizer with the schedule you "
                        "want")
                _check_new_value(path, values[key], ranges.get(path, Range()))
    for path, name, _, sub in list(_walk_hparams(new)):
        for key in (path, name):
            if key in values:
                old = sub[name]
                v = values[key]
                if isinstance(v, torch.Tensor):
                    sub[name] = v.to(device=old.device, dtype=old.dtype)
                else:
                    sub[name] = torch.full((), float(v), dtype=old.dtype, device=old.device)
                used.add(key)
    unknown = set(values) - used
    if unknown:
        raise ValueError(
            f"set_hyperparams: no hyperparameter named {sorted(unknown)}; "
            f"the state has {sorted(get_hyperparams(state))}"
        )
    return new
