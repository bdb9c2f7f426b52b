"""functim: optimizers as pure functions over parameter pytrees (see README.md).

Every optimizer is an :class:`Optimizer` with pure ``init_state(params)`` and
``update(params, grads, state) -> (params, state)``; the torch.optim adapters live in
``functim.adapters``.
"""

from .base import ElementwiseOptimizer, Optimizer
from .combinators import (
    GradientTransform,
    accumulate,
    chain,
    clip_by_global_norm,
    global_norm,
    partition,
    skip_nonfinite,
)
from .hyperparams import get_hyperparams, set_hyperparams
from .optimizers import (
    adamw,
    cautious_adamw,
    cautious_lion,
    lion,
    mars,
    nadamw,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_train_params,
    sgd,
    signsgd,
    signum,
)
from .rules import NO_DECAY_RULES, Rule, default_weight_decay_mask, explain
from .schedules import (
    Schedule,
    constant_schedule,
    cosine_decay,
    linear_warmup,
    warmup_cosine,
    wsd,
)

__all__ = [
    "NO_DECAY_RULES", "ElementwiseOptimizer", "GradientTransform", "Optimizer", "Rule",
    "Schedule", "accumulate", "adamw", "cautious_adamw", "cautious_lion", "lion", "mars", "nadamw",
    "schedule_free_adamw", "schedule_free_eval_params", "schedule_free_train_params",
    "signsgd", "signum", "chain", "clip_by_global_norm", "constant_schedule",
    "cosine_decay", "default_weight_decay_mask", "explain", "get_hyperparams", "global_norm",
    "linear_warmup", "partition", "set_hyperparams", "sgd", "skip_nonfinite", "warmup_cosine",
    "wsd",
]
