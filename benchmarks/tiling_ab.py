"""A/B of the CPU tiling of donated elementwise steps: each optimizer's ``update(...,
donate=True)`` on GPT-2-small shapes, with tiling on and off, alternating in one process.

``python benchmarks/tiling_ab.py [--rounds 8] [--only adamw,lion]``. Tiling off is the engine's
own untiled path (``functim.execution.tiling_applies`` answering False); everything else is equal:
the same params, grads and state, one torch thread, rounds in alternating order. Prints, per
optimizer, the median step time of each mode and tiled / untiled.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import case_shapes, make_optimizer  # noqa: E402

import functim.execution as execution  # noqa: E402

ELEMENTWISE = ("adamw", "sgd-momentum", "nadamw", "nadamw-torch", "cautious-adamw",
               "cautious-lion", "lion", "signsgd", "signum", "mars", "sf-adamw")


def _time_step(opt, params, grads, state) -> float:
    t0 = time.perf_counter()
    opt.update(params, grads, state, donate=True)
    return time.perf_counter() - t0


def run(name: str, rounds: int) -> tuple[float, float]:
    torch.manual_seed(0)
    shapes = case_shapes("A")
    params = {k: torch.randn(s) * 0.02 for k, s in shapes}
    grads = {k: torch.randn(s) * 1e-3 for k, s in shapes}
    opt = make_optimizer(name)
    state = opt.init_state(params)
    original = execution.tiling_applies
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for r in range(rounds + 1):
            for tiled in ((True, False) if r % 2 else (False, True)):
                execution.tiling_applies = original if tiled else (lambda *a, **k: False)
                t = _time_step(opt, params, grads, state)
                if r:  # round 0 warms both paths up
                    times[tiled].append(t)
    finally:
        execution.tiling_applies = original
    return statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--only", default=",".join(ELEMENTWISE))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| optimizer | tiled ms | untiled ms | tiled / untiled |")
    print("|---|---:|---:|---:|")
    for name in args.only.split(","):
        tiled, untiled = run(name, args.rounds)
        print(f"| {name} | {tiled:.1f} | {untiled:.1f} | {tiled / untiled:.3f} |", flush=True)


if __name__ == "__main__":
    main()
