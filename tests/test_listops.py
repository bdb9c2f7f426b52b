"""ListOps (functim/listops.py): every op gives bitwise the same results pure, in place,
into a scratch pool and per tensor; ``greater_than_zero`` is C-Optim's mask; a scale read on the
host rides in ``addcdiv``/``addcmul`` and is the same maths as the folded form; ``add_scaled``
is ``addcmul``, rounded once; per-leaf norms accumulate in float64 without a float64 copy."""

from __future__ import annotations

import pytest
import torch

import functim as ft
import functim.listops as listops
from functim.listops import ListOps
from functim.optimizers.mars import mars
from functim.optimizers.schedule_free import schedule_free_adamw
from functim.tiling import ScratchPool

F32, F64 = torch.float32, torch.float64


@pytest.fixture
def pool_always(monkeypatch):
    """Make the scratch pool serve leaves of any size (normally only large ones)."""
    import functim.tiling as tiling
    monkeypatch.setattr(tiling, "MIN_MEAN_NUMEL", 0)


def _lists(dtype, seed=0, shapes=((5, 3), (7,), ())):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda: [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]  # noqa: E731
    xs, ys, zs = mk(), mk(), mk()
    # special values: zeros, ±inf, a subnormal, NaN
    xs[0][0, :] = torch.tensor([0.0, float("inf"), float("nan")], dtype=dtype)
    ys[0][1, :] = torch.tensor([-0.0, torch.finfo(dtype).tiny / 4, -float("inf")], dtype=dtype)
    return xs, ys, [z.abs() + 0.5 for z in zs]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y) or bool(((x == y) | (x.isnan() & y.isnan())).all()), (x, y)


OPS = {
    "mul": lambda o, x, y, z, **k: o.mul(x, y, **k),
    "mul0d": lambda o, x, y, z, **k: o.mul(x, torch.tensor(0.3, dtype=F64), **k),
    "div": lambda o, x, y, z, **k: o.div(x, z, **k),
    "add": lambda o, x, y, z, **k: o.add(x, y, **k),
    "sub": lambda o, x, y, z, **k: o.sub(x, y, **k),
    "lerp": lambda o, x, y, z, **k: o.lerp(x, y, torch.tensor(0.1, dtype=F64), **k),
    "lerp_big": lambda o, x, y, z, **k: o.lerp(x, y, torch.tensor(1.7, dtype=F64), **k),
    "maximum": lambda o, x, y, z, **k: o.maximum(x, y, **k),
    "addcdiv": lambda o, x, y, z, **k: o.addcdiv(x, y, z, **k),
    "addcmul": lambda o, x, y, z, **k: o.addcmul(x, y, z, **k),
    "sqrt": lambda o, x, y, z, **k: o.sqrt(z, **k),
    "sign": lambda o, x, y, z, **k: o.sign(x, **k),
    "clamp_min": lambda o, x, y, z, **k: o.clamp_min(x, 0.0, **k),
    "greater_than_zero": lambda o, x, y, z, **k: o.greater_than_zero(x, **k),
    "addcdiv_value": lambda o, x, y, z, **k: o.addcdiv(x, y, z, value=-0.5, **k),
    "addcmul_value": lambda o, x, y, z, **k: o.addcmul(x, y, z, value=3.0, **k),
}


def test_greater_than_zero_is_one_exactly_where_greater_than_zero():
    """C-Optim's ``(x > 0).to(dtype)``: 0 at ±0, NaN and −inf, 1 at a subnormal and +inf."""
    x = torch.tensor([0.0, -0.0, float("nan"), -float("inf"), float("inf"),
                      torch.finfo(F32).tiny / 4, -1e-30, 2.0])
    want = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    for per_tensor in (False, True):
        _same(ListOps(per_tensor=per_tensor).greater_than_zero([x]), [want])
    got = torch.compile(lambda t: ListOps(per_tensor=False).greater_than_zero([t]),
                        fullgraph=True)(x)
    _same(got, [want])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name", list(OPS))
def test_every_path_of_an_op_gives_the_same_bits(name, dtype, pool_always):
    op = OPS[name]
    x, y, z = _lists(dtype)
    snapshot = [t.clone() for t in x + y + z]
    ref = op(ListOps(per_tensor=False), x, y, z)
    _same(x + y + z, snapshot)  # the pure form touches nothing
    # into a scratch pool's tensors: the same bits
    pool = ScratchPool()
    got = op(ListOps(per_tensor=False, scratch=pool), x, y, z)
    _same(got, ref)
    assert all(any(g is t for _, t in pool._taken) for g in got)
    _same(x + y + z, snapshot)
    # in place on the first argument: the same bits
    first = {"sqrt": z}.get(name, x)
    copy = [t.clone() for t in first]
    args = (x, y, copy) if name == "sqrt" else (copy, y, z)
    got = op(ListOps(per_tensor=False), *args, inplace=True)
    assert all(a is b for a, b in zip(got, copy))
    _same(got, ref)
    # the per-tensor path (torch.func / autograd): the same bits
    _same(op(ListOps(per_tensor=True), x, y, z), ref)


def test_scratch_pool_serves_large_cpu_leaves_only():
    assert not ScratchPool.applies([torch.zeros(10)] * 3)
    import functim.tiling as tiling
    assert ScratchPool.applies([torch.zeros(tiling.MIN_MEAN_NUMEL)] * 3)
    assert not ScratchPool.applies([])
    assert not ScratchPool.applies([torch.zeros(tiling.MIN_MEAN_NUMEL, device="meta")])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("scale", ["float", "0d", "per_leaf"])
def test_add_scaled_is_addcmul_rounded_once(dtype, per_tensor, scale):
    x, y, _ = _lists(dtype, seed=3)
    s = {"float": -0.37, "0d": torch.tensor(-0.37, dtype=F64),
         "per_leaf": [torch.tensor(v, dtype=F64) for v in (-0.37, 2.5, 1e-30)]}[scale]
    ss = s if isinstance(s, list) else [s] * len(x)
    ss = [torch.tensor(c, dtype=dtype) if isinstance(c, float) else c.to(dtype) for c in ss]
    ref = [torch.addcmul(a, b, c) for a, b, c in zip(x, y, ss)]
    ops = ListOps(per_tensor=per_tensor)
    _same(ops.add_scaled(x, y, s), ref)
    if not per_tensor:
        copy = [t.clone() for t in x]
        got = ops.add_scaled(copy, y, s, inplace=True)
        assert all(a is b for a, b in zip(got, copy))
        _same(got, ref)
    # one rounding: the float64 value of x + y·s rounded (finite entries, float32)
    if dtype == F32:
        for a, b, c, r in zip(x, y, ss, ref):
            exact = (a.double() + b.double() * c.double()).float()
            fin = exact.isfinite() & r.isfinite()
            assert torch.equal(r[fin], exact[fin])
    # products that are exact (y ∈ {−1, 0, 1}) give bitwise add(x, mul(y, s))
    signs = [torch.sign(b).nan_to_num() for b in y]
    _same(ops.add_scaled(x, signs, s), [a + b * c for a, b, c in zip(x, signs, ss)])


OPTIMIZERS = {
    "adamw": lambda: ft.adamw(weight_decay=0.1, fused=False),
    "adamw_amsgrad_max": lambda: ft.adamw(amsgrad=True, maximize=True, fused=False),
    "nadamw": lambda: ft.nadamw(weight_decay=0.1),
    "nadamw_torch": lambda: ft.nadamw(variant="torch"),
    "nadamw_timm_beta1_0": lambda: ft.nadamw(betas=(0.0, 0.99), variant="timm"),
    "cautious_adamw": lambda: ft.cautious_adamw(weight_decay=0.1),
    "cautious_adamw_paper": lambda: ft.cautious_adamw(normalization="paper"),
    "cautious_lion": lambda: ft.cautious_lion(weight_decay=0.1),
    "cautious_lion_eps": lambda: ft.cautious_lion(normalization="eps"),
    "lion": lambda: ft.lion(weight_decay=0.1),
    "signsgd": lambda: ft.signsgd(weight_decay=0.1),
    "signum": lambda: ft.signum(),
    "sgd": lambda: ft.sgd(momentum=0.9, nesterov=True, weight_decay=0.1, fused=False),
    "mars": lambda: mars(weight_decay=0.1, gamma=0.5),
    "mars_lion": lambda: mars(mars_type="mars-lion", optimize_1d=True),
    "mars_amsgrad": lambda: mars(amsgrad=True),
    "schedule_free_adamw": lambda: schedule_free_adamw(weight_decay=0.1, warmup_steps=2),
}


def _run(name, dtype, donate, seed=0, steps=3):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (6, 5), "b": (5,), "c": (2, 3, 2), "s": ()}
    params = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
             for _ in range(steps)]
    opt = OPTIMIZERS[name]()
    state = opt.init_state(params)
    for g in grads:
        params, state = opt.update(params, g, state, donate=donate)
    return params, state


# -- the step's scale: a CPU scalar rides in the addcdiv; elsewhere it scales the divisor -----
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name", ["adamw", "nadamw", "nadamw_timm_beta1_0", "cautious_adamw",
                                  "mars"])
def test_scale_read_on_host_is_the_folded_step(name, dtype, monkeypatch):
    """``p + s·n/d`` (eager, CPU scalars: ``addcdiv(value=s)``, one pass) against ``p + n/(d/s)``
    (the form compiled and CUDA steps take, where reading ``s`` would trace or sync): the same
    maths, a few ulps apart."""
    calls = []
    real = ListOps._on_host

    def spy(self, scale, n):
        out = real(self, scale, n)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(ListOps, "_on_host", spy)
    with_values = _run(name, dtype, donate=True)
    assert calls and all(calls)
    monkeypatch.setattr(ListOps, "_on_host", lambda self, scale, n: None)
    folded = _run(name, dtype, donate=True)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == F32 else {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(with_values, folded, **tol)


def test_scalars_are_read_on_host_only_where_reading_costs_nothing():
    ops = ListOps(per_tensor=False, host_scalars=True)
    s = torch.tensor(0.5, dtype=F64)
    assert ops._on_host(s, 3) == [0.5] * 3
    assert ops._on_host([s, s * 2], 2) == [0.5, 1.0]
    assert ops._on_host(0.25, 2) == [0.25, 0.25]  # (a float is on the host already)
    assert ListOps(per_tensor=False)._on_host(s, 3) is None  # not asked to
    assert ListOps(per_tensor=True, host_scalars=True)._on_host(s, 3) is None  # torch.func
    assert ops._on_host(s.clone().requires_grad_(), 3) is None
    assert ops._on_host(torch.tensor(0.5, device="meta"), 3) is None  # (not CPU memory)


# -- norms: float64 accumulation without a float64 copy of big float32 leaves -----------------
def test_chunked_norm_counts_exactly_and_matches_float64():
    gen = torch.Generator().manual_seed(5)
    big = listops.NORM_CHUNK * 3 + 123
    xs = [torch.randn(big, generator=gen) * 3, torch.randn(7, generator=gen),
          torch.zeros(0), torch.randn(2, big // 2, generator=gen)]
    assert listops.chunked_norms_apply(xs, 2.0)
    ops = ListOps(per_tensor=False)
    for ord in (1.0, 2.0):
        got = ops.norm(xs, ord)
        ref = [torch.linalg.vector_norm(x.double(), ord) for x in xs]
        for a, b in zip(got, ref):
            assert a.dtype == F64 and a.ndim == 0
            torch.testing.assert_close(a, b, rtol=2e-6, atol=0)
    # a 0/1 mask: the count is exact (each chunk sums below 2^24, chunks add in float64)
    mask = (torch.randn(big * 2, generator=gen) > 0).float()
    assert float(ops.norm([mask, mask[:5]], 1.0)[0]) == float(mask.double().sum())


def test_chunked_norm_only_where_it_applies():
    big = torch.ones(listops.NORM_CHUNK * 2)
    assert not listops.chunked_norms_apply([big.double()], 2.0)
    assert not listops.chunked_norms_apply([big.bfloat16()], 2.0)
    assert not listops.chunked_norms_apply([big], 3.0)
    assert not listops.chunked_norms_apply([big[::2]], 2.0)  # not contiguous
    assert not listops.chunked_norms_apply([torch.ones(10)] * 4, 2.0)  # small leaves
    ops = ListOps(per_tensor=False)
    assert float(ops.norm([big.double()[::2]], 2.0)[0]) == float(big.numel() // 2) ** 0.5
