"""Eager, donated steps of every elementwise optimizer against torch's foreach implementation
and, optionally, against another revision of functim, alternating in one process.

``python benchmarks/eager_ab.py [--threads 1] [--rounds 7] [--shapes gpt2-small|gpt-30m]
[--baseline-rev REV] [--only adamw,sgd-nesterov]``

Each row times ``opt.update(params, grads, state, donate=True)`` (functim) and
``torch.optim.<X>(foreach=True).step()`` where torch has the optimizer (AdamW, SGD, NAdam), on
the same params and grads; each measurement is the best of 3 steps after a warm-up step, the
implementations are timed in alternating order, and the row gives the median over the rounds of
functim / torch (and functim / baseline). ``--baseline-rev`` extracts ``functim`` at that git
revision into a temporary directory as the package ``functim_baseline`` (its imports rewritten)
and times it the same way.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from step_time import gpt_shapes  # noqa: E402

import functim as ft  # noqa: E402

SHAPES = {"gpt2-small": dict(vocab=50257, ctx=1024, d=768, layers=12),
          "gpt-30m": dict(vocab=50257, ctx=1024, d=384, layers=6)}
OPTIMIZERS = {
    "adamw": lambda m: m.adamw(weight_decay=0.1, fused=False),
    "sgd-nesterov": lambda m: m.sgd(lr=1e-3, momentum=0.9, nesterov=True, fused=False),
    "nadamw": lambda m: m.nadamw(),
    "nadamw-torch": lambda m: m.nadamw(variant="torch"),
    "cautious-adamw": lambda m: m.cautious_adamw(weight_decay=0.1),
    "cautious-lion": lambda m: m.cautious_lion(),
    "lion": lambda m: m.lion(weight_decay=0.1),
    "signsgd": lambda m: m.signsgd(),
    "signum": lambda m: m.signum(),
    "mars": lambda m: m.mars(),
    "sf-adamw": lambda m: m.schedule_free_adamw(weight_decay=0.1),
    "sophia": lambda m: m.sophia(),
}
TORCH = {
    "adamw": lambda ps: torch.optim.AdamW(ps, weight_decay=0.1, foreach=True),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, nesterov=True,
                                               foreach=True),
    "nadamw-torch": lambda ps: torch.optim.NAdam(ps, weight_decay=1e-2,
                                                 decoupled_weight_decay=True, foreach=True),
}


def baseline_package(rev: str, into: Path):
    """``functim`` at ``rev`` as the importable package ``functim_baseline``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "functim"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    pkg = into / "functim"
    for f in pkg.rglob("*.py"):
        text = f.read_text().replace("from functim.", "from functim_baseline.")
        f.write_text(text.replace("import functim as", "import functim_baseline as"))
    pkg.rename(into / "functim_baseline")
    sys.path.insert(0, str(into))
    import functim_baseline
    return functim_baseline


def functional_step(module, name, params, grads):
    opt = OPTIMIZERS[name](module)
    p = {k: v.clone() for k, v in params.items()}
    state = opt.init_state(p)

    def step():
        nonlocal p, state
        p, state = opt.update(p, grads, state, donate=True)
    return step


def torch_step(name, params, grads):
    ps = [v.clone() for v in params.values()]
    for p, g in zip(ps, grads.values()):
        p.grad = g.clone()
    return TORCH[name](ps).step


def best_of(fn, n: int = 3) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", choices=list(SHAPES), default="gpt2-small")
    ap.add_argument("--baseline-rev", default=None)
    ap.add_argument("--only", default=",".join(OPTIMIZERS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    baseline = baseline_package(args.baseline_rev, Path(tmp.name)) if args.baseline_rev else None
    gen = torch.Generator().manual_seed(0)
    shapes = gpt_shapes(**SHAPES[args.shapes])
    params = {n: torch.randn(s, generator=gen) * 0.02 for n, s in shapes}
    grads = {n: torch.randn(s, generator=gen) * 0.01 for n, s in shapes}
    print(f"{args.shapes}: {sum(p.numel() for p in params.values()):,} params, "
          f"{args.threads} thread(s), {args.rounds} rounds")
    print(f"{'optimizer':16s} {'functim ms':>10s} {'/ torch':>8s} {'/ baseline':>10s}")
    for name in args.only.split(","):
        impls = {"functim": functional_step(ft, name, params, grads)}
        if baseline is not None:
            impls["baseline"] = functional_step(baseline, name, params, grads)
        if name in TORCH:
            impls["torch"] = torch_step(name, params, grads)
        times: dict[str, list[float]] = {k: [] for k in impls}
        for r in range(args.rounds):
            for k in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
                times[k].append(best_of(impls[k]))
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = {k: f"{med['functim'] / med[k]:.3f}" if k in med else "" for k in
                 ("torch", "baseline")}
        print(f"{name:16s} {med['functim'] * 1e3:10.1f} {ratio['torch']:>8s} "
              f"{ratio['baseline']:>10s}", flush=True)


if __name__ == "__main__":
    main()
