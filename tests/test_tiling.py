"""Tiled execution (functim/tiling.py): a donated CPU step runs an elementwise kernel tile by
tile with bitwise the untiled result; kernels with per-leaf reductions sweep the tiles once more
per reduction; tiles cover every leaf once, in order; tiling applies only where it may."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_trees_equal
from test_listops import OPTIMIZERS

import functim as ft
import functim.listops as listops
import functim.tiling as tiling

F32, F64 = torch.float32, torch.float64


# a per-tensor norm first: two sweeps over the tiles (MARS's only for its 2-D leaves)
MEASURED = ("cautious", "mars")
TILE_SHAPES = {"w": (23, 17), "b": (17,), "c": (2, 3, 5), "e": (0,), "s": (), "v": (300,)}


@pytest.fixture
def tile_spy(monkeypatch):
    """Tiles of 64 elements and norm chunks of 16 (so that small test leaves are split and
    packed), and a record of the tiles each step was cut into."""
    monkeypatch.setattr(tiling, "TILE_NUMEL", 64)
    monkeypatch.setattr(listops, "NORM_CHUNK", 16)
    monkeypatch.setattr(tiling, "MIN_MEAN_NUMEL", 0)  # (the scratch pool serves small leaves)
    made = []
    real = tiling.tile_views

    def spy(lists, tile_numel=None, **kw):
        tiles = real(lists, tile_numel, **kw)
        made.append(tiles)
        return tiles

    monkeypatch.setattr(tiling, "tile_views", spy)
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
    if not OPTIMIZERS[name]().tile:  # (SGD: no temporaries to keep tile-sized)
        assert tile_spy == []
    elif name.startswith(MEASURED) and dtype == F64:
        # float64 norms are whole-tensor reductions, which tiles cannot reproduce bitwise: only
        # the leaves without one (MARS's AdamW branch) are tiled
        untiled_2d = name.startswith("cautious") or name == "mars_lion"  # (optimize_1d)
        numel_1d = sum(torch.Size(s).numel() for s in TILE_SHAPES.values() if len(s) != 2)
        assert (tile_spy == []) == untiled_2d
        assert all(sum(v.numel() for t in tiles for v in t[0]) == numel_1d
                   for tiles in tile_spy)
    else:
        assert len(tile_spy) >= 3 and all(len(tiles) > 1 for tiles in tile_spy), "no tiles"
    n_tiled = len(tile_spy)
    pure = _run_shapes(OPTIMIZERS[name](), dtype, donate=False)
    monkeypatch.setattr(tiling, "TILE_NUMEL", 1 << 62)
    untiled = _run_shapes(OPTIMIZERS[name](), dtype, donate=True)
    assert len(tile_spy) == n_tiled  # (no new tiling)
    assert_trees_equal(tiled, untiled)
    assert_trees_equal(tiled, pure)


def test_kernels_with_a_reduction_sweep_the_tiles_twice(tile_spy):
    calls = []
    opt = ft.cautious_adamw()
    kernel = opt.kernel
    opt.kernel = lambda *a, **k: calls.append(k["inplace"]) or kernel(*a, **k)
    _run_shapes(opt, F32, donate=True, steps=1)
    n = len(tile_spy[0])
    assert len(tile_spy) == 1 and n > 1
    # a pure sweep (stopped at the reduction) then a donated one, kernel called once per tile
    assert calls == [False] * n + [True] * n


def test_tile_views_cover_every_leaf_once_in_order():
    leaves = [torch.arange(n, dtype=F32).reshape(-1, 1) if n else torch.zeros(0)
              for n in (150, 3, 0, 64, 65, 1)]
    other = [x.clone() + 1000 for x in leaves]
    tiles = tiling.tile_views([leaves, other], 64)
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
    applies = tiling.tiling_applies
    big = [torch.zeros(100), torch.zeros(50)]
    assert applies(False, [big, big], F32, 0)
    assert applies(False, [big, big], F32, 1)
    assert not applies(False, [big, big], F64, 1)  # float64 norms: whole-leaf reductions
    assert not applies(True, [big, big], F32, 0)  # per tensor
    assert not applies(False, [[torch.zeros(60)]] * 2, F32, 0)  # one tile's worth
    tiling.MIN_MEAN_NUMEL = 76  # (restored by the fixture) small leaves on average
    assert not applies(False, [big, big], F32, 0)
    tiling.MIN_MEAN_NUMEL = 0
    assert not applies(False, [big, [torch.zeros(100, 2)[:, 0], big[1]]], F32, 0)
    assert not applies(False, [[torch.zeros(10, 10).t()], [torch.zeros(10, 10)]], F32, 0)
    # pure steps and the per-tensor path do not tile
    _run_shapes(ft.adamw(fused=False), F32, donate=False)
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
    assert tiling.TILE_NUMEL % listops.NORM_CHUNK == 0
    big = tiling.TILE_NUMEL + listops.NORM_CHUNK + 5
    shapes = {"w": (big // 5, 5), "x": (2, listops.NORM_CHUNK // 2), "b": (300,)}
    tiled = _run_shapes(OPTIMIZERS[name](), F32, donate=True, shapes=shapes, steps=2)
    monkeypatch.setattr(tiling, "TILE_NUMEL", 1 << 62)
    untiled = _run_shapes(OPTIMIZERS[name](), F32, donate=True, shapes=shapes, steps=2)
    assert_trees_equal(tiled, untiled)


def test_scratch_pool_hands_back_released_tensors_only():
    pool = tiling.ScratchPool()
    like = [torch.zeros(3, 2), torch.zeros(5)]
    a = pool.take(like)
    b = pool.take(like)
    assert all(x.shape == y.shape for x, y in zip(a, like))
    assert not any(x is y for x in a for y in b)  # taken twice before a release: distinct
    pool.release()
    c = pool.take(like)
    assert {id(t) for t in c} <= {id(t) for t in a + b}
