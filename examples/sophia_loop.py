"""Sophia with functim's Hessian estimators, in a functional loop and in a plain PyTorch loop.

The task: next-token prediction on sequences drawn from a random Markov chain over ``V`` tokens,
with a small model (embedding → tanh MLP → logits). The best achievable loss is the chain's
conditional entropy, printed as "floor".

1. Functional (``ft.sophia`` + ``ft.gnb_hessian``): gradients and the Hessian estimate are
   computed at the same params; the estimate goes to the update right after steps k, 2k, ...
   (``opt.hessian_due``), where the EMA is applied before the step — the order of the SophiaG
   reference's ``train_sophiag.py``. The estimators' RNG key lives in ``state["rng"]``.
2. torch.optim (``functim.adapters.Sophia``), mirroring ``train_sophiag.py``: ``step()`` every
   iteration, and after steps k, 2k, ... ``update_hessian(model=..., inputs=...)`` on the next
   batch (GNB with the optimizer's RNG; or ``--estimator hutchinson``).

Both save and reload their state halfway (``torch.save``), which changes nothing: the RNG key is
part of the state. The two loops see the same batches at the same params and draw from the same
RNG stream (after ``t`` completed steps, both estimate on batch ``t``: the functional loop's
current batch, the adapter loop's next one), so they follow the same trajectory, up to the
rounding of the two gradient-clipping implementations when clipping is active.

Run: ``python examples/sophia_loop.py [--steps 300] [--estimator gnb|hutchinson]``
(a few seconds on a CPU).
"""

from __future__ import annotations

import argparse
import io

import torch
import torch.nn as nn
import torch.nn.functional as F
from functim.adapters import Sophia

import functim as ft

V, T, BATCH = 32, 16, 32


def markov_chain(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3.0 * torch.randn(V, V, generator=g), dim=-1)  # rows: P(next | token)


def batch(chain: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (BATCH, T) each; deterministic in ``index``."""
    g = torch.Generator().manual_seed(1000 + index)
    seq = [torch.randint(0, V, (BATCH,), generator=g)]
    for _ in range(T):
        seq.append(torch.multinomial(chain[seq[-1]], 1, generator=g).squeeze(-1))
    tokens = torch.stack(seq, dim=1)
    return tokens[:, :-1], tokens[:, 1:]


def entropy_floor(chain: torch.Tensor) -> float:
    """Expected conditional entropy under the chain's stationary distribution."""
    pi = torch.full((V,), 1.0 / V)
    for _ in range(200):
        pi = pi @ chain
    return float(-(pi[:, None] * chain * chain.log()).sum())


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(V, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, V))


def functional(chain: torch.Tensor, steps: int, estimator: str) -> float:
    model = make_model()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def logits_fn(p, x):
        return torch.func.functional_call(model, p, (x,))

    def loss_fn(p, batch_):
        x, y = batch_
        return F.cross_entropy(logits_fn(p, x).flatten(0, 1), y.flatten())

    sophia = ft.sophia(lr=3e-3, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
    # gradient clipping as train_sophiag.py; chain passes hessian= on to sophia
    opt = ft.chain(ft.clip_by_global_norm(1.0), sophia)
    state = opt.init_state(params)  # {"transforms": [...], "optimizer": sophia's state}
    grad_and_loss = torch.func.grad_and_value(loss_fn)
    for t in range(steps):  # t = completed updates
        xy = batch(chain, t)
        grads, loss = grad_and_loss(params, xy)
        hess = None
        if sophia.hessian_due(t):  # t = k, 2k, ...: right after steps k, 2k, ...
            key = state["optimizer"]["rng"]
            if estimator == "gnb":
                hess, key = ft.gnb_hessian(logits_fn, params, xy[0], key, clip_norm=1.0)
            else:
                hess, key = ft.hutchinson_hessian(loss_fn, params, xy, key)
            state = {**state, "optimizer": {**state["optimizer"], "rng": key}}
        params, state = opt.update(params, grads, state, hessian=hess)
        if t == steps // 2:  # checkpoint round trip: params and state are plain tensors
            buf = io.BytesIO()
            torch.save({"params": params, "state": state}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            params, state = saved["params"], saved["state"]
        if t % 50 == 0 or t == steps - 1:
            print(f"  functional step {t:4d}  loss {float(loss):.4f}")
    return float(loss)


def adapter(chain: torch.Tensor, steps: int, estimator: str) -> float:
    model = make_model()
    opt = Sophia(model.named_parameters(), lr=3e-3, betas=(0.965, 0.99), rho=0.04,
                 weight_decay=0.1)
    for it in range(steps):
        x, y = batch(chain, it)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if opt.hessian_due():  # after steps k, 2k, ... (train_sophiag: iter % k == k - 1)
            x_next, y_next = batch(chain, it + 1)
            if estimator == "gnb":
                opt.update_hessian(model=model, inputs=x_next, clip_norm=1.0)
            else:
                opt.update_hessian(model=model, inputs=x_next, estimator="hutchinson",
                                   loss_fn=lambda out, y=y_next: F.cross_entropy(
                                       out.flatten(0, 1), y.flatten()))
        if it == steps // 2:  # checkpoint round trip into fresh objects
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            model = make_model()
            model.load_state_dict(saved["model"])
            opt = Sophia(model.named_parameters(), lr=3e-3, betas=(0.965, 0.99), rho=0.04,
                         weight_decay=0.1)
            opt.load_state_dict(saved["opt"])
        if it % 50 == 0 or it == steps - 1:
            # the reference's "win rate": the fraction of coordinates not clipped
            unclipped = sum(int((s["exp_avg"].abs() < 0.04 * s["hessian"]).sum())
                            for s in opt.state.values())
            total = sum(p.numel() for p in model.parameters())
            print(f"  adapter    step {it:4d}  loss {float(loss):.4f}  "
                  f"win rate {unclipped / total:.2f}")
    return float(loss)


def main() -> None:
    ap = argparse.ArgumentParser(description="Sophia with functim's Hessian estimators")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--estimator", choices=("gnb", "hutchinson"), default="gnb")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny tensors
    chain = markov_chain()
    x, y = batch(chain, 0)
    print(f"floor (chain entropy) {entropy_floor(chain):.4f}, "
          f"uniform {float(torch.log(torch.tensor(float(V)))):.4f}")
    with torch.no_grad():
        first = F.cross_entropy(make_model()(x).flatten(0, 1), y.flatten())
    print(f"initial loss {float(first):.4f}")
    print(f"functional loop (ft.sophia + {args.estimator}):")
    functional(chain, args.steps, args.estimator)
    print(f"torch.optim loop (functim.adapters.Sophia + {args.estimator}):")
    adapter(chain, args.steps, args.estimator)


if __name__ == "__main__":
    main()
