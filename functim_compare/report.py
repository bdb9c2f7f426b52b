"""Tables and plots: one row per optimizer for a plain comparison; for a study, one row per
(optimizer, settings) over its seeds with the best setting of each optimizer marked, a table of
every run, the final eval loss against each swept setting, and the loss curves of each
optimizer's best setting."""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .corpus import VOCAB
from .registry import show_value
from .sweep import RunRecord, Sweep
from .train import RunResult


def _fmt(v: float | None, spec: str) -> str:
    return "nan" if v is None else format(v, spec)


def _lrs(r: RunResult) -> str:
    return ", ".join(f"{v:g}" for v in r.lr)


def markdown_table(rows: Sequence[Sequence[str]], left: Iterable[int]) -> str:
    """``rows`` (the first is the header) as an aligned Markdown table; columns in ``left`` are
    left-aligned, the others right-aligned."""
    left = set(left)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row):
        cells = [c.ljust(w) if i in left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i not in left else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(rows[0]), rule] + [line(r) for r in rows[1:]])


def _losses(r: RunResult) -> tuple[str, str]:
    if r.diverged_at is not None:
        return (f"diverged (step {r.diverged_at + 1})",) * 2
    return _fmt(r.final_train_loss, ".4f"), _fmt(r.final_eval_loss, ".4f")


def format_table(results: Sequence[RunResult]) -> str:
    """A Markdown table of the final figures, one row per optimizer."""
    rows = [("optimizer", "peak lr", "train loss", "eval loss", "tokens/s", "opt step ms",
             "state B/param")]
    for r in results:
        rows.append((r.optimizer, _lrs(r), *_losses(r), f"{r.tokens_per_s:,.0f}",
                     f"{r.optimizer_step_ms:.2f}", f"{r.state_bytes_per_param:.1f}"))
    return markdown_table(rows, left={0, 1})


# -- a study: runs grouped by (optimizer, settings) -----------------------------------------------
@dataclass
class Group:
    """The runs of one optimizer with one setting, one per seed."""

    optimizer: str
    settings: dict[str, Any]
    records: list[RunRecord]

    @property
    def results(self) -> list[RunResult]:
        return [r.result for r in self.records if r.result is not None]

    @property
    def complete(self) -> bool:
        return len(self.results) == len(self.records)

    @property
    def diverged(self) -> int:
        return sum(r.diverged_at is not None for r in self.results)

    @property
    def eval_losses(self) -> list[float]:
        return [r.final_eval_loss for r in self.results
                if r.diverged_at is None and r.final_eval_loss is not None]

    @property
    def usable(self) -> bool:
        """Every seed finished with a finite eval loss: it may be the best."""
        return self.complete and len(self.eval_losses) == len(self.records)

    @property
    def eval_mean(self) -> float | None:
        return statistics.fmean(self.eval_losses) if self.eval_losses else None

    @property
    def eval_std(self) -> float | None:
        """The sample standard deviation over seeds (None for one seed)."""
        return statistics.stdev(self.eval_losses) if len(self.eval_losses) > 1 else None

    def mean(self, attr: str) -> float | None:
        """The mean of ``attr`` over the finished seeds (losses: those that did not diverge)."""
        skip_diverged = attr.startswith("final_")
        values = [getattr(r, attr) for r in self.results
                  if not (skip_diverged and r.diverged_at is not None)]
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    def divergence(self) -> str | None:
        """How it diverged, in words (None if no seed did)."""
        if not self.diverged:
            return None
        if len(self.results) == 1:
            return f"diverged (step {self.results[0].diverged_at + 1})"
        return f"diverged ({self.diverged}/{len(self.results)} seeds)"


def group_runs(records: Sequence[RunRecord]) -> list[Group]:
    """``records`` grouped by (optimizer, settings), in the order they first appear."""
    groups: dict[tuple, Group] = {}
    for rec in records:
        key = (rec.spec.optimizer, rec.spec.settings)
        if key not in groups:
            groups[key] = Group(rec.spec.optimizer, rec.spec.settings_dict, [])
        groups[key].records.append(rec)
    return list(groups.values())


def best_by_optimizer(groups: Sequence[Group]) -> dict[str, Group]:
    """Each optimizer's group with the lowest mean final eval loss over its seeds, among those
    whose every seed finished without diverging."""
    best: dict[str, Group] = {}
    for g in groups:
        if g.usable and (g.optimizer not in best or g.eval_mean < best[g.optimizer].eval_mean):
            best[g.optimizer] = g
    return best


def edge_notes(sweeps: Sweep, best: Mapping[str, Group]) -> list[str]:
    """A warning for each numeric setting swept over three values or more whose best value is
    the smallest or the largest: the optimum may lie outside the sweep."""
    notes = []
    for name, axes in sweeps.items():
        if name not in best:
            continue
        for key, values in axes:
            if len(values) < 3 or not all(_is_number(v) for v in values):
                continue
            v = best[name].settings[key]
            if v in (min(values), max(values)):
                edge = "smallest" if v == min(values) else "largest"
                notes.append(f"{name}'s best {key} ({show_value(v)}) is the {edge} value swept; "
                             "the optimum may lie beyond it.")
    return notes


def _eval_cell(g: Group) -> str:
    if g.diverged:
        return g.divergence()
    if g.eval_mean is None:
        return "nan" if g.results else "not finished"
    std = "" if g.eval_std is None else f" ± {g.eval_std:.4f}"
    return f"{g.eval_mean:.4f}{std}"


def format_sweep_table(groups: Sequence[Group], keys: Sequence[str],
                       best: Mapping[str, Group]) -> str:
    """One row per (optimizer, settings): the swept ``keys``, seeds finished, train loss (mean
    over seeds), eval loss (mean ± sample std over seeds), tokens/s and optimizer step ms (means
    over seeds), state bytes/param; ``*`` marks each optimizer's best setting."""
    cols = [k for k in keys if k != "lr"]
    rows = [("optimizer", "peak lr", *cols, "seeds", "train loss", "eval loss", "tokens/s",
             "opt step ms", "state B/param", "best")]
    for g in groups:
        done = g.results
        seeds = str(len(g.records)) if g.complete else f"{len(done)}/{len(g.records)}"
        diverged = g.divergence()
        rows.append((
            g.optimizer, _lrs(done[0]) if done else show_value(g.settings.get("lr", "")),
            *(show_value(g.settings[k]) if k in g.settings else "" for k in cols), seeds,
            (diverged or _fmt(g.mean("final_train_loss"), ".4f")) if done else "not finished",
            _eval_cell(g), _fmt(g.mean("tokens_per_s"), ",.0f") if done else "",
            _fmt(g.mean("optimizer_step_ms"), ".2f") if done else "",
            f"{done[0].state_bytes_per_param:.1f}" if done else "",
            "*" if best.get(g.optimizer) is g else ""))
    return markdown_table(rows, left={0, 1, *range(2, 2 + len(cols))})


def format_runs_table(records: Sequence[RunRecord]) -> str:
    """One row per run, with its directory."""
    rows = [("optimizer", "settings", "seed", "train loss", "eval loss", "tokens/s",
             "opt step ms", "state B/param", "run directory")]
    for rec in records:
        r = rec.result
        figures = (("not finished",) * 2 + ("",) * 3 if r is None else
                   (*_losses(r), f"{r.tokens_per_s:,.0f}", f"{r.optimizer_step_ms:.2f}",
                    f"{r.state_bytes_per_param:.1f}"))
        rows.append((rec.spec.optimizer, rec.spec.settings_text(), str(rec.spec.seed), *figures,
                     rec.run_dir))
    return markdown_table(rows, left={0, 1, 8})


# -- plots ----------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def _over_seeds(curves: Sequence[Sequence[float | None]]) -> tuple[list, list, list]:
    """Mean, min and max over ``curves`` at each index they all reach (NaN where one is NaN)."""
    n = min(len(c) for c in curves)
    cols = [[math.nan if c[i] is None else c[i] for c in curves] for i in range(n)]
    return ([statistics.fmean(col) for col in cols], [min(col) for col in cols],
            [max(col) for col in cols])


def plot(series: Sequence[tuple[str, Sequence[RunResult]]], meta: dict, path: str,
         subtitle: str = "") -> None:
    """Train (smoothed) and eval loss curves, as a PNG: one line per ``(label, runs)`` in
    ``series``, the mean over its runs (seeds) with their spread shaded."""
    plt = _pyplot()
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for label, runs in series:
        mean, lo, hi = _over_seeds([_smooth(r.train_loss) for r in runs])
        steps = range(1, len(mean) + 1)
        (line,) = ax_t.plot(steps, mean, lw=1.4, label=label)
        eval_mean, eval_lo, eval_hi = _over_seeds([r.eval_loss for r in runs])
        eval_steps = runs[0].eval_steps[:len(eval_mean)]
        ax_e.plot(eval_steps, eval_mean, marker="o", ms=3, lw=1.4, color=line.get_color(),
                  label=label)
        if len(runs) > 1:
            ax_t.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
            ax_e.fill_between(eval_steps, eval_lo, eval_hi, color=line.get_color(), alpha=0.2,
                              lw=0)
    ax_t.set_title("train loss (EMA 0.9)", fontsize=10)
    ax_t.set_ylabel("cross-entropy (nats/char)")
    ax_e.set_title("eval loss", fontsize=10)
    finals = [v for _, runs in series for r in runs for v in r.train_loss[len(r.train_loss) // 3:]
              if v is not None]
    for ax in (ax_t, ax_e):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if finals:  # the start (~ln 97 = 4.6) would flatten the interesting part
            lo, hi = min(finals), max(finals)
            ax.set_ylim(lo - 0.05 * (hi - lo + 0.1), hi + 0.6 * (hi - lo + 0.1))
    ax_e.legend(fontsize=8)
    _finish(fig, _title(meta) + subtitle, path)
    plt.close(fig)


def _finish(fig, title: str, path: str) -> None:
    """Title ``fig`` (wrapped to its width), lay it out and save it as a PNG."""
    chars_per_line = int(fig.get_figwidth() * 12.5)  # about 12.5 characters an inch at 10 pt
    fig.suptitle(textwrap.fill(title, chars_per_line), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _title(meta: dict) -> str:
    c = meta["config"]
    return (f"functim-compare: {c['model_size']} GPT ({meta['model_params']:,} params), "
            f"{c['steps']} steps, {c['surface']} surface, {c['device']}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _log_axis(key: str, values: Sequence[Any]) -> bool:
    """A log axis for learning rates and for positive values spanning 10x or more."""
    if not values or not all(_is_number(v) and v > 0 for v in values):
        return False
    return key == "lr" or key.endswith("_lr") or max(values) >= 10 * min(values)


def plotted_keys(sweeps: Sweep) -> list[str]:
    """The swept settings with two values or more, in the order first given."""
    keys: list[str] = []
    for axes in sweeps.values():
        keys += [k for k, values in axes if len(values) > 1 and k not in keys]
    return keys


def plot_sweep(groups: Sequence[Group], sweeps: Sweep, best: Mapping[str, Group], meta: dict,
               path: str) -> bool:
    """Final eval loss against each swept setting with two values or more (False, and no file,
    when there is none or no setting has finished): one panel per setting, one line per
    optimizer through its best setting (the other swept settings held there), mean ± std over
    seeds with each seed as a dot, the best circled; an x at the top for a setting that
    diverged, a ^ for one off the scale (worse than the untrained model)."""
    keys = plotted_keys(sweeps)
    if not keys or not any(g.usable for g in groups):
        return False
    plt = _pyplot()
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.5, 4.5 * ncols), 3.6 * nrows),
                             dpi=100, squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {name: cycle[i % len(cycle)] for i, name in enumerate(sweeps)}
    for ax, key in zip(axes.flat, keys):
        _sweep_panel(ax, key, groups, sweeps, best, colors)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    n_seeds = max(len(g.records) for g in groups)
    seeds = (f", mean ± std over {n_seeds} seeds (dots: seeds)" if n_seeds > 1 else ", 1 seed")
    _finish(fig, _title(meta) + seeds + "; circled: best setting", path)
    return True


def _sweep_panel(ax, key: str, groups: Sequence[Group], sweeps: Sweep,
                 best: Mapping[str, Group], colors: Mapping[str, str]) -> None:
    values = [v for axes in sweeps.values() for k, vs in axes if k == key for v in vs]
    numeric = all(_is_number(v) for v in values)
    order = list(dict.fromkeys(show_value(v) for v in values))

    def x_of(g: Group):
        v = g.settings[key]
        return v if numeric else order.index(show_value(v))

    off_scale = []
    for name, axes in sweeps.items():
        swept = dict(axes)
        if len(swept.get(key, ())) < 2:
            continue
        anchor = best.get(name) or next(g for g in groups if g.optimizer == name)
        at_value = {show_value(g.settings[key]): g for g in groups if g.optimizer == name
                    and all(g.settings[k] == anchor.settings[k] for k in swept if k != key)}
        line = [at_value[show_value(v)] for v in swept[key] if show_value(v) in at_value]
        others = " ".join(f"{k}={show_value(anchor.settings[k])}" for k in swept if k != key)
        off_scale += _sweep_line(ax, line, x_of, f"{name} ({others})" if others else name,
                                 best.get(name), colors[name])
    if numeric and _log_axis(key, values):
        ax.set_xscale("log")
    if off_scale:
        ax.set_ylim(top=min(ax.get_ylim()[1], _OFF_SCALE))
        for x, color in off_scale:
            ax.scatter([x], [0.97], marker="^", color=color,
                       transform=ax.get_xaxis_transform(), clip_on=False)
    if numeric:  # the x and ^ markers do not widen the x axis by themselves
        _widen_x(ax, [v for v in values if _is_number(v)])
    if not numeric:
        ax.set_xticks(range(len(order)), order)
    ax.set_xlabel(key)
    ax.set_ylabel("final eval loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _widen_x(ax, xs: Sequence[float]) -> None:
    """Make every swept value visible, with a margin."""
    lo, hi = ax.get_xlim()
    if min(xs) >= lo and max(xs) <= hi:
        return
    if ax.get_xscale() == "log":
        pad = (max(xs) / min(xs)) ** 0.05
        ax.set_xlim(min(lo, min(xs) / pad), max(hi, max(xs) * pad))
    else:
        pad = 0.05 * (max(xs) - min(xs) or 1.0)
        ax.set_xlim(min(lo, min(xs) - pad), max(hi, max(xs) + pad))


# Above this eval loss a run did worse than the untrained model (ln |VOCAB| = 4.57 nats): its
# point would only squash the others, so it is drawn as a ^ at the top of the panel.
_OFF_SCALE = math.log(len(VOCAB)) + 0.5


def _sweep_line(ax, line: Sequence[Group], x_of, label: str, best: Group | None,
                color: str) -> list[tuple[Any, str]]:
    """One optimizer's line; returns the (x, color) of the points off the scale."""
    ok = [g for g in line if g.usable]
    shown = [g for g in ok if g.eval_mean <= _OFF_SCALE]
    stds = [g.eval_std or 0.0 for g in shown]
    ax.errorbar([x_of(g) for g in shown], [g.eval_mean for g in shown],
                yerr=stds if any(stds) else None, marker="o", ms=4, lw=1.4, capsize=3,
                color=color, label=label)
    for g in shown:
        if len(g.eval_losses) > 1:
            ax.scatter([x_of(g)] * len(g.eval_losses), g.eval_losses, s=9, color=color,
                       alpha=0.45, lw=0)
    if best is not None and best in shown:
        ax.scatter([x_of(best)], [best.eval_mean], s=110, facecolors="none", edgecolors=color,
                   lw=1.4, zorder=3)
    failed = [x_of(g) for g in line if g.diverged]
    if failed:  # diverged: no loss to plot, so an x at the top of the panel
        ax.scatter(failed, [0.97] * len(failed), marker="x", color=color,
                   transform=ax.get_xaxis_transform(), clip_on=False)
    return [(x_of(g), color) for g in ok if g.eval_mean > _OFF_SCALE]
