"""The optimizers, one module per family.

This package re-exports nothing: each family module keeps its own name, so
``import functim.optimizers.adamw`` gives the module. The constructors are exported flat by
:mod:`functim` (``functim.adamw``, ``functim.muon``, ...).
"""
