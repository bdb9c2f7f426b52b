"""The core contract: ``Optimizer`` (a pair of pure functions) and ``TreeOptimizer``, the one
update skeleton of the library's optimizer families.

``update(params, grads, state, *, donate=False, **extra) -> (params, state)``:

- pure by default: inputs are never modified; new tensors are returned (leaves that are not
  updated are returned as the same objects);
- ``donate=True`` lets the optimizer overwrite ``params`` and the state's tensors in place (the
  torch.optim adapter's mode: one copy of the optimizer state in memory). The returned values are
  authoritative either way; ``grads`` are never modified;
- unknown ``**extra`` keywords are accepted and ignored, so combinators can pass things such as
  ``loss_fn`` to whichever optimizer needs them.

Every check (structure, shapes, state layout) happens before any tensor is written, so a bad call
never leaves anything half-updated.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import optree
import torch

from . import _tree
from .hyperparams import HPARAMS_KEY, Range, resolve_hyperparams
from .schedules import Schedule
from .state import carry_made_by

PyTree = Any
State = dict


class Optimizer(abc.ABC):
    """A functim optimizer: pure ``init_state(params)`` and ``update(params, grads, state)``.

    Build ad-hoc ones with :meth:`from_functions`; the library's optimizers are subclasses.
    """

    name: str = "optimizer"

    @abc.abstractmethod
    def init_state(self, params: PyTree) -> State:
        """The complete state for ``params`` (every key present, correct dtypes)."""

    @abc.abstractmethod
    def update(
        self, params: PyTree, grads: PyTree, state: State, *, donate: bool = False, **extra: Any
    ) -> tuple[PyTree, State]:
        """One step: ``(new params, new state)``; see the module docstring for ``donate``."""

    def validate(self, params: PyTree, grads: PyTree, state: State) -> None:
        """Raise ValueError/TypeError if ``update`` would reject these inputs; modifies nothing.
        Combinators call it on every child before any child writes (nothing is half-updated)."""
        _tree.check_grads(self.name, params, grads)

    def hyperparam_ranges(self) -> dict[str, Range]:
        """Allowed interval of every hyperparameter, keyed like :func:`functim.get_hyperparams`
        (so adapters can check values set later, e.g. in a param group)."""
        return {}

    def hyperparam_schedules(self) -> dict[str, Schedule]:
        """The hyperparameters driven by a schedule (evaluated at every update, so a value set
        in the state would be overwritten), keyed like :meth:`hyperparam_ranges`. The default
        reads the optimizer's ``hyperparams`` specs, where it keeps them."""
        specs = getattr(self, "hyperparams", {})
        return {k: v for k, v in specs.items() if isinstance(v, Schedule)}

    @staticmethod
    def from_functions(init_state: Callable, update: Callable, name: str = "custom") -> Optimizer:
        """Wrap two functions as an Optimizer. ``update`` must accept ``donate`` and ``**extra``."""
        return _FunctionPair(init_state, update, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class TreeOptimizer(Optimizer):
    """An optimizer over a params tree whose ``update`` is one skeleton: flatten and check params
    and grads → check the state (:meth:`check_state`; nothing is written before every check
    passed) → resolve the hyperparameters (schedules at this step) → step the leaves
    (:meth:`step_tree`) → rebuild the trees.

    Subclasses keep their hyperparameter specs in ``hyperparams`` and the stored values in
    ``state["hyperparams"]`` next to the int32 ``state["step"]`` (completed updates). With
    ``traceable = False`` the whole ``update`` runs eagerly inside a ``torch.compile``d caller.
    """

    hyperparams: dict[str, Any]
    traceable: bool = True

    @abc.abstractmethod
    def check_state(self, params: PyTree, p_leaves: list, spec: optree.PyTreeSpec,
                    state: State) -> Any:
        """Raise ValueError/TypeError if ``state`` does not fit ``params``; modifies nothing.
        Returns what :meth:`step_tree` needs (e.g. the buffers' leaves)."""

    @abc.abstractmethod
    def step_tree(self, params: PyTree, p_leaves: list, g_leaves: list, spec: optree.PyTreeSpec,
                  checked: Any, hp: dict[str, torch.Tensor], state: State, *, donate: bool,
                  **extra: Any) -> tuple[list, State]:
        """One update on the flat leaves (``checked``: from :meth:`check_state`; ``hp``: this
        step's hyperparameters). Returns (new param leaves, new state without ``made_by``)."""

    def validate(self, params: PyTree, grads: PyTree, state: State) -> None:
        p_leaves, _, spec = _tree.check_grads(self.name, params, grads)
        self.check_state(params, p_leaves, spec, state)

    def update(
        self, params: PyTree, grads: PyTree, state: State, *, donate: bool = False, **extra: Any
    ) -> tuple[PyTree, State]:
        run = _update_tree if self.traceable else _update_tree_eagerly
        return run(self, params, grads, state, donate=donate, **extra)


def _update_tree(opt: TreeOptimizer, params: PyTree, grads: PyTree, state: State, *,
                 donate: bool, **extra: Any) -> tuple[PyTree, State]:
    p_leaves, g_leaves, spec = _tree.check_grads(opt.name, params, grads, donate=donate)
    checked = opt.check_state(params, p_leaves, spec, state)
    hp = resolve_hyperparams(opt.hyperparams, state[HPARAMS_KEY], state["step"])
    new_p, new_state = opt.step_tree(params, p_leaves, g_leaves, spec, checked, hp, state,
                                     donate=donate, **extra)
    return _tree.unflatten(spec, new_p), carry_made_by(state, new_state)


_update_tree_eagerly = torch.compiler.disable(_update_tree)


class _FunctionPair(Optimizer):
    def __init__(self, init_state, update, name):
        self._init, self._update, self.name = init_state, update, name

    def init_state(self, params):
        return self._init(params)

    def update(self, params, grads, state, *, donate=False, **extra):
        return self._update(params, grads, state, donate=donate, **extra)
