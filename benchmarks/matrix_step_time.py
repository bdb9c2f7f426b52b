"""Step time of the preconditioned matrix optimizers on the GPT-2-small shape set, as a ratio to
torch's fused AdamW measured in the same run, plus state memory.

Sections (``--section``; each optimizer's author owns its section):

- ``kron``: functim's Kron (functional, donated) and its ``torch.optim`` adapter against
  kron_torch's ``Kron`` (``kron_torch/kron.py``, PyPI ``kron-torch`` 0.3.3), run as shipped
  (``kron_torch``: its preconditioning, update and clip functions are ``torch.compile``-d) and
  with ``TORCHDYNAMO_DISABLE=1`` (``kron_torch-eager``: its einsums then go through opt_einsum).
  As shipped it cannot precondition GPT-2's embedding (50257x768, a diagonal and a triangular
  factor): the compiled einsum ``n,bo,n,bB,nB->no`` asks for a 50257x768x768 float32
  intermediate (118.6 GB) and fails (seen on CPU, torch 2.13); ``--exclude wte.weight`` leaves
  that tensor out.

What is measured (``kron``)
---------------------------
Parameters: the shapes of GPT-2 small (``benchmarks/step_time.py`` case A: wte 50257x768, wpe
1024x768, 12 blocks, ln_f; 148 tensors, 124,439,808 float32 params; ``--blocks N`` keeps the
first N blocks). Gradients: fixed random tensors (scale 1e-2) set once. Every optimizer runs
with ``lr=3e-4, weight_decay=0.1`` and kron_torch's defaults otherwise, except
``preconditioner_update_probability=0.5``: both implementations then update the preconditioner on
every second step (the same deterministic period rule), so one run times both kinds of step.
Each step is timed on its own (``time.perf_counter``, with ``torch.cuda.synchronize`` before and
after on CUDA) after ``--warmup`` steps (which include kron_torch's ``torch.compile`` of its
update, preconditioning and clipping functions); steps are classified as *update* steps (the
preconditioner was updated: functim's ``precond_updates`` counter moved, kron_torch's
``_update_counter`` was reset) or *ordinary* steps, and the median of each kind is reported.

Columns: ``ordinary ms`` / ``update ms`` (medians), the same as multiples of
``torch.optim.AdamW(fused=True)``'s median step on the same params in the same run, and
``state B/param``: bytes of every optimizer-state tensor with more than one element (momentum and
factors; not the counters or the generator state) over the number of params (AdamW: 8).

Each implementation runs in its own fresh subprocess (``--worker``), in the order AdamW,
functim, adapter, kron_torch, AdamW again; the ratio uses the faster AdamW time.

How to run
----------
kron_torch is installed in the benchmark's own environment, never vendored::

    pip install --target /tmp/kronref --no-deps kron-torch==0.3.3 opt-einsum
    cd /work/main && python benchmarks/matrix_step_time.py --section kron \\
        --kron-torch-path /tmp/kronref                      # CPU, all 12 blocks
    python benchmarks/matrix_step_time.py --section kron --device cuda --steps 20

On CPU a full GPT-2-small Kron step costs about a TFLOP of float32 matmuls (the triangular
factors of every 768/2304/3072 dim), i.e. seconds per step; use ``--blocks`` and few steps there.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from step_time import _register_adapters, case_shapes, load_average  # noqa: E402

import functim as ft  # noqa: E402

RESULT_TAG = "RESULT_JSON:"
KRON_IMPLS = ("adamw-fused", "functim", "functim-adapter", "kron_torch", "kron_torch-eager")
KRON_KW = dict(lr=3e-4, weight_decay=0.1, preconditioner_update_probability=0.5)


def gpt2_shapes(blocks: int, exclude: tuple[str, ...] = ()) -> list[tuple[str, tuple[int, ...]]]:
    shapes = case_shapes("A")
    keep = tuple(f"h.{i}." for i in range(blocks))
    return [(n, s) for n, s in shapes
            if (not n.startswith("h.") or n.startswith(keep)) and n not in exclude]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors
               if isinstance(t, torch.Tensor) and t.numel() > 1 and t.dtype != torch.uint8)


def kron_worker(impl: str, blocks: int, device: str, steps: int, warmup: int,
                exclude: tuple[str, ...]) -> dict:
    dev = torch.device(device)
    shapes = gpt2_shapes(blocks, exclude)
    gen = torch.Generator().manual_seed(0)
    params = {n: torch.randn(s, generator=gen).mul_(0.02).to(dev) for n, s in shapes}
    grads = {n: torch.randn(s, generator=gen).mul_(1e-2).to(dev) for n, s in shapes}
    n_params = sum(p.numel() for p in params.values())
    times: list[tuple[float, bool]] = []

    if impl == "functim":
        opt = ft.kron(**KRON_KW)
        state = opt.init_state(params)

        def step() -> bool:
            nonlocal params, state
            before = int(state["precond_updates"])
            params, state = opt.update(params, grads, state, donate=True)
            return int(state["precond_updates"]) != before

        def state_tensors():
            return [x for q in state["Q"].values() for x in q] + list(
                state["momentum_buffer"].values())
    else:
        tparams = [torch.nn.Parameter(p) for p in params.values()]
        for p, g in zip(tparams, grads.values()):
            p.grad = g
        if impl == "adamw-fused":
            topt = torch.optim.AdamW(tparams, lr=3e-4, weight_decay=0.1, fused=True)
        elif impl == "functim-adapter":
            _register_adapters()
            from functim.adapters import Kron
            topt = Kron(list(zip(params, tparams)), **KRON_KW)
        elif impl in ("kron_torch", "kron_torch-eager"):
            from kron_torch import Kron as RefKron
            if not torch.backends.opt_einsum.is_available():
                raise RuntimeError("opt_einsum is not importable: kron_torch needs it")
            topt = RefKron(tparams, **KRON_KW)
        else:
            raise ValueError(impl)

        def step() -> bool:
            with contextlib.redirect_stdout(io.StringIO()):  # kron_torch prints buffer sizes
                topt.step()
            if impl.startswith("kron_torch"):
                return int(topt._update_counter) == 0
            if impl == "functim-adapter":
                return int(topt.state[tparams[0]]["update_counter"]) == 0
            return False

        def state_tensors():
            out = []
            for s in topt.state.values():
                for v in s.values():
                    out += list(v) if isinstance(v, (list, tuple)) else [v]
            return out

    for i in range(warmup + steps):
        _sync(dev)
        t0 = time.perf_counter()
        updated = step()
        _sync(dev)
        if i >= warmup:
            times.append((time.perf_counter() - t0, updated))
    ordinary = [t for t, u in times if not u]
    update = [t for t, u in times if u]
    return {
        "impl": impl, "n_params": n_params, "n_tensors": len(shapes),
        "ordinary_ms": statistics.median(ordinary) * 1e3 if ordinary else None,
        "update_ms": statistics.median(update) * 1e3 if update else None,
        "n_ordinary": len(ordinary), "n_update": len(update),
        "state_bytes_per_param": _state_bytes(state_tensors()) / n_params,
        "threads": torch.get_num_threads(),
    }


def spawn(args: list[str], extra_path: str | None = None, eager: bool = False) -> dict:
    """This script with ``args`` in a fresh process. ``extra_path`` goes on PYTHONPATH, so that
    torch sees opt_einsum from there when it is imported (kron_torch's einsums need it:
    without it torch contracts left to right and forms a Kronecker product of the factors)."""
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    if eager:
        env["TORCHDYNAMO_DISABLE"] = "1"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    err = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return {"error": err}


def _fmt(x: float | None, unit: str = "") -> str:
    return "–" if x is None else f"{x:.1f}{unit}"


def kron_main(args) -> int:
    common = ["--section", "kron", "--blocks", str(args.blocks), "--device", args.device,
              "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.exclude:
        common += ["--exclude", args.exclude]
    print(f"torch {torch.__version__}; device {args.device}; cpus {os.cpu_count()}; "
          f"GPT-2 small shapes with {args.blocks} of 12 blocks; {args.warmup} warmup + "
          f"{args.steps} timed steps; Kron kwargs {KRON_KW}"
          + (f"; excluded: {args.exclude}" if args.exclude else ""))
    results = {}
    order = ["adamw-fused", "functim", "functim-adapter", "kron_torch", "kron_torch-eager",
             "adamw-fused"]
    for k, impl in enumerate(order):
        r = spawn(["--worker", impl, *common], args.kron_torch_path,
                  eager=impl == "kron_torch-eager")
        key = impl if k < len(order) - 1 else "adamw-fused-2"
        results[key] = r
        status = r.get("error") or (f"ordinary {_fmt(r['ordinary_ms'])} ms, update "
                                    f"{_fmt(r['update_ms'])} ms")
        print(f"  {impl:<16} {status}  [load {load_average()}]", flush=True)
    adam = [r["ordinary_ms"] for k, r in results.items()
            if k.startswith("adamw") and "error" not in r]
    ref = min(adam) if adam else None
    first = next((r for r in results.values() if "error" not in r), {})
    print(f"\n{first.get('n_tensors')} tensors, {first.get('n_params', 0):,} params, "
          f"float32; torch.optim.AdamW(fused=True) {_fmt(ref)} ms/step (faster of two runs)\n")
    print("| impl | ordinary ms | update ms | ordinary x fused AdamW | update x fused AdamW "
          "| state B/param |")
    print("|---|---:|---:|---:|---:|---:|")
    for impl in KRON_IMPLS:
        r = results.get(impl, {})
        if "error" in r:
            print(f"| {impl} | FAILED: {r['error']} | | | | |")
            continue
        o, u = r.get("ordinary_ms"), r.get("update_ms")
        ratio = (lambda x: "–" if x is None or not ref else f"{x / ref:.1f}")
        print(f"| {impl} | {_fmt(o)} | {_fmt(u)} | {ratio(o)} | {ratio(u)} "
              f"| {r['state_bytes_per_param']:.2f} |")
    return 0


SECTIONS = {"kron": kron_main}
WORKERS = {"kron": kron_worker}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--section", choices=sorted(SECTIONS), default="kron")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--kron-torch-path", default=None,
                    help="a pip --target folder holding kron-torch and opt-einsum (put on the "
                         "workers' PYTHONPATH)")
    ap.add_argument("--exclude", default="", help="comma-separated param names to leave out")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        exclude = tuple(x for x in args.exclude.split(",") if x)
        res = WORKERS[args.section](args.worker, args.blocks, args.device, args.steps,
                                    args.warmup, exclude)
        print(RESULT_TAG + json.dumps(res))
        return 0
    return SECTIONS[args.section](args)


if __name__ == "__main__":
    raise SystemExit(main())
