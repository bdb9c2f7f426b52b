"""Skip-step for every torch.optim adapter: ``with_skip_step(AdamW)(params, lr=..., sigma_factor=6,
rolling_interval_length=128)`` is ``AdamW`` whose ``step()`` is skipped on a loss or gradient-norm
spike, with OLMo-core's ``SkipStepOptimizer`` protocol.

The rule, and each choice against OLMo-core 3.0.0 (``olmo_core/optim/skip_step_optimizer.py``),
are :mod:`functim.skip_step`'s: this module only feeds it. Protocol (OLMo-core's names):

- ``optimizer.latest_loss = loss`` before ``step()`` (OLMo-core's ``TransformerTrainModule``
  does it after every batch); without it ``step()`` uses the loss its ``closure`` returns, and
  raises RuntimeError (changing nothing) when it has neither. Setting it twice before a step
  keeps the last value (OLMo-core would record both);
- ``optimizer.latest_grad_norm = norm`` (the train module sets it when ``max_grad_norm`` is set:
  the norm before clipping); when it is not set for a step, the global L2 norm of the params'
  ``.grad`` is used;
- ``get_step_factor()``: 1.0 if the next ``step()`` would be applied, 0.0 if skipped (a float
  tensor on the params' device, no host sync); ``step_skipped``: 1.0 if the last ``step()`` was
  skipped (0.0 before the first);
- ``sigma_factor`` (settable, kept in a 0-d tensor so a compiled step does not recompile) and
  ``rolling_interval_length`` (read-only: it is the window's length).

When OLMo-core is installed, the class made by :func:`with_skip_step` also subclasses its
``olmo_core.optim.SkipStepOptimizer``, so OLMo-core's train module recognises it and feeds it (the
first call imports OLMo-core; ``import functim.adapters`` does not). The class is a real subclass
of the adapter: param groups, LR schedulers, ``state_dict`` and ``zero_grad`` are the adapter's.

How a step runs: one decision per ``step()`` for the whole optimizer
(:func:`functim.skip_step.take_step`), then each param group's functional update through
:func:`functim.combinators.gated_update` (out of place, then selected: a skipped step leaves params
and state bitwise unchanged), then the observation enters the window
(:func:`functim.skip_step.record_observation`). Every group therefore runs the adapter's generic
path (one functional ``update`` per group, with the group's ``step`` an int32 tensor on the
params' device, so that a skipped step does not advance it without a host sync) instead of the
elementwise adapters' per-parameter float32 CPU ``step`` counters: the numbers are the same
while every parameter gets a gradient at every step (a parameter without one on some steps gets
its group's bias correction, as in the functional optimizer), and the per-parameter state keys
are the functional state's (``step``, ``exp_avg``, ...). Cost: the
update runs out of place and is selected, so the params and the optimizer state are held twice
during the step. The generic path does not trace ``step()`` into one graph
(``torch.compile(opt.step)``, an OLMo-core config's ``compile=True``): compile the functional
``functim.skip_spikes(...).update`` instead, which traces as one graph.

State: the window (:data:`functim.skip_step.WINDOW_KEYS`) is stored with every parameter under
``skip_step.<key>`` (one set of tensors shared by all parameters, on the first parameter's device),
so ``state_dict()`` and OLMo-core's (flattened) checkpoints carry it and a resumed run is bitwise
the uninterrupted one. ``load_state_dict`` checks that the saved state has this window, of this
``rolling_interval_length``, before anything is loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

import functim as ft
from functim.combinators import gated_update
from functim.hyperparams import HPARAM_DTYPE, check_hyperparam
from functim.skip_step import (
    SIGMA_FACTOR_RANGE,
    WINDOW_KEYS,
    check_window,
    check_window_length,
    gradient_norm,
    init_window,
    observation,
    record_observation,
    take_step,
)

from .torch_optim import FunctimOptimizer

__all__ = ["STATE_PREFIX", "SkipStepMixin", "with_skip_step"]

STATE_PREFIX = "skip_step."
"""Prefix of the window's keys in each parameter's state."""


class _Gate(ft.Optimizer):
    """A param group's functional optimizer, applied or not by the owning optimizer's decision
    for the ``step()`` in progress (:func:`functim.combinators.gated_update`). Everything else
    (``init_state``, hyperparameter names, ``explain``...) is the inner optimizer's, so the
    adapter lays out and fills the state exactly as for the inner one."""

    def __init__(self, inner: ft.Optimizer, owner: SkipStepMixin):
        self.inner = inner
        self.name = inner.name
        self._owner = owner

    def __getattr__(self, attr: str) -> Any:
        if attr == "inner":  # not set yet (copy/pickle protocols probe attributes first)
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def init_state(self, params):
        return self.inner.init_state(params)

    def validate(self, params, grads, state) -> None:
        self.inner.validate(params, grads, state)

    def hyperparam_ranges(self):
        return self.inner.hyperparam_ranges()

    def update(self, params, grads, state, *, donate: bool = False, **extra):
        take = self._owner._skip_take
        if take is None:
            raise RuntimeError(f"{type(self._owner).__name__}: a param group was stepped outside "
                               "step(), without a skip decision")
        return gated_update(self.inner, take, params, grads, state, donate=donate, **extra)


# for type checkers the mixin is the adapter it is mixed into
_MixinBase = FunctimOptimizer if TYPE_CHECKING else object


class SkipStepMixin(_MixinBase):
    """The skip-step behaviour of :func:`with_skip_step` classes (see the module docstring);
    it goes first in their bases, before the adapter."""

    def __init__(self, params: Any, *args: Any, rolling_interval_length: int = 128,
                 sigma_factor: float = 6.0, **kwargs: Any):
        owner = type(self).__name__
        check_window_length(owner, "rolling_interval_length", rolling_interval_length)
        check_hyperparam(owner, "sigma_factor", sigma_factor, SIGMA_FACTOR_RANGE)
        self._skip_building = True  # OLMo-core's SkipStepOptimizer.__init__ assigns its defaults
        self._skip_length = rolling_interval_length
        self._skip_sigma_value = float(sigma_factor)
        self._skip_sigma: torch.Tensor | None = None
        self._skip_window: dict[str, torch.Tensor] | None = None
        self._skip_gates: dict[int, _Gate] = {}
        self._skip_take: torch.Tensor | None = None  # the decision of the step() in progress
        self._skip_loss: torch.Tensor | None = None
        self._skip_grad_norm: torch.Tensor | None = None
        self._skip_loss_fed = self._skip_grad_norm_fed = False  # since the last step()
        super().__init__(params, *args, **kwargs)
        self._skip_building = False

    # -- the functional optimizer of each group, behind its gate ---------------------------
    def _group_optimizer(self, group: dict) -> ft.Optimizer:
        inner = super()._group_optimizer(group)
        gate = self._skip_gates.get(id(inner))
        if gate is None or gate.inner is not inner:
            gate = self._skip_gates[id(inner)] = _Gate(inner, self)
        return gate

    # -- the window, shared by every parameter's state -------------------------------------
    def _skip_params(self) -> Iterator[torch.Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def _init_group_state(self, gi: int, group: dict) -> None:
        super()._init_group_state(gi, group)
        self._skip_attach_window(group["params"])

    def _skip_attach_window(self, params: Iterable[torch.Tensor]) -> None:
        """Store the window with each of ``params``; the window is the one already in use, else
        the first found in the state (after loading), else a new one."""
        if self._skip_window is None:
            self._skip_window = self._skip_saved_window() or init_window(
                self._skip_length, next(self._skip_params()).device)
            self._skip_sigma = torch.tensor(self._skip_sigma_value, dtype=HPARAM_DTYPE,
                                            device=self._skip_window["loss_window"].device)
        for p in params:
            self.state[p].update({STATE_PREFIX + k: v for k, v in self._skip_window.items()})

    def _skip_saved_window(self) -> dict[str, torch.Tensor] | None:
        """The window found in the state (e.g. just loaded), on the first parameter's device."""
        device = next(self._skip_params()).device
        for p in self._skip_params():
            if STATE_PREFIX + WINDOW_KEYS[0] in self.state[p]:
                return {k: self.state[p][STATE_PREFIX + k].to(device) for k in WINDOW_KEYS}
        return None

    def _skip_check_saved_window(self, state_dict: dict) -> None:
        owner = type(self).__name__
        for pid, entry in state_dict.get("state", {}).items():
            missing = [STATE_PREFIX + k for k in WINDOW_KEYS if STATE_PREFIX + k not in entry]
            if missing:
                raise ValueError(
                    f"{owner}.load_state_dict: the state of parameter {pid!r} has no "
                    f"{missing} (saved by an optimizer without skip-step?)")
            check_window(owner, entry, self._skip_length, where=f"state_dict['state'][{pid!r}]",
                         prefix=STATE_PREFIX, length_name="rolling_interval_length")

    def load_state_dict(self, state_dict: dict) -> None:
        self._skip_check_saved_window(state_dict)
        previous = self._skip_window
        self._skip_window = None  # take the loaded window, and share it again
        try:
            super().load_state_dict(state_dict)
        except BaseException:
            self._skip_window = previous
            raise
        self._skip_attach_window(self._skip_params())

    # -- OLMo-core's SkipStepOptimizer protocol --------------------------------------------
    @property
    def rolling_interval_length(self) -> int:
        return self._skip_length

    @rolling_interval_length.setter
    def rolling_interval_length(self, value: int) -> None:
        if not self._skip_building:
            raise AttributeError(f"{type(self).__name__}.rolling_interval_length is the length "
                                 "of the window in the state; build a new optimizer to change it")

    @property
    def sigma_factor(self) -> float:
        return self._skip_sigma_value

    @sigma_factor.setter
    def sigma_factor(self, value: float) -> None:
        if self._skip_building:
            return
        check_hyperparam(type(self).__name__, "sigma_factor", value, SIGMA_FACTOR_RANGE)
        self._skip_sigma_value = float(value)
        assert self._skip_sigma is not None
        self._skip_sigma.fill_(self._skip_sigma_value)

    @property
    def _device(self) -> torch.device:
        assert self._skip_window is not None
        return self._skip_window["loss_window"].device

    @_device.setter
    def _device(self, value: Any) -> None:
        pass  # OLMo-core's SkipStepOptimizer.__init__ resets its device cache; ours is the window's

    @property
    def latest_loss(self) -> torch.Tensor | None:
        """The loss last fed (float32, on the params' device), None before any."""
        return self._skip_loss

    @latest_loss.setter
    def latest_loss(self, loss: torch.Tensor | float) -> None:
        self._skip_loss = observation(type(self).__name__, "latest_loss", loss, self._device)
        self._skip_loss_fed = True

    @property
    def latest_grad_norm(self) -> torch.Tensor | None:
        """The gradient norm last fed (float32, on the params' device), None before any."""
        return self._skip_grad_norm

    @latest_grad_norm.setter
    def latest_grad_norm(self, grad_norm: torch.Tensor | float) -> None:
        self._skip_grad_norm = observation(type(self).__name__, "latest_grad_norm", grad_norm,
                                             self._device)
        self._skip_grad_norm_fed = True

    def _skip_observed_grad_norm(self) -> torch.Tensor:
        if self._skip_grad_norm_fed:
            assert self._skip_grad_norm is not None
            return self._skip_grad_norm
        return gradient_norm([p.grad for p in self._skip_params()], self._device)

    @torch.no_grad()
    def get_step_factor(self) -> torch.Tensor:
        """1.0 if ``step()`` would apply the update with the loss fed so far, 0.0 if it would
        skip it (float32, on the params' device); 1.0 when no loss was fed since the last step."""
        if not self._skip_loss_fed:
            return torch.ones((), dtype=torch.float32, device=self._device)
        assert self._skip_window is not None and self._skip_loss is not None
        take = take_step(self._skip_window, self._skip_loss, self._skip_observed_grad_norm(),
                         self._skip_sigma)
        return take.to(torch.float32)

    @property
    def step_skipped(self) -> torch.Tensor:
        """1.0 if the last ``step()`` was skipped, else 0.0 (float32, on the params' device)."""
        assert self._skip_window is not None
        return self._skip_window["step_skipped"]

    # -- step --------------------------------------------------------------------------------
    def _skip_adapter_step(self) -> Callable[..., Any]:
        """The adapter's ``step``, without the wrapper torch.optim puts around each class's
        ``step`` to run the step hooks (they run once, around this class's ``step``)."""
        fn = super().step.__func__
        while getattr(fn, "hooked", False) and hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        return fn.__get__(self)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """One step of the adapter, applied or skipped (see the module docstring); extra
        keywords (Sophia's ``bs``) go to the adapter's ``step``."""
        returned = None
        if closure is not None:
            with torch.enable_grad():
                returned = closure()
        if self._skip_loss_fed:
            loss = self._skip_loss
        elif returned is not None:
            loss = observation(type(self).__name__, "the loss returned by closure", returned,
                               self._device)
        else:
            raise RuntimeError(
                f"{type(self).__name__}.step(): no loss for this step; set optimizer.latest_loss "
                "= loss before step() (OLMo-core's train module does), or pass a closure that "
                "returns the loss")
        assert self._skip_window is not None and loss is not None
        grad_norm = self._skip_observed_grad_norm()
        take = take_step(self._skip_window, loss, grad_norm, self._skip_sigma)
        self._skip_take = take
        try:
            self._skip_adapter_step()(**kwargs)
        finally:
            self._skip_take = None
        for key, value in record_observation(self._skip_window, loss, grad_norm, take).items():
            self._skip_window[key].copy_(value)  # in place: every parameter's entry is this tensor
        self._skip_loss = loss
        self._skip_loss_fed = self._skip_grad_norm_fed = False
        return returned


_CLASSES: dict[type, type] = {}


def _olmo_core_base() -> tuple[type, ...]:
    """``(olmo_core.optim.SkipStepOptimizer,)`` when OLMo-core is installed, else ``()``."""
    try:
        from olmo_core.optim.skip_step_optimizer import SkipStepOptimizer
    except ImportError:
        return ()
    return (SkipStepOptimizer,)


def _signature(adapter: type) -> inspect.Signature:
    """The adapter's signature with ``rolling_interval_length`` and ``sigma_factor`` added."""
    sig = inspect.signature(adapter)
    own = inspect.signature(SkipStepMixin.__init__).parameters
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    extra = [own[n].replace(kind=inspect.Parameter.KEYWORD_ONLY)
             for n in ("rolling_interval_length", "sigma_factor")]
    tail = [p for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
    return sig.replace(parameters=params + extra + tail)


def with_skip_step(adapter: type[FunctimOptimizer]) -> type[FunctimOptimizer]:
    """The skip-step class of a functim torch.optim adapter (``AdamW``, ``Muon``, ...,
    ``FunctimOptimizer`` itself, or a subclass of one): ``SkipStep<Name>``, made once per adapter,
    taking the adapter's arguments plus ``rolling_interval_length=128`` and ``sigma_factor=6.0``
    (OLMo-core's names and defaults). See the module docstring."""
    if not (isinstance(adapter, type) and issubclass(adapter, FunctimOptimizer)):
        raise TypeError("with_skip_step: expected a functim torch.optim adapter class "
                        f"(AdamW, Muon, FunctimOptimizer, ...), got {adapter!r}")
    if issubclass(adapter, SkipStepMixin):
        return adapter
    cls = _CLASSES.get(adapter)
    if cls is None:
        name = f"SkipStep{adapter.__name__}"
        cls = type(name, (SkipStepMixin, adapter, *_olmo_core_base()), {
            "__module__": __name__, "__qualname__": name,
            "__doc__": f"{adapter.__name__} with skip-step on loss and gradient-norm spikes "
                       f"(functim.adapters.with_skip_step; see {__name__}).",
            "__signature__": _signature(adapter)})
        _CLASSES[adapter] = cls
    return cls


def __getattr__(name: str) -> type:
    """``SkipStepAdamW``, ``SkipStepMuon``, ...: :func:`with_skip_step` of the adapter of that
    name in :mod:`functim.adapters` (made on first access, so that importing this module does not
    import OLMo-core)."""
    import functim.adapters as package

    adapter = getattr(package, name.removeprefix("SkipStep"), None) \
        if name.startswith("SkipStep") else None
    if isinstance(adapter, type) and issubclass(adapter, FunctimOptimizer):
        return with_skip_step(adapter)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
