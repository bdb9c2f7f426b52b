"""The model: nanoGPT's shape (learned positions, pre-LayerNorm blocks, GELU MLP, untied
``lm_head``) with nanoGPT's parameter names, so path rules (weight-decay masks, Muon's AdamW
fallback) route it as they would route nanoGPT."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .corpus import VOCAB


@dataclass(frozen=True)
class ModelSize:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # context length
    batch_size: int
    eval_batches: int = 4


MODEL_SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8),
    "small": ModelSize(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16),
    "medium": ModelSize(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64),
}


class Block(nn.Module):
    def __init__(self, cfg: ModelSize):
        super().__init__()
        d = cfg.n_embd
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(d, 3 * d), "c_proj": nn.Linear(d, d)})
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.attn["c_attn"](self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn["c_proj"](y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x))))


class GPT(nn.Module):
    """A nanoGPT-shaped character model (no dropout, untied head)."""

    def __init__(self, cfg: ModelSize, vocab_size: int = len(VOCAB)):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        for name, p in self.named_parameters():  # GPT-2 initialisation
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy (nats)."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())
