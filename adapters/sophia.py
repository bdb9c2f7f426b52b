"""``Sophia``: the SophiaG reference's signature (Liuhong99/Sophia@a7e1572 ``sophia.py``) as a
``torch.optim.Optimizer`` over :func:`functim.sophia` (update rule and choices:
:mod:`functim.optimizers.sophia`).

``step()`` is the functional update (the elementwise fast path of
:class:`~functim.adapters.FunctimOptimizer`); ``update_hessian(...)`` is the functional Hessian
EMA (:func:`functim.optimizers.sophia.hessian_ema`). The loop of ``train_sophiag.py``, in
either of two forms (``k = hessian_interval``, default 10)::

    opt = Sophia(model.named_parameters(), lr=6e-4, rho=0.05, weight_decay=0.2)
    for it, (x, y) in enumerate(batches):
        loss_fn(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if opt.hessian_due():                       # after steps k, 2k, ... (it % k == k - 1)
            # (a) functim's GNB estimator on the module, with the optimizer's RNG:
            opt.update_hessian(model=model, inputs=x_next, clip_norm=1.0)
            # (b) or the reference's protocol, by hand:
            #   logits = model(x_next)
            #   y_hat = opt.sample_labels(logits)     # from the optimizer's RNG
            #   F.cross_entropy(logits.flatten(0, -2), y_hat.flatten()).backward()
            #   torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            #   opt.update_hessian()                  # h ← β2·h + (1 − β2)·p.grad²
            #   opt.zero_grad(set_to_none=True)
            # and then step with opt.step(bs=tokens_per_batch), as the reference does.

(a) returns the paper's ``B·ĝ⊙ĝ`` (see :mod:`functim.hessian`), so keep ``bs=1`` (the default
here); (b) stores the reference's raw ``ĝ⊙ĝ``, so pass the reference's ``bs`` (tokens per
batch) to the constructor or to ``step(bs=...)``, which sets it for every param group as the
reference's ``step(bs=...)`` argument does (the reference's default is 5120).
``estimator="hutchinson"`` with ``loss_fn`` (model output → scalar loss) runs Sophia-H instead.

Per-parameter state (torch's ``self.state[p]``, created at construction): ``step`` (float32, as
torch), ``exp_avg``, ``hessian``, and ``rng`` — the estimators' key
(:func:`functim.hessian.rng_key`, from ``seed``), one key for the whole optimizer, the same
tensor stored with every param so that ``state_dict()`` carries it: a resumed run samples the same
labels and probes, bitwise. Group keys ``lr``, ``betas``, ``rho``, ``weight_decay``, ``bs``,
``eps`` are read at every step (LR schedulers drive ``lr``); ``maximize`` and ``state_dtype`` are
static. ``capturable`` is not supported (as in :class:`~functim.adapters.AdamW`).

The estimators run the module as it is (``torch.func.functional_call``): dropout or other
randomness inside the model draws from torch's global RNG, not from the optimizer's key (the
reference trains with dropout 0).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

import functim as ft
from functim import _tree
from functim.hessian import rng_key, sample_categorical, squared_gradients
from functim.hyperparams import NONNEGATIVE, check_hyperparam
from functim.optimizers.sophia import hessian_ema, sophia

from .torch_optim import NamedAdapter, _reject_unsupported

__all__ = ["Sophia"]

RNG = "rng"
ESTIMATORS = ("gnb", "hutchinson")


class Sophia(NamedAdapter):
    """``SophiaG(params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)`` over
    :func:`functim.sophia` (bitwise the functional update on the same gradients and estimates).

    ``bs`` (default 1, see the module docstring), ``eps`` (the denominator floor),
    ``hessian_interval`` (k, for :meth:`hessian_due`), ``seed`` (of the RNG key),
    ``state_dtype`` and ``weight_decay_mask`` as in the functional constructor.
    """

    functional = staticmethod(sophia)
    static_options = ("maximize", "state_dtype")

    def __init__(self, params, lr: float = 1e-4, betas=(0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 1e-1, *, maximize: bool = False, capturable: bool = False,
                 bs: float = 1.0, eps: float = 1e-15, hessian_interval: int = 10, seed: int = 0,
                 state_dtype: torch.dtype | None = None, weight_decay_mask: Any = None,
                 compile: bool = False):
        _reject_unsupported("Sophia", capturable=capturable)
        sophia(hessian_interval=hessian_interval, seed=seed)  # validates both
        self.hessian_interval = hessian_interval
        self._seed = seed
        self._steps_without_hessian = 0  # host-side, for the warning in step()
        self._rng: torch.Tensor | None = None
        super().__init__(params, lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, bs=bs,
                         eps=eps, maximize=maximize, state_dtype=state_dtype,
                         weight_decay_mask=weight_decay_mask, compile=compile)

    # -- the RNG key, shared by every param ------------------------------------------------
    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _init_group_state(self, gi: int, group: dict) -> None:
        super()._init_group_state(gi, group)
        if self._rng is None:
            found = [self.state[p][RNG] for p in self._all_params() if RNG in self.state[p]]
            first = self._all_params()[0]
            self._rng = found[0] if found else rng_key(self._seed, device=first.device)
        for p in group["params"]:
            self.state[p][RNG] = self._rng

    def load_state_dict(self, state_dict: dict) -> None:
        rng, self._rng = self._rng, None  # take the loaded key (shared by _init_group_state)
        try:
            super().load_state_dict(state_dict)
        except BaseException:
            self._rng = rng
            raise

    @property
    def rng(self) -> torch.Tensor:
        """The estimators' key (int64 ``[seed, counter]``), as stored in the state."""
        assert self._rng is not None
        return self._rng

    # -- steps ------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None, bs: float | None = None):
        """One Sophia step for every param with a gradient. ``bs``: if given, set as every
        group's ``bs`` first (the reference's ``step(closure, bs)`` argument)."""
        if bs is not None:
            check_hyperparam("Sophia", "bs", bs, NONNEGATIVE)
            for g in self.param_groups:
                g["bs"] = bs
        loss = super().step(closure)
        self._steps_without_hessian += 1
        if self._steps_without_hessian == 2 * self.hessian_interval + 1:
            warnings.warn(
                f"Sophia: {self._steps_without_hessian} steps without update_hessian(): the "
                "Hessian EMA is not being updated, so the steps are clipped sign steps "
                "(Lion-like), not Sophia's. Call opt.update_hessian(...) when "
                "opt.hessian_due() (in OLMo-core: add "
                "functim.adapters.olmo.SophiaHessianCallback to the trainer)", stacklevel=2)
        return loss

    def hessian_due(self) -> bool:
        """Whether to update the Hessian now: the number of steps taken (the largest per-param
        ``step``; CPU tensors, no device sync) is a positive multiple of ``hessian_interval``
        — after steps k, 2k, … as ``train_sophiag.py`` (``iter % k == k − 1``)."""
        steps = [float(self.state[p]["step"]) for p in self._all_params()]
        n = int(max(steps, default=0.0))
        return n > 0 and n % self.hessian_interval == 0

    # -- Hessian ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Labels ``ŷ ~ softmax(logits)`` per position, drawn from the optimizer's RNG (the
        reference's ``Categorical(logits=logits).sample()``, checkpointed)."""
        labels, new = sample_categorical(logits, self.rng)
        self.rng.copy_(new)
        return labels

    def _module_names(self, model: torch.nn.Module) -> dict[str, str]:
        """{adapter param name: module FQN} for every param of this optimizer."""
        fqn = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        out = {}
        for gi, group in enumerate(self.param_groups):
            for name, p in zip(self._names(gi, group), group["params"]):
                if id(p) not in fqn:
                    raise ValueError(f"Sophia: parameter {name!r} of the optimizer is not a "
                                     "parameter of the model passed to update_hessian")
                out[name] = fqn[id(p)]
        return out

    @torch.no_grad()
    def estimate_hessian(self, model: torch.nn.Module, inputs: Any, *, estimator: str = "gnb",
                         loss_fn: Callable[[Any], torch.Tensor] | None = None,
                         clip_norm: float | None = None,
                         num_probes: int = 1) -> dict[str, torch.Tensor | None]:
        """A Hessian-diagonal estimate for this optimizer's params, keyed by their names, from
        :func:`functim.gnb_hessian` (``model(*inputs)`` returns logits ``[..., V]``) or
        :func:`functim.hutchinson_hessian` (``loss_fn(model(*inputs))`` is the loss), computed
        with ``torch.func.functional_call`` and the optimizer's RNG (advanced). ``inputs``: a
        tensor or a tuple of positional arguments. Nothing else is changed."""
        if estimator not in ESTIMATORS:
            raise ValueError(f"Sophia: estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if estimator == "hutchinson" and loss_fn is None:
            raise ValueError("Sophia: estimator='hutchinson' needs loss_fn (model output -> "
                             "scalar loss)")
        names = self._module_names(model)
        fqn_param = dict(model.named_parameters(remove_duplicate=False))
        params = {fqn: fqn_param[fqn].detach() for fqn in names.values()}
        args = inputs if isinstance(inputs, tuple) else (inputs,)

        def forward(ps, batch):
            return torch.func.functional_call(model, ps, batch)

        if estimator == "gnb":
            est, new = ft.gnb_hessian(forward, params, args, self.rng, clip_norm=clip_norm)
        else:
            assert loss_fn is not None
            est, new = ft.hutchinson_hessian(lambda ps, batch: loss_fn(forward(ps, batch)),
                                             params, args, self.rng, num_probes=num_probes)
        self.rng.copy_(new)
        return {n: est[names[n]] for n in names}

    @torch.no_grad()
    def update_hessian(self, estimate: Mapping[str, torch.Tensor | None] | None = None, *,
                       model: torch.nn.Module | None = None, inputs: Any = None,
                       estimator: str = "gnb",
                       loss_fn: Callable[[Any], torch.Tensor] | None = None,
                       clip_norm: float | None = None, num_probes: int = 1) -> None:
        """``h ← β2·h + (1 − β2)·ĥ`` for every param with an estimate (each group's β2).

        - no argument: ``ĥ = p.grad⊙p.grad`` for every param with a gradient (the reference's
          ``update_hessian()``, after a backward of the sampled-label loss);
        - ``estimate``: ``{param name: tensor or None}`` (names as given to the constructor,
          e.g. from ``named_parameters()``; missing names are skipped);
        - ``model=..., inputs=...``: the estimate of :meth:`estimate_hessian` (same keywords).
        """
        if estimate is not None and model is not None:
            raise ValueError("Sophia.update_hessian: pass an estimate or a model, not both")
        if model is not None:
            estimate = self.estimate_hessian(model, inputs, estimator=estimator,
                                             loss_fn=loss_fn, clip_norm=clip_norm,
                                             num_probes=num_probes)
        elif inputs is not None:
            raise ValueError("Sophia.update_hessian: inputs given without a model")
        per_group = []
        if estimate is None:
            for group in self.param_groups:
                per_group.append(squared_gradients([p.grad for p in group["params"]]))
        else:
            if not isinstance(estimate, Mapping):
                raise TypeError("Sophia.update_hessian: estimate must be a mapping {param name: "
                                f"tensor}}, got {type(estimate).__name__}")
            known = set()
            for gi, group in enumerate(self.param_groups):
                names = self._names(gi, group)
                known.update(names)
                row = []
                for name, p in zip(names, group["params"]):
                    e = estimate.get(name)
                    if e is not None and (not isinstance(e, torch.Tensor)
                                          or e.shape != p.shape or not e.is_floating_point()):
                        raise ValueError(
                            f"Sophia.update_hessian: estimate for {name!r} is "
                            f"{_tree.describe_leaf(e)}, expected a floating tensor of shape "
                            f"{tuple(p.shape)}")
                    row.append(e)
                per_group.append(row)
            unknown = sorted(set(estimate) - known)
            if unknown:
                raise ValueError(f"Sophia.update_hessian: no parameter named {unknown[:5]}")
        self._steps_without_hessian = 0
        for group, est in zip(self.param_groups, per_group):
            hs = [self.state[p]["hessian"] for p in group["params"]]
            new = hessian_ema(hs, est, float(group["betas"][1]), donate=True)
            for old, h in zip(hs, new):
                if h is not old:  # keep the tensor objects step()'s cache refers to
                    old.copy_(h)
