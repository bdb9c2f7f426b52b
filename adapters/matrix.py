"""``Muon`` and ``Scion``: torch.optim adapters over :func:`functim.muon` and :func:`functim.scion`.

Both route parameters by their names, so pass ``model.named_parameters()`` (or groups whose
``params`` are ``(name, tensor)`` pairs). With the default routing, unnamed parameters are an
error: an embedding and a hidden matrix are both 2-D, and only the name tells them apart.

Group keys that are hyperparameters (read at every step, so LR schedulers drive ``lr``): Muon
``lr``, ``weight_decay``, ``momentum``, ``adamw_lr_ratio`` (or ``adamw_lr``), ``adamw_betas``,
``adamw_eps``, ``adamw_weight_decay``; Scion ``lr``, ``momentum``. With the default
``adamw_lr_ratio`` the AdamW side's lr is ``ratio·group["lr"]``, so a scheduler scales both sides.
``routing``, ``muon_params``, ``norms`` and ``matrix_dims`` are constructor-only (they hold rules
and callables, which do not belong in a ``state_dict``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

import functim as ft
from functim.linalg import NS5_COEFFICIENTS

from .torch_optim import NamedAdapter


class _RoutedAdapter(NamedAdapter):
    _route_keys: tuple[str, ...] = ()

    def __init__(self, params, *, route_options: dict, **kwargs):
        self._route_options = {k: v for k, v in route_options.items() if v is not None}
        self._default_routing = not any(k in self._route_options
                                        for k in ("routing", "muon_params"))
        super().__init__(params, **kwargs)

    def _ctor_kwargs(self, group: dict) -> dict:
        return {**super()._ctor_kwargs(group), **self._route_options}

    def _init_group_state(self, gi: int, group: dict) -> None:
        if self._default_routing and not group.get("param_names"):
            raise ValueError(
                f"functim.adapters.{type(self).__name__}: param group {gi} has unnamed "
                "parameters; the default routing needs names to tell embeddings and the output "
                "head from hidden matrices. Pass model.named_parameters(), or give routing=...")
        super()._init_group_state(gi, group)

    def explain(self) -> str:
        """The routing table of every param group."""
        tables = []
        for gi, group in enumerate(self.param_groups):
            tree = dict(zip(self._names(gi, group), group["params"]))
            tables.append(f"param group {gi}:\n{self._group_optimizer(group).explain(tree)}")
        return "\n\n".join(tables)


class Muon(_RoutedAdapter):
    """Muon with an AdamW fallback (KellerJordan/Muon defaults) over :func:`functim.muon`.

    ``Muon(model.named_parameters(), lr=0.02)``; ``.explain()`` prints the routing. The result is
    bitwise that of ``functim.muon(...).update`` on each param group.
    """

    functional = staticmethod(ft.muon)
    static_options = ("nesterov", "momentum_form", "ns_steps", "ns_coefficients", "eps",
                      "ns_dtype", "scale_mode", "consistent_rms", "state_dtype")

    def __init__(self, params, lr: float = 0.02, weight_decay: float = 0.0,
                 momentum: float = 0.95, nesterov: bool = True, *, momentum_form: str = "ema",
                 ns_steps: int = 5, ns_coefficients=NS5_COEFFICIENTS, eps: float = 1e-7,
                 ns_dtype: torch.dtype | None = None, scale_mode: str = "keller",
                 consistent_rms: float = 0.2, matrix_dims: Any = None,
                 routing: Sequence | Mapping | None = None,
                 muon_params: str | Sequence[str] | None = None,
                 adamw_lr: float | None = None, adamw_lr_ratio: float = 0.015,
                 adamw_betas=(0.9, 0.95), adamw_eps: float = 1e-10,
                 adamw_weight_decay: float = 0.0, state_dtype: torch.dtype | None = None,
                 fused: bool | None = None):
        ratio = {} if adamw_lr is not None else {"adamw_lr_ratio": adamw_lr_ratio}
        absolute = {"adamw_lr": adamw_lr} if adamw_lr is not None else {}
        super().__init__(
            params, route_options={"routing": routing, "muon_params": muon_params,
                                   "matrix_dims": matrix_dims},
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            momentum_form=momentum_form, ns_steps=ns_steps,
            ns_coefficients=ns_coefficients, eps=eps, ns_dtype=ns_dtype,
            scale_mode=scale_mode, consistent_rms=consistent_rms, **ratio, **absolute,
            adamw_betas=adamw_betas, adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay, state_dtype=state_dtype, fused=fused)

    def _group_hparams(self, group: dict) -> dict:
        out = super()._group_hparams(group)
        out["adamw_beta1"], out["adamw_beta2"] = group["adamw_betas"]
        return out


class Scion(_RoutedAdapter):
    """Scion (the SCION reference's ``Scion``: lr 1e-3, momentum 1.0, constrained) over
    :func:`functim.scion`; ``norms``/``routing`` choose each parameter's norm and scale.
    The result is bitwise that of ``functim.scion(...).update`` on each param group."""

    functional = staticmethod(ft.scion)
    static_options = ("unconstrained", "ns_steps", "ns_dtype", "eps", "state_dtype")

    def __init__(self, params, lr: float = 1e-3, momentum: float = 1.0,
                 unconstrained: bool = False, *, norms: Mapping[str, Any] | None = None,
                 routing: Sequence | Mapping | None = None, matrix_dims: Any = None,
                 ns_steps: int = 5, ns_dtype: torch.dtype | None = None, eps: float = 1e-7,
                 state_dtype: torch.dtype | None = None):
        super().__init__(
            params, route_options={"norms": norms, "routing": routing,
                                   "matrix_dims": matrix_dims},
            lr=lr, momentum=momentum, unconstrained=unconstrained, ns_steps=ns_steps,
            ns_dtype=ns_dtype, eps=eps, state_dtype=state_dtype)

    def _static_key(self, group: dict) -> tuple:
        # momentum == 1 means no momentum buffer (the reference), so it changes the layout
        return super()._static_key(group) + (group["momentum"] == 1,)
