"""The optimizers, one module per family."""

from .adamw import adamw
from .cautious import cautious_adamw, cautious_lion
from .lion import lion, signsgd, signum
from .mars import mars
from .nadamw import nadamw
from .sgd import sgd

__all__ = ["adamw", "cautious_adamw", "cautious_lion", "lion", "mars", "nadamw", "sgd", "signsgd",
           "signum"]
