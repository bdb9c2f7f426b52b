"""Muon on hidden matrices with an AdamW fallback for the other params, as one optimizer.

Update of a Muon leaf (``β`` = ``momentum``, ``t`` = 1-based step)::

    m ← lerp(m, g, 1−β);  u = lerp(g, m, β) if nesterov else m     # EMA momentum
    O = NS5(u)                                 # on the leaf's (rows × cols) matrix view
    p ← p·(1 − η·λ) − η·scale·O                # weight decay with the unscaled η

``NS5`` is the quintic Newton–Schulz orthogonalisation (:func:`functim.orthogonalize`), and
``scale`` by ``scale_mode``: ``"keller"`` ``max(1, rows/cols)^0.5`` (reference), ``"moonlight"``
``0.2·sqrt(max(rows, cols))`` (Moonlight's AdamW RMS matching, torch's "match_rms_adamw"),
``"consistent_rms"`` ``consistent_rms·sqrt(max(rows, cols))`` (optax), ``"none"`` 1. Every other
leaf takes torch's AdamW step (ε outside the square root, docs/algorithms.md section 1) with its
own ``adamw_*`` hyperparameters.

Paper: Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks" (blog post);
Moonlight's scale: Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv 2502.16982.
Reference code: KellerJordan/Muon@857d1ad ``muon.py`` (``muon_update``, ``MuonWithAuxAdam``).

Choices against the reference:

- The gradient is never modified (the reference's ``grad.lerp_`` writes the Nesterov mix into
  ``p.grad``). ``momentum_form="sum"`` gives the early/Moonlight form ``m ← βm + g``,
  ``u = g + βm``, equal after orthogonalisation up to the NS epsilon (docs/algorithms.md,
  reduction R24).
- NS5 runs in bfloat16 on CUDA as the reference, float32 elsewhere, float64 for float64 params
  (``ns_dtype`` overrides).
- rows/cols are those of the matrix the update is orthogonalised as. A 2-D leaf is ``(out, in)``;
  an N-D leaf (conv kernel, stacked experts) must be declared with ``matrix_dims`` (see
  :class:`functim.MatrixDims`); nothing is guessed. For a conv kernel viewed as ``(out, in·k·k)``
  the scale uses that view, not the reference's ``kh/kw`` (= 1), which is an artefact of reading
  the last two dims of a 4-D tensor.
- Routing by path rules instead of the reference's hand-made param groups: by default
  embeddings, the output head (``lm_head``, tied embeddings), biases, norms and every ndim < 2
  leaf go to AdamW, the other matrices to Muon (:func:`functim.lm_routing` with
  ``hidden="muon"``, everything else ``"adamw"``). ``muon_params=[globs]`` sends exactly those
  leaves to Muon and the rest to AdamW (e.g. Megalodon: ``["*attn.w[zvr]*", "*attn.wh[12]*",
  "*ffn.fc[123]*", "lm_head*"]``); ``routing`` takes any rule list or ``{label: selector}`` map
  over the labels ``"muon"``/``"adamw"``. ``explain(params)`` prints the table.
- The AdamW side has Keller's auxiliary defaults (betas (0.9, 0.95), eps 1e-10, no weight
  decay); its lr is ``adamw_lr_ratio · lr`` at every step (default 0.015 = Keller's 3e-4 / 0.02,
  so a schedule on ``lr`` drives both sides), or ``adamw_lr`` (a number or its own schedule)
  when given.

State: ``step``, ``hyperparams``, ``momentum_buffer`` (Muon leaves), ``exp_avg`` and
``exp_avg_sq`` (AdamW leaves); ``None`` elsewhere. One step counter serves both sides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..hyperparams import (
    BETA,
    NONNEGATIVE,
    POSITIVE,
    Range,
    ScalarOrSchedule,
    check_betas,
    check_option,
)
from ..linalg import NS5_COEFFICIENTS
from ..listops import ListOps
from ..numerics import ema, widen
from ..rules import Rule, lm_routing
from ..runtime import group_by_device_and_dtype, needs_per_tensor
from ._routed import (
    MatrixDimsSpec,
    RoutedOptimizer,
    apply_update,
    by_buffer_dtype,
    orthogonalized_update,
    select,
)
from .adamw import adamw

SCALE_MODES = ("keller", "moonlight", "consistent_rms", "none")
MOMENTUM_FORMS = ("ema", "sum")


def shape_scale(mode: str, rows: int, cols: int, consistent_rms: float = 0.2) -> float:
    """The update multiplier of the matrix ``rows × cols`` for each ``scale_mode``."""
    if mode == "keller":
        return max(1.0, rows / cols) ** 0.5
    if mode == "moonlight":
        return 0.2 * max(rows, cols) ** 0.5
    if mode == "consistent_rms":
        return consistent_rms * max(rows, cols) ** 0.5
    return 1.0


class Muon(RoutedOptimizer):
    """Muon on matrices + AdamW on the rest; see the module docstring. Build with
    :func:`functim.muon`."""

    name = "muon"
    labels = ("muon", "adamw")
    matrix_labels = ("muon",)

    def __init__(self, *, routing, hyperparams, ranges, matrix_dims, state_dtype, nesterov,
                 momentum_form, scale_mode, consistent_rms, ns, adamw_lr_mode, fused):
        super().__init__(routing=routing, hyperparams=hyperparams, ranges=ranges,
                         buffers={"momentum_buffer": ("muon",), "exp_avg": ("adamw",),
                                  "exp_avg_sq": ("adamw",)},
                         matrix_dims=matrix_dims, state_dtype=state_dtype)
        self.nesterov = nesterov
        self.momentum_form = momentum_form
        self.scale_mode = scale_mode
        self.consistent_rms = consistent_rms
        self.ns = dict(ns)
        self.adamw_lr_mode = adamw_lr_mode
        # the AdamW side's kernel (its hyperparameters come from this optimizer's state)
        self.adamw = adamw(state_dtype=state_dtype, fused=fused)
        self.options = {"nesterov": nesterov, "momentum_form": momentum_form,
                        "scale_mode": scale_mode, **self.ns}

    def __repr__(self) -> str:
        args = {**self.hyperparams, **self.options}
        return "muon(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"

    def adamw_hyperparams(self, hp: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lr = hp["adamw_lr"] if self.adamw_lr_mode == "absolute" else hp["lr"] * hp[
            "adamw_lr_ratio"]
        return {"lr": lr, "beta1": hp["adamw_beta1"], "beta2": hp["adamw_beta2"],
                "eps": hp["adamw_eps"], "weight_decay": hp["adamw_weight_decay"]}

    def step_leaves(self, p_leaves, g_leaves, bufs, plans, hp, step, *, donate):
        new_p = list(p_leaves)
        new_bufs = {b: list(v) for b, v in bufs.items()}
        m_idx = select(plans, p_leaves, g_leaves, lambda pl: pl.label == "muon")
        if m_idx:
            self._muon_step(m_idx, p_leaves, g_leaves, bufs["momentum_buffer"], plans, hp,
                            new_p, new_bufs["momentum_buffer"], donate)
        a_idx = set(select(plans, p_leaves, g_leaves, lambda pl: pl.label == "adamw"))
        if a_idx:
            scalars, _ = self.adamw.step_scalars(self.adamw_hyperparams(hp), step, {})
            pa, na = self.adamw.step_leaves(
                [p if i in a_idx else None for i, p in enumerate(p_leaves)], g_leaves,
                {"exp_avg": bufs["exp_avg"], "exp_avg_sq": bufs["exp_avg_sq"]}, scalars, step,
                [True] * len(p_leaves), donate=donate)
            for i in a_idx:
                new_p[i] = pa[i]
                new_bufs["exp_avg"][i] = na["exp_avg"][i]
                new_bufs["exp_avg_sq"][i] = na["exp_avg_sq"][i]
        return new_p, new_bufs

    def _muon_step(self, idx, p_leaves, g_leaves, mom, plans, hp, new_p, new_mom, donate):
        ps = [p_leaves[i] for i in idx]
        gs = [g_leaves[i] for i in idx]
        ms = [mom[i] for i in idx]
        ops = ListOps(per_tensor=needs_per_tensor(ps, gs, scalars=list(hp.values())))
        lr, beta = hp["lr"], hp["momentum"]
        for _, (p, g, m), sub in by_buffer_dtype(group_by_device_and_dtype([ps, gs, ms])):
            work = m[0].dtype
            g = widen(g, work)
            if self.momentum_form == "ema":
                m = ema(ops, m, g, beta, inplace=donate)
                u = ops.lerp(g, m, beta) if self.nesterov else m
            else:
                m = ops.add(ops.mul(m, beta, inplace=donate), g, inplace=True)
                u = ops.add(g, ops.mul(m, beta)) if self.nesterov else m
            pls = [plans[idx[j]] for j in sub]
            scales = [shape_scale(self.scale_mode, pl.rows, pl.cols, self.consistent_rms)
                      for pl in pls]
            upd = orthogonalized_update(pls, u, scales, self.ns)
            out = apply_update(ops, p, upd, lr, hp["weight_decay"], donate=donate, work_dtype=work)
            for j, x, y in zip(sub, out, m):
                new_p[idx[j]] = x
                new_mom[idx[j]] = y


def muon(
    lr: ScalarOrSchedule = 0.02,
    weight_decay: ScalarOrSchedule = 0.0,
    momentum: ScalarOrSchedule = 0.95,
    nesterov: bool = True,
    *,
    momentum_form: str = "ema",
    ns_steps: int = 5,
    ns_coefficients: tuple[float, float, float] = NS5_COEFFICIENTS,
    eps: float = 1e-7,
    ns_dtype: torch.dtype | None = None,
    scale_mode: str = "keller",
    consistent_rms: float = 0.2,
    matrix_dims: MatrixDimsSpec = None,
    routing: Sequence[Rule] | Mapping[str, Any] | None = None,
    muon_params: str | Sequence[str] | None = None,
    adamw_lr: ScalarOrSchedule | None = None,
    adamw_lr_ratio: ScalarOrSchedule = 0.015,
    adamw_betas: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.9, 0.95),
    adamw_eps: ScalarOrSchedule = 1e-10,
    adamw_weight_decay: ScalarOrSchedule = 0.0,
    state_dtype: torch.dtype | None = None,
    fused: bool | None = None,
) -> Muon:
    """Muon (KellerJordan/Muon defaults) with an AdamW fallback; see :mod:`functim.optimizers.muon`.

    ``routing``/``muon_params``: which leaves go to Muon (at most one of them; default
    :func:`functim.lm_routing`). ``matrix_dims``: ``{glob: MatrixDims}`` or a callable
    ``(path, leaf) -> MatrixDims | None`` for N-D Muon leaves. ``fused``: the AdamW side's fused
    kernel, as in :func:`functim.adamw`.
    """
    _check_options(nesterov=nesterov, momentum_form=momentum_form, scale_mode=scale_mode,
                   ns_steps=ns_steps, ns_coefficients=ns_coefficients, eps=eps,
                   consistent_rms=consistent_rms, ns_dtype=ns_dtype)
    routing = _routing(routing, muon_params)
    hyperparams, ranges, mode = _hyperparams(
        lr=lr, weight_decay=weight_decay, momentum=momentum, adamw_lr=adamw_lr,
        adamw_lr_ratio=adamw_lr_ratio, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
        adamw_weight_decay=adamw_weight_decay)
    ns = {"steps": ns_steps, "coefficients": tuple(float(c) for c in ns_coefficients),
          "eps": float(eps), "dtype": ns_dtype}
    return Muon(routing=routing, hyperparams=hyperparams, ranges=ranges, matrix_dims=matrix_dims,
                state_dtype=state_dtype, nesterov=nesterov, momentum_form=momentum_form,
                scale_mode=scale_mode, consistent_rms=float(consistent_rms), ns=ns,
                adamw_lr_mode=mode, fused=fused)


def _check_options(*, nesterov, momentum_form, scale_mode, ns_steps, ns_coefficients, eps,
                   consistent_rms, ns_dtype) -> None:
    """Raise on a :func:`muon` option (not a hyperparameter) outside its domain."""
    if not isinstance(nesterov, bool):
        raise TypeError(f"muon: nesterov must be a bool, got {nesterov!r}")
    if momentum_form not in MOMENTUM_FORMS:
        raise ValueError(f"muon: momentum_form must be one of {MOMENTUM_FORMS}, "
                         f"got {momentum_form!r}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"muon: scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps < 0:
        raise ValueError(f"muon: ns_steps must be an int >= 0, got {ns_steps!r}")
    if not (isinstance(ns_coefficients, (tuple, list)) and len(ns_coefficients) == 3):
        raise TypeError(f"muon: ns_coefficients must be 3 numbers, got {ns_coefficients!r}")
    for i, c in enumerate(ns_coefficients):
        check_option("muon", f"ns_coefficients[{i}]", c, Range())
    check_option("muon", "eps", eps, NONNEGATIVE)
    check_option("muon", "consistent_rms", consistent_rms, POSITIVE)
    if ns_dtype is not None and not (isinstance(ns_dtype, torch.dtype)
                                     and ns_dtype.is_floating_point):
        raise TypeError(f"muon: ns_dtype must be a floating torch.dtype or None, got {ns_dtype!r}")


def _routing(routing: Sequence[Rule] | Mapping[str, Any] | None,
             muon_params: str | Sequence[str] | None) -> Sequence[Rule] | Mapping[str, Any]:
    """The routing :func:`muon` was given, or the one ``muon_params`` implies, or the default."""
    if routing is not None and muon_params is not None:
        raise ValueError("muon: give routing or muon_params, not both")
    if muon_params is not None:
        return (Rule("muon", path=muon_params), Rule("adamw"))
    if routing is None:
        return lm_routing(hidden="muon", vector="adamw", embedding="adamw", output="adamw")
    return routing


def _hyperparams(*, lr, weight_decay, momentum, adamw_lr, adamw_lr_ratio, adamw_betas,
                 adamw_eps, adamw_weight_decay) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(hyperparameters, their ranges, the AdamW side's lr mode: ``"absolute"`` when
    ``adamw_lr`` is given, else ``"ratio"``)."""
    b1, b2 = check_betas("muon", adamw_betas, ("adamw_beta1", "adamw_beta2"),
                         option="adamw_betas")
    hyperparams: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum}
    ranges = {"lr": NONNEGATIVE, "weight_decay": NONNEGATIVE, "momentum": BETA}
    if adamw_lr is not None:
        hyperparams["adamw_lr"], ranges["adamw_lr"] = adamw_lr, NONNEGATIVE
        mode = "absolute"
    else:
        hyperparams["adamw_lr_ratio"], ranges["adamw_lr_ratio"] = adamw_lr_ratio, NONNEGATIVE
        mode = "ratio"
    hyperparams.update(adamw_beta1=b1, adamw_beta2=b2, adamw_eps=adamw_eps,
                       adamw_weight_decay=adamw_weight_decay)
    ranges.update(adamw_beta1=BETA, adamw_beta2=BETA, adamw_eps=NONNEGATIVE,
                  adamw_weight_decay=NONNEGATIVE)
    return hyperparams, ranges, mode
