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

How to run
----------
From a source checkout (``functim.adapters`` is registered by hand if it is not installed)::

    cd /work/main && PYTHONPATH=/work/main python benchmarks/step_time.py
    python benchmarks/step_time.py --case A --steps 20 --impl functional-pure,adapter
    python benchmarks/step_time.py --case B --thp-compare --threads 1

Timings are wall-clock: other processes on the machine distort them (with 2 threads on 2 cores,
one busy core can make a step several times slower), so the load average is printed before and
after the run, and ``min ms`` is shown next to the median. The first touch of fresh memory can
be expensive in a VM, which mostly affects the allocating ``functional-pure`` path.

The default run (both cases, all implementations) takes a few minutes on a 2-core machine
and needs about 5 GB of free memory for case A.
"""

from __future__ import annotations

import argparse
import gc
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
def case_shapes(case: str) -> list[tuple[str, tuple[int, ...]]]:
    if case == "A":
        d, vocab, ctx, n_layer = 768, 50257, 1024, 12
        shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
        for i in range(n_layer):
            h = f"h.{i}."
            shapes += [
                (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
                (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
                (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
                (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
                (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
                (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,)),
            ]
        shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
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


def markdown_table(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" if i >= 2 else "-" * (w + 2)
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(HEADER), sep] + [line(r) for r in rows])


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
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

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
