"""Time the sharded Muon step on 2 CPU ranks (gloo): exchange vs Newton–Schulz, and the total
against the unsharded step, in the same run.

What it measures
----------------
The hidden matrices of a transformer (``--layers`` blocks of ``qkv (3d, d)``, ``proj (d, d)``,
``fc1 (4d, d)``, ``fc2 (d, 4d)``; ``d = --dim``) as DTensors sharded ``Shard(0)`` over the ranks,
as FSDP2 shards them, with fixed random gradients; every matrix goes to Muon
(``ft.muon(muon_params="*")``, defaults otherwise: 5 Newton–Schulz steps, float32 on CPU). Each
step is ``opt.update(params, grads, state, donate=True)``, timed with ``time.perf_counter``
between two barriers, after ``--warmup`` untimed steps; the figures are medians over ``--steps``
steps.

- ``sharded step``: the slowest rank's time for the whole update (momentum, owner exchange,
  Newton–Schulz on the owned matrices, parameter update);
- ``exchange``: the time in :func:`functim.distributed.owner_compute`'s two redistributions
  (gather each owned matrix whole, scatter the results back), from
  ``owner_stats(timing=True)``. On gloo DTensor implements them as all-gather + chunk
  (torch logs "CPU process group does not support alltoall yet"); with NCCL they are all-to-all;
- ``Newton–Schulz``: time inside ``orthogonalize_many`` (the same wrapper in both runs), on the
  owned matrices (sharded) or on all of them (unsharded);
- ``rest``: the step minus those two (momentum, parameter update, Python and DTensor dispatch);
  each row is a median of its own per-step values, so the rows need not add up exactly;
- ``Newton–Schulz CPU time``: the CPU time of the calling thread in the same calls
  (``time.thread_time``; with one intra-op thread the matmuls run on it): the work each rank
  did, which other load on the machine does not inflate the way it inflates wall time;
- ``unsharded step``: the same update on plain full tensors in one process (rank 0, while the
  other rank waits), with the same thread count.

Each rank uses ``--threads`` intra-op threads (default 1, so 2 ranks use 2 cores, and the
unsharded step runs with 1 as well). The result of the sharded run is checked against the
unsharded one after the timed steps (max relative difference, float32).

Run: ``python benchmarks/sharded_muon.py [--dim 256] [--layers 4] [--steps 20]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def shapes(dim: int, layers: int) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(layers):
        out.update({f"blocks.{i}.attn.qkv.weight": (3 * dim, dim),
                    f"blocks.{i}.attn.proj.weight": (dim, dim),
                    f"blocks.{i}.mlp.fc1.weight": (4 * dim, dim),
                    f"blocks.{i}.mlp.fc2.weight": (dim, 4 * dim)})
    return out


def _worker(rank: int, port: int, args: argparse.Namespace, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(args.threads)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import functim as ft
    import functim.distributed as fd
    import functim.optimizers._routed as routed

    ns_time = [0.0, 0, 0.0]  # wall seconds, matrices, CPU seconds inside orthogonalize_many
    real = routed.orthogonalize_many

    def timed(mats, *a, **k):
        t, c = time.perf_counter(), time.thread_time()
        r = real(mats, *a, **k)
        ns_time[0] += time.perf_counter() - t
        ns_time[1] += len(mats)
        ns_time[2] += time.thread_time() - c
        return r

    routed.orthogonalize_many = timed
    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(0)
    full_p = {n: torch.randn(s, generator=g) for n, s in shapes(args.dim, args.layers).items()}
    full_g = {n: torch.randn(s, generator=g) for n, s in shapes(args.dim, args.layers).items()}
    opt = ft.muon(lr=0.02, muon_params="*")

    # sharded: every rank, timed between barriers
    params = {n: distribute_tensor(x.clone(), mesh, [Shard(0)]) for n, x in full_p.items()}
    grads = {n: distribute_tensor(x, mesh, [Shard(0)]) for n, x in full_g.items()}
    state = opt.init_state(params)
    rows = []
    for i in range(args.warmup + args.steps):
        ns_time[:] = [0.0, 0, 0.0]
        dist.barrier()
        with fd.owner_stats(timing=True) as st, torch.no_grad():
            t = time.perf_counter()
            params, state = opt.update(params, grads, state, donate=True)
            total = time.perf_counter() - t
        dist.barrier()
        if i >= args.warmup:
            rows.append((total, st.exchange_s, ns_time[0], total - st.exchange_s - ns_time[0],
                         ns_time[2], st.computed))
    sharded = {k: statistics.median(r[j] for r in rows)
               for j, k in enumerate(("total", "exchange", "ns", "rest", "ns_cpu", "computed"))}
    slowest = [None] * WORLD
    dist.all_gather_object(slowest, [r[0] for r in rows])
    sharded["slowest_total"] = statistics.median(max(ts) for ts in zip(*slowest))
    final = {n: p.full_tensor() for n, p in params.items()}

    # unsharded: the same steps on rank 0 alone, same thread count
    if rank == 0:
        p_plain = {n: x.clone() for n, x in full_p.items()}
        s_plain = opt.init_state(p_plain)
        urows = []
        for i in range(args.warmup + args.steps):
            ns_time[:] = [0.0, 0, 0.0]
            with torch.no_grad():
                t = time.perf_counter()
                p_plain, s_plain = opt.update(p_plain, full_g, s_plain, donate=True)
                total = time.perf_counter() - t
            if i >= args.warmup:
                urows.append((total, ns_time[0], ns_time[1], ns_time[2]))
        out["unsharded"] = {"total": statistics.median(r[0] for r in urows),
                            "ns": statistics.median(r[1] for r in urows),
                            "matrices": urows[0][2],
                            "ns_cpu": statistics.median(r[3] for r in urows)}
        out["max_rel_diff"] = max(((final[n] - p_plain[n]).abs().max()
                                   / p_plain[n].abs().max()).item() for n in final)
    out[f"rank{rank}"] = sharded
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, args, out), nprocs=WORLD, join=True)
        out = dict(out)
    n = len(shapes(args.dim, args.layers))
    params = sum(a * b for a, b in shapes(args.dim, args.layers).values())
    u = out["unsharded"]
    ms = lambda x: f"{1e3 * x:8.2f} ms"
    print(f"torch {torch.__version__}, {WORLD} ranks on CPU (gloo), {args.threads} thread(s) "
          f"per rank; {n} matrices (dim {args.dim}, {args.layers} layers, {params:,} params), "
          f"float32; median of {args.steps} steps after {args.warmup} warmup")
    print(f"{'':34s}" + "".join(f"{'rank ' + str(r):>13s}" for r in range(WORLD)))
    for key, label in (("total", "sharded step (this rank)"),
                       ("exchange", "  exchange (gather + scatter)"),
                       ("ns", "  Newton-Schulz (owned)"),
                       ("rest", "  rest (momentum, update, Python)"),
                       ("ns_cpu", "  Newton-Schulz CPU time (owned)")):
        print(f"{label:34s}" + "".join(f"{ms(out[f'rank{r}'][key]):>13s}" for r in range(WORLD)))
    print(f"{'  matrices orthogonalised':34s}" + "".join(
        f"{int(out[f'rank{r}']['computed']):>13d}" for r in range(WORLD)))
    print(f"{'sharded step (slowest rank)':34s}{ms(out['rank0']['slowest_total']):>13s}")
    print(f"{'unsharded step (1 process)':34s}{ms(u['total']):>13s}")
    print(f"{'  Newton-Schulz (all ' + str(u['matrices']) + ')':34s}{ms(u['ns']):>13s}")
    print(f"{'  Newton-Schulz CPU time (all)':34s}{ms(u['ns_cpu']):>13s}")
    print(f"sharded / unsharded: {out['rank0']['slowest_total'] / u['total']:.2f}x; "
          f"max relative difference of the params after all steps: {out['max_rel_diff']:.1e}")


if __name__ == "__main__":
    main()
