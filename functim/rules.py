"""Routing parameters by rules over their dotted paths (globs), ndim and shape.

One mechanism serves :func:`functim.partition`, weight-decay masks, the torch.optim adapter (which
learns paths from ``model.named_parameters()``) and the OLMo-core configs, so a parameter is
routed the same way on every surface. Defaults follow what works in language-model pretraining:
embeddings, the output head, biases, norms and ndim < 2 tensors go to the elementwise optimizer
(and get no weight decay), hidden matrices to the matrix optimizer.

Two forms:
- an **ordered list of** :class:`Rule`: the first rule that matches claims the leaf (later
  matches are reported by :func:`explain` as shadowed); a leaf that no rule claims is an error;
- a **mapping** ``{label: selector}`` (selector: a glob or list of globs, a :class:`Rule`, or a
  callable ``(path, leaf) -> bool``): unordered, so a leaf claimed by two labels is an error, as is
  a leaf claimed by none.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from . import _tree

NdimSpec = Union[int, Sequence[int], Callable[[int], bool], None]
ShapeSpec = Union[Sequence[int | None], Callable[[tuple], bool], None]


@dataclass(frozen=True)
class Rule:
    """Claims leaves for ``label`` when every given criterion matches.

    ``path``: one glob or a list of globs (any may match), matched with :func:`fnmatch.fnmatchcase`
    against the whole dotted path (``"*.bias"``, ``"blocks.*.attn.w[qkv]"``); ``ndim``: an int, a
    collection of ints or a predicate; ``shape``: a tuple (``None`` = any size) or a predicate.
    A rule with no criteria matches everything (a catch-all).
    """

    label: str
    path: str | Sequence[str] | None = None
    ndim: NdimSpec = None
    shape: ShapeSpec = None
    _globs: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.label, str) or not self.label:
            raise TypeError(f"Rule label must be a non-empty string, got {self.label!r}")
        path = self.path
        if path is not None and not isinstance(path, str) and not (
                isinstance(path, Sequence) and all(isinstance(g, str) for g in path)):
            raise TypeError(f"Rule({self.label!r}): path must be a glob string or a list of "
                            f"them, got {path!r}")
        if not (self.ndim is None or callable(self.ndim) or _is_int(self.ndim) or (
                isinstance(self.ndim, Sequence) and all(map(_is_int, self.ndim)))):
            raise TypeError(f"Rule({self.label!r}): ndim must be an int, a list of ints or a "
                            f"predicate, got {self.ndim!r}")
        if not (self.shape is None or callable(self.shape) or (
                isinstance(self.shape, Sequence) and not isinstance(self.shape, str)
                and all(d is None or _is_int(d) for d in self.shape))):
            raise TypeError(f"Rule({self.label!r}): shape must be a tuple of ints (None = any "
                            f"size) or a predicate, got {self.shape!r}")
        object.__setattr__(self, "_globs", (path,) if isinstance(path, str) else tuple(path or ()))

    def matches(self, path: str, leaf: torch.Tensor) -> bool:
        if self._globs and not any(fnmatch.fnmatchcase(path, g) for g in self._globs):
            return False
        if self.ndim is not None:
            n = leaf.ndim
            if callable(self.ndim):
                if not self.ndim(n):
                    return False
            elif isinstance(self.ndim, int):
                if n != self.ndim:
                    return False
            elif n not in self.ndim:
                return False
        if self.shape is not None:
            s = tuple(leaf.shape)
            if callable(self.shape):
                if not self.shape(s):
                    return False
            elif len(s) != len(self.shape) or any(
                    want is not None and want != got for want, got in zip(self.shape, s)):
                return False
        return True

    def describe(self) -> str:
        parts = []
        if self._globs:
            parts.append("path " + "|".join(self._globs))
        if self.ndim is not None:
            parts.append(f"ndim {getattr(self.ndim, '__name__', self.ndim)}")
        if self.shape is not None:
            parts.append(f"shape {getattr(self.shape, '__name__', self.shape)}")
        return f"{self.label} <- " + (", ".join(parts) if parts else "everything")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def rule_labels(owner: str, rules: Any) -> list[str]:
    """The labels that ``rules`` routes to, after checking its form: an ordered list of
    :class:`Rule`, or a mapping ``{label: selector}`` (see the module docstring). A TypeError
    names the first item that is neither."""
    if isinstance(rules, Mapping):
        for label, sel in rules.items():
            _selector_rule(label, sel)  # raises TypeError naming the label
        return list(rules)
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError(f"{owner}: rules must be a list of functim.Rule or a dict {{label: "
                        f"selector}}, got {rules!r}")
    for i, r in enumerate(rules):
        if not isinstance(r, Rule):
            raise TypeError(f"{owner}: rule {i} must be a functim.Rule (e.g. "
                            f"functim.Rule('adamw', path='*.bias')), got {r!r}")
    return [r.label for r in rules]


@dataclass(frozen=True)
class Assignment:
    path: str
    shape: tuple | None
    label: str | None
    rule: str | None
    shadowed: tuple[str, ...] = ()


class Explanation(list):
    """A list of :class:`Assignment` rows that prints as a table."""

    def __str__(self) -> str:
        rows = [("path", "shape", "label", "claimed by")]
        for a in self:
            extra = f"  (also matched: {'; '.join(a.shadowed)})" if a.shadowed else ""
            rows.append((a.path, "-" if a.shape is None else str(a.shape), a.label or "-",
                         (a.rule or "-") + extra))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows)

    def labels(self) -> dict[str, str | None]:
        return {a.path: a.label for a in self}


def _selector_rule(label: str, sel: Any) -> Callable[[str, torch.Tensor], bool]:
    if isinstance(sel, Rule):
        return sel.matches
    if isinstance(sel, str) or (isinstance(sel, Sequence) and all(isinstance(s, str) for s in sel)):
        return Rule(label, path=sel).matches
    if callable(sel):
        return lambda p, x: bool(sel(p, x))
    raise TypeError(f"selector for label {label!r} must be a glob, a list of globs, a Rule or a "
                    f"callable (path, leaf) -> bool; got {sel!r}")


def _describe_selector(sel: Any) -> str:
    if isinstance(sel, Rule):
        return sel.describe()
    if isinstance(sel, str):
        return f"path {sel}"
    if callable(sel):
        return getattr(sel, "__name__", "predicate")
    return "path " + "|".join(sel)


def explain(rules: Sequence[Rule] | Mapping[str, Any], params: Any, *,
            owner: str = "partition") -> Explanation:
    """Which rule claims each leaf; raises ValueError naming every unclaimed or doubly-claimed
    leaf. ``None`` leaves are listed with no label."""
    leaves, _ = _tree.flatten(params)
    rows = Explanation()
    unclaimed, doubly = [], []
    ordered = not isinstance(rules, Mapping)
    if ordered:
        rules = list(rules)
        for r in rules:
            if not isinstance(r, Rule):
                raise TypeError(f"{owner}: ordered rules must be functim.Rule objects, got {r!r}")
    else:
        checks = {lab: _selector_rule(lab, sel) for lab, sel in rules.items()}
    for path, x in zip(_tree.paths(params), leaves):
        if x is None:
            rows.append(Assignment(path, None, None, None))
            continue
        if ordered:
            hits = [r for r in rules if r.matches(path, x)]
            names = [f"rule {rules.index(r)}: {r.describe()}" for r in hits]
            label = hits[0].label if hits else None
        else:
            hit_labels = [lab for lab, chk in checks.items() if chk(path, x)]
            names = [f"{lab} <- {_describe_selector(rules[lab])}" for lab in hit_labels]
            label = hit_labels[0] if len(hit_labels) == 1 else None
            if len(hit_labels) > 1:
                doubly.append(f"{path} ({', '.join(hit_labels)})")
        if not names:
            unclaimed.append(path)
        rows.append(Assignment(path, tuple(x.shape), label, names[0] if names else None,
                               tuple(names[1:]) if ordered else ()))
    problems = []
    if unclaimed:
        problems.append(f"claimed by no rule: {unclaimed}")
    if doubly:
        problems.append(f"claimed by more than one label: {doubly}")
    if problems:
        raise ValueError(f"{owner}: every parameter must be claimed by exactly one rule; "
                         + "; ".join(problems) + f"\n{_safe_table(rows)}")
    return rows


def _safe_table(rows: Explanation) -> str:
    return str(rows)


# Parameter-name conventions of common LM codebases (nanoGPT, HF transformers, OLMo-core, Meta
# Llama), matched against dotted paths.
BIAS_GLOBS = ("*bias", "*.b")
NORM_GLOBS = ("*norm*", "*ln_*", "*ln", "*ln[0-9]*", "*ln_f*", "*layernorm*")
EMBEDDING_GLOBS = ("*embed*", "*wte*", "*wpe*", "*tok_emb*", "*pos_emb*")
OUTPUT_HEAD_GLOBS = ("*lm_head*", "head.*", "*.head.*", "output.weight", "*unembed*")


def _below_2d(n: int) -> bool:
    return n < 2


def _at_least_2d(n: int) -> bool:
    return n >= 2


NO_DECAY_RULES: tuple[Rule, ...] = (
    Rule("no_decay", ndim=_below_2d),
    Rule("no_decay", path=list(BIAS_GLOBS)),
    Rule("no_decay", path=list(NORM_GLOBS)),
    Rule("no_decay", path=list(EMBEDDING_GLOBS)),
    Rule("decay"),
)


def lm_routing(*, hidden: str, vector: str, embedding: str, output: str) -> tuple[Rule, ...]:
    """The default routing of a language model's parameters, first match wins:
    ndim < 2 leaves, biases and norms → ``vector``; input embeddings → ``embedding``; the output
    head (``lm_head``, ``output.weight``; a tied head is the embedding) → ``output``; every other
    leaf with ndim ≥ 2 → ``hidden``. Muon uses ``hidden="muon"`` and ``"adamw"`` elsewhere; Scion
    maps the four labels to its norms."""
    return (
        Rule(vector, ndim=_below_2d),
        Rule(vector, path=list(BIAS_GLOBS + NORM_GLOBS)),
        Rule(embedding, path=list(EMBEDDING_GLOBS)),
        Rule(output, path=list(OUTPUT_HEAD_GLOBS)),
        Rule(hidden, ndim=_at_least_2d),
    )


def default_weight_decay_mask(path: str, leaf: torch.Tensor) -> bool:
    """True where weight decay applies: matrices, but not biases, norms or embeddings
    (the convention of nanoGPT's ``configure_optimizers`` and Levanter's
    ``build_weight_decay_mask``).
    The rules are :data:`NO_DECAY_RULES` (first match wins)."""
    for r in NO_DECAY_RULES:
        if r.matches(path, leaf):
            return r.label == "decay"
    return True
