"""The optimizers, one module per family."""

from .adamw import adamw
from .sgd import sgd

__all__ = ["adamw", "sgd"]
