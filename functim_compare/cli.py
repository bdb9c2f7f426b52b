"""The command line: every option is checked (one line and exit status 2 for a bad one) before
anything trains."""

from __future__ import annotations

import argparse
import inspect
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .corpus import Corpus, CorpusError, load_text_files
from .model import GPT, MODEL_SIZES
from .registry import _BUILDERS, OptimizerEntry, parse_value, registry, settable
from .train import SURFACES, RunConfig

PROG = "functim-compare"
DEFAULT_OPTIMIZERS = ("adamw", "muon", "lion")


class UsageError(Exception):
    """A bad option: reported as one line and exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Train a small GPT-style character model on Python standard-library sources "
                    "(or your own text) with several functim optimizers (same initial weights, "
                    "data order and LR schedule) and compare them; sweep their settings over "
                    "several seeds. Finished runs are kept under --out and not trained again; "
                    "a stopped run resumes from its checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--optimizers", default=None,
                   help="comma-separated optimizer names (see --list) (default: those --sweep "
                        f"names, else {','.join(DEFAULT_OPTIMIZERS)})")
    p.add_argument("--sweep", action="append", default=[], metavar="OPT.KEY=V1,V2,...",
                   help="values of one setting of one optimizer (repeatable; each optimizer "
                        "runs the cartesian product of its sweeps), e.g. muon.lr=0.01,0.02,0.05, "
                        "muon.scale_mode=keller,consistent_rms, adamw.betas=0.9:0.95,0.9:0.99; "
                        "KEY is any keyword of functim.OPT that takes numbers, words, true/false, "
                        "a dtype or none (--list shows them)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds, e.g. 0,1,2: every setting runs once per seed; "
                        "runs with the same seed start from the same weights and see the same "
                        "batches")
    p.add_argument("--surface", default="functional", choices=SURFACES,
                   help="functional: torch.func.functional_call + grad and opt.update; "
                        "adapter: functim.adapters classes with model.named_parameters()")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--model-size", default="small", choices=list(MODEL_SIZES),
                   help="model/batch preset: " + "; ".join(
                       f"{k}: {v.n_layer} layers x {v.n_embd}, context {v.block_size}, "
                       f"batch {v.batch_size}" for k, v in MODEL_SIZES.items()))
    p.add_argument("--lr", default="",
                   help="peak learning rates per optimizer, e.g. adamw=3e-3,lion=3e-4 "
                        "(default: each optimizer's entry in --list)")
    p.add_argument("--data", nargs="+", action="extend", default=None, metavar="PATH",
                   help="train on these text files (UTF-8; the last 10%% of each is the eval "
                        "split) instead of the Python standard-library sources")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the initial weights and data order (default 0; see --seeds)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on --device cpu, where the small model "
                        "gains little from more and a machine busy with other work makes "
                        "several much slower; torch's own choice on other devices)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N steps (default: steps/10)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="write a run's checkpoint every N steps (default: --eval-every); Ctrl-C "
                        "also writes one")
    p.add_argument("--out", default="functim-compare-out",
                   help="directory for results.json, table.md, loss.png (and for a sweep "
                        "runs.md and sweep.png) and runs/, one directory per run")
    p.add_argument("--list", action="store_true",
                   help="list the optimizers and the settings --sweep can vary, and exit")
    return p


@dataclass
class Command:
    """What one invocation asks for, checked."""

    names: list[str]
    sweeps: dict[str, list[tuple[str, list[Any]]]]
    fixed: dict[str, dict[str, Any]]  # --lr
    seeds: list[int]
    cfg: RunConfig
    out: str
    checkpoint_every: int
    threads: int | None
    study: bool  # --sweep or --seeds given: the sweep table and plots
    corpus: Corpus | None = None  # --data (None: the default corpus)
    entries: dict[str, OptimizerEntry] = field(default_factory=dict)


def _unknown_optimizer(flag: str, name: str, reg: dict[str, OptimizerEntry]) -> UsageError:
    why = (f"functim.{name} does not exist in this version" if name in _BUILDERS
           else "unknown optimizer")
    return UsageError(f"{flag}: {name!r}: {why}; choose from {', '.join(reg)}")


def _parse_names(text: str, reg: dict[str, OptimizerEntry]) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise UsageError(f"--optimizers: expected comma-separated names, got {text!r}")
    for n in names:
        if n not in reg:
            raise _unknown_optimizer("--optimizers", n, reg)
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


def _parse_sweep(item: str, reg: dict[str, OptimizerEntry]) -> tuple[str, str, list[Any]]:
    """One ``--sweep OPT.KEY=V1,V2,...``: the optimizer, the setting and its typed values."""
    target, sep, text = item.partition("=")
    name, dot, key = (s.strip() for s in target.partition("."))
    if not sep or not dot or not name or not key:
        raise UsageError(f"--sweep: expected OPT.KEY=V1,V2,..., got {item!r}")
    if name not in reg:
        raise _unknown_optimizer("--sweep", name, reg)
    kinds = settable(reg[name])
    if key not in kinds:
        known = inspect.signature(reg[name].constructor).parameters
        why = ("cannot be set from the command line" if key in known
               else f"is not a setting of functim.{name}")
        raise UsageError(f"--sweep {name}.{key}: {key!r} {why}; the settings it can vary: "
                         f"{', '.join(kinds)}")
    texts = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in texts):
        raise UsageError(f"--sweep {name}.{key}: expected comma-separated values, got {text!r}")
    values = []
    for t in texts:
        try:
            values.append(parse_value(t, kinds[key]))
        except ValueError as e:
            raise UsageError(f"--sweep {name}.{key}={t}: {e}") from None
    for i, v in enumerate(values):
        if v in values[:i]:
            raise UsageError(f"--sweep {name}.{key}: {texts[i]} given more than once")
    return name, key, values


def _parse_sweeps(items: Sequence[str], reg: dict[str, OptimizerEntry],
                  lrs: dict[str, float]) -> dict[str, list[tuple[str, list[Any]]]]:
    sweeps: dict[str, list[tuple[str, list[Any]]]] = {}
    for item in items:
        name, key, values = _parse_sweep(item, reg)
        axes = sweeps.setdefault(name, [])
        if any(k == key for k, _ in axes):
            raise UsageError(f"--sweep {name}.{key} given more than once; list all its values "
                             "in one --sweep")
        if key == "lr" and name in lrs:
            raise UsageError(f"--sweep {name}.lr and --lr {name}=... both set {name}'s lr; "
                             "keep one")
        axes.append((key, values))
    return sweeps


def _parse_seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds is None:
        return [0 if args.seed is None else args.seed]
    if args.seed is not None:
        raise UsageError("--seed and --seeds both given; keep one")
    texts = [t.strip() for t in args.seeds.split(",")]
    if not args.seeds.strip() or any(not t for t in texts):
        raise UsageError(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    try:
        seeds = [int(t) for t in texts]
    except ValueError:
        raise UsageError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") \
            from None
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup or any(s < 0 for s in seeds):
        raise UsageError(f"--seeds: {dup[0]} given more than once" if dup
                         else f"--seeds: seeds must be >= 0, got {args.seeds!r}")
    return seeds


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


def list_text(reg: dict[str, OptimizerEntry]) -> str:
    """``--list``: every optimizer, its default lr and settings, surfaces, and the settings
    ``--sweep`` can vary."""
    lines = []
    for name, e in reg.items():
        lr = "default" if e.lr is None else f"{e.lr:g}"
        surfaces = "functional, adapter" if e.adapter is not None else "functional"
        lines.append(f"{name:20} lr {lr:8} {e.description} [{surfaces}]")
        lines.append(f"{'':20} --sweep {name}.KEY: {', '.join(settable(e))}")
    pending = [n for n in _BUILDERS if n not in reg]
    if pending:
        lines.append(f"(not in this version of functim yet: {', '.join(pending)})")
    return "\n".join(lines)


def _positive(args: argparse.Namespace) -> None:
    for flag in ("steps", "eval_every", "threads", "checkpoint_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")


def _names(args: argparse.Namespace, reg: dict[str, OptimizerEntry]) -> list[str]:
    """--optimizers; without it, the optimizers --sweep names (in order), else the defaults."""
    if args.optimizers is not None:
        return _parse_names(args.optimizers, reg)
    swept = [item.partition(".")[0].strip() for item in args.sweep]
    return list(dict.fromkeys(swept)) or list(DEFAULT_OPTIMIZERS)


def _load_data(paths: Sequence[str], cfg: RunConfig) -> Corpus:
    try:
        corpus = load_text_files(paths)
        corpus.check_fits(cfg.size.block_size)
    except CorpusError as e:
        raise UsageError(f"--data: {e}") from None
    return corpus


def _check_settings(command: Command) -> None:
    """Build every distinct optimizer and its state for the model once, so that a bad setting
    fails before training (on the meta device: shapes and dtypes, no memory, no time)."""
    from .sweep import plan_runs

    with torch.device("meta"):
        params = dict(GPT(command.cfg.size).named_parameters())
    for spec in plan_runs(command.names, command.sweeps, command.fixed, command.seeds[:1]):
        entry = command.entries[spec.optimizer]
        settings = spec.settings_dict
        lr = settings.pop("lr", entry.lr)
        try:
            entry.functional(lr, command.cfg.warmup_steps, **settings).init_state(params)
        except (ValueError, TypeError) as e:
            where = " ".join(filter(None, (spec.optimizer, spec.settings_text())))
            raise UsageError(f"{where}: {str(e).splitlines()[0]}") from None


def configure(args: argparse.Namespace) -> Command:
    """Check every option (raising :class:`UsageError`) and build the command."""
    reg = registry()
    _positive(args)
    for item in args.sweep:  # an unknown optimizer in --sweep says so before anything else
        _parse_sweep(item, reg)
    names = _names(args, reg)
    lrs = _parse_lrs(args.lr, names)
    sweeps = _parse_sweeps(args.sweep, reg, lrs)
    outside = [n for n in sweeps if n not in names]
    if outside:
        raise UsageError(f"--sweep {outside[0]}: {outside[0]!r} is not one of --optimizers "
                         f"({', '.join(names)})")
    seeds = _parse_seeds(args)
    eval_every = args.eval_every or max(1, args.steps // 10)
    device = _parse_device(args.device)
    if args.surface == "adapter":
        no_adapter = [n for n in names if reg[n].adapter is None]
        if no_adapter:
            raise UsageError(f"--surface adapter: no functim.adapters class for "
                             f"{', '.join(no_adapter)} yet; use --surface functional")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out: {args.out!r} exists and is not a directory")
    _check_demo_deps()
    cfg = RunConfig(steps=args.steps, model_size=args.model_size, seed=seeds[0], device=device,
                    surface=args.surface, eval_every=eval_every)
    command = Command(
        names=names, sweeps=sweeps, fixed={n: {"lr": lr} for n, lr in lrs.items()}, seeds=seeds,
        cfg=cfg, out=args.out, checkpoint_every=args.checkpoint_every or eval_every,
        threads=args.threads, study=bool(args.sweep) or args.seeds is not None,
        corpus=_load_data(args.data, cfg) if args.data else None,
        entries={n: reg[n] for n in names})
    _check_settings(command)
    _make_out_dir(args.out)
    return command


def _make_out_dir(out: str) -> None:
    """Create ``--out`` now, the last check, so that a place that cannot hold the results fails
    before anything trains."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {out!r}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out: {out!r} is not writable")


# -- running it -----------------------------------------------------------------------------------
class _Interrupt:
    """Ctrl-C: the first asks the current run to stop after its step (it writes a checkpoint and
    the finished runs are reported); a second one stops at once. Called as ``stop(steps_done)``."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __call__(self, steps_done: int) -> bool:
        return self.requested

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{PROG}: stopping after this step (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _header(command: Command, corpus: Corpus) -> str:
    cfg, size, threads = command.cfg, command.cfg.size, torch.get_num_threads()
    seeds = (f"seeds {','.join(map(str, command.seeds))}" if len(command.seeds) > 1
             else f"seed {command.seeds[0]}")
    data = ("" if command.corpus is None else
            f"\ndata: {len(corpus.files)} file{'s' if len(corpus.files) > 1 else ''}, "
            f"{len(corpus.train) + len(corpus.eval):,} characters (train {len(corpus.train):,}, "
            f"eval {len(corpus.eval):,})")
    if corpus.unknown_chars:
        n = corpus.unknown_chars
        data += (f"; {n:,} character{'s' if n > 1 else ''} outside the model's 97-symbol "
                 "vocabulary (tab, newline, printable ASCII) read as '?'")
    return (f"{PROG}: {', '.join(command.names)} on a {cfg.model_size} GPT ({size.n_layer} "
            f"layers x {size.n_embd}, context {size.block_size}, batch {size.batch_size}), "
            f"{cfg.steps} steps, {cfg.surface} surface, {cfg.device} ({threads} CPU thread"
            f"{'' if threads == 1 else 's'}), {seeds}{data}")


def _plan_line(records: Sequence[Any], out: str) -> str:
    done = sum(r.result is not None for r in records)
    resumed = [r for r in records if r.result is None and r.resume_step is not None]
    parts = [f"{done} finished earlier"] if done else []
    if resumed:
        parts.append(f"{len(resumed)} resume{'s' if len(resumed) == 1 else ''} from a checkpoint")
    parts.append(f"{len(records) - done - len(resumed)} to train")
    return (f"{len(records)} run{'s' if len(records) > 1 else ''}: {', '.join(parts)} "
            f"(under {os.path.join(out, 'runs')})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (2 for a bad option, 1 for a missing default
    corpus or an unusable run directory, 130 when interrupted), errors as one line."""
    from .corpus import load_corpus
    from .sweep import Study, plan_runs, prepare
    from .train import RunDirError

    try:
        args = build_parser().parse_args(argv)
        if args.list:
            print(list_text(registry()))
            return 0
        command = configure(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    threads = command.threads if command.threads is not None else (
        1 if torch.device(command.cfg.device).type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        corpus = command.corpus or load_corpus()
        corpus.check_fits(command.cfg.size.block_size)
        study = Study(plan_runs(command.names, command.sweeps, command.fixed, command.seeds),
                      command.entries, command.cfg, corpus, command.out, command.checkpoint_every)
        records = prepare(study)
        print(_header(command, corpus), flush=True)
        if command.study or any(r.result is not None or r.resume_step is not None
                                for r in records):
            print(_plan_line(records, command.out), flush=True)
        return _run(command, study, records, argv)
    except (CorpusError, RunDirError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before any run started: nothing to report
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _run(command: Command, study: Any, records: Sequence[Any],
         argv: Sequence[str] | None) -> int:
    """Train what is left, then write and print the results (partial ones when interrupted)."""
    from tqdm.auto import tqdm

    from .outputs import write_outputs
    from .sweep import execute
    from .train import RunStopped

    def progress(**kw):
        return tqdm(dynamic_ncols=True, disable=None, file=sys.stderr, **kw)

    stopped: RunStopped | KeyboardInterrupt | None = None
    try:
        with _Interrupt() as stop:
            execute(study, records, progress, stop, say=tqdm.write)
    except (RunStopped, KeyboardInterrupt) as e:
        stopped = e
    table, notes, paths = write_outputs(command, study, records, argv)
    print()
    print(table)
    print(f"\n{notes}")
    print(f"wrote {', '.join(paths)}")
    if stopped is None:
        return 0
    done = sum(r.result is not None for r in records)
    current = next((r for r in records if r.result is None), None)
    where = ""
    if isinstance(stopped, RunStopped) and current is not None:
        where = (f"; {current.spec.label()} stopped after step {stopped.step}, its checkpoint "
                 "written" if stopped.checkpointed else "")
    print(f"{PROG}: interrupted: {done} of {len(records)} runs finished{where}; run the same "
          "command again to go on", file=sys.stderr)
    return 130
