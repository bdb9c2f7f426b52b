"""``functim-compare``: train a small GPT-style character-level language model with several
optimizers, side by side, and report what each did.

``python -m functim.compare`` (also the console script ``functim-compare``; needs the ``demo``
extra: ``pip install "functim[demo]"``). Every optimizer starts from the same initial weights
and sees the same batches in the same order under the same learning-rate schedule; only the
optimizer differs. At the end it prints a table (final train and eval loss, tokens/s, optimizer
step time, optimizer state bytes per parameter) and writes ``loss.png`` (loss curves),
``results.json`` (every curve and figure, and the settings) and ``table.md`` under ``--out``.

Choices:

- **Corpus**: a fixed list of Python standard-library sources (:data:`STDLIB_FILES`, read from
  the running interpreter's stdlib, so nothing is downloaded; about 1 MB on CPython 3.11; the
  exact text depends on the Python version). Characters are a fixed 97-symbol vocabulary (tab,
  newline and printable ASCII); anything else becomes ``?``. The last 10% of every file is the
  eval split.
- **Model**: nanoGPT's shape (learned positions, pre-LayerNorm blocks, GELU MLP, untied
  ``lm_head``), with nanoGPT's parameter names (``wte``, ``wpe``, ``blocks.N.ln_1``,
  ``blocks.N.attn.c_attn``, ``blocks.N.mlp.c_fc``, ``ln_f``, ``lm_head``), so path rules
  (weight-decay masks, Muon's AdamW fallback) route it as they would route nanoGPT.
- **Schedule**: ``lr(s) = peak·u(s)`` with ``u = functim.warmup_cosine(1.0, W, T)`` (linear warmup
  over the first ``W = T//10`` updates, cosine to 0 at ``T``). It multiplies *every* hyperparameter
  named ``lr`` (e.g. both halves of a composite optimizer), the same way on both surfaces:
  ``functim.set_hyperparams`` on the functional state before each update, and
  ``torch.optim.lr_scheduler.LambdaLR(opt, u)`` on the adapter, so a composite optimizer with
  several learning rates needs no special handling. Schedule-Free AdamW is run as its authors
  intend instead: its built-in warmup over the same ``W`` updates and no decay.
- **Surfaces**: ``--surface functional`` (default) computes gradients with
  ``torch.func.grad_and_value`` over ``torch.func.functional_call`` and steps with
  ``opt.update(params, grads, state, donate=True)``; ``--surface adapter`` uses the
  ``functim.adapters`` class with ``model.named_parameters()`` and ``loss.backward()``.
- **Threads**: one torch CPU thread by default on ``--device cpu``. The default model is too
  small to gain much from more, and on a machine busy with other work two threads made the
  default run several times slower (``--threads`` overrides).
- **Figures**: train loss = mean of the last ``min(10, steps)`` steps' batch losses; eval loss =
  mean cross-entropy over a fixed set of eval windows (Schedule-Free AdamW at its averaged point
  ``x``); tokens/s = training tokens / time in training steps (forward, backward, optimizer;
  evaluation and the first step, which pays one-time setup costs, excluded); opt step ms =
  median time of the optimizer update alone; state B/param = bytes of the optimizer's
  per-parameter state tensors (0-d scalars left out) / parameter count.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import functim as ft

PROG = "functim-compare"
SURFACES = ("functional", "adapter")
DEFAULT_OPTIMIZERS = ("adamw", "muon", "lion")

# -- corpus ---------------------------------------------------------------------------------------
STDLIB_FILES: tuple[str, ...] = (
    "argparse.py", "ast.py", "calendar.py", "collections/__init__.py", "configparser.py",
    "contextlib.py", "dataclasses.py", "difflib.py", "enum.py", "fractions.py", "functools.py",
    "heapq.py", "inspect.py", "json/decoder.py", "json/encoder.py", "pprint.py", "shlex.py",
    "statistics.py", "string.py", "textwrap.py", "tokenize.py", "typing.py",
)
VOCAB = "\t\n" + "".join(chr(c) for c in range(32, 127))
EVAL_FRACTION = 0.1
MIN_CORPUS_CHARS = 100_000


class UsageError(Exception):
    """A bad option: reported as one line and exit status 2."""


class CorpusError(RuntimeError):
    """The default corpus is not there: reported as one line and exit status 1."""


@dataclass
class Corpus:
    train: torch.Tensor  # int64 token ids
    eval: torch.Tensor
    files: list[str]


def _encode(text: str) -> torch.Tensor:
    lut = torch.full((256,), VOCAB.index("?"), dtype=torch.int64)
    for i, ch in enumerate(VOCAB):
        lut[ord(ch)] = i
    raw = torch.frombuffer(bytearray(text.encode("ascii", errors="replace")), dtype=torch.uint8)
    return lut[raw.long()]


def load_corpus() -> Corpus:
    """The standard-library sources of :data:`STDLIB_FILES` that exist in this interpreter."""
    root = sysconfig.get_paths()["stdlib"]
    train_parts, eval_parts, files = [], [], []
    for rel in STDLIB_FILES:
        path = os.path.join(root, *rel.split("/"))
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        cut = int(len(text) * (1 - EVAL_FRACTION))
        train_parts.append(text[:cut])
        eval_parts.append(text[cut:])
        files.append(rel)
    train, held = "\n\n".join(train_parts), "\n\n".join(eval_parts)
    if len(train) + len(held) < MIN_CORPUS_CHARS:
        raise CorpusError(f"found only {len(train) + len(held)} characters of Python sources "
                           f"under {root}; the default corpus needs the standard library's .py "
                           "files")
    return Corpus(_encode(train), _encode(held), files)


# -- model ----------------------------------------------------------------------------------------
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


def _lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


# -- the optimizer registry -----------------------------------------------------------------------
FunctionalFactory = Callable[[float | None, int], ft.Optimizer]
AdapterFactory = Callable[[Iterable[tuple[str, torch.Tensor]], float | None, int],
                          torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerEntry:
    """How ``functim-compare`` builds one optimizer on each surface.

    ``functional(lr, warmup_steps)`` returns the ``functim`` optimizer and
    ``adapter(named_params, lr, warmup_steps)`` the ``functim.adapters`` one (None: no adapter
    yet), both with the settings in ``settings``. ``lr`` is the default peak learning rate
    (None: the constructor's own default). ``builtin_warmup``: the optimizer warms up by itself
    over ``warmup_steps`` and gets no external schedule. ``eval_params(params, state)``: the
    point to evaluate when it is not the training point (functional surface; the adapter's
    ``eval()``/``train()`` are called instead).
    """

    name: str
    functional: FunctionalFactory
    adapter: AdapterFactory | None
    lr: float | None
    settings: str
    builtin_warmup: bool = False
    eval_params: Callable[[Any, Any], Any] | None = None


def _lr_kw(lr: float | None) -> dict:
    return {} if lr is None else {"lr": lr}


def _entry(name: str, adapter_class: str, lr: float | None, settings: str, *,
           builtin_warmup: bool = False, eval_params=None, **kwargs: Any) -> OptimizerEntry:
    """An entry whose functional constructor ``functim.<name>`` and adapter class
    ``functim.adapters.<adapter_class>`` take the same keywords ``kwargs``."""
    from functim import adapters

    fn = getattr(ft, name)
    cls = getattr(adapters, adapter_class, None)
    warm = (lambda w: {"warmup_steps": w}) if builtin_warmup else (lambda w: {})

    def functional(lr: float | None, warmup_steps: int) -> ft.Optimizer:
        return fn(**_lr_kw(lr), **warm(warmup_steps), **kwargs)

    def adapter(named_params, lr: float | None, warmup_steps: int) -> torch.optim.Optimizer:
        return cls(named_params, **_lr_kw(lr), **warm(warmup_steps), **kwargs)

    return OptimizerEntry(name, functional, adapter if cls is not None else None, lr, settings,
                          builtin_warmup=builtin_warmup, eval_params=eval_params)


_MASK = {"weight_decay_mask": ft.default_weight_decay_mask}
_WD = "weight decay on matrices only (ft.default_weight_decay_mask)"

# One builder per optimizer name; a name is offered only when ``hasattr(functim, name)``, so an
# entry for an optimizer that has not landed yet costs nothing until it does. Settings follow the
# usual LLM-pretraining choices (nanoGPT-style AdamW; Lion at 1/10 of AdamW's lr and 10x its
# weight decay, algorithms.md §10) or, where marked, the constructor's own defaults.
_BUILDERS: dict[str, Callable[[], OptimizerEntry]] = {
    "adamw": lambda: _entry(
        "adamw", "AdamW", 3e-3, f"betas (0.9, 0.95), wd 0.1, {_WD}",
        betas=(0.9, 0.95), weight_decay=0.1, **_MASK),
    "nadamw": lambda: _entry(
        "nadamw", "NAdamW", 3e-3, f"optax form, betas (0.9, 0.95), wd 0.1, {_WD}",
        betas=(0.9, 0.95), weight_decay=0.1, **_MASK),
    "cautious_adamw": lambda: _entry(
        "cautious_adamw", "CautiousAdamW", 3e-3, f"betas (0.9, 0.95), wd 0.1, {_WD}",
        betas=(0.9, 0.95), weight_decay=0.1, **_MASK),
    "lion": lambda: _entry(
        "lion", "Lion", 3e-4, f"betas (0.9, 0.99), wd 1.0, {_WD}",
        betas=(0.9, 0.99), weight_decay=1.0, **_MASK),
    "cautious_lion": lambda: _entry(
        "cautious_lion", "CautiousLion", 3e-4, f"betas (0.95, 0.98), wd 1.0, {_WD}",
        betas=(0.95, 0.98), weight_decay=1.0, **_MASK),
    "signum": lambda: _entry(
        "signum", "Signum", 3e-4, f"beta 0.95, wd 1.0, {_WD}",
        beta=0.95, weight_decay=1.0, **_MASK),
    "signsgd": lambda: _entry(
        "signsgd", "SignSGD", 1e-4, f"wd 1.0, {_WD}", weight_decay=1.0, **_MASK),
    "mars": lambda: _entry(
        "mars", "Mars", 3e-3, "MARS-AdamW, betas (0.95, 0.99), gamma 0.025, wd 0.1 on matrices; "
        "non-2-D params: AdamW with lr_1d/lr = 1 (reference defaults)",
        betas=(0.95, 0.99), weight_decay=0.1, **_MASK),
    "schedule_free_adamw": lambda: _entry(
        "schedule_free_adamw", "ScheduleFreeAdamW", 3e-3,
        f"betas (0.9, 0.95), wd 0.1, {_WD}; built-in warmup, no decay, eval at x",
        builtin_warmup=True, eval_params=ft.schedule_free_eval_params,
        betas=(0.9, 0.95), weight_decay=0.1, **_MASK),
    "sgd": lambda: _entry(
        "sgd", "SGD", 0.3, f"momentum 0.9, nesterov, wd 1e-4, {_WD}",
        momentum=0.9, nesterov=True, weight_decay=1e-4, **_MASK),
    # Muon's default routing: hidden matrices to Muon; embeddings, head, norms, biases and
    # ndim < 2 to AdamW, whose lr is adamw_lr_ratio x lr (so the schedule scales both), here
    # 0.15 x 0.02 = 3e-3, the AdamW run's lr.
    "muon": lambda: _entry(
        "muon", "Muon", 0.02, "Keller defaults (momentum 0.95, nesterov, wd 0); AdamW fallback "
        "for embeddings/head/norms/biases at lr 0.15 x lr, betas (0.9, 0.95)",
        adamw_lr_ratio=0.15),
    "scion": lambda: _entry("scion", "Scion", None, "constructor defaults"),
    "soap": lambda: _entry("soap", "Soap", None, "constructor defaults"),
    "kron": lambda: _entry("kron", "Kron", None, "constructor defaults"),
    # sophia is left out: it needs Hessian estimates (an extra loss_fn pass), not just gradients.
}


def registry() -> dict[str, OptimizerEntry]:
    """The optimizers ``functim-compare`` can run in this version of functim, by name."""
    return {name: build() for name, build in _BUILDERS.items() if hasattr(ft, name)}


# -- training -------------------------------------------------------------------------------------
@dataclass
class RunResult:
    optimizer: str
    surface: str
    lr: list[float]  # the peak value of every hyperparameter named lr
    settings: str
    train_loss: list[float | None]  # per step (None where non-finite)
    eval_steps: list[int]
    eval_loss: list[float | None]
    tokens_per_s: float
    optimizer_step_ms: float
    state_bytes_per_param: float
    wall_s: float
    diverged_at: int | None = None
    final_train_loss: float | None = field(default=None)
    final_eval_loss: float | None = field(default=None)


@dataclass(frozen=True)
class RunConfig:
    steps: int
    model_size: str
    seed: int
    device: str
    surface: str
    eval_every: int

    @property
    def size(self) -> ModelSize:
        return MODEL_SIZES[self.model_size]

    @property
    def warmup_steps(self) -> int:
        return self.steps // 10


class Batches:
    """The same batches, in the same order, for every optimizer."""

    def __init__(self, corpus: Corpus, cfg: RunConfig):
        size, dev = cfg.size, torch.device(cfg.device)
        t = size.block_size
        if len(corpus.train) <= t + 1 or len(corpus.eval) <= t + 1:
            raise CorpusError("the corpus is shorter than one context window")
        g = torch.Generator().manual_seed(cfg.seed)
        self.starts = torch.randint(0, len(corpus.train) - t - 1, (cfg.steps, size.batch_size),
                                    generator=g)
        self.window = torch.arange(t + 1)
        self.train = corpus.train.to(dev)
        n_eval = size.eval_batches * size.batch_size
        eval_starts = torch.linspace(0, len(corpus.eval) - t - 1, n_eval).long()
        eval_tokens = corpus.eval.to(dev)[eval_starts[:, None] + self.window]
        bs = size.batch_size
        self.eval = [(eval_tokens[i:i + bs, :-1], eval_tokens[i:i + bs, 1:])
                     for i in range(0, n_eval, bs)]

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.train[(self.starts[step][:, None] + self.window).to(self.train.device)]
        return tok[:, :-1], tok[:, 1:]


def state_nbytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct tensors of dim >= 1 among ``tensors`` (0-d scalars left out; a
    tensor that several params share, such as a group's random-generator state, counts once)."""
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.ndim > 0:
            seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())


def _tensor_leaves(tree: Any) -> list:
    import optree

    return optree.tree_leaves(tree, none_is_leaf=True)


class _Timer:
    """Wall time of code sections, synchronizing the device around each on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _is_lr(path: str) -> bool:
    return path.rsplit(".", 1)[-1] == "lr"


def train_one(entry: OptimizerEntry, lr: float | None, model0: GPT, batches: Batches,
              cfg: RunConfig, progress: Callable[..., Any] | None = None) -> RunResult:
    """Train a copy of ``model0`` with one optimizer on ``cfg.surface``; see the module doc."""
    device = torch.device(cfg.device)
    steps, warmup = cfg.steps, cfg.warmup_steps
    unit = ft.warmup_cosine(1.0, warmup_steps=warmup, total_steps=steps)
    scheduled = not entry.builtin_warmup
    timer = _Timer(device)
    model = copy.deepcopy(model0).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = cfg.size.batch_size * cfg.size.block_size

    if cfg.surface == "functional":
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt = entry.functional(lr, warmup)
        state = opt.init_state(params)
        base_lr = {p: float(v) for p, v in ft.get_hyperparams(state).items() if _is_lr(p)}
        peak = sorted(set(base_lr.values()), reverse=True)

        def loss_fn(p, x, y):
            return _lm_loss(torch.func.functional_call(model, p, (x,)), y)

        grad_and_loss = torch.func.grad_and_value(loss_fn)

        def train_step(step: int, x, y):
            nonlocal params, state
            grads, loss = grad_and_loss(params, x, y)
            if scheduled:
                u = float(unit(step))
                state = ft.set_hyperparams(state, **{p: b * u for p, b in base_lr.items()})
            t0 = timer.now()
            params, state = opt.update(params, grads, state, donate=True)
            return loss, timer.now() - t0

        @torch.no_grad()
        def evaluate() -> float:
            p = entry.eval_params(params, state) if entry.eval_params else params
            return _mean_eval_loss(lambda x: torch.func.functional_call(model, p, (x,)), batches)

        def state_bytes() -> int:
            return state_nbytes(_tensor_leaves(state))
    else:
        if entry.adapter is None:
            raise ValueError(f"{entry.name} has no torch.optim adapter in functim.adapters yet; "
                             "use --surface functional")
        opt = entry.adapter(model.named_parameters(), lr, warmup)
        sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(unit(s)))
                 if scheduled else None)
        peak = sorted({float(g.get("initial_lr", g["lr"])) for g in opt.param_groups},
                      reverse=True)
        has_modes = entry.eval_params is not None

        def train_step(step: int, x, y):
            loss = _lm_loss(model(x), y)
            loss.backward()
            t0 = timer.now()
            opt.step()
            dt = timer.now() - t0
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
            return loss.detach(), dt

        @torch.no_grad()
        def evaluate() -> float:
            if has_modes:
                opt.eval()
            try:
                return _mean_eval_loss(model, batches)
            finally:
                if has_modes:
                    opt.train()

        def state_bytes() -> int:
            return state_nbytes(_tensor_leaves([dict(s) for s in opt.state.values()]))

    eval_at = set(range(cfg.eval_every, steps, cfg.eval_every)) | {steps}
    losses: list[torch.Tensor] = []
    step_times: list[float] = []  # optimizer update alone
    step_walls: list[float] = []  # whole training step
    eval_steps: list[int] = [0]
    eval_losses: list[float] = [evaluate()]
    diverged_at = None
    start = timer.now()
    bar = progress(total=steps, desc=entry.name, unit="step") if progress else None
    postfix: dict[str, str] = {}
    try:
        for step in range(steps):
            x, y = batches(step)
            t0 = timer.now()
            loss, dt = train_step(step, x, y)
            step_walls.append(timer.now() - t0)
            step_times.append(dt)
            losses.append(loss.detach())
            if bar is not None:
                bar.update(1)
                if step % 10 == 9 or step == steps - 1:
                    postfix["loss"] = f"{float(loss):.4f}"
                    bar.set_postfix(postfix, refresh=False)
            if step + 1 in eval_at:
                if not math.isfinite(float(loss)):
                    diverged_at = step
                    break
                eval_steps.append(step + 1)
                eval_losses.append(evaluate())
                if bar is not None:
                    postfix.update(loss=f"{float(loss):.4f}", eval=f"{eval_losses[-1]:.4f}")
                    bar.set_postfix(postfix)
    finally:
        if bar is not None:
            bar.close()
    wall = timer.now() - start
    train_loss = [_finite_or_none(v) for v in torch.stack(losses).cpu().tolist()]
    tail = train_loss[-min(10, len(train_loss)):]
    timed = step_walls[1:] or step_walls  # the first step pays one-time setup costs
    result = RunResult(
        optimizer=entry.name, surface=cfg.surface, lr=peak, settings=entry.settings,
        train_loss=train_loss, eval_steps=eval_steps,
        eval_loss=[_finite_or_none(v) for v in eval_losses],
        tokens_per_s=tokens_per_step * len(timed) / sum(timed),
        optimizer_step_ms=1e3 * statistics.median(step_times),
        state_bytes_per_param=state_bytes() / n_params, wall_s=wall, diverged_at=diverged_at)
    if diverged_at is None and None not in tail:
        result.final_train_loss = sum(tail) / len(tail)
        result.final_eval_loss = result.eval_loss[-1]
    return result


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _mean_eval_loss(forward: Callable[[torch.Tensor], torch.Tensor], batches: Batches) -> float:
    total = sum(float(_lm_loss(forward(x), y)) for x, y in batches.eval)
    return total / len(batches.eval)


def initial_model(cfg: RunConfig) -> GPT:
    """The initial weights every optimizer starts from (seeded, on the CPU)."""
    torch.manual_seed(cfg.seed)
    return GPT(cfg.size)


def run_comparison(names: Sequence[str], lrs: dict[str, float], cfg: RunConfig,
                   progress: Callable[..., Any] | None = None) -> tuple[list[RunResult], dict]:
    """Train one model per optimizer in ``names``; returns the results and run metadata."""
    reg = registry()
    entries = [reg[n] for n in names]
    corpus = load_corpus()
    model0 = initial_model(cfg)
    batches = Batches(corpus, cfg)
    width = max(len(n) for n in names)
    aligned = (lambda **kw: progress(**{**kw, "desc": kw["desc"].rjust(width)})) if progress \
        else None
    results = [train_one(e, lrs.get(e.name, e.lr), model0, batches, cfg, aligned)
               for e in entries]
    meta = {
        "functim_version": _version(),
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "config": {**asdict(cfg), "warmup_steps": cfg.warmup_steps,
                   "schedule": f"warmup_cosine(1.0, warmup_steps={cfg.warmup_steps}, "
                               f"total_steps={cfg.steps}) x peak lr",
                   "model": asdict(cfg.size), "torch_threads": torch.get_num_threads()},
        "model_params": sum(p.numel() for p in model0.parameters()),
        "corpus": {"source": "Python standard library", "files": corpus.files,
                   "train_chars": len(corpus.train), "eval_chars": len(corpus.eval),
                   "vocab_size": len(VOCAB)},
        "tokens_per_step": cfg.size.batch_size * cfg.size.block_size,
    }
    return results, meta


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("functim")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


# -- reporting ------------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str) -> str:
    return "nan" if v is None else format(v, spec)


def format_table(results: Sequence[RunResult]) -> str:
    """A Markdown table of the final figures, one row per optimizer."""
    head = ("optimizer", "peak lr", "train loss", "eval loss", "tokens/s", "opt step ms",
            "state B/param")
    rows = [head]
    for r in results:
        if r.diverged_at is not None:
            train = evl = f"diverged (step {r.diverged_at + 1})"
        else:
            train, evl = _fmt(r.final_train_loss, ".4f"), _fmt(r.final_eval_loss, ".4f")
        rows.append((r.optimizer, ", ".join(f"{v:g}" for v in r.lr), train, evl,
                     f"{r.tokens_per_s:,.0f}", f"{r.optimizer_step_ms:.2f}",
                     f"{r.state_bytes_per_param:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    left = {0, 1}

    def line(row):
        cells = [c.ljust(w) if i in left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i not in left else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(rows[0]), rule] + [line(r) for r in rows[1:]])


def _smooth(values: Sequence[float | None], beta: float = 0.9) -> list[float]:
    """Bias-corrected EMA (as TensorBoard's smoothing); None (non-finite) stays NaN."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        if v is None:
            out.append(float("nan"))
            continue
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def plot(results: Sequence[RunResult], meta: dict, path: str) -> None:
    """Train (smoothed) and eval loss curves of every run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for r in results:
        steps = range(1, len(r.train_loss) + 1)
        (line,) = ax_t.plot(steps, _smooth(r.train_loss), lw=1.4, label=r.optimizer)
        ev = [float("nan") if v is None else v for v in r.eval_loss]
        ax_e.plot(r.eval_steps, ev, marker="o", ms=3, lw=1.4, color=line.get_color(),
                  label=r.optimizer)
    c = meta["config"]
    ax_t.set_title("train loss (EMA 0.9)", fontsize=10)
    ax_t.set_ylabel("cross-entropy (nats/char)")
    ax_e.set_title("eval loss", fontsize=10)
    finals = [v for r in results for v in r.train_loss[len(r.train_loss) // 3:] if v is not None]
    for ax in (ax_t, ax_e):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if finals:  # the start (~ln 97 = 4.6) would flatten the interesting part
            lo, hi = min(finals), max(finals)
            ax.set_ylim(lo - 0.05 * (hi - lo + 0.1), hi + 0.6 * (hi - lo + 0.1))
    ax_e.legend(fontsize=8)
    fig.suptitle(f"functim-compare: {c['model_size']} GPT ({meta['model_params']:,} params), "
                 f"{c['steps']} steps, {c['surface']} surface, {c['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _json_ready(results: Sequence[RunResult], meta: dict) -> dict:
    return {**meta, "runs": [asdict(r) for r in results]}


# -- command line ---------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Train a small GPT-style character model on Python standard-library sources "
                    "with several functim optimizers (same seed, data order and LR schedule) and "
                    "compare them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                   help="comma-separated optimizer names (see --list)")
    p.add_argument("--surface", default="functional", choices=SURFACES,
                   help="functional: torch.func.functional_call + grad and opt.update; "
                        "adapter: functim.adapters classes with model.named_parameters()")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per optimizer")
    p.add_argument("--model-size", default="small", choices=list(MODEL_SIZES),
                   help="model/batch preset: " + "; ".join(
                       f"{k}: {v.n_layer} layers x {v.n_embd}, context {v.block_size}, "
                       f"batch {v.batch_size}" for k, v in MODEL_SIZES.items()))
    p.add_argument("--lr", default="",
                   help="peak learning rates per optimizer, e.g. adamw=3e-3,lion=3e-4 "
                        "(default: each optimizer's entry in --list)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and data order")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on --device cpu, where the small model "
                        "gains little from more and a machine busy with other work makes "
                        "several much slower; torch's own choice on other devices)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N steps (default: steps/10)")
    p.add_argument("--out", default="functim-compare-out",
                   help="directory for results.json, loss.png and table.md")
    p.add_argument("--list", action="store_true", help="list the optimizers and exit")
    return p


def _parse_names(text: str, reg: dict[str, OptimizerEntry]) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise UsageError(f"--optimizers: expected comma-separated names, got {text!r}")
    for n in names:
        if n not in reg:
            why = (f"functim.{n} does not exist in this version" if n in _BUILDERS
                   else "unknown optimizer")
            raise UsageError(f"--optimizers: {n!r}: {why}; choose from {', '.join(reg)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"--optimizers: {', '.join(dup)} given more than once")
    return names


def _parse_lrs(text: str, names: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    if not text.strip():
        return out
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--lr: expected NAME=VALUE pairs separated by commas, got {item!r}")
        if name not in names:
            raise UsageError(f"--lr: {name!r} is not one of --optimizers ({', '.join(names)})")
        try:
            lr = float(value)
        except ValueError:
            raise UsageError(f"--lr: {name}={value!r} is not a number") from None
        if not (math.isfinite(lr) and lr > 0):
            raise UsageError(f"--lr: {name}={value} must be a finite number > 0")
        if name in out:
            raise UsageError(f"--lr: {name} given more than once")
        out[name] = lr
    return out


def _parse_device(text: str | None) -> str:
    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: {text!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device: {text!r} requested but CUDA is not available")
    try:
        torch.zeros(1, device=dev)
    except Exception as e:  # any backend failure: report it in one line
        raise UsageError(f"--device: cannot use {text!r}: {str(e).splitlines()[0]}") from None
    return str(dev)


def _check_demo_deps() -> None:
    missing = []
    for mod in ("tqdm", "matplotlib"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise UsageError(f"needs {' and '.join(missing)}: pip install \"functim[demo]\"")


def _list_text(reg: dict[str, OptimizerEntry]) -> str:
    lines = []
    for name, e in reg.items():
        lr = "default" if e.lr is None else f"{e.lr:g}"
        surfaces = "functional, adapter" if e.adapter is not None else "functional"
        lines.append(f"{name:20} lr {lr:8} {e.settings} [{surfaces}]")
    pending = [n for n in _BUILDERS if n not in reg]
    if pending:
        lines.append(f"(not in this version of functim yet: {', '.join(pending)})")
    return "\n".join(lines)


def _config(args: argparse.Namespace) -> tuple[list[str], dict[str, float], RunConfig]:
    """Check every option (raising :class:`UsageError`) and build the run configuration."""
    reg = registry()
    names = _parse_names(args.optimizers, reg)
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    eval_every = args.eval_every if args.eval_every is not None else max(1, args.steps // 10)
    if eval_every < 1:
        raise UsageError(f"--eval-every must be >= 1, got {eval_every}")
    lrs = _parse_lrs(args.lr, names)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    device = _parse_device(args.device)
    if args.surface == "adapter":
        no_adapter = [n for n in names if reg[n].adapter is None]
        if no_adapter:
            raise UsageError(f"--surface adapter: no functim.adapters class for "
                             f"{', '.join(no_adapter)} yet; use --surface functional")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out: {args.out!r} exists and is not a directory")
    _check_demo_deps()
    cfg = RunConfig(steps=args.steps, model_size=args.model_size, seed=args.seed, device=device,
                    surface=args.surface, eval_every=eval_every)
    for n in names:  # build every optimizer once now, so a bad setting fails before training
        try:
            reg[n].functional(lrs.get(n, reg[n].lr), cfg.warmup_steps)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{n}: {str(e).splitlines()[0]}") from None
    return names, lrs, cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (2 for a bad option, with a one-line message)."""
    try:
        args = _build_parser().parse_args(argv)
        if args.list:
            print(_list_text(registry()))
            return 0
        names, lrs, cfg = _config(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    from tqdm.auto import tqdm

    threads = args.threads if args.threads is not None else (
        1 if torch.device(cfg.device).type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)

    def progress(**kw):
        return tqdm(dynamic_ncols=True, disable=None, file=sys.stderr, **kw)

    size, threads = cfg.size, torch.get_num_threads()
    print(f"{PROG}: {', '.join(names)} on a {cfg.model_size} GPT ({size.n_layer} layers x "
          f"{size.n_embd}, context {size.block_size}, batch {size.batch_size}), {cfg.steps} "
          f"steps, {cfg.surface} surface, {cfg.device} ({threads} CPU thread"
          f"{'' if threads == 1 else 's'}), "
          f"seed {cfg.seed}", flush=True)
    try:
        results, meta = run_comparison(names, lrs, cfg, progress)
    except CorpusError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    os.makedirs(args.out, exist_ok=True)
    table = format_table(results)
    png = os.path.join(args.out, "loss.png")
    plot(results, meta, png)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(_json_ready(results, meta), f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    n_eval = cfg.size.eval_batches * cfg.size.batch_size
    print()
    print(table)
    print(f"\n{meta['model_params']:,} params, {meta['tokens_per_step']:,} tokens/step. "
          f"train loss: mean of the last {min(10, cfg.steps)} steps; eval loss: {n_eval} "
          f"held-out windows; opt step ms: median optimizer update.")
    print(f"wrote {png}, {os.path.join(args.out, 'results.json')}, "
          f"{os.path.join(args.out, 'table.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
