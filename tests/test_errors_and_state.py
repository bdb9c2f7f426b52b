"""Bad input fails loudly and early; saved state resumes bitwise.

Part A: every bad call raises a clear error (naming the hyperparameter or the tree path) *before*
anything is written, so params, grads and state are bitwise unchanged afterwards, in the pure mode
and in ``donate=True`` mode (the contract in the ``functim.optimizer`` module docstring).

Part B: save -> load -> continue equals an uninterrupted run, bitwise, for the functional state
(``torch.save``/``torch.load(weights_only=True)``: it is a plain nested dict of tensors) and for
the torch.optim adapters (``state_dict``/``load_state_dict`` into fresh objects).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
from functim.adapters import SGD, AdamW, FunctimOptimizer

import functim as ft

# -- helpers ------------------------------------------------------------------------------------


def _leaves_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=True)
    paths = [".".join(map(str, p)) for p in optree.tree_paths(tree, none_is_leaf=True)]
    return paths, leaves, spec


def clone_tree(tree: Any) -> Any:
    """A deep copy of every tensor; other leaves (None, numbers, strings) are kept."""
    return optree.tree_map(
        lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree,
        none_is_leaf=True,
    )


def assert_bitwise_equal(a: Any, b: Any, what: str = "tree") -> None:
    """Same structure; every tensor leaf has the same dtype, shape and bits; other leaves ==."""
    pa, la, sa = _leaves_with_paths(a)
    _, lb, sb = _leaves_with_paths(b)
    assert sa == sb, f"{what}: structures differ: {sa} vs {sb}"
    for path, x, y in zip(pa, la, lb):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor), f"{what}.{path}: tensor vs {type(y).__name__}"
            assert x.dtype == y.dtype, f"{what}.{path}: dtype {x.dtype} vs {y.dtype}"
            assert x.shape == y.shape, f"{what}.{path}: shape {x.shape} vs {y.shape}"
            assert torch.equal(x, y), f"{what}.{path}: values differ"
        else:
            assert x == y, f"{what}.{path}: {x!r} vs {y!r}"


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """A nested params tree with a list, a tuple, a 0-d leaf and a None (frozen) leaf."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    return {
        "weight": r(3, 4),
        "bias": r(4),
        "blocks": [r(2, 2), r(2)],
        "pair": (r(5), r()),
        "frozen": None,
    }


def like(params: Any, seed: int) -> Any:
    """Random tensors shaped like ``params`` (None stays None)."""
    g = torch.Generator().manual_seed(seed)
    return optree.tree_map(
        lambda p: None if p is None
        else torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype),
        params, none_is_leaf=True,
    )


# -- A1. hyperparameter validation --------------------------------------------------------------

BAD_HYPERPARAMS = [
    # (id, constructor, exception, regex the message must contain)
    ("adamw-lr-negative", lambda: ft.adamw(lr=-1), ValueError, "'lr'"),
    ("adamw-lr-nan", lambda: ft.adamw(lr=math.nan), ValueError, "'lr'"),
    ("adamw-lr-tensor-negative", lambda: ft.adamw(lr=torch.tensor(-1.0)), ValueError, "'lr'"),
    ("adamw-beta1-one", lambda: ft.adamw(betas=(1.0, 0.9)), ValueError, "'beta1'"),
    ("adamw-beta2-negative", lambda: ft.adamw(betas=(0.9, -0.1)), ValueError, "'beta2'"),
    ("adamw-eps-negative", lambda: ft.adamw(eps=-1), ValueError, "'eps'"),
    ("adamw-wd-negative", lambda: ft.adamw(weight_decay=-0.1), ValueError, "'weight_decay'"),
    ("sgd-lr-negative", lambda: ft.sgd(lr=-1), ValueError, "'lr'"),
    ("sgd-momentum-negative", lambda: ft.sgd(momentum=-1), ValueError, "'momentum'"),
    ("sgd-nesterov-no-momentum", lambda: ft.sgd(lr=0.1, momentum=0.0, nesterov=True),
     ValueError, "nesterov"),
    ("adamw-lr-str", lambda: ft.adamw(lr="0.1"), TypeError, "'lr'"),
    ("sgd-lr-str", lambda: ft.sgd(lr="0.1"), TypeError, "'lr'"),
    ("adamw-betas-float", lambda: ft.adamw(betas=0.9), TypeError, "betas"),
    ("adamw-betas-len3", lambda: ft.adamw(betas=(0.9, 0.99, 0.999)), TypeError, "betas"),
    ("adamw-amsgrad-str", lambda: ft.adamw(amsgrad="yes"), TypeError, "amsgrad"),
    ("adamw-lr-bool", lambda: ft.adamw(lr=True), TypeError, "'lr'"),
    ("adamw-lr-vector", lambda: ft.adamw(lr=torch.ones(2)), TypeError, "'lr'"),
    # a schedule whose values go negative, used as a learning rate
    ("adamw-lr-negative-schedule", lambda: ft.adamw(lr=ft.constant_schedule(-0.1)),
     ValueError, "'lr'"),
    ("sgd-lr-negative-schedule", lambda: ft.sgd(lr=ft.constant_schedule(-1e-3)),
     ValueError, "'lr'"),
    # the warmup/cosine schedules refuse negative values themselves
    ("linear-warmup-negative-peak", lambda: ft.linear_warmup(peak=-1e-3, warmup_steps=10),
     ValueError, "'peak'"),
    ("linear-warmup-negative-init", lambda: ft.linear_warmup(peak=1e-3, warmup_steps=10,
                                                             init=-1e-3), ValueError, "'init'"),
    ("clip-zero", lambda: ft.clip_by_global_norm(0), ValueError, "'max_norm'"),
    ("clip-negative", lambda: ft.clip_by_global_norm(-1), ValueError, "'max_norm'"),
    ("accumulate-zero", lambda: ft.accumulate(ft.adamw(), every=0), ValueError, "every"),
    ("accumulate-negative", lambda: ft.accumulate(ft.adamw(), every=-2), ValueError, "every"),
    ("accumulate-float", lambda: ft.accumulate(ft.adamw(), every=1.5), ValueError, "every"),
]


@pytest.mark.parametrize(
    "make, exc, match", [pytest.param(*case[1:], id=case[0]) for case in BAD_HYPERPARAMS])
def test_invalid_hyperparameters_raise_naming_them(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_valid_boundary_hyperparameters_are_accepted():
    # the edges of the allowed ranges are fine (lr = 0, beta = 0, no weight decay, no eps)
    ft.adamw(lr=0.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0)
    ft.sgd(lr=0.0, momentum=0.0)
    ft.sgd(lr=0.1, momentum=0.9, nesterov=True)
    ft.adamw(lr=ft.warmup_cosine(peak=1e-3, warmup_steps=2, total_steps=10))
    ft.accumulate(ft.sgd(), every=1)


# -- A2/A3. bad grads and bad states: error first, nothing modified ------------------------------

# Optimizers under test (name -> factory). In the partition, "weight" is handled by the first
# label and "bias"/"blocks.*"/"pair.*" by the second, so an error in "blocks" is found only after
# the first label has been processed.
OPTIMIZERS: dict[str, Callable[[], ft.Optimizer]] = {
    "adamw": lambda: ft.adamw(lr=1e-2),
    "adamw-amsgrad": lambda: ft.adamw(lr=1e-2, amsgrad=True),
    "sgd-momentum": lambda: ft.sgd(lr=1e-2, momentum=0.9),
    "sgd-nesterov": lambda: ft.sgd(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
    "chain": lambda: ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(lr=1e-2)),
    "skip_nonfinite": lambda: ft.skip_nonfinite(ft.adamw(lr=1e-2)),
    "partition": lambda: ft.partition(
        {"m": "weight", "v": ["bias", "blocks.*", "pair.*"]},
        {"m": ft.sgd(lr=1e-2, momentum=0.9), "v": ft.adamw(lr=1e-2)}),
    "accumulate-1": lambda: ft.accumulate(ft.adamw(lr=1e-2), every=1),
    "accumulate-2": lambda: ft.accumulate(ft.adamw(lr=1e-2), every=2),
}

# A state from a *different* optimizer, for each entry above.
OTHER_OPTIMIZER: dict[str, Callable[[], ft.Optimizer]] = {
    "adamw": lambda: ft.sgd(lr=1e-2, momentum=0.9),
    "adamw-amsgrad": lambda: ft.adamw(lr=1e-2),  # same optimizer, other configuration
    "sgd-momentum": lambda: ft.adamw(lr=1e-2),
    "sgd-nesterov": lambda: ft.sgd(lr=1e-2),  # momentum 0: no momentum buffer
    "chain": lambda: ft.adamw(lr=1e-2),
    "skip_nonfinite": lambda: ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(lr=1e-2)),
    "partition": lambda: ft.adamw(lr=1e-2),
    "accumulate-1": lambda: ft.adamw(lr=1e-2),
    "accumulate-2": lambda: ft.sgd(lr=1e-2, momentum=0.9),
}



def _cases() -> list:
    return [pytest.param(name, id=name) for name in OPTIMIZERS]


def assert_rejected_untouched(opt: ft.Optimizer, params, grads, state, exc, match: str,
                              contains: tuple[str, ...] = ()) -> None:
    """``opt.update`` raises ``exc`` (message matching ``match`` and containing every string of
    ``contains``) in pure and donated mode, and params, grads and state are bitwise unchanged."""
    for donate in (False, True):
        before = clone_tree((params, grads, state))
        with pytest.raises(exc, match=match) as info:
            opt.update(params, grads, state, donate=donate)
        for s in contains:
            assert s in str(info.value), f"{s!r} not in error message: {info.value}"
        assert_bitwise_equal((params, grads, state), before, f"after error (donate={donate})")


def _setup(name: str):
    params = make_params()
    opt = OPTIMIZERS[name]()
    return opt, params, like(params, seed=1), opt.init_state(params)


@pytest.mark.parametrize("name", _cases())
def test_grads_missing_key(name):
    opt, params, grads, state = _setup(name)
    del grads["bias"]
    assert_rejected_untouched(opt, params, grads, state, ValueError, "grads",
                              contains=("bias",))


@pytest.mark.parametrize("name", _cases())
def test_grads_extra_key(name):
    opt, params, grads, state = _setup(name)
    grads["stray"] = torch.ones(3)
    assert_rejected_untouched(opt, params, grads, state, ValueError, "grads",
                              contains=("stray",))


@pytest.mark.parametrize("name", _cases())
def test_grads_list_instead_of_tuple(name):
    opt, params, grads, state = _setup(name)
    grads["pair"] = list(grads["pair"])
    assert_rejected_untouched(opt, params, grads, state, ValueError, "structure")


def test_grads_list_instead_of_tuple_names_the_path():
    params = {"enc": {"layers": [torch.ones(2), torch.ones(3)]}, "head": torch.ones(1)}
    grads = {"enc": {"layers": (torch.ones(2), torch.ones(3))}, "head": torch.ones(1)}
    opt = ft.adamw()
    with pytest.raises(ValueError, match=r"enc\.layers"):
        opt.update(params, grads, opt.init_state(params))


@pytest.mark.parametrize("name", _cases())
def test_grad_wrong_shape(name):
    opt, params, grads, state = _setup(name)
    grads["blocks"][0] = torch.ones(2, 1)  # broadcastable to the param's (2, 2)
    assert_rejected_untouched(opt, params, grads, state, ValueError, r"blocks\.0",
                              contains=("(2, 2)",))


@pytest.mark.parametrize("name", _cases())
def test_grad_for_none_param(name):
    opt, params, grads, state = _setup(name)
    grads["frozen"] = torch.ones(3)
    assert_rejected_untouched(opt, params, grads, state, ValueError, "frozen")


def test_integer_grad_is_a_type_error():
    opt, params, grads, state = _setup("adamw")
    grads["bias"] = torch.ones(4, dtype=torch.int64)
    assert_rejected_untouched(opt, params, grads, state, TypeError, "bias")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_from_another_optimizer(name):
    opt, params, grads, _ = _setup(name)
    state = OTHER_OPTIMIZER[name]().init_state(params)
    assert_rejected_untouched(opt, params, grads, state, ValueError, "state|keys")


def test_adamw_state_into_sgd_and_back():
    params = make_params()
    grads = like(params, seed=1)
    sgd, adamw = ft.sgd(lr=0.1, momentum=0.9), ft.adamw()
    assert_rejected_untouched(sgd, params, grads, adamw.init_state(params), ValueError,
                              "sgd.*momentum_buffer")
    assert_rejected_untouched(adamw, params, grads, sgd.init_state(params), ValueError,
                              "adamw.*exp_avg")
    # an adamw state whose hyperparameter set differs (e.g. edited by hand) is rejected too
    state = adamw.init_state(params)
    del state["hyperparams"]["eps"]
    assert_rejected_untouched(adamw, params, grads, state, ValueError, "eps")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_made_for_params_with_other_keys(name):
    opt, params, grads, _ = _setup(name)
    other = make_params()
    other["blocks"].append(torch.ones(3))  # a leaf "blocks.2" the real params do not have
    state = opt.init_state(other)
    assert_rejected_untouched(opt, params, grads, state, ValueError, r"blocks\.2")


@pytest.mark.parametrize("name", _cases())
def test_state_made_for_params_with_other_shapes(name):
    opt, params, grads, _ = _setup(name)
    other = make_params()
    other["blocks"][0] = torch.ones(2, 3)
    state = opt.init_state(other)
    assert_rejected_untouched(opt, params, grads, state, ValueError, r"blocks\.0",
                              contains=("(2, 2)",))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("bad", [
    pytest.param(lambda s: [s], id="list"),
    pytest.param(lambda s: None, id="None"),
    pytest.param(lambda s: torch.zeros(()), id="tensor"),
])
def test_non_dict_state_is_a_type_error(name, bad):
    opt, params, grads, state = _setup(name)
    assert_rejected_untouched(opt, params, grads, bad(state), TypeError, "state")


def test_accumulate_bad_inner_state_leaves_grad_sum_untouched():
    params = make_params()
    grads = like(params, seed=1)
    acc = ft.accumulate(ft.sgd(lr=0.1), every=1)
    state = acc.init_state(params)
    state["optimizer"] = ft.adamw().init_state(params)  # wrong inner state
    assert_rejected_untouched(acc, params, grads, state, ValueError, "sgd")


def test_accumulate_checks_inner_state_on_every_call():
    params = make_params()
    grads = like(params, seed=1)
    acc = ft.accumulate(ft.sgd(lr=0.1), every=2)
    state = acc.init_state(params)
    state["optimizer"] = ft.adamw().init_state(params)
    assert_rejected_untouched(acc, params, grads, state, ValueError, "sgd")


def test_good_call_after_rejected_call_works():
    """A rejected call leaves a usable state: the next valid donated update runs normally."""
    opt, params, grads, state = _setup("chain")
    bad = clone_tree(grads)
    bad["blocks"][0] = torch.ones(3)
    with pytest.raises(ValueError):
        opt.update(params, bad, state, donate=True)
    expected = opt.update(clone_tree(params), grads, clone_tree(state), donate=True)
    got = opt.update(params, grads, state, donate=True)
    assert_bitwise_equal(got, expected)


# -- A4. adapter errors -------------------------------------------------------------------------


def _tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


@pytest.mark.parametrize("make, match", [
    pytest.param(lambda ps: AdamW(ps, lr=-1), "'lr'", id="adamw-lr"),
    pytest.param(lambda ps: AdamW(ps, betas=(1.5, 0.9)), "'beta1'", id="adamw-beta1"),
    pytest.param(lambda ps: AdamW(ps, eps=-1e-8), "'eps'", id="adamw-eps"),
    pytest.param(lambda ps: SGD(ps, lr=-0.1), "'lr'", id="sgd-lr"),
    pytest.param(lambda ps: SGD(ps, lr=0.1, momentum=-0.5), "'momentum'", id="sgd-momentum"),
    pytest.param(lambda ps: SGD(ps, lr=0.1, nesterov=True), "nesterov", id="sgd-nesterov"),
    pytest.param(lambda ps: AdamW([{"params": ps, "lr": -1.0}]), "'lr'", id="group-lr"),
])
def test_adapter_invalid_hyperparameters(make, match):
    model = _tiny_model()
    before = clone_tree(list(model.parameters()))
    with pytest.raises(ValueError, match=match):
        make(list(model.parameters()))
    assert_bitwise_equal(list(model.parameters()), before)


def test_adapter_add_param_group_invalid_lr_raises():
    model = _tiny_model()
    opt = AdamW([model[0].weight, model[0].bias], lr=1e-3)
    with pytest.raises(ValueError, match="'lr'"):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": -1.0})


def test_adapter_add_param_group_invalid_lr_adds_nothing():
    model = _tiny_model()
    opt = AdamW([model[0].weight, model[0].bias], lr=1e-3)
    with pytest.raises(ValueError, match="'lr'"):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_functim_optimizer_rejects_non_optimizer():
    model = _tiny_model()
    with pytest.raises(TypeError, match="functim Optimizer"):
        FunctimOptimizer(model.parameters(), "not an optimizer")
    with pytest.raises(TypeError, match="optimizer"):
        FunctimOptimizer(model.parameters())
    with pytest.raises(TypeError):
        FunctimOptimizer(model.parameters(), torch.optim.SGD)


# -- A5. partition rule errors ------------------------------------------------------------------


def test_partition_unclaimed_leaf_is_listed():
    params = {"w": torch.ones(2, 2), "bias": torch.ones(2), "frozen": None}
    opt = ft.partition([ft.Rule("m", path="w")], {"m": ft.sgd()})
    with pytest.raises(ValueError, match=r"claimed by no rule: \['bias'\]"):
        opt.init_state(params)
    # update (with a state built for a claimable tree) raises the same, nothing touched
    good = {"w": params["w"], "bias": None, "frozen": None}
    state = opt.init_state(good)
    grads = {"w": torch.ones(2, 2), "bias": torch.ones(2), "frozen": None}
    assert_rejected_untouched(opt, params, grads, state, ValueError, "bias")


def test_partition_leaf_claimed_by_two_labels_names_both():
    params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    opt = ft.partition({"everything": "*", "weights": "w"},
                       {"everything": ft.sgd(), "weights": ft.adamw()})
    with pytest.raises(ValueError, match="more than one label") as info:
        opt.init_state(params)
    msg = str(info.value)
    assert "w (everything, weights)" in msg, msg


@pytest.mark.parametrize("rules", [
    pytest.param([ft.Rule("m", path="w"), ft.Rule("ghost")], id="rule-list"),
    pytest.param({"m": "w", "ghost": "*"}, id="mapping"),
])
def test_partition_label_without_optimizer(rules):
    with pytest.raises(ValueError, match="ghost"):
        ft.partition(rules, {"m": ft.sgd()})


# -- B. save -> load -> continue == uninterrupted, bitwise ---------------------------------------

N_STEPS, SPLIT = 6, 3


def _grads(params, step: int):
    """Deterministic grads depending on the current params (so the resumed params matter)."""
    noise = like(params, seed=100 + step)
    return optree.tree_map(
        lambda p, n: None if p is None else torch.sin(3 * p) + n, params, noise,
        none_is_leaf=True)


def _run(opt, params, state, steps, donate):
    for i in steps:
        params, state = opt.update(params, _grads(params, i), state, donate=donate)
    return params, state


def _save_load(obj, path):
    torch.save(obj, path)
    return torch.load(path, weights_only=True)


FUNCTIONAL_RESUME = {
    "adamw-amsgrad": lambda: ft.adamw(lr=1e-2, weight_decay=0.1, amsgrad=True),
    "sgd-momentum": lambda: ft.sgd(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "sgd-nesterov": lambda: ft.sgd(lr=1e-2, momentum=0.9, nesterov=True),
    "chain-clip-adamw-schedule": lambda: ft.chain(
        ft.clip_by_global_norm(1.0),
        ft.adamw(lr=ft.warmup_cosine(peak=1e-2, warmup_steps=2, total_steps=N_STEPS))),
}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donate"])
@pytest.mark.parametrize("name", list(FUNCTIONAL_RESUME))
def test_functional_resume_is_bitwise(name, donate, tmp_path):
    opt = FUNCTIONAL_RESUME[name]()
    p0 = make_params()
    full_p, full_s = _run(opt, clone_tree(p0), opt.init_state(p0), range(N_STEPS), donate)

    p, s = _run(opt, clone_tree(p0), opt.init_state(p0), range(SPLIT), donate)
    ck = _save_load({"params": p, "state": s}, tmp_path / "ck.pt")
    assert_bitwise_equal(ck, {"params": p, "state": s}, "checkpoint")
    p, s = _run(opt, ck["params"], ck["state"], range(SPLIT, N_STEPS), donate)

    assert_bitwise_equal(p, full_p, "params")
    assert_bitwise_equal(s, full_s, "state")
    assert int(s["step"] if "step" in s else s["optimizer"]["step"]) == N_STEPS


@pytest.mark.parametrize("name", list(FUNCTIONAL_RESUME))
def test_fresh_state_round_trips_with_weights_only(name):
    """The state is complete right after init_state: it saves and loads without a dummy step."""
    opt = FUNCTIONAL_RESUME[name]()
    params = make_params()
    state = opt.init_state(params)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert_bitwise_equal(loaded, state)
    p1, s1 = opt.update(clone_tree(params), _grads(params, 0), state)
    p2, s2 = opt.update(clone_tree(params), _grads(params, 0), loaded)
    assert_bitwise_equal((p1, s1), (p2, s2))




@pytest.mark.parametrize("donate, zero_dim", [
    pytest.param(False, False, id="pure"),
    pytest.param(True, False, id="donate"),
    pytest.param(False, True, id="pure-0d"),
    pytest.param(True, True, id="donate-0d"),
])
def test_functional_bf16_params_fp32_state_resume(donate, zero_dim, tmp_path):
    opt = ft.adamw(lr=1e-2, weight_decay=0.1)
    p0 = make_params(torch.bfloat16)
    if not zero_dim:
        p0["pair"] = (p0["pair"][0], p0["pair"][1].reshape(1))
    state0 = opt.init_state(p0)
    for b in ("exp_avg", "exp_avg_sq"):
        for x in optree.tree_leaves(state0[b]):  # None leaves are dropped here
            assert x.dtype == torch.float32
    assert state0["step"].dtype == torch.int32
    full_p, full_s = _run(opt, clone_tree(p0), clone_tree(state0), range(N_STEPS), donate)
    for x in optree.tree_leaves(full_p):
        assert x.dtype == torch.bfloat16
    for x in optree.tree_leaves((full_s["exp_avg"], full_s["exp_avg_sq"])):
        assert x.dtype == torch.float32

    p, s = _run(opt, clone_tree(p0), clone_tree(state0), range(SPLIT), donate)
    ck = _save_load({"params": p, "state": s}, tmp_path / "ck.pt")
    assert_bitwise_equal(ck, {"params": p, "state": s}, "checkpoint")  # dtypes included
    p, s = _run(opt, ck["params"], ck["state"], range(SPLIT, N_STEPS), donate)
    assert_bitwise_equal(p, full_p, "params")
    assert_bitwise_equal(s, full_s, "state")


UPDATE_OPTIMIZERS = {
    "adamw": lambda: ft.adamw(lr=1e-2, weight_decay=0.1),
    "sgd-momentum": lambda: ft.sgd(lr=1e-2, momentum=0.9, weight_decay=0.1),
    "sgd-plain": lambda: ft.sgd(lr=1e-2),
}


def _dtypes(tree):
    return optree.tree_map(lambda x: x.dtype if isinstance(x, torch.Tensor) else x, tree,
                           none_is_leaf=True)


@pytest.mark.parametrize("zero_dim", [
    pytest.param(False, id="no-0d"),
    pytest.param(True, id="0d"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(UPDATE_OPTIMIZERS))
def test_pure_update_keeps_dtypes_and_equals_donated(name, dtype, zero_dim):
    """``update`` keeps every dtype (params and state), and pure and donated mode agree."""
    opt = UPDATE_OPTIMIZERS[name]()
    params = {"w": torch.linspace(-1, 1, 6).reshape(2, 3).to(dtype),
              "scale": torch.tensor([1.5], dtype=dtype)}
    if zero_dim:
        params["scale"] = params["scale"].reshape(())
    state = opt.init_state(params)
    want = _dtypes((params, state))
    pure = (clone_tree(params), clone_tree(state))
    donated = (clone_tree(params), clone_tree(state))
    for i in range(3):
        pure = opt.update(pure[0], _grads(pure[0], i), pure[1])
        donated = opt.update(donated[0], _grads(donated[0], i), donated[1], donate=True)
    assert _dtypes(pure) == want
    assert _dtypes(donated) == want
    assert_bitwise_equal(pure, donated, "pure vs donated")


# -- B. adapters --------------------------------------------------------------------------------

_BATCHES = [torch.randn(5, 4, generator=torch.Generator().manual_seed(7 + i))
            for i in range(N_STEPS)]


def _train(model, opt, batches):
    dtype = next(model.parameters()).dtype
    for x in batches:
        opt.zero_grad()
        (model(x.to(dtype)) ** 2).mean().backward()
        opt.step()


def _adapter_resume(make_opt, dtype):
    """(uninterrupted model, optimizer), (resumed model, optimizer), resumed-before-step-4 opt."""
    model = _tiny_model(0, dtype)
    opt = make_opt(model)
    _train(model, opt, _BATCHES)

    m1 = _tiny_model(0, dtype)
    o1 = make_opt(m1)
    _train(m1, o1, _BATCHES[:SPLIT])
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)

    m2 = _tiny_model(123, dtype)  # fresh objects, different init: loading must matter
    o2 = make_opt(m2)
    m2.load_state_dict(ck["model"])
    o2.load_state_dict(ck["opt"])
    loaded = clone_tree(o2.state_dict()["state"])
    _train(m2, o2, _BATCHES[SPLIT:])
    return (model, opt), (m2, o2), loaded


ADAPTERS = {
    "adamw-fused-default": lambda m: AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "adamw-foreach": lambda m: AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=False),
    "adamw-amsgrad": lambda m: AdamW(m.parameters(), lr=1e-2, amsgrad=True, fused=False),
    "sgd-momentum": lambda m: SGD(m.parameters(), lr=1e-2, momentum=0.9),
    "sgd-groups": lambda m: SGD([{"params": [m[0].weight, m[0].bias], "lr": 0.05},
                                 {"params": list(m[2].parameters())}],
                                lr=1e-2, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_resume_is_bitwise(name):
    (model, opt), (m2, o2), _ = _adapter_resume(ADAPTERS[name], torch.float32)
    assert_bitwise_equal(list(m2.parameters()), list(model.parameters()), "params")
    assert_bitwise_equal(o2.state_dict(), opt.state_dict(), "optimizer state_dict")




def test_adapter_bf16_model_state_stays_fp32_and_resumes_bitwise():
    make = lambda m: AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)  # noqa: E731
    fresh = make(_tiny_model(0, torch.bfloat16))
    for st in fresh.state.values():
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
    (model, opt), (m2, o2), loaded = _adapter_resume(make, torch.bfloat16)
    for p in m2.parameters():
        assert p.dtype == torch.bfloat16
    for st in loaded.values():
        assert st["exp_avg"].dtype == torch.float32, "load_state_dict cast the state"
        assert st["exp_avg_sq"].dtype == torch.float32, "load_state_dict cast the state"
    assert_bitwise_equal(list(m2.parameters()), list(model.parameters()), "params")
    assert_bitwise_equal(o2.state_dict(), opt.state_dict(), "optimizer state_dict")


def _chain_adapter(m):
    return FunctimOptimizer(
        m.named_parameters(), ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(lr=1e-2)))


def test_functim_optimizer_chain_resume_is_bitwise():
    (model, opt), (m2, o2), _ = _adapter_resume(_chain_adapter, torch.float32)
    assert_bitwise_equal(list(m2.parameters()), list(model.parameters()), "params")
    a, b = opt.state_dict(), o2.state_dict()
    assert_bitwise_equal(a["param_groups"], b["param_groups"], "param_groups")
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for k, x in a["state"][i].items():
            y = b["state"][i][k]
            if k == "optimizer.step":
                # the step counter's dtype is checked by the test below
                assert int(x) == int(y) == N_STEPS
            else:
                assert_bitwise_equal(x, y, f"state[{i}][{k!r}]")


def test_functim_optimizer_load_keeps_state_dtypes():
    (model, opt), (m2, o2), loaded = _adapter_resume(_chain_adapter, torch.float32)
    for st in loaded.values():
        assert st["optimizer.step"].dtype == torch.int32
    assert_bitwise_equal(o2.state_dict(), opt.state_dict(), "optimizer state_dict")


@pytest.mark.parametrize("fused", [None, False], ids=["fused-default", "foreach"])
def test_adapter_lr0_zero_grad_moves_nothing(fused):
    model = _tiny_model()
    opt = AdamW(model.parameters(), lr=0.0, fused=fused)
    # state is created eagerly at construction
    for p in model.parameters():
        st = opt.state[p]
        assert {"exp_avg", "exp_avg_sq", "step"} <= set(st), sorted(st)
        assert float(st["step"]) == 0.0
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
    before = clone_tree(list(model.parameters()))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert_bitwise_equal(list(model.parameters()), before, "params")
    for p in model.parameters():
        st = opt.state[p]
        assert float(st["step"]) == 1.0
        assert not st["exp_avg"].any() and not st["exp_avg_sq"].any()


def test_state_dtype_less_precise_than_a_param_is_rejected():
    with pytest.raises(TypeError, match="state_dtype=torch.bfloat16 cannot hold.*'w'"):
        ft.adamw(state_dtype=torch.bfloat16).init_state({"w": torch.ones(2)})
    state = ft.adamw(state_dtype=torch.bfloat16).init_state(
        {"w": torch.ones(2, dtype=torch.bfloat16)})
    assert state["exp_avg"]["w"].dtype == torch.bfloat16
