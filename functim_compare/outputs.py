"""What a command writes under ``--out``: ``results.json`` (every run of the command),
``table.md`` and ``loss.png``, and for a study also ``runs.md`` and ``sweep.png``. Each file is
replaced whole (written aside, then renamed), so an interrupted command leaves either the old
file or the new one."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from .corpus import VOCAB
from .model import GPT
from .registry import json_value
from .report import (
    best_by_optimizer,
    edge_notes,
    format_runs_table,
    format_sweep_table,
    format_table,
    group_runs,
    plot,
    plot_sweep,
)
from .sweep import RunRecord, Study, functim_version
from .train import atomic_write

if TYPE_CHECKING:
    from .cli import Command


def _meta(command: Command, study: Study, records: Sequence[RunRecord],
          argv: Sequence[str] | None) -> dict:
    cfg, corpus = command.cfg, study.corpus
    with torch.device("meta"):  # the parameter count, without initializing anything
        model_params = sum(p.numel() for p in GPT(cfg.size).parameters())
    finished = sum(r.result is not None for r in records)
    return {
        "functim_version": functim_version(),
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "argv": list(sys.argv[1:] if argv is None else argv),
        "config": {**asdict(cfg), "seeds": command.seeds, "warmup_steps": cfg.warmup_steps,
                   "schedule": f"warmup_cosine(1.0, warmup_steps={cfg.warmup_steps}, "
                               f"total_steps={cfg.steps}) x peak lr",
                   "model": asdict(cfg.size), "torch_threads": torch.get_num_threads(),
                   "checkpoint_every": command.checkpoint_every},
        "model_params": model_params,
        "corpus": {"source": corpus.source, "files": corpus.files,
                   "train_chars": len(corpus.train), "eval_chars": len(corpus.eval),
                   "vocab_size": len(VOCAB), "sha256": corpus.fingerprint(),
                   "chars_read_as_question_mark": corpus.unknown_chars},
        "tokens_per_step": cfg.size.batch_size * cfg.size.block_size,
        "runs_total": len(records), "runs_finished": finished,
        "complete": finished == len(records),
    }


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def _write_or_remove(path: str, write: Any) -> bool:
    """``write(tmp) -> bool`` into ``path`` (renamed into place when it wrote); a stale ``path``
    is removed when it writes nothing, so that the directory never shows another command's
    figure."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        wrote = bool(write(tmp))
        if wrote:
            os.replace(tmp, path)
        elif os.path.exists(path):
            os.remove(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return wrote


def _curves(series: list, meta: dict, subtitle: str = ""):
    def write(tmp: str) -> bool:
        if series:
            plot(series, meta, tmp, subtitle)
        return bool(series)

    return write


def write_outputs(command: Command, study: Study, records: Sequence[RunRecord],
                  argv: Sequence[str] | None) -> tuple[str, str, list[str]]:
    """Write the files of this command; returns the table, its footnote and the paths
    written."""
    os.makedirs(command.out, exist_ok=True)
    meta = _meta(command, study, records, argv)
    cfg, out = command.cfg, command.out
    n_eval = cfg.size.eval_batches * cfg.size.batch_size
    notes = (f"{meta['model_params']:,} params, {meta['tokens_per_step']:,} tokens/step. "
             f"train loss: mean of the last {min(10, cfg.steps)} steps; eval loss: {n_eval} "
             f"held-out windows; opt step ms: median optimizer update.")
    path = {name: os.path.join(out, name) for name in
            ("results.json", "table.md", "loss.png", "runs.md", "sweep.png")}
    if command.study:
        table, extra = _study_outputs(command, records, meta, path)
        notes += (" Each row: mean over seeds (eval loss ± sample std); * marks each "
                  "optimizer's best setting (lowest mean eval loss).")
        notes += "".join(f"\nnote: {n}" for n in meta["notes"])
    else:
        results = [r.result for r in records if r.result is not None]
        table = format_table(results)
        extra = [path["loss.png"]] if _write_or_remove(
            path["loss.png"], _curves([(r.optimizer, [r]) for r in results], meta)) else []
        for stale in ("runs.md", "sweep.png"):
            if os.path.exists(path[stale]):
                os.remove(path[stale])
    _write_text(path["results.json"],
                json.dumps({**meta, "runs": [r.to_json() for r in records]}, indent=1) + "\n")
    _write_text(path["table.md"], table + "\n")
    return table, notes, [path["results.json"], path["table.md"], *extra]


def _study_outputs(command: Command, records: Sequence[RunRecord], meta: dict,
                   path: dict[str, str]) -> tuple[str, list[str]]:
    groups = group_runs(records)
    best = best_by_optimizer(groups)
    keys = list(dict.fromkeys(k for axes in command.sweeps.values() for k, _ in axes))
    meta["sweep"] = {name: {k: [json_value(v) for v in values] for k, values in axes}
                     for name, axes in command.sweeps.items()}
    meta["best"] = {name: {"settings": {k: json_value(v) for k, v in g.settings.items()},
                           "eval_loss_mean": g.eval_mean, "eval_loss_std": g.eval_std,
                           "run_dirs": [r.run_dir for r in g.records]}
                    for name, g in best.items()}
    meta["notes"] = edge_notes(command.sweeps, best)
    _write_text(path["runs.md"], format_runs_table(records) + "\n")
    series = [(" ".join(filter(None, (name, g.records[0].spec.settings_text()))), g.results)
              for name, g in best.items()]
    n_seeds = len(command.seeds)
    subtitle = (", best setting of each optimizer" +
                (f", mean of {n_seeds} seeds (band: min to max)" if n_seeds > 1 else ""))
    written = [path["runs.md"]]
    if _write_or_remove(path["loss.png"], _curves(series, meta, subtitle)):
        written.append(path["loss.png"])
    if _write_or_remove(path["sweep.png"],
                        lambda tmp: plot_sweep(groups, command.sweeps, best, meta, tmp)):
        written.append(path["sweep.png"])
    return format_sweep_table(groups, keys, best), written
