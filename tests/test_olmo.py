"""OLMo-core configs (functim.adapters.olmo) against the contract in that module's docstring:
build with group overrides and strict matching, steps equal to the adapter driven directly,
OLMo-core checkpoints (flattened and nested) resume bitwise with dtypes kept, FSDP2 state
sharded like the params, and a real OLMo-core Trainer on CPU resumes bitwise after a hard stop.

The per-config tests use a tiny model with OLMo-core's parameter names (``embeddings.weight``,
``blocks.0.attention.w_q.weight``, ``lm_head.w_out.weight``, ...); the build/routing tests and
the Trainer use OLMo-core's own ``TransformerConfig.olmo2_1M(vocab_size=128)``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import types
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("olmo_core")

from conftest import assert_trees_equal  # noqa: E402
from functim.adapters.olmo import (  # noqa: E402
    AdamWConfig,
    CautiousAdamWConfig,
    CautiousLionConfig,
    FunctimOptimConfig,
    KronConfig,
    LionConfig,
    MarsConfig,
    MuonConfig,
    NAdamWConfig,
    RoutedOptimConfig,
    ScheduleFreeAdamWConfig,
    ScionConfig,
    SGDConfig,
    SignSGDConfig,
    SignumConfig,
    SoapConfig,
    SophiaConfig,
    SophiaHessianCallback,
    register,
)
from olmo_core.distributed.checkpoint import (  # noqa: E402
    load_model_and_optim_state,
    save_model_and_optim_state,
)
from olmo_core.exceptions import OLMoConfigurationError  # noqa: E402
from olmo_core.optim import AdamWConfig as OLMoAdamWConfig  # noqa: E402
from olmo_core.optim import CosWithWarmup, OptimConfig, OptimGroupOverride  # noqa: E402
from ranks import run_ranks  # noqa: E402

import functim as ft  # noqa: E402
from functim import adapters  # noqa: E402
from functim.optimizers.scion import default_norms  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


# -- the cases -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    config: type
    adapter: type
    kwargs: dict
    adapter_kwargs: dict | None = None  # where the adapter's types differ (dtypes)
    dtype: torch.dtype = torch.float32  # the model's dtype
    override: tuple = (("weight_decay", 0.0),)  # opts of the group override on NO_DECAY

    def build_config(self, **extra) -> FunctimOptimConfig:
        return self.config(**self.kwargs, **extra)

    def overrides(self) -> list[OptimGroupOverride]:
        return [OptimGroupOverride(params=NO_DECAY, opts=dict(self.override))]

    @property
    def routed(self) -> bool:
        return issubclass(self.config, RoutedOptimConfig)


CASES = {
    "sgd": Case(SGDConfig, adapters.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.1,
                                              nesterov=True)),
    "sgd_f64_state": Case(SGDConfig, adapters.SGD,
                          dict(lr=1e-2, momentum=0.9, state_dtype="float64"),
                          dict(lr=1e-2, momentum=0.9, state_dtype=torch.float64)),
    "adamw": Case(AdamWConfig, adapters.AdamW, dict(lr=1e-2, betas=(0.8, 0.95),
                                                    weight_decay=0.1)),
    "adamw_amsgrad_unfused": Case(AdamWConfig, adapters.AdamW,
                                  dict(lr=1e-2, amsgrad=True, fused=False)),
    "adamw_bf16": Case(AdamWConfig, adapters.AdamW, dict(lr=1e-2, weight_decay=0.1),
                       dtype=torch.bfloat16),
    "nadamw_torch": Case(NAdamWConfig, adapters.NAdamW, dict(lr=1e-2, variant="torch")),
    "cautious_adamw": Case(CautiousAdamWConfig, adapters.CautiousAdamW,
                           dict(lr=1e-2, weight_decay=0.1)),
    "cautious_lion": Case(CautiousLionConfig, adapters.CautiousLion,
                          dict(lr=1e-2, weight_decay=0.1)),
    "lion": Case(LionConfig, adapters.Lion, dict(lr=1e-2, weight_decay=0.1)),
    "signsgd": Case(SignSGDConfig, adapters.SignSGD, dict(lr=1e-2, weight_decay=0.1)),
    "signum": Case(SignumConfig, adapters.Signum, dict(lr=1e-2, beta=0.9, weight_decay=0.1)),
    "mars": Case(MarsConfig, adapters.Mars, dict(lr=1e-2, weight_decay=0.1, optimize_1d=True)),
    "schedule_free_adamw": Case(ScheduleFreeAdamWConfig, adapters.ScheduleFreeAdamW,
                                dict(lr=1e-2, warmup_steps=2, weight_decay=0.1)),
    "muon": Case(MuonConfig, adapters.Muon, dict(lr=2e-2, weight_decay=0.1,
                                                 adamw_weight_decay=0.05)),
    "muon_adamw_lr_f64_ns": Case(MuonConfig, adapters.Muon,
                                 dict(lr=2e-2, adamw_lr=1e-2, ns_dtype="float64"),
                                 dict(lr=2e-2, adamw_lr=1e-2, ns_dtype=torch.float64)),
    "scion": Case(ScionConfig, adapters.Scion,
                  dict(lr=1e-2, momentum=0.1, norms={"hidden": {"type": "Spectral",
                                                                "scale": 2.0}}),
                  dict(lr=1e-2, momentum=0.1, norms={**default_norms(),
                                                     "hidden": ft.Spectral(scale=2.0)}),
                  override=(("lr", 5e-3),)),
    "soap": Case(SoapConfig, adapters.Soap, dict(lr=1e-2, precondition_frequency=2)),
    "kron": Case(KronConfig, adapters.Kron,
                 dict(lr=1e-2, weight_decay=0.1, preconditioner_update_probability=1.0,
                      mu_dtype="float64"),
                 dict(lr=1e-2, weight_decay=0.1, preconditioner_update_probability=1.0,
                      mu_dtype=torch.float64)),
    "sophia": Case(SophiaConfig, adapters.Sophia, dict(lr=1e-2, weight_decay=0.1)),
}
ALL_CONFIGS = [AdamWConfig, CautiousAdamWConfig, CautiousLionConfig, LionConfig, MarsConfig,
               MuonConfig, NAdamWConfig, ScheduleFreeAdamWConfig, ScionConfig, SGDConfig,
               SignSGDConfig, SignumConfig, SoapConfig, KronConfig, SophiaConfig]

# Contract violations of an adapter, as strict xfails: a fix makes the test pass, which fails
# the run until the entry is removed.
KNOWN_VIOLATIONS: dict = {}


def _params_for(check: str, names, values=None) -> list:
    """pytest.param per case, strict-xfail where KNOWN_VIOLATIONS lists (check, name)."""
    out = []
    for i, name in enumerate(names):
        known = KNOWN_VIOLATIONS.get((check, name))
        marks = [pytest.mark.xfail(raises=known[0], reason=known[1], strict=True)] if known else []
        out.append(pytest.param(*(values[i] if values else (name,)), id=name, marks=marks))
    return out


NO_DECAY = ["embeddings.weight", "*norm.weight"]  # the group override used throughout


# -- a tiny model with OLMo-core's parameter names -----------------------------------------------
VOCAB, DIM = 16, 8


class TinyOLMo(torch.nn.Module):
    """Two blocks; parameter names and roles as OLMo-core's Transformer."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        lin = lambda i, o, bias=False: torch.nn.Linear(i, o, bias=bias)  # noqa: E731
        self.embeddings = torch.nn.Embedding(VOCAB, DIM)
        self.blocks = torch.nn.ModuleDict({str(i): torch.nn.ModuleDict({
            "attention": torch.nn.ModuleDict({"w_q": lin(DIM, DIM), "w_out": lin(DIM, DIM)}),
            "attention_norm": torch.nn.RMSNorm(DIM),
            "feed_forward": torch.nn.ModuleDict({"w1": lin(DIM, 2 * DIM, bias=True),
                                                 "w2": lin(2 * DIM, DIM)}),
            "feed_forward_norm": torch.nn.RMSNorm(DIM),
        }) for i in range(2)})
        self.lm_head = torch.nn.ModuleDict({"norm": torch.nn.RMSNorm(DIM),
                                            "w_out": lin(DIM, VOCAB)})
        with torch.no_grad():  # norm weights away from 1 so that decay on them shows
            for n, p in self.named_parameters():
                if n.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(x)
        for b in self.blocks.values():
            a = b["attention"]
            h = h + a["w_out"](torch.tanh(a["w_q"](b["attention_norm"](h))))
            f = b["feed_forward"]
            h = h + f["w2"](torch.nn.functional.silu(f["w1"](b["feed_forward_norm"](h))))
        return self.lm_head["w_out"](self.lm_head["norm"](h))


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 6), generator=g) for _ in range(n)]


def _loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1]).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))


def _train(model, opt, batches, lrs=None) -> None:
    for t, x in enumerate(batches):
        if lrs is not None:
            for group, lr in zip(opt.param_groups, lrs[t]):
                group["lr"] = lr
        _loss(model, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _olmo2_1m():
    from olmo_core.nn.transformer import TransformerConfig

    return TransformerConfig.olmo2_1M(vocab_size=128).build(init_device="meta")


@pytest.fixture(scope="module")
def olmo_model():
    """OLMo-core's tiny transformer, on the meta device (building an optimizer needs no data)."""
    return _olmo2_1m()


def _names(model, params) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


# -- import guard and registration ---------------------------------------------------------------
def test_missing_olmo_core_raises_import_error_naming_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "olmo_core" or m.startswith("olmo_core.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: "not installed"
    monkeypatch.delitem(sys.modules, "functim.adapters.olmo")
    with pytest.raises(ImportError, match=r"'olmo' extra.*functim\[olmo\]"):
        importlib.import_module("functim.adapters.olmo")


def test_functim_and_adapters_import_without_olmo_core():
    code = ("import sys\n"
            "import functim, functim.adapters\n"
            "assert not [m for m in sys.modules if m.startswith('olmo_core')], 'olmo_core loaded'\n"
            "sys.modules['olmo_core'] = None\n"
            "try:\n"
            "    import functim.adapters.olmo\n"
            "except ImportError as e:\n"
            "    assert 'functim[olmo]' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('functim.adapters.olmo imported without olmo_core')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("cls", ALL_CONFIGS, ids=lambda c: c.__name__)
def test_registered_and_round_trips_through_olmo_core_config_dicts(cls):
    adapter = cls.optimizer()
    assert cls.__name__ == adapter.__name__ + "Config"
    assert issubclass(adapter, torch.optim.Optimizer)
    functional = {"SGD": "sgd", "AdamW": "adamw", "NAdamW": "nadamw",
                  "CautiousAdamW": "cautious_adamw", "CautiousLion": "cautious_lion",
                  "Lion": "lion", "SignSGD": "signsgd", "Signum": "signum", "Mars": "mars",
                  "ScheduleFreeAdamW": "schedule_free_adamw", "Muon": "muon",
                  "Scion": "scion", "Soap": "soap", "Kron": "kron",
                  "Sophia": "sophia"}[adapter.__name__]
    assert OptimConfig.get_registered_class(f"functim_{functional}") is cls
    cfg = cls(lr=0.25, group_overrides=[OptimGroupOverride(params=NO_DECAY,
                                                           opts={"weight_decay": 0.0})])
    d = cfg.as_config_dict()
    assert d["type"] == f"functim_{functional}"
    assert OptimConfig.from_dict(json.loads(json.dumps(d))) == cfg  # through _CLASS_
    d.pop("_CLASS_")
    assert OptimConfig.from_dict(d) == cfg  # through the registered "type" only
    assert cfg.merge(["lr=0.5"]).lr == 0.5


def test_register_rejects_fields_that_do_not_mirror_the_adapter():
    with pytest.raises(TypeError, match="'momentum' is not a keyword argument of Lion"):
        @register("test_bad_field")
        @dataclass
        class BadField(FunctimOptimConfig[adapters.Lion]):
            lr: float = 1e-4
            momentum: float = 0.9

            @classmethod
            def optimizer(cls):
                return adapters.Lion

    with pytest.raises(TypeError, match="'lr' defaults to 0.001, Lion to 0.0001"):
        @register("test_bad_default", omit=("betas", "weight_decay", "state_dtype",
                                            "weight_decay_mask"))
        @dataclass
        class BadDefault(FunctimOptimConfig[adapters.Lion]):
            lr: float = 1e-3

            @classmethod
            def optimizer(cls):
                return adapters.Lion

    with pytest.raises(TypeError, match="keyword 'state_dtype' is neither a field nor omitted"):
        @register("test_missing_field", omit=("weight_decay_mask",))
        @dataclass
        class Missing(FunctimOptimConfig[adapters.Lion]):
            lr: float = 1e-4
            betas: tuple[float, float] = (0.9, 0.99)
            weight_decay: float = 0.0

            @classmethod
            def optimizer(cls):
                return adapters.Lion
    assert "functim_test_bad_field" not in OptimConfig.get_registered_names()


def test_bad_state_dtype_is_rejected_before_building():
    model = TinyOLMo()
    with pytest.raises(ValueError, match=r"AdamWConfig.state_dtype: .*got 'int32'"):
        AdamWConfig(state_dtype="int32").build(model)
    assert AdamWConfig(state_dtype="torch.float64").optimizer_kwargs()["state_dtype"] \
        is torch.float64


# -- build: groups, lr / initial_lr, fixed_fields, strictness -------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_build_with_group_overrides(name, olmo_model):
    case = CASES[name]
    cfg = case.build_config(group_overrides=case.overrides())
    opt = cfg.build(olmo_model)
    assert type(opt) is case.adapter
    # the same groups as OLMo-core's own AdamWConfig builds
    ref = OLMoAdamWConfig(group_overrides=cfg.group_overrides).build_groups(olmo_model)
    assert [_names(olmo_model, g["params"]) for g in opt.param_groups] == \
        [_names(olmo_model, g["params"]) for g in ref]
    overridden, rest = opt.param_groups
    assert set(_names(olmo_model, overridden["params"])) == {
        "embeddings.weight", "lm_head.norm.weight",
        *(f"blocks.{i}.{n}.weight" for i in range(4)
          for n in ("attention.q_norm", "attention.k_norm", "attention_norm",
                    "feed_forward_norm"))}
    for key, value in case.override:
        assert overridden[key] == value
        assert rest[key] == getattr(cfg, key)
    for g in opt.param_groups:
        assert g["lr"] == g["initial_lr"]
    assert rest["lr"] == cfg.lr
    if case.routed:  # the adapter got the names
        assert overridden["param_names"] == _names(olmo_model, overridden["params"])
    # state for every param exists right after build (before any step)
    assert all(len(opt.state[p]) > 0 for p in olmo_model.parameters())


@pytest.mark.parametrize("config", [MuonConfig, ScionConfig], ids=lambda c: c.__name__)
def test_routed_build_uses_olmo_parameter_names(config, olmo_model):
    cfg = config()
    labels = cfg.explain(olmo_model).labels()
    hidden, other = ("muon", "adamw") if config is MuonConfig else ("hidden", None)
    for name, p in olmo_model.named_parameters():
        want = (hidden if name.startswith("blocks.") and p.ndim == 2 else
                other or ("embedding" if name == "embeddings.weight" else
                          "output" if name == "lm_head.w_out.weight" else "vector"))
        assert labels[name] == want, name
    # the same routing as functim's generic language-model routing, on OLMo-core's names
    named = dict(olmo_model.named_parameters())
    generic = ft.lm_routing(hidden=hidden, vector=other or "vector",
                            embedding=other or "embedding", output=other or "output")
    assert ft.explain(generic, named).labels() == labels
    opt = cfg.build(olmo_model)
    assert "lm_head.w_out.weight" in opt.explain()


def test_routed_build_rejects_parameters_no_rule_claims():
    model = TinyOLMo()
    model.extra = torch.nn.Linear(3, 3, bias=False)  # not an OLMo-core name
    with pytest.raises(ValueError, match=r"claimed by no rule: \['extra.weight'\]"):
        MuonConfig().build(model)
    with pytest.raises(ValueError, match=r"claimed by no rule: \['extra.weight'\]"):
        ScionConfig().build(model)
    # muon_params routes by its globs (everything else to AdamW), in the adapter
    opt = MuonConfig(muon_params=["extra.*", "blocks.*.w_q.*"]).build(model)
    assert "extra.weight" in opt.explain()


def test_scion_norms_field_is_checked():
    with pytest.raises(ValueError, match=r"ScionConfig.norms\['hidden'\]: .*'Spectrall'"):
        ScionConfig(norms={"hidden": {"type": "Spectrall"}}).build(TinyOLMo())
    with pytest.raises(ValueError, match=r"ScionConfig.norms\['experts'\]"):
        ScionConfig(norms={"experts": {"type": "Spectral"}}).build(TinyOLMo())


@pytest.mark.parametrize("config", [AdamWConfig, MuonConfig], ids=lambda c: c.__name__)
def test_strict_matching_errors_as_olmo_core(config, caplog):
    model = TinyOLMo()
    nope = [OptimGroupOverride(params=["nope.*"], opts={"lr": 0.5})]
    with pytest.raises(OLMoConfigurationError, match="override pattern 'nope.*' does not match"):
        config(group_overrides=nope).build(model)
    with caplog.at_level(logging.WARNING):
        opt = config(group_overrides=nope).build(model, strict=False)
    assert "does not match any parameters" in caplog.text
    assert all(g["lr"] != 0.5 for g in opt.param_groups)  # the empty group is dropped
    # a pattern that only matches a frozen parameter: warning, parameter not optimized
    model.lm_head["norm"].weight.requires_grad_(False)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        opt = config(group_overrides=[OptimGroupOverride(
            params=["lm_head.norm.*"], opts={"lr": 0.5})]).build(model)
    assert "matches a frozen parameter" in caplog.text
    assert all(p is not model.lm_head["norm"].weight
               for g in opt.param_groups for p in g["params"])
    # one parameter in two overrides: torch refuses, as for OLMo-core's own configs
    twice = [OptimGroupOverride(params=["embeddings.*"], opts={}),
             OptimGroupOverride(params=["embed*"], opts={})]
    with pytest.raises(ValueError, match="some parameters appear in more than one"):
        config(group_overrides=twice).build(model)
    # an override key the optimizer does not have is an error, not silently ignored
    with pytest.raises(TypeError, match="weight_decya"):
        config(group_overrides=[OptimGroupOverride(params=["embeddings.*"],
                                                   opts={"weight_decya": 0.0})]).build(model)


@pytest.mark.parametrize("fixed", [("initial_lr",), ("initial_lr", "lr", "weight_decay")])
def test_fixed_fields_after_load_as_olmo_core(fixed):
    """Load a state dict made with lr=1e-2, wd=0.1 into a build with lr=5e-3, wd=0: the fixed
    fields come from the config, the rest from the checkpoint, exactly as OLMo-core's AdamW."""
    got = {}
    for name, cls in (("functim", AdamWConfig), ("olmo", OLMoAdamWConfig)):
        saver = cls(lr=1e-2, weight_decay=0.1).build(TinyOLMo())
        loader = cls(lr=5e-3, weight_decay=0.0, fixed_fields=fixed).build(TinyOLMo())
        loader.load_state_dict(saver.state_dict())
        got[name] = [{k: g[k] for k in ("lr", "initial_lr", "weight_decay")}
                     for g in loader.param_groups]
    assert got["functim"] == got["olmo"]
    want = ({"lr": 5e-3, "initial_lr": 5e-3, "weight_decay": 0.0} if "lr" in fixed else
            {"lr": 1e-2, "initial_lr": 5e-3, "weight_decay": 0.1})
    assert got["functim"] == [want]


def test_compile_flag_makes_lr_a_tensor_and_compiles_step():
    opt = AdamWConfig(lr=1e-2, compile=True).build(TinyOLMo())
    g = opt.param_groups[0]
    assert isinstance(g["lr"], torch.Tensor) and float(g["lr"]) == pytest.approx(1e-2)
    assert g["initial_lr"] == 1e-2 and not isinstance(g["initial_lr"], torch.Tensor)
    assert "step" in vars(opt)  # the instance attribute torch.compile(opt.step) put there


def test_compile_flag_is_refused_where_the_step_does_not_compile():
    with pytest.raises(ValueError, match=r"MuonConfig\(compile=True\).*does not compile"):
        MuonConfig(lr=1e-2, compile=True).build(TinyOLMo())


# -- steps ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_steps_equal_the_adapter_driven_directly(name):
    """The built optimizer, driven by OLMo-core's CosWithWarmup as the train module does, equals
    the adapter built by hand (groups listed by name, the same keywords; Muon/Scion with their
    default routing) with the same lrs set by hand."""
    case = CASES[name]
    m1 = TinyOLMo(dtype=case.dtype)
    opt1 = case.build_config(group_overrides=case.overrides()).build(m1)
    m2 = TinyOLMo(dtype=case.dtype)
    named = list(m2.named_parameters())
    first = [n for n, _ in named if n == "embeddings.weight" or n.endswith("norm.weight")]
    groups = [{"params": [(n, p) for n, p in named if n in first], **dict(case.override)},
              {"params": [(n, p) for n, p in named if n not in first]}]
    if not case.routed:  # plain tensors, as OLMo-core passes them
        groups = [{**g, "params": [p for _, p in g["params"]]} for g in groups]
    opt2 = case.adapter(groups, **(case.adapter_kwargs or case.kwargs))
    steps = 4
    sched = CosWithWarmup(warmup=1)
    initial = [g["initial_lr"] for g in opt1.param_groups]
    lrs = [[sched.get_lr(lr, t, steps) for lr in initial] for t in range(steps)]
    assert len({step[-1] for step in lrs}) == steps  # the lr really changes every step
    batches = _batches(steps)
    for t, x in enumerate(batches):
        for group in opt1.param_groups:
            sched.set_lr(group, types.SimpleNamespace(global_step=t, max_steps=steps))
        _train(m1, opt1, [x])
    _train(m2, opt2, batches, lrs=lrs)
    assert_trees_equal(_params(m1), _params(m2))
    for n, p in TinyOLMo(dtype=case.dtype).named_parameters():  # every parameter trained
        assert not torch.equal(dict(m1.named_parameters())[n], p), n


# -- state contract ------------------------------------------------------------------------------
def _state_layout(opt) -> list[dict]:
    return [{k: (type(v), getattr(v, "dtype", None), tuple(getattr(v, "shape", ())))
             for k, v in opt.state[p].items()}
            for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("name", _params_for("state_types", list(CASES)))
def test_zero_grad_lr0_step_moves_nothing_and_state_is_complete(name):
    """What torch.distributed.checkpoint's _init_optim_state does to a fresh optimizer: grads
    zero, every group's lr 0 (a 0-d tensor where lr is a tensor), step(closure=None). Nothing
    moves, the state is all tensors, and no state key appears later."""
    case = CASES[name]
    model = TinyOLMo(dtype=case.dtype)
    opt = case.build_config(group_overrides=case.overrides()).build(model)
    before = _params(model)
    layout = _state_layout(opt)
    assert all(t is torch.Tensor for s in layout for t, _, _ in s.values())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = torch.tensor(0.0) if isinstance(g["lr"], torch.Tensor) else 0.0
    opt.step(closure=None)
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    assert_trees_equal(_params(model), before)
    assert _state_layout(opt) == layout
    _train(model, opt, _batches(3))
    assert _state_layout(opt) == layout
    assert not torch.equal(model.lm_head["w_out"].weight, before["lm_head.w_out.weight"])


def test_tensor_lr_is_honoured():
    """compile=True and DCP's zero step put a 0-d tensor in group["lr"]; it is read like a
    float (functim's own kernel in both runs: the fused kernel needs host floats)."""
    runs = []
    for lr in (1e-2, torch.tensor(1e-2, dtype=torch.float64), torch.tensor(2e-2)):
        model = TinyOLMo()
        opt = AdamWConfig(lr=1e-2, fused=False).build(model)
        opt.param_groups[0]["lr"] = lr
        _train(model, opt, _batches(2))
        runs.append(_params(model))
    assert_trees_equal(runs[0], runs[1])
    assert not torch.equal(runs[0]["embeddings.weight"], runs[2]["embeddings.weight"])


# -- OLMo-core checkpoints -----------------------------------------------------------------------
# every case in OLMo-core's default (flattened) format; the nested format for a few (it differs
# in how the state dict is laid out, not in what the optimizer must provide)
CHECKPOINT_CASES = [
    *(pytest.param(*p.values, id=f"{p.id}-flattened", marks=p.marks)
      for p in _params_for("flattened_checkpoint", list(CASES),
                           [(name, True) for name in CASES])),
    *(pytest.param(name, False, id=f"{name}-nested")
      for name in ("adamw", "nadamw_torch", "schedule_free_adamw", "muon", "scion", "soap")),
]


@pytest.mark.parametrize(("name", "flatten"), CHECKPOINT_CASES)
def test_checkpoint_resume_is_bitwise(name, flatten, tmp_path):
    """save_model_and_optim_state at step 3, load into fresh objects, 3 more steps ≡ 6 steps
    uninterrupted: params and optimizer state bitwise, state dtypes included."""
    case = CASES[name]
    batches = _batches(6)

    def build(seed):
        model = TinyOLMo(seed=seed, dtype=case.dtype)
        return model, case.build_config(group_overrides=case.overrides()).build(model)

    ref_model, ref_opt = build(0)
    _train(ref_model, ref_opt, batches)

    model, opt = build(0)
    _train(model, opt, batches[:3])
    save_model_and_optim_state(tmp_path / "ckpt", model, opt, flatten_optimizer_state=flatten)
    del model, opt
    model, opt = build(1)  # other weights: everything must come from the checkpoint
    load_model_and_optim_state(tmp_path / "ckpt", model, opt, flatten_optimizer_state=flatten)
    _train(model, opt, batches[3:])
    assert_trees_equal(_params(model), _params(ref_model))
    assert_trees_equal(opt.state_dict(), ref_opt.state_dict())


# -- FSDP2 (2 CPU ranks, gloo) -------------------------------------------------------------------
# one case per kind of state and maths (the elementwise family shares one engine), plus the
# paths that once failed on DTensors: MARS's in-place clamp of a norm, and writing results
# back into params whose dtype differs from the state's (bfloat16 params, state_dtype)
FSDP_CASES = ["sgd", "adamw", "nadamw_torch", "cautious_adamw", "schedule_free_adamw", "muon",
              "scion", "mars", "adamw_bf16", "sgd_f64_state", "sophia",
              "soap", "kron"]


def _fsdp_worker(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank()
    results = {}
    for name in FSDP_CASES:
        case = CASES[name]
        try:
            def build(seed, shard=True, case=case):
                model = TinyOLMo(seed=seed, dtype=case.dtype)
                if shard:
                    fully_shard(model)
                return model, case.build_config(group_overrides=case.overrides()).build(model)

            batches = _batches(4, seed=7)  # the same data on both ranks
            model, opt = build(0)
            _train(model, opt, batches[:2])
            for p in model.parameters():
                for k, v in opt.state[p].items():
                    # param-shaped state is sharded like the param; the rest (scalars, Sophia's
                    # RNG key, SOAP's and Kron's preconditioner matrices) is replicated
                    if k.split(".")[0] in ("GG", "Q"):
                        assert not isinstance(v, DTensor), f"state {k!r} should be replicated"
                    elif v.is_floating_point() and v.shape == p.shape:
                        assert isinstance(v, DTensor) and v.placements == p.placements, \
                            f"state {k!r} is not sharded like its param"
            ckpt = os.path.join(out_dir, f"ckpt_{name}")
            save_model_and_optim_state(ckpt, model, opt, flatten_optimizer_state=True)
            model2, opt2 = build(1)
            load_model_and_optim_state(ckpt, model2, opt2, flatten_optimizer_state=True)
            _train(model, opt, batches[2:])
            _train(model2, opt2, batches[2:])
            for (n, a), b in zip(model.named_parameters(), model2.parameters()):
                assert torch.equal(a.to_local(), b.to_local()), f"{n} differs after resume"
            for p, q in zip(model.parameters(), model2.parameters()):
                for k, v in opt.state[p].items():
                    w = opt2.state[q][k]
                    v, w = (x.to_local() if isinstance(x, DTensor) else x for x in (v, w))
                    assert v.dtype == w.dtype and torch.equal(v, w), f"state {k!r} differs"
            # and the sharded run agrees with an unsharded one (up to reduction order)
            ref, ref_opt = build(0, shard=False)
            _train(ref, ref_opt, batches)
            for (n, a), b in zip(model.named_parameters(), ref.parameters()):
                torch.testing.assert_close(a.full_tensor(), b.detach(), msg=n)
            results[name] = "ok"
        except Exception as e:  # recorded per case; the test asserts on the whole table
            results[name] = f"{type(e).__name__}: {e}"[:400]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.mark.slow
def test_fsdp2_state_is_sharded_like_the_params_and_resumes(tmp_path):
    run_ranks(_fsdp_worker, (str(tmp_path),), str(tmp_path))
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            results = json.load(f)
        assert results == {name: "ok" for name in FSDP_CASES}, f"rank {rank}: {results}"


# -- a real OLMo-core Trainer on CPU -------------------------------------------------------------
# Uninterrupted vs hard stop + resume (in a new process). Add a config by appending to this list.
TRAINER_CONFIGS = [
    pytest.param(AdamWConfig(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, group_overrides=[
        OptimGroupOverride(params=NO_DECAY, opts={"weight_decay": 0.0})]), id="adamw"),
    pytest.param(MuonConfig(lr=2e-2, weight_decay=0.1), id="muon"),
    pytest.param(SoapConfig(lr=1e-2, precondition_frequency=2), id="soap"),
    # with SophiaHessianCallback (added by _trainer_main): Hessian updates after steps 2 and 4
    pytest.param(SophiaConfig(lr=1e-2, hessian_interval=2), id="sophia"),
]


def _trainer_main(config_json: str, root: str, phase: str) -> None:
    """Runs in a subprocess (OLMo-core's trainer sets process-global state). ``first``: the
    uninterrupted 4-step run, then a run that hard-stops after step 2; ``resume``: a new trainer
    that loads the step-2 checkpoint and finishes."""
    from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
    from olmo_core.train import Duration, TrainerConfig, prepare_training_environment
    from olmo_core.train.callbacks import CheckpointerCallback
    from olmo_core.train.train_module import TransformerTrainModuleConfig

    prepare_training_environment(backend=None)

    def run(name: str, hard_stop: bool) -> None:
        optim = OptimConfig.from_dict(json.loads(config_json))
        train_module = TransformerTrainModuleConfig(
            rank_microbatch_size=64, max_sequence_length=16, optim=optim, max_grad_norm=1.0,
            scheduler=CosWithWarmup(warmup=2),
        ).build(_olmo2_1m())
        dataset = NumpyFSLDatasetConfig(
            paths=[os.path.join(root, "tokens.npy")], sequence_length=16,
            tokenizer=TokenizerConfig(vocab_size=128, eos_token_id=0, pad_token_id=1),
            work_dir=os.path.join(root, "work")).build()
        loader = NumpyDataLoaderConfig(global_batch_size=128, seed=0).build(dataset)
        trainer_config = TrainerConfig(
            save_folder=os.path.join(root, name), work_dir=os.path.join(root, "work"),
            save_overwrite=True, max_duration=Duration.steps(4),
            hard_stop=Duration.steps(2) if hard_stop else None,
        ).with_callback("checkpointer", CheckpointerCallback(save_interval=2, save_async=False))
        if isinstance(optim, SophiaConfig):
            trainer_config = trainer_config.with_callback("sophia_hessian",
                                                          SophiaHessianCallback())
        trainer = trainer_config.build(train_module, loader)
        initial = {k: v.clone() for k, v in train_module.model.state_dict().items()}
        trainer.maybe_load_checkpoint()
        start = trainer.global_step
        trainer.fit()
        torch.save({"start": start, "end": trainer.global_step, "initial": initial,
                    "model": train_module.model.state_dict(),
                    "optim": train_module.optim.state_dict(),
                    "optimizer": type(train_module.optim).__name__},
                   os.path.join(root, f"{name}_{phase}.pt"))

    if phase == "first":
        run("uninterrupted", hard_stop=False)
        run("interrupted", hard_stop=True)
    else:
        run("interrupted", hard_stop=False)


def _fake_trainer(optim, model, microbatch_tokens: int = 8):
    from types import SimpleNamespace
    return SimpleNamespace(train_module=SimpleNamespace(
        optim=optim, model=model, rank_microbatch_size=microbatch_tokens))


def test_sophia_callback_updates_the_hessian_when_due_on_one_microbatch():
    """pre_step: nothing until hessian_due(); then exactly update_hessian(model=..., inputs=the
    first micro-batch's sequences, clip_norm=1.0), bitwise (same RNG key, same estimate)."""
    ids = torch.randint(0, VOCAB, (6, 4), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids}
    runs = []
    for by_callback in (True, False):
        model = TinyOLMo()
        opt = SophiaConfig(lr=1e-2, hessian_interval=2).build(model)
        cb = SophiaHessianCallback()
        cb.trainer = _fake_trainer(opt, model, microbatch_tokens=8)  # 8 // 4 = 2 sequences
        cb.pre_train()
        for _ in range(2):
            before = {n: opt.state[p]["hessian"].clone() for n, p in model.named_parameters()}
            if by_callback:
                cb.pre_step(batch)
            elif opt.hessian_due():
                opt.update_hessian(model=model, inputs=batch["input_ids"][:2], clip_norm=1.0)
            after = {n: opt.state[p]["hessian"] for n, p in model.named_parameters()}
            assert_trees_equal(after, before)  # not due before steps 2, 4, ...
            model(batch["input_ids"]).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if by_callback:
            cb.pre_step(batch)
        else:
            assert opt.hessian_due()
            opt.update_hessian(model=model, inputs=batch["input_ids"][:2], clip_norm=1.0)
        runs.append(({n: opt.state[p]["hessian"].clone() for n, p in model.named_parameters()},
                     opt.rng.clone()))
    assert_trees_equal(runs[0], runs[1])
    assert all(h.abs().sum() > 0 for h in runs[0][0].values())


def test_sophia_callback_rejects_other_optimizers():
    model = TinyOLMo()
    cb = SophiaHessianCallback()
    cb.trainer = _fake_trainer(AdamWConfig().build(model), model)
    with pytest.raises(TypeError, match="functim.adapters.Sophia .*got AdamW"):
        cb.pre_train()


@pytest.mark.slow
@pytest.mark.parametrize("config", TRAINER_CONFIGS)
def test_trainer_hard_stop_and_resume_equals_uninterrupted(config, tmp_path):
    import numpy as np

    tokens = np.memmap(tmp_path / "tokens.npy", dtype=np.uint16, mode="w+", shape=(4096,))
    tokens[:] = np.random.default_rng(0).integers(2, 128, size=4096)
    tokens.flush()
    config_json = json.dumps(config.as_config_dict())
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_olmo; "
            "test_olmo._trainer_main(*sys.argv[2:])")
    for phase in ("first", "resume"):
        r = subprocess.run([sys.executable, "-c", code, TESTS_DIR, config_json, str(tmp_path),
                            phase], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{phase} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    full = torch.load(tmp_path / "uninterrupted_first.pt", weights_only=False)
    stopped = torch.load(tmp_path / "interrupted_first.pt", weights_only=False)
    resumed = torch.load(tmp_path / "interrupted_resume.pt", weights_only=False)
    assert full["optimizer"] == config.optimizer().__name__
    assert (full["start"], full["end"]) == (0, 4)
    assert (stopped["start"], stopped["end"]) == (0, 2)
    assert (resumed["start"], resumed["end"]) == (2, 4)  # it did load the step-2 checkpoint
    assert_trees_equal(full["initial"], stopped["initial"])
    assert not torch.equal(full["model"]["blocks.0.attention.w_q.weight"],
                           full["initial"]["blocks.0.attention.w_q.weight"])
    assert_trees_equal(resumed["model"], full["model"])
    assert_trees_equal(resumed["optim"], full["optim"])
    if isinstance(config, SophiaConfig):  # the callback did update the Hessian EMA
        assert all(s["hessian"].abs().sum() > 0 for s in full["optim"]["state"].values())



def _readme_training_script() -> str:
    readme = open(os.path.join(TESTS_DIR, os.pardir, "README.md")).read()
    start = " ".join(readme.split("\n")).index("A complete training script")  # (wrapped)
    return readme[start:].split("```py\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_olmo_training_script_runs_as_written_and_resumes(tmp_path):
    """The README's OLMo-core script, run as a user would (its own process, an empty folder),
    then again: the second run loads the first one's final checkpoint instead of starting over."""
    script = tmp_path / "train.py"
    script.write_text(_readme_training_script())
    logs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
        logs.append(r.stdout + r.stderr)
        assert r.returncode == 0, f"the README script failed:\n{logs[-1][-5000:]}"
    assert "Training complete" in logs[0]
    assert (tmp_path / "checkpoints" / "step6").is_dir()
    assert "Loading checkpoint from 'checkpoints/step6'" in logs[1]
    assert "Checkpoint successfully loaded" in logs[1]
