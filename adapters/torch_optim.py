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

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

import functim as ft
from functim import _tree
from functim.base import ElementwiseOptimizer
from functim.hyperparams import HPARAM_DTYPE, HPARAMS_KEY, check_hyperparam, get_hyperparams

_STATIC_KEYS = ("params", "param_names", "initial_lr")


def _named_param_groups(params: Any) -> list[dict]:
    """Normalise torch's accepted inputs (tensors, (name, tensor) pairs, dicts) to groups."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts")
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(params[0], dict):
        params = [{"params": params}]
    return params


def _group_keys(paths) -> dict[str, str]:
    """Param-group key of each hyperparameter path: its short name where unambiguous."""
    short: dict[str, int] = {}
    for path in paths:
        name = path.rsplit(".", 1)[-1]
        short[name] = short.get(name, 0) + 1
    return {path: (path.rsplit(".", 1)[-1] if short[path.rsplit(".", 1)[-1]] == 1 else path)
            for path in paths}


class FunctimOptimizer(torch.optim.Optimizer):
    """Drive any functim :class:`~functim.Optimizer` as a ``torch.optim.Optimizer``.

    ``FunctimOptimizer(model.named_parameters(), ft.chain(ft.clip_by_global_norm(1.0),
    ft.adamw(lr=3e-4)))``. The group keys are the optimizer's hyperparameter names (``lr``,
    ``beta1``, ... or dotted paths where a short name is ambiguous), so param groups can override
    them and LR schedulers drive ``lr``. A hyperparameter given to the functional optimizer as a
    schedule is driven by that schedule, not by the group.

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
        merged = {**hp, **defaults}
        self._caches: dict[int, Any] = {}
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
        """{short-or-dotted hyperparameter name: value} for this group."""
        return {k: group[k] for k in self._hparam_names}

    def _validate_group(self, group: dict) -> None:
        """Group values get the functional core's checks (named subclasses re-run their ctor)."""
        for k, v in self._group_hparams(group).items():
            if k in self._hparam_ranges:
                check_hyperparam(self._functional.name, k, v, self._hparam_ranges[k])

    # -- param groups ----------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        names = param_group.get("params")
        if isinstance(names, Iterable) and not isinstance(names, torch.Tensor):
            items = list(names)
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
        if isinstance(opt, ElementwiseOptimizer):
            for b in opt.buffer_names:
                for name, p in tree.items():
                    self.state[p].setdefault(b, st[b][name])
            for p in params:
                self.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))
                for name in opt.scalars:
                    self.state[p].setdefault(name, st[name].clone())
            return
        layout = _Layout(st, tree)
        for key, name, t in layout.buffer_entries(st):
            self.state[tree[name]].setdefault(key, t)
        for path, t in layout.scalars(st).items():
            for p in params:
                self.state[p].setdefault(path, t.clone())

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to the param dtype (float32 moments of a bfloat16 param
        # would become bfloat16) and moves it to the param's device; put back the saved tensors
        # with their own dtype, and keep on the CPU the scalars the functional state keeps there
        # (host-read counters: on the param's device each read would be a sync)
        saved = state_dict["state"]
        for gi, (saved_group, group) in enumerate(zip(state_dict["param_groups"],
                                                      self.param_groups)):
            opt = self._group_optimizer(group)
            on_cpu = (set() if isinstance(opt, ElementwiseOptimizer)
                      else self._layout(gi, group, opt).cpu_scalars)
            for pid, p in zip(saved_group["params"], group["params"]):
                for k, v in saved.get(pid, {}).items():
                    if isinstance(v, torch.Tensor) and k != "step":
                        self.state[p][k] = v.to(device="cpu" if k in on_cpu else p.device)
        self._caches.clear()
        self._init_all_state()

    # -- step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            opt = self._group_optimizer(group)
            if isinstance(opt, ElementwiseOptimizer):
                self._step_elementwise(gi, group, opt)
            else:
                self._step_generic(gi, group, opt)
        return loss

    def _use_fused(self, group: dict) -> bool:
        fused = group.get("fused", self._fused_default)
        if group.get("differentiable"):
            return False
        return fused is None or bool(fused)

    def _step_elementwise(self, gi: int, group: dict, opt: ElementwiseOptimizer) -> None:
        params = group["params"]
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            return
        for g in grads:
            if g is not None and g.is_sparse:
                raise RuntimeError(f"{opt.name}: sparse gradients are not supported")
        key = tuple(g is not None for g in grads) if any(g is None for g in grads) else None
        cache = self._caches.get(gi)
        if cache is None or cache["key"] != key:
            cache = self._build_cache(gi, group, opt, grads, key)
        host = self._group_hparams(group)
        fused = self._use_fused(group)
        for sub in cache["subgroups"]:
            hp = sub["hp"]
            for k, v in host.items():
                if isinstance(v, torch.Tensor):
                    hp[k] = v.to(dtype=HPARAM_DTYPE)
                else:
                    hp[k].fill_(v)
            sub_grads = [grads[i] for i in sub["index"]]
            sub["step_t"].fill_(sub["step"] + 1)
            kernel_hp, new_scalars = opt.prepare_scalars(hp, sub["step_t"], sub["scalars"])
            new_p, new_b = opt.step_leaves(
                sub["params"], sub_grads, sub["buffers"], kernel_hp, sub["step_t"], sub["decay"],
                donate=True, host_hp=None if any(isinstance(v, torch.Tensor) for v in
                                                 host.values()) else host,
                fused=fused)
            for p, q in zip(sub["params"], new_p):
                if q is not p:
                    p.copy_(q)
            for b, lst in new_b.items():
                for p, old, new in zip(sub["params"], sub["buffers"][b], lst):
                    if new is not old:
                        self.state[p][b] = new
                sub["buffers"][b] = lst
            sub["step"] += 1
            sub["step_shared"].fill_(sub["step"])
            for name, value in new_scalars.items():
                sub["scalars"][name].copy_(value)

    def _build_cache(self, gi, group, opt, grads, key):
        params = group["params"]
        names = self._names(gi, group)
        active = [i for i, g in enumerate(grads) if g is not None]
        tree = dict(zip(names, params))
        # decay_flags pairs paths with leaves in the tree's flatten order (sorted dict keys), not
        # in named_parameters() order: map the flags back by name
        flat, _ = _tree.flatten(tree)
        by_name = dict(zip(_tree.paths(tree),
                           ft.base.decay_flags(opt.weight_decay_mask, tree, flat, None)))
        decay_all = [by_name[n] for n in names]
        steps = [self.state[params[i]]["step"] for i in active]
        values = torch.stack(steps).tolist() if steps else []
        by_step: dict[float, list[int]] = {}
        for i, v in zip(active, values):
            by_step.setdefault(v, []).append(i)
        device = next((p.device for p in params), torch.device("cpu"))
        subgroups = []
        for v, idx in by_step.items():
            ps = [params[i] for i in idx]
            # params that step together share one step tensor (one increment per step instead
            # of one per param); torch's per-param "step" entries stay in place
            shared = torch.tensor(v, dtype=torch.float32)
            scalars = {n: self.state[ps[0]][n].clone() for n in opt.scalars}
            for p in ps:
                self.state[p]["step"] = shared
                self.state[p].update(scalars)
            subgroups.append({
                "index": idx, "params": ps, "step": int(v), "step_shared": shared,
                "scalars": scalars,
                "buffers": {b: [self.state[p][b] for p in ps] for b in opt.buffer_names},
                "decay": [decay_all[i] for i in idx],
                "hp": {k: torch.zeros((), dtype=HPARAM_DTYPE, device=device)
                       for k in opt.hyperparams},
                "step_t": torch.zeros((), dtype=torch.int32, device=device),
            })
        cache = {"key": key, "subgroups": subgroups}
        self._caches[gi] = cache
        return cache

    def _layout(self, gi: int, group: dict, opt: ft.Optimizer) -> _Layout:
        cache = self._caches.setdefault(gi, {})
        if "layout" not in cache:
            # only the state's structure is needed: build it on the meta device (no memory)
            tree = {n: torch.empty_like(p, device="meta")
                    for n, p in zip(self._names(gi, group), group["params"])}
            cache["layout"] = _Layout(opt.init_state(tree), tree)
        return cache["layout"]

    def _step_generic(self, gi: int, group: dict, opt: ft.Optimizer) -> None:
        params = group["params"]
        if all(p.grad is None for p in params):
            return
        names = self._names(gi, group)
        tree = dict(zip(names, params))
        grads = {n: p.grad for n, p in tree.items()}
        layout = self._layout(gi, group, opt)
        first = next(p for p in params if p.grad is not None)
        host = self._group_hparams(group)
        state = layout.assemble(self.state, tree, first, host)
        new_params, new_state = opt.update(tree, grads, state, donate=True)
        for n, p in tree.items():
            q = new_params[n]
            if q is not p:
                p.copy_(q)
        layout.scatter(new_state, self.state, tree)


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
                                            torch.tensor(float(val), dtype=HPARAM_DTYPE,
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
_NOT_OPTIONS = ("params", "param_names", "initial_lr", "foreach", "fused", "capturable",
                "differentiable", "weight_decay_mask")


class NamedAdapter(FunctimOptimizer):
    """Base of the named adapters (``AdamW``, ``SGD``, ...): a functional constructor driven by
    torch-style keyword arguments kept in the param groups.

    Subclasses set ``functional`` (the constructor, e.g. ``staticmethod(ft.adamw)``) and
    ``static_options`` (group keys that change the state layout or the kernel, e.g. ``amsgrad``);
    every other group key is a hyperparameter, read from the group at each step. A key named
    ``betas`` maps to the hyperparameters ``beta1``, ``beta2`` (, ``beta3``). Each group's values
    are checked by calling the constructor with them, so the messages are the functional core's.
    """

    functional: Callable[..., ft.Optimizer]
    static_options: tuple[str, ...] = ()
    # Options holding a torch.dtype are kept in the param groups by name ("float32") and turned
    # back into the dtype for the constructor: torch.distributed.checkpoint (OLMo-core's
    # checkpoints) cannot copy a torch.dtype value in a state dict ("ValueError: Unexpected value
    # type <class 'torch.dtype'>"), so state_dtype=torch.float64 made every save fail.
    dtype_options: tuple[str, ...] = ("state_dtype", "ns_dtype")

    def __init__(self, params, *, fused: bool | None = None, weight_decay_mask: Any = None,
                 **kwargs: Any):
        self._builders: dict = {}
        self._wd_mask = weight_decay_mask
        extra = {"weight_decay_mask": weight_decay_mask} if weight_decay_mask is not None else {}
        representative = type(self).functional(**kwargs, **extra)  # validates the defaults
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
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
        out = {k: v for k, v in group.items() if k not in _NOT_OPTIONS}
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
            extra = {"weight_decay_mask": self._wd_mask} if self._wd_mask is not None else {}
            opt = self._builders[key] = type(self).functional(**self._ctor_kwargs(group), **extra)
        return opt

    def _group_hparams(self, group: dict) -> dict:
        out = {}
        for k, v in group.items():
            if k == "betas":
                out.update({f"beta{i + 1}": b for i, b in enumerate(v)})
            elif k not in _NOT_OPTIONS and k not in self.static_options:
                out[k] = v
        names = self._group_optimizer(group).hyperparams
        return {k: v for k, v in out.items() if k in names}

    def _validate_group(self, group: dict) -> None:
        type(self).functional(**self._ctor_kwargs(group))


class AdamW(NamedAdapter):
    """``torch.optim.AdamW``'s signature over :func:`functim.adamw`.

    ``fused=None`` (default) uses torch's fused AdamW kernel (the same maths) where it applies
    (CPU/CUDA), otherwise functim's multi-tensor kernel; ``fused=False`` always uses functim's
    kernel. Either way the result is bitwise that of ``ft.adamw(..., fused=<same>).update``.
    ``state_dtype`` and ``weight_decay_mask`` as in :func:`functim.adamw`.
    """

    functional = staticmethod(ft.adamw)
    static_options = ("amsgrad", "maximize", "state_dtype")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 state_dtype: torch.dtype | None = None, weight_decay_mask: Any = None):
        _reject_unsupported("AdamW", capturable=capturable, differentiable=differentiable)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, state_dtype=state_dtype,
                         fused=fused, weight_decay_mask=weight_decay_mask)
        for g in self.param_groups:
            g.setdefault("foreach", foreach)


class SGD(NamedAdapter):
    """``torch.optim.SGD``'s signature over :func:`functim.sgd`."""

    functional = staticmethod(ft.sgd)
    static_options = ("nesterov", "maximize", "state_dtype")

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False,
                 fused: bool | None = None, state_dtype: torch.dtype | None = None,
                 weight_decay_mask: Any = None):
        _reject_unsupported("SGD", differentiable=differentiable)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         state_dtype=state_dtype, fused=fused,
                         weight_decay_mask=weight_decay_mask)
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
