"""``Kron``: kron_torch's ``Kron`` signature (evanatyourservice/kron_torch@884427c) as a
``torch.optim.Optimizer`` over :func:`functim.optimizers.kron.kron` (update rule and choices:
:mod:`functim.optimizers.kron`).

Group keys ``lr``, ``b1``, ``weight_decay`` and ``precond_lr`` are hyperparameters read at every
step (LR schedulers drive ``lr``); every other keyword (``preconditioner_update_probability``,
``max_size_triangular``, ``min_ndim_triangular``, ``memory_save_mode``,
``momentum_into_precond_update``, ``precond_init_scale``, ``merge_dims``, ``mu_dtype``,
``precond_dtype``, ``balance_every``, ``seed``) fixes the state layout or the schedule.

Each step calls the functional update in donated mode, so the result is bitwise that of
``functim.kron(...).update`` on the same gradients. Per-parameter state (torch's
``self.state[p]``): ``momentum_buffer``, the factors under ``Q.0``, ``Q.1``, ... (the functional
state's per-leaf tuple, one tensor per key; loading keeps their dtype) and, shared by the group,
``step``, ``prob_step``, ``update_counter``, ``precond_updates`` and ``rng``. Differences from the
reference's ``torch.optim`` class: each param group keeps its own update counter and generator
(the reference has one per optimizer and reads the probability from group 0); they agree when
every group steps on every call.
"""

from __future__ import annotations

from typing import Any

import torch

from functim.optimizers.kron import kron

from .torch_optim import NamedAdapter


class Kron(NamedAdapter):
    """``Kron(params, lr=3e-4, b1=0.9, weight_decay=0.0, ...)`` (kron_torch) over
    :func:`functim.kron`; see the module docstring."""

    functional = staticmethod(kron)
    static_options = ("preconditioner_update_probability", "max_size_triangular",
                      "min_ndim_triangular", "memory_save_mode", "momentum_into_precond_update",
                      "precond_init_scale", "merge_dims", "mu_dtype", "precond_dtype",
                      "balance_every", "seed")
    dtype_options = ("mu_dtype", "precond_dtype")  # kept in the groups by name (DCP)

    def __init__(self, params, lr: float = 3e-4, b1: float = 0.9, weight_decay: float = 0.0,
                 preconditioner_update_probability: Any = None, max_size_triangular: int = 8192,
                 min_ndim_triangular: int = 2, memory_save_mode: str | None = None,
                 momentum_into_precond_update: bool = True, precond_lr: float = 0.1,
                 precond_init_scale: float | None = 1.0, merge_dims: bool = True,
                 mu_dtype: torch.dtype | None = None, precond_dtype: torch.dtype | None = None,
                 *, balance_every: int = 100, seed: int = 42):
        super().__init__(params, lr=lr, b1=b1, weight_decay=weight_decay,
                         preconditioner_update_probability=preconditioner_update_probability,
                         max_size_triangular=max_size_triangular,
                         min_ndim_triangular=min_ndim_triangular,
                         memory_save_mode=memory_save_mode,
                         momentum_into_precond_update=momentum_into_precond_update,
                         precond_lr=precond_lr, precond_init_scale=precond_init_scale,
                         merge_dims=merge_dims, mu_dtype=mu_dtype, precond_dtype=precond_dtype,
                         balance_every=balance_every, seed=seed)
