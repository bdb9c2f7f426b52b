"""``functim-compare`` as a study tool: sweeps over settings and seeds, runs keyed by their
identity (finished ones skipped, stopped ones resumed bitwise), divergence, ``--data``, and the
one-line errors of bad input, all before anything trains."""

import json
import math
import os
import shutil
import signal
import statistics
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functim_compare as compare
import functim_compare.sweep as sweep_module
from functim_compare.registry import parse_value, show_value

TINY = ["--model-size", "tiny", "--device", "cpu"]
SWEEP = ["--sweep", "adamw.lr=1e-3,3e-3", "--sweep", "muon.lr=0.01,0.02", "--seeds", "0,1",
         "--steps", "6", "--eval-every", "3", *TINY]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run_main(argv, capsys):
    rc = compare.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _results(out_dir) -> dict:
    return json.loads((out_dir / "results.json").read_text())


def _table(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24])[0] > 0


def _no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a run was trained")

    monkeypatch.setattr(sweep_module, "train_one", fail)


CURVE_KEYS = ("train_loss", "eval_steps", "eval_loss", "final_train_loss", "final_eval_loss",
              "diverged_at", "state_bytes_per_param", "lr", "seed", "settings")


def _curves(data: dict) -> dict:
    return {r["run_id"]: {k: r[k] for k in CURVE_KEYS} for r in data["runs"]}


# -- a sweep end to end ---------------------------------------------------------------------------
def test_sweep_writes_table_plots_and_every_run_and_the_same_command_trains_nothing(
        tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    rc, out, err = _run_main([*SWEEP, "--out", str(out_dir)], capsys)
    assert rc == 0, err
    assert "8 runs: 8 to train" in out

    data = _results(out_dir)
    runs = data["runs"]
    assert len(runs) == 8 and data["complete"] and data["runs_finished"] == 8
    assert len({r["run_id"] for r in runs}) == 8
    assert sorted((r["optimizer"], r["settings"]["lr"], r["seed"]) for r in runs) == sorted(
        (o, lr, s) for o, lrs in (("adamw", (1e-3, 3e-3)), ("muon", (0.01, 0.02)))
        for lr in lrs for s in (0, 1))
    assert data["sweep"] == {"adamw": {"lr": [1e-3, 3e-3]}, "muon": {"lr": [0.01, 0.02]}}
    for seed in (0, 1):  # same seed: same initial weights and the same first batch
        same = [r for r in runs if r["seed"] == seed]
        assert len({r["eval_loss"][0] for r in same}) == 1
        assert len({r["train_loss"][0] for r in same}) == 1
    assert runs[0]["eval_loss"][0] != next(r for r in runs if r["seed"] == 1)["eval_loss"][0]
    for r in runs:
        assert len(r["train_loss"]) == 6 and r["eval_steps"] == [0, 3, 6]
        assert r["diverged_at"] is None and r["trained_now"] and r["resumed_at"] == []
        run_dir = out_dir / r["run_dir"]
        assert (run_dir / "result.json").exists() and (run_dir / "identity.json").exists()
        assert not (run_dir / "checkpoint.pt").exists()
        assert json.loads((run_dir / "identity.json").read_text()) == r["identity"]

    _check_sweep_table(out, runs, data["best"])
    assert (out_dir / "table.md").read_text().splitlines() == [
        line for line in out.splitlines() if line.startswith("|")][:6]
    run_rows = _table((out_dir / "runs.md").read_text())[2:]
    assert sorted(row[-1] for row in run_rows) == sorted(r["run_dir"] for r in runs)
    assert _is_png(out_dir / "loss.png") and _is_png(out_dir / "sweep.png")

    _no_training(monkeypatch)
    rc, out2, err = _run_main([*SWEEP, "--out", str(out_dir)], capsys)
    assert rc == 0, err
    assert "8 runs: 8 finished earlier, 0 to train" in out2
    again = _results(out_dir)
    assert _curves(again) == _curves(data)
    assert not any(r["trained_now"] for r in again["runs"])
    assert _table(out2)[:6] == _table(out)[:6]


def _check_sweep_table(out: str, runs: list, best: dict) -> None:
    rows = _table(out)
    assert rows[0] == ["optimizer", "peak lr", "seeds", "train loss", "eval loss", "tokens/s",
                       "opt step ms", "state B/param", "best"]
    body = rows[2:6]
    assert [(row[0], float(row[1])) for row in body] == [
        ("adamw", 1e-3), ("adamw", 3e-3), ("muon", 0.01), ("muon", 0.02)]
    means = {}
    for row in body:
        name, lr = row[0], float(row[1])
        evals = [r["final_eval_loss"] for r in runs
                 if r["optimizer"] == name and r["settings"]["lr"] == lr]
        trains = [r["final_train_loss"] for r in runs
                  if r["optimizer"] == name and r["settings"]["lr"] == lr]
        means[name, lr] = statistics.fmean(evals)
        assert row[2] == "2"
        assert row[3] == f"{statistics.fmean(trains):.4f}"
        assert row[4] == f"{statistics.fmean(evals):.4f} ± {statistics.stdev(evals):.4f}"
    for name in ("adamw", "muon"):
        marked = [float(row[1]) for row in body if row[0] == name and row[-1] == "*"]
        winner = min((lr for n, lr in means if n == name), key=lambda lr: means[name, lr])
        assert marked == [winner] and best[name]["settings"] == {"lr": winner}
        assert best[name]["eval_loss_mean"] == means[name, winner]


def test_a_plain_comparison_is_also_skipped_when_run_again(tmp_path, capsys, monkeypatch):
    argv = ["--optimizers", "adamw", "--steps", "3", "--out", str(tmp_path), *TINY]
    rc, out, _ = _run_main(argv, capsys)
    assert rc == 0 and "to train" not in out  # nothing to say on a first plain run
    first = _results(tmp_path)
    _no_training(monkeypatch)
    rc, out, _ = _run_main(argv, capsys)
    assert rc == 0 and "1 run: 1 finished earlier, 0 to train" in out
    assert _curves(_results(tmp_path)) == _curves(first)
    assert not (tmp_path / "sweep.png").exists() and not (tmp_path / "runs.md").exists()


# -- stopping and resuming ------------------------------------------------------------------------
def _stop_at(monkeypatch, run_index: int, step: int, how):
    """Make the ``run_index``-th run (0-based, in training order) call ``how()`` when it fetches
    the batch of ``step``."""
    original = compare.Batches.__call__
    state = {"run": -1, "armed": True}

    def batches_call(self, s):
        if s == 0:
            state["run"] += 1
        if state["armed"] and state["run"] == run_index and s == step:
            state["armed"] = False
            how()
        return original(self, s)

    monkeypatch.setattr(compare.Batches, "__call__", batches_call)


def _ctrl_c():
    # the command's handler must be in place: otherwise this would interrupt the test session
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    os.kill(os.getpid(), signal.SIGINT)


RESUME = ["--optimizers", "adamw,muon", "--steps", "8", "--eval-every", "3",
          "--checkpoint-every", "2", *TINY]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    assert compare.main([*RESUME, "--out", str(out_dir)]) == 0
    return _curves(_results(out_dir))


def test_ctrl_c_stops_at_a_step_boundary_and_the_same_command_resumes_bitwise(
        tmp_path, capsys, monkeypatch, uninterrupted):
    """Ctrl-C during muon's step 6: muon writes a checkpoint after that step, the finished adamw
    run and a partial results.json are written, exit status 130; the same command again trains
    only muon's last 2 steps, and every curve equals the uninterrupted run's bit for bit."""
    _stop_at(monkeypatch, run_index=1, step=5, how=_ctrl_c)
    rc, out, err = _run_main([*RESUME, "--out", str(tmp_path)], capsys)
    assert rc == 130
    assert "muon seed 0 stopped after step 6, its checkpoint written" in err
    partial = _results(tmp_path)
    assert not partial["complete"] and partial["runs_finished"] == 1
    adamw, muon = partial["runs"]
    assert adamw["trained_now"] and adamw["status"] == "finished"
    assert muon["status"] == "not finished" and "train_loss" not in muon
    assert (tmp_path / muon["run_dir"] / "checkpoint.pt").exists()
    assert not (tmp_path / muon["run_dir"] / "result.json").exists()
    assert not list(tmp_path.rglob("*.tmp-*"))  # every file written whole or not at all

    monkeypatch.undo()
    steps = []
    original = compare.Batches.__call__
    monkeypatch.setattr(compare.Batches, "__call__",
                        lambda self, s: steps.append(s) or original(self, s))
    rc, out, err = _run_main([*RESUME, "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    assert "2 runs: 1 finished earlier, 1 resumes from a checkpoint, 0 to train" in out
    assert steps == [6, 7]
    resumed = _results(tmp_path)
    assert resumed["runs"][1]["resumed_at"] == [6]
    assert not (tmp_path / muon["run_dir"] / "checkpoint.pt").exists()
    assert _curves(resumed) == uninterrupted


def test_a_killed_run_resumes_from_its_last_checkpoint_bitwise(tmp_path, capsys, monkeypatch,
                                                               uninterrupted):
    """A run killed between checkpoints (here an exception in adamw's step 6) resumes from the
    checkpoint of step 4, and ends as the uninterrupted run did, bit for bit."""

    def crash():
        raise RuntimeError("killed")

    _stop_at(monkeypatch, run_index=0, step=5, how=crash)
    with pytest.raises(RuntimeError, match="killed"):
        compare.main([*RESUME, "--out", str(tmp_path)])
    capsys.readouterr()
    monkeypatch.undo()
    rc, out, err = _run_main([*RESUME, "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    assert "2 runs: 1 resumes from a checkpoint, 1 to train" in out
    resumed = _results(tmp_path)
    assert [r["resumed_at"] for r in resumed["runs"]] == [[4], []]
    assert _curves(resumed) == uninterrupted


REGISTRY = compare.registry()


@pytest.mark.parametrize("surface", compare.SURFACES)
@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_optimizer_resumes_bitwise_on_both_surfaces(name, surface, tmp_path):
    """Stopped after step 7 of 12 and resumed from its checkpoint, a run trains exactly the 5
    remaining steps and gives the uninterrupted curves bit for bit (parameters, optimizer state,
    LR scheduler and random-generator state all restored)."""
    entry = REGISTRY[name]
    cfg = compare.RunConfig(12, "tiny", 0, "cpu", surface, 4)
    model0 = compare.initial_model(cfg)
    batches = compare.Batches(compare.load_corpus(), cfg)
    straight = compare.train_one(entry, entry.lr, model0, batches, cfg)
    checkpoint = compare.Checkpoint(str(tmp_path / "checkpoint.pt"), every=5,
                                    identity={"run": name})
    with pytest.raises(compare.RunStopped) as stopped:
        compare.train_one(entry, entry.lr, model0, batches, cfg, checkpoint=checkpoint,
                          stop=lambda done: done == 7)
    assert stopped.value.step == 7 and checkpoint.step() == 7
    steps = []
    resumed = compare.train_one(entry, entry.lr, model0, batches, cfg, checkpoint=checkpoint,
                                on_step=lambda: steps.append(1))
    assert len(steps) == 5 and resumed.resumed_at == [7]
    assert resumed.train_loss == straight.train_loss
    assert resumed.eval_steps == straight.eval_steps == [0, 4, 8, 12]
    assert resumed.eval_loss == straight.eval_loss
    assert resumed.state_bytes_per_param == straight.state_bytes_per_param


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    entry = REGISTRY["adamw"]
    cfg = compare.RunConfig(4, "tiny", 0, "cpu", "functional", 2)
    model0, batches = compare.initial_model(cfg), compare.Batches(compare.load_corpus(), cfg)
    path = str(tmp_path / "checkpoint.pt")
    with pytest.raises(compare.RunStopped):
        compare.train_one(entry, entry.lr, model0, batches, cfg,
                          checkpoint=compare.Checkpoint(path, 2, {"run": "a"}),
                          stop=lambda done: done == 1)
    with pytest.raises(compare.RunDirError, match="belongs to another run"):
        compare.Checkpoint(path, 2, {"run": "b"}).step()


# -- run identity ---------------------------------------------------------------------------------
def _run_id(optimizer="adamw", settings=(), seed=0, **cfg_changes) -> str:
    cfg = {"steps": 10, "model_size": "tiny", "seed": 0, "device": "cpu",
           "surface": "functional", "eval_every": 5, **cfg_changes}
    spec = compare.RunSpec(optimizer, tuple(settings), seed)
    study = compare.Study([spec], REGISTRY, compare.RunConfig(**cfg), _corpus(), "out", 5)
    return study.record(spec).run_id


_CORPUS = []


def _corpus() -> compare.Corpus:
    if not _CORPUS:
        _CORPUS.append(compare.load_corpus())
    return _CORPUS[0]


def test_run_identity_is_what_determines_the_result():
    base = _run_id()
    assert _run_id() == base
    assert _run_id(settings=[("lr", 3e-3)]) == base  # adamw's default lr, written out
    changed = [
        _run_id(settings=[("lr", 1e-3)]), _run_id(settings=[("betas", (0.9, 0.99))]),
        _run_id(seed=1), _run_id(steps=20), _run_id(eval_every=2), _run_id(model_size="small"),
        _run_id(surface="adapter"), _run_id(optimizer="lion"),
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    spec = compare.RunSpec("adamw", (), 0)
    study = compare.Study([spec], REGISTRY, compare.RunConfig(10, "tiny", 0, "cpu", "functional",
                                                              5), _corpus(), "out", 5)
    identity = study.identity(spec)
    assert identity["torch"] == torch.__version__ and identity["functim"]
    assert identity["schedule"]["total_steps"] == 10  # the horizon, not only the steps run
    assert identity["data"]["sha256"] == _corpus().fingerprint()


# -- divergence -----------------------------------------------------------------------------------
def test_a_diverging_run_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    rc, out, err = _run_main(["--sweep", "sgd.lr=1e30,0.3", "--steps", "10", "--out",
                              str(tmp_path), *TINY], capsys)
    assert rc == 0, err
    huge, sane = _results(tmp_path)["runs"]
    assert huge["status"] == "diverged" and huge["final_eval_loss"] is None
    assert huge["train_loss"][huge["diverged_at"]] is None  # not finite
    assert all(v is not None for v in huge["train_loss"][:huge["diverged_at"]])
    assert sane["diverged_at"] is None and math.isfinite(sane["final_eval_loss"])
    rows = _table(out)[2:4]
    assert rows[0][4] == f"diverged (step {huge['diverged_at'] + 1})" and rows[0][-1] == ""
    assert rows[1][-1] == "*"
    assert _results(tmp_path)["best"]["sgd"]["settings"] == {"lr": 0.3}


# -- --data ---------------------------------------------------------------------------------------
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60))


def test_data_trains_on_the_users_text_and_its_content_keys_the_run(tmp_path, capsys,
                                                                   monkeypatch):
    text_file = tmp_path / "mine.txt"
    text_file.write_text(TEXT + "caf\u00e9\n", encoding="utf-8")
    argv = ["--optimizers", "adamw", "--steps", "4", "--out", str(tmp_path / "out"), *TINY]
    rc, out, err = _run_main([*argv, "--data", str(text_file)], capsys)
    assert rc == 0, err
    assert "data: 1 file," in out and "1 character outside" in out
    data = _results(tmp_path / "out")
    expected = compare.load_text_files([str(text_file)])
    assert data["corpus"]["source"] == "--data"
    assert data["corpus"]["files"] == [str(text_file.resolve())]
    assert data["corpus"]["sha256"] == expected.fingerprint() != _corpus().fingerprint()
    assert data["corpus"]["train_chars"] + data["corpus"]["eval_chars"] == len(TEXT) + 5

    renamed = tmp_path / "renamed.txt"
    shutil.copy(text_file, renamed)
    _no_training(monkeypatch)
    rc, out, _ = _run_main([*argv, "--data", str(renamed)], capsys)
    assert rc == 0 and "1 finished earlier" in out


def test_load_text_files_splits_every_file_and_reads_unknown_characters_as_question_marks(
        tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a" * 90 + "A" * 10)
    b.write_text("\u00e9" * 20 + "?" * 30, encoding="utf-8")
    corpus = compare.load_text_files([str(a), str(b)])
    decode = "".join  # ids back to text
    train = decode(compare.VOCAB[i] for i in corpus.train.tolist())
    held = decode(compare.VOCAB[i] for i in corpus.eval.tolist())
    assert train == "a" * 90 + "\n\n" + "?" * 45
    assert held == "A" * 10 + "\n\n" + "?" * 5
    assert corpus.unknown_chars == 20


# -- bad input: one line, exit status 2, nothing trained and nothing written ----------------------
@pytest.mark.parametrize("argv, expected", [
    (["--sweep", "nope.lr=1e-3"], "--sweep: 'nope': unknown optimizer"),
    (["--sweep", "adamw.lrr=1e-3"], "'lrr' is not a setting of functim.adamw"),
    (["--sweep", "adamw.weight_decay_mask=x"], "cannot be set from the command line"),
    (["--sweep", "adamw.lr=fast"], "adamw.lr=fast: expected a finite number, got 'fast'"),
    (["--sweep", "adamw.lr=inf"], "adamw.lr=inf: expected a finite number"),
    (["--sweep", "muon.ns_steps=2.5"], "ns_steps=2.5: expected an integer, got '2.5'"),
    (["--sweep", "adamw.betas=0.9"], "betas=0.9: expected 2 values joined by ':'"),
    (["--sweep", "adamw.amsgrad=maybe"], "amsgrad=maybe: expected true or false"),
    (["--sweep", "muon.scale_mode=bogus"], "muon scale_mode=bogus: muon: scale_mode must be"),
    (["--sweep", "adamw.betas=0.9:1.5"], "adamw betas=0.9:1.5: adamw: hyperparameter 'beta2'"),
    (["--sweep", "adamw.lr=-1"], "adamw lr=-1.0: adamw: hyperparameter 'lr' must be"),
    (["--sweep", "adamw.state_dtype=none,bfloat16"],  # accepted by the constructor, not the model
     "adamw state_dtype=bfloat16: adamw: state_dtype=torch.bfloat16 cannot hold"),
    (["--sweep", "adamw.lr="], "--sweep adamw.lr: expected comma-separated values, got ''"),
    (["--sweep", "adamw.lr=1e-3,,1e-2"], "expected comma-separated values"),
    (["--sweep", ""], "--sweep: expected OPT.KEY=V1,V2,..., got ''"),
    (["--sweep", "adamw"], "expected OPT.KEY=V1,V2,..."),
    (["--sweep", "adamw.lr=1e-3,0.001"], "--sweep adamw.lr: 0.001 given more than once"),
    (["--sweep", "adamw.lr=1e-3", "--sweep", "adamw.lr=2e-3"], "given more than once; list"),
    (["--optimizers", "adamw", "--sweep", "lion.lr=1e-3"], "'lion' is not one of --optimizers"),
    (["--lr", "adamw=1e-3", "--sweep", "adamw.lr=2e-3"], "both set adamw's lr"),
    (["--seeds", ""], "--seeds: expected comma-separated integers"),
    (["--seeds", "0,x"], "--seeds: expected comma-separated integers"),
    (["--seeds", "0,1,0"], "--seeds: 0 given more than once"),
    (["--seeds", "-1"], "seeds must be >= 0"),
    (["--seed", "1", "--seeds", "0,1"], "--seed and --seeds both given"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    (["--data", "MISSING"], "--data: MISSING: no such file"),
    (["--data", "DIR"], "is a directory"),
    (["--data", "SHORT"], "too few for one batch"),
    (["--data", "BINARY"], "is not a text file"),
    (["--data"], "expected at least one argument"),
    (["--out", "UNDER_A_FILE"], "--out: cannot create"),
])
def test_bad_input_is_one_line_and_exit_2_before_anything_trains(argv, expected, tmp_path,
                                                                  capsys, monkeypatch):
    paths = {"MISSING": tmp_path / "missing.txt", "DIR": tmp_path, "SHORT": tmp_path / "s.txt",
             "BINARY": tmp_path / "b.bin", "UNDER_A_FILE": tmp_path / "s.txt" / "out"}
    paths["SHORT"].write_text("x" * 300)  # tiny needs 34 eval characters: 340 in all
    paths["BINARY"].write_bytes(b"text\0" * 200)
    argv = [str(paths[a]) if a in paths else a for a in argv]
    expected = expected.replace("MISSING", str(paths["MISSING"]))
    _no_training(monkeypatch)
    out_dir = tmp_path / "out"
    rc, out, err = _run_main([*TINY, "--steps", "2", "--out", str(out_dir), *argv], capsys)
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("functim-compare: error: "), err
    assert expected in err, err
    assert not out_dir.exists()


def test_a_file_just_long_enough_for_one_batch_trains(tmp_path, capsys):
    text_file = tmp_path / "t.txt"
    text_file.write_text("abcdefghij" * 34)  # 340 characters: 306 train, 34 eval
    rc, _, err = _run_main(["--optimizers", "adamw", "--steps", "2", "--data", str(text_file),
                            "--out", str(tmp_path / "out"), *TINY], capsys)
    assert rc == 0, err


def test_an_unusable_run_directory_is_a_one_line_error(tmp_path, capsys):
    argv = ["--optimizers", "adamw", "--steps", "2", "--out", str(tmp_path), *TINY]
    assert _run_main(argv, capsys)[0] == 0
    (result,) = tmp_path.glob("runs/*/result.json")
    result.write_text("{not json")
    rc, out, err = _run_main(argv, capsys)
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and "result.json is unusable" in err
    assert "delete its directory" in err


# -- settings from the command line ---------------------------------------------------------------
def test_every_optimizer_can_sweep_its_lr_and_not_its_rules():
    for name, entry in REGISTRY.items():
        kinds = compare.settable(entry)
        assert kinds["lr"] == ("float",), name
        assert "weight_decay_mask" not in kinds and "routing" not in kinds
    muon = compare.settable(REGISTRY["muon"])
    assert muon["scale_mode"] == ("str",) and muon["ns_steps"] == ("int",)
    assert muon["nesterov"] == ("bool",) and muon["ns_dtype"] == ("dtype", "none")
    assert muon["adamw_betas"] == (("float", "float"),)


def test_list_names_the_settings_sweep_can_vary(capsys):
    rc, out, _ = _run_main(["--list"], capsys)
    assert rc == 0
    line = next(line for line in out.splitlines() if "--sweep muon.KEY:" in line)
    assert line.split(": ", 1)[1].split(", ") == list(compare.settable(REGISTRY["muon"]))
    assert "scale_mode" in line and "routing" not in line


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_a_number_reads_back_as_written(x):
    assert parse_value(show_value(x), ("float",)) == x


@given(st.tuples(st.floats(0, 1), st.floats(0, 1)), st.booleans(), st.integers(-10**6, 10**6))
def test_tuples_bools_and_ints_read_back_as_written(pair, flag, n):
    assert parse_value(show_value(pair), (("float", "float"),)) == pair
    assert parse_value(show_value(flag), ("bool",)) is flag
    assert parse_value(show_value(n), ("int",)) == n


def test_none_and_dtypes_read_as_python_values():
    assert parse_value("none", ("dtype", "none")) is None
    assert parse_value("bfloat16", ("dtype", "none")) is torch.bfloat16
    assert parse_value("torch.float64", ("dtype",)) is torch.float64
    assert parse_value("none", ("str",)) == "none"  # a word, where None is not allowed
    with pytest.raises(ValueError, match="expected a torch dtype"):
        parse_value("float33", ("dtype",))
