"""Training one run: one optimizer with one set of settings and one seed, on one surface, with
checkpoints that resume it bitwise."""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

import functim as ft

from .corpus import Corpus, CorpusError
from .model import GPT, MODEL_SIZES, ModelSize, lm_loss
from .registry import OptimizerEntry, json_value

SURFACES = ("functional", "adapter")
CHECKPOINT_FORMAT = 1


@dataclass
class RunResult:
    optimizer: str
    surface: str
    lr: list[float]  # the peak value of every hyperparameter named lr
    description: str  # the entry's default settings, in words
    train_loss: list[float | None]  # per step (None where non-finite)
    eval_steps: list[int]
    eval_loss: list[float | None]
    tokens_per_s: float
    optimizer_step_ms: float
    state_bytes_per_param: float
    wall_s: float
    diverged_at: int | None = None  # the first step (0-based) whose loss is not finite
    final_train_loss: float | None = field(default=None)
    final_eval_loss: float | None = field(default=None)
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)  # given on the command line
    resumed_at: list[int] = field(default_factory=list)  # steps it was resumed from
    torch_threads: int = 0


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
    """The same batches, in the same order, for every run with the same seed."""

    def __init__(self, corpus: Corpus, cfg: RunConfig):
        size, dev = cfg.size, torch.device(cfg.device)
        t = size.block_size
        try:
            corpus.check_fits(t)
        except CorpusError as e:
            raise CorpusError(f"the corpus is shorter than one context window: {e}") from None
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


def initial_model(cfg: RunConfig) -> GPT:
    """The initial weights every run with ``cfg.seed`` starts from (seeded, on the CPU)."""
    torch.manual_seed(cfg.seed)
    return GPT(cfg.size)


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


def _mean_eval_loss(forward: Callable[[torch.Tensor], torch.Tensor], batches: Batches) -> float:
    total = sum(float(lm_loss(forward(x), y)) for x, y in batches.eval)
    return total / len(batches.eval)


# -- the two surfaces -----------------------------------------------------------------------------
class _FunctionalRun:
    """``torch.func.grad_and_value`` over ``functional_call``, then ``opt.update(donate=True)``;
    the schedule multiplies every hyperparameter named lr through ``ft.set_hyperparams``."""

    def __init__(self, entry: OptimizerEntry, lr: float | None, settings: Mapping[str, Any],
                 model: GPT, batches: Batches, cfg: RunConfig, timer: _Timer):
        self.entry, self.model, self.batches, self.timer = entry, model, batches, timer
        self.unit = ft.warmup_cosine(1.0, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
        self.params = {k: v.detach().clone() for k, v in model.named_parameters()}
        self.opt = entry.functional(lr, cfg.warmup_steps, **settings)
        self.state = self.opt.init_state(self.params)
        # the peak values, read before any checkpoint replaces the state with scheduled ones
        self.base_lr = {p: float(v) for p, v in ft.get_hyperparams(self.state).items()
                        if _is_lr(p)}
        self.peak = sorted(set(self.base_lr.values()), reverse=True)

        def loss_fn(p, x, y):
            return lm_loss(torch.func.functional_call(model, p, (x,)), y)

        self.grad_and_loss = torch.func.grad_and_value(loss_fn)

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        grads, loss = self.grad_and_loss(self.params, x, y)
        if not self.entry.builtin_warmup:
            u = float(self.unit(step))
            self.state = ft.set_hyperparams(self.state,
                                            **{p: b * u for p, b in self.base_lr.items()})
        t0 = self.timer.now()
        self.params, self.state = self.opt.update(self.params, grads, self.state, donate=True)
        return loss, self.timer.now() - t0

    @torch.no_grad()
    def evaluate(self) -> float:
        e = self.entry
        p = e.eval_params(self.params, self.state) if e.eval_params else self.params
        return _mean_eval_loss(lambda x: torch.func.functional_call(self.model, p, (x,)),
                               self.batches)

    def state_bytes(self) -> int:
        return state_nbytes(_tensor_leaves(self.state))

    def state_dict(self) -> dict:
        return {"params": self.params, "state": self.state}

    def load_state_dict(self, saved: dict) -> None:
        self.params, self.state = saved["params"], saved["state"]


class _AdapterRun:
    """The ``functim.adapters`` class over ``model.named_parameters()``, ``loss.backward()``,
    and ``LambdaLR`` for the schedule."""

    def __init__(self, entry: OptimizerEntry, lr: float | None, settings: Mapping[str, Any],
                 model: GPT, batches: Batches, cfg: RunConfig, timer: _Timer):
        if entry.adapter is None:
            raise ValueError(f"{entry.name} has no torch.optim adapter in functim.adapters yet; "
                             "use --surface functional")
        self.model, self.batches, self.timer = model, batches, timer
        unit = ft.warmup_cosine(1.0, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
        self.opt = entry.adapter(model.named_parameters(), lr, cfg.warmup_steps, **settings)
        self.sched = (None if entry.builtin_warmup else
                      torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: float(unit(s))))
        self.peak = sorted({float(g.get("initial_lr", g["lr"])) for g in self.opt.param_groups},
                           reverse=True)
        self.has_modes = entry.eval_params is not None

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        loss = lm_loss(self.model(x), y)
        loss.backward()
        t0 = self.timer.now()
        self.opt.step()
        dt = self.timer.now() - t0
        self.opt.zero_grad(set_to_none=True)
        if self.sched is not None:
            self.sched.step()
        return loss.detach(), dt

    @torch.no_grad()
    def evaluate(self) -> float:
        if self.has_modes:
            self.opt.eval()
        try:
            return _mean_eval_loss(self.model, self.batches)
        finally:
            if self.has_modes:
                self.opt.train()

    def state_bytes(self) -> int:
        return state_nbytes(_tensor_leaves([dict(s) for s in self.opt.state.values()]))

    def state_dict(self) -> dict:
        sched = None if self.sched is None else self.sched.state_dict()
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": sched}

    def load_state_dict(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["optimizer"])
        if self.sched is not None:
            self.sched.load_state_dict(saved["scheduler"])


_SURFACE_RUNS = {"functional": _FunctionalRun, "adapter": _AdapterRun}


# -- the record of a run, and its checkpoint -----------------------------------------------------
@dataclass
class _Log:
    """What a run has recorded so far; with the surface's state, all a checkpoint holds."""

    losses: list[torch.Tensor] = field(default_factory=list)  # per step, on the device
    step_times: list[float] = field(default_factory=list)  # optimizer update alone
    step_walls: list[float] = field(default_factory=list)  # whole training step
    session_starts: list[int] = field(default_factory=list)  # first step of each session
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    checked: int = 0  # losses[:checked] are known to be finite

    def to_saved(self) -> dict:
        losses = torch.stack(self.losses).cpu() if self.losses else torch.zeros(0)
        return {"losses": losses, "step_times": self.step_times, "step_walls": self.step_walls,
                "session_starts": self.session_starts, "eval_steps": self.eval_steps,
                "eval_losses": self.eval_losses, "wall_s": self.wall_s, "checked": self.checked}

    @classmethod
    def from_saved(cls, saved: dict, device: torch.device) -> _Log:
        losses = list(saved["losses"].to(device).unbind())
        return cls(losses, *(list(saved[k]) for k in (
            "step_times", "step_walls", "session_starts", "eval_steps", "eval_losses")),
            wall_s=saved["wall_s"], checked=saved["checked"])

    def first_nonfinite(self) -> int | None:
        """The first step whose loss is not finite, checking only the steps not checked yet (one
        host sync)."""
        if self.checked < len(self.losses):
            bad = ~torch.isfinite(torch.stack(self.losses[self.checked:]))
            if bool(bad.any()):
                return self.checked + int(bad.nonzero()[0, 0])
            self.checked = len(self.losses)
        return None


class RunDirError(RuntimeError):
    """A file in a run's directory cannot be used: reported as one line, with the way out."""


class RunStopped(Exception):
    """A run stopped at a step boundary on request (Ctrl-C) after ``step`` steps;
    ``checkpointed``: whether it wrote its checkpoint there (it does when it has one)."""

    def __init__(self, step: int, checkpointed: bool):
        super().__init__(f"stopped after step {step}")
        self.step, self.checkpointed = step, checkpointed


@dataclass(frozen=True)
class Checkpoint:
    """Where a run keeps its checkpoint (``path``), how often it writes one (every ``every``
    steps), and the run's identity, which a checkpoint must carry to be resumed."""

    path: str
    every: int
    identity: Mapping[str, Any] = field(default_factory=dict)

    def step(self) -> int | None:
        """The step the checkpoint resumes from; None when there is none."""
        saved = self._read(mmap=True, map_location="cpu")  # mapped, not read
        return None if saved is None else int(saved["step"])

    def _read(self, **load_options: Any) -> dict | None:
        if not os.path.exists(self.path):
            return None
        try:
            saved = torch.load(self.path, weights_only=True, **load_options)
        except Exception as e:  # any unreadable file: one line, with the way out
            raise RunDirError(f"{self.path} is unreadable as a checkpoint ({type(e).__name__}); "
                              "delete it to train that run from the start") from None
        if (not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT
                or saved.get("identity") != self.identity):
            raise RunDirError(f"{self.path} belongs to another run; delete it to train this run "
                              "from the start")
        return saved

    def load(self) -> dict | None:
        return self._read()

    def save(self, step: int, run: Any, log: _Log) -> None:
        payload = {"format": CHECKPOINT_FORMAT, "identity": dict(self.identity), "step": step,
                   "run": run.state_dict(), "log": log.to_saved()}
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: ``path`` is either the old file or the
    complete new one, even if the process is killed while writing."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -- the training loop ----------------------------------------------------------------------------
def train_one(entry: OptimizerEntry, lr: float | None, model0: GPT, batches: Batches,
              cfg: RunConfig, progress: Callable[..., Any] | None = None, *,
              settings: Mapping[str, Any] | None = None, checkpoint: Checkpoint | None = None,
              stop: Callable[[int], bool] | None = None,
              on_step: Callable[[], None] | None = None) -> RunResult:
    """Train a copy of ``model0`` with ``entry`` (peak ``lr``, constructor ``settings``) on
    ``cfg.surface`` for ``cfg.steps`` steps and return what it did.

    With ``checkpoint``, the run starts from its checkpoint if there is one and writes one every
    ``checkpoint.every`` steps; ``stop(steps_done)`` is asked after every step and, when true,
    the run writes its checkpoint and raises :class:`RunStopped`. ``progress(total=, initial=,
    desc=, unit=)`` makes a progress bar; ``on_step()`` is called after every step.
    """
    settings = dict(settings or {})
    device = torch.device(cfg.device)
    timer = _Timer(device)
    model = copy.deepcopy(model0).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    run = _SURFACE_RUNS[cfg.surface](entry, lr, settings, model, batches, cfg, timer)
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is None:
        start, log = 0, _Log(eval_steps=[0], eval_losses=[run.evaluate()])
    else:
        run.load_state_dict(saved["run"])
        start, log = int(saved["step"]), _Log.from_saved(saved["log"], device)
    log.session_starts.append(start)
    bar = (progress(total=cfg.steps, initial=start, desc=entry.name, unit="step")
           if progress else None)
    try:
        diverged_at = _loop(run, batches, cfg, log, start, _Hooks(bar, checkpoint, stop, on_step),
                            timer)
    finally:
        if bar is not None:
            bar.close()
    return _result(entry, cfg, run, log, diverged_at, settings, n_params)


@dataclass
class _Hooks:
    bar: Any
    checkpoint: Checkpoint | None
    stop: Callable[[int], bool] | None
    on_step: Callable[[], None] | None
    postfix: dict[str, str] = field(default_factory=dict)

    def stepped(self, done: int, steps: int, loss: torch.Tensor) -> None:
        if self.on_step is not None:
            self.on_step()
        if self.bar is not None:
            self.bar.update(1)
            if done % 10 == 0 or done == steps:
                self.postfix["loss"] = f"{float(loss):.4f}"
                self.bar.set_postfix(self.postfix, refresh=False)

    def evaluated(self, loss: torch.Tensor, eval_loss: float) -> None:
        if self.bar is not None:
            self.postfix.update(loss=f"{float(loss):.4f}", eval=f"{eval_loss:.4f}")
            self.bar.set_postfix(self.postfix)


def _loop(run: Any, batches: Batches, cfg: RunConfig, log: _Log, start: int, hooks: _Hooks,
          timer: _Timer) -> int | None:
    """Steps ``start`` to ``cfg.steps``; returns the step where the loss stopped being finite
    (None if it never did). Divergence is looked for at evaluations and checkpoints only, so
    that the device is not synchronized every step."""
    eval_at = set(range(cfg.eval_every, cfg.steps, cfg.eval_every)) | {cfg.steps}
    every = hooks.checkpoint.every if hooks.checkpoint is not None else 0
    mark = timer.now()

    def save(done: int) -> None:
        nonlocal mark
        now = timer.now()
        log.wall_s += now - mark
        mark = now
        hooks.checkpoint.save(done, run, log)

    try:
        for step in range(start, cfg.steps):
            x, y = batches(step)
            t0 = timer.now()
            loss, dt = run.step(step, x, y)
            log.step_walls.append(timer.now() - t0)
            log.step_times.append(dt)
            log.losses.append(loss.detach())
            done = step + 1
            hooks.stepped(done, cfg.steps, loss)
            checkpoint_due = every and done % every == 0 and done < cfg.steps
            if done in eval_at or checkpoint_due:
                diverged = log.first_nonfinite()
                if diverged is not None:
                    return diverged
            if done in eval_at:
                log.eval_steps.append(done)
                log.eval_losses.append(run.evaluate())
                hooks.evaluated(loss, log.eval_losses[-1])
            if checkpoint_due:
                save(done)
            if hooks.stop is not None and done < cfg.steps and hooks.stop(done):
                if hooks.checkpoint is not None and not checkpoint_due:
                    save(done)
                raise RunStopped(done, hooks.checkpoint is not None)
        return None
    finally:
        log.wall_s += timer.now() - mark


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _result(entry: OptimizerEntry, cfg: RunConfig, run: Any, log: _Log, diverged_at: int | None,
            settings: dict, n_params: int) -> RunResult:
    train_loss = [_finite_or_none(v) for v in torch.stack(log.losses).cpu().tolist()]
    tail = train_loss[-min(10, len(train_loss)):]
    firsts = set(log.session_starts)  # the first step of a session pays one-time setup costs
    timed = [w for i, w in enumerate(log.step_walls) if i not in firsts] or log.step_walls
    tokens_per_step = cfg.size.batch_size * cfg.size.block_size
    result = RunResult(
        optimizer=entry.name, surface=cfg.surface, lr=run.peak, description=entry.description,
        train_loss=train_loss, eval_steps=log.eval_steps,
        eval_loss=[_finite_or_none(v) for v in log.eval_losses],
        tokens_per_s=tokens_per_step * len(timed) / sum(timed),
        optimizer_step_ms=1e3 * statistics.median(log.step_times),
        state_bytes_per_param=run.state_bytes() / n_params, wall_s=log.wall_s,
        diverged_at=diverged_at, seed=cfg.seed,
        settings={k: json_value(v) for k, v in settings.items()},
        resumed_at=log.session_starts[1:], torch_threads=torch.get_num_threads())
    if diverged_at is None and None not in tail:
        result.final_train_loss = sum(tail) / len(tail)
        result.final_eval_loss = result.eval_loss[-1]
    return result
