"""Sharded training with FSDP2 and a functim optimizer, with distributed checkpoints.

A small GPT-style language model learns sequences drawn from a random Markov chain over ``V``
tokens (the best achievable loss, the chain's conditional entropy, is printed as "floor"). The
model is sharded with PyTorch's own FSDP2 (``fully_shard``): its parameters, gradients and the
optimizer state are DTensor shards. The optimizer is functim's, either

- functional (default): ``params, state = opt.update(params, grads, state, donate=True)`` on
  ``dict(model.named_parameters())``; the state is a dict of DTensors and 0-d tensors that
  ``torch.distributed.checkpoint`` saves as is; or
- ``--surface adapter``: the torch.optim class (``functim.adapters.Muon`` ...), checkpointed with
  ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``.

With ``--optimizer muon`` (default) or ``scion`` each hidden matrix is orthogonalised whole, once,
on an owner rank (round-robin over the ranks), and the result is scattered back to the shards
(``functim.distributed.owner_compute``): the run equals unsharded Muon. Each log line shows how
many matrices this rank orthogonalised.

Run (one node, 2 processes; NCCL on GPUs, gloo on CPU)::

    torchrun --nproc_per_node 2 examples/fsdp_train.py --steps 200 --ckpt-dir ckpt --stop-at 100
    torchrun --nproc_per_node 2 examples/fsdp_train.py --steps 200 --ckpt-dir ckpt --resume

(the second command continues from step 100 and logs the same losses as one uninterrupted run of
200 steps).

Several nodes: the same script, launched on every node with
``torchrun --nnodes N --nproc_per_node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT``;
``--replicate N`` shards within each node and replicates across nodes (HSDP, a 2-D mesh).
``python examples/fsdp_train.py`` alone runs one process (a 1-rank group; on a busy CPU set
``OMP_NUM_THREADS`` as torchrun does, or intra-op threads oversubscribe the cores). A checkpoint
saved with one number of ranks loads with another (DCP reshards).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import functim.adapters as fa
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import functim as ft
import functim.distributed as fd

V, SEQ = 64, 32


# -- model and data ----------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_norm(x))))


class TinyGPT(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(V, d)
        self.pos_emb = nn.Parameter(0.02 * torch.randn(SEQ, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, V, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos_emb[: tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.norm(x))


def markov_chain(seed: int = 0) -> torch.Tensor:
    """A sparse-ish random transition matrix (each token has a few likely successors)."""
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(V, V, generator=g)
    return torch.softmax(logits, dim=-1)


def entropy_floor(P: torch.Tensor) -> float:
    """The chain's conditional entropy under its stationary distribution: the best loss."""
    pi = torch.ones(V) / V
    for _ in range(200):
        pi = pi @ P
    return float(-(pi[:, None] * P * P.clamp_min(1e-30).log()).sum())


def batch(P: torch.Tensor, step: int, rank: int, size: int, device) -> torch.Tensor:
    """This rank's batch for ``step`` (different on every rank, reproducible on resume)."""
    g = torch.Generator().manual_seed(1_000_003 * step + rank)
    x = torch.empty(size, SEQ + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (size,), generator=g)
    for t in range(SEQ):
        x[:, t + 1] = torch.multinomial(P[x[:, t]], 1, generator=g).squeeze(1)
    return x.to(device)


# -- optimizers ----------------------------------------------------------------------------------
def build_optimizer(name: str, surface: str, model: nn.Module, steps: int):
    """The same optimizer as a functional ``ft.Optimizer`` or a torch.optim adapter."""
    if surface == "functional":
        if name == "muon":
            lr = ft.warmup_cosine(0.02, warmup_steps=min(20, steps // 10), total_steps=steps)
            return ft.chain(ft.clip_by_global_norm(1.0),
                            ft.muon(lr=lr, weight_decay=0.01, adamw_weight_decay=0.01))
        if name == "scion":
            return ft.scion(lr=ft.warmup_cosine(0.01, warmup_steps=min(20, steps // 10),
                                                total_steps=steps), momentum=0.1)
        if name == "adamw":
            return ft.adamw(lr=ft.warmup_cosine(3e-3, warmup_steps=min(20, steps // 10),
                                                total_steps=steps),
                            weight_decay=0.1, weight_decay_mask=ft.default_weight_decay_mask)
        if name == "lion":
            return ft.lion(lr=3e-4, weight_decay=0.1)
        raise ValueError(f"unknown optimizer {name!r}")
    named = model.named_parameters()
    if name == "muon":
        return fa.Muon(named, lr=0.02, weight_decay=0.01, adamw_weight_decay=0.01)
    if name == "scion":
        return fa.Scion(named, lr=0.01, momentum=0.1)
    if name == "adamw":
        return fa.AdamW(named, lr=3e-3, weight_decay=0.1)
    if name == "lion":
        return fa.Lion(named, lr=3e-4, weight_decay=0.1)
    raise ValueError(f"unknown optimizer {name!r}")


# -- checkpoints ---------------------------------------------------------------------------------
def save(path: str, model, surface: str, opt, state, step: int) -> None:
    optim = state if surface == "functional" else get_optimizer_state_dict(model, opt)
    dcp.save({"model": get_model_state_dict(model), "optim": optim,
              "trainer": {"step": torch.tensor(step)}}, checkpoint_id=path)


def load(path: str, model, surface: str, opt, state) -> tuple[object, int]:
    """Load in place into the freshly built model and optimizer state; returns (state, step)."""
    optim = state if surface == "functional" else get_optimizer_state_dict(model, opt)
    sd = {"model": get_model_state_dict(model), "optim": optim,
          "trainer": {"step": torch.tensor(0)}}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    if surface == "adapter":
        set_optimizer_state_dict(model, opt, sd["optim"])
    return sd["optim"], int(sd["trainer"]["step"])


def latest(ckpt_dir: str) -> str | None:
    steps = [int(n.split("_")[1]) for n in os.listdir(ckpt_dir) if n.startswith("step_")] \
        if os.path.isdir(ckpt_dir) else []
    return os.path.join(ckpt_dir, f"step_{max(steps)}") if steps else None


# -- main ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16, help="sequences per rank and step")
    ap.add_argument("--optimizer", default="muon", choices=["muon", "scion", "adamw", "lion"])
    ap.add_argument("--surface", default="functional", choices=["functional", "adapter"])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ckpt-dir", default=None, help="save here every --save-every steps")
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop (and save) after this step, as if interrupted; --steps still "
                         "sets the schedule's length")
    ap.add_argument("--replicate", type=int, default=1,
                    help="HSDP: replicate over this many groups, shard within each")
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args()

    if "RANK" not in os.environ:  # plain `python fsdp_train.py`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if world % args.replicate:
        raise SystemExit(f"--replicate {args.replicate} does not divide {world} ranks")
    shape = (world,) if args.replicate == 1 else (args.replicate, world // args.replicate)
    names = ("shard",) if args.replicate == 1 else ("replicate", "shard")
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)

    torch.manual_seed(0)  # the same initial weights on every rank (fully_shard keeps its shard)
    model = TinyGPT(args.dim, args.layers).to(device)
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)

    opt = build_optimizer(args.optimizer, args.surface, model, args.steps)
    params = dict(model.named_parameters())  # DTensor shards, updated in place
    state = opt.init_state(params) if args.surface == "functional" else None
    start = 0
    if args.resume:
        path = latest(args.ckpt_dir) if args.ckpt_dir else None
        if path is None:
            raise SystemExit(f"--resume: no checkpoint in {args.ckpt_dir!r}")
        state, start = load(path, model, args.surface, opt, state)
        if rank == 0:
            print(f"resumed from {path} at step {start}")

    P = markov_chain()
    if rank == 0:
        print(f"{world} rank(s) ({dist.get_backend()}, mesh {tuple(shape)}), {args.optimizer} "
              f"({args.surface}); loss floor {entropy_floor(P):.3f}, uniform {math.log(V):.3f}")
    t0 = time.perf_counter()
    stop = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    for step in range(start, stop):
        tokens = batch(P, step, rank, args.batch, device)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()  # FSDP2 reduce-scatters: each rank holds its shard of the mean gradient
        with fd.owner_stats() as stats, torch.no_grad():
            if args.surface == "functional":
                grads = {n: p.grad for n, p in params.items()}
                new, state = opt.update(params, grads, state, donate=True)
                for n, p in params.items():  # donate=True updated them in place already
                    if new[n] is not p:
                        p.copy_(new[n])
            else:
                opt.step()
        model.zero_grad(set_to_none=True)
        done = step + 1
        if done % args.log_every == 0 or done == stop:
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            if rank == 0:
                dt = (time.perf_counter() - t0) / (done - start)
                print(f"step {done:5d}  loss {avg.item() / world:.4f}  {1e3 * dt:.1f} ms/step  "
                      f"matrices orthogonalised on rank 0: {stats.computed}")
        if args.ckpt_dir and (done % args.save_every == 0 or done == stop):
            save(os.path.join(args.ckpt_dir, f"step_{done}"), model, args.surface, opt, state,
                 done)
    dist.barrier()  # no rank tears down gloo while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
