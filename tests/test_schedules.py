"""Schedules: boundary values and shape properties (docs/algorithms.md section 14, R30), argument
validation, vector evaluation, and how optimizers consume them (the first update uses
``schedule(0)``; the value used is written to ``state["hyperparams"]``).

Exactness: where the arithmetic is exact (floor = init = 0, or a power-of-two warmup length) the
boundary values are compared bitwise. Elsewhere ``floor + (peak - floor)·1`` need not round to
``peak`` (it differs by one ulp for ~3% of random (peak, floor) pairs), so those comparisons allow
``ULP_RTOL`` (a few ulp of float64).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tensor_leaves, tree_map
from hypothesis import assume, given
from hypothesis import strategies as st

import functim as ft

ULP_RTOL = 1e-15  # ~4.5 ulp of float64
F64 = torch.float64

peaks = st.floats(1e-5, 10.0)
shapes = st.sampled_from(["linear", "cosine", "1-sqrt"])


def val(sched, s) -> float:
    return float(sched(s))


def close(a: float, b: float, rtol: float = ULP_RTOL, atol: float = 0.0) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


def steps(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64)


@st.composite
def floors_below(draw, peak):
    return draw(st.sampled_from([0.0]) | st.floats(0.0, peak))


# -- linear warmup ------------------------------------------------------------------------------
@given(peak=peaks, W=st.integers(1, 60))
def test_linear_warmup_is_peak_times_s_over_w(peak, W):
    sched = ft.linear_warmup(peak, W)
    assert val(sched, 0) == 0.0
    for s in range(W + 1):
        assert close(val(sched, s), peak * s / W), s
    assert val(sched, W) == peak
    for s in (W + 1, W + 7, 10 * W + 3):
        assert val(sched, s) == peak


@given(peak=peaks, k=st.integers(0, 6))
def test_linear_warmup_exact_for_power_of_two_lengths(peak, k):
    W = 2**k
    sched = ft.linear_warmup(peak, W)
    got = sched(steps(W + 3))
    want = torch.tensor([peak * min(s, W) / W for s in range(W + 3)], dtype=F64)
    assert torch.equal(got, want)
    sched1 = ft.linear_warmup(peak, W, warmup_offset=1)
    got1 = sched1(steps(W + 3))
    want1 = torch.tensor([peak * min(s + 1, W) / W for s in range(W + 3)], dtype=F64)
    assert torch.equal(got1, want1)


@given(peak=peaks, W=st.integers(1, 60))
def test_linear_warmup_offset_one(peak, W):
    sched = ft.linear_warmup(peak, W, warmup_offset=1)
    assert close(val(sched, 0), peak / W)
    for s in range(W):
        assert close(val(sched, s), peak * (s + 1) / W), s
    assert val(sched, W - 1) == peak
    assert val(sched, W) == peak


@given(peak=peaks, W=st.integers(1, 60), data=st.data())
def test_linear_warmup_with_init(peak, W, data):
    init = data.draw(st.floats(0.0, peak))
    sched = ft.linear_warmup(peak, W, init=init)
    assert val(sched, 0) == init
    for s in range(W + 1):
        assert close(val(sched, s), init + (peak - init) * s / W, atol=ULP_RTOL * peak), s
    assert close(val(sched, W), peak)
    assert torch.all(torch.diff(sched(steps(W + 5))) >= 0)


def test_linear_warmup_zero_steps_is_constant():
    assert torch.equal(ft.linear_warmup(0.5, 0)(steps(4)), torch.full((4,), 0.5, dtype=F64))


# -- warmup + cosine ----------------------------------------------------------------------------
@st.composite
def warmup_cosine_args(draw):
    peak = draw(peaks)
    W = draw(st.integers(0, 40))
    T = W + draw(st.integers(1, 80))
    floor = draw(floors_below(peak))
    init = draw(st.sampled_from([0.0]) | st.floats(0.0, peak))
    offset = draw(st.sampled_from([0, 1]))
    return dict(peak=peak, warmup_steps=W, total_steps=T, floor=floor, init=init,
                warmup_offset=offset)


@given(args=warmup_cosine_args())
def test_warmup_cosine_boundaries(args):
    peak, W, T, floor = args["peak"], args["warmup_steps"], args["total_steps"], args["floor"]
    sched = ft.warmup_cosine(**args)
    # lr(W) = peak (exact when the floor is 0), lr(s >= T) = floor exactly
    assert close(val(sched, W), peak)
    if floor == 0:
        assert val(sched, W) == peak
    for s in (T, T + 1, 3 * T + 5):
        assert val(sched, s) == floor, s
    # midpoint of the cosine: (peak + floor)/2
    mid = torch.tensor(W + (T - W) / 2, dtype=F64)
    assert close(val(sched, mid), (peak + floor) / 2)
    # the warmup part is linear_warmup
    warm = ft.linear_warmup(peak, W, init=args["init"], warmup_offset=args["warmup_offset"])
    for s in range(W):
        assert val(sched, s) == val(warm, s), s
    if W > 0 and args["warmup_offset"] == 0:
        assert val(sched, 0) == args["init"]


@given(args=warmup_cosine_args())
def test_warmup_cosine_non_increasing_after_warmup_and_continuous(args):
    peak, W, T = args["peak"], args["warmup_steps"], args["total_steps"]
    sched = ft.warmup_cosine(**args)
    after = sched(torch.arange(W, T + 5))
    assert torch.all(torch.diff(after) <= 0), after
    # continuity at W: both sides of W (fractional steps) are within slope·δ of each other
    if W > 0:
        delta = 1e-9
        left = val(sched, torch.tensor(W - delta, dtype=F64))
        right = val(sched, torch.tensor(W + delta, dtype=F64))
        slope = max(peak - args["init"], 0.0) / W + math.pi * peak / (T - W)
        assert abs(left - right) <= 2 * delta * slope + 4 * ULP_RTOL * peak


@given(args=warmup_cosine_args(), data=st.data())
def test_warmup_cosine_symmetric_about_midpoint(args, data):
    peak, W, T, floor = args["peak"], args["warmup_steps"], args["total_steps"], args["floor"]
    sched = ft.warmup_cosine(**args)
    x = data.draw(st.floats(0.0, float(T - W)))
    a = val(sched, torch.tensor(W + x, dtype=F64)) - floor
    b = peak - val(sched, torch.tensor(T - x, dtype=F64))
    assert close(a, b, rtol=0.0, atol=1e-14 * peak)


# -- cosine decay -------------------------------------------------------------------------------
@given(peak=peaks, D=st.integers(1, 100), data=st.data())
def test_cosine_decay_endpoints(peak, D, data):
    floor = data.draw(floors_below(peak))
    sched = ft.cosine_decay(peak, D, floor=floor)
    assert close(val(sched, 0), peak)
    if floor == 0:
        assert val(sched, 0) == peak
    for s in (D, D + 1, 5 * D):
        assert val(sched, s) == floor
    assert close(val(sched, torch.tensor(D / 2, dtype=F64)), (peak + floor) / 2)
    assert torch.all(torch.diff(sched(steps(D + 3))) <= 0)


# -- WSD ----------------------------------------------------------------------------------------
@st.composite
def wsd_args(draw):
    peak = draw(peaks)
    W = draw(st.integers(0, 30))
    stable = draw(st.integers(0, 40))
    D = draw(st.integers(1, 50))
    return dict(peak=peak, warmup_steps=W, total_steps=W + stable + D, decay_steps=D,
                floor=draw(floors_below(peak)), decay_shape=draw(shapes),
                init=draw(st.sampled_from([0.0]) | st.floats(0.0, peak)),
                warmup_offset=draw(st.sampled_from([0, 1])))


@given(args=wsd_args())
def test_wsd_boundaries_and_stable_phase(args):
    peak, W, T, D = args["peak"], args["warmup_steps"], args["total_steps"], args["decay_steps"]
    floor = args["floor"]
    sched = ft.wsd(**args)
    # stable on [W, T-D]: one value, = peak (bitwise when the floor is 0)
    stable = sched(torch.arange(W, T - D + 1))
    assert torch.all(stable == stable[0])
    assert close(float(stable[0]), peak)
    if floor == 0:
        assert float(stable[0]) == peak
    # lr(T) = floor for every shape, and afterwards
    for s in (T, T + 1, 2 * T + 3):
        assert val(sched, s) == floor
    # the decay shape at its midpoint
    f_half = {"linear": 0.5, "cosine": 0.5, "1-sqrt": 1 - math.sqrt(0.5)}[args["decay_shape"]]
    mid = val(sched, torch.tensor(T - D / 2, dtype=F64))
    assert close(mid, floor + (peak - floor) * f_half, atol=ULP_RTOL * peak)
    # the warmup part is linear_warmup
    warm = ft.linear_warmup(peak, W, init=args["init"], warmup_offset=args["warmup_offset"])
    for s in range(W):
        assert val(sched, s) == val(warm, s), s


@given(args=wsd_args())
def test_wsd_non_increasing_after_warmup_and_continuous_at_decay_start(args):
    peak, W, T, D = args["peak"], args["warmup_steps"], args["total_steps"], args["decay_steps"]
    floor = args["floor"]
    sched = ft.wsd(**args)
    after = sched(torch.arange(W, T + 5))
    assert torch.all(torch.diff(after) <= 0), after
    # continuity at T-D: |lr(T-D+δ) - lr(T-D)| <= (peak-floor)·sqrt(δ/D) (1-sqrt is the
    # steepest shape: f(x) = 1 - sqrt(x)) + rounding
    s_right = torch.tensor(T - D + 1e-10, dtype=F64)
    delta = float(s_right) - (T - D)  # the step actually represented
    start = val(sched, T - D)
    right = val(sched, s_right)
    bound = (peak - floor) * math.sqrt(delta / D) * (1 + 1e-12) + 4 * ULP_RTOL * peak
    assert abs(right - start) <= bound
    if T - D > W:  # a stable step just before: the left limit is peak
        left = val(sched, torch.tensor(T - D - delta, dtype=F64))
        assert close(left, start)
    # continuity at W (if there is a warmup)
    if W > 0:
        left = val(sched, torch.tensor(W - 1e-9, dtype=F64))
        assert close(left, peak, atol=2e-9 * peak / W + 4 * ULP_RTOL * peak)


def test_wsd_whole_run_decay_without_warmup():
    """Wen et al.'s Muon/Scion setting: W = 0, D = T, floor 0: lr(s) = peak·(1 - s/T)."""
    sched = ft.wsd(0.02, 0, 50, 50)
    for s in range(51):
        assert close(val(sched, s), 0.02 * (1 - s / 50), atol=1e-18)
    assert val(sched, 0) == 0.02 and val(sched, 50) == 0.0


# -- constant -----------------------------------------------------------------------------------
def test_constant_schedule():
    sched = ft.constant_schedule(3e-4)
    assert torch.equal(sched(steps(7)), torch.full((7,), 3e-4, dtype=F64))
    assert val(sched, 10**6) == 3e-4


# -- vector evaluation --------------------------------------------------------------------------
all_schedules = st.one_of(
    st.builds(ft.constant_schedule, peaks),
    st.builds(lambda p, w, o: ft.linear_warmup(p, w, warmup_offset=o), peaks,
              st.integers(0, 30), st.sampled_from([0, 1])),
    st.builds(lambda p, d: ft.cosine_decay(p, d, floor=p / 10), peaks, st.integers(1, 50)),
    warmup_cosine_args().map(lambda a: ft.warmup_cosine(**a)),
    wsd_args().map(lambda a: ft.wsd(**a)),
)


@given(sched=all_schedules, n=st.integers(1, 120))
def test_vector_evaluation_equals_per_step(sched, n):
    vec = sched(torch.arange(n))
    assert vec.dtype == F64 and vec.shape == (n,)
    per_int = torch.stack([sched(s) for s in range(n)])
    per_t32 = torch.stack([sched(torch.tensor(s, dtype=torch.int32)) for s in range(n)])
    assert torch.equal(vec, per_int)
    assert torch.equal(vec, per_t32)
    one = sched(torch.tensor(3, dtype=torch.int32))
    assert one.dtype == F64 and one.shape == ()


# -- invalid arguments --------------------------------------------------------------------------
@pytest.mark.parametrize("make, exc", [
    (lambda: ft.constant_schedule("1e-3"), TypeError),
    (lambda: ft.constant_schedule(float("nan")), ValueError),
    (lambda: ft.linear_warmup(-1.0, 10), ValueError),
    (lambda: ft.linear_warmup(float("inf"), 10), ValueError),
    (lambda: ft.linear_warmup(1.0, -1), ValueError),
    (lambda: ft.linear_warmup(1.0, 10, init=-0.1), ValueError),
    (lambda: ft.linear_warmup(1.0, 10, warmup_offset=2), ValueError),
    (lambda: ft.linear_warmup("1", 10), TypeError),
    (lambda: ft.linear_warmup(True, 10), TypeError),
    (lambda: ft.linear_warmup(1.0, None), TypeError),
    (lambda: ft.cosine_decay(1.0, 0), ValueError),
    (lambda: ft.cosine_decay(1.0, -5), ValueError),
    (lambda: ft.cosine_decay(1.0, 10, floor=-1.0), ValueError),
    (lambda: ft.cosine_decay(None, 10), TypeError),
    (lambda: ft.warmup_cosine(1.0, 10, 10), ValueError),
    (lambda: ft.warmup_cosine(1.0, 10, 5), ValueError),
    (lambda: ft.warmup_cosine(1.0, -1, 5), ValueError),
    (lambda: ft.warmup_cosine(-1.0, 1, 5), ValueError),
    (lambda: ft.warmup_cosine(1.0, 1, 5, floor=float("nan")), ValueError),
    (lambda: ft.warmup_cosine(1.0, 1, 5, warmup_offset=-1), ValueError),
    (lambda: ft.warmup_cosine(1.0, "1", 5), TypeError),
    (lambda: ft.wsd(1.0, 10, 100, 0), ValueError),
    (lambda: ft.wsd(1.0, 60, 100, 50), ValueError),
    (lambda: ft.wsd(1.0, 10, 100, 20, decay_shape="exp"), ValueError),
    (lambda: ft.wsd(1.0, 10, 100, 20, floor=-0.1), ValueError),
    (lambda: ft.wsd(1.0, 10, 100, 20, warmup_offset=3), ValueError),
    (lambda: ft.wsd(1.0, 10, 100, "20"), TypeError),
])
def test_invalid_arguments_raise(make, exc):
    with pytest.raises(exc):
        make()


def test_optimizer_rejects_schedules_outside_the_hyperparameter_range():
    with pytest.raises(ValueError):
        ft.adamw(betas=(ft.linear_warmup(1.0, 10), 0.999))  # beta1 reaches 1
    with pytest.raises(ValueError):
        ft.sgd(lr=ft.constant_schedule(-0.1))
    with pytest.raises(ValueError):
        ft.adamw(weight_decay=ft.constant_schedule(-1e-3))


# -- optimizers consume schedules ---------------------------------------------------------------
def _grads(params, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [tree_map(lambda p: torch.randn(p.shape, generator=gen, dtype=p.dtype), params)
            for _ in range(n)]


@given(args=warmup_cosine_args(), dtype=st.sampled_from([torch.float32, F64]))
def test_sgd_with_scheduled_lr_uses_schedule_of_completed_steps(args, dtype):
    """Plain SGD: p_{k+1} = p_k − lr(k)·g_k, with k = completed updates (lr(0) first), rounded
    once (a fused multiply-add, as torch.optim.SGD's foreach step); equal bitwise to setting the
    lr by hand each step; state["hyperparams"]["lr"] holds lr(k)."""
    assume(args["total_steps"] <= 60)
    sched = ft.warmup_cosine(**args)
    n = args["total_steps"] + 2
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(3, 2, generator=gen, dtype=dtype), "b": None,
              "v": [torch.randn(4, generator=gen, dtype=dtype)]}
    grads = _grads(params, n)
    opt = ft.sgd(lr=sched, fused=False)
    manual = ft.sgd(lr=1.0, fused=False)
    state, m_state = opt.init_state(params), manual.init_state(params)
    assert torch.equal(state["hyperparams"]["lr"], sched(0))
    p, mp = params, params
    for k, g in enumerate(grads):
        lr_k = sched(k)
        closed = tree_map(lambda x, gi, lr_k=lr_k: torch.addcmul(x, gi, -lr_k.to(x.dtype)), p, g)
        p, state = opt.update(p, g, state)
        mp, m_state = manual.update(mp, g, ft.set_hyperparams(m_state, lr=lr_k))
        assert torch.equal(state["hyperparams"]["lr"], lr_k), k
        assert state["hyperparams"]["lr"].dtype == F64
        assert int(state["step"]) == k + 1
        for a, b, c in zip(tensor_leaves(p), tensor_leaves(mp), tensor_leaves(closed)):
            assert torch.equal(a, b), k
            torch.testing.assert_close(a, c, rtol=0, atol=0 if dtype == F64 else 1e-6)
        if k == 0 and args["warmup_steps"] > 0 and args["warmup_offset"] == 0 \
                and args["init"] == 0:
            # lr(0) = 0: the first update leaves the params exactly as they were
            assert torch.equal(p["w"], params["w"]) and torch.equal(p["v"][0], params["v"][0])


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_adamw_with_wsd_lr_matches_manual_lr(shape):
    sched = ft.wsd(1e-2, 3, 12, 4, floor=1e-3, decay_shape=shape, warmup_offset=1)
    gen = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(4, 3, generator=gen, dtype=F64)}
    grads = _grads(params, 14, seed=3)
    opt, manual = ft.adamw(lr=sched, weight_decay=0.1), ft.adamw(lr=0.0, weight_decay=0.1)
    s, ms = opt.init_state(params), manual.init_state(params)
    p, mp = params, params
    for k, g in enumerate(grads):
        p, s = opt.update(p, g, s)
        mp, ms = manual.update(mp, g, ft.set_hyperparams(ms, lr=sched(k)))
        assert torch.equal(s["hyperparams"]["lr"], sched(k))
        assert torch.equal(p["w"], mp["w"]), k
        assert torch.equal(s["exp_avg"]["w"], ms["exp_avg"]["w"])


def test_momentum_schedule_matches_manual_momentum():
    """Any float hyperparameter may be a schedule, not only lr."""
    sched = ft.linear_warmup(0.9, 5, init=0.5)
    gen = torch.Generator().manual_seed(4)
    params = {"w": torch.randn(5, generator=gen, dtype=F64)}
    grads = _grads(params, 8, seed=5)
    opt, manual = ft.sgd(lr=0.1, momentum=sched), ft.sgd(lr=0.1, momentum=0.5)
    s, ms = opt.init_state(params), manual.init_state(params)
    p, mp = params, params
    for k, g in enumerate(grads):
        p, s = opt.update(p, g, s)
        mp, ms = manual.update(mp, g, ft.set_hyperparams(ms, momentum=sched(k)))
        assert torch.equal(s["hyperparams"]["momentum"], sched(k))
        assert torch.equal(p["w"], mp["w"]), k
