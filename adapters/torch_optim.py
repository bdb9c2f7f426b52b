"""torch.optim adapters: real ``torch.optim.Optimizer`` subclasses over functim's functional core.

The adapter keeps no maths of its own: each ``step()`` calls the functional optimizer's update in
donated (in-place) mode. State lives where torch expects it (``self.state[p]``, created eagerly at
construction so ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` sees it),
hyperparameters live in ``param_groups`` (so ``torch.optim.lr_scheduler`` works: ``group["lr"]`` is
read every step), and ``state_dict()``/``load_state_dict()`` are torch's own, except that loading
keeps each state tensor's dtype (torch would cast it to the param dtype, turning the float32
moments of a bfloat16 param into bfloat16).

Per-parameter state layout:
- elementwise optimizers (AdamW, SGD, ...): torch's layout — ``step`` (float32 CPU tensor, per
  param, as torch) and the named buffers (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``...);
- any other functim optimizer (chain, partition, SOAP, ...): every per-parameter buffer and every
  scalar of the functional state under its dotted state path (scalars are shared by the group and
  stored with each of its params; a leaf's sequence of tensors, such as SOAP's ``GG``, one key per
  item: ``GG.0``, ``GG.1``), so ``self.state[p]`` holds tensors only. Scalars the functional state
  keeps on the CPU (host-read counters) stay there on load.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

import functim as ft
from functim import _tree
from functim.elementwise import ElementwiseOptimizer
from functim.hyperparams import HPARAM_DTYPE, HPARAMS_KEY, check_hyperparam, get_hyperparams
from functim.state import decay_flags

_STATIC_KEYS = ("params", "param_names", "initial_lr")
# torch.optim's execution flags: a loaded param group may carry them (torch.optim checkpoints do);
# functim chooses its execution itself, so they are dropped unless this optimizer's groups have
# the key too
_TORCH_FLAGS = ("foreach", "capturable", "differentiable", "decoupled_weight_decay")
# torch.optim options that some functim optimizers do not take, at the value where they change
# nothing: dropped from a loaded param group whose optimizer does not take them
_TORCH_NOOP_OPTIONS = {"maximize": False, "amsgrad": False}
# keys a loaded param group may have that a fresh one need not (set by LR schedulers, torch)
_LOADABLE_EXTRA_KEYS = ("params", "param_names", "initial_lr", "fused", "max_lr", "min_lr",
                        "base_lr", "max_momentum", "base_momentum")


def _named_param_groups(params: Any) -> list[dict]:
    """Normalise torch's accepted inputs (tensors, (name, tensor) pairs, dicts) to groups."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params argument given to the optimizer should be an iterable of Tensors "
                        "or dicts (or of (name, tensor) pairs), but got "
                        + torch.typename(params))
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(params[0], dict):
        params = [{"params": params}]
    return params


_LAYOUT = operator.attrgetter("layout")


def _is_strided(g: torch.Tensor | None) -> bool:
    return g is None or g.layout == torch.strided


def _one_element(key: str, value: Any) -> Any:
    """A hyperparameter as torch.optim takes it: a tensor of any shape with one element is used
    as a 0-d tensor (a view, so a value changed in place is seen); more elements: ValueError."""
    if isinstance(value, torch.Tensor) and value.ndim:
        if value.numel() != 1:
            raise ValueError(f"Tensor {key} must be 1-element, got shape {tuple(value.shape)}")
        return value.view(())
    return value


def _scalar_options(options: Mapping) -> dict:
    """``options`` with every tensor value (and each tensor of ``betas``) made 0-d by
    :func:`_one_element`."""
    out = {}
    for k, v in options.items():
        if k.endswith("betas") and isinstance(v, (tuple, list)):
            out[k] = type(v)(_one_element(f"{k}[{i}]", b) for i, b in enumerate(v))
        else:
            out[k] = _one_element(k, v)
    return out


def _group_keys(paths) -> dict[str, str]:
    """Param-group key of each hyperparameter path: its short name where unambiguous."""
    short: dict[str, int] = {}
    for path in paths:
        name = path.rsplit(".", 1)[-1]
        short[name] = short.get(name, 0) + 1
    return {path: (path.rsplit(".", 1)[-1] if short[path.rsplit(".", 1)[-1]] == 1 else path)
            for path in paths}


def _scaled_lr_keys(keys: list[str]) -> list[str]:
    """The group keys of several learning rates (dotted ``*.lr`` paths, no plain ``lr``): the
    ones a group's ``lr`` multiplies."""
    if "lr" in keys:
        return []
    return [k for k in keys if k.rsplit(".", 1)[-1] == "lr"]


class MixedParamNamesError(TypeError, ValueError):
    """A param group mixing (name, tensor) pairs and plain tensors: torch.optim raises a
    ValueError for it, this package always raised a TypeError; it is both."""


class FunctimOptimizer(torch.optim.Optimizer):
    """Drive any functim :class:`~functim.Optimizer` as a ``torch.optim.Optimizer``.

    ``FunctimOptimizer(model.named_parameters(), ft.chain(ft.clip_by_global_norm(1.0),
    ft.adamw(lr=3e-4)))``. The group keys are the optimizer's hyperparameter names (``lr``,
    ``beta1``, ... or dotted paths where a short name is ambiguous), so param groups can override
    them and LR schedulers drive ``lr``. A hyperparameter given to the functional optimizer as a
    schedule is driven by that schedule, not by the group.

    Where the optimizer has several learning rates (``ft.partition`` of AdamW and Muon: keys
    ``partition.adamw.lr``, ``partition.muon.lr``), the group's ``lr`` (default 1.0) multiplies
    every one of them: an LR scheduler driving ``lr`` (its ``initial_lr`` is then 1.0) scales all
    learning rates together and keeps their ratios; each dotted key still sets its own base value.
    A group key that is none of these (nor the bookkeeping of torch's LR schedulers:
    ``initial_lr``, ``max_lr``, ...) is a ValueError, at construction, ``add_param_group`` and, when
    set later, at the next ``step()``.

    Pass ``model.named_parameters()`` so that path rules (``ft.partition``, weight-decay masks) see
    the parameter names; plain parameters are named ``"<group>.<index>"``.
    """

    def __init__(self, params: Iterable, optimizer: ft.Optimizer,
                 *, fused: bool | None = None, **defaults: Any):
        if not isinstance(optimizer, ft.Optimizer):
            raise TypeError("optimizer must be a functim Optimizer, got "
                            f"{type(optimizer).__name__}")
        self._functional = optimizer
        self._fused_default = fused
        hp = self._hparam_defaults(optimizer)
        self._hparam_names = list(hp)
        self._hparam_ranges = self._group_key_ranges(optimizer)
        self._scaled_lr_keys = _scaled_lr_keys(self._hparam_names)
        if self._scaled_lr_keys:
            hp["lr"] = 1.0
        merged = {**hp, **defaults}
        self._caches: dict[int, Any] = {}
        self._checked_groups: dict[int, list] = {}  # group values last checked (at step())
        super().__init__(_named_param_groups(params), merged)
        for group in self.param_groups:
            self._validate_group(group)
        self._init_all_state()

    # -- hooks for named subclasses ------------------------------------------------------
    @staticmethod
    def _hparam_defaults(optimizer: ft.Optimizer) -> dict[str, float]:
        """Group defaults: the functional optimizer's hyperparameters (short names where
        unambiguous). Named subclasses use torch's keywords instead and return {}."""
        hp = get_hyperparams(optimizer.init_state({}))
        keys = _group_keys(hp)
        return {keys[path]: float(t) for path, t in hp.items()}

    @staticmethod
    def _group_key_ranges(optimizer: ft.Optimizer) -> dict:
        ranges = optimizer.hyperparam_ranges()
        keys = _group_keys(ranges)
        return {keys[path]: r for path, r in ranges.items()}

    def _group_optimizer(self, group: dict) -> ft.Optimizer:
        """The functional optimizer for a group (named subclasses build it from static options)."""
        return self._functional

    def _group_hparams(self, group: dict) -> dict[str, float]:
        """{short-or-dotted hyperparameter name: value} for this group (each learning rate
        times the group's ``lr`` where that scales several: see the class docstring)."""
        hp = {k: _one_element(k, group[k]) for k in self._hparam_names}
        if self._scaled_lr_keys:
            scale = _one_element("lr", group["lr"])
            for k in self._scaled_lr_keys:
                hp[k] = hp[k] * scale
        return hp

    def _validate_group(self, group: dict) -> None:
        """Group keys are known ones, and values get the functional core's checks (named
        subclasses re-run their constructor instead)."""
        name = self._functional.name
        known = {*self._hparam_names, *_LOADABLE_EXTRA_KEYS}
        if self._scaled_lr_keys:
            known.add("lr")
            check_hyperparam(name, "lr", _one_element("lr", group["lr"]),
                             self._hparam_ranges[self._scaled_lr_keys[0]])
        unknown = sorted(set(group) - known)
        if unknown:
            raise ValueError(f"{type(self).__name__}: param group key {unknown[0]!r} is not a "
                             f"hyperparameter of {name}; its keys are "
                             f"{sorted(known - set(_LOADABLE_EXTRA_KEYS))}")
        for k, v in self._group_hparams(group).items():
            if k in self._hparam_ranges:
                check_hyperparam(name, k, v, self._hparam_ranges[k])

    # -- param groups ----------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        names = param_group.get("params")
        if isinstance(names, Iterable) and not isinstance(names, torch.Tensor):
            items = list(names)
            named = [isinstance(x, tuple) for x in items]
            if any(named) and not all(named):
                i = named.index(not named[0])
                raise MixedParamNamesError(
                    "all optimizer params should be with/without names. Some param names are "
                    f"missing: {type(self).__name__}: param group mixes (name, tensor) pairs and "
                    f"plain tensors (item 0 is {'a pair' if named[0] else 'a tensor'}, item {i} is "
                    f"{'a pair' if named[i] else 'a tensor'}); pass model.named_parameters() "
                    "or model.parameters(), not both")
            if items and isinstance(items[0], tuple):
                param_group = dict(param_group)
                param_group["param_names"] = [n for n, _ in items]
                param_group["params"] = [p for _, p in items]
            else:
                param_group = dict(param_group, params=items)
        if hasattr(self, "_caches"):  # validate before torch appends the group
            self._validate_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        if hasattr(self, "_caches"):
            self._init_group_state(len(self.param_groups) - 1, self.param_groups[-1])

    def _names(self, gi: int, group: dict) -> list[str]:
        names = group.get("param_names")
        return list(names) if names else [f"{gi}.{i}" for i in range(len(group["params"]))]

    # -- state -----------------------------------------------------------------------------
    def _init_all_state(self) -> None:
        for gi, group in enumerate(self.param_groups):
            self._init_group_state(gi, group)

    def _init_group_state(self, gi: int, group: dict) -> None:
        self._caches.pop(gi, None)
        opt = self._group_optimizer(group)
        params = group["params"]
        if all(len(self.state[p]) > 0 for p in params):
            return
        tree = dict(zip(self._names(gi, group), params))
        with torch.no_grad():
            st = opt.init_state(tree)
        if _steps_elementwise(opt):
            for b in opt.buffer_names:
                for name, p in tree.items():
                    self.state[p].setdefault(b, st[b][name])
            for p in params:
                self.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))
                for name in opt.scalar_state:
                    self.state[p].setdefault(name, st[name].clone())
            return
        layout = _Layout(st, tree)
        for key, name, t in layout.buffer_entries(st):
            self.state[tree[name]].setdefault(key, t)
        for path, t in layout.scalars(st).items():
            for p in params:
                self.state[p].setdefault(path, t.clone())

    def _state_template(self, gi: int, group: dict, opt: ft.Optimizer) -> list[dict]:
        """Per param of the group: ``{state key: tensor}`` of a complete state, built on the meta
        device (shapes and dtypes only, no memory). What a loaded state is checked against."""
        tree = {n: torch.empty_like(p, device="meta")
                for n, p in zip(self._names(gi, group), group["params"])}
        st = opt.init_state(tree)
        out: dict[str, dict] = {n: {} for n in tree}
        if _steps_elementwise(opt):
            for name in tree:
                out[name] = {b: st[b][name] for b in opt.buffer_names}
                out[name]["step"] = torch.zeros((), dtype=torch.float32, device="meta")
                out[name].update({k: st[k] for k in opt.scalar_state})
        else:
            layout = _Layout(st, tree)
            for key, name, t in layout.buffer_entries(st):
                out[name][key] = t
            for path, t in layout.scalars(st).items():
                for name in tree:
                    out[name][path] = t
        return list(out.values())

    def state_dict(self) -> dict:
        """torch's ``state_dict``, with one tensor per param for every state entry: tensors
        that params share here (a step count or other scalar kept once for the params that
        step together) are copied for each, so torch.optim, which increments each param's
        ``step`` in place, loads and continues it exactly."""
        sd = super().state_dict()
        seen: set[int] = set()
        for pid, entry in sd["state"].items():
            if not isinstance(entry, Mapping):  # (a state_dict pre-hook's own entry)
                continue
            copied = dict(entry)
            for k, v in entry.items():
                if isinstance(v, torch.Tensor):
                    if id(v) in seen:
                        copied[k] = v.clone()
                    seen.add(id(v))
            sd["state"][pid] = copied
        return sd

    # -- loading a state dict --------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict`` after checking the whole state dict against this
        optimizer (groups, options, every state entry's keys, shapes and dtypes): an
        incompatible one raises a ValueError naming the first problem and changes nothing.

        A checkpoint of ``torch.optim.AdamW``/``SGD``/``NAdam`` (decoupled weight decay) loads
        into the matching adapter: torch's execution flags (``foreach``, ``capturable``,
        ``differentiable``, ``decoupled_weight_decay``) are dropped, options it lacks (functim's
        own, such as ``state_dtype``, or ``maximize`` in old checkpoints) keep this optimizer's
        values, a float ``step`` (torch < 1.12) becomes a tensor, and a missing ``step`` (torch's
        SGD keeps none) is 1 where the param has state (it has stepped) and 0 otherwise.
        Buffers keep their saved dtype and take the param's device and memory layout."""
        groups, entries = self._checked_state_dict(state_dict)
        saved = (self.param_groups, self.state, dict(self._caches))
        try:
            super().load_state_dict({"state": {}, "param_groups": groups})
            for (gi, group), group_entries in zip(enumerate(self.param_groups), entries):
                self._place_loaded_state(gi, group, group_entries)
            self._caches.clear()
            self._init_all_state()
        except BaseException:
            self.param_groups, self.state = saved[0], saved[1]
            self._caches = saved[2]
            raise

    def _checked_state_dict(self, state_dict: Any) -> tuple[list[dict], list[list]]:
        """(normalised param groups, per group the saved state entry of each param or None),
        after every check; raises ValueError on the first problem."""
        cls = type(self).__name__
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(
                state_dict):
            raise ValueError(f"{cls}.load_state_dict: expected a dict with 'state' and "
                             "'param_groups' (made by state_dict()), got "
                             + (f"keys {sorted(state_dict)}" if isinstance(state_dict, Mapping)
                                else type(state_dict).__name__))
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{cls}.load_state_dict: the state dict has {len(saved_groups)} "
                             f"param groups, this optimizer {len(self.param_groups)}")
        groups, entries = [], []
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{cls}.load_state_dict: param group {gi} of the state dict "
                                 f"has {len(saved['params'])} params, this optimizer's "
                                 f"{len(group['params'])}")
            new = self._loaded_group(gi, saved, group)
            opt = self._group_optimizer(new)
            template = self._state_template(gi, group, opt)
            names = self._names(gi, group)
            found = []
            for pid, p, name, want in zip(saved["params"], group["params"], names, template):
                entry = saved_state.get(pid)
                if entry is not None:
                    self._check_entry(opt, name, p, entry, want)
                found.append(entry)
            groups.append(new)
            entries.append(found)
        return groups, entries

    def _loaded_group(self, gi: int, saved: Mapping, group: dict) -> dict:
        """A saved param group in this optimizer's terms (see :meth:`load_state_dict`),
        checked by building its functional optimizer."""
        cls = type(self).__name__
        if saved.get("decoupled_weight_decay") is False and saved.get("weight_decay", 0) != 0:
            raise ValueError(f"{cls}.load_state_dict: param group {gi} of the state dict has an "
                             "L2 (coupled) weight decay, decoupled_weight_decay=False; "
                             f"{cls}'s weight decay is decoupled")
        missing = [k for k in self._required_group_keys(group) if k not in saved]
        if missing:
            raise ValueError(f"{cls}.load_state_dict: param group {gi} of the state dict has no "
                             f"{missing[0]!r}")
        new = {k: v for k, v in saved.items() if k in group or not (
            k in _TORCH_FLAGS or (k in _TORCH_NOOP_OPTIONS and v == _TORCH_NOOP_OPTIONS[k]))}
        for k, v in group.items():
            new.setdefault(k, v)
        if "decoupled_weight_decay" in group:  # (this optimizer's weight decay is decoupled)
            new["decoupled_weight_decay"] = True
        unknown = sorted(set(new) - set(group) - set(_LOADABLE_EXTRA_KEYS))
        if unknown:
            raise ValueError(f"{cls}.load_state_dict: param group {gi} of the state dict has "
                             f"option {unknown[0]!r}, which {cls} does not take")
        try:
            self._validate_group(new)
        except TypeError as e:
            raise ValueError(f"{cls}.load_state_dict: param group {gi}: {e}") from None
        return new

    def _required_group_keys(self, group: dict) -> list[str]:
        """The group keys a loaded param group must have: its hyperparameters (a checkpoint
        without ``lr`` is not one of this optimizer's; options such as ``state_dtype`` may be
        missing and keep this optimizer's values)."""
        return [k for k in self._hparam_names if k in group]

    def _check_entry(self, opt: ft.Optimizer, name: str, p: torch.Tensor, entry: Any,
                     want: dict) -> None:
        """One param's saved state against the template ``want`` (see :meth:`_state_template`)."""
        cls = type(self).__name__
        if not isinstance(entry, Mapping):
            raise ValueError(f"{cls}.load_state_dict: the state of param {name!r} must be a "
                             f"dict, got {type(entry).__name__}")
        elementwise = _steps_elementwise(opt)
        for key, v in entry.items():
            t = want.get(key)
            if t is None:
                if key in self.state[p]:  # a key of the adapter's own (e.g. Sophia's RNG key)
                    continue
                raise ValueError(f"{cls}.load_state_dict: the state of param {name!r} has "
                                 f"{key!r}, which {opt.name} does not keep (was it saved by "
                                 "another optimizer?)")
            if t.ndim == 0 and isinstance(v, (int, float)) and not isinstance(v, bool):
                continue  # a plain number for a scalar (torch < 1.12 saved step as a float)
            where = f"state[{key!r}] of param {name!r}"
            if not isinstance(v, torch.Tensor) or v.shape != t.shape:
                like = " like the param" if t.shape == p.shape and t.ndim else ""
                raise ValueError(f"{cls}.load_state_dict: {where} is {_tree.describe_leaf(v)}, "
                                 f"expected shape {tuple(t.shape)}{like}")
            if v.is_floating_point() != t.is_floating_point() or (
                    not t.is_floating_point() and v.dtype != t.dtype):
                kind = "floating-point" if t.is_floating_point() else str(t.dtype)
                raise ValueError(f"{cls}.load_state_dict: {where} is {v.dtype}, expected a "
                                 f"{kind} tensor")
        missing = [k for k in want if k not in entry and not (elementwise and k == "step")]
        if missing:
            raise ValueError(f"{cls}.load_state_dict: the state of param {name!r} has no "
                             f"{missing[0]!r} (was it saved by another optimizer?)")

    def _place_loaded_state(self, gi: int, group: dict, entries: list) -> None:
        """Put the checked saved tensors in ``self.state``: buffers with their saved dtype on
        the param's device, in the param's memory layout (so torch's fused kernels still
        apply); scalars in the functional state's dtype, on the CPU where it keeps them there
        (host-read counters: on the param's device each read would be a sync)."""
        opt = self._group_optimizer(group)
        elementwise = _steps_elementwise(opt)
        template = self._state_template(gi, group, opt)
        on_cpu = set() if elementwise else self._layout(gi, group, opt).cpu_scalars
        for p, entry, want in zip(group["params"], entries, template):
            self.state[p] = {}
            if entry is None:
                continue
            for key, v in entry.items():
                t = want.get(key)
                device = torch.device("cpu") if key in on_cpu or (
                    elementwise and key == "step") else p.device
                if t is None:
                    self.state[p][key] = v
                elif t.ndim == 0:
                    dtype = t.dtype if t.is_floating_point() else v.dtype
                    self.state[p][key] = torch.as_tensor(v).to(device=device, dtype=dtype)
                else:
                    self.state[p][key] = _like_param(v, p, device)
            if elementwise and "step" not in entry:
                stepped = any(k in entry for k in opt.buffer_names)
                self.state[p]["step"] = torch.tensor(float(stepped), dtype=torch.float32)

    # -- step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        self._check_compilable()
        self._check_changed_groups()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [[p.grad for p in group["params"]] for group in self.param_groups]
        self._check_dense_grads(grads)
        for gi, group in enumerate(self.param_groups):
            opt = self._group_optimizer(group)
            if _steps_elementwise(opt):
                self._step_elementwise(gi, group, opt, grads[gi])
            else:
                self._step_generic(gi, group, opt)
        return loss

    def _check_changed_groups(self) -> None:
        """The values of every param group (``lr`` set by a scheduler or by hand, ...) pass the
        constructor's checks, before any group steps. Checked when a value changed since the
        last check (a tensor value, when it is another tensor: its value is not read on the
        host, which would be a device sync)."""
        checked = self._checked_groups
        for gi, group in enumerate(self.param_groups):
            values = [(k, id(v) if isinstance(v, torch.Tensor) else v)
                      for k, v in group.items() if k not in ("params", "param_names")]
            if checked.get(gi) != values:
                try:
                    self._validate_group(group)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"{type(self).__name__}: param group {gi}: {e}") from None
                checked[gi] = values

    def _check_dense_grads(self, grads: list[list]) -> None:
        """Every grad (``grads``: per group) is a dense (strided) tensor, checked before any
        group steps: functim's kernels take no sparse gradients (see the README's torch.optim
        section). Paid at every step: the common case is one C-level pass per group."""
        for gi, (group, gs) in enumerate(zip(self.param_groups, grads)):
            present = filter(functools.partial(operator.is_not, None), gs)
            if all(map(operator.is_, map(_LAYOUT, present), itertools.repeat(torch.strided))):
                continue
            name = next(n for n, g in zip(self._names(gi, group), gs) if not _is_strided(g))
            raise RuntimeError(
                f"{type(self).__name__}: the grad of param {name!r} is sparse; functim's "
                "optimizers take dense gradients only: pass p.grad.to_dense(), or use "
                "torch.optim.SGD for sparse updates")

    def compiles_step(self) -> bool:
        """Whether ``torch.compile(opt.step)`` compiles this optimizer's step: every group runs
        an elementwise optimizer (AdamW, SGD, NAdamW, Lion, SignSGD, Signum, Cautious AdamW and
        Lion, MARS, Sophia), whose kernels are traced (torch's fused kernels are not used
        there). Otherwise a compiled ``step()`` raises a RuntimeError saying what to do."""
        return all(_steps_elementwise(self._group_optimizer(g))
                   for g in self.param_groups)

    def _check_compilable(self) -> None:
        """Under ``torch.compile``: raise (before anything is written) unless
        :meth:`compiles_step`."""
        if torch.compiler.is_compiling() and not self.compiles_step():
            _refuse_compile(type(self).__name__)

    def _use_fused(self, group: dict) -> bool:
        fused = group.get("fused", self._fused_default)
        if group.get("differentiable"):
            return False
        return fused is None or bool(fused)

    def _step_elementwise(self, gi: int, group: dict, opt: ElementwiseOptimizer,
                          grads: list) -> None:
        if all(g is None for g in grads):
            return
        cache = self._elementwise_cache(gi, group, opt, grads)
        replaced = False
        host = self._group_hparams(group)
        fused = self._use_fused(group)
        host_hp = None if any(isinstance(v, torch.Tensor) for v in host.values()) else host
        # fresh 0-d tensors each step: under torch.compile, filling cached ones in place is
        # not carried out (torch 2.13), and the step trains with lr = β = 0. (torch.full, not
        # torch.tensor: on CUDA the latter is a blocking copy from the host)
        hp = {k: v.to(dtype=HPARAM_DTYPE) if isinstance(v, torch.Tensor) else
              torch.full((), v, dtype=HPARAM_DTYPE, device=cache["device"])
              for k, v in host.items()}
        for sub in cache["subgroups"]:
            sub["step_t"].add_(1)
            scalars, new_scalars = opt.step_scalars(hp, sub["step_t"], sub["scalars"])
            new_p, new_b = opt.step_leaves(
                sub["params"], [grads[i] for i in sub["index"]], sub["buffers"], scalars,
                sub["step_t"], sub["decay"], donate=True, host_hp=host_hp, fused=fused)
            for p, q in zip(sub["params"], new_p):
                if q is not p:
                    p.copy_(q)
            for b, lst in new_b.items():
                for p, old, new in zip(sub["params"], sub["buffers"][b], lst):
                    if new is not old:
                        self.state[p][b] = new
                        replaced = True
                sub["buffers"][b] = lst
            sub["step_shared"].add_(1)
            for name, value in new_scalars.items():
                sub["scalars"][name] = value  # (new tensors, as hp above)
                torch._foreach_copy_(sub["scalar_copies"][name], [value] * len(sub["params"]))
        if replaced:
            cache["entries"] = self._state_entries(cache)

    def _elementwise_cache(self, gi, group, opt, grads) -> dict:
        """The group's cached plan, rebuilt (and re-checked) when the group's optimizer (its
        static options), which params have grads, or any state tensor of theirs, is not what it
        was built for."""
        key = (opt, tuple(g is not None for g in grads))
        cache = self._caches.get(gi)
        if cache is None or cache["key"] != key or not self._same_state(cache["entries"]):
            cache = self._build_cache(gi, group, opt, grads, key)
        return cache

    def _same_state(self, entries: tuple) -> bool:
        """Whether ``self.state`` still holds, for each param of the plan, the same state dict
        with the same tensors (``entries``: see :meth:`_state_entries`). Paid at every step, so
        the loops run in C, and each param is hashed once."""
        params, dicts, entry_dicts, keys, tensors = entries
        return (all(map(operator.is_, map(self.state.__getitem__, params), dicts))
                and all(map(operator.is_, map(dict.__getitem__, entry_dicts, keys), tensors)))

    def _state_entries(self, cache: dict) -> tuple:
        """``(params, their state dicts, and parallel lists of (state dict, key, tensor) for
        every state tensor the cached plan uses)``."""
        params = [p for sub in cache["subgroups"] for p in sub["params"]]
        dicts = [self.state[p] for p in params]
        entry_dicts, keys, tensors = [], [], []
        for sub in cache["subgroups"]:
            sub_dicts = [self.state[p] for p in sub["params"]]
            named = {"step": [sub["step_shared"]] * len(sub["params"]), **sub["buffers"],
                     **sub["scalar_copies"]}
            for k, lst in named.items():
                entry_dicts += sub_dicts
                keys += [k] * len(lst)
                tensors += lst
        return params, dicts, entry_dicts, keys, tensors

    @torch._dynamo.disable
    def _build_cache(self, gi, group, opt, grads, key):
        params = group["params"]
        names = self._names(gi, group)
        active = [i for i, g in enumerate(grads) if g is not None]
        self._check_elementwise_state(opt, [names[i] for i in active],
                                      [params[i] for i in active], [grads[i] for i in active])
        tree = dict(zip(names, params))
        # decay_flags pairs paths with leaves in the tree's flatten order (sorted dict keys), not
        # in named_parameters() order: map the flags back by name
        flat, _ = _tree.flatten(tree)
        by_name = dict(zip(_tree.paths(tree),
                           decay_flags(opt.weight_decay_mask, tree, flat, None)))
        decay_all = [by_name[n] for n in names]
        # params step together when their step counts (and scalar state, e.g. NAdam's
        # mu_product) agree: one read of those CPU scalars per rebuild
        rows = [[self.state[params[i]]["step"],
                 *(self.state[params[i]][n] for n in opt.scalar_state)] for i in active]
        values = torch.stack([torch.stack([t.double() for t in r]) for r in rows]).tolist()
        by_value: dict[tuple, list[int]] = {}
        for i, v in zip(active, values):
            by_value.setdefault(tuple(v), []).append(i)
        device = next((p.device for p in params), torch.device("cpu"))
        subgroups = []
        for v, idx in by_value.items():
            ps = [params[i] for i in idx]
            # params that step together share one step tensor (one increment per step, not one
            # per param); state_dict() gives each param its own copy, as torch's layout has it
            shared = torch.tensor(v[0], dtype=torch.float32)
            for p in ps:
                self.state[p]["step"] = shared
            subgroups.append({
                "index": idx, "params": ps, "step_shared": shared,
                "scalars": {n: self.state[ps[0]][n].to(HPARAM_DTYPE, copy=True)
                            for n in opt.scalar_state},
                "scalar_copies": {n: [self.state[p][n] for p in ps] for n in opt.scalar_state},
                "buffers": {b: [self.state[p][b] for p in ps] for b in opt.buffer_names},
                "decay": [decay_all[i] for i in idx],
                "step_t": torch.tensor(int(v[0]), dtype=torch.int32, device=device),
            })
        cache = {"key": key, "subgroups": subgroups, "device": device}
        cache["entries"] = self._state_entries(cache)
        self._caches[gi] = cache
        return cache

    def _create_lazy_buffers(self, opt: ElementwiseOptimizer, params: list) -> None:
        """Create the buffers named in ``lazy_buffers`` that the group's optimizer needs and a
        param does not have yet (as torch.optim.SGD creates its momentum buffer when momentum
        becomes non-zero mid-run, e.g. under OneCycleLR's momentum cycling)."""
        lazy = [b for b in getattr(self, "lazy_buffers", ()) if b in opt.buffer_names]
        for p in params:
            for b in lazy:
                if b not in self.state[p]:
                    self.state[p][b] = torch.zeros_like(p, dtype=opt.buffer_dtype(p.dtype),
                                                        memory_format=torch.preserve_format)

    def _check_elementwise_state(self, opt: ElementwiseOptimizer, names: list[str],
                                 params: list, grads: list) -> None:
        """The functional core's checks of params, grads and state, on this group's tensors
        (the state as the core would hold it): what ``opt.update(..., donate=True)`` checks."""
        tree = dict(zip(names, params))
        _tree.check_grads(opt.name, tree, dict(zip(names, grads)), donate=True)
        self._create_lazy_buffers(opt, params)
        for name, p in tree.items():
            for key in ("step", *opt.buffer_names, *opt.scalar_state):
                if key not in self.state[p]:
                    raise ValueError(
                        f"{type(self).__name__}: param {name!r} has no state[{key!r}], which "
                        f"{opt.name} with this group's options keeps: was an option that shapes "
                        "the state (amsgrad, variant, ...) changed after the state was made? "
                        "Build the optimizer with it, or load a state dict made with it")
        view = opt.init_state({n: torch.empty_like(p, device="meta") for n, p in tree.items()})
        for b in opt.buffer_names:
            view[b] = {n: self.state[p].get(b) for n, p in tree.items()}
        opt.validate(tree, dict.fromkeys(names), view)

    def _layout(self, gi: int, group: dict, opt: ft.Optimizer) -> _Layout:
        cache = self._caches.setdefault(gi, {})
        if cache.get("layout_of") is not opt:
            # only the state's structure is needed: build it on the meta device (no memory)
            tree = {n: torch.empty_like(p, device="meta")
                    for n, p in zip(self._names(gi, group), group["params"])}
            cache.update(layout=_Layout(opt.init_state(tree), tree), layout_of=opt)
        return cache["layout"]

    def _step_generic(self, gi: int, group: dict, opt: ft.Optimizer) -> None:
        params = group["params"]
        if all(p.grad is None for p in params):
            return
        names = self._names(gi, group)
        layout = self._layout(gi, group, opt)
        host = self._group_hparams(group)
        for idx in self._stepping_together(gi, group, layout):
            tree = {names[i]: params[i] for i in idx}
            grads = {n: p.grad for n, p in tree.items()}
            state = layout.assemble(self.state, tree, params[idx[0]], host)
            new_params, new_state = opt.update(tree, grads, state, donate=True)
            for n, p in tree.items():
                q = new_params[n]
                if q is not p:
                    p.copy_(q)
            layout.scatter(new_state, self.state, tree)

    def _stepping_together(self, gi: int, group: dict, layout: _Layout) -> list[list[int]]:
        """The group's params that have a grad, split where their scalar state (the step count,
        SOAP's and Kron's counters) differs, as lists of indices: each runs as one functional
        update. torch.optim counts steps per param, so a param that starts getting grads late
        (progressive unfreezing) starts at step 1; params that always step together are one
        update, as before. Cached per pattern of grads (the scalars are read on the host only
        when it changes, or after loading a state dict)."""
        params = group["params"]
        key = tuple(p.grad is not None for p in params)
        cache = self._caches.setdefault(gi, {})
        if cache.get("together_key") != key:
            active = [i for i, has_grad in enumerate(key) if has_grad]
            by_value: dict[tuple, list[int]] = {}
            for i in active:
                values = tuple(v for path in layout.scalar_paths for v in
                               self.state[params[i]][path].detach().reshape(-1).tolist())
                by_value.setdefault(values, []).append(i)
            cache.update(together_key=key, together=list(by_value.values()))
        return cache["together"]


def _like_param(v: torch.Tensor, p: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A loaded buffer on ``device`` in ``p``'s memory layout (same strides), dtype kept."""
    v = v.to(device=device)
    if v.shape == p.shape and v.stride() != p.stride():
        v = torch.empty_like(p, dtype=v.dtype, device=device).copy_(v)
    return v


@torch._dynamo.disable
def _steps_elementwise(opt: ft.Optimizer) -> bool:
    """Whether a group of ``opt`` takes the elementwise path: per-param state (step, buffers,
    scalar state) as torch.optim keeps it, stepped by the elementwise engine."""
    return isinstance(opt, ElementwiseOptimizer) and opt.scalar_state_per_param


def _refuse_compile(cls: str) -> None:
    # (dynamo-disabled: raised from traced code, the error would make dynamo fall back to
    # running the step eagerly instead of reaching the caller)
    raise RuntimeError(
        f"functim.adapters {cls}.step() cannot run under torch.compile (e.g. "
        f"torch.compile(opt.step)): its update is not traced into one graph. Call opt.step() "
        "uncompiled, or compile the functional update it is built on "
        "(torch.compile(functim.<optimizer>(...).update)); see "
        "FunctimOptimizer.compiles_step() for the adapters whose step compiles")


class _Layout:
    """Where each piece of a functional state goes in torch's per-parameter state.

    A buffer (a subtree shaped like the params) is stored under its dotted state path; where a
    leaf's value is a sequence of tensors (SOAP's ``GG``/``Q``, Kron's factors ``Q``) each item
    gets its own key, ``"<path>.<i>"``, so ``self.state[p]`` holds tensors only (the flattened
    optimizer state dict of torch.distributed.checkpoint accepts nothing else). Scalars (state
    tensors not shaped like the params: step, counters, RNG state) are shared by the group and
    stored with each of its params; ``cpu_scalars`` names those the functional state keeps on the
    CPU whatever the params' device (host-read counters)."""

    def __init__(self, state: Any, tree: dict):
        self.template = state
        self.param_spec = _tree.structure(tree)
        self.buffer_paths: list[str] = []
        self.scalar_paths: list[str] = []
        self.hparam_paths: list[str] = []
        self._walk(state, "")
        hp_short: dict[str, int] = {}
        for path in self.hparam_paths:
            n = path.rsplit(".", 1)[-1]
            hp_short[n] = hp_short.get(n, 0) + 1
        self.group_key = {path: (path.rsplit(".", 1)[-1]
                                 if hp_short[path.rsplit(".", 1)[-1]] == 1 else path)
                          for path in self.hparam_paths}
        meta = any(t.device.type == "meta" for t in self.scalars(state).values())
        self.cpu_scalars = ({p for p, t in self.scalars(state).items() if t.device.type == "cpu"}
                            if meta else set())

    def _is_buffer(self, sub: Any) -> bool:
        try:
            self.param_spec.flatten_up_to(sub)
        except (ValueError, TypeError):
            return False
        return isinstance(sub, Mapping) or not isinstance(sub, torch.Tensor)

    def _walk(self, s: Any, prefix: str) -> None:
        join = (lambda k: f"{prefix}.{k}" if prefix else str(k))
        if isinstance(s, Mapping):
            for k, v in s.items():
                if k == HPARAMS_KEY:
                    self.hparam_paths += [f"{prefix}.{name}" if prefix else name for name in v]
                elif self._is_buffer(v):
                    self.buffer_paths.append(join(k))
                else:
                    self._walk(v, join(k))
        elif isinstance(s, (list, tuple)):
            for i, v in enumerate(s):
                self._walk(v, join(i))
        elif isinstance(s, torch.Tensor):
            self.scalar_paths.append(prefix)

    @staticmethod
    def _get(s, path):
        for k in path.split(".") if path else []:
            s = s[int(k)] if isinstance(s, (list, tuple)) else s[k]
        return s

    def buffer_entries(self, state) -> Iterator[tuple[str, str, torch.Tensor]]:
        """``(state key, param name, tensor)`` for every buffer tensor of ``state``."""
        for path in self.buffer_paths:
            for name, v in self._get(state, path).items():
                if isinstance(v, (list, tuple)):
                    yield from ((f"{path}.{i}", name, t) for i, t in enumerate(v))
                elif v is not None:
                    yield path, name, v

    def _leaf_buffer(self, entry: dict, path: str, name: str) -> Any:
        like = self._get(self.template, path)[name]
        if isinstance(like, (list, tuple)):
            return type(like)(entry[f"{path}.{i}"] for i in range(len(like)))
        return entry.get(path)

    def scalars(self, state) -> dict[str, torch.Tensor]:
        return {p: self._get(state, p) for p in self.scalar_paths}

    def assemble(self, torch_state, tree: dict, first: torch.Tensor, host: dict) -> Any:
        def build(s, prefix):
            join = (lambda k: f"{prefix}.{k}" if prefix else str(k))
            if isinstance(s, Mapping):
                out = {}
                for k, v in s.items():
                    path = join(k)
                    if k == HPARAMS_KEY:
                        out[k] = {}
                        for name in v:
                            hpath = f"{prefix}.{name}" if prefix else name
                            val = host[self.group_key[hpath]]
                            out[k][name] = (val.to(first.device, HPARAM_DTYPE)
                                            if isinstance(val, torch.Tensor) else
                                            torch.full((), float(val), dtype=HPARAM_DTYPE,
                                                       device=first.device))
                    elif path in self.buffer_paths:
                        # tree is a flat {name: param} dict: a dict with its keys has its structure
                        out[k] = {n: self._leaf_buffer(torch_state[p], path, n)
                                  for n, p in tree.items()}
                    else:
                        out[k] = build(v, path)
                return out
            if isinstance(s, (list, tuple)):
                return type(s)(build(v, join(i)) for i, v in enumerate(s))
            if isinstance(s, torch.Tensor):
                return torch_state[first][prefix]
            return s
        return build(self.template, "")

    def scatter(self, new_state, torch_state, tree: dict) -> None:
        for key, name, t in self.buffer_entries(new_state):
            torch_state[tree[name]][key] = t
        for path in self.scalar_paths:
            t = self._get(new_state, path)
            for p in tree.values():
                torch_state[p][path] = t


# -- named classes with torch.optim's signatures ---------------------------------------------
# group keys that are not options of the functional constructor: torch.optim's, and the
# bookkeeping that torch's LR schedulers add (OneCycleLR, CyclicLR with cycle_momentum)
_NOT_OPTIONS = ("params", "param_names", "initial_lr", "foreach", "fused", "capturable",
                "differentiable", "decoupled_weight_decay", "weight_decay_mask", "max_lr",
                "min_lr", "base_lr", "max_momentum", "base_momentum")


class NamedAdapter(FunctimOptimizer):
    """Base of the named adapters (``AdamW``, ``SGD``, ...): a functional constructor driven by
    torch-style keyword arguments kept in the param groups.

    Subclasses set ``functional`` (the constructor, e.g. ``staticmethod(ft.adamw)``) and
    ``static_options`` (group keys that change the state layout or the kernel, e.g. ``amsgrad``);
    every other group key is a hyperparameter, read from the group at each step. A key named
    ``betas`` maps to the hyperparameters ``beta1``, ``beta2`` (, ``beta3``). Each group's values
    are checked by calling the constructor with them, so the messages are the functional core's.
    A tensor value with one element (``lr=torch.tensor([1e-3])``, each of ``betas``) is used as a
    0-d tensor and kept in the group as given, as torch.optim does; more elements: ValueError.
    """

    functional: Callable[..., ft.Optimizer]
    static_options: tuple[str, ...] = ()
    # Options holding a torch.dtype are kept in the param groups by name ("float32") and turned
    # back into the dtype for the constructor: torch.distributed.checkpoint (OLMo-core's
    # checkpoints) cannot copy a torch.dtype value in a state dict ("ValueError: Unexpected value
    # type <class 'torch.dtype'>"), so state_dtype=torch.float64 made every save fail.
    dtype_options: tuple[str, ...] = ("state_dtype", "ns_dtype")

    def __init__(self, params, *, fused: bool | None = None, weight_decay_mask: Any = None,
                 compile: bool = False, **kwargs: Any):
        self._builders: dict = {}
        extra = {"weight_decay_mask": weight_decay_mask} if weight_decay_mask is not None else {}
        if compile:  # (only the elementwise adapters offer it)
            extra["compile"] = compile
        self._ctor_extra = extra
        # validates the defaults
        representative = type(self).functional(**_scalar_options(kwargs), **extra)
        # lists (betas, ns_coefficients, ...) as tuples in the groups, once the constructor has
        # checked them: hashable, as static options must be
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        kwargs = self._dtypes_by_name(kwargs)
        super().__init__(params, representative, fused=fused, **kwargs)

    def _dtypes_by_name(self, options: dict) -> dict:
        return {k: (str(v).removeprefix("torch.") if k in self.dtype_options
                    and isinstance(v, torch.dtype) else v) for k, v in options.items()}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(self._dtypes_by_name(param_group))

    @staticmethod
    def _hparam_defaults(optimizer):
        return {}

    def _ctor_kwargs(self, group: dict) -> dict:
        out = _scalar_options({k: v for k, v in group.items() if k not in _NOT_OPTIONS})
        # dtype names back to dtypes; an unknown name is left for the constructor to reject
        for k in self.dtype_options:
            dtype = getattr(torch, out[k], None) if isinstance(out.get(k), str) else None
            if isinstance(dtype, torch.dtype):
                out[k] = dtype
        return out

    def _static_key(self, group: dict) -> tuple:
        return tuple(group[k] for k in self.static_options)

    def _group_optimizer(self, group: dict) -> ft.Optimizer:
        key = self._static_key(group)
        opt = self._builders.get(key)
        if opt is None:
            opt = self._builders[key] = type(self).functional(**self._ctor_kwargs(group),
                                                              **self._ctor_extra)
        return opt

    def _group_hparams(self, group: dict) -> dict:
        out = {}
        for k, v in _scalar_options(group).items():
            if k == "betas":
                out.update({f"beta{i + 1}": b for i, b in enumerate(v)})
            elif k not in _NOT_OPTIONS and k not in self.static_options:
                out[k] = v
        names = self._group_optimizer(group).hyperparams
        return {k: v for k, v in out.items() if k in names}

    def _validate_group(self, group: dict) -> None:
        type(self).functional(**self._ctor_kwargs(group))

    def _required_group_keys(self, group: dict) -> list[str]:
        names = set(self._group_optimizer(group).hyperparams)
        return [k for k in group if k in names or (
            k.endswith("betas") and f"{k[:-5]}beta1" in names)]


class AdamW(NamedAdapter):
    """``torch.optim.AdamW``'s signature over :func:`functim.adamw`.

    ``fused=None`` (default) uses torch's fused AdamW kernel (the same maths) where it applies
    (CPU/CUDA), otherwise functim's multi-tensor kernel; ``fused=False`` always uses functim's
    kernel. Either way the result is bitwise that of ``ft.adamw(..., fused=<same>).update``.
    ``state_dtype``, ``weight_decay_mask`` and ``compile`` (the kernel compiled by
    ``torch.compile``, where torch's fused kernel does not run) as in :func:`functim.adamw`.
    """

    functional = staticmethod(ft.adamw)
    static_options = ("amsgrad", "maximize", "state_dtype")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 state_dtype: torch.dtype | None = None, weight_decay_mask: Any = None,
                 compile: bool = False):
        _reject_unsupported("AdamW", capturable=capturable, differentiable=differentiable)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, state_dtype=state_dtype,
                         fused=fused, weight_decay_mask=weight_decay_mask, compile=compile)
        for g in self.param_groups:
            g.setdefault("foreach", foreach)


class SGD(NamedAdapter):
    """``torch.optim.SGD``'s signature over :func:`functim.sgd`."""

    functional = staticmethod(ft.sgd)
    static_options = ("nesterov", "maximize", "state_dtype")
    # created when momentum becomes non-zero mid-run, as torch.optim.SGD does
    lazy_buffers = ("momentum_buffer",)

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False,
                 fused: bool | None = None, state_dtype: torch.dtype | None = None,
                 weight_decay_mask: Any = None, compile: bool = False):
        _reject_unsupported("SGD", differentiable=differentiable)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         state_dtype=state_dtype, fused=fused,
                         weight_decay_mask=weight_decay_mask, compile=compile)
        for g in self.param_groups:
            g.setdefault("foreach", foreach)

    def _static_key(self, group):
        # the momentum buffer exists iff momentum != 0 (as torch), so that is static too
        return super()._static_key(group) + (group["momentum"] != 0,)


def _reject_unsupported(name: str, **flags: bool) -> None:
    for flag, value in flags.items():
        if value:
            raise ValueError(f"functim.adapters.{name}: {flag}=True is not supported; use the "
                             f"functional optimizer for differentiable or captured steps")
