"""The optimizers ``functim-compare`` runs, their default settings, and the settings a user may
change from the command line (``--lr``, ``--sweep OPT.KEY=V1,V2``) with their types."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

import functim as ft

# (lr, warmup_steps, **settings) and (named_params, lr, warmup_steps, **settings)
FunctionalFactory = Callable[..., ft.Optimizer]
AdapterFactory = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerEntry:
    """How ``functim-compare`` builds one optimizer on each surface.

    ``functional(lr, warmup_steps, **settings)`` returns the ``functim`` optimizer and
    ``adapter(named_params, lr, warmup_steps, **settings)`` the ``functim.adapters`` one (None: no
    adapter yet), both with ``defaults`` updated by ``settings``. ``lr`` is the default peak
    learning rate (None: the constructor's own default). ``builtin_warmup``: the optimizer warms
    up by itself over ``warmup_steps`` and gets no external schedule. ``eval_params(params,
    state)``: the point to evaluate when it is not the training point (functional surface; the
    adapter's ``eval()``/``train()`` are called instead). ``constructor``: the ``functim``
    function, whose signature says which settings exist and their types.
    """

    name: str
    functional: FunctionalFactory
    adapter: AdapterFactory | None
    lr: float | None
    description: str
    builtin_warmup: bool = False
    eval_params: Callable[[Any, Any], Any] | None = None
    constructor: Callable[..., ft.Optimizer] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def effective_settings(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Every setting a run passes to the constructor: the entry's own, the default lr, and
        ``settings`` over them (the constructor's defaults for the rest)."""
        lr = {} if self.lr is None else {"lr": self.lr}
        return {**lr, **self.defaults, **settings}


def _entry(name: str, adapter_class: str, lr: float | None, description: str, *,
           builtin_warmup: bool = False, eval_params=None, **defaults: Any) -> OptimizerEntry:
    """An entry whose functional constructor ``functim.<name>`` and adapter class
    ``functim.adapters.<adapter_class>`` take the same keywords."""
    from functim import adapters

    fn = getattr(ft, name)
    cls = getattr(adapters, adapter_class, None)

    def keywords(lr: float | None, warmup_steps: int, settings: dict) -> dict:
        base = {"warmup_steps": warmup_steps} if builtin_warmup else {}
        if lr is not None:
            base["lr"] = lr
        return {**base, **defaults, **settings}

    def functional(lr: float | None, warmup_steps: int, **settings: Any) -> ft.Optimizer:
        return fn(**keywords(lr, warmup_steps, settings))

    def adapter(named_params: Iterable[tuple[str, torch.Tensor]], lr: float | None,
                warmup_steps: int, **settings: Any) -> torch.optim.Optimizer:
        return cls(named_params, **keywords(lr, warmup_steps, settings))

    return OptimizerEntry(name, functional, adapter if cls is not None else None, lr, description,
                          builtin_warmup=builtin_warmup, eval_params=eval_params, constructor=fn,
                          defaults=dict(defaults))


_MASK = {"weight_decay_mask": ft.default_weight_decay_mask}
_WD = "weight decay on matrices only (ft.default_weight_decay_mask)"

# One builder per optimizer name; a name is offered only when ``hasattr(functim, name)``, so an
# entry for an optimizer that has not landed yet costs nothing until it does. Settings follow the
# usual LLM-pretraining choices (nanoGPT-style AdamW; Lion at 1/10 of AdamW's lr and 10x its
# weight decay, as the Lion paper advises) or, where marked, the constructor's own defaults.
_BUILDERS: dict[str, Callable[[], OptimizerEntry]] = {
    "adamw": lambda: _entry(
        "adamw", "AdamW", 3e-3, f"betas (0.9, 0.95), wd 0.1, {_WD}",
        betas=(0.9, 0.95), weight_decay=0.1, **_MASK),
    "nadamw": lambda: _entry(
        "nadamw", "NAdamW", 3e-3, f"optax form, betas (0.9, 0.95), wd 0.1, {_WD}",
        betas=(0.9, 0.95), weight_decay=0.1, **_MASK),
    "cautious_adamw": lambda: _entry(
        "cautious_adamw", "CautiousAdamW", 3e-3, f"betas (0.9, 0.95), wd 0.1, {_WD}",
        betas=(0.9, 0.95), weight_decay=0.1, **_MASK),
    "lion": lambda: _entry(
        "lion", "Lion", 3e-4, f"betas (0.9, 0.99), wd 1.0, {_WD}",
        betas=(0.9, 0.99), weight_decay=1.0, **_MASK),
    "cautious_lion": lambda: _entry(
        "cautious_lion", "CautiousLion", 3e-4, f"betas (0.95, 0.98), wd 1.0, {_WD}",
        betas=(0.95, 0.98), weight_decay=1.0, **_MASK),
    "signum": lambda: _entry(
        "signum", "Signum", 3e-4, f"beta 0.95, wd 1.0, {_WD}",
        beta=0.95, weight_decay=1.0, **_MASK),
    "signsgd": lambda: _entry(
        "signsgd", "SignSGD", 1e-4, f"wd 1.0, {_WD}", weight_decay=1.0, **_MASK),
    "mars": lambda: _entry(
        "mars", "Mars", 3e-3, "MARS-AdamW, betas (0.95, 0.99), gamma 0.025, wd 0.1 on matrices; "
        "non-2-D params: AdamW with lr_1d/lr = 1 (reference defaults)",
        betas=(0.95, 0.99), weight_decay=0.1, **_MASK),
    "schedule_free_adamw": lambda: _entry(
        "schedule_free_adamw", "ScheduleFreeAdamW", 3e-3,
        f"betas (0.9, 0.95), wd 0.1, {_WD}; built-in warmup, no decay, eval at x",
        builtin_warmup=True, eval_params=ft.schedule_free_eval_params,
        betas=(0.9, 0.95), weight_decay=0.1, **_MASK),
    "sgd": lambda: _entry(
        "sgd", "SGD", 0.3, f"momentum 0.9, nesterov, wd 1e-4, {_WD}",
        momentum=0.9, nesterov=True, weight_decay=1e-4, **_MASK),
    # Muon's default routing: hidden matrices to Muon; embeddings, head, norms, biases and
    # ndim < 2 to AdamW, whose lr is adamw_lr_ratio x lr (so the schedule scales both), here
    # 0.15 x 0.02 = 3e-3, the AdamW run's lr.
    "muon": lambda: _entry(
        "muon", "Muon", 0.02, "Keller defaults (momentum 0.95, nesterov, wd 0); AdamW fallback "
        "for embeddings/head/norms/biases at lr 0.15 x lr, betas (0.9, 0.95)",
        adamw_lr_ratio=0.15),
    "scion": lambda: _entry("scion", "Scion", None, "constructor defaults"),
    "soap": lambda: _entry("soap", "Soap", None, "constructor defaults"),
    "kron": lambda: _entry("kron", "Kron", None, "constructor defaults"),
    # sophia is left out: it needs Hessian estimates (an extra loss_fn pass), not just gradients.
}


def registry() -> dict[str, OptimizerEntry]:
    """The optimizers ``functim-compare`` can run in this version of functim, by name."""
    return {name: build() for name, build in _BUILDERS.items() if hasattr(ft, name)}


# -- settings from the command line ---------------------------------------------------------------
# The kinds of value a setting takes, read from the constructor's annotations. A setting whose
# annotation names none of these (rules, masks, callables) cannot be given on the command line.
_KINDS = {"ScalarOrSchedule": "float", "float": "float", "int": "int", "bool": "bool",
          "str": "str", "torch.dtype": "dtype", "None": "none"}
_ELEMENT_KINDS = ("float", "int", "bool", "str")
_DESCRIBE = {"float": "a finite number", "int": "an integer", "bool": "true or false",
             "str": "a word", "dtype": "a torch dtype (e.g. float32, bfloat16)", "none": "none"}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts + [text[start:].strip()]


def _annotation_text(param: inspect.Parameter) -> str:
    ann = param.annotation
    if ann is inspect.Parameter.empty:  # fall back on the default's type
        return "None" if param.default is None else type(param.default).__name__
    return ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))


def value_kinds(param: inspect.Parameter) -> tuple:
    """The kinds of value ``param`` takes from the command line: "float", "int", "bool", "str",
    "dtype", "none", or a tuple of element kinds (written ``a:b``); empty when none apply."""
    kinds: list = []
    for alt in _split_top(_annotation_text(param), "|"):
        if alt in _KINDS:
            kinds.append(_KINDS[alt])
        elif alt.startswith("tuple[") and alt.endswith("]"):
            items = tuple(_KINDS.get(a) for a in _split_top(alt[len("tuple["):-1], ","))
            if items and all(k in _ELEMENT_KINDS for k in items):
                kinds.append(items)
    return tuple(kinds)


def describe_kinds(kinds: tuple) -> str:
    """``kinds`` in words, for an error message."""
    words = []
    for k in kinds:
        if isinstance(k, tuple):
            words.append(f"{len(k)} values joined by ':' (e.g. "
                         f"{':'.join('0.9' if e == 'float' else '1' for e in k)})")
        else:
            words.append(_DESCRIBE[k])
    return " or ".join(words)


def _convert(text: str, kind: str) -> Any:
    """``text`` as one ``kind``; ValueError if it is not one."""
    low = text.lower()
    if kind == "float":
        v = float(text)
        if not math.isfinite(v):
            raise ValueError(text)
        return v
    if kind == "int":
        return int(text)
    if kind == "bool" and low in _TRUE + _FALSE:
        return low in _TRUE
    if kind == "dtype":
        v = getattr(torch, low.removeprefix("torch."), None)
        if isinstance(v, torch.dtype):
            return v
    if kind == "str" and text:
        return text
    if kind == "none" and low in ("none", "null"):
        return None
    raise ValueError(text)


def parse_value(text: str, kinds: tuple) -> Any:
    """``text`` as the first of ``kinds`` it reads as (``none`` first, a plain word last);
    ValueError naming what was expected."""
    text = text.strip()
    order = sorted(kinds, key=lambda k: {"none": 0, "str": 2}.get(k, 1) if isinstance(k, str)
                   else 1)
    for kind in order:
        try:
            if isinstance(kind, tuple):
                items = text.split(":")
                if len(items) != len(kind):
                    raise ValueError(text)
                return tuple(_convert(t.strip(), k) for t, k in zip(items, kind))
            return _convert(text, kind)
        except ValueError:
            continue
    raise ValueError(f"expected {describe_kinds(kinds)}, got {text!r}")


def settable(entry: OptimizerEntry) -> dict[str, tuple]:
    """The settings of ``entry`` that the command line can give, with their value kinds."""
    if entry.constructor is None:
        return {}
    params = inspect.signature(entry.constructor).parameters.values()
    kinds = {p.name: value_kinds(p) for p in params
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {name: k for name, k in kinds.items() if k and k != ("none",)}


def show_value(v: Any) -> str:
    """A setting's value as the command line writes it (``0.9:0.95``, ``true``, ``bfloat16``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return ":".join(show_value(x) for x in v)
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    return repr(v) if isinstance(v, float) else str(v)


def json_value(v: Any) -> Any:
    """A setting's value as JSON (a callable by its qualified name), for a run's identity."""
    if isinstance(v, (tuple, list)):
        return [json_value(x) for x in v]
    if isinstance(v, torch.dtype):
        return str(v)
    if callable(v):
        return f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', repr(v))}"
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)
