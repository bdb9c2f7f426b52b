"""torch.optim adapters for the elementwise family, named as torch.optim names its classes; each
is a :class:`~functim.adapters.torch_optim.NamedAdapter` over its functional constructor, so the
maths is the functional core's and ``state_dict``/LR schedulers/param groups work as in torch."""

from __future__ import annotations

from typing import Any

import torch

import functim as ft

from .torch_optim import NamedAdapter


class Lion(NamedAdapter):
    """:func:`functim.lion` with lion-pytorch's signature (DWD; see the functional docstring)."""

    functional = staticmethod(ft.lion)
    static_options = ("state_dtype",)

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0,
                 *, state_dtype: torch.dtype | None = None, weight_decay_mask: Any = None,
                 compile: bool = False):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay,
                         state_dtype=state_dtype,
                         weight_decay_mask=weight_decay_mask, compile=compile)


class SignSGD(NamedAdapter):
    """:func:`functim.signsgd`: ``p ← p·(1 − lr·wd) − lr·sign(g)``."""

    functional = staticmethod(ft.signsgd)
    static_options = ("state_dtype",)

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, *,
                 state_dtype: torch.dtype | None = None, weight_decay_mask: Any = None,
                 compile: bool = False):
        super().__init__(params, lr=lr, weight_decay=weight_decay, state_dtype=state_dtype,
                         weight_decay_mask=weight_decay_mask, compile=compile)


class Signum(NamedAdapter):
    """:func:`functim.signum`: sign of an EMA (``beta``) of the gradient."""

    functional = staticmethod(ft.signum)
    static_options = ("state_dtype",)

    def __init__(self, params, lr: float = 1e-3, beta: float = 0.95, weight_decay: float = 0.0,
                 *, state_dtype: torch.dtype | None = None, weight_decay_mask: Any = None,
                 compile: bool = False):
        super().__init__(params, lr=lr, beta=beta, weight_decay=weight_decay,
                         state_dtype=state_dtype,
                         weight_decay_mask=weight_decay_mask, compile=compile)


class NAdamW(NamedAdapter):
    """:func:`functim.nadamw` (``variant`` = "optax" (default), "torch" or "timm")."""

    functional = staticmethod(ft.nadamw)
    static_options = ("variant", "state_dtype")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, variant: str = "optax",
                 momentum_decay: float = 4e-3, state_dtype: torch.dtype | None = None,
                 weight_decay_mask: Any = None, compile: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         variant=variant, momentum_decay=momentum_decay,
                         state_dtype=state_dtype,
                         weight_decay_mask=weight_decay_mask, compile=compile)
        for g in self.param_groups:
            # torch.optim.NAdam's key for this (its default is False, an L2 decay), so that
            # torch.optim.NAdam steps a state dict of this optimizer as it would
            g.setdefault("decoupled_weight_decay", True)


class CautiousAdamW(NamedAdapter):
    """:func:`functim.cautious_adamw` (C-Optim defaults; ``normalization`` of the mask)."""

    functional = staticmethod(ft.cautious_adamw)
    static_options = ("normalization", "state_dtype")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, normalization: str = "mean",
                 state_dtype: torch.dtype | None = None, weight_decay_mask: Any = None,
                 compile: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         normalization=normalization, state_dtype=state_dtype,
                         weight_decay_mask=weight_decay_mask, compile=compile)


class CautiousLion(NamedAdapter):
    """:func:`functim.cautious_lion` (C-Optim defaults; ``normalization`` of the mask)."""

    functional = staticmethod(ft.cautious_lion)
    static_options = ("normalization", "state_dtype")

    def __init__(self, params, lr: float = 1e-4, betas=(0.95, 0.98), weight_decay: float = 0.0,
                 *, normalization: str = "mean", state_dtype: torch.dtype | None = None,
                 weight_decay_mask: Any = None, compile: bool = False):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay,
                         normalization=normalization, state_dtype=state_dtype,
                         weight_decay_mask=weight_decay_mask, compile=compile)
