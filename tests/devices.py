"""Devices for tests that run wherever they can: ``cpu`` always, ``cuda`` when torch sees a GPU.

``DEVICES`` parametrises a test over both; the ``cuda`` instance is skipped, with the reason, on a
machine without one.
"""

from __future__ import annotations

import optree
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def cuda_unavailable_reason() -> str | None:
    """Why CUDA cannot be used here, or None when it can."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"no CUDA: this torch ({torch.__version__}) is a CPU build"
    return (f"no CUDA device visible to torch {torch.__version__} "
            f"(built for CUDA {torch.version.cuda})")


CUDA_SKIP = pytest.mark.skipif(cuda_unavailable_reason() is not None,
                               reason=cuda_unavailable_reason() or "")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_SKIP)]


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class HostTransfers(TorchDispatchMode):
    """Records every op that moves data between the host and the ``meta`` device: on the meta
    device (no data), a CPU stand-in for "no host sync" checks of code meant for accelerators."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.device.type for t in optree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        outputs = {t.device.type for t in optree.tree_leaves(out) if isinstance(t, torch.Tensor)}
        if {"cpu", "meta"} <= inputs | outputs and inputs != outputs:
            self.seen.append(str(func))
        return out
