"""Every optimizer on every device: ``cpu`` always, ``cuda`` where torch sees a GPU (skipped with
the reason elsewhere; see ``tests/devices.py``).

What runs where:

- on any device D: the functional update and the torch.optim adapter in float32 on D against the
  same run in float64 on the CPU; bfloat16 params (float32 state) on D against a float64 run
  rounded to bfloat16 after each step; torch's fused AdamW/SGD kernels against functim's own;
  ``torch.compile(update)`` without recompiling when the learning rate changes (inductor on
  CUDA; on the CPU dynamo's eager backend, for a few optimizers: ``test_family_contract.py``
  compiles them all there); ``vmap`` and ``grad`` through updates; Newton–Schulz in bfloat16,
  and its default dtype (bfloat16 on CUDA only);
- CUDA only: no host sync in steady-state steps (``torch.cuda.set_sync_debug_mode("error")``);
  on the CPU the same updates run on the ``meta`` device instead, where reading a value on the
  host raises: a stand-in that CI can run;
- sharded (DTensor ``Shard(0)``) updates on 2 ranks against one process: gloo on the CPU,
  NCCL where the machine has 2 GPUs;
- ``benchmarks/gpu_check.sh`` and so ``benchmarks/gpu_bench.py`` end to end with ``--device cpu``
  on tiny shapes (their CUDA runs need a GPU machine).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import optree
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from devices import DEVICES, HostTransfers, cuda_device_count, cuda_unavailable_reason
from torch._dynamo.testing import CompileCounterWithBackend

import functim as ft
from functim import adapters

ROOT = pathlib.Path(__file__).resolve().parent.parent
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
STEPS = 5

# A tiny language model's parameters, named so that Muon's and Scion's default routing sends
# each kind somewhere different: embedding, output head, biases and norms, and hidden matrices
# both wide (8x24) and tall (24x8: Newton–Schulz transposes it).
SHAPES = {"wte.weight": (16, 8), "fc1.weight": (24, 8), "fc1.bias": (24,),
          "fc2.weight": (8, 24), "fc2.bias": (8,), "ln_f.weight": (8,), "ln_f.bias": (8,),
          "lm_head.weight": (16, 8)}


def _float32_tensors(seed: int, positive: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    return {k: v.square() + 0.1 for k, v in out.items()} if positive else out


PARAMS = _float32_tensors(0)
GRADS = [_float32_tensors(100 + t) for t in range(STEPS)]
HESSIANS = [_float32_tensors(200 + t, positive=True) for t in range(STEPS)]  # Sophia's estimates


@dataclass(frozen=True)
class Case:
    """One optimizer as the tests build it, functionally and as a torch.optim adapter."""

    functional: Callable[..., ft.Optimizer]
    adapter: Callable[..., torch.optim.Optimizer]
    # given to the run on the device only: Muon's and Scion's Newton–Schulz is bfloat16 on CUDA
    # by default (test_newton_schulz_bfloat16_* checks that); float32 here keeps the comparison
    # with the float64 reference at float32 precision
    device_options: dict = field(default_factory=dict)
    # given to both runs: Kron draws its probes in its factor dtype, so float32 factors on both
    # sides, with the same generator state, give both runs the same probes
    shared_options: dict = field(default_factory=dict)


NS_F32 = {"ns_dtype": F32}
CASES: dict[str, Case] = {
    "adamw": Case(lambda **o: ft.adamw(lr=1e-2, weight_decay=0.1, **o),
                  lambda ps, **o: adapters.AdamW(ps, lr=1e-2, weight_decay=0.1, **o)),
    "sgd": Case(lambda **o: ft.sgd(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, **o),
                lambda ps, **o: adapters.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True,
                                             weight_decay=0.1, **o)),
    "nadamw": Case(lambda **o: ft.nadamw(lr=1e-2, weight_decay=0.1, **o),
                   lambda ps, **o: adapters.NAdamW(ps, lr=1e-2, weight_decay=0.1, **o)),
    "cautious_adamw": Case(lambda **o: ft.cautious_adamw(lr=1e-2, weight_decay=0.1, **o),
                           lambda ps, **o: adapters.CautiousAdamW(ps, lr=1e-2, weight_decay=0.1,
                                                                  **o)),
    "cautious_lion": Case(lambda **o: ft.cautious_lion(lr=1e-3, weight_decay=0.1, **o),
                          lambda ps, **o: adapters.CautiousLion(ps, lr=1e-3, weight_decay=0.1,
                                                                **o)),
    "lion": Case(lambda **o: ft.lion(lr=1e-3, weight_decay=0.1, **o),
                 lambda ps, **o: adapters.Lion(ps, lr=1e-3, weight_decay=0.1, **o)),
    "signsgd": Case(lambda **o: ft.signsgd(lr=1e-3, weight_decay=0.1, **o),
                    lambda ps, **o: adapters.SignSGD(ps, lr=1e-3, weight_decay=0.1, **o)),
    "signum": Case(lambda **o: ft.signum(lr=1e-3, weight_decay=0.1, **o),
                   lambda ps, **o: adapters.Signum(ps, lr=1e-3, weight_decay=0.1, **o)),
    "mars": Case(lambda **o: ft.mars(lr=1e-2, weight_decay=0.1, **o),
                 lambda ps, **o: adapters.Mars(ps, lr=1e-2, weight_decay=0.1, **o)),
    "schedule_free_adamw": Case(
        lambda **o: ft.schedule_free_adamw(lr=1e-2, warmup_steps=2, **o),
        lambda ps, **o: adapters.ScheduleFreeAdamW(ps, lr=1e-2, warmup_steps=2, **o)),
    "muon": Case(lambda **o: ft.muon(lr=2e-2, weight_decay=0.1, adamw_weight_decay=0.1, **o),
                 lambda ps, **o: adapters.Muon(ps, lr=2e-2, weight_decay=0.1,
                                               adamw_weight_decay=0.1, **o),
                 device_options=NS_F32),
    "scion": Case(lambda **o: ft.scion(lr=1e-2, momentum=0.1, **o),
                  lambda ps, **o: adapters.Scion(ps, lr=1e-2, momentum=0.1, **o),
                  device_options=NS_F32),
    # max_precond_dim=8: only the 8-wide dims get an eigenbasis, and their statistics have full
    # rank from the first gradient on. A 16- or 24-wide one would start with a degenerate
    # eigenspace, whose basis (and so the update) any rounding difference changes at random.
    "soap": Case(lambda **o: ft.soap(lr=1e-2, weight_decay=0.1, precondition_frequency=2,
                                     max_precond_dim=8, **o),
                 lambda ps, **o: adapters.Soap(ps, lr=1e-2, weight_decay=0.1,
                                               precondition_frequency=2, max_precond_dim=8, **o)),
    "kron": Case(lambda **o: ft.kron(lr=1e-2, weight_decay=0.1, balance_every=2, **o),
                 lambda ps, **o: adapters.Kron(ps, lr=1e-2, weight_decay=0.1, balance_every=2,
                                               **o),
                 shared_options={"precond_dtype": F32}),
    "sophia": Case(lambda **o: ft.sophia(lr=1e-2, weight_decay=0.1, hessian_interval=2, **o),
                   lambda ps, **o: adapters.Sophia(ps, lr=1e-2, weight_decay=0.1,
                                                   hessian_interval=2, **o)),
}
# Kron's update is not traceable: host control flow on CPU counters decides the preconditioner
# update, and its probes come from a torch.Generator (see functim/optimizers/kron.py)
UNTRACEABLE = {"kron"}

# Float32 against float64: each step rounds the params (half an ulp) and their update (a few
# ulps of it) to float32, so after STEPS steps a run is a few ulps of |p| per step away from the
# float64 one. The bound, 4e-6·max(1, max|p|) per param tensor (34 float32 ulps), leaves room
# for a device's own order of operations; measured on the CPU (functional and adapters, every
# step): at most 3.1e-7·max(1, max|p|). A 1% error in one step's update is 1e-4 (AdamW) or 1e-5
# (Lion), far outside it.
F32_TOLERANCE = 4e-6
# bfloat16 params: both runs round to bfloat16 after every step, so they agree exactly unless a
# float32 value and its float64 counterpart straddle a rounding midpoint: one ulp for that
# element, which later steps carry along (two, if that happens twice to one element). Measured
# on the CPU: at most 1.
BF16_ULPS = 2


# -- running a case ------------------------------------------------------------------------------
def _on(tree: dict, device, dtype, via: torch.dtype | None = None) -> dict:
    """Copies of ``tree``'s tensors as ``dtype`` on ``device`` (rounded to ``via`` first), never
    the tensors themselves: adapters and donated updates write into their params."""
    return {k: (v.to(via) if via else v).to(device=device, dtype=dtype, copy=True)
            for k, v in tree.items()}


def _extras(name: str, opt: ft.Optimizer, t: int, device, dtype, via=None) -> dict:
    """Sophia gets a Hessian estimate on the steps where it is due (every second step here)."""
    if name == "sophia" and opt.hessian_due(t):
        return {"hessian": _on(HESSIANS[t], device, dtype, via)}
    return {}


def _options(name: str, *, device_run: bool) -> dict:
    """The constructor options of a run on the device (``device_run``) or of its reference."""
    case = CASES[name]
    return {**case.shared_options, **(case.device_options if device_run else {})}


def _run_functional(name: str, device, dtype, options: dict, *, via=None, rounded=False,
                    rng: torch.Tensor | None = None, donate: bool = False) -> tuple[list, dict]:
    """STEPS functional updates of case ``name`` built with ``options``, from PARAMS with GRADS
    (rounded to ``via`` first where given), as ``dtype`` on ``device``: the params after every
    step, and the last state. ``rounded``: the params rounded to ``via`` after every step (the
    float64 run that a bfloat16 run is compared with). ``rng``: Kron's generator state."""
    opt = CASES[name].functional(**options)
    params = _on(PARAMS, device, dtype, via)
    state = opt.init_state(params)
    if rng is not None:
        state["rng"] = rng
    trajectory = []
    for t in range(STEPS):
        params, state = opt.update(params, _on(GRADS[t], device, dtype, via), state,
                                   donate=donate, **_extras(name, opt, t, device, dtype, via))
        if rounded:
            params = _on(params, device, dtype, via)
        trajectory.append(params)
    return trajectory, state


def _kron_cpu_rng(name: str) -> torch.Tensor | None:
    """For Kron, the CPU generator state that the CPU reference starts from: given to the run on
    the device too, which then draws its probes on the CPU (kron's documented fallback when the
    state is not its device's kind) and so draws the reference's probes."""
    if name != "kron":
        return None
    return CASES[name].functional(**CASES[name].shared_options).init_state(PARAMS)["rng"]


def _assert_float32_close(got: dict, ref: dict, what: str) -> None:
    for k, r in ref.items():
        g = got[k].detach().to("cpu", F64)
        err = float((g - r.detach()).abs().max())
        bound = F32_TOLERANCE * max(1.0, float(r.detach().abs().max()))
        assert err <= bound, f"{what}: {k} is {err:.3g} from the float64 run (bound {bound:.3g})"


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    _, exponent = torch.frexp(x.abs().clamp_min(torch.finfo(BF16).tiny))
    return torch.ldexp(torch.ones_like(x), exponent - 8)


# -- numerics on every device --------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_float32_update_matches_cpu_float64(name, device):
    rng = _kron_cpu_rng(name)
    ref, _ = _run_functional(name, "cpu", F64, _options(name, device_run=False), rng=rng)
    got, state = _run_functional(name, device, F32, _options(name, device_run=True), rng=rng)
    for t in range(STEPS):
        _assert_float32_close(got[t], ref[t], f"{name} on {device}, step {t + 1}")
    assert all(v.device.type == torch.device(device).type and v.dtype == F32
               for v in got[-1].values())
    assert all(bool(torch.isfinite(x).all()) for x in optree.tree_leaves(state)
               if isinstance(x, torch.Tensor) and x.is_floating_point())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_params_with_float32_state(name, device):
    """bfloat16 params and gradients, float32 state (every optimizer's default for bfloat16
    params): the update is computed in float32 and rounded to bfloat16 once per step."""
    rng = _kron_cpu_rng(name)
    ref, _ = _run_functional(name, "cpu", F64, _options(name, device_run=False), via=BF16,
                             rounded=True, rng=rng)
    got, state = _run_functional(name, device, BF16, _options(name, device_run=True), rng=rng)
    for t in range(STEPS):
        for k, r in ref[t].items():
            g = got[t][k]
            assert g.dtype == BF16 and g.device.type == torch.device(device).type
            ulps = float(((g.to("cpu", F64) - r).abs() / _bf16_ulp(r)).max())
            assert ulps <= BF16_ULPS, f"{name} step {t + 1}: {k} is {ulps:g} bf16 ulps off"
    floats = [x for x in optree.tree_leaves(state)
              if isinstance(x, torch.Tensor) and x.is_floating_point()]
    assert not any(x.dtype == BF16 for x in floats), f"{name}: bfloat16 state"
    buffers = [x for x in floats if x.ndim > 0]
    assert name == "signsgd" or buffers, f"{name}: no state buffer"  # signSGD keeps none
    assert all(x.dtype == F32 for x in buffers)


def _named_params(device, dtype) -> list[tuple[str, torch.nn.Parameter]]:
    return [(k, torch.nn.Parameter(v)) for k, v in _on(PARAMS, device, dtype).items()]


def _adapter_steps(opt: torch.optim.Optimizer, named: list, steps: int = STEPS) -> None:
    """``steps`` adapter steps with GRADS; Sophia's Hessian estimate after the steps where it
    is due, as the functional runs get it before the next update."""
    device, dtype = named[0][1].device, named[0][1].dtype
    for t in range(steps):
        grads = _on(GRADS[t], device, dtype)
        for k, p in named:
            p.grad = grads[k]
        opt.step()
        if isinstance(opt, adapters.Sophia) and opt.hessian_due() and t + 1 < STEPS:
            opt.update_hessian(_on(HESSIANS[t + 1], device, dtype))


def _build_adapter(name: str, named: list, *, device_run: bool, **options):
    opt = CASES[name].adapter(named, **_options(name, device_run=device_run), **options)
    rng = _kron_cpu_rng(name)
    if rng is not None:  # Kron's group-shared generator state, as in the functional tests
        for _, p in named:
            opt.state[p]["rng"] = rng.clone()
    return opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_adapter_float32_step_matches_cpu_float64(name, device):
    ref_named = _named_params("cpu", F64)
    _adapter_steps(_build_adapter(name, ref_named, device_run=False), ref_named)
    named = _named_params(device, F32)
    _adapter_steps(_build_adapter(name, named, device_run=True), named)
    _assert_float32_close(dict(named), dict(ref_named), f"adapter {name} on {device}")


class _CallCounter:
    """Wraps a torch function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, kernel", [("adamw", "_fused_adamw_"), ("sgd", "_fused_sgd_")])
def test_torch_fused_kernel_matches_functims_kernel(name, kernel, device, monkeypatch):
    """The adapter's default step takes torch's fused kernel (counted), ``fused=False`` takes
    functim's multi-tensor kernel; both within float32 rounding of the float64 run (torch's
    kernels order their operations differently, so they are not bitwise equal)."""
    counter = _CallCounter(getattr(torch, kernel))
    monkeypatch.setattr(torch, kernel, counter)
    ref_named = _named_params("cpu", F64)
    _adapter_steps(_build_adapter(name, ref_named, device_run=False, fused=False), ref_named)
    results = {}
    for fused in (None, False):
        counter.calls = 0
        named = _named_params(device, F32)
        _adapter_steps(_build_adapter(name, named, device_run=True, fused=fused), named)
        results[fused] = counter.calls
        _assert_float32_close(dict(named), dict(ref_named), f"{name} fused={fused} on {device}")
    assert results == {None: STEPS, False: 0}, results


# -- torch.compile, vmap, grad -------------------------------------------------------------------
# elementwise, Newton–Schulz with routing, torch.cond (SOAP), two kinds of call (Sophia)
COMPILED_ON_CPU = ("adamw", "muon", "soap", "sophia")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_update_does_not_recompile_when_lr_changes(name, device):
    """``torch.compile(update, fullgraph=True)`` (so no graph break, no host read in the trace):
    one compilation for STEPS updates whose learning rate changes every step, the same params as
    eager. Inductor on CUDA; on the CPU dynamo's eager backend, which traces and guards exactly
    as with inductor (recompiles are dynamo's decision) without generating code."""
    if name in UNTRACEABLE:
        pytest.skip(f"{name}'s update is not traceable (see UNTRACEABLE)")
    if device == "cpu" and name not in COMPILED_ON_CPU:
        pytest.skip("test_family_contract.py compiles every optimizer on the CPU; here the CPU "
                    f"runs {', '.join(COMPILED_ON_CPU)}")
    opt = CASES[name].functional(**_options(name, device_run=True))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor" if device == "cuda" else "eager")
    compiled = torch.compile(opt.update, backend=counter, fullgraph=True)
    p_c = p_e = _on(PARAMS, device, F32)
    s_c, s_e = opt.init_state(p_c), opt.init_state(p_e)
    # a call with Sophia's Hessian estimate is another computation: one graph for each kind of
    # call, each compiled on its first call (steps 1 and 3) and reused after (steps 2, 4, 5)
    frames_after_first_call: dict[bool, int] = {}
    for t, lr in enumerate((1e-2, 2e-2, 5e-3, 3e-3, 1e-3)):
        s_c, s_e = ft.set_hyperparams(s_c, lr=lr), ft.set_hyperparams(s_e, lr=lr)
        grads, extras = _on(GRADS[t], device, F32), _extras(name, opt, t, device, F32)
        kind = bool(extras)
        with torch._dynamo.config.patch(error_on_recompile=kind in frames_after_first_call):
            p_c, s_c = compiled(p_c, grads, s_c, **extras)
        frames_after_first_call.setdefault(kind, counter.frame_count)
        p_e, s_e = opt.update(p_e, grads, s_e, **extras)
        _assert_float32_close(p_c, {k: v.to("cpu", F64) for k, v in p_e.items()},
                              f"compiled {name} on {device}, step {t + 1}")
    assert counter.frame_count == max(frames_after_first_call.values()), "recompiled"


VMAP_MEMBERS = 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_vmap_over_an_ensemble_equals_a_loop(name, device):
    """``ft.ensemble(opt)`` (``torch.func.vmap`` with the state's in/out dims) over 3 stacked
    models equals updating each model on its own, in float64 on the device. Newton–Schulz in
    float64 too: the check is about vmap, not precision."""
    if name in UNTRACEABLE:
        pytest.skip(f"{name}'s update is not traceable (see UNTRACEABLE)")
    ns = {"ns_dtype": F64} if "ns_dtype" in CASES[name].device_options else {}
    opt = CASES[name].functional(**CASES[name].shared_options, **ns)
    ens = ft.ensemble(opt)
    members = [{k: v.to(device, F64) * (1 + i / 10) for k, v in PARAMS.items()}
               for i in range(VMAP_MEMBERS)]
    stacked = optree.tree_map(lambda *xs: torch.stack(xs), *members)
    v_state, states = ens.init_state(stacked), [opt.init_state(m) for m in members]
    for t in range(3):
        grads = [_on(_float32_tensors(300 + VMAP_MEMBERS * t + i), device, F64)
                 for i in range(VMAP_MEMBERS)]
        stacked, v_state = ens.update(stacked, optree.tree_map(lambda *xs: torch.stack(xs),
                                                               *grads), v_state)
        for i in range(VMAP_MEMBERS):
            members[i], states[i] = opt.update(members[i], grads[i], states[i])
    for i, m in enumerate(members):
        for k, v in m.items():
            # float64; batched and single matmuls and eigensolvers may sum in different orders
            torch.testing.assert_close(stacked[k][i], v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_grad_through_updates_matches_finite_differences(name, device):
    """d(loss after 3 updates)/d(lr) by ``torch.func.grad`` through ``update`` equals a central
    finite difference, in float64 on the device (Muon: its matrix goes through Newton–Schulz)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(32, 6, generator=gen, dtype=F64).to(device)
    y = x @ torch.randn(6, 4, generator=gen, dtype=F64).to(device)
    params0 = {"w": torch.zeros(4, 6, dtype=F64, device=device),
               "b": torch.full((4,), 0.3, dtype=F64, device=device)}
    opt = CASES[name].functional(**({"ns_dtype": F64} if name == "muon" else {}))

    def loss(p):
        return ((x @ p["w"].T + p["b"] - y) ** 2).mean()

    def loss_after_updates(lr):
        params, state = params0, ft.set_hyperparams(opt.init_state(params0), lr=lr)
        for _ in range(3):
            params, state = opt.update(params, torch.func.grad(loss)(params), state)
        return loss(params)

    lr, h = torch.tensor(0.05, dtype=F64, device=device), 1e-6
    d = torch.func.grad(loss_after_updates)(lr)
    fd = (loss_after_updates(lr + h) - loss_after_updates(lr - h)) / (2 * h)
    assert d.device.type == torch.device(device).type and abs(float(d)) > 1e-3
    torch.testing.assert_close(d, fd, rtol=1e-6, atol=1e-10)


# -- Newton–Schulz in bfloat16 -------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 48, 192), (4, 192, 48)], ids=["wide", "tall"])
def test_newton_schulz_bfloat16_matches_float64(shape, device):
    """``ft.orthogonalize`` in bfloat16 (Muon's and Scion's default on CUDA) stays within 8% of
    the float64 iteration (relative Frobenius error per matrix). Each of the 5 iterations rounds
    its matmuls' outputs to bfloat16 (2^-8 = 0.4% each) and amplifies earlier errors along small
    singular values; measured on the CPU (bfloat16 matmuls accumulated in float32, as cuBLAS
    does): 3.8% (wide) and 4.3% (tall), and 1.5e-6 for the same iteration in float32. A wrong
    transpose or normalisation is off by about 100%."""
    gen = torch.Generator().manual_seed(11)
    g = torch.randn(shape, generator=gen)
    ref = ft.orthogonalize(g.double(), dtype=F64)
    got = ft.orthogonalize(g.to(device), dtype=BF16)
    assert got.dtype == F32 and got.device.type == torch.device(device).type
    err = torch.linalg.matrix_norm(got.to("cpu", F64) - ref) / torch.linalg.matrix_norm(ref)
    assert float(err.max()) < 0.08, err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["muon", "scion"])
def test_newton_schulz_dtype_default_is_bfloat16_on_cuda_only(name, device):
    """With no ``ns_dtype``, the update equals the one with ``ns_dtype=bfloat16`` on CUDA and
    the one with ``ns_dtype=float32`` on the CPU (float32 params), and differs from the other."""
    default, _ = _run_functional(name, device, F32, {})
    bf16, _ = _run_functional(name, device, F32, {"ns_dtype": BF16})
    f32, _ = _run_functional(name, device, F32, {"ns_dtype": F32})
    same, other = (bf16, f32) if torch.device(device).type == "cuda" else (f32, bf16)
    assert all(torch.equal(default[-1][k], same[-1][k]) for k in SHAPES)
    assert not all(torch.equal(default[-1][k], other[-1][k]) for k in SHAPES)


# -- host syncs ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _host_syncs_raise():
    """Inside: any CUDA operation that synchronises the host with the device raises."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _skip_without_cuda() -> None:
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(f"host syncs are CUDA's (test_update_on_meta_* is the CPU stand-in): {reason}")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("donate", [True, False], ids=["donated", "pure"])
@pytest.mark.parametrize("name", list(CASES))
def test_update_makes_no_host_sync_on_cuda(name, donate, dtype):
    """Steps 2 to 5 of every optimizer with its CUDA defaults (bfloat16 Newton–Schulz, Kron's
    CUDA generator) never wait for the GPU. The first call may: it allocates, and SOAP's first
    call runs ``torch.linalg.eigh``, whose convergence flag torch reads on the host."""
    _skip_without_cuda()
    opt = CASES[name].functional(**CASES[name].shared_options)
    params = _on(PARAMS, "cuda", dtype)
    grads = [_on(g, "cuda", dtype) for g in GRADS]
    extras = [_extras(name, opt, t, "cuda", dtype) for t in range(STEPS)]
    state = opt.init_state(params)
    params, state = opt.update(params, grads[0], state, donate=donate, **extras[0])
    with _host_syncs_raise():
        for t in range(1, STEPS):
            params, state = opt.update(params, grads[t], state, donate=donate, **extras[t])
    assert all(bool(torch.isfinite(p).all()) for p in params.values())


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_step_makes_no_host_sync_on_cuda(name):
    """The torch.optim adapters' steps 2 to 5 (and Sophia's ``update_hessian``) never wait for
    the GPU; gradients and estimates are put on the GPU beforehand."""
    _skip_without_cuda()
    named = _named_params("cuda", F32)
    opt = CASES[name].adapter(named, **CASES[name].shared_options)
    grads = [_on(g, "cuda", F32) for g in GRADS]
    hessians = [_on(h, "cuda", F32) for h in HESSIANS]

    def step(t: int) -> None:
        for k, p in named:
            p.grad = grads[t][k]
        opt.step()
        if isinstance(opt, adapters.Sophia) and opt.hessian_due():
            opt.update_hessian(hessians[t])

    step(0)
    with _host_syncs_raise():
        for t in range(1, STEPS):
            step(t)
    assert all(bool(torch.isfinite(p).all()) for _, p in named)


@pytest.mark.parametrize("name", list(CASES))
def test_update_on_meta_reads_nothing_on_the_host(name):
    """The CPU stand-in for the CUDA sync test: on the ``meta`` device tensors have no values,
    so reading one on the host (``.item()``, ``bool()``, ``.tolist()``, a data-dependent shape)
    raises, and a copy between the host and the device is recorded. Torch's own syncs (eigh's
    convergence check) are invisible here; the CUDA test sees them."""
    opt = CASES[name].functional(**CASES[name].shared_options)
    params = {k: torch.empty(s, device="meta") for k, s in SHAPES.items()}
    grads = {k: torch.empty(s, device="meta") for k, s in SHAPES.items()}
    state = opt.init_state(params)
    params, state = opt.update(params, grads, state)
    transfers = HostTransfers()
    with transfers:
        for t in range(1, STEPS):
            params, state = opt.update(params, grads, state, **(
                {"hessian": grads} if name == "sophia" and opt.hessian_due(t) else {}))
    if name == "kron":  # meta has no generator: its probes are drawn on the CPU and copied
        assert set(transfers.seen) <= {"aten._to_copy.default"}, transfers.seen
    else:
        assert transfers.seen == []
    assert all(p.device.type == "meta" for p in params.values())


# -- sharded: DTensor shards on 2 ranks against one process ---------------------------------------
def _rank_main(rank: int, backend: str, world: int, init_file: str, fn, args) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        fn(*args)
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()
    # done and checked: leave without the interpreter's teardown, where gloo's background
    # threads sometimes abort the process (std::terminate, no Python frame) after the work
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_on_ranks(fn, args: tuple, backend: str, tmp: pathlib.Path, *, world: int = 2,
                  timeout: float = 300.0) -> None:
    """``fn(*args)`` on ``world`` spawned ranks of a ``backend`` process group; a rank's
    exception is raised here with its traceback, a hang after ``timeout`` seconds fails."""
    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # inherited by the ranks
    ctx = mp.start_processes(_rank_main, args=(backend, world, str(tmp / "pg-init"), fn, args),
                             nprocs=world, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise AssertionError(f"the {world} {backend} ranks did not end within {timeout} s")


SHARDED_STEPS = 3
SHARDED_TOLERANCE = 1e-10  # float64; shard-wise sums (MARS's norms, cautious masks) reorder adds


def _sharded_equals_unsharded(backend: str, names: list[str]) -> None:
    """On this rank: every optimizer in ``names`` on DTensor ``Shard(0)`` params (FSDP2's layout)
    equals the same optimizer on whole tensors, float64, SHARDED_STEPS donated updates."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    rank = dist.get_rank()
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    def shard(tree: dict) -> dict:
        return {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in tree.items()}

    for name in names:
        opt = CASES[name].functional(**CASES[name].shared_options)
        whole, sharded = _on(PARAMS, device, F64), shard(_on(PARAMS, device, F64))
        s_whole, s_sharded = opt.init_state(whole), opt.init_state(sharded)
        for t in range(SHARDED_STEPS):
            grads, extras = _on(GRADS[t], device, F64), _extras(name, opt, t, device, F64)
            whole, s_whole = opt.update(whole, grads, s_whole, **extras)
            sharded, s_sharded = opt.update(sharded, shard(grads), s_sharded, donate=True,
                                            **{k: shard(v) for k, v in extras.items()})
        for k, ref in whole.items():
            err = float((sharded[k].full_tensor() - ref).abs().max())
            bound = SHARDED_TOLERANCE * max(1.0, float(ref.abs().max()))
            assert err <= bound, f"rank {rank}, {name}: {k} is {err:.3g} from unsharded"


def _two_ranks_or_skip(backend: str) -> None:
    if not (dist.is_available() and getattr(dist, f"is_{backend}_available")()):
        pytest.skip(f"this torch has no {backend} backend")
    if backend == "nccl" and cuda_device_count() < 2:
        pytest.skip(f"NCCL needs 2 CUDA devices, one per rank; this machine has "
                    f"{cuda_device_count()}")


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_sharded_update_equals_unsharded(backend, tmp_path):
    """Every optimizer's update on 2 ranks' DTensor shards equals the whole-tensor update: the
    elementwise ones shard-wise, Muon/Scion/SOAP/Kron through the owner-rank exchange. gloo on
    the CPU; NCCL on 2 GPUs (one rank each)."""
    _two_ranks_or_skip(backend)
    _run_on_ranks(_sharded_equals_unsharded, (backend, list(CASES)), backend, tmp_path)


# -- the benchmark and the GPU check script, on the CPU ------------------------------------------
# (named benchmark_script_*: gpu_check.sh leaves them out of the tests it runs on the GPU)
def _load_gpu_bench(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the module adds benchmarks/ to it
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_bench", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_shape_sets(monkeypatch):
    gpu_bench = _load_gpu_bench(monkeypatch)
    from step_time import case_shapes  # benchmarks/ is on sys.path now

    assert gpu_bench.SHAPE_SETS["gpt2-small"]() == case_shapes("A")
    assert gpu_bench.numel(gpu_bench.SHAPE_SETS["gpt-1b"]()) == 1_013_669_888
    assert sorted(r.name for r in gpu_bench.ROWS) == sorted(CASES)  # every optimizer


def test_benchmark_script_refuses_cuda_without_a_gpu(monkeypatch, capsys):
    if cuda_unavailable_reason() is None:
        pytest.skip("this machine has CUDA")
    gpu_bench = _load_gpu_bench(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        gpu_bench.parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def _timed(result: dict) -> bool:
    return result.get("median_ms", 0) > 0 and result["mean_ms"] >= result["min_ms"] > 0


def _run_gpu_check(out: pathlib.Path, tests: str, bench: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu",
                           "--budget-s", "300", "--tests", tests, "--bench", bench, str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def _check_bench_results(results: dict) -> None:
    assert results["references"]["bandwidth"]["gbps"] > 0
    assert results["references"]["matmul_bf16"]["tflops"] > 0
    steps = results["step_time/tiny"]
    assert steps["precompile"] == {"workers": 0}  # gpu_check.sh compiled them beforehand
    assert _timed(steps["torch-fused"]) and _timed(steps["torch-foreach"])
    for name in CASES:
        assert _timed(steps[name]["eager"]) and _timed(steps[name]["adapter"]), name
        compiled = steps[name]["compiled"]
        if name in ("adamw", "signsgd"):
            assert _timed(compiled) and compiled["form"] == "donated", compiled
        else:
            assert compiled["skipped"] == ("not traceable" if name in UNTRACEABLE
                                           else "not asked for")
    ns = results["newton_schulz/tiny"]
    assert set(ns) == {"2x16x48", "2x16x16", "2x16x64", "2x64x16"}
    assert all(_timed(r["eager"]) and _timed(r["compiled"]) and r["gram"]["tflops"] > 0
               for r in ns.values())
    for peer, res in results["peers/tiny"].items():
        assert _timed(res["functim"]) and _timed(res["adapter"]), peer
        assert _timed(res["peer"]) or res["peer"]["skipped"].startswith("not installed")


def test_benchmark_script_gpu_check_dry_run_on_cpu(tmp_path):
    """gpu_check.sh with ``--device cpu`` runs the tests it is given, then every table of
    gpu_bench.py on the tiny shape set (every optimizer eager and as an adapter; AdamW and signSGD
    compiled with dynamo's eager backend, as inductor's CPU compiles take minutes, and compiled
    first by 2 processes beside the tests; Newton–Schulz eager and compiled; the peers, or why
    not), and writes every file; a failing test makes its status non-zero."""
    out = tmp_path / "out"
    proc = _run_gpu_check(out, "tests/test_cuda.py -k 'newton_schulz_bfloat16_matches and cpu'",
                          "--steps 2 --compile-rows adamw,signsgd --precompile-workers 2 "
                          "--matmul-size 64")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "bench.log", "env.txt", "gpu_bench.json", "gpu_bench.md", "summary.md", "tests.log",
        "warm.log"]
    warm = json.loads((out / "warm.log").read_text().strip().splitlines()[-1])
    assert warm["tiny"]["rows"] == [["adamw"], ["signsgd"]]
    assert warm["tiny"]["exits"] == ["ok", "ok"]
    _check_bench_results(json.loads((out / "gpu_bench.json").read_text()))
    summary = (out / "summary.md").read_text()
    assert "tests exit 0, benchmark exit 0" in summary and "2 passed" in summary
    for title in ("## References", "## Step time, tiny", "## Newton–Schulz", "## SOAP and Kron",
                  "## Targets"):
        assert title in summary
    # pytest's status 4 (no such file) wins over the benchmark's 2 (an unknown shape set)
    failing = _run_gpu_check(tmp_path / "failing", "tests/no_such_file.py", "--shapes none")
    assert failing.returncode == 4, failing.stdout[-3000:]
    assert "benchmark exit 2" in (tmp_path / "failing" / "summary.md").read_text()
