"""ListOps primitives (functim/kernels.py): the ``out=`` temporaries, ``positive`` and the
host ``value`` of ``addcdiv``/``addcmul`` give bitwise the results of the plain foreach /
per-tensor ops, on every path; ``add_scaled`` is
``addcmul``, rounded once; and every elementwise optimizer steps bitwise the same whether its
temporaries are reused in place (``ListOps.writes_out``) or freshly allocated."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_trees_equal

import functim as ft
import functim.kernels as kernels
from functim.kernels import ListOps
from functim.optimizers.mars import mars
from functim.optimizers.schedule_free import schedule_free_adamw

F32, F64 = torch.float32, torch.float64


@pytest.fixture
def out_always(monkeypatch):
    """Make ListOps honour ``out=`` for leaves of any size (normally only for large ones)."""
    monkeypatch.setattr(kernels, "_OUT_MIN_NUMEL", 0)


@pytest.fixture
def out_never(monkeypatch):
    monkeypatch.setattr(kernels, "_OUT_MIN_NUMEL", 1 << 62)


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
    "positive": lambda o, x, y, z, **k: o.positive(x, **k),
    "addcdiv_value": lambda o, x, y, z, **k: o.addcdiv(x, y, z, value=[-0.5, 3.0, 1e-3], **k),
    "addcmul_value": lambda o, x, y, z, **k: o.addcmul(x, y, z, value=[-0.5, 3.0, 1e-3], **k),
}


def test_positive_is_one_exactly_where_greater_than_zero():
    """C-Optim's ``(x > 0).to(dtype)``: 0 at ±0, NaN and −inf, 1 at a subnormal and +inf."""
    x = torch.tensor([0.0, -0.0, float("nan"), -float("inf"), float("inf"),
                      torch.finfo(F32).tiny / 4, -1e-30, 2.0])
    want = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    for per_tensor in (False, True):
        _same(ListOps(per_tensor=per_tensor).positive([x]), [want])
    got = torch.compile(lambda t: ListOps(per_tensor=False).positive([t]), fullgraph=True)(x)
    _same(got, [want])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name", list(OPS))
def test_out_is_bitwise_the_foreach_result_and_is_written_in_place(name, dtype, out_always):
    op = OPS[name]
    x, y, z = _lists(dtype)
    snapshot = [t.clone() for t in x + y + z]
    ref = op(ListOps(per_tensor=False), x, y, z)
    _same(x + y + z, snapshot)  # the pure form touches nothing
    # into owned temporaries: the same bits, written into those very tensors
    ops = ListOps(per_tensor=False)
    assert ops.writes_out(x)
    out = [torch.full_like(t, 7.0) for t in ref]
    got = op(ops, x, y, z, out=out)
    _same(got, ref)
    assert all(a is b for a, b in zip(got, out))
    _same(x + y + z, snapshot)
    # in place on the first argument: the same bits
    first = {"sqrt": z}.get(name, x)
    copy = [t.clone() for t in first]
    args = (x, y, copy) if name == "sqrt" else (copy, y, z)
    got = op(ops, *args, inplace=True)
    assert all(a is b for a, b in zip(got, copy))
    _same(got, ref)
    # the per-tensor path (torch.func / autograd): the same bits
    _same(op(ListOps(per_tensor=True), x, y, z), ref)


@pytest.mark.parametrize("name", list(OPS))
def test_out_is_ignored_where_it_does_not_pay(name, out_never):
    x, y, z = _lists(F32)
    ops = ListOps(per_tensor=False)
    assert not ops.writes_out(x)
    out = [torch.full_like(t, 7.0) for t in OPS[name](ops, x, y, z)]
    got = OPS[name](ops, x, y, z, out=out)
    assert all(bool((o == 7.0).all()) for o in out)  # untouched: a new list came back
    _same(got, OPS[name](ops, x, y, z))


def test_writes_out_only_for_large_eager_cpu_leaves():
    ops = ListOps(per_tensor=False)
    assert not ops.writes_out([torch.zeros(10)] * 3)
    assert ops.writes_out([torch.zeros(kernels._OUT_MIN_NUMEL)] * 3)
    assert not ListOps(per_tensor=True).writes_out([torch.zeros(kernels._OUT_MIN_NUMEL)])
    assert not ops.writes_out([])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("scale", ["float", "0d", "per_leaf"])
def test_add_scaled_is_addcmul_rounded_once(dtype, per_tensor, scale, out_always):
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


# -- every elementwise optimizer: temporaries reused in place ≡ freshly allocated, bitwise ------
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


@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16])
@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_reused_temporaries_are_bitwise_fresh_ones(name, donate, dtype, monkeypatch):
    monkeypatch.setattr(kernels, "_OUT_MIN_NUMEL", 1 << 62)
    fresh = _run(name, dtype, donate)
    monkeypatch.setattr(kernels, "_OUT_MIN_NUMEL", 0)
    reused = _run(name, dtype, donate)
    assert_trees_equal(reused, fresh)


# -- the step's scale: a CPU scalar rides in the addcdiv; elsewhere it is folded into denom ----
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name", ["adamw", "nadamw", "nadamw_timm_beta1_0", "cautious_adamw",
                                  "mars"])
def test_scale_as_host_value_is_the_folded_step(name, dtype, monkeypatch):
    """``p + s·n/d`` (eager, CPU scalars: ``addcdiv(value=s)``, one pass) against ``p + n/(d/s)``
    (the form compiled and CUDA steps take, where reading ``s`` would trace or sync): the same
    maths, a few ulps apart."""
    calls = []
    real = kernels.ListOps.host_values

    def spy(self, scale, n):
        out = real(self, scale, n)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(kernels.ListOps, "host_values", spy)
    with_values = _run(name, dtype, donate=True)
    assert calls and all(calls)
    monkeypatch.setattr(kernels.ListOps, "host_values", lambda self, scale, n: None)
    folded = _run(name, dtype, donate=True)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == F32 else {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(with_values, folded, **tol)


def test_host_values_only_where_reading_costs_nothing():
    ops = ListOps(per_tensor=False)
    s = torch.tensor(0.5, dtype=F64)
    assert ops.host_values(s, 3) == [0.5] * 3
    assert ops.host_values([s, s * 2], 2) == [0.5, 1.0]
    assert ListOps(per_tensor=True).host_values(s, 3) is None  # torch.func / autograd
    assert ops.host_values(s.clone().requires_grad_(), 3) is None
    assert ops.host_values(torch.tensor(0.5, device="meta"), 3) is None  # (not CPU memory)


# -- norms: float64 accumulation without a float64 copy of big float32 leaves -----------------
def test_chunked_norm_counts_exactly_and_matches_float64():
    gen = torch.Generator().manual_seed(5)
    big = kernels._NORM_CHUNK * 3 + 123
    xs = [torch.randn(big, generator=gen) * 3, torch.randn(7, generator=gen),
          torch.zeros(0), torch.randn(2, big // 2, generator=gen)]
    assert kernels.chunked_norm_applies(xs, 2.0)
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
    big = torch.ones(kernels._NORM_CHUNK * 2)
    assert not kernels.chunked_norm_applies([big.double()], 2.0)
    assert not kernels.chunked_norm_applies([big.bfloat16()], 2.0)
    assert not kernels.chunked_norm_applies([big], 3.0)
    assert not kernels.chunked_norm_applies([big[::2]], 2.0)  # not contiguous
    assert not kernels.chunked_norm_applies([torch.ones(10)] * 4, 2.0)  # small leaves
    ops = ListOps(per_tensor=False)
    assert float(ops.norm([big.double()[::2]], 2.0)[0]) == float(big.numel() // 2) ** 0.5


# -- tiles: a donated CPU step runs an elementwise kernel tile by tile, with the same result ----
MEASURED = ("cautious", "mars")  # a per-tensor norm first: two sweeps over the tiles
TILE_SHAPES = {"w": (23, 17), "b": (17,), "c": (2, 3, 5), "e": (0,), "s": (), "v": (300,)}


@pytest.fixture
def tile_spy(monkeypatch):
    """Tiles of 64 elements and norm chunks of 16 (so that small test leaves are split and
    packed), and a record of the tiles each step was cut into."""
    import functim.base as base
    monkeypatch.setattr(kernels, "TILE_NUMEL", 64)
    monkeypatch.setattr(kernels, "_NORM_CHUNK", 16)
    monkeypatch.setattr(kernels, "_OUT_MIN_NUMEL", 0)  # (the scratch pool serves small leaves)
    made = []

    def spy(lists, tile_numel=None, **kw):
        tiles = kernels.tile_views(lists, tile_numel, **kw)
        made.append(tiles)
        return tiles

    monkeypatch.setattr(base, "tile_views", spy)
    return made


def _run_shapes(opt, dtype, donate, shapes=TILE_SHAPES, seed=0, steps=3):
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
             for _ in range(steps)]
    state = opt.init_state(params)
    for g in grads:
        params, state = opt.update(params, g, state, donate=donate)
    return params, state


@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tiled_step_is_bitwise_the_untiled_one(name, dtype, tile_spy, monkeypatch):
    tiled = _run_shapes(OPTIMIZERS[name](), dtype, donate=True)
    if name.startswith(MEASURED) and dtype == F64:
        # float64 norms are whole-tensor reductions, which tiles cannot reproduce bitwise
        assert tile_spy == []
    else:
        assert len(tile_spy) >= 3 and all(len(tiles) > 1 for tiles in tile_spy), "no tiles"
    n_tiled = len(tile_spy)
    pure = _run_shapes(OPTIMIZERS[name](), dtype, donate=False)
    monkeypatch.setattr(kernels, "TILE_NUMEL", 1 << 62)
    untiled = _run_shapes(OPTIMIZERS[name](), dtype, donate=True)
    assert len(tile_spy) == n_tiled  # (no new tiling)
    assert_trees_equal(tiled, untiled)
    assert_trees_equal(tiled, pure)


def test_measured_kernels_sweep_twice_and_need_chunk_aligned_tiles(tile_spy, monkeypatch):
    from functim.optimizers import cautious

    calls = []
    measure = cautious._cautious_adamw_measure
    opt = ft.cautious_adamw()
    opt.measure = lambda *a: calls.append(1) or measure(*a)
    _run_shapes(opt, F32, donate=True, steps=1)
    assert len(tile_spy) == 1 and len(calls) == len(tile_spy[0]) > 1  # one measure per tile
    monkeypatch.setattr(kernels, "TILE_NUMEL", 72)  # not a multiple of the norm chunk
    _run_shapes(ft.cautious_adamw(), F32, donate=True, steps=1)
    _run_shapes(mars(optimize_1d=True), F32, donate=True, steps=1)
    assert len(tile_spy) == 1


def test_tile_views_cover_every_leaf_once_in_order():
    leaves = [torch.arange(n, dtype=F32).reshape(-1, 1) if n else torch.zeros(0)
              for n in (150, 3, 0, 64, 65, 1)]
    other = [x.clone() + 1000 for x in leaves]
    tiles = kernels.tile_views([leaves, other], 64)
    for b in (0, 1):
        views = [v for tile in tiles for v in tile[b]]
        assert all(sum(v.numel() for v in tile[b]) <= 64 for tile in tiles)
        flat = torch.cat([v.reshape(-1) for v in views])
        expect = torch.cat([x.view(-1) for x in (leaves if b == 0 else other)])
        assert torch.equal(flat, expect)
    # views alias the leaves: writing through them writes the leaves
    for tile in tiles:
        for v in tile[0]:
            v.mul_(-1)
    assert all(bool((x <= 0).all()) for x in leaves)
    # a leaf larger than a tile is cut at multiples of the tile size from its start
    assert [v.numel() for v in tiles[0][0]] == [64]
    assert [v.numel() for v in tiles[2][0]] == [22, 3, 0]


def test_tiling_only_where_it_applies(tile_spy):
    ops = ListOps(per_tensor=False)
    big = [torch.zeros(100), torch.zeros(50)]
    assert kernels.tiling_applies(ops, [big, big])
    assert not kernels.tiling_applies(ListOps(per_tensor=True), [big, big])
    assert not kernels.tiling_applies(ops, [[torch.zeros(60)]] * 2)  # one tile's worth
    kernels._OUT_MIN_NUMEL = 76  # (restored by the fixture) small leaves on average
    assert not kernels.tiling_applies(ops, [big, big])
    kernels._OUT_MIN_NUMEL = 0
    assert not kernels.tiling_applies(ops, [big, [torch.zeros(100, 2)[:, 0], big[1]]])
    assert not kernels.tiling_applies(ops, [[torch.zeros(10, 10).t()], [torch.zeros(10, 10)]])
    # pure steps, kernels that use shapes or reductions without saying so (``tileable`` /
    # ``measure``), and the per-tensor path do not tile
    _run_shapes(ft.adamw(fused=False), F32, donate=False)
    opt = ft.ElementwiseOptimizer("whole", hyperparams={}, ranges={}, buffers=(),
                                  kernel=lambda ops, p, g, b, hp, step, **_: (p, {}))
    _run_shapes(opt, F32, donate=True)
    p = {k: torch.randn(s) for k, s in TILE_SHAPES.items()}
    opt = ft.lion()
    torch.func.grad(lambda lr: sum(x.sum() for x in opt.update(
        p, p, ft.set_hyperparams(opt.init_state(p), lr=lr))[0].values()))(torch.tensor(0.1))
    assert tile_spy == []


def test_adapter_steps_tile_by_tile_like_the_functional_update(tile_spy):
    from functim import adapters

    gen = torch.Generator().manual_seed(3)
    params = {k: torch.randn(s, generator=gen) for k, s in TILE_SHAPES.items()}
    grads = [{k: torch.randn(s, generator=gen) for k, s in TILE_SHAPES.items()}
             for _ in range(3)]
    ps = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    adapter = adapters.AdamW(list(ps.values()), lr=1e-2, weight_decay=0.1, fused=False)
    opt = ft.adamw(lr=1e-2, weight_decay=0.1, fused=False)
    state = opt.init_state(params)
    for g in grads:
        for k, p in ps.items():
            p.grad = g[k].clone()
        adapter.step()
        params, state = opt.update(params, g, state)
    assert len(tile_spy) == 3 and all(len(t) > 1 for t in tile_spy)
    for k in params:
        assert torch.equal(ps[k].detach(), params[k]), k


@pytest.mark.parametrize("name", ["cautious_adamw", "cautious_lion_eps", "mars", "adamw"])
def test_tiled_step_at_full_tile_and_chunk_sizes(name, monkeypatch):
    """The real sizes: torch's reductions split across threads above 2^15 elements, so the
    chunk norms must not depend on which chunks are reduced together (one leaf's last tile
    holds exactly one whole chunk here, and one leaf is exactly one chunk)."""
    assert kernels.TILE_NUMEL % kernels._NORM_CHUNK == 0
    big = kernels.TILE_NUMEL + kernels._NORM_CHUNK + 5
    shapes = {"w": (big // 5, 5), "x": (2, kernels._NORM_CHUNK // 2), "b": (300,)}
    tiled = _run_shapes(OPTIMIZERS[name](), F32, donate=True, shapes=shapes, steps=2)
    monkeypatch.setattr(kernels, "TILE_NUMEL", 1 << 62)
    untiled = _run_shapes(OPTIMIZERS[name](), F32, donate=True, shapes=shapes, steps=2)
    assert_trees_equal(tiled, untiled)


def test_scratch_pool_hands_back_released_tensors_only():
    pool = kernels.ScratchPool()
    like = [torch.zeros(3, 2), torch.zeros(5)]
    a = pool.take(like)
    b = pool.take(like)
    assert all(x.shape == y.shape for x, y in zip(a, like))
    assert not any(x is y for x in a for y in b)  # taken twice before a release: distinct
    pool.release()
    c = pool.take(like)
    assert {id(t) for t in c} <= {id(t) for t in a + b}
