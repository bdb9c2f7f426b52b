"""OLMo-core configs for functim's torch.optim adapters (OLMo-core 3.0.0).

Each config is a ``@dataclass`` subclass of ``olmo_core.optim.OptimConfig``, registered with
OLMo-core's config registry as ``functim_<functional name>`` (``functim_adamw``, ...), whose
``optimizer()`` is the functim adapter class and whose fields are that adapter's keyword
arguments (same names, same defaults; :func:`register` checks this when the class is defined).
Use one wherever OLMo-core takes an ``OptimConfig``, e.g.
``TransformerTrainModuleConfig(optim=AdamWConfig(lr=3e-4, group_overrides=[...]), ...)``.

``build(model)`` behaves as OLMo-core's own ``OptimConfig.build``: ``group_overrides`` globs
are expanded by OLMo-core's ``build_groups`` (same ``strict`` errors), every param group gets
``lr`` and ``initial_lr`` (a tensor ``lr`` when ``compile=True``), ``fixed_fields`` are restored
after every ``load_state_dict``, and ``compile=True`` compiles ``step``. The one difference is
that field values are converted to the adapter's types first (``state_dtype="bfloat16"`` becomes
``torch.bfloat16``), which is why ``build`` is overridden at all.

Skip-step (every config): ``skip_step=True`` builds :func:`functim.adapters.with_skip_step` of
the adapter, an ``olmo_core.optim.SkipStepOptimizer``, so the train module feeds it the loss and
(with ``max_grad_norm``) the gradient norm and records ``optim/step skipped``: the update is
skipped when either is more than ``sigma_factor`` standard deviations above the mean of the last
``rolling_interval_length`` steps (OLMo-core's ``SkipStepAdamWConfig`` fields, names and
defaults; the rule and its choices are in :mod:`functim.skip_step`). The window is in the
optimizer state, so checkpoints resume it bitwise.

Keyword arguments that do not fit a serialisable config are not fields: ``weight_decay_mask``
(use a group override with ``weight_decay=0.0``, OLMo-core's way), and the torch flags that
functim rejects (``capturable``, ``differentiable``).

``MuonConfig`` and ``ScionConfig`` (:class:`RoutedOptimConfig`) give their adapters the
parameters with their names and routing rules over OLMo-core's parameter names
(:func:`olmo_transformer_rules`): hidden matrices to Muon / the spectral norm, embeddings, the
output head and every ndim < 2 tensor to AdamW / their own norms.

The contract these configs and their optimizers keep (what OLMo-core's trainer, its
checkpointer and ``torch.distributed.checkpoint`` rely on; ``tests/test_olmo.py`` checks it):

- the config is a registered ``@dataclass`` subclass of ``OptimConfig`` (``from_dict``, YAML/CLI
  overrides and ``as_config_dict`` go through OLMo-core's registry); every field other than
  ``group_overrides``, ``compile`` and ``fixed_fields`` is an ``optimizer()`` keyword argument;
  there is an ``lr`` field, so ``build`` sets ``lr`` and ``initial_lr`` on every group;
- the built optimizer is a ``torch.optim.Optimizer`` constructed from a list of group dicts; it
  reads every hyperparameter from ``param_groups`` at each step (``lr`` as a float or a 0-d
  tensor) and caches none;
- a step with zero gradients and ``lr = 0`` moves no param (weight decay scales with ``lr``):
  the checkpointer's first, zero-gradient step must not change the weights;
- all per-parameter state lives in ``self.state[p]`` as tensors and plain numbers, with every
  key present after the first step (keys created later are dropped on load); under FSDP2 the
  state tensors are DTensors placed like their params;
- the ``param_groups`` keys and order are stable across versions (a new key breaks strict
  loading of old checkpoints; ``fixed_fields`` and the per-group lr metrics go by index);
- float state keeps its saved dtype through ``load_state_dict`` (torch's own would cast it to
  the param dtype, e.g. float32 moments of bfloat16 params to bfloat16).
"""

import dataclasses
import inspect
import logging
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

try:
    from olmo_core.optim import INITIAL_LR_FIELD, LR_FIELD, OptimConfig
    from olmo_core.train.callbacks import Callback
    from olmo_core.utils import move_to_device
except ImportError as e:  # olmo-core is an optional dependency
    raise ImportError(
        "functim.adapters.olmo needs OLMo-core, which is an optional dependency of functim: "
        "install the 'olmo' extra, pip install 'functim[olmo]' (ai2-olmo-core==3.0.0)"
    ) from e

from functim.hyperparams import check_hyperparam
from functim.linalg import NS5_COEFFICIENTS
from functim.optimizers.scion import NORMS, default_norms
from functim.rules import Explanation, Rule, explain
from functim.runtime import is_dtensor
from functim.skip_step import SIGMA_FACTOR_RANGE, check_window_length

from .elementwise import CautiousAdamW, CautiousLion, Lion, NAdamW, SignSGD, Signum
from .kron import Kron
from .mars import Mars
from .matrix import Muon, Scion
from .schedule_free import ScheduleFreeAdamW
from .skip_step import with_skip_step
from .soap import Soap
from .sophia import Sophia
from .torch_optim import SGD, AdamW

__all__ = [
    "AdamWConfig", "CautiousAdamWConfig", "CautiousLionConfig", "FunctimOptimConfig",
    "KronConfig", "LionConfig", "MarsConfig", "MuonConfig", "NAdamWConfig", "RoutedOptimConfig",
    "SGDConfig", "ScheduleFreeAdamWConfig", "ScionConfig", "SignSGDConfig", "SignumConfig",
    "SoapConfig", "SophiaConfig", "SophiaHessianCallback", "olmo_transformer_rules", "register",
]

log = logging.getLogger(__name__)

Opt = TypeVar("Opt", bound=torch.optim.Optimizer)
C = TypeVar("C", bound=type)

# OptimConfig's own fields: consumed by build(), never passed to the optimizer
_OLMO_FIELDS = frozenset(f.name for f in dataclasses.fields(OptimConfig))
# FunctimOptimConfig's skip-step fields: they choose the class (and, when on, the last two are
# passed to it), so they are not keyword arguments of the plain adapter
_SKIP_STEP_FIELDS = ("skip_step", "rolling_interval_length", "sigma_factor")


def _to_dtype(owner: str, name: str, value: Any) -> torch.dtype | None:
    """A config's dtype field (``"bfloat16"``, ``"torch.float32"``, a ``DType``) as a torch
    floating dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None) \
        if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{owner}.{name}: expected None or the name of a floating torch dtype "
                         f"('float32', 'bfloat16', ...), got {value!r}")
    return dtype


@dataclass
class FunctimOptimConfig(OptimConfig[Opt]):
    """Base of the functim configs: ``build`` = OLMo-core's ``OptimConfig.build`` with the field
    values converted by :meth:`optimizer_kwargs`. Subclasses declare fields and ``optimizer()``,
    and are registered with :func:`register`."""

    dtype_fields: ClassVar[tuple[str, ...]] = ("state_dtype", "ns_dtype")
    """Fields holding a dtype name, passed to the adapter as a ``torch.dtype``."""

    skip_step: bool = False
    """Build the skip-step class of the adapter (:func:`functim.adapters.with_skip_step`), an
    ``olmo_core.optim.SkipStepOptimizer``: updates on loss or gradient-norm spikes are skipped."""

    rolling_interval_length: int = 128
    """With ``skip_step``: how many recent steps the mean and standard deviation are taken over
    (OLMo-core's name and default; the check starts once half of them are there)."""

    sigma_factor: float = 6.0
    """With ``skip_step``: how many standard deviations above the mean a loss or gradient norm
    must be for its step to be skipped (OLMo-core's name and default)."""

    def optimizer_class(self) -> type[Opt]:
        """The class :meth:`build` makes: ``optimizer()``, or its skip-step class when
        ``skip_step`` is set."""
        adapter = self.optimizer()
        return with_skip_step(adapter) if self.skip_step else adapter

    @classmethod
    def adapter_value(cls, name: str, value: Any) -> Any:
        """A field's value as the adapter takes it (dtype names become ``torch.dtype``s)."""
        if name in cls.dtype_fields:
            return _to_dtype(cls.__name__, name, value)
        return value

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for :meth:`optimizer_class`: every field except OLMo-core's own
        (``group_overrides``, ``compile``, ``fixed_fields``), through :meth:`adapter_value`;
        ``rolling_interval_length`` and ``sigma_factor`` only with ``skip_step`` (they are
        checked either way)."""
        owner = type(self).__name__
        if not isinstance(self.skip_step, bool):
            raise TypeError(f"{owner}: skip_step must be a bool, got {self.skip_step!r}")
        check_window_length(owner, "rolling_interval_length", self.rolling_interval_length)
        check_hyperparam(owner, "sigma_factor", self.sigma_factor, SIGMA_FACTOR_RANGE)
        kwargs = {f.name: self.adapter_value(f.name, getattr(self, f.name))
                  for f in dataclasses.fields(self)
                  if f.init and f.name not in _OLMO_FIELDS and f.name not in _SKIP_STEP_FIELDS}
        if self.skip_step:
            kwargs.update(rolling_interval_length=self.rolling_interval_length,
                          sigma_factor=self.sigma_factor)
        return kwargs

    def build(self, model: torch.nn.Module, strict: bool = True) -> Opt:
        """Build the adapter over ``self.build_groups(model, strict)`` (see the module docstring;
        the steps after construction are OLMo-core 3.0.0's ``OptimConfig.build``)."""
        kwargs = self.optimizer_kwargs()  # converts (and checks) before anything is built
        optim = self.optimizer_class()(self.build_groups(model, strict=strict), **kwargs)

        # 'lr' and 'initial_lr' in every group; snapshot the fixed fields
        fixed_per_group: list[dict[str, Any]] = [{} for _ in optim.param_groups]
        for fixed, group in zip(fixed_per_group, optim.param_groups):
            lr = group[LR_FIELD] if LR_FIELD in group else getattr(self, LR_FIELD, None)
            if lr is not None:
                group[LR_FIELD] = (move_to_device(torch.tensor(lr), self.device)
                                   if self.compile else lr)
                group.setdefault(INITIAL_LR_FIELD, lr)
            for k in self.fixed_fields:
                if k in group:
                    fixed[k] = group[k]

        log.info(f"Building {self.optimizer_class().__name__} optimizer with "
                 f"{len(optim.param_groups)} param group(s)...")
        for g_idx, group in enumerate(optim.param_groups):
            opts = "\n - ".join(f"{k}: {v}" for k, v in group.items() if k != "params")
            log.info(f"Group {g_idx}, {len(group['params'])} parameter(s)"
                     + (f":\n - {opts}" if opts else ""))

        if self.compile:
            if not optim.compiles_step():
                raise ValueError(
                    f"{type(self).__name__}(compile=True): {type(optim).__name__}.step() does "
                    "not compile (see FunctimOptimizer.compiles_step()); leave compile=False")
            log.info("Compiling optimizer step...")
            optim.step = torch.compile(optim.step)

        def reset_fixed_fields(opt: torch.optim.Optimizer) -> None:
            for fixed, group in zip(fixed_per_group, opt.param_groups):
                group.update(fixed)

        optim.register_load_state_dict_post_hook(reset_fixed_fields)
        return optim


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return inspect.Parameter.empty


def _check_against_adapter(cls: type, omit: Sequence[str]) -> None:
    """Every config field is a keyword argument of ``cls.optimizer()`` with the same default, and
    every keyword argument is a field or listed in ``omit``; the skip-step fields default as the
    keyword arguments of its skip-step class."""
    adapter = cls.optimizer()
    params = list(inspect.signature(adapter).parameters.values())[1:]  # after `params`
    keywords = {p.name: p for p in params
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    fields = {f.name: f for f in dataclasses.fields(cls)
              if f.init and f.name not in _OLMO_FIELDS and f.name not in _SKIP_STEP_FIELDS}
    problems = []
    skip_keywords = inspect.signature(with_skip_step(adapter)).parameters
    for f in dataclasses.fields(cls):
        if f.name in _SKIP_STEP_FIELDS[1:] and _field_default(f) != skip_keywords[f.name].default:
            problems.append(f"field {f.name!r} defaults to {_field_default(f)!r}, "
                            f"{with_skip_step(adapter).__name__} to "
                            f"{skip_keywords[f.name].default!r}")
    for name, f in fields.items():
        if name not in keywords:
            if not var_kw:
                problems.append(f"field {name!r} is not a keyword argument of {adapter.__name__}")
            continue
        want = keywords[name].default
        got = _field_default(f)
        if got is not inspect.Parameter.empty:
            got = cls.adapter_value(name, got)
        if want is not inspect.Parameter.empty and got != want:
            problems.append(f"field {name!r} defaults to {got!r}, "
                            f"{adapter.__name__} to {want!r}")
    for name in keywords:
        # (an adapter's own ``compile`` is the OLMo field's: a config compiles ``step`` itself)
        if name not in fields and name not in omit and name not in _OLMO_FIELDS:
            problems.append(f"{adapter.__name__} keyword {name!r} is neither a field nor omitted")
    for name in omit:
        if name in fields or name not in keywords:
            problems.append(f"omit lists {name!r}, which is a field or not a keyword")
    if problems:
        raise TypeError(f"{cls.__name__} does not mirror {adapter.__name__}'s signature: "
                        + "; ".join(problems))


def register(name: str, *, omit: Sequence[str] = ()) -> Callable[[C], C]:
    """Class decorator: check that the config's fields are the adapter's keyword arguments
    (names and defaults; ``omit`` lists keywords deliberately left out), then register it with
    OLMo-core as ``"functim_<name>"`` so YAML/CLI configs can select it by ``type``."""

    def wrap(cls: C) -> C:
        if not (dataclasses.is_dataclass(cls) and issubclass(cls, FunctimOptimConfig)):
            raise TypeError(f"{cls.__name__} must be a @dataclass subclass of FunctimOptimConfig")
        _check_against_adapter(cls, tuple(omit))
        return OptimConfig.register(f"functim_{name}")(cls)

    return wrap


# -- routed optimizers (Muon, Scion): parameter names and routing rules -------------------------
def _at_least_2d(ndim: int) -> bool:
    return ndim >= 2


def olmo_transformer_rules(*, hidden: str, vector: str, embedding: str,
                           output: str) -> tuple[Rule, ...]:
    """Routing rules over OLMo-core ``Transformer`` parameter names (the categories of
    OLMo-core's ``MatrixAwareOptimConfig.categorize_parameters``), first match wins; the
    signature is :func:`functim.lm_routing`'s:

    1. every tensor with ndim < 2 (norm weights, biases, gains) -> ``vector``;
    2. ``embeddings.*`` (the input embedding) -> ``embedding``;
    3. ``lm_head.*`` (the output projection ``lm_head.w_out.weight``) -> ``output``;
    4. ``blocks.*`` with ndim >= 2 (attention and MLP matrices) -> ``hidden``.

    A parameter outside these (a model that is not an OLMo-core ``Transformer``) is claimed by
    no rule, which :class:`RoutedOptimConfig` reports as an error with the routing table."""
    return (
        Rule(vector, ndim=(0, 1)),
        Rule(embedding, path="embeddings.*"),
        Rule(output, path="lm_head.*"),
        Rule(hidden, path="blocks.*", ndim=_at_least_2d),
    )


@dataclass
class RoutedOptimConfig(FunctimOptimConfig[Opt]):
    """Base of the configs of adapters that route each parameter by its name (Muon, Scion).

    ``build_groups`` is OLMo-core's (same ``group_overrides`` glob expansion and ``strict``
    errors; override ``opts`` set the group's keys, e.g. ``{"lr": ...}`` or Muon's
    ``{"adamw_lr_ratio": ...}``), with each group's params given to the adapter as
    ``(name, param)`` pairs, and the adapter gets ``routing=self.routing()``: rules over
    OLMo-core's parameter names (:func:`olmo_transformer_rules`). Before anything is built, every
    trainable parameter must be claimed by a rule, else ValueError with the routing table
    (:meth:`explain` prints it). ``routing()`` may return None to leave the routing to the
    adapter's own options (Muon's ``muon_params``).
    """

    @abstractmethod
    def routing(self) -> tuple[Rule, ...] | None:
        """Ordered routing rules over OLMo-core parameter names, or None."""

    def optimizer_kwargs(self) -> dict[str, Any]:
        kwargs = super().optimizer_kwargs()
        routing = self.routing()
        if routing is not None:
            kwargs["routing"] = routing
        return kwargs

    def explain(self, model: torch.nn.Module) -> Explanation:
        """Which rule claims each trainable parameter (a table; ValueError if a parameter is
        claimed by no rule)."""
        routing = self.routing()
        if routing is None:
            raise ValueError(f"{type(self).__name__}: routing is left to the adapter's options")
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return explain(list(routing), named, owner=type(self).__name__)

    def build_groups(self, model: torch.nn.Module, strict: bool = True) -> list[dict[str, Any]]:
        groups = super().build_groups(model, strict=strict)  # OLMo-core's glob expansion
        if self.routing() is not None:
            self.explain(model)  # every parameter routed, or an error before building
        names = {id(p): n for n, p in model.named_parameters()}
        return [{**g, "params": [(names[id(p)], p) for p in g["params"]]} for g in groups]


# -- the configs (one per functional optimizer) -------------------------------------------------
@register("sgd", omit=("differentiable", "weight_decay_mask"))
@dataclass
class SGDConfig(FunctimOptimConfig[SGD]):
    """:class:`functim.adapters.SGD` (``torch.optim.SGD``'s signature)."""

    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    foreach: bool | None = None
    fused: bool | None = None
    state_dtype: str | None = None

    @classmethod
    def optimizer(cls) -> type[SGD]:
        return SGD


@register("adamw", omit=("capturable", "differentiable", "weight_decay_mask"))
@dataclass
class AdamWConfig(FunctimOptimConfig[AdamW]):
    """:class:`functim.adapters.AdamW` (``torch.optim.AdamW``'s signature and defaults)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    amsgrad: bool = False
    maximize: bool = False
    foreach: bool | None = None
    fused: bool | None = None
    state_dtype: str | None = None

    @classmethod
    def optimizer(cls) -> type[AdamW]:
        return AdamW


@register("nadamw", omit=("weight_decay_mask",))
@dataclass
class NAdamWConfig(FunctimOptimConfig[NAdamW]):
    """:class:`functim.adapters.NAdamW` (``variant``: "optax", "torch" or "timm")."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    variant: str = "optax"
    momentum_decay: float = 4e-3
    state_dtype: str | None = None

    @classmethod
    def optimizer(cls) -> type[NAdamW]:
        return NAdamW


@register("cautious_adamw", omit=("weight_decay_mask",))
@dataclass
class CautiousAdamWConfig(FunctimOptimConfig[CautiousAdamW]):
    """:class:`functim.adapters.CautiousAdamW` (C-Optim defaults)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    normalization: str = "mean"
    state_dtype: str | None = None

    @classmethod
    def optimizer(cls) -> type[CautiousAdamW]:
        return CautiousAdamW


@register("cautious_lion", omit=("weight_decay_mask",))
@dataclass
class CautiousLionConfig(FunctimOptimConfig[CautiousLion]):
    """:class:`functim.adapters.CautiousLion` (C-Optim defaults)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.98)
    weight_decay: float = 0.0
    normalization: str = "mean"
    state_dtype: str | None = None

    @classmethod
    def optimizer(cls) -> type[CautiousLion]:
        return CautiousLion


@register("lion", omit=("weight_decay_mask",))
@dataclass
class LionConfig(FunctimOptimConfig[Lion]):
    """:class:`functim.adapters.Lion` (lion-pytorch's signature)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    state_dtype: str | None = None

    @classmethod
    def optimizer(cls) -> type[Lion]:
        return Lion


@register("signsgd", omit=("weight_decay_mask",))
@dataclass
class SignSGDConfig(FunctimOptimConfig[SignSGD]):
    """:class:`functim.adapters.SignSGD` (no momentum; :class:`SignumConfig` has it)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    state_dtype: str | None = None

    @classmethod
    def optimizer(cls) -> type[SignSGD]:
        return SignSGD


@register("signum", omit=("weight_decay_mask",))
@dataclass
class SignumConfig(FunctimOptimConfig[Signum]):
    """:class:`functim.adapters.Signum` (sign of an EMA of the gradient)."""

    lr: float = 1e-3
    beta: float = 0.95
    weight_decay: float = 0.0
    state_dtype: str | None = None

    @classmethod
    def optimizer(cls) -> type[Signum]:
        return Signum


@register("mars", omit=("weight_decay_mask", "fused", "is_approx"))
@dataclass
class MarsConfig(FunctimOptimConfig[Mars]):
    """:class:`functim.adapters.Mars` (the MARS reference's signature; ``fused`` and
    ``is_approx`` are not fields: MARS has no fused kernel and only ``is_approx=True`` exists)."""

    lr: float = 3e-3
    betas: tuple[float, float] = (0.95, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    gamma: float = 0.025
    mars_type: str = "mars-adamw"
    optimize_1d: bool = False
    lr_1d: float = 3e-3
    betas_1d: tuple[float, float] = (0.9, 0.95)
    weight_decay_1d: float = 0.1
    clip: str = "per_tensor"
    state_dtype: str | None = None

    @classmethod
    def optimizer(cls) -> type[Mars]:
        return Mars


@register("schedule_free_adamw", omit=("weight_decay_mask",))
@dataclass
class ScheduleFreeAdamWConfig(FunctimOptimConfig[ScheduleFreeAdamW]):
    """:class:`functim.adapters.ScheduleFreeAdamW` (``schedulefree.AdamWScheduleFree``'s
    signature). OLMo-core's trainer never calls ``optimizer.eval()``: the model holds the
    training point ``y`` throughout, checkpoints included; call ``train_module.optim.eval()``
    yourself (e.g. in a callback) to evaluate the average ``x``, and ``train()`` after."""

    lr: float = 0.0025
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    r: float = 0.0
    weight_lr_power: float = 2.0
    state_dtype: str | None = None

    @classmethod
    def optimizer(cls) -> type[ScheduleFreeAdamW]:
        return ScheduleFreeAdamW


@register("muon", omit=("matrix_dims", "routing"))
@dataclass
class MuonConfig(RoutedOptimConfig[Muon]):
    """:class:`functim.adapters.Muon` (KellerJordan/Muon defaults, AdamW fallback) routed by
    OLMo-core's parameter names: ``blocks.*`` matrices to Muon; embeddings, ``lm_head`` and every
    ndim < 2 tensor to AdamW, whose lr is ``adamw_lr_ratio · lr`` (so the scheduler drives
    both) unless ``adamw_lr`` is set. ``muon_params=[globs]`` replaces that routing (exactly
    those parameters to Muon). ``matrix_dims`` (N-D leaves such as MoE experts) is not a
    field: build the adapter directly for those."""

    lr: float = 0.02
    weight_decay: float = 0.0
    momentum: float = 0.95
    nesterov: bool = True
    momentum_form: str = "ema"
    ns_steps: int = 5
    ns_coefficients: tuple[float, float, float] = NS5_COEFFICIENTS
    eps: float = 1e-7
    ns_dtype: str | None = None
    scale_mode: str = "keller"
    consistent_rms: float = 0.2
    muon_params: list[str] | None = None
    adamw_lr: float | None = None
    adamw_lr_ratio: float = 0.015
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_eps: float = 1e-10
    adamw_weight_decay: float = 0.0
    state_dtype: str | None = None
    fused: bool | None = None

    def routing(self) -> tuple[Rule, ...] | None:
        if self.muon_params is not None:
            return None  # the adapter's muon_params routing
        return olmo_transformer_rules(hidden="muon", vector="adamw", embedding="adamw",
                                      output="adamw")

    @classmethod
    def optimizer(cls) -> type[Muon]:
        return Muon


_NORM_CLASSES = {cls.__name__: cls for cls in NORMS}


@register("scion", omit=("matrix_dims", "routing"))
@dataclass
class ScionConfig(RoutedOptimConfig[Scion]):
    """:class:`functim.adapters.Scion` (the SCION reference's defaults) routed by OLMo-core's
    parameter names to the labels ``hidden`` (``blocks.*`` matrices), ``embedding``,
    ``output`` (``lm_head``) and ``vector`` (ndim < 2).

    ``norms``: per label, a norm as a plain dict, ``{"type": "Spectral", "scale": 50.0}`` (types
    ``Spectral``, ``Sign``, ``ColNorm``, ``RowNorm``, ``BiasRMS`` with their keyword arguments);
    labels left out keep :func:`functim.optimizers.scion.default_norms`."""

    lr: float = 1e-3
    momentum: float = 1.0
    unconstrained: bool = False
    norms: dict[str, dict[str, Any]] | None = None
    ns_steps: int = 5
    ns_dtype: str | None = None
    eps: float = 1e-7
    state_dtype: str | None = None

    @classmethod
    def adapter_value(cls, name: str, value: Any) -> Any:
        if name != "norms" or value is None:
            return super().adapter_value(name, value)
        norms = default_norms()
        for label, spec in value.items():
            spec = dict(spec)
            kind = spec.pop("type", None)
            if label not in norms or kind not in _NORM_CLASSES:
                raise ValueError(
                    f"{cls.__name__}.norms[{label!r}]: expected a label in {sorted(norms)} "
                    f"and a dict with 'type' in {sorted(_NORM_CLASSES)}, got {value[label]!r}")
            norms[label] = _NORM_CLASSES[kind](**spec)
        return norms

    def routing(self) -> tuple[Rule, ...]:
        return olmo_transformer_rules(hidden="hidden", vector="vector", embedding="embedding",
                                      output="output")

    @classmethod
    def optimizer(cls) -> type[Scion]:
        return Scion


@register("soap", omit=("weight_decay_mask",))
@dataclass
class SoapConfig(FunctimOptimConfig[Soap]):
    """:class:`functim.adapters.Soap` (the SOAP reference's signature and defaults)."""

    dtype_fields: ClassVar[tuple[str, ...]] = ("precond_dtype", "state_dtype")

    lr: float = 3e-3
    betas: tuple[float, float] = (0.95, 0.95)
    shampoo_beta: float = -1
    eps: float = 1e-8
    weight_decay: float = 0.01
    precondition_frequency: int = 10
    max_precond_dim: int = 10000
    merge_dims: bool = False
    precondition_1d: bool = False
    normalize_grads: bool = False
    data_format: str = "channels_first"
    correct_bias: bool = True
    precond_dtype: str | None = None
    state_dtype: str | None = None

    @classmethod
    def optimizer(cls) -> type[Soap]:
        return Soap


@register("kron", omit=())
@dataclass
class KronConfig(FunctimOptimConfig[Kron]):
    """:class:`functim.adapters.Kron` (kron_torch's signature and defaults; a number for
    ``preconditioner_update_probability`` makes it constant, ``None`` is kron_torch's annealed
    schedule)."""

    dtype_fields: ClassVar[tuple[str, ...]] = ("mu_dtype", "precond_dtype")

    lr: float = 3e-4
    b1: float = 0.9
    weight_decay: float = 0.0
    preconditioner_update_probability: float | None = None
    max_size_triangular: int = 8192
    min_ndim_triangular: int = 2
    memory_save_mode: str | None = None
    momentum_into_precond_update: bool = True
    precond_lr: float = 0.1
    precond_init_scale: float | None = 1.0
    merge_dims: bool = True
    mu_dtype: str | None = None
    precond_dtype: str | None = None
    balance_every: int = 100
    seed: int = 42

    @classmethod
    def optimizer(cls) -> type[Kron]:
        return Kron


# -- Sophia: the optimizer config and the Trainer callback that feeds it its Hessian ------------
@register("sophia", omit=("capturable", "weight_decay_mask"))
@dataclass
class SophiaConfig(FunctimOptimConfig[Sophia]):
    """:class:`functim.adapters.Sophia` (SophiaG's signature and defaults; ``bs`` = 1 because the
    Hessian comes from :class:`SophiaHessianCallback`, which gives the paper's ``B·ĝ⊙ĝ``).

    OLMo-core's trainer only calls ``step()``: without :class:`SophiaHessianCallback` in the
    trainer the Hessian EMA is never updated (the adapter warns after ``2·hessian_interval``
    steps without one)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.965, 0.99)
    rho: float = 0.04
    weight_decay: float = 0.1
    maximize: bool = False
    bs: float = 1.0
    eps: float = 1e-15
    hessian_interval: int = 10
    seed: int = 0
    state_dtype: str | None = None

    @classmethod
    def optimizer(cls) -> type[Sophia]:
        return Sophia


@dataclass
class SophiaHessianCallback(Callback):
    """Feeds a :class:`SophiaConfig` optimizer its Hessian in OLMo-core's ``Trainer``: the
    ``train_sophiag.py`` cadence (after optimizer steps k, 2k, ...; ``Sophia.hessian_due``), with
    :func:`functim.gnb_hessian` (labels sampled from the model's softmax with the optimizer's
    checkpointed RNG key) on the first ``instances`` sequences of the batch about to be trained
    on (the reference uses the next micro-batch), gradient norm clipped to ``clip_norm`` (the
    reference clips at its ``grad_clip``, 1.0), then ``update_hessian``.

    It runs in ``pre_step``, after the previous step's checkpoint, and its decision depends only
    on the optimizer's saved step counts, so a resumed run makes the same Hessian updates as an
    uninterrupted one. ``instances=None``: the train module's micro-batch
    (``rank_microbatch_size // sequence length``). The estimator runs the model through
    ``torch.func`` (``functional_call``), so the model must not be FSDP-sharded (DTensor params
    are rejected with a clear error); replicated or single-process training is supported.

    ``trainer_config.with_callback("sophia_hessian", SophiaHessianCallback())``."""

    clip_norm: float | None = 1.0
    instances: int | None = None
    priority: ClassVar[int] = 2  # before the checkpointer (priority 1), though pre_step saves none

    def _optimizer(self) -> Sophia:
        optim = self.trainer.train_module.optim
        if not isinstance(optim, Sophia):
            raise TypeError("SophiaHessianCallback needs the train module's optimizer to be "
                            f"functim.adapters.Sophia (SophiaConfig), got {type(optim).__name__}")
        return optim

    def pre_train(self) -> None:
        self._optimizer()
        model = self.trainer.train_module.model
        sharded = [n for n, p in model.named_parameters() if is_dtensor(p)]
        if sharded:
            raise ValueError("SophiaHessianCallback: the model's parameters are DTensors (FSDP/TP; "
                             f"e.g. {sharded[0]!r}); the torch.func Hessian estimator needs plain "
                             "tensors")

    def pre_step(self, batch: dict[str, Any]) -> None:
        optim = self._optimizer()
        if not optim.hessian_due():
            return
        ids = batch["input_ids"]
        n = self.instances
        if n is None:
            module = self.trainer.train_module
            n = max(1, module.rank_microbatch_size // ids.shape[-1])
        module = self.trainer.train_module.model
        optim.update_hessian(model=module, inputs=ids[:n], clip_norm=self.clip_norm)
