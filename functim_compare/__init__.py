"""``functim-compare``: train a small GPT-style character-level language model with several
optimizers, side by side, sweep their settings over several seeds, and report what each did.

``python -m functim_compare`` (also the console script ``functim-compare``; needs the ``demo``
extra: ``pip install "functim[demo]"``). Runs with the same seed start from the same initial
weights and see the same batches in the same order under the same learning-rate schedule; only
the optimizer and its settings differ. A plain comparison prints one row per optimizer (final
train and eval loss, tokens/s, optimizer step time, optimizer state bytes per parameter); a study
(``--sweep OPT.KEY=V1,V2,...``, ``--seeds``) prints one row per (optimizer, settings) over its
seeds with each optimizer's best setting marked. Under ``--out`` it writes ``results.json``
(every run's curves, figures and identity), ``table.md``, ``loss.png`` (loss curves; of each
optimizer's best setting in a study) and, for a study, ``runs.md`` (every run and its directory)
and ``sweep.png`` (final eval loss against each swept setting).

Choices:

- **Corpus**: a fixed list of Python standard-library sources (:data:`STDLIB_FILES`, read from
  the running interpreter's stdlib, so nothing is downloaded; about 1 MB on CPython 3.11; the
  exact text depends on the Python version), or the user's text files (``--data``, read as
  UTF-8). Characters are a fixed 97-symbol vocabulary (tab, newline and printable ASCII);
  anything else becomes ``?`` (counted and reported for ``--data``). The last 10% of every file
  is the eval split.
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
- **Settings**: ``--sweep OPT.KEY=...`` and ``--lr`` override the entry's settings (``--list``);
  ``KEY`` is any keyword of ``functim.OPT`` whose annotation takes numbers, integers, words,
  ``true``/``false``, a dtype or ``none``; a tuple is written ``0.9:0.95``. Every distinct
  optimizer is built once before anything trains, so a value its constructor rejects is an
  option error.
- **Runs**: a run's identity is everything that determines its result (model shape, data
  fingerprint, steps, schedule and its horizon, evaluation interval, optimizer and all its
  settings, seed, surface, device, dtype, torch and functim versions); its directory
  ``runs/<name>-<the first 10 hex digits of the identity's SHA-256>`` holds ``identity.json``,
  ``checkpoint.pt`` while it trains (every ``--checkpoint-every`` steps and on Ctrl-C) and
  ``result.json`` once finished.
  The same command again reads finished runs back and resumes stopped ones bitwise (the
  checkpoint holds the parameters, the optimizer state, the LR scheduler and the curves so far;
  the batches are a function of the seed). Files are written aside and renamed into place.
- **Surfaces**: ``--surface functional`` (default) computes gradients with
  ``torch.func.grad_and_value`` over ``torch.func.functional_call`` and steps with
  ``opt.update(params, grads, state, donate=True)``; ``--surface adapter`` uses the
  ``functim.adapters`` class with ``model.named_parameters()`` and ``loss.backward()``.
- **Threads**: one torch CPU thread by default on ``--device cpu``. The default model is too
  small to gain much from more, and on a machine busy with other work two threads made the
  default run several times slower (``--threads`` overrides). The thread count is not part of a
  run's identity: it changes speed, and float32 results only in their last digits.
- **Figures**: train loss = mean of the last ``min(10, steps)`` steps' batch losses; eval loss =
  mean cross-entropy over a fixed set of eval windows (Schedule-Free AdamW at its averaged point
  ``x``); tokens/s = training tokens / time in training steps (forward, backward, optimizer;
  evaluation and the first step of each session, which pays one-time setup costs, excluded);
  opt step ms = median time of the optimizer update alone; state B/param = bytes of the
  optimizer's per-parameter state tensors (0-d scalars left out) / parameter count. Over seeds:
  means, and the eval loss's sample standard deviation. A run whose loss stops being finite
  (looked for at every evaluation and checkpoint) is recorded as diverged and the study goes on;
  the best setting of an optimizer is the one with the lowest mean eval loss among those whose
  every seed finished without diverging.
"""

from . import corpus
from .cli import DEFAULT_OPTIMIZERS, PROG, UsageError, build_parser, main
from .corpus import STDLIB_FILES, VOCAB, Corpus, CorpusError, load_corpus, load_text_files
from .model import GPT, MODEL_SIZES, ModelSize
from .registry import _BUILDERS as _BUILDERS  # the builders by name, for tests
from .registry import OptimizerEntry, registry, settable
from .report import format_sweep_table, format_table, plot, plot_sweep
from .sweep import RunRecord, RunSpec, Study, execute, plan_runs, prepare
from .train import (
    SURFACES,
    Batches,
    Checkpoint,
    RunConfig,
    RunDirError,
    RunResult,
    RunStopped,
    initial_model,
    state_nbytes,
    train_one,
)

__all__ = [
    "DEFAULT_OPTIMIZERS", "GPT", "MODEL_SIZES", "PROG", "STDLIB_FILES", "SURFACES", "VOCAB",
    "Batches", "Checkpoint", "Corpus", "CorpusError", "ModelSize", "OptimizerEntry", "RunConfig",
    "RunDirError", "RunRecord", "RunResult", "RunSpec", "RunStopped", "Study", "UsageError",
    "build_parser", "corpus", "execute", "format_sweep_table", "format_table", "initial_model",
    "load_corpus", "load_text_files", "main", "plan_runs", "plot", "plot_sweep", "prepare",
    "registry", "settable", "state_nbytes", "train_one",
]
