"""Hessian-diagonal estimators on torch.func, and the counter-based RNG they draw from.

These feed :func:`functim.sophia` (docs/algorithms.md section 12; the SophiaG reference
Liuhong99/Sophia@a7e1572 ``train_sophiag.py``), but they are plain pure functions: each takes a
*functional model* (a function of the params pytree, e.g. built with
``torch.func.functional_call``), the params, a batch and an RNG ``key``, and returns
``(estimate, new_key)``, where ``estimate`` is a pytree shaped like ``params`` (``None`` where a
param is ``None``; dtype at least float32).

- :func:`gnb_hessian` (Gauss–Newton–Bartlett, SophiaG): ``logits = logits_fn(params, batch)``
  (shape ``[..., V]``); labels ``ŷ ~ softmax(logits)`` are sampled per position;
  ``ĝ = ∇ mean CE(logits, ŷ)`` (one forward and one backward: ``torch.func.vjp`` with the
  cross-entropy cotangent ``(softmax − onehot(ŷ))/B`` written in closed form); optionally
  ``ĝ`` is clipped to a global norm (``clip_norm``, as ``train_sophiag.py`` clips it at 1.0);
  ``ĥ = B·ĝ⊙ĝ`` with ``B`` the number of sampled positions. This is the paper's form: its
  expectation is the diagonal of the Gauss–Newton matrix of the *mean* loss. The reference code
  stores ``ĝ⊙ĝ`` and multiplies by ``bs`` (tokens per step) inside the update instead; with
  these estimates use Sophia's ``bs=1`` (its default), see :mod:`functim.optimizers.sophia`.
- :func:`hutchinson_hessian` (Sophia-H): Rademacher probes ``u`` (±1, as optax
  ``contrib/_sophia.py``; the paper draws ``u ~ N(0, I)``), the Hessian-vector product
  ``Hu = jvp(grad(loss), (params,), (u,))`` (forward-over-reverse), ``ĥ = u⊙Hu``, averaged over
  ``num_probes`` probes. Unbiased for the Hessian diagonal of ``loss_fn``; it can be negative.

The models must be differentiable by ``torch.func`` (forward-mode AD through the backward for
Hutchinson: every op needs a forward-AD formula for its derivative).

RNG: randomness comes from state that is checkpointed, so a resumed run is bitwise identical to
an uninterrupted one. A ``key`` is an int64 tensor of
shape ``(2,)`` = ``[seed, counter]`` (:func:`rng_key`). Random numbers are a pure function of
``(seed, counter, element index)`` — a keyed 32-bit integer hash (Wellons' "lowbias32" mixer,
three keyed rounds) computed with ordinary int64 tensor ops — so they are identical on every
device and under ``vmap``/``torch.compile``, need no ``torch.Generator``, and no host sync.
Each call consumes ``n`` draws (GNB: 1, Hutchinson: ``num_probes``) and returns the key with
``counter + n``; saving the key with the optimizer state makes a resumed run bitwise identical.
Sophia keeps its key in ``state["rng"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import _tree
from .listops import ListOps
from .runtime import needs_per_tensor

PyTree = Any

__all__ = [
    "gnb_hessian",
    "hutchinson_hessian",
    "rademacher_like",
    "rng_key",
    "sample_categorical",
    "squared_gradients",
]

_M32 = 0xFFFFFFFF
_MAX_WORDS = 2**32  # element indices of one draw are hashed as 32-bit words


# -- keys ------------------------------------------------------------------------------------
def rng_key(seed: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh key ``[seed, 0]`` (int64, shape ``(2,)``); ``seed`` is an int in [0, 2**63)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"rng_key: seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"rng_key: seed must be in [0, 2**63), got {seed}")
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


def check_key(owner: str, key: Any, name: str = "key") -> None:
    """Raise unless ``key`` looks like a key made by :func:`rng_key` (no value is read)."""
    if not isinstance(key, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be an int64 tensor of shape (2,) made by "
                        f"functim.hessian.rng_key, got {type(key).__name__}")
    if key.dtype != torch.int64 or tuple(key.shape) != (2,):
        raise ValueError(f"{owner}: {name} must be an int64 tensor of shape (2,) made by "
                         f"functim.hessian.rng_key, got shape {tuple(key.shape)} "
                         f"dtype {key.dtype}")


def advance(key: torch.Tensor, draws: int) -> torch.Tensor:
    """The key after ``draws`` draws: ``[seed, counter + draws]`` (a new tensor)."""
    return torch.stack((key[0], key[1] + draws))


# -- the hash --------------------------------------------------------------------------------
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x·c) mod 2**32`` for int64 ``x`` in [0, 2**32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & _M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons, hash-prospector): a bijection of [0, 2**32) with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _draw_keys(key: torch.Tensor, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit round keys for draw number ``counter + draw`` (0-d int64 tensors)."""
    seed, counter = key[0], key[1] + draw
    s = _mix(_mix((seed & _M32) ^ 0x243F6A88) ^ ((seed >> 32) & _M32))
    k1 = _mix(_mix(s ^ ((counter >> 32) & _M32)) ^ (counter & _M32))
    return k1, _mix(k1 ^ 0x85A308D3)


def _words(k1: torch.Tensor, k2: torch.Tensor, start: int, n: int,
           device: torch.device) -> torch.Tensor:
    """``n`` uniform 32-bit words (int64 in [0, 2**32)) for indices ``start .. start+n-1``."""
    if start + n > _MAX_WORDS:
        raise ValueError(f"functim.hessian: one draw is limited to 2**32 words, asked for "
                         f"{start + n}")
    i = torch.arange(start, start + n, dtype=torch.int64, device=device)
    return _mix(_mix(i ^ k1) ^ k2)


def _uniform(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uniform floats in [0, 1): 32 bits for float64, the top 24 bits otherwise (exact)."""
    if dtype == torch.float64:
        return words.to(torch.float64) * 2.0**-32
    return (words >> 8).to(torch.float32) * 2.0**-24


# -- random draws ----------------------------------------------------------------------------
def _rademacher(leaves: list[torch.Tensor], key: torch.Tensor, draw: int) -> list[torch.Tensor]:
    """±1 tensors like ``leaves`` from draw ``counter + draw``: one stream over all leaves (in
    order), 32 signs per hashed word."""
    if not leaves:
        return []
    k1, k2 = _draw_keys(key.to(leaves[0].device), draw)
    out, offset = [], 0
    for x in leaves:
        n = x.numel()
        nw = (n + 31) // 32
        if k1.device != x.device:
            k1, k2 = k1.to(x.device), k2.to(x.device)
        w = _words(k1, k2, offset, nw, x.device)
        shifts = torch.arange(32, dtype=torch.int64, device=x.device)
        bits = ((w.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:n].reshape(x.shape)
        out.append(bits.to(x.dtype) * 2 - 1)
        offset += nw
    return out


def rademacher_like(params: PyTree, key: torch.Tensor) -> tuple[PyTree, torch.Tensor]:
    """Independent ±1 entries shaped like every tensor leaf of ``params`` (``None`` leaves stay
    ``None``); returns ``(probes, new_key)`` (one draw)."""
    check_key("rademacher_like", key)
    leaves, spec, active = _float_leaves("rademacher_like", params)
    probes = _rademacher([leaves[i] for i in active], key, 0)
    out: list = [None] * len(leaves)
    for i, u in zip(active, probes):
        out[i] = u
    return _tree.unflatten(spec, out), advance(key, 1)


def _sample_from_probs(probs: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """One label per row of ``probs`` (``[..., V]``, rows summing to ~1) by inverse CDF."""
    v = probs.shape[-1]
    k1, k2 = _draw_keys(key.to(probs.device), 0)
    w = _words(k1, k2, 0, probs.numel() // v, probs.device).reshape(probs.shape[:-1])
    cdf = probs.cumsum(-1)
    target = _uniform(w, probs.dtype).to(probs.dtype) * cdf[..., -1]
    # the first index whose cdf exceeds the target; the clamp only matters when rounding makes
    # target reach the total
    return (cdf <= target.unsqueeze(-1)).sum(-1).clamp_max(v - 1)


def _check_logits(owner: str, logits: Any) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"{owner}: the model must return a floating-point logits tensor of "
                        f"shape [..., num_classes], got {_tree.describe_leaf(logits)}")
    if logits.ndim == 0 or logits.shape[-1] == 0 or logits.numel() == 0:
        raise ValueError(f"{owner}: logits must have shape [..., num_classes] with at least one "
                         f"position and one class, got {tuple(logits.shape)}")


def sample_categorical(logits: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """``ŷ ~ Categorical(softmax(logits))`` independently for every position of ``logits``
    (``[..., V]``); returns ``(labels [...] int64, new_key)`` (one draw). Like
    ``torch.distributions.Categorical(logits=logits).sample()`` in distribution (not in values);
    probabilities are resolved to 2**-24 (float32 and below) or 2**-32 (float64)."""
    check_key("sample_categorical", key)
    _check_logits("sample_categorical", logits)
    work = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.detach().to(work), dim=-1)
    return _sample_from_probs(probs, key), advance(key, 1)


# -- estimators ------------------------------------------------------------------------------
def _float_leaves(owner: str, params: PyTree) -> tuple[list, Any, list[int]]:
    leaves, spec = _tree.flatten(params)
    active = []
    for i, x in enumerate(leaves):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{owner}: parameter {_tree.leaf_paths_on_error(params, i)!r} must "
                            f"be a floating-point tensor or None, got {_tree.describe_leaf(x)}")
        active.append(i)
    return leaves, spec, active


def _bind(fn: Callable, leaves: list, spec: Any, active: list[int], batch: Any) -> Callable:
    """``fn(params, batch)`` as a function of the active leaves (positional)."""
    def f(*xs):
        full = list(leaves)
        for i, x in zip(active, xs):
            full[i] = x
        return fn(_tree.unflatten(spec, full), batch)
    return f


def _estimate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def squared_gradients(grads: list[torch.Tensor | None], scale: float = 1.0) -> list:
    """``scale·g⊙g`` for each gradient in a flat list (``None`` stays ``None``), at least in
    float32: the GNB estimate from sampled-label gradients (``scale`` = number of sampled
    positions; the reference's ``update_hessian()`` uses ``scale = 1``)."""
    out: list = [None] * len(grads)
    idx = [i for i, g in enumerate(grads) if g is not None]
    gs = [grads[i] if grads[i].dtype == _estimate_dtype(grads[i].dtype)
          else grads[i].to(_estimate_dtype(grads[i].dtype)) for i in idx]
    if not gs:
        return out
    ops = ListOps(per_tensor=needs_per_tensor(gs))
    sq = ops.mul(gs, gs)
    if scale != 1.0:
        sq = ops.mul(sq, float(scale), inplace=True)
    for i, s in zip(idx, sq):
        out[i] = s
    return out


def _clip_global_norm(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """torch.nn.utils.clip_grad_norm_'s rule without a host sync: ``g·min(1, c/(‖g‖ + 1e-6))``
    (the norm accumulated in float64)."""
    total = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g, dtype=torch.float64).to(grads[0].device) for g in grads]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g * coef.to(device=g.device, dtype=g.dtype) for g in grads]


def gnb_hessian(
    logits_fn: Callable[[PyTree, Any], torch.Tensor],
    params: PyTree,
    batch: Any,
    key: torch.Tensor,
    *,
    clip_norm: float | None = None,
) -> tuple[PyTree, torch.Tensor]:
    """Gauss–Newton–Bartlett estimate of the Hessian diagonal (SophiaG; module docstring).

    ``logits_fn(params, batch)`` returns logits ``[..., V]``; the loss whose curvature is
    estimated is the mean softmax cross-entropy over all ``B = numel/V`` positions. Returns
    ``(B·ĝ⊙ĝ, new_key)`` with ``ĝ`` the gradient of that loss at labels sampled from the model
    (clipped to global norm ``clip_norm`` first when given, as ``train_sophiag.py`` does with
    1.0). Cost: one forward, one backward, one softmax/cumsum over the logits.
    """
    check_key("gnb_hessian", key)
    if clip_norm is not None and (isinstance(clip_norm, bool) or
                                  not isinstance(clip_norm, (int, float)) or
                                  not clip_norm > 0):
        raise ValueError(f"gnb_hessian: clip_norm must be a positive float or None, "
                         f"got {clip_norm!r}")
    leaves, spec, active = _float_leaves("gnb_hessian", params)
    if not active:  # nothing to differentiate: an all-None estimate (the draw is still used)
        return _tree.unflatten(spec, leaves), advance(key, 1)
    f = _bind(logits_fn, leaves, spec, active, batch)
    logits, vjp_fn = torch.func.vjp(f, *[leaves[i] for i in active])
    _check_logits("gnb_hessian", logits)
    num_classes = logits.shape[-1]
    positions = logits.numel() // num_classes
    work = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.detach().to(work), dim=-1)
    labels = _sample_from_probs(probs, key).unsqueeze(-1)
    # d(mean CE)/d(logits) = (softmax - onehot(labels)) / B
    cot = probs.scatter(-1, labels, probs.gather(-1, labels) - 1) / positions
    grads = list(vjp_fn(cot.to(logits.dtype)))
    if clip_norm is not None:
        grads = _clip_global_norm(grads, float(clip_norm))
    est = squared_gradients(grads, float(positions))
    out: list = [None] * len(leaves)
    for i, e in zip(active, est):
        out[i] = e
    return _tree.unflatten(spec, out), advance(key, 1)


def hutchinson_hessian(
    loss_fn: Callable[[PyTree, Any], torch.Tensor],
    params: PyTree,
    batch: Any,
    key: torch.Tensor,
    *,
    num_probes: int = 1,
) -> tuple[PyTree, torch.Tensor]:
    """Hutchinson estimate of the Hessian diagonal of ``loss_fn(params, batch)`` (a scalar):
    the mean over ``num_probes`` Rademacher probes ``u`` of ``u⊙Hu``, with ``Hu`` from
    ``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse). Returns
    ``(estimate, new_key)``; consumes ``num_probes`` draws. Cost per probe: one
    forward-mode pass through a forward and a backward.
    """
    check_key("hutchinson_hessian", key)
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"hutchinson_hessian: num_probes must be an int >= 1, "
                         f"got {num_probes!r}")
    leaves, spec, active = _float_leaves("hutchinson_hessian", params)
    out: list = [None] * len(leaves)
    if not active:
        return _tree.unflatten(spec, out), advance(key, num_probes)
    f = _bind(loss_fn, leaves, spec, active, batch)
    grad_fn = torch.func.grad(f, argnums=tuple(range(len(active))))
    primals = tuple(leaves[i] for i in active)
    acc: list[torch.Tensor] | None = None
    for j in range(num_probes):
        probes = tuple(_rademacher(list(primals), key, j))
        _, hvp = torch.func.jvp(grad_fn, primals, probes)
        term = [u.to(_estimate_dtype(u.dtype)) * h.to(_estimate_dtype(u.dtype))
                for u, h in zip(probes, hvp)]
        acc = term if acc is None else [a + t for a, t in zip(acc, term)]
    assert acc is not None
    if num_probes > 1:
        acc = [a / num_probes for a in acc]
    for i, e in zip(active, acc):
        out[i] = e
    return _tree.unflatten(spec, out), advance(key, num_probes)
