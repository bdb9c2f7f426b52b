"""A study: the runs one command asks for, one per (optimizer, settings, seed). Each run lives in
``OUT/runs/<name>-<id>/``, keyed by its identity (everything that determines its result); a
finished run is read back instead of trained again, and a stopped one resumes from its
checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .corpus import VOCAB, Corpus
from .registry import OptimizerEntry, json_value, show_value
from .train import (
    Batches,
    Checkpoint,
    RunConfig,
    RunDirError,
    RunResult,
    RunStopped,
    atomic_write,
    initial_model,
    train_one,
)

IDENTITY_FORMAT = 1
RUNS_DIR = "runs"
RESULT_FILE = "result.json"
CHECKPOINT_FILE = "checkpoint.pt"
IDENTITY_FILE = "identity.json"

# per optimizer: the swept settings in command-line order, each with its values
Sweep = Mapping[str, Sequence[tuple[str, Sequence[Any]]]]


@dataclass(frozen=True)
class RunSpec:
    """One run: an optimizer, the settings the command line gives it, and a seed."""

    optimizer: str
    settings: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def settings_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def settings_text(self) -> str:
        return " ".join(f"{k}={show_value(v)}" for k, v in self.settings)

    def label(self) -> str:
        return " ".join(filter(None, (self.optimizer, self.settings_text(), f"seed {self.seed}")))


def plan_runs(names: Sequence[str], sweeps: Sweep, fixed: Mapping[str, Mapping[str, Any]],
              seeds: Sequence[int]) -> list[RunSpec]:
    """Every run, seed by seed (so that a stopped study has whole seeds done first), then
    optimizer by optimizer, then the cartesian product of that optimizer's swept values in the
    order given. ``fixed``: settings every run of an optimizer gets (``--lr``)."""
    specs = []
    for seed in seeds:
        for name in names:
            axes = sweeps.get(name, ())
            keys = [k for k, _ in axes]
            for combo in itertools.product(*(values for _, values in axes)):
                settings = {**fixed.get(name, {}), **dict(zip(keys, combo))}
                specs.append(RunSpec(name, tuple(settings.items()), seed))
    return specs


def functim_version() -> str:
    try:
        from importlib.metadata import version

        return version("functim")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


@dataclass
class RunRecord:
    """A run of the study: where it lives and, once finished, its result."""

    spec: RunSpec
    identity: dict
    run_id: str
    run_dir: str  # relative to the study's output directory
    result: RunResult | None = None
    resume_step: int | None = None  # where its checkpoint resumes it
    trained_now: bool = False

    @property
    def status(self) -> str:
        if self.result is None:
            return "not finished"
        return "finished" if self.result.diverged_at is None else "diverged"

    def to_json(self) -> dict:
        spec = {"optimizer": self.spec.optimizer, "seed": self.spec.seed,
                "settings": {k: json_value(v) for k, v in self.spec.settings}}
        result = {} if self.result is None else asdict(self.result)
        return {**spec, **result, "status": self.status, "run_id": self.run_id,
                "run_dir": self.run_dir, "identity": self.identity,
                "trained_now": self.trained_now}


@dataclass
class Study:
    """The runs of one command and what they share."""

    specs: list[RunSpec]
    entries: Mapping[str, OptimizerEntry]
    cfg: RunConfig  # its seed is the first run's; each run gets its own
    corpus: Corpus
    out: str
    checkpoint_every: int

    def identity(self, spec: RunSpec) -> dict:
        """Everything that determines ``spec``'s result (timings aside)."""
        cfg, entry = self.cfg, self.entries[spec.optimizer]
        schedule = ({"kind": "built-in warmup, then constant", "warmup_steps": cfg.warmup_steps}
                    if entry.builtin_warmup else
                    {"kind": "warmup_cosine x peak lr", "warmup_steps": cfg.warmup_steps,
                     "total_steps": cfg.steps})
        settings = entry.effective_settings(spec.settings_dict)
        return {
            "format": IDENTITY_FORMAT,
            "model": {**asdict(cfg.size), "vocab_size": len(VOCAB),
                      "dtype": str(torch.get_default_dtype())},
            "data": {"sha256": self.corpus.fingerprint(), "train_tokens": len(self.corpus.train),
                     "eval_tokens": len(self.corpus.eval)},
            "steps": cfg.steps, "schedule": schedule, "eval_every": cfg.eval_every,
            "optimizer": spec.optimizer,
            "settings": {k: json_value(v) for k, v in sorted(settings.items())},
            "seed": spec.seed, "surface": cfg.surface, "device": str(torch.device(cfg.device)),
            "torch": str(torch.__version__), "functim": functim_version(),
        }

    def record(self, spec: RunSpec) -> RunRecord:
        identity = self.identity(spec)
        run_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        name = "-".join(filter(None, (spec.optimizer, spec.settings_text().replace(" ", "-"),
                                      f"seed{spec.seed}")))
        name = re.sub(r"[^A-Za-z0-9._=+-]", "_", name)[:80]
        return RunRecord(spec, identity, run_id, os.path.join(RUNS_DIR, f"{name}-{run_id[:10]}"))

    def path(self, rec: RunRecord, file: str) -> str:
        return os.path.join(self.out, rec.run_dir, file)

    def checkpoint(self, rec: RunRecord) -> Checkpoint:
        return Checkpoint(self.path(rec, CHECKPOINT_FILE), self.checkpoint_every, rec.identity)


def prepare(study: Study) -> list[RunRecord]:
    """The study's runs, with the results of those finished earlier read back and the step
    where each stopped one resumes; :class:`RunDirError` for a file that cannot be used."""
    records = [study.record(spec) for spec in study.specs]
    for rec in records:
        path = study.path(rec, RESULT_FILE)
        if os.path.exists(path):
            rec.result = _read_result(path, rec)
        else:
            rec.resume_step = study.checkpoint(rec).step()
    return records


def _read_result(path: str, rec: RunRecord) -> RunResult:
    names = {f.name for f in dataclasses.fields(RunResult)}
    try:
        with open(path) as f:
            saved = json.load(f)
        if saved["identity"] != rec.identity:
            raise ValueError("it belongs to another run")
        return RunResult(**{k: v for k, v in saved["result"].items() if k in names})
    except Exception as e:  # any unreadable file: one line, with the way out
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunDirError(f"{path} is unusable ({why}); delete its directory to train that run "
                          "again") from None


def _save_result(study: Study, rec: RunRecord) -> None:
    payload = {"identity": rec.identity, "run_id": rec.run_id, "result": asdict(rec.result)}
    atomic_write(study.path(rec, RESULT_FILE),
                 lambda tmp: _write_json(tmp, payload))
    checkpoint = study.path(rec, CHECKPOINT_FILE)
    if os.path.exists(checkpoint):  # the result replaces it
        os.remove(checkpoint)


def _write_json(path: str, payload: Any) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")


class _SeedCache:
    """The initial model and the batches of the latest seed (the study goes seed by seed)."""

    def __init__(self, study: Study):
        self.study, self.seed, self.value = study, None, None

    def __call__(self, seed: int):
        if seed != self.seed:
            cfg = dataclasses.replace(self.study.cfg, seed=seed)
            self.seed, self.value = seed, (cfg, initial_model(cfg), Batches(self.study.corpus, cfg))
        return self.value


def execute(study: Study, records: Sequence[RunRecord],
            progress: Callable[..., Any] | None = None,
            stop: Callable[[int], bool] | None = None,
            say: Callable[[str], None] | None = None) -> None:
    """Train every unfinished run of ``records`` in order, writing each result as it finishes.

    ``progress(**tqdm_kwargs)`` makes progress bars (one for the study, one for the current run);
    ``stop`` and :class:`~functim_compare.train.RunStopped` as in ``train_one``; ``say(line)``
    reports each finished run."""
    todo = [r for r in records if r.result is None]
    finished = len(records) - len(todo)
    steps_left = sum(study.cfg.steps - (r.resume_step or 0) for r in todo)
    overall = (progress(total=steps_left, desc=f"runs {finished}/{len(records)}", unit="step",
                        position=0) if progress and todo else None)
    seeds = _SeedCache(study)
    try:
        for rec in todo:
            if stop is not None and stop(0):  # asked between two runs
                raise RunStopped(0, checkpointed=False)
            _train_record(study, rec, seeds, progress, stop,
                          overall.update if overall is not None else None)
            finished += 1
            if overall is not None:
                overall.set_description(f"runs {finished}/{len(records)}")
            if say is not None:
                say(f"[{finished}/{len(records)}] {rec.spec.label()}: {_summary(rec)}")
    finally:
        if overall is not None:
            overall.close()


def _train_record(study: Study, rec: RunRecord, seeds: _SeedCache,
                  progress: Callable[..., Any] | None, stop: Callable[[int], bool] | None,
                  on_step: Callable[[], None] | None) -> None:
    """Train (or resume) one run and write its result."""
    cfg, model0, batches = seeds(rec.spec.seed)
    settings = rec.spec.settings_dict
    entry = study.entries[rec.spec.optimizer]
    lr = settings.pop("lr", entry.lr)
    os.makedirs(os.path.join(study.out, rec.run_dir), exist_ok=True)
    atomic_write(study.path(rec, IDENTITY_FILE), lambda tmp: _write_json(tmp, rec.identity))
    run_bar = None
    if progress is not None:
        def run_bar(**kw):
            return progress(**{**kw, "desc": rec.spec.label(), "position": 1, "leave": False})
    result = train_one(entry, lr, model0, batches, cfg, run_bar, settings=settings,
                       checkpoint=study.checkpoint(rec), stop=stop, on_step=on_step)
    result.settings = {k: json_value(v) for k, v in rec.spec.settings}
    rec.result, rec.trained_now = result, True
    _save_result(study, rec)


def _summary(rec: RunRecord) -> str:
    r = rec.result
    resumed = f", resumed from step {r.resumed_at[-1]}" if r.resumed_at else ""
    if r.diverged_at is not None:
        return f"diverged at step {r.diverged_at + 1}{resumed}"
    evl = "nan" if r.final_eval_loss is None else f"{r.final_eval_loss:.4f}"
    train = "nan" if r.final_train_loss is None else f"{r.final_train_loss:.4f}"
    return f"train loss {train}, eval loss {evl} ({r.wall_s:.0f} s{resumed})"
