"""Learning-rate (and any float hyperparameter) schedules: pure functions of the step tensor.

Step-index convention (docs/algorithms.md section 14): a schedule is evaluated at ``s`` = the number
of *completed* updates, so the first ``update`` uses ``schedule(0)``. This matches optax (count
starts at 0) and ``torch.optim.lr_scheduler.LambdaLR`` (``λ(0)`` is used by the first
``opt.step()``). Linear warmup is ``peak·s/W`` by default (0 on the first update, as nanoGPT);
``warmup_offset=1`` gives the modded-nanogpt form ``peak·(s+1)/W`` whose first update is nonzero.

Schedules evaluate in float64 with tensor ops only (no host sync, ``torch.compile``-clean) and
also accept a Python int or a vector of steps (handy for plotting).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Literal

import torch


def _as_step(step) -> torch.Tensor:
    s = torch.as_tensor(step)
    return s.to(torch.float64)


def _check(name: str, value: float, *, low: float = 0.0, allow_equal: bool = True) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"schedule argument {name!r} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < low or (not allow_equal and value == low):
        op = ">=" if allow_equal else ">"
        raise ValueError(f"schedule argument {name!r} must be finite and {op} {low}, got {value}")


class Schedule(abc.ABC):
    """Base class: ``schedule(step) -> float64 tensor`` (0-d for a 0-d step). Subclasses are
    frozen dataclasses."""

    @abc.abstractmethod
    def __call__(self, step) -> torch.Tensor:
        """The value at ``step`` completed updates."""

    @abc.abstractmethod
    def min_value(self) -> float:
        """The smallest value the schedule takes (used to validate hyperparameter ranges)."""

    @abc.abstractmethod
    def max_value(self) -> float:
        """The largest value the schedule takes."""


def _warmup(s: torch.Tensor, init: float, peak: float, steps: int, offset: int) -> torch.Tensor:
    if steps == 0:
        return torch.full_like(s, peak)
    frac = torch.clamp((s + offset) / steps, max=1.0)
    return init + (peak - init) * frac


@dataclass(frozen=True)
class constant_schedule(Schedule):
    """``lr(s) = value`` for every step."""

    value: float

    def __post_init__(self):
        _check("value", self.value, low=-math.inf)

    def __call__(self, step) -> torch.Tensor:
        return torch.full_like(_as_step(step), self.value)

    def min_value(self) -> float:
        return self.value

    def max_value(self) -> float:
        return self.value


@dataclass(frozen=True)
class linear_warmup(Schedule):
    """``init + (peak - init)·min(1, (s + warmup_offset)/warmup_steps)``, then ``peak``."""

    peak: float
    warmup_steps: int
    init: float = 0.0
    warmup_offset: int = 0

    def __post_init__(self):
        _check("peak", self.peak)
        _check("init", self.init)
        _check("warmup_steps", self.warmup_steps)
        if self.warmup_offset not in (0, 1):
            raise ValueError(f"warmup_offset must be 0 or 1, got {self.warmup_offset}")

    def __call__(self, step) -> torch.Tensor:
        s = _as_step(step)
        return _warmup(s, self.init, self.peak, self.warmup_steps, self.warmup_offset)

    def min_value(self) -> float:
        return min(self.init, self.peak)

    def max_value(self) -> float:
        return max(self.init, self.peak)


def _cosine(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.cos(math.pi * x))


@dataclass(frozen=True)
class cosine_decay(Schedule):
    """Cosine from ``peak`` at ``s=0`` to ``floor`` at ``s=decay_steps``; ``floor`` afterwards."""

    peak: float
    decay_steps: int
    floor: float = 0.0

    def __post_init__(self):
        _check("peak", self.peak)
        _check("floor", self.floor)
        _check("decay_steps", self.decay_steps, allow_equal=False)

    def __call__(self, step) -> torch.Tensor:
        x = torch.clamp(_as_step(step) / self.decay_steps, 0.0, 1.0)
        return self.floor + (self.peak - self.floor) * _cosine(x)

    def min_value(self) -> float:
        return min(self.floor, self.peak)

    def max_value(self) -> float:
        return max(self.floor, self.peak)


@dataclass(frozen=True)
class warmup_cosine(Schedule):
    """Linear warmup over ``warmup_steps`` to ``peak``, then cosine to ``floor`` at ``total_steps``.

    ``lr(W) = peak``, ``lr(W + (T-W)/2) = (peak + floor)/2``, ``lr(s) = floor`` for ``s >= T``
    (the Levanter/optax ``warmup_cosine_decay_schedule`` shape, with an absolute floor).
    """

    peak: float
    warmup_steps: int
    total_steps: int
    floor: float = 0.0
    init: float = 0.0
    warmup_offset: int = 0

    def __post_init__(self):
        for name in ("peak", "floor", "init", "warmup_steps"):
            _check(name, getattr(self, name))
        if self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"total_steps ({self.total_steps}) must be > warmup_steps ({self.warmup_steps})"
            )
        if self.warmup_offset not in (0, 1):
            raise ValueError(f"warmup_offset must be 0 or 1, got {self.warmup_offset}")

    def __call__(self, step) -> torch.Tensor:
        s = _as_step(step)
        warm = _warmup(s, self.init, self.peak, self.warmup_steps, self.warmup_offset)
        x = torch.clamp((s - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0.0, 1.0)
        decay = self.floor + (self.peak - self.floor) * _cosine(x)
        return torch.where(s < self.warmup_steps, warm, decay)

    def min_value(self) -> float:
        return min(self.init, self.floor, self.peak)

    def max_value(self) -> float:
        return max(self.init, self.floor, self.peak)


DecayShape = Literal["linear", "cosine", "1-sqrt"]


@dataclass(frozen=True)
class wsd(Schedule):
    """Warmup–stable–decay (MiniCPM: Hu et al. 2024, arXiv 2404.06395; Hägele et al. 2024,
    arXiv 2405.18392).

    ``s < W``: linear warmup; ``W <= s < T-D``: ``peak``; ``s >= T-D``:
    ``floor + (peak - floor)·f(x)`` with ``x = (s-(T-D))/D`` clamped to [0, 1] and ``f`` one of
    ``"linear"`` (1-x), ``"cosine"`` (½(1+cos πx)), ``"1-sqrt"`` (1-√x).
    """

    peak: float
    warmup_steps: int
    total_steps: int
    decay_steps: int
    floor: float = 0.0
    decay_shape: DecayShape = "linear"
    init: float = 0.0
    warmup_offset: int = 0

    def __post_init__(self):
        for name in ("peak", "floor", "init", "warmup_steps"):
            _check(name, getattr(self, name))
        _check("decay_steps", self.decay_steps, allow_equal=False)
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps + decay_steps ({self.warmup_steps} + {self.decay_steps}) must be "
                f"<= total_steps ({self.total_steps})"
            )
        if self.decay_shape not in ("linear", "cosine", "1-sqrt"):
            raise ValueError(
                f"decay_shape must be 'linear', 'cosine' or '1-sqrt', got {self.decay_shape!r}"
            )
        if self.warmup_offset not in (0, 1):
            raise ValueError(f"warmup_offset must be 0 or 1, got {self.warmup_offset}")

    def __call__(self, step) -> torch.Tensor:
        s = _as_step(step)
        decay_start = self.total_steps - self.decay_steps
        warm = _warmup(s, self.init, self.peak, self.warmup_steps, self.warmup_offset)
        x = torch.clamp((s - decay_start) / self.decay_steps, 0.0, 1.0)
        if self.decay_shape == "linear":
            f = 1.0 - x
        elif self.decay_shape == "cosine":
            f = _cosine(x)
        else:
            f = 1.0 - torch.sqrt(x)
        decay = self.floor + (self.peak - self.floor) * f
        return torch.where(s < self.warmup_steps, warm, decay)

    def min_value(self) -> float:
        return min(self.init, self.floor, self.peak)

    def max_value(self) -> float:
        return max(self.init, self.floor, self.peak)
