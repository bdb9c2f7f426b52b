"""Time one AdamW step: functim against torch.optim.AdamW, float32 on CPU.

What it measures
----------------
For each case and implementation, the wall time of ``N`` optimizer steps (after some warmup
steps), each step timed on its own with ``time.perf_counter``. Gradients are fixed random
tensors set once before timing (``p.grad`` for the torch optimizers and the adapter, a
``grads`` dict for the functional API), so only the optimizer step is timed.

Cases:

- ``A``: the parameter shapes of GPT-2 small (124M): wte 50257x768, wpe 1024x768, 12 blocks
  of (ln_1 w/b, attn.c_attn w/b, attn.c_proj w/b, ln_2 w/b, mlp.c_fc w/b, mlp.c_proj w/b),
  ln_f w/b; 148 tensors, 124,439,808 parameters. Large tensors: bandwidth bound.
- ``B``: 2000 tensors of 1000 elements. Small tensors: per-tensor overhead bound.

Implementations (all with lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1):

- ``torch-foreach``: ``torch.optim.AdamW(..., foreach=True)``;
- ``torch-fused``: ``torch.optim.AdamW(..., fused=True)``, the reference for the ratio column;
  it is always run, whatever ``--impl`` says;
- ``adapter``: ``functim.adapters.AdamW`` (a torch.optim.Optimizer, default settings);
- ``functional-pure``: ``params, state = opt.update(params, grads, state)`` (new tensors);
- ``functional-donated``: the same with ``donate=True`` (in place).

Columns:

- ``median ms`` / ``min ms``: per-step time over the timed steps;
- ``GB/s``: ``28 bytes x n_params / median``; AdamW reads p, g, m, v and writes p, m, v
  (7 float32 = 28 bytes per parameter), a lower bound on the traffic of any implementation;
- ``peak dRSS MB``: peak resident memory of the worker process during optimizer construction
  (or ``init_state``) plus all steps, minus the resident memory just before, when params and
  grads already exist. It includes the optimizer state (2 x 4 bytes per parameter for AdamW)
  and every temporary. Each implementation runs in its own fresh subprocess (this script, with
  ``--worker``), so allocator caches and heap fragmentation from one implementation never
  affect another. The peak is Linux's VmHWM, reset through ``/proc/self/clear_refs`` just before
  the measured region (falling back to ``ru_maxrss`` where that is not possible);
- ``dRSS after MB``: the resident memory after the last step minus the same baseline (what stays
  held: the state, plus freed memory that the C allocator keeps instead of returning it);
- ``x fused``: median time / median time of ``torch-fused`` on the same case in the same run
  (greater than 1 = slower than torch's fused kernel).

Each worker also sums ``|p_final - p_initial|`` over all parameters; the script warns when an
implementation's sum differs from torch-fused's by more than a relative 1e-5, i.e. when it did
not compute the same update.

``--thp-compare`` runs the ``functional-pure`` rows once more with ``THP_MEM_ALLOC_ENABLE=1`` in
the worker's environment (torch's CPU allocator then aligns large allocations to 2 MiB and
madvises them as huge pages, which matters for the allocation-heavy pure path when the kernel's
THP mode is ``madvise``).

``--optimizers``: every functional functim optimizer
-----------------------------------------------------
Times one step of each functional optimizer in :data:`OPTIMIZERS` on case ``A`` (float32
params, each optimizer's defaults except where the table says), each measurement in its own
fresh subprocess:

- eager: ``params, state = opt.update(params, grads, state, donate=True)`` (in place), in
  ``--eager-runs`` (default 2) fresh processes, the row keeping the one with the lower median
  (a step's time moves by tens of percent from one process to the next on a shared machine;
  the torch references are likewise the better of two processes);
- compiled (``--compile``, the default; ``--no-compile`` skips it): first
  ``torch.compile(lambda p, g, s: opt.update(p, g, s, donate=True))``; if that fails to compile
  or run, the pure ``torch.compile(lambda p, g, s: opt.update(p, g, s))``. The details table says
  which form ran and whether its outputs are the input tensors (really in place) or new ones.
  The first call (compile + one step) is timed on its own and excluded from ``ms/step``;
  ``--cold-compile`` disables inductor's on-disk caches, so that the compile time does not
  depend on earlier runs (otherwise a second run, or a second optimizer with the same graph,
  compiles faster).

Measured in the same run, at its start and again at its end, each in its own subprocess:
``torch.optim.AdamW(foreach=True)`` and ``(fused=True)`` (the default mode's ``torch-foreach`` /
``torch-fused`` workers, weight decay 0.1) and a memory-bandwidth probe over as many float32
elements as case A has parameters: the median time of ``dst.copy_(src)`` at 8 bytes per element
(one read, one write) and of ``dst.add_(src)`` at 12 (two reads, one write: the read-modify-write
pattern of an in-place optimizer step; a plain store such as copy_'s can cost a hidden read of the
destination, so copy_ at 8 bytes may understate the bandwidth). The ratios use the faster of the
two AdamW times and the higher of the bandwidths (the stricter target and floor): timings on a
shared 2-core machine drift a lot, so every progress line also shows the load average.

``--paired`` (the default; ``--no-paired`` skips it): after its timed steps, each optimizer
worker also runs ``--steps`` rounds of one optimizer step and one ``add_`` pass of the bandwidth
probe (its own two arrays), in alternating order. A second table, "Paired", gives the medians
and the compiled floor computed from the probe measured there: the step and the bandwidth it is
held to then come from one process and the same minutes (the probe alone has read from 29 to
82 GB/s across processes on this machine). The pairing's memory is not in ``step peak dRSS``.
(torch's foreach AdamW is not paired: tried, it took two to four times as long between other
work as alone, and slowed the steps it was interleaved with.)

``--interleaved``: at the end, one more worker steps every eager row (SOAP excepted) on its own
params in one process, one step each per round, the order reversed from round to round, and
prints each row's step over ``ft.adamw(fused=False)``'s step of the same round (median over
``--steps`` rounds) next to ``bytes/param / 28``: how the row compares with an AdamW step that
has the same kernels, steadier than times taken in separate processes. torch's foreach AdamW
cannot serve as that yardstick: between other work it runs two to three times slower than
alone (so this table does not replace the eager target; with functim's AdamW as fast as
torch's, a row within ``bytes/param / 28`` meets it). About 2 GB per row.

Columns of the ``--optimizers`` table:

- ``bytes/param``: the least memory traffic of one float32 step per parameter, from the
  formula in :data:`OPTIMIZERS` (every tensor read or written once: e.g. AdamW reads p, g, m, v
  and writes p, m, v: 28; plus, for Cautious and MARS, the pass that their per-tensor mask count
  or clip norm needs before the leaf can step: 8 more);
- ``eager ms`` / ``compiled ms``: median per-step time over the timed steps;
- ``eager x fused``: eager ms / ``torch.optim.AdamW(fused=True)`` ms;
- ``eager target``: ``torch.optim.AdamW(foreach=True)`` ms x bytes/param / 28 (torch's foreach
  AdamW's time scaled to this optimizer's traffic); met when ``eager ms`` is at most that.
  With ``--bracket`` (the default) the torch time is the faster of two runs of it made just
  before and just after the row's eager runs (one run serves two neighbouring rows when nothing
  ran in between): torch's foreach AdamW alone has taken from 164 to 361 ms per step within one
  run on this machine, so a row held to a reference timed many minutes away passes or fails
  with the minute it was timed in. ``--no-bracket``: the run's start/end references;
- ``floor ms``: bytes/param x n_params / the probe's GB/s (the time to move the bytes at the
  measured bandwidth); ``compiled/floor``: target at most 1.5;
- ``state x params``: bytes of every tensor in ``opt.init_state(params)`` except 0-d scalars
  (step, hyperparameters), over 4 x n_params; against the expected count (docs/algorithms.md
  section 15).

Each worker also sums ``|p_final - p_initial|`` (after the same number of steps); the script
warns when an optimizer's compiled sum differs from its eager one by more than a relative 1e-4.
Optional optimizers (MARS, schedule-free AdamW) whose module does not import are listed as
"not available" and skipped.

How to run
----------
From a source checkout (``functim.adapters`` is registered by hand if it is not installed)::

    cd /work/main && PYTHONPATH=/work/main python benchmarks/step_time.py
    python benchmarks/step_time.py --case A --steps 20 --impl functional-pure,adapter
    python benchmarks/step_time.py --case B --thp-compare --threads 1
    python benchmarks/step_time.py --optimizers --cold-compile    # eager + compiled, ~35 min
    python benchmarks/step_time.py --optimizers --no-compile --only lion,signsgd --steps 5

Timings are wall-clock: other processes on the machine distort them (with 2 threads on 2 cores,
one busy core can make a step several times slower), so the load average is printed before and
after the run, and ``min ms`` is shown next to the median. The first touch of fresh memory can
be expensive in a VM, which mostly affects the allocating ``functional-pure`` path.

The default run (both cases, all implementations) takes a few minutes on a 2-core machine
and needs about 5 GB of free memory for case A. ``--optimizers`` with ``--compile`` takes about
half an hour there (each inductor compile of the 148-tensor update takes 30-130 s) and needs
about 6 GB (a compiled pure step holds new params and state next to the old ones).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import functim as ft  # noqa: E402

ADAPTERS_ERROR: str | None = None


def _register_adapters() -> None:
    """Make ``functim.adapters`` importable from a source checkout (the package maps the
    top-level ``adapters/`` folder to that name only once installed)."""
    global ADAPTERS_ERROR
    try:
        import functim.adapters  # noqa: F401
        return
    except ImportError:
        pass
    init = ROOT / "adapters" / "__init__.py"
    if not init.exists():
        ADAPTERS_ERROR = f"functim.adapters is not installed and {init} does not exist"
        return
    spec = importlib.util.spec_from_file_location(
        "functim.adapters", init, submodule_search_locations=[str(ROOT / "adapters")]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["functim.adapters"] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # report it in the adapter row, keep the other rows
        sys.modules.pop("functim.adapters", None)
        ADAPTERS_ERROR = f"importing {init} failed: {type(e).__name__}: {e}"
        return
    ft.adapters = mod


_register_adapters()

HPARAMS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
BYTES_PER_PARAM = 28  # AdamW: read p, g, m, v; write p, m, v (float32)
IMPLS = ("torch-foreach", "torch-fused", "adapter", "functional-pure", "functional-donated")
REFERENCE = "torch-fused"
DEFAULT_STEPS = {"A": 10, "B": 30}
DEFAULT_WARMUP = {"A": 2, "B": 5}
CASE_TITLES = {"A": "GPT-2 small shapes", "B": "2000 x 1000 elements"}
RESULT_TAG = "STEP_TIME_RESULT "


# -- cases ------------------------------------------------------------------------------------
def gpt_shapes(vocab: int, ctx: int, d: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """The parameters of a GPT-2-style model (tied output head), named as GPT-2's."""
    shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(layers):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,)),
        ]
    return shapes + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def case_shapes(case: str) -> list[tuple[str, tuple[int, ...]]]:
    if case == "A":
        shapes = gpt_shapes(vocab=50257, ctx=1024, d=768, layers=12)
        assert len(shapes) == 148 and n_params(shapes) == 124_439_808
        return shapes
    if case == "B":
        return [(f"p{i:04d}", (1000,)) for i in range(2000)]
    raise ValueError(f"unknown case {case!r}")


def n_params(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    total = 0
    for _, shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def random_tensors(shapes, seed: int, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen).mul_(scale) for name, shape in shapes}


PARAM_SEED, GRAD_SEED = 0, 1


# -- memory -----------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


class PeakRSS:
    """Peak resident memory over a region, relative to the resident memory at its start."""

    def start(self) -> None:
        self.base_rss = _status_kb("VmRSS")
        self.method = "VmHWM"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            self.method = "ru_maxrss"
        if self.base_rss is None:
            self.method = "ru_maxrss"
            self.base_rss = _maxrss_kb()
        self.base_maxrss = _maxrss_kb()

    def stop(self) -> tuple[float, float]:
        """(peak delta MB, current delta MB)."""
        cur = _status_kb("VmRSS")
        if self.method == "VmHWM":
            peak = _status_kb("VmHWM")
        else:
            # the running max since process start: only a delta if the region raised it
            peak = max(_maxrss_kb(), self.base_rss)
            if self.base_maxrss > self.base_rss and peak == self.base_maxrss:
                peak = self.base_rss  # cannot tell; report no growth rather than setup's peak
        cur = peak if cur is None else cur
        return (peak - self.base_rss) / 1024, (cur - self.base_rss) / 1024


# -- implementations --------------------------------------------------------------------------
def build(impl: str, params: dict, grads: dict):
    """Return (step, current_params) closures for one implementation; ``current_params()``
    gives ``{name: tensor}``."""
    if impl in ("torch-foreach", "torch-fused", "adapter"):
        names, plist = list(params), []
        for name, p in params.items():
            p = torch.nn.Parameter(p)
            p.grad = grads[name]
            plist.append(p)
        if impl == "torch-foreach":
            opt = torch.optim.AdamW(plist, foreach=True, **HPARAMS)
        elif impl == "torch-fused":
            opt = torch.optim.AdamW(plist, fused=True, **HPARAMS)
        else:
            if ADAPTERS_ERROR is not None:
                raise RuntimeError(ADAPTERS_ERROR)
            from functim.adapters import AdamW

            opt = AdamW(plist, **HPARAMS)
        return opt.step, lambda: {n: p.detach() for n, p in zip(names, plist, strict=True)}

    if impl in ("functional-pure", "functional-donated"):
        opt = ft.adamw(**HPARAMS)
        donate = impl == "functional-donated"
        box = {"params": params, "state": opt.init_state(params)}

        def step():
            box["params"], box["state"] = opt.update(
                box["params"], grads, box["state"], donate=donate
            )

        return step, lambda: box["params"]

    raise ValueError(f"unknown implementation {impl!r}")


def run_worker(case: str, impl: str, steps: int, warmup: int) -> dict:
    shapes = case_shapes(case)
    params = random_tensors(shapes, PARAM_SEED, 0.02)
    grads = random_tensors(shapes, GRAD_SEED, 1e-3)
    # Run the implementation once on a tiny problem first, so that lazy imports, code pages of
    # the torch libraries and thread pools are in place before the memory baseline.
    tiny = [("a", (256, 256)), ("b", (100_000,)), ("c", (8,))]
    step, _ = build(impl, random_tensors(tiny, 2, 0.02), random_tensors(tiny, 3, 1e-3))
    for _ in range(3):
        step()
    del step
    gc.collect()

    mem = PeakRSS()
    mem.start()
    step, current_params = build(impl, params, grads)
    del params  # the optimizer (or its closure) holds them now
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        if i >= warmup:
            times.append(t1 - t0)
    peak_mb, after_mb = mem.stop()

    # sanity check: how far the params moved (compared across implementations by the parent)
    final = current_params()
    gen = torch.Generator().manual_seed(PARAM_SEED)
    moved = 0.0
    for name, shape in shapes:
        p0 = torch.randn(shape, generator=gen).mul_(0.02)
        moved += float(final[name].sub(p0).abs_().sum(dtype=torch.float64))

    median = statistics.median(times)
    numel = n_params(shapes)
    return {
        "case": case,
        "impl": impl,
        "thp": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "threads": torch.get_num_threads(),
        "steps": steps,
        "warmup": warmup,
        "median_ms": median * 1e3,
        "min_ms": min(times) * 1e3,
        "gbps": BYTES_PER_PARAM * numel / median / 1e9,
        "peak_mb": peak_mb,
        "after_mb": after_mb,
        "mem_method": mem.method,
        "moved": moved,
    }


# -- driver -----------------------------------------------------------------------------------
def spawn(case, impl, steps, warmup, threads, thp: bool) -> dict:
    env = dict(os.environ)
    if thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker",
           "--case", case, "--impl", impl, "--steps", str(steps), "--warmup", str(warmup)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["label"] = impl + (" [THP=1]" if thp else "")
            return res
    err = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return {"case": case, "impl": impl, "label": impl + (" [THP=1]" if thp else ""),
            "error": err, "stderr": proc.stderr}


def fmt_row(r: dict, ref: dict | None) -> list[str]:
    if "error" in r:
        return [r["case"], r["label"], "failed", "", "", "", "", ""]
    ratio = "n/a" if ref is None or "error" in ref else f"{r['median_ms'] / ref['median_ms']:.2f}"
    return [r["case"], r["label"], f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}",
            f"{r['gbps']:.2f}", f"{r['peak_mb']:.0f}", f"{r['after_mb']:.0f}", ratio]


HEADER = ["case", "impl", "median ms", "min ms", "GB/s", "peak dRSS MB", "dRSS after MB",
          "x fused"]


def markdown_table(rows: list[list[str]], header: list[str] = HEADER, n_left: int = 2) -> str:
    """A markdown table; the first ``n_left`` columns left-aligned, the others right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" if i >= n_left else "-" * (w + 2)
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def parse_impls(text: str | None) -> list[str]:
    if not text:
        return list(IMPLS)
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in chosen if s not in IMPLS]
    if bad:
        raise SystemExit(f"unknown --impl {bad}; choose from {', '.join(IMPLS)}")
    if REFERENCE not in chosen:
        chosen.insert(0, REFERENCE)  # the ratio column needs it
    return [i for i in IMPLS if i in chosen]


def thp_sysfs() -> str:
    try:
        return pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "unknown"


def load_average() -> str:
    """Other processes on the machine distort timings; reported so a reader can tell."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# -- every functional optimizer (--optimizers) ------------------------------------------------
class OptSpec:
    """One row of the ``--optimizers`` benchmark."""

    def __init__(self, build: str, make, bytes_formula: str, state_ref: float,
                 state_ref_text: str = "", module: str | None = None):
        self.build = build  # the constructor call, as text
        self.make = make  # () -> optimizer; for an optional one, (its constructor) -> optimizer
        self.bytes_formula = bytes_formula  # "p rw 8 + g r 4 + ...": summed for bytes/param
        self.bytes = sum(int(term.split()[-1]) for term in bytes_formula.split("+"))
        self.state_ref = state_ref  # expected state tensors x param count (docs/algorithms.md)
        self.state_ref_text = state_ref_text or f"{state_ref:g}"
        self.module = module  # "pkg.module:function" of an optional optimizer, else None


# bytes/param: float32 traffic of one step, each tensor read ("r") or read and written ("rw")
# once; "rw 8" = 4 bytes read + 4 written. state_ref counts state tensors per param, scalars
# ignored.
# A per-tensor reduction that every element's update depends on (Cautious's mask count, MARS's
# clip norm of the corrected gradient) must finish before that leaf steps, so even a fully fused
# step reads its inputs twice: that first pass ("count pass", "norm pass") is counted too.
ADAM_BYTES = "p rw 8 + g r 4 + m rw 8 + v rw 8"
OPTIMIZERS: dict[str, OptSpec] = {
    "adamw": OptSpec("ft.adamw(fused=False)", lambda: ft.adamw(fused=False), ADAM_BYTES, 2),
    "adamw-fused": OptSpec("ft.adamw()", lambda: ft.adamw(), ADAM_BYTES, 2),
    "sgd-momentum": OptSpec("ft.sgd(momentum=0.9)", lambda: ft.sgd(momentum=0.9),
                            "p rw 8 + g r 4 + buf rw 8", 1),
    "nadamw": OptSpec("ft.nadamw()", lambda: ft.nadamw(), ADAM_BYTES, 2),
    "nadamw-torch": OptSpec('ft.nadamw(variant="torch")', lambda: ft.nadamw(variant="torch"),
                            ADAM_BYTES, 2),
    "cautious-adamw": OptSpec("ft.cautious_adamw()", lambda: ft.cautious_adamw(),
                              ADAM_BYTES + " + count pass (m, g) r 8", 2),
    "cautious-lion": OptSpec("ft.cautious_lion()", lambda: ft.cautious_lion(),
                             "p rw 8 + g r 4 + m rw 8 + count pass (m, g) r 8", 1),
    "lion": OptSpec("ft.lion()", lambda: ft.lion(), "p rw 8 + g r 4 + m rw 8", 1),
    "signsgd": OptSpec("ft.signsgd()", lambda: ft.signsgd(), "p rw 8 + g r 4", 0),
    "signum": OptSpec("ft.signum()", lambda: ft.signum(), "p rw 8 + g r 4 + m rw 8", 1),
    "mars": OptSpec("mars()", lambda ctor: ctor(),
                    "p rw 8 + g r 4 + m rw 8 + v rw 8 + last_grad rw 8"
                    " + norm pass (g, last_grad) r 8", 3, "3 (exact 4)",
                    module="functim.optimizers.mars:mars"),
    "sf-adamw": OptSpec("schedule_free_adamw()", lambda ctor: ctor(),
                        "p(y) rw 8 + g r 4 + z rw 8 + v rw 8", 2, "2 (reference 4)",
                        module="functim.optimizers.schedule_free:schedule_free_adamw"),
    # matmul-bound: the bytes (case A: GG is 2.63 floats/param, Q as many) give no useful floor
    "soap": OptSpec("soap()", lambda ctor: ctor(), ADAM_BYTES + " + GG rw 21 + Q r 11",
                    7.2686, "2 + Σ2d² = 7.2686", module="functim.optimizers.soap:soap"),
}
OPT_REFERENCES = ("torch-foreach", "torch-fused")  # default-mode workers, run in the same run
OPT_WORKER_TIMEOUT_S = 1800


def optional_constructor(spec: OptSpec):
    """The constructor of an optional optimizer; raises if its module does not import."""
    mod_name, fn_name = spec.module.split(":")
    return getattr(importlib.import_module(mod_name), fn_name)


def availability(name: str) -> str | None:
    """None if the optimizer can be built here, else why not."""
    spec = OPTIMIZERS[name]
    if spec.module is None:
        return None
    try:
        optional_constructor(spec)
    except Exception as e:  # a module being written may fail in any way
        return f"{type(e).__name__}: {e}"
    return None


def make_optimizer(name: str):
    spec = OPTIMIZERS[name]
    return spec.make(optional_constructor(spec)) if spec.module else spec.make()


def source_version() -> str:
    """The git commit and a digest of functim's and the adapters' sources (other people may
    change them while a long run goes on)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    digest = hashlib.sha1()
    for folder in ("functim", "adapters"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return f"commit {head or 'unknown'}, sources {digest.hexdigest()[:12]}"


def state_nbytes(state) -> int:
    """Bytes of every tensor of dim >= 1 in a (nested) state; 0-d scalars are left out."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size() if state.dim() > 0 else 0
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


def _leaves(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _leaves(v)]
    return []


def _moved(final: dict, shapes) -> float:
    gen = torch.Generator().manual_seed(PARAM_SEED)
    moved = 0.0
    for name, shape in shapes:
        p0 = torch.randn(shape, generator=gen).mul_(0.02)
        moved += float(final[name].sub(p0).abs_().sum(dtype=torch.float64))
    return moved


def _paired_rounds(step, numel: int, rounds: int) -> dict:
    """``rounds`` rounds, each timing one ``step()`` of the optimizer and one pass of the
    bandwidth probe's ``add_`` (12 bytes/element) over ``numel`` float32, in an order that
    alternates from round to round; the medians, so that the step and the bandwidth it is held
    to come from one process and one stretch of time (another process, seconds later, may run
    either tens of percent faster or slower on a shared machine). Runs after the timed steps
    (its memory is not in their peak)."""
    src = torch.rand(numel)
    dst = torch.empty(numel)
    dst.copy_(src)  # first touch
    jobs = [("opt", step), ("probe", lambda: dst.add_(src))]
    times: dict[str, list[float]] = {key: [] for key, _ in jobs}
    for i in range(rounds):
        for key, fn in (jobs if i % 2 == 0 else jobs[::-1]):
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {"rounds": rounds, "opt_ms": statistics.median(times["opt"]) * 1e3,
            "probe_gbps": 12 * numel / statistics.median(times["probe"]) / 1e9}


def run_opt_worker(name: str, mode: str, steps: int, warmup: int,
                   paired: bool = False) -> dict:
    """Time ``steps`` updates of one functim optimizer on case A, eager (donated) or compiled.

    ``warmup`` untimed updates come first (at least 1; in compiled mode the first is the
    compiling call, timed on its own), so both modes do the same number of updates.
    ``paired``: then :func:`_paired_rounds`, ``steps`` of them."""
    shapes = case_shapes("A")
    numel = n_params(shapes)
    warmup = max(warmup, 1)
    opt = make_optimizer(name)
    res: dict = {"name": name, "mode": mode, "optimizer": repr(opt),
                 "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup}
    if mode == "eager":
        # lazy imports, code pages and thread pools in place before the memory baseline
        tiny = [("a", (256, 256)), ("b", (100_000,)), ("c", (8,))]
        tp, tg = random_tensors(tiny, 2, 0.02), random_tensors(tiny, 3, 1e-3)
        ts = opt.init_state(tp)
        for _ in range(3):
            tp, ts = opt.update(tp, tg, ts, donate=True)
        del tp, tg, ts
        gc.collect()

    grads = random_tensors(shapes, GRAD_SEED, 1e-3)

    def fresh() -> dict:
        params = random_tensors(shapes, PARAM_SEED, 0.02)
        state = opt.init_state(params)
        res["state_bytes"] = state_nbytes(state)
        res["state_x_params"] = res["state_bytes"] / (4 * numel)
        return {"p": params, "s": state}

    box = fresh()
    first_call_s = None
    if mode == "eager":
        def step():
            box["p"], box["s"] = opt.update(box["p"], grads, box["s"], donate=True)

        res["call"] = "opt.update(params, grads, state, donate=True)"
        res["in_place"] = True
    else:
        from torch._dynamo import reset as dynamo_reset

        forms = [
            ("donate", "torch.compile(lambda p, g, s: opt.update(p, g, s, donate=True))",
             lambda p, g, s: opt.update(p, g, s, donate=True)),
            ("pure", "torch.compile(lambda p, g, s: opt.update(p, g, s))",
             lambda p, g, s: opt.update(p, g, s)),
        ]
        failures = []
        for form, text, fn in forms:
            compiled = torch.compile(fn)
            before = {id(t): t.data_ptr() for t in _leaves(box["p"]) + _leaves(box["s"])}
            try:
                t0 = time.perf_counter()
                new_p, new_s = compiled(box["p"], grads, box["s"])
                first_call_s = time.perf_counter() - t0
            except Exception as e:
                failures.append(f"{form}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                dynamo_reset()
                box = fresh()  # the failed call may have written some tensors
                continue
            outs = _leaves(new_p) + [t for t in _leaves(new_s) if t.dim() > 0]
            old_ptrs = set(before.values())
            res["in_place"] = all(t.data_ptr() in old_ptrs for t in outs)
            box["p"], box["s"] = new_p, new_s
            res["call"], res["form"] = text, form
            break
        else:
            raise RuntimeError("every compiled form failed: " + "; ".join(failures))
        res["compile_failures"] = failures
        warmup -= 1  # the compiling call was the first warmup update

        def step():
            box["p"], box["s"] = compiled(box["p"], grads, box["s"])

    # memory taken by the steps themselves (temporaries, new outputs), the state already held
    mem = PeakRSS()
    mem.start()
    warm_times, times = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        (times if i >= warmup else warm_times).append(t1 - t0)
    peak_mb, after_mb = mem.stop()
    if paired:
        res["paired"] = _paired_rounds(step, numel, steps)
    if mode != "eager":
        from torch._dynamo.utils import counters

        res["graphs"] = int(counters["stats"].get("unique_graphs", 0))
    res.update({
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "first_call_s": first_call_s,
        "max_warmup_ms": max(warm_times) * 1e3 if warm_times else None,
        "peak_mb": peak_mb,
        "after_mb": after_mb,
        "mem_method": mem.method,
        "moved": _moved(box["p"], shapes),
    })
    return res


INTERLEAVED_BASE = "adamw"  # ft.adamw(fused=False): the rows' in-process yardstick


def run_interleaved_worker(names: list[str], rounds: int, warmup: int) -> dict:
    """Every optimizer in ``names`` (and :data:`INTERLEAVED_BASE`) on its own copy of case A's
    params in this one process, eager and donated, stepped in ``rounds`` rounds of one step
    each, the order reversed from one round to the next; per optimizer the median step and the
    median over rounds of its step / the base's step of the same round. Within one round every
    optimizer meets the same machine, so the ratios hold still where separate processes move by
    tens of percent. (torch's foreach AdamW cannot be the base: between other work it runs two
    to three times slower than alone, see ``--paired``.)"""
    shapes = case_shapes("A")
    grads = random_tensors(shapes, GRAD_SEED, 1e-3)
    names = [INTERLEAVED_BASE] + [n for n in names if n != INTERLEAVED_BASE]
    boxes = {}
    for name in names:
        opt = make_optimizer(name)
        params = random_tensors(shapes, PARAM_SEED, 0.02)
        boxes[name] = [opt, params, opt.init_state(params)]

    def step(name: str) -> None:
        box = boxes[name]
        box[1], box[2] = box[0].update(box[1], grads, box[2], donate=True)

    for _ in range(max(warmup, 1)):
        for name in names:
            step(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    base = times[INTERLEAVED_BASE]
    return {"rounds": rounds, "threads": torch.get_num_threads(),
            "rows": {name: {"median_ms": statistics.median(t) * 1e3,
                            "ratio": statistics.median([a / b for a, b in zip(t, base)])}
                     for name, t in times.items()}}


def interleaved_table(res: dict) -> str:
    header = ["optimizer", "bytes/param", "eager ms", "x ft.adamw(fused=False)",
              "bytes/param / 28", "within"]
    rows = []
    for name, r in res["rows"].items():
        spec = OPTIMIZERS[name]
        allowed = spec.bytes / 28
        rows.append([name, str(spec.bytes), f"{r['median_ms']:.1f}", f"{r['ratio']:.3f}",
                     f"{allowed:.3f}", "yes" if r["ratio"] <= allowed else "NO"])
    return (f"Interleaved: one process, {res['rounds']} rounds of one eager step of every row "
            "(order reversed each round); x ft.adamw(fused=False) = median over rounds of the "
            "row's step / ft.adamw(fused=False)'s step in the same round. A row within "
            "bytes/param / 28 meets its eager target wherever functim's AdamW kernel is as fast "
            "as torch's foreach AdamW (compare the two in the table above).\n\n"
            + markdown_table(rows, header, n_left=1))


# (name, bytes per element counted, op): copy_ counts its read and its write (8 bytes), as the
# bytes/param formulas do; add_ reads dst and src and writes dst (12 bytes), the read-modify-write
# pattern of an in-place optimizer step (a plain store like copy_'s may also read the destination
# line first, write-allocate, so 8 bytes can undercount copy_'s real traffic).
BW_PROBES = (("copy_", 8, lambda dst, src: dst.copy_(src)),
             ("add_", 12, lambda dst, src: dst.add_(src)))


def run_bandwidth_probe(numel: int, reps: int = 15) -> dict:
    """Median times of ``dst.copy_(src)`` and ``dst.add_(src)`` over ``numel`` float32 each, as
    GB/s at the bytes per element in :data:`BW_PROBES`; ``gbps`` is the higher of the two."""
    src = torch.rand(numel)
    dst = torch.empty(numel)
    dst.copy_(src)  # first touch
    res: dict = {"numel": numel, "reps": reps, "threads": torch.get_num_threads()}
    for name, nbytes, op in BW_PROBES:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            op(dst, src)
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        res[name] = {"bytes": nbytes, "median_ms": median * 1e3, "min_ms": min(times) * 1e3,
                     "gbps": nbytes * numel / median / 1e9}
    res["gbps"] = max(res[name]["gbps"] for name, _, _ in BW_PROBES)
    return res


def measure_references(steps: int, warmup: int, threads: int | None, when: str) -> dict:
    """The bandwidth probe and torch.optim.AdamW foreach/fused on case A, each in a fresh
    worker; printed as they come."""
    out = {"probe": spawn_worker(["--bw-probe", "--case", "A"], threads)}
    bw = out["probe"]
    if "error" in bw:
        print(f"  {'bandwidth probe':<16} {when:<8} FAILED: {bw['error']}", flush=True)
    else:
        parts = [f"{name} {bw[name]['median_ms']:.1f} ms = {bw[name]['gbps']:.2f} GB/s at "
                 f"{nbytes} B/elem" for name, nbytes, _ in BW_PROBES]
        print(f"  {'bandwidth probe':<16} {when:<8} " + "; ".join(parts)
              + f"  [load {load_average()}]", flush=True)
    for impl in OPT_REFERENCES:
        r = spawn_worker(["--worker", "--case", "A", "--impl", impl, "--steps", str(steps),
                          "--warmup", str(warmup)], threads)
        out[impl] = r
        if "error" in r:
            print(f"  {impl:<16} {when:<8} FAILED: {r['error']}", flush=True)
        else:
            print(f"  {impl:<16} {when:<8} median {r['median_ms']:8.1f} ms  min "
                  f"{r['min_ms']:8.1f} ms  (torch.optim.AdamW, "
                  f"{'fused' if 'fused' in impl else 'foreach'})  [load {load_average()}]",
                  flush=True)
    return out


def foreach_reference(steps: int, warmup: int, threads: int | None, label: str) -> dict:
    """One ``torch.optim.AdamW(foreach=True)`` worker on case A (an eager row's bracket, see
    ``--bracket``); printed as it comes."""
    r = spawn_worker(["--worker", "--case", "A", "--impl", "torch-foreach", "--steps",
                      str(steps), "--warmup", str(warmup)], threads)
    if "error" in r:
        print(f"  {'torch-foreach':<16} {label:<8} FAILED: {r['error']}", flush=True)
    else:
        print(f"  {'torch-foreach':<16} {label:<8} median {r['median_ms']:8.1f} ms  min "
              f"{r['min_ms']:8.1f} ms  [load {load_average()}]", flush=True)
    return r


def _best(runs: list[dict], key: str, pick=min) -> float | None:
    values = [r[key] for r in runs if "error" not in r]
    return pick(values) if values else None


def spawn_worker(worker_args: list[str], threads: int | None, env_extra: dict | None = None,
                 timeout: float | None = None) -> dict:
    """Run this script with ``worker_args`` in a fresh process; its result dict or an error."""
    env = dict(os.environ)
    env.update(env_extra or {})
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), *worker_args]
    if threads:
        cmd += ["--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {timeout:.0f} s", "stderr": str(e.stderr or "")}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    err = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return {"error": err, "stderr": proc.stderr}


def parse_optimizers(text: str | None) -> list[str]:
    if not text:
        return list(OPTIMIZERS)
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in chosen if s not in OPTIMIZERS]
    if bad:
        raise SystemExit(f"unknown --only {bad}; choose from {', '.join(OPTIMIZERS)}")
    return [n for n in OPTIMIZERS if n in chosen]


def _ms(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def paired_table(names: list[str], results: dict, numel: int, rounds: int) -> str:
    """The compiled floors from :func:`_paired_rounds`: each row's bandwidth probe measured in
    the row's own process, in turn with its steps."""
    header = ["optimizer", "bytes/param", "eager ms", "compiled ms", "probe GB/s", "floor ms",
              "compiled/floor (<=1.5)"]
    rows = []
    for name in names:
        spec = OPTIMIZERS[name]
        e = results.get((name, "eager"), {}).get("paired")
        c = results.get((name, "compiled"), {}).get("paired")
        cells = [name, str(spec.bytes), "" if e is None else f"{e['opt_ms']:.1f}"]
        if c is None:
            cells += ["", "", "", ""]
        else:
            floor = spec.bytes * numel / (c["probe_gbps"] * 1e9) * 1e3
            ratio = c["opt_ms"] / floor
            cells += [f"{c['opt_ms']:.1f}", f"{c['probe_gbps']:.2f}", f"{floor:.1f}",
                      f"{ratio:.2f} ({'yes' if ratio <= 1.5 else 'NO'})"]
        rows.append(cells)
    return (f"Paired: in each row's own process, {rounds} rounds of one optimizer step and one "
            "add_ pass of the bandwidth probe, in alternating order; medians. The floor as "
            "above, from the probe run between the steps.\n\n"
            + markdown_table(rows, header, n_left=1))


def optimizers_main(args) -> int:
    if args.case not in ("both", "A"):
        raise SystemExit("--optimizers runs case A (GPT-2 small shapes) only")
    if args.impl or args.thp_compare:
        raise SystemExit("--impl and --thp-compare belong to the default mode, not --optimizers")
    names = parse_optimizers(args.only)
    shapes = case_shapes("A")
    numel = n_params(shapes)
    steps = args.steps or DEFAULT_STEPS["A"]
    warmup = max(1, DEFAULT_WARMUP["A"] if args.warmup is None else args.warmup)
    threads = args.threads or torch.get_num_threads()
    version = source_version()
    print(f"torch {torch.__version__}, functim from {pathlib.Path(ft.__file__).parent} "
          f"({version})")
    print(f"threads: {threads} (torch.get_num_threads in workers), cpus: {os.cpu_count()}")
    print(f"load average (1/5/15 min): {load_average()}")
    print(f"case A ({CASE_TITLES['A']}): {len(shapes)} tensors, {numel:,} params, float32; "
          f"{warmup} warmup + {steps} timed steps per measurement; compiled: "
          f"{'yes' if args.compile else 'no'}"
          f"{' (inductor caches disabled)' if args.cold_compile else ''}")

    ref_runs = [measure_references(steps, warmup, args.threads, "start")]

    results: dict[tuple[str, str], dict] = {}
    missing: dict[str, str] = {}
    # --bracket: torch's foreach AdamW just before and just after each row's eager workers (one
    # run serves two neighbouring rows when nothing else ran in between)
    brackets: dict[str, list[dict]] = {}
    last_ref: dict | None = None
    cold = {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"} if args.cold_compile else {}
    for name in names:
        why = availability(name)
        if why is not None:
            missing[name] = why
            print(f"  {name:<16} not available ({why})", flush=True)
            continue
        modes = ["eager"] + (["compiled"] if args.compile else [])
        for mode in modes:
            if mode == "eager" and args.bracket:
                before = last_ref or foreach_reference(steps, warmup, args.threads, "before")
            # eager: the better of --eager-runs fresh processes, as for the torch references
            for _ in range(args.eager_runs if mode == "eager" else 1):
                r = spawn_worker(["--opt-worker", name, "--opt-mode", mode, "--steps",
                                  str(steps), "--warmup", str(warmup),
                                  "--paired" if args.paired else "--no-paired"], args.threads,
                                 cold if mode == "compiled" else None, OPT_WORKER_TIMEOUT_S)
                if "error" in r:
                    print(f"  {name:<16} {mode:<8} FAILED: {r['error']}", flush=True)
                    results.setdefault((name, mode), r)
                    continue
                best = results.get((name, mode))
                if best is None or "error" in best or r["median_ms"] < best["median_ms"]:
                    results[(name, mode)] = r
                extra = ""
                if mode == "compiled":
                    extra = (f"  first call {r['first_call_s']:.1f} s ({r['form']}, "
                             f"{'in place' if r['in_place'] else 'new tensors'})")
                if "paired" in r:
                    pr = r["paired"]
                    extra += f"  paired: {pr['opt_ms']:.1f} ms, probe {pr['probe_gbps']:.1f} GB/s"
                print(f"  {name:<16} {mode:<8} median {r['median_ms']:8.1f} ms  min "
                      f"{r['min_ms']:8.1f} ms  step peak dRSS {r['peak_mb']:5.0f} MB  state x "
                      f"params {r['state_x_params']:.3f}{extra}  [load {load_average()}]",
                      flush=True)
            if mode == "eager" and args.bracket:
                last_ref = foreach_reference(steps, warmup, args.threads, "after")
                brackets[name] = [before, last_ref]
            else:
                last_ref = None
    ref_runs.append(measure_references(steps, warmup, args.threads, "end"))
    interleaved = None
    if args.interleaved:
        rows = [n for n in names if n not in missing and n != "soap"]
        print(f"  interleaved: {', '.join(rows)} in one process ...", flush=True)
        interleaved = spawn_worker(["--interleaved-worker", ",".join(rows), "--steps",
                                    str(steps), "--warmup", str(warmup)], args.threads,
                                   timeout=OPT_WORKER_TIMEOUT_S)

    print(f"\nload average after the run (1/5/15 min): {load_average()}")
    version_after = source_version()
    if version_after != version:
        print(f"WARNING: functim's sources changed during the run ({version} at the start, "
              f"{version_after} at the end): rows may come from different code")
    # references measured at the start and at the end of the run; the ratios use the faster
    # AdamW times and the higher bandwidth (the stricter targets and floors)
    foreach = _best([r["torch-foreach"] for r in ref_runs], "median_ms")
    fused = _best([r["torch-fused"] for r in ref_runs], "median_ms")
    gbps = _best([r["probe"] for r in ref_runs], "gbps", max)
    print("\nReferences (same run, the better of start and end): torch.optim.AdamW(foreach=True) "
          f"{_ms(foreach) or 'failed'} ms, (fused=True) {_ms(fused) or 'failed'} ms; "
          f"bandwidth {'failed' if gbps is None else f'{gbps:.2f} GB/s'} "
          "(the higher of copy_ at 8 and add_ at 12 bytes/elem)")
    if args.bracket:
        print("Eager targets: from the torch foreach AdamW runs just before and after each row's "
              "eager runs (the faster of the two; see the details table), not from the above")

    header = ["optimizer", "bytes/param", "eager ms", "eager x fused-AdamW",
              "eager target ms (met)", "compiled ms", "floor ms", "compiled/floor (<=1.5)",
              "state x params (expected)"]
    rows, details, warnings = [], [], []
    for name in names:
        spec = OPTIMIZERS[name]
        if name in missing:
            rows.append([name, str(spec.bytes), "not available", "", "", "", "", "",
                         f"- ({spec.state_ref_text})"])
            continue
        e = results.get((name, "eager"), {})
        c = results.get((name, "compiled"))
        e_ok = "error" not in e
        c_ok = c is not None and "error" not in c
        floor = None if gbps is None else spec.bytes * numel / (gbps * 1e9) * 1e3
        local = _best(brackets.get(name, []), "median_ms")
        reference = local if args.bracket else foreach
        target = None if reference is None else reference * spec.bytes / 28
        cells = [name, str(spec.bytes)]
        if e_ok:
            cells += [f"{e['median_ms']:.1f}",
                      "" if fused is None else f"{e['median_ms'] / fused:.2f}",
                      "" if target is None else
                      f"{target:.1f} ({'yes' if e['median_ms'] <= target else 'NO'})"]
        else:
            cells += ["failed", "", "" if target is None else f"{target:.1f}"]
        if c is None:
            cells += ["not run", _ms(floor), ""]
        elif c_ok:
            ratio = "" if floor is None else c["median_ms"] / floor
            cells += [f"{c['median_ms']:.1f}", _ms(floor),
                      "" if floor is None else f"{ratio:.2f} ({'yes' if ratio <= 1.5 else 'NO'})"]
        else:
            cells += ["failed", _ms(floor), ""]
        measured = e.get("state_x_params", (c or {}).get("state_x_params"))
        if measured is None:
            cells.append(f"? ({spec.state_ref_text})")
        else:
            flag = "" if abs(measured - spec.state_ref) < 1e-3 else " DIFFERS"
            cells.append(f"{measured:.3f} ({spec.state_ref_text}){flag}")
        rows.append(cells)
        if c_ok and e_ok:
            rel = abs(c["moved"] - e["moved"]) / max(e["moved"], 1e-30)
            if rel > 1e-4:
                warnings.append(f"{name}: compiled sum|p - p0| = {c['moved']:.6g} vs eager "
                                f"{e['moved']:.6g} (rel diff {rel:.2e})")
        details.append([
            name, spec.build if not spec.module else
            f"{spec.module.split(':')[0]}.{spec.build}",
            spec.bytes_formula,
            " / ".join("failed" if "error" in r else f"{r['median_ms']:.1f}"
                       for r in brackets.get(name, [])),
            f"{e['min_ms']:.1f}" if e_ok else "",
            f"{e['peak_mb']:.0f}" if e_ok else "",
            "" if not c_ok else c["form"] + (" (in place)" if c["in_place"] else
                                             " (new tensors)"),
            f"{c['first_call_s']:.1f}" if c_ok else "",
            str(c.get("graphs", "")) if c_ok else "",
            f"{c['min_ms']:.1f}" if c_ok else "",
            f"{c['median_ms'] / fused:.2f}" if c_ok and fused else "",
            f"{c['peak_mb']:.0f}" if c_ok else "",
        ])
    print("\n" + markdown_table(rows, header, n_left=1))
    print("\nDetails: constructor; bytes/param formula; min ms/step; step peak dRSS = peak "
          "resident memory during the steps minus that just before them (state already held: "
          "temporaries and, on a pure path, the new params and state); the compiled call (the "
          "first form that worked; 'new tensors' = its outputs are not the input tensors); the "
          "first compiled call (compile + 1 step, excluded from ms/step); dynamo graphs.\n")
    dheader = ["optimizer", "constructor", "bytes/param formula", "torch foreach ms (bracket)",
               "eager min ms",
               "eager step peak MB", "compiled form", "compile s", "graphs", "compiled min ms",
               "compiled x fused-AdamW", "compiled step peak MB"]
    print(markdown_table(details, dheader, n_left=4))
    if args.paired:
        print("\n" + paired_table(names, results, numel, steps))
    if interleaved is not None:
        if "error" in interleaved:
            print(f"\ninterleaved worker failed: {interleaved['error']}")
        else:
            print("\n" + interleaved_table(interleaved))
    for name in names:
        c = results.get((name, "compiled"))
        if c and "error" not in c and c.get("compile_failures"):
            print(f"note: {name}: " + "; ".join(c["compile_failures"]))
        if c and "error" not in c and c.get("max_warmup_ms") and \
                c["max_warmup_ms"] > 5 * c["median_ms"] + 1000:
            print(f"note: {name}: a compiled warmup step took {c['max_warmup_ms'] / 1e3:.1f} s "
                  "(a recompilation?)")
    for w in warnings:
        print("WARNING: different result: " + w)
    failed = [(k, r) for k, r in list(results.items())
              + [((k, when), r) for when, refs in zip(("start", "end"), ref_runs)
                 for k, r in refs.items()]
              + list({id(r): (("torch-foreach", f"bracket of {n}"), r)
                      for n, rs in brackets.items() for r in rs}.values())
              + ([(("interleaved", "worker"), interleaved)] if interleaved else [])
              if "error" in r]
    for (name, mode), r in failed:
        print(f"\n{name} {mode} failed; worker stderr:\n{r.get('stderr', '').rstrip()[-4000:]}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--case", choices=("A", "B", "both"), default="both")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per implementation (default: A 10, B 30)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first (default: A 2, B 5)")
    ap.add_argument("--impl", default=None,
                    help=f"comma-separated subset of {', '.join(IMPLS)} "
                         f"({REFERENCE} is always run as the reference)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads in each worker (default: torch's default)")
    ap.add_argument("--thp-compare", action="store_true",
                    help="also run functional-pure with THP_MEM_ALLOC_ENABLE=1")
    ap.add_argument("--optimizers", action="store_true",
                    help="benchmark every functional functim optimizer on case A, eager and "
                         "compiled, against torch's AdamW and a copy-bandwidth floor")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="--optimizers: also time the torch.compile'd update (default: yes)")
    ap.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                    help="--optimizers: also time each optimizer in turn with the bandwidth "
                         "probe in its own process (the paired table)")
    ap.add_argument("--bracket", action=argparse.BooleanOptionalAction, default=True,
                    help="--optimizers: time torch's foreach AdamW just before and after each "
                         "row's eager runs; the row's eager target comes from those two")
    ap.add_argument("--interleaved", action="store_true",
                    help="--optimizers: also step every eager row (but SOAP) in one process, "
                         "in turn with ft.adamw(fused=False), and print each row's time over "
                         "that one's (needs about 2 GB per row)")
    ap.add_argument("--eager-runs", type=int, default=2,
                    help="--optimizers: fresh worker processes per eager row; the row keeps "
                         "the faster (default 2, like the start/end torch references)")
    ap.add_argument("--cold-compile", action="store_true",
                    help="--optimizers: disable inductor's on-disk caches in compiled workers")
    ap.add_argument("--only", default=None,
                    help=f"--optimizers: comma-separated subset of {', '.join(OPTIMIZERS)}")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--opt-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--opt-mode", choices=("eager", "compiled"), default="eager",
                    help=argparse.SUPPRESS)
    ap.add_argument("--bw-probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--interleaved-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.opt_worker or args.bw_probe or args.interleaved_worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.interleaved_worker:
            res = run_interleaved_worker(args.interleaved_worker.split(","), args.steps,
                                         args.warmup)
        elif args.bw_probe:
            res = run_bandwidth_probe(n_params(case_shapes("A")))
        else:
            res = run_opt_worker(args.opt_worker, args.opt_mode, args.steps, args.warmup,
                                 args.paired)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0
    if args.optimizers:
        return optimizers_main(args)

    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        res = run_worker(args.case, args.impl, args.steps, args.warmup)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    cases = ["A", "B"] if args.case == "both" else [args.case]
    impls = parse_impls(args.impl)
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, functim from {pathlib.Path(ft.__file__).parent}")
    print(f"threads: {threads} (torch.get_num_threads in workers), cpus: {os.cpu_count()}")
    print(f"THP_MEM_ALLOC_ENABLE: {os.environ.get('THP_MEM_ALLOC_ENABLE', '<not set>')}; "
          f"kernel THP mode: {thp_sysfs()}")
    print(f"load average (1/5/15 min): {load_average()}")
    if ADAPTERS_ERROR and "adapter" in impls:
        print(f"note: {ADAPTERS_ERROR}")
    if args.thp_compare and os.environ.get("THP_MEM_ALLOC_ENABLE"):
        print("note: THP_MEM_ALLOC_ENABLE is already set here, so --thp-compare rows match "
              "the plain ones")
    print(f"AdamW {HPARAMS}, float32, CPU; GB/s counts {BYTES_PER_PARAM} bytes/param")

    results: list[dict] = []
    for case in cases:
        shapes = case_shapes(case)
        numel = n_params(shapes)
        steps = args.steps or DEFAULT_STEPS[case]
        warmup = DEFAULT_WARMUP[case] if args.warmup is None else args.warmup
        print(f"\ncase {case} ({CASE_TITLES[case]}): {len(shapes)} tensors, {numel:,} params, "
              f"AdamW state {8 * numel / 2**20:.0f} MB; {warmup} warmup + {steps} timed steps")
        runs = [(impl, False) for impl in impls]
        if args.thp_compare and "functional-pure" in impls:
            runs.append(("functional-pure", True))
        for impl, thp in runs:
            r = spawn(case, impl, steps, warmup, args.threads, thp)
            results.append(r)
            if "error" in r:
                print(f"  {r['label']:<28} FAILED: {r['error']}")
            else:
                print(f"  {r['label']:<28} median {r['median_ms']:9.2f} ms  "
                      f"{r['gbps']:6.2f} GB/s  peak dRSS {r['peak_mb']:7.0f} MB  "
                      f"(threads {r['threads']}, {r['mem_method']})", flush=True)

    rows, warnings = [], []
    for case in cases:
        case_res = [r for r in results if r["case"] == case]
        ref = next((r for r in case_res if r["label"] == REFERENCE), None)
        for r in case_res:
            rows.append(fmt_row(r, ref))
            if ref is not None and "error" not in ref and "error" not in r:
                rel = abs(r["moved"] - ref["moved"]) / max(ref["moved"], 1e-30)
                if rel > 1e-5:
                    warnings.append(f"case {case} {r['label']}: sum|p - p0| = {r['moved']:.6g} "
                                    f"vs {ref['moved']:.6g} for {REFERENCE} (rel diff {rel:.2e})")
    print(f"\nload average after the run (1/5/15 min): {load_average()}")
    print("\n" + markdown_table(rows))
    for w in warnings:
        print("WARNING: different result: " + w)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"\n{r['case']} {r['label']} failed; worker stderr:\n{r['stderr'].rstrip()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
