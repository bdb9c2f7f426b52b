"""``functim-compare`` (functim_compare/): the command end to end on a tiny model, its one-line
errors, the optimizer registry, the LR schedule it applies, and the functional and adapter
surfaces giving the same loss curves."""

import dataclasses
import functools
import importlib.metadata
import json
import math
import struct
import subprocess
import sys

import pytest
import torch

import functim as ft
import functim_compare as compare

TINY = ["--model-size", "tiny", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model gains nothing from threads, and one thread keeps the timings of a shared
    machine from dominating the test time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _corpus() -> compare.Corpus:
    return compare.load_corpus()


@pytest.fixture
def corpus():
    return _corpus()


def _run_main(argv, capsys):
    rc = compare.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _train(entry, surface, corpus, steps=4, eval_every=2, seed=0):
    cfg = compare.RunConfig(steps=steps, model_size="tiny", seed=seed, device="cpu",
                            surface=surface, eval_every=eval_every)
    return compare.train_one(entry, entry.lr, compare.initial_model(cfg),
                             compare.Batches(corpus, cfg), cfg)


# -- the command end to end -----------------------------------------------------------------------
def test_command_writes_table_png_and_results(tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc, out, err = _run_main(["--optimizers", "adamw,lion", "--steps", "8", "--eval-every", "4",
                              "--lr", "lion=1e-3", "--out", str(out_dir), *TINY], capsys)
    assert rc == 0, err
    assert "Traceback" not in err

    data = json.loads((out_dir / "results.json").read_text())
    runs = {r["optimizer"]: r for r in data["runs"]}
    assert list(runs) == ["adamw", "lion"]
    assert data["config"]["steps"] == 8 and data["config"]["surface"] == "functional"
    assert runs["adamw"]["lr"] == [3e-3] and runs["lion"]["lr"] == [1e-3]
    for r in runs.values():
        assert len(r["train_loss"]) == 8
        assert r["eval_steps"] == [0, 4, 8] and len(r["eval_loss"]) == 3
        assert all(v is not None and math.isfinite(v) for v in r["train_loss"] + r["eval_loss"])
        assert r["diverged_at"] is None
        assert r["final_train_loss"] == pytest.approx(sum(r["train_loss"]) / 8, rel=1e-12)
        assert r["final_eval_loss"] == r["eval_loss"][-1]
        assert r["tokens_per_s"] > 0 and r["optimizer_step_ms"] > 0
    # same initial weights and the same first batch for every optimizer
    assert runs["adamw"]["eval_loss"][0] == runs["lion"]["eval_loss"][0]
    assert runs["adamw"]["train_loss"][0] == runs["lion"]["train_loss"][0]
    adamw = runs["adamw"]
    assert adamw["eval_loss"][-1] < adamw["eval_loss"][0]
    assert sum(adamw["train_loss"][-3:]) < sum(adamw["train_loss"][:3])
    # float32 params: AdamW keeps 2 floats per param (two moments), Lion 1 (its momentum)
    assert runs["adamw"]["state_bytes_per_param"] == 8.0
    assert runs["lion"]["state_bytes_per_param"] == 4.0

    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 4  # header, rule, two rows
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["optimizer", "peak lr", "train loss", "eval loss", "tokens/s",
                      "opt step ms", "state B/param"]
    for line, name in zip(table[2:], ["adamw", "lion"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        r = runs[name]
        assert cells[0] == name
        assert float(cells[1]) == r["lr"][0]
        assert cells[2] == f"{r['final_train_loss']:.4f}"
        assert cells[3] == f"{r['final_eval_loss']:.4f}"
        assert float(cells[6]) == r["state_bytes_per_param"]
    assert (out_dir / "table.md").read_text() == "\n".join(table) + "\n"

    png = (out_dir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (900, 340)


def test_list_help_and_console_script(capsys):
    rc, out, _ = _run_main(["--list"], capsys)
    assert rc == 0
    for name in compare.registry():
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    rc, out, _ = _run_main(["--help"], capsys)
    assert rc == 0 and "--optimizers" in out and "--surface" in out
    scripts = importlib.metadata.entry_points(group="console_scripts", name="functim-compare")
    assert [ep.value for ep in scripts] == ["functim_compare:main"]


# -- bad options: one line on stderr, exit status 2, nothing trained ------------------------------
NOT_A_FILE_DIR = "__file__"


@pytest.mark.parametrize("argv, expected", [
    (["--optimizers", "adamw,nope"], "'nope': unknown optimizer"),
    (["--optimizers", "adamw,,lion"], "expected comma-separated names"),
    (["--optimizers", "adamw,adamw"], "adamw given more than once"),
    (["--optimizers", ""], "expected comma-separated names"),
    (["--lr", "adamw"], "expected NAME=VALUE"),
    (["--optimizers", "adamw", "--lr", "lion=1e-3"], "'lion' is not one of --optimizers"),
    (["--lr", "adamw=fast"], "is not a number"),
    (["--lr", "adamw=-1"], "must be a finite number > 0"),
    (["--lr", "adamw=nan"], "must be a finite number > 0"),
    (["--lr", "adamw=1e-3,adamw=2e-3"], "adamw given more than once"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "ten"], "invalid int value: 'ten'"),
    (["--eval-every", "0"], "--eval-every must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--model-size", "huge"], "invalid choice: 'huge'"),
    (["--surface", "jax"], "invalid choice: 'jax'"),
    (["--device", "toaster"], "--device: 'toaster' is not a torch device"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--out", NOT_A_FILE_DIR], "exists and is not a directory"),
])
def test_bad_options_give_one_line_and_exit_2(argv, expected, capsys, tmp_path):
    if NOT_A_FILE_DIR in argv:
        path = tmp_path / "a_file"
        path.write_text("")
        argv = [str(path) if a == NOT_A_FILE_DIR else a for a in argv]
    rc, out, err = _run_main(argv, capsys)
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("functim-compare: error: "), err
    assert expected in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_an_option_error(capsys):
    rc, _, err = _run_main(["--device", "cuda"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "CUDA is not available" in err


def test_bad_option_from_the_shell_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "functim_compare", "--optimizers", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("functim-compare: error: --optimizers: 'nope'")


# -- the registry ---------------------------------------------------------------------------------
def test_registry_offers_exactly_the_optimizers_functim_has():
    reg = compare.registry()
    assert set(reg) == {n for n in compare._BUILDERS if hasattr(ft, n)}
    assert "sophia" not in reg  # needs Hessian estimates: left out on purpose
    for name in compare.DEFAULT_OPTIMIZERS:
        assert name in reg
    for name, entry in reg.items():
        assert entry.name == name
        assert entry.lr is None or entry.lr > 0


def _bytes_per_param_expected(name: str, model: torch.nn.Module) -> float | None:
    """Float32 params: the optimizer's state tensors per param x 4 bytes."""
    per_param = {"adamw": 2, "nadamw": 2, "cautious_adamw": 2, "lion": 1, "cautious_lion": 1,
                 "signum": 1, "signsgd": 0, "mars": 3, "schedule_free_adamw": 2, "sgd": 1}
    if name in per_param:
        return 4.0 * per_param[name]
    if name == "muon":  # 1 buffer on the hidden matrices, 2 (AdamW) on everything else
        named = dict(model.named_parameters())
        hidden = sum(p.numel() for n, p in named.items() if n.startswith("blocks.") and p.ndim == 2)
        total = sum(p.numel() for p in named.values())
        return (4.0 * hidden + 8.0 * (total - hidden)) / total
    return None


REGISTRY = compare.registry()


@functools.cache
def _curves(name: str, surface: str) -> compare.RunResult:
    return _train(REGISTRY[name], surface, _corpus(), steps=3, eval_every=3)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_optimizer_gives_the_same_curves_on_both_surfaces(name):
    """Finite curves, the same state size on both surfaces, that size as each optimizer's
    buffers imply, and bitwise equal curves.

    Gradients from ``torch.func.grad`` over ``functional_call`` and from ``loss.backward()`` are
    bitwise equal here, the schedule is applied as the same float64 products, and the design
    contract makes the functional and adapter updates bitwise equal: so the curves must be
    bitwise equal, not merely close. (This caught the adapter pairing a callable
    weight_decay_mask with the wrong params, fixed in f954a1c.)"""
    f, a = _curves(name, "functional"), _curves(name, "adapter")
    for r in (f, a):
        assert all(v is not None and math.isfinite(v) for v in r.train_loss + r.eval_loss)
        assert len(r.train_loss) == 3 and r.eval_steps == [0, 3]
    assert f.state_bytes_per_param == a.state_bytes_per_param
    expected = _bytes_per_param_expected(name, compare.initial_model(
        compare.RunConfig(3, "tiny", 0, "cpu", "functional", 3)))
    if expected is not None:
        assert f.state_bytes_per_param == pytest.approx(expected, rel=1e-12)
    assert f.train_loss == a.train_loss
    assert f.eval_loss == a.eval_loss


def test_adamw_curves_bitwise_equal_on_both_surfaces(corpus):
    """The demo's AdamW (weight decay on matrices only): the whole harness (data, gradients,
    schedule, weight-decay mask, evaluation) is bitwise the same on both surfaces over 12 steps of
    warmup and cosine decay."""
    entry = REGISTRY["adamw"]
    f = _train(entry, "functional", corpus, steps=12, eval_every=4)
    a = _train(entry, "adapter", corpus, steps=12, eval_every=4)
    assert len(f.train_loss) == 12 and f.eval_steps == [0, 4, 8, 12]
    assert f.train_loss == a.train_loss
    assert f.eval_loss == a.eval_loss
    assert f.eval_loss[-1] < f.eval_loss[0]


# -- the learning-rate schedule -------------------------------------------------------------------
def _recording(entry: compare.OptimizerEntry, seen: list) -> compare.OptimizerEntry:
    """``entry`` with both surfaces recording the lr used by every update."""

    def functional(lr, warmup_steps):
        inner = entry.functional(lr, warmup_steps)

        def update(params, grads, state, *, donate=False, **extra):
            seen.append(float(ft.get_hyperparams(state)["lr"]))
            return inner.update(params, grads, state, donate=donate, **extra)

        return ft.Optimizer.from_functions(inner.init_state, update, name=inner.name)

    def adapter(named_params, lr, warmup_steps):
        opt = entry.adapter(named_params, lr, warmup_steps)
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
        return opt

    return dataclasses.replace(entry, functional=functional, adapter=adapter)


@pytest.mark.parametrize("surface", compare.SURFACES)
def test_lr_follows_warmup_cosine_on_both_surfaces(surface, corpus):
    steps, warmup, peak = 20, 2, 3e-3
    seen: list[float] = []
    _train(_recording(compare.registry()["adamw"], seen), surface, corpus, steps=steps,
           eval_every=steps)
    unit = ft.warmup_cosine(1.0, warmup_steps=warmup, total_steps=steps)
    assert seen == [peak * float(unit(s)) for s in range(steps)]
    assert seen[0] == 0.0 and seen[1] == peak / 2 and seen[warmup] == peak
    assert all(a > b > 0 for a, b in zip(seen[warmup:], seen[warmup + 1:]))


@pytest.mark.parametrize("surface", compare.SURFACES)
def test_schedule_free_gets_its_builtin_warmup_and_a_constant_lr(surface, corpus):
    seen: list[float] = []
    entry = _recording(compare.registry()["schedule_free_adamw"], seen)
    _train(entry, surface, corpus, steps=10, eval_every=10)
    assert seen == [3e-3] * 10
    opt = entry.functional(3e-3, 1)
    hp = ft.get_hyperparams(opt.init_state({"w": torch.zeros(2)}))
    assert float(hp["warmup_steps"]) == 1.0


def test_missing_corpus_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(compare.corpus, "STDLIB_FILES", ("no_such_module_here.py",))
    rc, out, err = _run_main(["--optimizers", "adamw", "--steps", "2", "--out", str(tmp_path),
                              *TINY], capsys)
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("functim-compare: error: found only 0 "), err
    assert not (tmp_path / "results.json").exists()
