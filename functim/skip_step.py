"""Skip-step on loss spikes: :func:`skip_spikes` wraps any functim optimizer so that an update
whose loss or gradient norm spikes changes nothing.

The rule. The state keeps a window of the last ``window`` observations ``(loss, ‖g‖)`` (``‖g‖``
the global L2 norm of the gradients). For an update with loss ``ℓ`` and gradient norm ``ν``, let
``n`` be the number of observations in the window and ``μ``, ``σ`` their mean and standard
deviation (unbiased, ``n − 1``), for the losses and for the norms. The update is **skipped** when

- ``ℓ`` or ``ν`` is not finite (NaN or ±Inf), or
- ``n ≥ max(2, window // 2 − 1)`` and (``ℓ − μ_ℓ > s·σ_ℓ`` or ``ν − μ_ν > s·σ_ν``),
  with ``s = sigma_factor``;

otherwise it is applied. A skipped update leaves the params and the inner optimizer's state
bitwise as they were (its ``step`` included); the choice is made on the device with
``torch.where`` (no host sync). Then the observation enters the window (the oldest one leaves
once it holds ``window``) if both values are finite, whether the update was applied or skipped.

Reference: OLMo-core 3.0.0 (PyPI ``ai2-olmo-core``), ``olmo_core/optim/skip_step_optimizer.py``
(``SkipStepOptimizer``) and its users ``SkipStepAdamW`` (``optim/adamw.py``) and
``SkipStepLion`` (``optim/lion.py``). Where the two overlap:

- window: the same — the statistics use the ``rolling_interval_length`` observations before the
  current one (OLMo-core keeps ``rolling_interval_length + 1`` values, the current one last);
- what is compared: the same — ``(x − μ) ≤ s·σ`` passes (``torch.std_mean``: unbiased ``σ``), for
  the loss and for the gradient norm, and both must pass; with ``σ = 0`` only ``x ≤ μ`` passes;
- a skipped step's observation enters the window: the same (OLMo-core's ``latest_loss`` setter
  appends every value);
- ``step_skipped``: the same — a float tensor, 1.0 if the last update was skipped, else 0.0
  (0.0 before the first update);
- when the check starts: OLMo-core checks once it holds ``max(2, L // 2)`` losses counting the
  current one, i.e. ``max(1, L // 2 − 1)`` earlier ones. For ``L < 6`` that is a single earlier
  value, whose unbiased ``σ`` is NaN, and every comparison with NaN fails: OLMo-core skips every
  such step. Here the check waits for ``max(2, L // 2 − 1)`` earlier values: the same for
  ``L ≥ 6`` (e.g. 63 for the default 128), a defined ``σ`` below;
- the step counter: ``SkipStepAdamW`` advances ``step`` by the step factor with
  ``step_increment_bugfix=True`` (its default; ``False`` never advances it, the defect the flag
  names). Here the fixed behaviour holds for every optimizer: a skipped update leaves the whole
  inner state, ``step`` included, unchanged;
- non-finite values: OLMo-core multiplies the update by a factor 0, so a NaN/Inf gradient still
  reaches its moments (``0·NaN = NaN``), and a NaN loss enters its window, where it makes every
  comparison fail for the next ``L`` steps. Here a non-finite loss or gradient norm is a skipped
  step (not an error: it is what a spike looks like at its worst), also before the window has
  enough history (OLMo-core takes those steps), and it never enters the window;
- the gradient norm: OLMo-core compares it only when its train module feeds one (when
  ``max_grad_norm`` is set: the norm before clipping). Here ``update(..., grad_norm=...)`` if
  given, else the global L2 norm of the ``grads`` passed to ``update``
  (:func:`functim.global_norm`) — so wrap the whole optimizer (outside a
  ``chain(clip_by_global_norm(...), ...)``, outside a ``partition``) to compare the norm of all
  the gradients before clipping;
- where the window lives: OLMo-core keeps it in Python lists outside ``state_dict``, so a
  resumed run starts over with an empty window; here it is in the state, so a resumed run is
  bitwise the uninterrupted one;
- arithmetic: the window is float32 (the dtype of OLMo-core's losses) and ``μ``, ``σ`` are
  computed in float64 over a ring buffer (OLMo-core: ``torch.std_mean`` in the loss dtype, in
  time order), so the decisions agree except for a value within rounding of the threshold.

Cost: the inner update runs out of place and the result is selected (as
:func:`functim.skip_nonfinite`, through :func:`functim.combinators.gated_update`): one extra
copy of the params and the inner state during the step. State tensors the inner optimizer keeps
on the CPU for host-side decisions (SOAP's ``calls``, Kron's counters and generator state) are
selected on the CPU, which reads the decision on the host: one device sync per step for those
two optimizers on an accelerator (their next step's control flow depends on whether this one was
skipped).

``torch.compile(fullgraph=True)`` and ``torch.func.vmap`` trace the update wherever they trace the
inner optimizer's (pass ``loss`` as a tensor, so that its value is not a constant of the graph).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from . import _tree
from .combinators import _find_step, _prefixed, gated_update, global_norm
from .hyperparams import (
    HPARAMS_KEY,
    Range,
    ScalarOrSchedule,
    check_hyperparam,
    init_hyperparams,
    resolve_hyperparams,
)
from .optimizer import Optimizer, State
from .runtime import is_dtensor
from .schedules import Schedule
from .state import check_state_keys, state_device

PyTree = Any

SIGMA_FACTOR_RANGE = Range(0.0, math.inf, low_open=True, high_open=True)
"""``sigma_factor`` is finite and > 0 (an infinite one would compare ``∞·0`` when ``σ = 0``)."""

WINDOW_DTYPE = torch.float32
WINDOW_KEYS = ("loss_window", "grad_norm_window", "observations", "step_skipped",
               "skipped_steps")
"""The window state, which :class:`SkipSpikes` keeps next to ``hyperparams`` and ``optimizer``
(and ``functim.adapters.with_skip_step`` with every parameter's state):

- ``loss_window``, ``grad_norm_window``: float32 ``(window,)`` ring buffers; observation ``k``
  (0-based) is in slot ``k % window``;
- ``observations``: int64, how many observations have entered the window;
- ``step_skipped``: float32, 1.0 if the last update was skipped, else 0.0;
- ``skipped_steps``: int32, how many updates were skipped."""


def check_window_length(owner: str, name: str, value: Any) -> None:
    """``value`` (the window length, called ``name`` by ``owner``) is an int ≥ 2."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int >= 2, got {value!r}")
    if value < 2:
        raise ValueError(f"{owner}: {name} must be an int >= 2 (a standard deviation needs two "
                         f"values), got {value}")


def min_history(window: int) -> int:
    """How many earlier observations the window must hold before updates are compared."""
    return max(2, window // 2 - 1)


def init_window(window: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The window state (:data:`WINDOW_KEYS`) before any observation."""
    return {
        "loss_window": torch.zeros(window, dtype=WINDOW_DTYPE, device=device),
        "grad_norm_window": torch.zeros(window, dtype=WINDOW_DTYPE, device=device),
        "observations": torch.zeros((), dtype=torch.int64, device=device),
        "step_skipped": torch.zeros((), dtype=WINDOW_DTYPE, device=device),
        "skipped_steps": torch.zeros((), dtype=torch.int32, device=device),
    }


def check_window(owner: str, state: Any, window: int, *, where: str = "state",
                 prefix: str = "", length_name: str = "window") -> None:
    """The window tensors of ``state`` (a mapping holding :data:`WINDOW_KEYS`, each under
    ``prefix + key``) have the layout :func:`init_window` gives for ``window``; a ValueError
    names the first that does not (``where``: how to call ``state``; ``length_name``: the
    window length's name for the caller)."""
    like = init_window(window, torch.device("meta"))
    for key, want in like.items():
        got = state[prefix + key]
        if not (isinstance(got, torch.Tensor) and got.shape == want.shape
                and got.dtype == want.dtype):
            raise ValueError(
                f"{owner}: {where}[{prefix + key!r}] is {_tree.describe_leaf(got)}, expected "
                f"{_tree.describe_leaf(want)} for {length_name}={window} (was it made with "
                f"another {length_name}?)")


def observation(owner: str, name: str, value: Any, device: torch.device) -> torch.Tensor:
    """``value`` (a loss or gradient norm: a real number or a one-element floating tensor) as a
    0-d float32 tensor on ``device``, detached. Non-finite values are accepted (they make the
    update a skipped one)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.numel() != 1:
            raise TypeError(f"{owner}: {name} must be a one-element floating-point tensor or a "
                            f"number, got {_tree.describe_leaf(value)}")
        return value.detach().reshape(()).to(device=device, dtype=WINDOW_DTYPE)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a one-element floating-point tensor or a "
                        f"number, got {type(value).__name__}")
    return torch.full((), float(value), dtype=WINDOW_DTYPE, device=device)


def gradient_norm(grads: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """The global L2 norm of the gradients that are not None (:func:`functim.global_norm`), as a
    0-d float32 tensor on ``device`` (a DTensor norm is reduced to a plain tensor first)."""
    present = [g for g in grads if g is not None]
    if not present:
        return torch.zeros((), dtype=WINDOW_DTYPE, device=device)
    norm = global_norm(present)
    if is_dtensor(norm):
        norm = norm.full_tensor()
    return norm.to(device=device, dtype=WINDOW_DTYPE)


def _exceeds(values: torch.Tensor, count: torch.Tensor, x: torch.Tensor,
             sigma_factor: torch.Tensor) -> torch.Tensor:
    """``not (x − μ ≤ s·σ)`` over the first ``count`` slots of ``values`` (float64; NaN fails
    the comparison, so it counts as exceeding)."""
    valid = torch.arange(values.shape[-1], device=values.device) < count
    w = values.to(torch.float64)
    n = count.to(torch.float64)
    mean = torch.where(valid, w, 0.0).sum() / n
    var = torch.where(valid, (w - mean) ** 2, 0.0).sum() / (n - 1)
    threshold = sigma_factor.to(device=values.device, dtype=torch.float64) * var.sqrt()
    return ~((x.to(torch.float64) - mean) <= threshold)


def take_step(window_state: Any, loss: torch.Tensor, grad_norm: torch.Tensor,
              sigma_factor: torch.Tensor) -> torch.Tensor:
    """The decision for one update (a 0-d bool tensor, True = apply it) from the window state,
    the update's ``loss`` and ``grad_norm`` (0-d float32, see :func:`observation`) and
    ``sigma_factor`` (a 0-d tensor): the rule in the module docstring."""
    window = window_state["loss_window"].shape[-1]
    count = torch.clamp(window_state["observations"], max=window)
    checked = count >= min_history(window)
    spike = (_exceeds(window_state["loss_window"], count, loss, sigma_factor)
             | _exceeds(window_state["grad_norm_window"], count, grad_norm, sigma_factor))
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    return finite & ~(checked & spike)


def record_observation(window_state: Any, loss: torch.Tensor, grad_norm: torch.Tensor,
                       took_step: torch.Tensor) -> dict[str, torch.Tensor]:
    """The window state after an update with ``loss`` and ``grad_norm`` that was applied or not
    (``took_step``): the observation enters the window if both values are finite."""
    loss_window = window_state["loss_window"]
    window = loss_window.shape[-1]
    observations = window_state["observations"]
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    slot = torch.arange(window, device=loss_window.device) == observations % window
    write = slot & finite
    skipped = ~took_step
    return {
        "loss_window": torch.where(write, loss.to(WINDOW_DTYPE), loss_window),
        "grad_norm_window": torch.where(write, grad_norm.to(WINDOW_DTYPE),
                                        window_state["grad_norm_window"]),
        "observations": observations + finite.to(observations.dtype),
        "step_skipped": skipped.to(window_state["step_skipped"].dtype),
        "skipped_steps": window_state["skipped_steps"]
        + skipped.to(window_state["skipped_steps"].dtype),
    }


class SkipSpikes(Optimizer):
    """``optimizer``, with an update skipped when its loss or gradient norm spikes (the rule
    and its choices against OLMo-core are in the module docstring).

    ``update(params, grads, state, *, loss, grad_norm=None, donate=False, **extra)``: ``loss``
    (required) and ``grad_norm`` are numbers or one-element floating tensors; ``grad_norm=None``
    takes the global L2 norm of ``grads``. ``loss`` and ``grad_norm`` are also passed on to
    ``optimizer``, with ``extra``.

    State: ``hyperparams`` (``sigma_factor``, float64), the window (:data:`WINDOW_KEYS`) and
    ``optimizer`` (the inner state).
    """

    name = "skip_spikes"

    def __init__(self, optimizer: Optimizer, *, sigma_factor: ScalarOrSchedule = 6.0,
                 window: int = 128):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"skip_spikes: optimizer must be a functim Optimizer, got "
                            f"{type(optimizer).__name__}")
        check_hyperparam(self.name, "sigma_factor", sigma_factor, SIGMA_FACTOR_RANGE)
        check_window_length(self.name, "window", window)
        self.optimizer = optimizer
        self.sigma_factor = sigma_factor
        self.window = window

    def __repr__(self) -> str:
        return (f"skip_spikes({self.optimizer!r}, sigma_factor={self.sigma_factor!r}, "
                f"window={self.window})")

    def hyperparam_ranges(self) -> dict[str, Range]:
        return {"sigma_factor": SIGMA_FACTOR_RANGE,
                **_prefixed("optimizer", self.optimizer.hyperparam_ranges())}

    def hyperparam_schedules(self) -> dict:
        own = {"sigma_factor": self.sigma_factor} if isinstance(self.sigma_factor,
                                                                 Schedule) else {}
        return {**own, **_prefixed("optimizer", self.optimizer.hyperparam_schedules())}

    def init_state(self, params: PyTree) -> State:
        device = state_device(_tree.flatten(params)[0])
        return {HPARAMS_KEY: init_hyperparams({"sigma_factor": self.sigma_factor}, device),
                **init_window(self.window, device),
                "optimizer": self.optimizer.init_state(params)}

    def _check_state(self, state: Any) -> None:
        check_state_keys(self.name, state, [HPARAMS_KEY, *WINDOW_KEYS, "optimizer"],
                         hyperparams=["sigma_factor"])
        check_window(self.name, state, self.window)

    def validate(self, params: PyTree, grads: PyTree, state: State) -> None:
        self._check_state(state)
        self.optimizer.validate(params, grads, state["optimizer"])

    def update(self, params: PyTree, grads: PyTree, state: State, *, donate: bool = False,
               loss: Any = None, grad_norm: Any = None, **extra: Any) -> tuple[PyTree, State]:
        if loss is None:
            raise TypeError("skip_spikes: update needs loss= (this step's loss: a number or a "
                            "one-element tensor); in a torch.optim loop use "
                            "functim.adapters.with_skip_step(...) and set optimizer.latest_loss")
        self._check_state(state)
        _, g_leaves, _ = _tree.check_grads(self.name, params, grads, donate=donate)
        device = state["observations"].device
        loss_t = observation(self.name, "loss", loss, device)
        norm_t = (gradient_norm(g_leaves, device) if grad_norm is None
                  else observation(self.name, "grad_norm", grad_norm, device))
        step = _find_step(state["optimizer"])
        hp = resolve_hyperparams({"sigma_factor": self.sigma_factor}, state[HPARAMS_KEY],
                                 step if step is not None
                                 else torch.zeros((), dtype=torch.int32, device=device))
        take = take_step(state, loss_t, norm_t, hp["sigma_factor"])
        new_params, inner = gated_update(self.optimizer, take, params, grads, state["optimizer"],
                                         donate=donate, loss=loss, grad_norm=grad_norm, **extra)
        return new_params, {HPARAMS_KEY: hp, **record_observation(state, loss_t, norm_t, take),
                            "optimizer": inner}


def skip_spikes(optimizer: Optimizer, *, sigma_factor: ScalarOrSchedule = 6.0,
                window: int = 128) -> SkipSpikes:
    """Wrap ``optimizer`` so that an update whose loss or gradient norm is more than
    ``sigma_factor`` standard deviations above the mean of the last ``window`` observations (or
    is not finite) changes nothing: OLMo-core's skip-step rule for any optimizer (see
    :mod:`functim.skip_step`). ``update`` then needs ``loss=`` (and takes ``grad_norm=``)."""
    return SkipSpikes(optimizer, sigma_factor=sigma_factor, window=window)


__all__ = ["SIGMA_FACTOR_RANGE", "WINDOW_KEYS", "SkipSpikes", "check_window",
           "check_window_length", "gradient_norm", "init_window", "min_history",
           "observation", "record_observation", "skip_spikes", "take_step"]
