"""functim: optimizers as pure functions over parameter pytrees (see README.md).

Every optimizer is an :class:`Optimizer` with pure ``init_state(params)`` and
``update(params, grads, state) -> (params, state)``; the torch.optim adapters live in
``functim.adapters``.
"""

from .combinators import (
    GradientTransform,
    accumulate,
    chain,
    clip_by_global_norm,
    global_norm,
    partition,
    skip_nonfinite,
)
from .elementwise import ElementwiseOptimizer
from .ensemble import ensemble, vmap_axes
from .hessian import gnb_hessian, hutchinson_hessian
from .hyperparams import get_hyperparams, set_hyperparams
from .linalg import MatrixDims, orthogonalize
from .optimizer import Optimizer
from .optimizers.adamw import adamw
from .optimizers.cautious import cautious_adamw, cautious_lion
from .optimizers.kron import kron
from .optimizers.lion import lion, signsgd, signum
from .optimizers.mars import mars
from .optimizers.muon import muon
from .optimizers.nadamw import nadamw
from .optimizers.schedule_free import (
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_train_params,
)
from .optimizers.scion import BiasRMS, ColNorm, RowNorm, Sign, Spectral, scion
from .optimizers.sgd import sgd
from .optimizers.soap import soap
from .optimizers.sophia import sophia
from .rules import NO_DECAY_RULES, Rule, default_weight_decay_mask, explain, lm_routing
from .schedules import (
    Schedule,
    constant_schedule,
    cosine_decay,
    linear_warmup,
    warmup_cosine,
    wsd,
)
from .skip_step import SkipSpikes, skip_spikes

__all__ = [
    "BiasRMS",
    "ColNorm",
    "ElementwiseOptimizer",
    "GradientTransform",
    "MatrixDims",
    "NO_DECAY_RULES",
    "Optimizer",
    "RowNorm",
    "Rule",
    "Schedule",
    "Sign",
    "SkipSpikes",
    "Spectral",
    "accumulate",
    "adamw",
    "cautious_adamw",
    "cautious_lion",
    "kron",
    "chain",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_decay",
    "default_weight_decay_mask",
    "ensemble",
    "explain",
    "get_hyperparams",
    "global_norm",
    "gnb_hessian",
    "hutchinson_hessian",
    "linear_warmup",
    "lion",
    "lm_routing",
    "mars",
    "muon",
    "nadamw",
    "orthogonalize",
    "partition",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_train_params",
    "scion",
    "set_hyperparams",
    "sgd",
    "signsgd",
    "signum",
    "skip_nonfinite",
    "skip_spikes",
    "soap",
    "sophia",
    "warmup_cosine",
    "vmap_axes",
    "wsd",
]
