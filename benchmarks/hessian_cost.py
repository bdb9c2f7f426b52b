"""Cost of one Hessian-diagonal estimate relative to one plain forward+backward, on a small
transformer language model (issue: "Sophia with Hessian estimators built on torch.func").

What it measures
----------------
A GPT-style decoder (token + position embeddings, ``--layers`` pre-LayerNorm blocks of causal
multi-head attention written with matmuls and a 4x GELU MLP, a final LayerNorm, an untied output
head), float32, on ``--device``. Per repetition, each case is timed once with
``time.perf_counter`` (CUDA: synchronized before and after), cases interleaved round-robin so that
load on a shared machine affects them alike; the table reports the median and the minimum over
``--repeats`` repetitions after ``--warmup`` untimed ones, and two ratios to the plain
forward+backward: of the medians (``x plain``, the one compared with the targets) and of the
minima (``x (min)``, less sensitive to other load on the machine). Cases:

- ``plain fwd+bwd`` (the reference, ratio 1): ``F.cross_entropy(model(x), y).backward()`` on
  the ``nn.Module`` (grads set to ``None`` before each repetition);
- ``torch.func.grad``: the same loss through ``torch.func.grad`` of
  ``torch.func.functional_call`` (functim's functional loop);
- ``GNB``: :func:`functim.gnb_hessian` (forward, label sampling from the model's softmax, one
  backward, ``B·ĝ⊙ĝ``), target ≤ 1.3x;
- ``Hutchinson``: :func:`functim.hutchinson_hessian` with one Rademacher probe (``jvp`` of
  ``grad``: forward-mode AD through a forward and a backward, then ``u⊙Hu``), target ≤ 2.5x.

Run: ``python benchmarks/hessian_cost.py`` (defaults: CPU, 2 layers, d_model 128, 4 heads,
vocab 512, batch 8 x 128 tokens; ``--threads`` sets ``torch.set_num_threads``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import functim as ft


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int, block: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = TinyGPT(args.vocab, args.d_model, args.heads, args.layers, args.seq).to(dev)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    params = {n: p.detach() for n, p in model.named_parameters()}
    n_params = sum(p.numel() for p in params.values())

    def logits_fn(ps, idx):
        return torch.func.functional_call(model, ps, (idx,))

    def loss_fn(ps, batch):
        idx, tgt = batch
        return F.cross_entropy(logits_fn(ps, idx).flatten(0, 1), tgt.flatten())

    grad_fn = torch.func.grad(loss_fn)
    key = ft.hessian.rng_key(0, device=dev)

    def plain():
        for p in model.parameters():
            p.grad = None
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()

    cases = {
        "plain fwd+bwd": plain,
        "torch.func.grad": lambda: grad_fn(params, (x, y)),
        "GNB": lambda: ft.gnb_hessian(logits_fn, params, x, key),
        "Hutchinson (1 probe)": lambda: ft.hutchinson_hessian(loss_fn, params, (x, y), key),
    }
    targets = {"GNB": 1.3, "Hutchinson (1 probe)": 2.5}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.warmup + args.repeats):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}; "
          f"TinyGPT: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, vocab "
          f"{args.vocab}, {n_params:,} params; batch {args.batch} x {args.seq} tokens; "
          f"{args.repeats} repeats after {args.warmup} warmup")
    base = statistics.median(times["plain fwd+bwd"])
    base_min = min(times["plain fwd+bwd"])
    print(f"{'case':24s} {'median ms':>10s} {'min ms':>8s} {'x plain':>8s} {'x (min)':>8s} "
          f"{'target (on median)':>18s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = med / base
        target = targets.get(name)
        verdict = "" if target is None else (f"<={target}" + (" ok" if ratio <= target
                                                              else " MISSED"))
        print(f"{name:24s} {med * 1e3:10.2f} {min(ts) * 1e3:8.2f} {ratio:8.2f} "
              f"{min(ts) / base_min:8.2f} {verdict:>18s}")


if __name__ == "__main__":
    main()
