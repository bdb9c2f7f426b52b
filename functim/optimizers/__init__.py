"""The optimizers, one module per family."""

from .adamw import adamw
from .cautious import cautious_adamw, cautious_lion
from .kron import kron
from .lion import lion, signsgd, signum
from .mars import mars
from .muon import muon
from .nadamw import nadamw
from .schedule_free import (
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_train_params,
)
from .scion import BiasRMS, ColNorm, RowNorm, Sign, Spectral, scion
from .sgd import sgd
from .soap import soap
from .sophia import sophia

__all__ = [
    "BiasRMS",
    "ColNorm",
    "RowNorm",
    "Sign",
    "Spectral",
    "adamw",
    "cautious_adamw",
    "cautious_lion",
    "kron",
    "lion",
    "mars",
    "muon",
    "nadamw",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_train_params",
    "scion",
    "sgd",
    "signsgd",
    "signum",
    "soap",
    "sophia",
]
