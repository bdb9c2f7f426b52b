"""Every functim optimizer timed on one device (a GPU: ``--device cuda``), in one run.

Tables (printed as they are made, and written to ``--out DIR`` as ``gpu_bench.md`` with the raw
figures in ``gpu_bench.json``, rewritten after each table so that a run stopped early keeps them):

- **References**: the device, its memory bandwidth (the faster of ``dst.copy_(src)`` counted at 8
  bytes per float32 element and ``dst.add_(src)`` at 12, over as many elements as the shape set
  has params) and its bfloat16 matmul rate (``n x n @ n x n``, ``--matmul-size``).
- **Step time** per shape set (``--shapes``: ``gpt2-small``, 124M params in 148 tensors, the
  shapes of ``step_time.py``'s case A; ``gpt-1b``, the same layout at d=2048, 18 layers, 1.01B;
  ``tiny`` for smoke runs): per optimizer (each with its defaults but where ``ROWS`` says), the
  median ms/step of the functional update eager (``donate=True``), of
  ``torch.compile``'d update (donated, else pure; its first call, the compile, is timed apart)
  and of the ``functim.adapters`` torch.optim step; each against
  ``torch.optim.AdamW(fused=True)`` on the same params (``x fused``), and the compiled time
  against the floor ``bytes/param x params / bandwidth`` for the elementwise optimizers
  (``compiled/floor``; targets: ``adapters.AdamW`` at most 1.05x fused, every elementwise row
  compiled at most 1.3x its floor). SOAP's and Kron's preconditioner work comes every 10th step
  (SOAP's ``precondition_frequency=10``, Kron's ``preconditioner_update_probability=0.1``), so
  their rows also give the mean over the timed steps. Matrix optimizers' bytes give no floor.
- **Newton–Schulz**: Muon's orthogonalisation of the shape set's hidden matrices (batched per
  shape, as Muon does), bfloat16 (its CUDA default), eager and compiled: TFLOP/s (5 iterations
  of ``A = XXᵀ; X = aX + (bA + cA²)X``, ``4m²n + 2m³`` flops each for ``m <= n``) against the
  bfloat16 matmul rate above (target: 70% on GPT-2's MLP shapes), and the rate of ``XXᵀ`` alone at
  the same shape.
- **Peers**: SOAP against ``pytorch_optimizer.SOAP`` and Kron against ``kron_torch.Kron`` (as
  shipped) on GPT-2-small shapes: functim's functional update and adapter, and the peer, mean and
  median ms/step. Kron leaves out ``wte.weight``: kron_torch cannot precondition it (see
  ``matrix_step_time.py``). A peer that does not import is reported "not installed"; neither is
  a dependency of functim (``pip install pytorch_optimizer kron-torch`` beforehand).

Timing: every call is timed on its own (``time.perf_counter`` between device synchronisations),
after ``--warmup`` untimed calls; medians unless a column says mean. Everything is timed in this
one process, the rows one after another, each on fresh params and state. Compiling a 148-tensor
update takes tens of seconds, so first ``--precompile-workers`` processes (4 on CUDA, as many as
the device's free memory holds) compile the rows' updates in parallel, filling inductor's
on-disk caches, from which this process's own compiles then load them; the ``compile s`` column
is that second, cached compile. ``--budget-s`` skips the remaining measurements, reported
"skipped (time budget)", once the run has taken that long; so the measurements go in the order
of the targets: on the first shape set every row eager and as an adapter, the elementwise rows
compiled, Newton–Schulz, the peers, the matrix optimizers compiled; then the next shape set.

How to run::

    python benchmarks/gpu_bench.py --device cuda --out /tmp/gpu      # all tables, GPT-2 + 1B
    python benchmarks/gpu_bench.py --device cuda --shapes gpt2-small --only adamw,lion
    python benchmarks/gpu_bench.py --device cpu --shapes tiny --compile-backend eager --out /tmp/x

``benchmarks/gpu_check.sh`` runs this after the CUDA tests, within a time budget.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from step_time import _register_adapters, gpt_shapes, markdown_table  # noqa: E402

import functim as ft  # noqa: E402

_register_adapters()
from functim import adapters  # noqa: E402

Shapes = list[tuple[str, tuple[int, ...]]]


# -- shape sets -------------------------------------------------------------------------------
SHAPE_SETS: dict[str, Callable[[], Shapes]] = {
    "gpt2-small": lambda: gpt_shapes(50257, 1024, 768, 12),
    "gpt-1b": lambda: gpt_shapes(50304, 2048, 2048, 18),
    "tiny": lambda: gpt_shapes(64, 16, 16, 2),
}


def numel(shapes: Shapes) -> int:
    return sum(math.prod(s) for _, s in shapes)


# -- the optimizers ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One optimizer: its functional constructor, its adapter, its least float32 traffic."""

    name: str
    build: Callable[[], ft.Optimizer]
    adapter: Callable[[list], torch.optim.Optimizer]
    # bytes/param of one step, each tensor read (r) or read and written (rw) once, as in
    # step_time.py; None for the matrix optimizers, whose matmuls, not bytes, set the time
    bytes_formula: str | None
    traceable: bool = True  # Kron's update is torch.compiler.disable'd (host control flow)

    @property
    def bytes_per_param(self) -> int | None:
        if self.bytes_formula is None:
            return None
        return sum(int(term.split()[-1]) for term in self.bytes_formula.split("+"))


ADAM_BYTES = "p rw 8 + g r 4 + m rw 8 + v rw 8"
KRON_OPTIONS = {"preconditioner_update_probability": 0.1}  # the preconditioner every 10th step
ROWS: list[Row] = [
    Row("adamw", ft.adamw, adapters.AdamW, ADAM_BYTES),
    Row("sgd", lambda: ft.sgd(momentum=0.9), lambda ps: adapters.SGD(ps, momentum=0.9),
        "p rw 8 + g r 4 + buf rw 8"),
    Row("nadamw", ft.nadamw, adapters.NAdamW, ADAM_BYTES),
    Row("cautious_adamw", ft.cautious_adamw, adapters.CautiousAdamW,
        ADAM_BYTES + " + count pass (m, g) r 8"),
    Row("cautious_lion", ft.cautious_lion, adapters.CautiousLion,
        "p rw 8 + g r 4 + m rw 8 + count pass (m, g) r 8"),
    Row("lion", ft.lion, adapters.Lion, "p rw 8 + g r 4 + m rw 8"),
    Row("signsgd", ft.signsgd, adapters.SignSGD, "p rw 8 + g r 4"),
    Row("signum", ft.signum, adapters.Signum, "p rw 8 + g r 4 + m rw 8"),
    Row("mars", ft.mars, adapters.Mars,
        ADAM_BYTES + " + last_grad rw 8 + norm pass (g, last_grad) r 8"),
    Row("schedule_free_adamw", ft.schedule_free_adamw, adapters.ScheduleFreeAdamW,
        "p(y) rw 8 + g r 4 + z rw 8 + v rw 8"),
    # a step without a new Hessian estimate reads h; an estimate step also writes it
    Row("sophia", ft.sophia, adapters.Sophia, "p rw 8 + g r 4 + m rw 8 + h r 4"),
    Row("muon", ft.muon, adapters.Muon, None),
    Row("scion", ft.scion, adapters.Scion, None),
    Row("soap", ft.soap, adapters.Soap, None),
    Row("kron", lambda: ft.kron(**KRON_OPTIONS), lambda ps: adapters.Kron(ps, **KRON_OPTIONS),
        None, traceable=False),
]
ROW_NAMES = [r.name for r in ROWS]


# -- timing -----------------------------------------------------------------------------------
class Run:
    """The run's device, step counts and time budget, and the tables made so far."""

    def __init__(self, args: argparse.Namespace):
        self.device = torch.device(args.device)
        self.steps, self.warmup = args.steps, args.warmup
        self.compile_backend = args.compile_backend
        self.precompile_workers = args.precompile_workers
        self.budget_s = args.budget_s
        self.out = pathlib.Path(args.out) if args.out else None
        self.start = time.monotonic()
        self.tables: dict[str, str] = {}  # key -> markdown, in the order first added
        self.results: dict = {}
        self.errors: list[str] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def over_budget(self) -> bool:
        return self.budget_s is not None and self.elapsed() > self.budget_s

    def time_calls(self, fn: Callable[[], object], warmup: int | None = None) -> dict:
        """Median, mean and min ms of ``self.steps`` calls of ``fn``, each timed on its own
        between device synchronisations, after ``warmup`` (default ``self.warmup``) calls."""
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        times = []
        for _ in range(self.steps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
                "min_ms": min(times)}

    def add_table(self, key: str, title: str, table: str, results) -> None:
        """Print a table (new, or ``key``'s again with more in it) and rewrite the output files
        with everything so far."""
        text = f"## {title}\n\n{table}\n"
        print("\n" + text, flush=True)
        self.tables[key] = text
        self.results[key] = results
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "gpu_bench.md").write_text("\n".join(self.tables.values()))
            (self.out / "gpu_bench.json").write_text(json.dumps(self.results, indent=1))

    def release(self) -> None:
        """Free what the last measurement left (dynamo's caches, the device allocator's)."""
        torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30


def random_tensors(shapes: Shapes, seed: int, scale: float, device) -> dict[str, torch.Tensor]:
    """Seeded normal tensors, drawn on the CPU (the same values on every device)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen).mul_(scale).to(device) for n, s in shapes}


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _error_text(e: BaseException) -> str:
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


# -- references -------------------------------------------------------------------------------
def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
                f"compute capability {p.major}.{p.minor}); torch {torch.__version__}, CUDA "
                f"{torch.version.cuda}")
    return (f"{device.type}: {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads; torch {torch.__version__}")


def measure_bandwidth(run: Run, n: int) -> dict:
    """GB/s of ``copy_`` (8 bytes per float32 element) and ``add_`` (12) over ``n`` elements;
    ``gbps`` is the higher (the stricter floor)."""
    src = torch.rand(n, device=run.device)
    dst = torch.empty_like(src)
    out: dict = {"numel": n}
    for name, nbytes, op in (("copy_", 8, lambda: dst.copy_(src)),
                             ("add_", 12, lambda: dst.add_(src))):
        t = run.time_calls(op, warmup=2)
        out[name] = {**t, "gbps": nbytes * n / (t["median_ms"] / 1e3) / 1e9}
    out["gbps"] = max(out["copy_"]["gbps"], out["add_"]["gbps"])
    return out


def measure_matmul(run: Run, size: int) -> dict:
    """TFLOP/s of a bfloat16 ``size x size @ size x size`` product (2·size³ flops)."""
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.randn(size, size, generator=gen).to(run.device, torch.bfloat16)
            for _ in range(2))
    t = run.time_calls(lambda: a @ b, warmup=3)
    return {"size": size, **t, "tflops": 2 * size**3 / (t["median_ms"] / 1e3) / 1e12}


def references_section(run: Run, matmul_size: int, n_bandwidth: int) -> dict:
    bw = measure_bandwidth(run, n_bandwidth)
    run.release()
    mm = measure_matmul(run, matmul_size)
    run.release()
    refs = {"device": device_description(run.device), "bandwidth": bw, "matmul_bf16": mm}
    rows = [["device", refs["device"]],
            ["memory bandwidth", f"{bw['gbps']:.1f} GB/s (copy_ {bw['copy_']['gbps']:.1f} at 8 "
                                 f"B/elem, add_ {bw['add_']['gbps']:.1f} at 12 B/elem, "
                                 f"{n_bandwidth:,} float32)"],
            ["bfloat16 matmul", f"{mm['tflops']:.1f} TFLOP/s ({matmul_size}^3, "
                                f"{mm['median_ms']:.3f} ms)"]]
    run.add_table("references", "References", markdown_table(rows, ["what", "measured"], 2),
                  refs)
    return refs


# -- step time --------------------------------------------------------------------------------
class ShapeSet:
    """A shape set's params and gradients on the device, made once and shared by the rows
    (each row steps its own copy of the params; the gradients are only read)."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.shapes = name, SHAPE_SETS[name]()
        self.numel = numel(self.shapes)
        self.params = random_tensors(self.shapes, 0, 0.02, device)
        self.grads = random_tensors(self.shapes, 1, 1e-3, device)

    def without(self, names: tuple[str, ...]) -> ShapeSet:
        """The same tensors less those named."""
        sub = ShapeSet.__new__(ShapeSet)
        sub.name = self.name
        sub.shapes = [(n, s) for n, s in self.shapes if n not in names]
        sub.numel = numel(sub.shapes)
        sub.params = {n: self.params[n] for n, _ in sub.shapes}
        sub.grads = {n: self.grads[n] for n, _ in sub.shapes}
        return sub

    def fresh_params(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.params.items()}

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Fresh ``nn.Parameter`` copies with their ``.grad`` set, for torch.optim classes."""
        named = [(k, torch.nn.Parameter(v)) for k, v in self.fresh_params().items()]
        for k, p in named:
            p.grad = self.grads[k]
        return named


def time_functional(run: Run, row: Row, data: ShapeSet) -> dict:
    opt = row.build()
    box = {"p": data.fresh_params()}
    box["s"] = opt.init_state(box["p"])

    def step():
        box["p"], box["s"] = opt.update(box["p"], data.grads, box["s"], donate=True)

    return {**run.time_calls(step), "peak_gb": run.peak_gb()}


def time_compiled(run: Run, row: Row, data: ShapeSet) -> dict:
    step, compile_s, form, failures = compile_row(run, row, data)
    res = run.time_calls(step, warmup=max(run.warmup - 1, 0))  # the compiling call was one
    return {**res, "compile_s": compile_s, "form": form, "failures": failures,
            "peak_gb": run.peak_gb()}


def compile_row(run: Run, row: Row, data: ShapeSet) -> tuple[Callable[[], None], float, str,
                                                              list[str]]:
    """``torch.compile`` of the row's donated update, else of its pure one, called once (the
    compile and one step, timed): ``(step, compile seconds, form, failures)``."""
    opt = row.build()
    failures = []
    for form, donate in (("donated", True), ("pure", False)):
        try:
            step, compile_s = _compile_form(run, opt, data, donate)
        except Exception as e:  # report it and try the next form
            failures.append(f"{form}: {_error_text(e)}")
            run.release()
            continue
        return step, compile_s, form, failures
    raise RuntimeError("every compiled form failed: " + "; ".join(failures))


def _compile_form(run: Run, opt: ft.Optimizer, data: ShapeSet,
                  donate: bool) -> tuple[Callable[[], None], float]:
    compiled = torch.compile(lambda p, g, s: opt.update(p, g, s, donate=donate),
                             backend=run.compile_backend)
    box = {"p": data.fresh_params()}
    box["s"] = opt.init_state(box["p"])

    def step():
        box["p"], box["s"] = compiled(box["p"], data.grads, box["s"])

    run.sync()
    t0 = time.perf_counter()
    step()
    run.sync()
    return step, time.perf_counter() - t0


def time_adapter(run: Run, row: Row, data: ShapeSet) -> dict:
    opt = row.adapter(data.named_parameters())
    return {**run.time_calls(opt.step), "peak_gb": run.peak_gb()}


def time_torch_adamw(run: Run, data: ShapeSet, **flags) -> dict:
    opt = torch.optim.AdamW([p for _, p in data.named_parameters()], **flags)
    return {**run.time_calls(opt.step), "peak_gb": run.peak_gb()}


def measure(run: Run, what: str, fn: Callable[[], dict]) -> dict:
    """``fn()``'s result, or why there is none (an error, the time budget); freed after."""
    if run.over_budget():
        return {"skipped": "time budget"}
    run.release()
    try:
        res = fn()
    except Exception as e:  # one failing row must not end the run
        res = {"error": _error_text(e)}
        run.errors.append(f"{what}: {res['error']}")
        print(f"  {what}: {res['error']}", flush=True)
    run.release()
    if "median_ms" in res:
        print(f"  {what}: median {res['median_ms']:.3f} ms  [{run.elapsed():.0f} s]", flush=True)
    return res


def measure_eager(run: Run, data: ShapeSet, rows: list[Row]) -> dict:
    """torch's AdamW, then every row eager and as an adapter."""
    results = {"torch-fused": measure(run, "torch.optim.AdamW(fused=True)",
                                      lambda: time_torch_adamw(run, data, fused=True)),
               "torch-foreach": measure(run, "torch.optim.AdamW(foreach=True)",
                                        lambda: time_torch_adamw(run, data, foreach=True))}
    for row in rows:
        results[row.name] = {
            "eager": measure(run, f"{row.name} eager",
                             lambda r=row: time_functional(run, r, data)),
            "adapter": measure(run, f"{row.name} adapter",
                               lambda r=row: time_adapter(run, r, data)),
            "compiled": {"skipped": "not traceable"} if not row.traceable else
                        {"skipped": "not asked for"}}
    return results


def measure_compiled(run: Run, data: ShapeSet, rows: list[Row], results: dict) -> None:
    """The compiled update of each of ``rows`` into ``results``."""
    for row in rows:
        results[row.name]["compiled"] = measure(run, f"{row.name} compiled",
                                                lambda r=row: time_compiled(run, r, data))


def _cell(res: dict, key: str = "median_ms", digits: int = 2) -> str:
    if "error" in res:
        return "failed"
    if "skipped" in res:
        return f"skipped ({res['skipped']})"
    return _fmt(res.get(key), digits)


def _ratio(res: dict, ref: float | None) -> str:
    if ref is None or "median_ms" not in res:
        return "–"
    return f"{res['median_ms'] / ref:.2f}"


def floor_ms(row: Row, data: ShapeSet, gbps: float | None) -> float | None:
    """The time to move the row's bytes/param for every param at the measured bandwidth."""
    if row.bytes_per_param is None or not gbps:
        return None
    return row.bytes_per_param * data.numel / (gbps * 1e9) * 1e3


STEP_HEADER = ["optimizer", "bytes/param", "eager ms", "eager mean ms", "adapter ms",
               "compiled ms", "eager x fused", "adapter x fused", "compiled x fused",
               "floor ms", "compiled/floor", "compile s", "peak GiB"]


def step_table(rows: list[Row], data: ShapeSet, results: dict, gbps: float | None) -> str:
    fused = results["torch-fused"].get("median_ms")
    table = []
    for label, key in (("torch.optim.AdamW(fused=True)", "torch-fused"),
                       ("torch.optim.AdamW(foreach=True)", "torch-foreach")):
        r = results[key]
        table.append([label, "28", "–", "–", _cell(r), "–", "–", _ratio(r, fused), "–", "–",
                      "–", "–", _fmt(r.get("peak_gb"))])
    for row in rows:
        r = results[row.name]
        e, a, c = r["eager"], r["adapter"], r["compiled"]
        floor = floor_ms(row, data, gbps)
        over_floor = (c["median_ms"] / floor) if floor and "median_ms" in c else None
        peaks = [x.get("peak_gb") for x in (e, a, c) if x.get("peak_gb") is not None]
        table.append([row.name, str(row.bytes_per_param or "matmuls"), _cell(e),
                      _cell(e, "mean_ms"), _cell(a), _cell(c), _ratio(e, fused),
                      _ratio(a, fused), _ratio(c, fused), _fmt(floor), _fmt(over_floor),
                      _fmt(c.get("compile_s"), 1), _fmt(max(peaks) if peaks else None)])
    return markdown_table(table, STEP_HEADER, 1)


# -- compiling in parallel first --------------------------------------------------------------
# device memory one precompiling process may take per param: params, gradients, the copy it
# steps and the largest state (MARS: 3 buffers), float32, with room for temporaries
PRECOMPILE_BYTES_PER_PARAM = 48


def precompile(run: Run, set_name: str, names: list[str]) -> dict:
    """Compile the updates of ``names`` in parallel processes (this script with
    ``--precompile-only``) before this process times them: they fill inductor's on-disk caches
    (FX graphs, AOTAutograd, Triton kernels), and this process's compile of the same graph then
    loads the result instead of lowering it again. Skipped without 2 workers and 2 updates."""
    workers = run.precompile_workers
    if run.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(run.device)
        fit = int(0.8 * free // (numel(SHAPE_SETS[set_name]()) * PRECOMPILE_BYTES_PER_PARAM))
        workers = min(workers, fit)
    if workers < 2 or len(names) < 2:
        return {"workers": 0}
    chunks = [names[i::workers] for i in range(min(workers, len(names)))]
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or 1)
                                                                   // len(chunks)))}
    start = time.monotonic()
    procs = []
    for chunk in chunks:
        log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--precompile-only",
               ",".join(chunk), "--shapes", set_name, "--device", str(run.device),
               "--compile-backend", run.compile_backend]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    try:
        exits = [_wait(run, proc, log) for proc, log in procs]
    finally:  # stopped from outside (see warm_caches): take the workers along
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    res = {"workers": len(chunks), "rows": chunks, "seconds": time.monotonic() - start,
           "exits": exits}
    print(f"  precompiled {len(names)} updates in {len(chunks)} processes, "
          f"{res['seconds']:.0f} s: {exits}  [{run.elapsed():.0f} s]", flush=True)
    return res


def _wait(run: Run, proc: subprocess.Popen, log) -> str:
    """How a precompiling process ended (stopped when the time budget runs out)."""
    left = None if run.budget_s is None else max(1.0, run.budget_s - run.elapsed())
    try:
        code = proc.wait(timeout=left)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "stopped (time budget)"
    log.seek(0)
    tail = log.read().strip().splitlines()[-1:] if code else []
    log.close()
    return "ok" if code == 0 else f"exit {code}: {tail[0][:200] if tail else ''}"


def precompile_main(args: argparse.Namespace) -> int:
    """A precompiling process: compile (and call once) each row of ``--precompile-only``."""
    run = Run(args)
    data = ShapeSet(args.shapes.split(",")[0], run.device)
    failed = []
    for row in ROWS:
        if row.name in args.precompile_only.split(","):
            try:
                compile_row(run, row, data)
            except Exception as e:  # the timing process reports it; go on with the others
                failed.append(f"{row.name}: {_error_text(e)}")
            run.release()
    print("\n".join(failed) or "all compiled")
    return 1 if failed else 0


class StepTime:
    """One shape set's step-time table, measured in phases (eager, then compiled rows in the
    order ``main`` asks for them) and printed again, fuller, after each."""

    def __init__(self, run: Run, set_name: str, rows: list[Row], compiled: set[str],
                 left_out: list[str]):
        self.run, self.set_name, self.rows, self.left_out = run, set_name, rows, left_out
        self.to_compile = [r for r in rows if r.traceable and r.name in compiled]
        self.precompiled = (precompile(run, set_name, [r.name for r in self.to_compile])
                            if not run.over_budget() else {"workers": 0})
        self.data = ShapeSet(set_name, run.device)
        self.bandwidth = measure_bandwidth(run, self.data.numel)
        run.release()
        self.results: dict = {}

    def measure_eager(self) -> None:
        self.results = measure_eager(self.run, self.data, self.rows)
        self.results.update(bandwidth=self.bandwidth, numel=self.data.numel,
                            precompile=self.precompiled)
        self.emit()

    def measure_compiled(self, which: Callable[[Row], bool]) -> None:
        rows = [r for r in self.to_compile if which(r)]
        if rows:
            measure_compiled(self.run, self.data, rows, self.results)
            self.emit()

    def emit(self) -> None:
        gbps = self.bandwidth["gbps"]
        title = (f"Step time, {self.set_name}: {len(self.data.shapes)} tensors, "
                 f"{self.data.numel:,} float32 params; {self.run.warmup} warmup + "
                 f"{self.run.steps} timed steps; bandwidth {gbps:.1f} GB/s"
                 + (f" ({', '.join(self.left_out)}: first shape set only)"
                    if self.left_out else ""))
        notes = ("\n\nms: median per step (eager mean: the mean, which counts SOAP's and Kron's "
                 "preconditioner steps at their rate); the torch.optim rows' steps are under "
                 "adapter ms; x fused: over torch.optim.AdamW(fused=True) on the same params; "
                 "floor: bytes/param x params at the bandwidth (elementwise optimizers only); "
                 "compile s: this process's compile (from the caches where precompiled); peak "
                 "GiB: device memory, params and gradients included.")
        table = step_table(self.rows, self.data, self.results, gbps) + notes
        failures = [f"- {name}: {self.results[name]['error']}"
                    for name in ("torch-fused", "torch-foreach") if "error" in self.results[name]]
        failures += [f"- {row.name} {mode}: {self.results[row.name][mode]['error']}"
                     for row in self.rows for mode in ("eager", "adapter", "compiled")
                     if "error" in self.results[row.name][mode]]
        if failures:
            table += "\n\nFailures:\n" + "\n".join(failures)
        self.run.add_table(f"step_time/{self.set_name}", title, table, self.results)

    def close(self) -> None:
        del self.data
        self.run.release()


# -- Newton–Schulz ------------------------------------------------------------------------------
NS_STEPS = 5


def hidden_matrices(shapes: Shapes) -> dict[tuple[int, int], int]:
    """How many of the shape set's hidden matrices (the ones Muon orthogonalises: 2-D, inside a
    block) there are of each shape."""
    counts: dict[tuple[int, int], int] = {}
    for name, shape in shapes:
        if name.startswith("h.") and len(shape) == 2:
            counts[shape] = counts.get(shape, 0) + 1
    return counts


def ns_flops(batch: int, rows: int, cols: int, steps: int = NS_STEPS) -> int:
    """Flops of ``steps`` quintic iterations on ``batch`` matrices (``m = min``, ``n = max``
    side): ``A = XXᵀ`` 2m²n, ``A·A`` 2m³, ``(bA + cA²)·X`` 2m²n."""
    m, n = min(rows, cols), max(rows, cols)
    return batch * steps * (4 * m * m * n + 2 * m**3)


def time_newton_schulz(run: Run, batch: int, shape: tuple[int, int], compiled: bool) -> dict:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, *shape, generator=gen).to(run.device, torch.bfloat16)
    fn = lambda: ft.orthogonalize(x, steps=NS_STEPS, dtype=torch.bfloat16)  # noqa: E731
    if compiled:
        fn = torch.compile(fn, backend=run.compile_backend)
    res = run.time_calls(fn, warmup=max(run.warmup, 2))
    return {**res, "tflops": ns_flops(batch, *shape) / (res["median_ms"] / 1e3) / 1e12}


def time_gram(run: Run, batch: int, shape: tuple[int, int]) -> dict:
    """``XXᵀ`` alone (the smaller Gram matrix) at the same shape: the matmul rate those shapes
    allow, which the iteration's rate can be read against."""
    m, n = min(shape), max(shape)
    x = torch.randn(batch, m, n, device=run.device, dtype=torch.bfloat16)
    res = run.time_calls(lambda: x @ x.mT, warmup=3)
    return {**res, "tflops": 2 * batch * m * m * n / (res["median_ms"] / 1e3) / 1e12}


def measure_newton_schulz(run: Run, key: str, batch: int, shape: tuple[int, int],
                          compile_: bool) -> dict:
    res = {"eager": measure(run, f"Newton–Schulz {key} eager",
                            lambda: time_newton_schulz(run, batch, shape, False)),
           "compiled": (measure(run, f"Newton–Schulz {key} compiled",
                                lambda: time_newton_schulz(run, batch, shape, True))
                        if compile_ else {"skipped": "not asked for"})}
    res["gram"] = measure(run, f"XXᵀ {key}", lambda: time_gram(run, batch, shape))
    return res


def newton_schulz_section(run: Run, set_name: str, matmul_tflops: float | None,
                          compile_: bool) -> dict:
    results, table = {}, []
    for shape, batch in hidden_matrices(SHAPE_SETS[set_name]()).items():
        key = f"{batch}x{shape[0]}x{shape[1]}"
        results[key] = res = measure_newton_schulz(run, key, batch, shape, compile_)
        cells = [key, f"{ns_flops(batch, *shape) / 1e9:.1f}"]
        for mode in ("eager", "compiled"):
            r = res[mode]
            share = (f"{100 * r['tflops'] / matmul_tflops:.0f}%"
                     if "tflops" in r and matmul_tflops else "–")
            cells += [_cell(r, digits=3), _fmt(r.get("tflops"), 1), share]
        cells.append(_fmt(res["gram"].get("tflops"), 1))
        table.append(cells)
    header = ["batch x rows x cols", "GFLOP", "eager ms", "eager TFLOP/s", "eager % matmul",
              "compiled ms", "compiled TFLOP/s", "compiled % matmul", "XXᵀ alone TFLOP/s"]
    title = (f"Newton–Schulz (bfloat16, {NS_STEPS} iterations) on {set_name}'s hidden "
             f"matrices; % of the {_fmt(matmul_tflops, 1)} TFLOP/s bfloat16 matmul rate")
    run.add_table(f"newton_schulz/{set_name}", title, markdown_table(table, header, 1), results)
    return results


# -- peers: SOAP and Kron against their reference implementations --------------------------------
@dataclass(frozen=True)
class Peer:
    """An optimizer (``ft.<name>``, ``functim.adapters.<adapter_class>``) and its reference
    implementation (``<module>.<reference_class>``), all built with ``options``."""

    name: str
    adapter_class: str
    module: str
    pip_name: str
    reference_class: str
    options: dict
    exclude: tuple[str, ...] = ()

    def row(self) -> Row:
        return Row(self.name, lambda: getattr(ft, self.name)(**self.options),
                   lambda ps: getattr(adapters, self.adapter_class)(ps, **self.options), None)


SOAP_OPTIONS = dict(lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10)
KRON_PEER_OPTIONS = dict(lr=3e-4, **KRON_OPTIONS)
PEERS = [
    Peer("soap", "Soap", "pytorch_optimizer", "pytorch_optimizer", "SOAP", SOAP_OPTIONS),
    # kron_torch's compiled einsum for wte (50257x768) asks for a 118.6 GB intermediate
    Peer("kron", "Kron", "kron_torch", "kron-torch", "Kron", KRON_PEER_OPTIONS,
         exclude=("wte.weight",)),
]


def measure_peer(run: Run, peer: Peer, data: ShapeSet) -> dict:
    row = peer.row()
    return {"functim": measure(run, f"{peer.name} functim",
                               lambda: time_functional(run, row, data)),
            "adapter": measure(run, f"{peer.name} adapter", lambda: time_adapter(run, row, data)),
            "peer": measure(run, f"{peer.name} {peer.module}", lambda: time_peer(run, peer, data))}


def peers_section(run: Run, set_name: str) -> dict:
    data = ShapeSet(set_name, run.device)
    results, table = {}, []
    for peer in PEERS:
        sub = data.without(peer.exclude)
        results[peer.name] = res = measure_peer(run, peer, sub)
        labels = {"functim": f"ft.{peer.name} (functional, donated)",
                  "adapter": f"functim.adapters.{peer.adapter_class}",
                  "peer": f"{peer.module}.{peer.reference_class}"}
        for impl, label in labels.items():
            r = res[impl]
            table.append([peer.name, label, f"{sub.numel:,}", _cell(r), _cell(r, "mean_ms"),
                          _fmt(r.get("peak_gb"))])
    header = ["optimizer", "implementation", "params", "median ms", "mean ms", "peak GiB"]
    title = (f"SOAP and Kron against their peers, {set_name} (Kron without wte.weight); "
             f"SOAP {SOAP_OPTIONS}, Kron {KRON_PEER_OPTIONS}")
    run.add_table(f"peers/{set_name}", title, markdown_table(table, header, 2), results)
    del data
    run.release()
    return results


def time_peer(run: Run, peer: Peer, data: ShapeSet) -> dict:
    try:
        module = importlib.import_module(peer.module)
    except ImportError:
        return {"skipped": f"not installed: pip install {peer.pip_name}"}
    opt = getattr(module, peer.reference_class)([p for _, p in data.named_parameters()],
                                                **peer.options)
    quiet = open(os.devnull, "w")  # noqa: SIM115 (closed below) -- kron_torch prints sizes
    try:
        with contextlib.redirect_stdout(quiet):
            res = run.time_calls(opt.step, warmup=max(run.warmup, 3))
    finally:
        quiet.close()
    return {**res, "peak_gb": run.peak_gb()}


# -- targets ----------------------------------------------------------------------------------
ELEMENTWISE_FLOOR_TARGET = 1.3
ADAPTER_ADAMW_TARGET = 1.05
NS_TARGET = 0.70
NS_TARGET_SHAPES = ((768, 3072), (3072, 768))  # GPT-2 small's MLP weights


def _met(ok: bool | None) -> str:
    return "–" if ok is None else ("yes" if ok else "NO")


def step_targets(set_name: str, rows: list[Row], results: dict) -> list[list[str]]:
    fused = results["torch-fused"].get("median_ms")
    adapter = results.get("adamw", {}).get("adapter", {}).get("median_ms")
    ratio = adapter / fused if adapter and fused else None
    out = [[f"adapters.AdamW <= {ADAPTER_ADAMW_TARGET}x torch fused ({set_name})",
            _fmt(ratio) + "x" if ratio else "–",
            _met(None if ratio is None else ratio <= ADAPTER_ADAMW_TARGET)]]
    gbps = results["bandwidth"]["gbps"]
    data_numel = results.get("numel")
    over, measured = [], 0
    for row in rows:
        c = results[row.name]["compiled"]
        if row.bytes_per_param is None or "median_ms" not in c or not data_numel:
            continue
        measured += 1
        r = c["median_ms"] / (row.bytes_per_param * data_numel / (gbps * 1e9) * 1e3)
        if r > ELEMENTWISE_FLOOR_TARGET:
            over.append(f"{row.name} {r:.2f}")
    expected = sum(row.bytes_per_param is not None for row in rows)
    out.append([f"elementwise compiled <= {ELEMENTWISE_FLOOR_TARGET}x floor ({set_name})",
                f"{measured - len(over)} of {expected} rows within"
                + (f"; over: {', '.join(over)}" if over else ""),
                _met(None if measured < expected else not over)])
    return out


def ns_targets(set_name: str, results: dict, matmul_tflops: float | None) -> list[list[str]]:
    out = []
    for key, res in results.items():
        shape = tuple(int(x) for x in key.split("x")[1:])
        if shape not in NS_TARGET_SHAPES or not matmul_tflops:
            continue
        for mode in ("eager", "compiled"):
            t = res[mode].get("tflops")
            share = None if t is None else t / matmul_tflops
            out.append([f"Newton–Schulz {mode} >= {NS_TARGET:.0%} of bf16 matmul ({key})",
                        "–" if share is None else f"{share:.0%}",
                        _met(None if share is None else share >= NS_TARGET)])
    return out


def peer_targets(results: dict) -> list[list[str]]:
    out = []
    for name, res in results.items():
        peer = res["peer"].get("mean_ms")
        for impl in ("functim", "adapter"):
            mine = res[impl].get("mean_ms")
            ok = None if mine is None or peer is None else mine < peer
            out.append([f"{name} ({impl}) faster than its peer (mean ms/step)",
                        f"{_fmt(mine)} vs {_fmt(peer)}" if mine or peer else "–", _met(ok)])
    return out


# -- main -------------------------------------------------------------------------------------
# SOAP's first step on the 1B set runs 36 eigh of 8192x8192 matrices, Kron's factors are as
# large: timed on gpt2-small (and against their peers there) unless --matrix-on-large
MATRIX_ONLY_SMALL = {"soap", "kron"}
SECTIONS = ("steps", "newton-schulz", "peers")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (the default) or cpu (smoke runs)")
    ap.add_argument("--shapes", default="gpt2-small,gpt-1b",
                    help=f"comma-separated shape sets, of {', '.join(SHAPE_SETS)}; the first "
                         "also gets the Newton–Schulz and peer tables")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated, of {', '.join(SECTIONS)} (the references always run)")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated optimizers, of {', '.join(ROW_NAMES)}")
    ap.add_argument("--steps", type=int, default=20, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the torch.compile'd updates (the slow part)")
    ap.add_argument("--compile-rows", default=None,
                    help="comma-separated optimizers to compile (default: every traceable one)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend (eager: dynamo only, for smoke runs)")
    ap.add_argument("--precompile-workers", type=int, default=None,
                    help="processes that compile the updates in parallel before they are timed, "
                         "filling inductor's caches (default 4 on cuda, 0 elsewhere)")
    ap.add_argument("--warm-caches", action="store_true",
                    help="only the parallel compiles, for every shape set, then exit (to run "
                         "beside other work before a run with --precompile-workers 0)")
    ap.add_argument("--precompile-only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--matmul-size", type=int, default=None,
                    help="the bfloat16 matmul probe's n (default 8192 on cuda, 256 elsewhere)")
    ap.add_argument("--matrix-on-large", action="store_true",
                    help=f"also time {', '.join(sorted(MATRIX_ONLY_SMALL))} on the shape sets "
                         "after the first")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip what is left once the run has taken this many seconds")
    ap.add_argument("--out", default=None, help="folder for gpu_bench.md and gpu_bench.json")
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available (torch {torch.__version__})")
    unknown = [s for s in args.shapes.split(",") if s not in SHAPE_SETS]
    if unknown:
        ap.error(f"unknown --shapes {unknown}; choose from {', '.join(SHAPE_SETS)}")
    args.sections = args.sections.split(",")
    if set(args.sections) - set(SECTIONS):
        ap.error(f"unknown --sections {sorted(set(args.sections) - set(SECTIONS))}")
    chosen = args.only.split(",") if args.only else ROW_NAMES
    if [n for n in chosen if n not in ROW_NAMES]:
        ap.error(f"unknown --only {chosen}; choose from {', '.join(ROW_NAMES)}")
    args.rows = [r for r in ROWS if r.name in chosen]
    args.compiled = set(args.compile_rows.split(",") if args.compile_rows else ROW_NAMES)
    if not args.compile:
        args.compiled = set()
    if args.compiled - set(ROW_NAMES):
        ap.error(f"unknown --compile-rows {sorted(args.compiled - set(ROW_NAMES))}")
    on_cuda = torch.device(args.device).type == "cuda"
    if args.matmul_size is None:
        args.matmul_size = 8192 if on_cuda else 256
    if args.precompile_workers is None:
        args.precompile_workers = 4 if on_cuda else 0
    return args


def rows_for(args: argparse.Namespace, set_index: int) -> list[Row]:
    """The rows timed on the ``set_index``-th shape set."""
    return [r for r in args.rows
            if set_index == 0 or args.matrix_on_large or r.name not in MATRIX_ONLY_SMALL]


def warm_caches(run: Run, args: argparse.Namespace, shape_sets: list[str]) -> int:
    """``--warm-caches``: the parallel compiles of every shape set, nothing timed. A SIGTERM
    ends them (and their processes) early."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    results = {}
    for i, set_name in enumerate(shape_sets):
        names = [r.name for r in rows_for(args, i) if r.traceable and r.name in args.compiled]
        results[set_name] = precompile(run, set_name, names)
    print(json.dumps(results))
    return 0 if all(e == "ok" for r in results.values() for e in r.get("exits", [])) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.precompile_only:
        return precompile_main(args)
    run = Run(args)
    shape_sets = args.shapes.split(",")
    if args.warm_caches:
        return warm_caches(run, args, shape_sets)
    print(f"gpu_bench: {device_description(run.device)}; shape sets {shape_sets}; "
          f"{args.warmup} warmup + {args.steps} timed calls", flush=True)
    refs = references_section(run, args.matmul_size, numel(SHAPE_SETS[shape_sets[0]]()))
    matmul = refs["matmul_bf16"]["tflops"]
    targets: list[list[str]] = []
    for i, set_name in enumerate(shape_sets):
        # in the order of the targets, so that a time budget leaves out the rest:
        # eager and adapter steps, the elementwise rows compiled, Newton–Schulz, the peers,
        # then the matrix optimizers compiled
        steps = None
        if "steps" in args.sections:
            rows = rows_for(args, i)
            steps = StepTime(run, set_name, rows, args.compiled,
                             [r.name for r in args.rows if r not in rows])
            steps.measure_eager()
            steps.measure_compiled(lambda r: r.bytes_per_param is not None)
        if i == 0 and "newton-schulz" in args.sections:
            ns = newton_schulz_section(run, set_name, matmul, args.compile)
            targets += ns_targets(set_name, ns, matmul)
        if i == 0 and "peers" in args.sections:
            targets += peer_targets(peers_section(run, set_name))
        if steps is not None:
            steps.measure_compiled(lambda r: r.bytes_per_param is None)
            targets += step_targets(set_name, steps.rows, steps.results)
            steps.close()
    run.add_table("targets", f"Targets (the issue's; this run, {run.elapsed():.0f} s)",
                  markdown_table(targets, ["target", "measured", "met"], 2), targets)
    for error in run.errors:
        print(f"FAILED: {error}")
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
