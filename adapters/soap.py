"""``Soap``: the SOAP reference's signature (nikhilvyas/SOAP ``SOAP``) as a
``torch.optim.Optimizer`` over :func:`functim.soap`.

Keyword names and defaults are the reference's. Group keys ``lr``, ``betas``, ``shampoo_beta``,
``eps`` and ``weight_decay`` are hyperparameters read at every step (LR schedulers drive ``lr``);
``precondition_frequency``, ``max_precond_dim``, ``merge_dims``, ``precondition_1d``,
``normalize_grads``, ``data_format``, ``correct_bias``, ``precond_dtype`` and ``state_dtype``
change the maths or the state layout. Each ``step()`` is ``functim.soap(...).update`` in donated
(in-place) mode, through :class:`~functim.adapters.FunctimOptimizer`'s generic path.

Per-parameter state (``self.state[p]``, created at construction): ``exp_avg``, ``exp_avg_sq``,
one tensor per preconditioned dim ``i`` under ``GG.i`` and ``Q.i`` (the functional state's lists,
so the state holds tensors only, as the flattened checkpoints of torch.distributed.checkpoint need),
and the group's scalars ``step`` (int32, real updates) and
``calls`` (int64 on the CPU). As the functional optimizer, one call counter serves a whole param
group: the group's first ``step()`` only builds the preconditioners (the reference's skipped
first step), and every group refreshes its bases on the same calls.

``load_state_dict`` keeps the saved dtypes of the ``GG``/``Q`` matrices and keeps ``calls`` on the
CPU (:class:`~functim.adapters.FunctimOptimizer`'s loading).
"""

from __future__ import annotations

from typing import Any

import torch

from functim.optimizers.soap import soap

from .torch_optim import NamedAdapter

__all__ = ["Soap"]


class Soap(NamedAdapter):
    """``SOAP(params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8,
    weight_decay=0.01, precondition_frequency=10, max_precond_dim=10000, merge_dims=False,
    precondition_1d=False, normalize_grads=False, data_format="channels_first",
    correct_bias=True)`` over :func:`functim.soap`; bitwise the functional optimizer's
    ``update(..., donate=True)`` on the same gradients. ``precond_dtype``, ``state_dtype`` and
    ``weight_decay_mask`` as in the functional constructor.
    """

    functional = staticmethod(soap)
    static_options = ("precondition_frequency", "max_precond_dim", "merge_dims",
                      "precondition_1d", "normalize_grads", "data_format", "correct_bias",
                      "precond_dtype", "state_dtype")
    dtype_options = ("precond_dtype", "state_dtype")  # kept in the groups by name (DCP)

    def __init__(self, params, lr: float = 3e-3, betas=(0.95, 0.95), shampoo_beta: float = -1,
                 eps: float = 1e-8, weight_decay: float = 0.01, precondition_frequency: int = 10,
                 max_precond_dim: int = 10000, merge_dims: bool = False,
                 precondition_1d: bool = False, normalize_grads: bool = False,
                 data_format: str = "channels_first", correct_bias: bool = True, *,
                 precond_dtype: torch.dtype | None = None,
                 state_dtype: torch.dtype | None = None, weight_decay_mask: Any = None):
        super().__init__(params, lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                         weight_decay=weight_decay,
                         precondition_frequency=precondition_frequency,
                         max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                         precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                         data_format=data_format, correct_bias=correct_bias,
                         precond_dtype=precond_dtype, state_dtype=state_dtype,
                         weight_decay_mask=weight_decay_mask)
