"""Sharded training with FSDP2 (``fully_shard``) and DTensor on CPU: gloo, 2 processes spawned
from pytest (:func:`ranks.run_ranks`).

One spawn runs every scenario (process start-up dominates the cost): the workers train a small
transformer sharded over 2 ranks with each optimizer of :data:`SPECS` (functional core and
torch.optim adapter, float64 and float32) and compare params and optimizer state with the same
training unsharded in one process; count who computes which whole matrix (Muon, Scion, SOAP,
Kron); check :func:`functim.distributed.owner_compute` on its own, every elementwise optimizer
and more SOAP/Kron options on DTensor leaves; save DCP checkpoints (2 ranks) and load the pytest
process's (1 rank). The tests below read the workers' reports, and the 2 → 1 tests load the
workers' checkpoints in the pytest process.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import functim.adapters as fa
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from ranks import run_ranks

import functim as ft

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with gloo"),
    # DCP says so whenever it runs without a process group (the 1-rank side, on purpose)
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable"),
]

WORLD = 2
V, D, HIDDEN, HEADS, LAYERS = 13, 6, 15, 2, 2  # 13 and 15 rows: uneven Shard(0) shards
BATCH, SEQ = 4, 6
STEPS, SPLIT = 5, 2  # train STEPS steps; checkpoints are taken after SPLIT
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # max |Δ| / max |p|, per parameter


# -- the model and data --------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.mlp_norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (m(h).view(b, t, HEADS, D // HEADS).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, D))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_norm(x))))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.norm(x))


def make_model(dtype: torch.dtype) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM().to(dtype)
    with torch.no_grad():  # LayerNorm starts at (1, 0); perturb it so its updates are generic
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(step: int, rank: int | None = None) -> torch.Tensor:
    """The global batch of a step; with ``rank``, that rank's half of it (FSDP2 averages the
    two halves' gradients: the gradient of the global batch's mean loss)."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, V, (BATCH, SEQ + 1), generator=g)
    return tokens if rank is None else tokens.chunk(WORLD)[rank]


def backward(model: nn.Module, step: int, rank: int | None = None) -> None:
    """The gradient of the global batch's mean loss. Sharded (``rank`` given): this rank's half,
    FSDP2 averages the ranks' gradients. Unsharded: the same two halves' mean losses, each
    scaled by 1/WORLD (exact, a power of two) and accumulated, so the gradient is the FSDP2 one
    to the last bit: the optimizers are compared, not the rounding of a batch mean. (SOAP's
    eigenbases, like any eigensolver's, amplify a rounding difference by 1/eigengap.)"""
    model.zero_grad(set_to_none=True)
    for r in ([rank] if rank is not None else range(WORLD)):
        tokens = batch(step, r)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        (loss if rank is not None else loss / WORLD).backward()


def shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# -- the optimizers ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """An optimizer under test: its functional constructor and its torch.optim adapter (given
    ``model.named_parameters()``), with the same settings."""

    name: str
    functional: Callable[[], ft.Optimizer]
    adapter: Callable[[Any], torch.optim.Optimizer]


SPECS: list[Spec] = [
    Spec("adamw", lambda: ft.adamw(lr=1e-2, weight_decay=0.1),
         lambda ps: fa.AdamW(ps, lr=1e-2, weight_decay=0.1)),
    Spec("lion", lambda: ft.lion(lr=1e-3, weight_decay=0.1),
         lambda ps: fa.Lion(ps, lr=1e-3, weight_decay=0.1)),
    Spec("mars", lambda: ft.mars(lr=3e-3, weight_decay=0.1),
         lambda ps: fa.Mars(ps, lr=3e-3, weight_decay=0.1)),
    # ft.muon's default routing: hidden matrices to Muon, embedding/head/norms/biases to AdamW
    Spec("muon", lambda: ft.muon(lr=0.02, weight_decay=0.01, adamw_weight_decay=0.01),
         lambda ps: fa.Muon(ps, lr=0.02, weight_decay=0.01, adamw_weight_decay=0.01)),
    Spec("scion", lambda: ft.scion(lr=1e-2, momentum=0.5),
         lambda ps: fa.Scion(ps, lr=1e-2, momentum=0.5)),
    # SOAP: every matrix preconditioned on both sides, 1-D leaves Adam; the first call only
    # builds the bases, and with precondition_frequency=2 calls 2 and 4 refresh them (QR)
    Spec("soap", lambda: ft.soap(lr=3e-3, weight_decay=0.1, precondition_frequency=2),
         lambda ps: fa.Soap(ps, lr=3e-3, weight_decay=0.1, precondition_frequency=2)),
    # Kron: factors updated every step, balanced before every 2nd update; max_size_triangular=10
    # gives the matrices with a 13 or 15 dim a diagonal and a triangular factor, the 6x6 ones two
    # triangular ones, the 1-D leaves a diagonal one
    Spec("kron", lambda: ft.kron(lr=1e-3, weight_decay=0.1, preconditioner_update_probability=1.0,
                                 max_size_triangular=10, balance_every=2),
         lambda ps: fa.Kron(ps, lr=1e-3, weight_decay=0.1, preconditioner_update_probability=1.0,
                            max_size_triangular=10, balance_every=2)),
]
# The matrix optimizers compute each whole matrix once, on its owner rank
# (functim.distributed.owner_compute): Muon's and Scion's Newton-Schulz, SOAP's statistics,
# projections and bases, Kron's factor updates and preconditioning. Their param-shaped state
# (moments, momentum) is sharded like the params; SOAP's GG/Q and Kron's factors are plain
# tensors every rank holds whole (WHOLE_MATRIX_STATE).
WHOLE_MATRIX_STATE = {"soap": ({"exp_avg", "exp_avg_sq"}, {"GG", "Q"}),
                      "kron": ({"momentum_buffer"}, {"Q"})}  # (sharded keys, replicated keys)

SURFACES = ("functional", "adapter")
DTYPES = (torch.float64, torch.float32)


def train(model: nn.Module, spec: Spec, surface: str, steps: range, *, rank: int | None = None,
          opt: Any = None, state: Any = None):
    """Train ``model`` over ``steps`` (batch indices); returns (optimizer, functional state)."""
    params = dict(model.named_parameters())
    if opt is None:
        opt = spec.functional() if surface == "functional" else spec.adapter(
            model.named_parameters())
    if surface == "functional" and state is None:
        state = opt.init_state(params)
    for step in steps:
        backward(model, step, rank)
        if surface == "adapter":
            opt.step()
            continue
        grads = {n: p.grad for n, p in params.items()}
        with torch.no_grad():
            new, state = opt.update(params, grads, state)
            for n, p in params.items():
                p.copy_(new[n])
    return opt, state


def max_rel_err(model: nn.Module, ref: nn.Module | dict) -> dict[str, float]:
    """Per parameter max |Δ| / max |ref| (DTensor shards gathered whole first); ``ref``: a model
    or its ``{name: tensor}``."""
    ref_params = ref if isinstance(ref, dict) else dict(ref.named_parameters())
    out = {}
    for n, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        r = ref_params[n].detach()
        out[n] = ((full.detach() - r).abs().max() / r.abs().max()).item()
    return out


# -- checkpoints (the same code on 1 and 2 ranks) ------------------------------------------------
CKPT_CASES = tuple((name, surface) for name in ("muon", "adamw", "soap", "kron")
                   for surface in ("functional", "adapter"))


def _spec(name: str) -> Spec:
    return next(s for s in SPECS if s.name == name)


def save_checkpoint(path: str, model: nn.Module, surface: str, opt: Any, state: Any) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    optim = state if surface == "functional" else get_optimizer_state_dict(model, opt)
    dcp.save({"model": get_model_state_dict(model), "optim": optim}, checkpoint_id=path,
             no_dist=not dist.is_initialized())  # 1 rank: a plain process, no process group


def resume(path: str, model: nn.Module, spec: Spec, surface: str, rank: int | None):
    """Load a checkpoint into a fresh model/optimizer and train the remaining steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if surface == "functional":
        opt = spec.functional()
        state = opt.init_state(dict(model.named_parameters()))  # complete: DCP fills it in place
        sd = {"model": get_model_state_dict(model), "optim": state}
        dcp.load(sd, checkpoint_id=path, no_dist=not dist.is_initialized())
        set_model_state_dict(model, sd["model"])
        state = sd["optim"]
    else:
        opt = spec.adapter(model.named_parameters())
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=path, no_dist=not dist.is_initialized())
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        state = None
    train(model, spec, surface, range(SPLIT, STEPS), rank=rank, opt=opt, state=state)
    return model


def uninterrupted(tmp: str, name: str, surface: str) -> dict[str, torch.Tensor]:
    """The params after STEPS uninterrupted steps (float64), saved by the ``run`` fixture."""
    return torch.load(os.path.join(tmp, f"uninterrupted-{name}-{surface}.pt"))


# -- the workers ---------------------------------------------------------------------------------
def _owner_compute_checks(rank: int, mesh) -> dict:
    """owner_compute on its own: uneven and empty shards, several outputs, a replicated plain
    output, 2-D meshes, and the explicit shard-local mode."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import functim.distributed as fd

    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(7)
    shapes = [(5, 3), (3, 5), (5, 3), (1, 4), (5, 3), (6, 6), (3, 5)]
    full = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]

    def cube(xs):  # shape-preserving whole-matrix maths: X Xᵀ X
        return [x @ x.mT @ x for x in xs]

    want = cube(full)
    for name, shape, placements in (("1d", (WORLD,), [Shard(0)]),
                                    ("2d_shard_outer", (WORLD, 1), [Shard(0), Replicate()]),
                                    ("2d_shard_inner", (1, WORLD), [Replicate(), Shard(0)])):
        m = mesh if name == "1d" else init_device_mesh("cpu", shape)
        xs = [distribute_tensor(x, m, placements) for x in full]
        with fd.owner_stats() as st:
            got = fd.owner_compute(cube, xs)
        out[f"{name}_equal"] = all(
            torch.equal(y.full_tensor(), w) and tuple(y.placements) == tuple(placements)
            for y, w in zip(got, want))
        out[f"{name}_computed"] = st.computed
    xs = [distribute_tensor(x, mesh, [Shard(0)]) for x in full]
    # three outputs per job: X·2 laid out like X; XᵀX replicated as a plain tensor; the column
    # sums as a replicated DTensor (a Layout) for tall X only (None: wide X has no such output)
    grams = [torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64) for x in full]
    sums = [fd.Layout(mesh, (Replicate(),), (x.shape[1],), torch.float64)
            if x.shape[0] > x.shape[1] else None for x in full]

    def three(ys):
        return [(2 * y, y.mT @ y, y.sum(0) if y.shape[0] > y.shape[1] else None) for y in ys]

    got = fd.owner_compute(three, xs, out=(xs, grams, sums))
    out["multi_equal"] = all(
        torch.equal(a.full_tensor(), 2 * x) and type(b) is torch.Tensor and torch.equal(b, x.mT @ x)
        and (c is None if x.shape[0] <= x.shape[1] else
             tuple(c.placements) == (Replicate(),) and torch.equal(c.to_local(), x.sum(0)))
        for (a, b, c), x in zip(got, full))
    # the approximation is explicit, and it is not the exact result
    with fd.sharded_matrix_mode("local"), fd.owner_stats() as st:
        loc = fd.owner_compute(cube, xs)
    out["local_is_blockwise"] = all(
        torch.equal(y.to_local(), x.to_local() @ x.to_local().mT @ x.to_local())
        for y, x in zip(loc, xs))
    out["local_differs"] = any(not torch.equal(y.full_tensor(), w) for y, w in zip(loc, want))
    out["local_counts"] = (st.computed, st.local)
    out["n_jobs"] = len(full)
    out["owners"] = fd.assign_owners([x.shape for x in full], WORLD)
    return out


ELEMENTWISE = {  # every elementwise optimizer, functional, on DTensor leaves (no FSDP needed)
    "adamw": lambda: ft.adamw(weight_decay=0.1),
    "adamw_masked": lambda: ft.adamw(fused=False, weight_decay=0.1,
                                     weight_decay_mask=ft.default_weight_decay_mask),
    "adamw_amsgrad": lambda: ft.adamw(amsgrad=True),
    "sgd_nesterov": lambda: ft.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "nadamw": lambda: ft.nadamw(),
    "nadamw_torch": lambda: ft.nadamw(variant="torch"),
    "cautious_adamw": lambda: ft.cautious_adamw(weight_decay=0.1),
    "cautious_lion": lambda: ft.cautious_lion(weight_decay=0.1),
    "lion": lambda: ft.lion(weight_decay=0.1),
    "signsgd": lambda: ft.signsgd(weight_decay=0.1),
    "signum": lambda: ft.signum(weight_decay=0.1),
    "mars": lambda: ft.mars(weight_decay=0.1),
    "mars_lion_1d": lambda: ft.mars(mars_type="mars-lion", optimize_1d=True),
    "schedule_free_adamw": lambda: ft.schedule_free_adamw(weight_decay=0.1),
    "sophia": lambda: ft.sophia(weight_decay=0.1),
    "clip_then_adamw": lambda: ft.chain(ft.clip_by_global_norm(0.5), ft.adamw()),
}


def _elementwise_checks(mesh) -> dict:
    """Each elementwise optimizer on Shard(0) DTensors (uneven and empty shards) against plain
    tensors: 3 steps, pure and donated; float64 (and bfloat16 params with float32 state for
    AdamW, Lion and MARS: the mixed-precision write-back). Returns {case: max rel err}."""
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(3)
    out: dict[str, Any] = {}
    for dtype in (torch.float64, torch.bfloat16):
        names = list(ELEMENTWISE) if dtype == torch.float64 else ["adamw", "lion", "mars"]
        shapes = {"w": (5, 3), "embed.weight": (7, 4), "b": (5,), "one": (1, 4)}
        params = {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
                  for k, s in shapes.items()}
        grads = [{k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
                  for k, s in shapes.items()} for _ in range(3)]
        hess = {k: torch.rand(s, generator=g, dtype=torch.float64).to(dtype)
                for k, s in shapes.items()}

        def sharded(tree):
            return {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in tree.items()}

        for name in names:
            for donate in (False, True):
                mode = "donated" if donate else "pure"
                case = f"{name}-{str(dtype).removeprefix('torch.')}-{mode}"
                try:
                    opt = ELEMENTWISE[name]()
                    extra = {"hessian": hess} if name == "sophia" else {}
                    p, st = dict(params), opt.init_state(params)
                    dp = sharded(params)
                    dst = opt.init_state(dp)
                    dextra = {"hessian": sharded(hess)} if name == "sophia" else {}
                    with torch.no_grad():
                        for gr in grads:
                            p, st = opt.update(p, gr, st, **extra)
                            dp, dst = opt.update(dp, sharded(gr), dst, donate=donate, **dextra)
                    out[case] = max(((dp[k].full_tensor().double() - p[k].double()).abs().max()
                                     / p[k].double().abs().max()).item() for k in p)
                except Exception:
                    out[case] = traceback.format_exc()
    return out


def _work_counters() -> list:
    """(module, function, work per call): the whole-matrix work of each matrix optimizer, where
    it calls it: Muon/Scion's Newton–Schulz (matrices per call), SOAP's Gram statistics (one
    per preconditioned dim per call), Kron's preconditioning (one per leaf per step)."""
    import functim.optimizers._routed as routed
    import functim.optimizers.kron as kron_mod
    import functim.optimizers.soap as soap_mod

    return [(routed, "orthogonalize_many", lambda mats, *a: len(mats)),
            (soap_mod, "gram", lambda *a: 1), (kron_mod, "kron_precondition", lambda *a: 1)]


WORK_COUNTERS = _work_counters()


def _state_leaves(model: nn.Module, opt: Any, state: Any, surface: str) -> dict[str, Any]:
    """Every tensor of the optimizer state by path: the functional state's leaves, or the
    adapter's ``opt.state[p]`` entries under ``<param name>/<key>`` (whatever the keys are)."""
    import optree

    if surface == "functional":
        paths, leaves, _ = optree.tree_flatten_with_path(state)
        return {".".join(map(str, p)): x for p, x in zip(paths, leaves)
                if isinstance(x, torch.Tensor)}
    out = {}
    for n, p in model.named_parameters():
        for k, v in opt.state[p].items():
            items = v if isinstance(v, (list, tuple)) else [v]
            for i, x in enumerate(items):
                if isinstance(x, torch.Tensor):
                    out[f"{n}/{k}" + (f".{i}" if isinstance(v, (list, tuple)) else "")] = x
    return out


def state_report(model, opt, state, ref, ref_opt, ref_state, surface) -> dict:
    """The sharded run's optimizer state against the unsharded run's (max |Δ| / max |ref| per
    tensor, DTensors gathered whole; integer and generator state must be equal), and which
    functional state keys hold DTensors and which plain tensors."""
    got = _state_leaves(model, opt, state, surface)
    want = _state_leaves(ref, ref_opt, ref_state, surface)
    errs: dict[str, float] = {}
    for k in sorted(set(got) | set(want)):
        if k not in got or k not in want:
            errs[k] = float("inf")
            continue
        a, b = got[k], want[k]
        a = a.full_tensor() if hasattr(a, "full_tensor") else a
        if a.shape != b.shape or a.dtype != b.dtype:
            errs[k] = float("inf")
        elif not a.is_floating_point():
            errs[k] = 0.0 if torch.equal(a, b) else float("inf")
        else:
            scale = b.abs().max().item() if b.numel() else 0.0
            diff = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
            errs[k] = diff / scale if scale > 0 else diff
    kinds: dict[str, set] = {}
    if surface == "functional":
        for k, x in got.items():
            kinds.setdefault(k.split(".")[0], set()).add(type(x).__name__)
    return {"state_err": errs, "state_kinds": kinds}


MATRIX = {  # SOAP and Kron options the FSDP2 runs do not reach, functional, on DTensor leaves
    # one-sided leaves (a dim above max_precond_dim), 1-D bases, N-D leaves merged, normalised
    "soap_merge_1d_normalize": lambda: ft.soap(precondition_frequency=2, max_precond_dim=6,
                                               merge_dims=True, precondition_1d=True,
                                               normalize_grads=True),
    "soap_channels_last": lambda: ft.soap(precondition_frequency=1, merge_dims=True,
                                          data_format="channels_last", correct_bias=False),
    # factors learning from the gradient, the data-derived initial scale, balancing every 2nd
    # update, a diagonal factor by memory_save_mode
    "kron_grad_init_balance": lambda: ft.kron(lr=1e-2, preconditioner_update_probability=1.0,
                                              momentum_into_precond_update=False,
                                              precond_init_scale=None, balance_every=2,
                                              memory_save_mode="one_diag", weight_decay=0.1),
    # updates every other step (no factor exchange on the others), no merging
    "kron_half_updates": lambda: ft.kron(preconditioner_update_probability=0.5, merge_dims=False,
                                         balance_every=1),
}


def _matrix_checks(mesh) -> dict:
    """SOAP and Kron options on Shard(0) DTensors (uneven and empty shards, 1-D to 4-D leaves)
    against plain tensors on the same gradients: 4 steps, pure and donated; float64 and
    bfloat16. Returns {case: (max rel err of the params, max rel err of the state, whether
    every unsharded param moved)}."""
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(5)
    shapes = {"w": (5, 3), "tall": (9, 4), "b": (5,), "one": (1, 4), "t3": (3, 2, 4),
              "conv": (4, 3, 2, 2)}
    out: dict[str, Any] = {}
    for dtype in (torch.float64, torch.bfloat16):
        params = {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
                  for k, s in shapes.items()}
        grads = [{k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
                  for k, s in shapes.items()} for _ in range(4)]

        def sharded(tree):
            return {k: distribute_tensor(v.clone(), mesh, [Shard(0)]) for k, v in tree.items()}

        for name, make in MATRIX.items():
            for donate in (False, True):
                mode = "donated" if donate else "pure"
                case = f"{name}-{str(dtype).removeprefix('torch.')}-{mode}"
                try:
                    opt = make()
                    p, st = dict(params), opt.init_state(params)
                    dp = sharded(params)
                    dst = opt.init_state(dp)
                    with torch.no_grad():
                        for gr in grads:
                            p, st = opt.update(p, gr, st)
                            dp, dst = opt.update(dp, sharded(gr), dst, donate=donate)
                    p_err = max(((dp[k].full_tensor().double() - p[k].double()).abs().max()
                                 / p[k].double().abs().max()).item() for k in p)
                    s_err = max(state_report(None, None, dst, None, None, st,
                                             "functional")["state_err"].values())
                    moved = all(not torch.equal(p[k], params[k]) for k in p)
                    out[case] = (p_err, s_err, moved)
                except Exception:
                    out[case] = traceback.format_exc()
    return out


def _worker(tmp: str) -> None:
    """Every 2-rank scenario; each one reports its result or its traceback under its own key."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    report: dict[str, Any] = {"parity": {}, "errors": {}, "resume_1_to_2": {}}
    try:
        from torch.distributed.device_mesh import init_device_mesh

        import functim.distributed as fd

        mesh = init_device_mesh("cpu", (world,))
        # the whole-matrix work this process does, counted where the optimizers call it
        work = [0]
        patched = []
        for mod, fn_name, per_call in WORK_COUNTERS:
            real = getattr(mod, fn_name)

            def counting(*a, _real=real, _per_call=per_call, **k):
                work[0] += _per_call(*a)
                return _real(*a, **k)

            patched.append((mod, fn_name, real))
            setattr(mod, fn_name, counting)
        for spec in SPECS:
            for surface in SURFACES:
                for dtype in DTYPES:
                    key = f"{spec.name}-{surface}-{str(dtype).removeprefix('torch.')}"
                    try:
                        ref = make_model(dtype)
                        work[0] = 0
                        ref_opt, ref_state = train(ref, spec, surface, range(STEPS))
                        ref_work = work[0]
                        model = shard(make_model(dtype), mesh)
                        work[0] = 0
                        with fd.owner_stats() as st:
                            opt, state = train(model, spec, surface, range(STEPS), rank=rank)
                        report["parity"][key] = {
                            "err": max_rel_err(model, ref), "work": work[0],
                            "ref_work": ref_work, "computed": st.computed, "calls": st.calls,
                            "types": sorted({type(p).__name__ for p in model.parameters()}),
                            **state_report(model, opt, state, ref, ref_opt, ref_state,
                                           surface)}
                    except Exception:
                        report["errors"][key] = traceback.format_exc()
        for mod, fn_name, real in patched:
            setattr(mod, fn_name, real)
        try:
            report["owner_compute"] = _owner_compute_checks(rank, mesh)
        except Exception:
            report["errors"]["owner_compute"] = traceback.format_exc()
        report["elementwise"] = _elementwise_checks(mesh)
        report["matrix"] = _matrix_checks(mesh)

        # checkpoints: save after SPLIT steps on 2 ranks; load the 1-rank ones and continue
        for name, surface in CKPT_CASES:
            spec = _spec(name)
            try:
                model = shard(make_model(torch.float64), mesh)
                opt, state = train(model, spec, surface, range(SPLIT), rank=rank)
                save_checkpoint(os.path.join(tmp, f"2ranks-{name}-{surface}"), model, surface,
                                opt, state)
            except Exception:
                report["errors"][f"save-{name}-{surface}"] = traceback.format_exc()
            try:
                model = shard(make_model(torch.float64), mesh)
                resume(os.path.join(tmp, f"1rank-{name}-{surface}"), model, spec, surface, rank)
                report["resume_1_to_2"][f"{name}-{surface}"] = max_rel_err(
                    model, uninterrupted(tmp, name, surface))
            except Exception:
                report["errors"][f"resume-{name}-{surface}"] = traceback.format_exc()
    except Exception:
        report["errors"]["worker"] = traceback.format_exc()
    finally:
        with open(os.path.join(tmp, f"report{rank}.pkl"), "wb") as f:
            pickle.dump(report, f)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """This process's 1-rank side on one intra-op thread, as the workers (tiny tensors: threads
    only add overhead, and much of it on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[tuple[str, list[dict]]]:
    """1-rank checkpoints (this process, no process group), then one 2-rank spawn. This
    module's tests run on one thread (:func:`one_thread`), restored after the module."""
    with one_thread():
        yield _run(str(tmp_path_factory.mktemp("dist")))


def _run(tmp: str) -> tuple[str, list[dict]]:
    for name, surface in CKPT_CASES:
        spec = _spec(name)
        model = make_model(torch.float64)
        opt, state = train(model, spec, surface, range(SPLIT))
        save_checkpoint(os.path.join(tmp, f"1rank-{name}-{surface}"), model, surface, opt, state)
        # training on is the uninterrupted run the resumed ones are compared with
        train(model, spec, surface, range(SPLIT, STEPS), opt=opt, state=state)
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()},
                   os.path.join(tmp, f"uninterrupted-{name}-{surface}.pt"))
    run_ranks(_worker, (tmp,), tmp, world=WORLD)
    reports = []
    for r in range(WORLD):
        with open(os.path.join(tmp, f"report{r}.pkl"), "rb") as f:
            reports.append(pickle.load(f))
    return tmp, reports


def _no_worker_error(reports: list[dict], *keys: str) -> None:
    """No traceback under ``keys`` (and none from the worker's set-up) on any rank."""
    for r, rep in enumerate(reports):
        for key in ("worker", *keys):
            assert key not in rep["errors"], f"rank {r}, {key}:\n{rep['errors'][key]}"


# -- the tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_fsdp2_training_equals_unsharded(run, spec, surface, dtype):
    _, reports = run
    key = f"{spec.name}-{surface}-{str(dtype).removeprefix('torch.')}"
    _no_worker_error(reports, key)
    for r, rep in enumerate(reports):
        res = rep["parity"][key]
        assert res["types"] == ["DTensor"], res["types"]  # really trained on FSDP2 shards
        bad = {n: e for n, e in res["err"].items() if not e <= TOL[dtype]}
        assert not bad, f"rank {r}: {key}: relative errors above {TOL[dtype]}: {bad}"
        # the optimizer state too (functional state, or the adapter's entries, key by key)
        bad = {n: e for n, e in res["state_err"].items() if not e <= TOL[dtype]}
        assert not bad, f"rank {r}: {key}: state errors above {TOL[dtype]}: {bad}"
        if surface == "functional" and spec.name in WHOLE_MATRIX_STATE:
            sharded, whole = WHOLE_MATRIX_STATE[spec.name]
            kinds = res["state_kinds"]
            assert all(kinds[k] == {"DTensor"} for k in sharded), kinds
            assert all(kinds[k] == {"Tensor"} for k in whole), kinds
            assert all(v == {"Tensor"} for k, v in kinds.items() if k not in sharded), kinds


def matrix_jobs(name: str) -> tuple[list[tuple[int, ...]], int]:
    """The shapes of the whole-matrix jobs an optimizer hands to owner_compute on each call, in
    order, and the counted work (:data:`WORK_COUNTERS`) per job and call."""
    named = [(n, tuple(p.shape)) for n, p in make_model(torch.float64).named_parameters()]
    if name in ("muon", "scion"):  # Scion's spectral leaves are Muon's hidden matrices
        return [s for n, s in named if len(s) == 2 and "embed" not in n and "lm_head" not in n], 1
    if name == "soap":  # every matrix, both dims preconditioned: two Gram statistics per job
        return [s for _, s in named if len(s) >= 2], 2
    if name == "kron":  # every leaf has factors
        return [s for _, s in named], 1
    raise KeyError(name)


MATRIX_SPECS = [s for s in SPECS if s.name in ("muon", "scion", "soap", "kron")]


@pytest.mark.parametrize("spec", MATRIX_SPECS, ids=lambda s: s.name)
def test_each_rank_computes_its_share_of_the_matrices(run, spec):
    import functim.distributed as fd

    _, reports = run
    _no_worker_error(reports, *(f"{spec.name}-{s}-float64" for s in SURFACES))
    shapes, per_job = matrix_jobs(spec.name)
    owners = fd.assign_owners(shapes, WORLD)  # round-robin, group by group
    share = [owners.count(r) for r in range(WORLD)]
    total = len(owners)
    assert 0 < min(share) and max(share) < total
    for surface in SURFACES:
        key = f"{spec.name}-{surface}-float64"
        res = [rep["parity"][key] for rep in reports]
        for r in range(WORLD):
            # the unsharded run computes every matrix; each rank only its share
            assert res[r]["ref_work"] == STEPS * total * per_job, (r, res[r]["ref_work"])
            assert res[r]["work"] == STEPS * share[r] * per_job, (r, res[r]["work"], share)
            assert res[r]["computed"] == STEPS * share[r], (r, res[r]["computed"], share)
            assert res[r]["calls"] == STEPS
        assert sum(x["work"] for x in res) == STEPS * total * per_job


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_every_elementwise_optimizer_on_dtensors(run, name):
    _, reports = run
    _no_worker_error(reports)
    for r, rep in enumerate(reports):
        cases = {k: v for k, v in rep["elementwise"].items() if k.split("-")[0] == name}
        assert cases, f"no case ran for {name}"
        for case, err in cases.items():
            assert not isinstance(err, str), f"rank {r}, {case}:\n{err}"
            # float64: reduction order only; bfloat16: the same roundings on every element
            assert err <= (1e-12 if "float64" in case else 0.0), (r, case, err)


@pytest.mark.parametrize("name", list(MATRIX))
def test_soap_and_kron_options_on_dtensors(run, name):
    _, reports = run
    _no_worker_error(reports)
    for r, rep in enumerate(reports):
        cases = {k: v for k, v in rep["matrix"].items() if k.split("-")[0] == name}
        assert len(cases) == 4, f"not every case ran for {name}: {sorted(cases)}"
        for case, err in cases.items():
            assert not isinstance(err, str), f"rank {r}, {case}:\n{err}"
            # the same gradients: params and state equal up to the order of norm reductions
            p_err, s_err, moved = err
            assert moved, (r, case)
            assert max(p_err, s_err) <= (1e-12 if "float64" in case else 0.0), (r, case, err)


def test_owner_compute_layouts(run):
    _, reports = run
    _no_worker_error(reports, "owner_compute")
    per_rank = [rep["owner_compute"] for rep in reports]
    n = per_rank[0]["n_jobs"]
    owners = per_rank[0]["owners"]
    for r, oc in enumerate(per_rank):
        for name in ("1d", "2d_shard_outer", "2d_shard_inner"):
            assert oc[f"{name}_equal"], (r, name)
        assert oc["1d_computed"] == owners.count(r)
        assert oc["multi_equal"], r
        assert oc["local_is_blockwise"] and oc["local_differs"], r
        assert oc["local_counts"] == (0, n)
    for name in ("1d", "2d_shard_outer", "2d_shard_inner"):
        assert sum(oc[f"{name}_computed"] for oc in per_rank) == n


@pytest.mark.parametrize("case", CKPT_CASES, ids=lambda c: "-".join(c))
def test_dcp_one_rank_to_two_continues_like_uninterrupted(run, case):
    _, reports = run
    name = "-".join(case)
    _no_worker_error(reports, f"resume-{name}")
    for r, rep in enumerate(reports):
        errs = rep["resume_1_to_2"][name]
        bad = {n: e for n, e in errs.items() if not e <= TOL[torch.float64]}
        assert not bad, f"rank {r}: {name}: {bad}"


@pytest.mark.parametrize("case", CKPT_CASES, ids=lambda c: "-".join(c))
def test_dcp_two_ranks_to_one_continues_like_uninterrupted(run, case):
    tmp, reports = run
    name, surface = case
    _no_worker_error(reports, f"save-{name}-{surface}")
    spec = _spec(name)
    model = resume(os.path.join(tmp, f"2ranks-{name}-{surface}"), make_model(torch.float64),
                   spec, surface, None)
    errs = max_rel_err(model, uninterrupted(tmp, name, surface))
    bad = {n: e for n, e in errs.items() if not e <= TOL[torch.float64]}
    assert not bad, bad
