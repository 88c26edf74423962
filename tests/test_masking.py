"""Relevance mapping and token selection (aclip/methods/tokens/)."""

import importlib
import itertools
import sys

import pytest
import torch

from aclip.methods.tokens import (
    STRATEGIES,
    TokenSelector,
    TokenStrategy,
    get_strategy,
    map_relevance_to_views,
    num_keep,
    random_keep,
    register_strategy,
    topk_keep,
)


def test_num_keep():
    assert num_keep(196, 0.5) == 98
    assert num_keep(196, 1.0) == 196
    assert num_keep(196, 0.001) == 1
    assert num_keep(10, 0.26) == 3
    assert num_keep(64, 0.25) == 16
    # halves round up, as the papers' counts do (Python's round() gives 24, 12, 2)
    assert num_keep(49, 0.5) == 25
    assert num_keep(25, 0.5) == 13
    assert num_keep(5, 0.5) == 3
    assert num_keep(25, 0.3) == 8  # 7.5 although 0.3 * 25 == 7.499999999999999 in floats
    assert num_keep(49, 0.25) == 12  # 12.25


# ----------------------------------------------------------------------------- mapping


def test_full_box_same_grid_is_identity():
    torch.manual_seed(0)
    relevance_BN = torch.rand(3, 7 * 5)
    boxes_BV4 = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(3, 2, 4)
    out = map_relevance_to_views(relevance_BN, (7, 5), boxes_BV4, (7, 5))
    assert out.shape == (3, 2, 35)
    for v in range(2):
        torch.testing.assert_close(out[:, v], relevance_BN, atol=1e-5, rtol=0)


def test_quadrant_box_of_piecewise_constant_map():
    # 8x8 map, constant per 4x4 quadrant; the top-left quadrant box must give its constant.
    quad = torch.tensor([[1.5, -2.0], [3.25, 7.0]])
    map_HW = quad.repeat_interleave(4, 0).repeat_interleave(4, 1)
    relevance_BN = map_HW.reshape(1, 64)
    boxes = torch.tensor(
        [[[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]]]
    )
    out = map_relevance_to_views(relevance_BN, (8, 8), boxes, (3, 3))
    expected = torch.tensor([1.5, -2.0, 3.25, 7.0])[:, None].expand(4, 9)
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("out_w", [4, 8, 5])
def test_ramp_map_crop_matches_bin_centres(out_w):
    # Map value = x position of the patch centre in grid units: value(j) = j, i.e. a linear
    # function of the continuous coordinate u (pixel j spans [j, j+1)): value(u) = u - 0.5.
    grid_h, grid_w = 6, 8
    map_HW = torch.arange(grid_w, dtype=torch.float32).expand(grid_h, grid_w)
    relevance_BN = map_HW.reshape(1, -1)
    x0, x1 = 0.25, 0.75
    boxes = torch.tensor([[[x0, 0.0, x1, 1.0]]])
    out = map_relevance_to_views(relevance_BN, (grid_h, grid_w), boxes, (3, out_w))
    out_HW = out.reshape(3, out_w)
    # Output bin centre k in normalised coordinates, then in grid units, then the ramp value.
    centres = x0 + (torch.arange(out_w) + 0.5) * (x1 - x0) / out_w
    expected = centres * grid_w - 0.5
    for row in range(3):
        torch.testing.assert_close(out_HW[row], expected, atol=1e-5, rtol=0)


def test_vertical_ramp_uses_y_coordinates():
    grid_h, grid_w = 8, 4
    map_HW = torch.arange(grid_h, dtype=torch.float32)[:, None].expand(grid_h, grid_w)
    y0, y1 = 0.125, 0.625
    boxes = torch.tensor([[[0.0, y0, 1.0, y1]]])
    out = map_relevance_to_views(map_HW.reshape(1, -1), (grid_h, grid_w), boxes, (4, 2))
    centres = y0 + (torch.arange(4) + 0.5) * (y1 - y0) / 4
    expected = (centres * grid_h - 0.5)[:, None].expand(4, 2)
    torch.testing.assert_close(out.reshape(4, 2), expected, atol=1e-5, rtol=0)


def test_batched_boxes_equal_per_sample_loop():
    torch.manual_seed(1)
    batch, views, grid = 4, 3, (6, 6)
    relevance_BN = torch.rand(batch, 36)
    lo = torch.rand(batch, views, 2) * 0.5
    hi = lo + 0.2 + torch.rand(batch, views, 2) * 0.3
    boxes_BV4 = torch.cat([lo, hi.clamp(max=1.0)], dim=2)
    out = map_relevance_to_views(relevance_BN, grid, boxes_BV4, (4, 4))
    for b, v in itertools.product(range(batch), range(views)):
        single = map_relevance_to_views(
            relevance_BN[b : b + 1], grid, boxes_BV4[b : b + 1, v : v + 1], (4, 4)
        )
        torch.testing.assert_close(out[b, v], single[0, 0], atol=0, rtol=0)
    # And different boxes really give different maps (the test can fail if boxes are ignored).
    assert not torch.allclose(out[0, 0], out[0, 1])


# ----------------------------------------------------------------------------- selection


def test_topk_keep_matches_sort():
    torch.manual_seed(2)
    scores_BN = torch.randn(5, 64)
    keep_BK = topk_keep(scores_BN, 20, (8, 8))
    assert keep_BK.shape == (5, 20) and keep_BK.dtype == torch.long
    for b in range(5):
        expected = torch.sort(torch.argsort(scores_BN[b], descending=True)[:20]).values
        assert torch.equal(keep_BK[b], expected)
        assert torch.all(keep_BK[b, 1:] > keep_BK[b, :-1])


def test_topk_keep_blocks_picks_whole_blocks_by_mean():
    torch.manual_seed(3)
    grid = (8, 8)
    scores_BN = torch.randn(3, 64)
    k = 16  # exactly 4 blocks of 2x2
    keep_BK = topk_keep(scores_BN, k, grid, block_size=2)
    for b in range(3):
        map_HW = scores_BN[b].reshape(8, 8)
        block_means = {}
        for by, bx in itertools.product(range(4), range(4)):
            block_means[(by, bx)] = map_HW[2 * by : 2 * by + 2, 2 * bx : 2 * bx + 2].mean().item()
        best = sorted(block_means, key=block_means.get, reverse=True)[:4]
        expected = sorted(
            (2 * by + dy) * 8 + 2 * bx + dx
            for (by, bx) in best
            for dy, dx in itertools.product(range(2), range(2))
        )
        assert keep_BK[b].tolist() == expected


def test_topk_keep_blocks_trims_to_k_by_score():
    # k=5 with 2x2 blocks: two best blocks (8 patches), trimmed to the 5 best patches among them.
    scores_BN = torch.arange(16, dtype=torch.float32).reshape(1, 16)
    keep_BK = topk_keep(scores_BN, 5, (4, 4), block_size=2)
    assert keep_BK.tolist() == [[11, 12, 13, 14, 15]]


def test_topk_keep_rejects_bad_grid():
    with pytest.raises(ValueError):
        topk_keep(torch.rand(1, 36), 5, (6, 6), block_size=4)
    with pytest.raises(ValueError):
        topk_keep(torch.rand(1, 36), 5, (5, 7))


@pytest.mark.parametrize("block_size", [1, 2])
def test_random_keep_distinct_sorted_and_uniform(block_size):
    grid, n, k, draws = (4, 4), 16, 6, 4000
    g = torch.Generator().manual_seed(0)
    keep_BK = random_keep(draws, n, k, grid, block_size=block_size, generator=g)
    assert keep_BK.shape == (draws, k) and keep_BK.dtype == torch.long
    assert torch.all(keep_BK[:, 1:] > keep_BK[:, :-1])  # sorted and distinct
    freq_N = torch.bincount(keep_BK.flatten(), minlength=n).float() / draws
    # Each index is kept with probability k/N; std of the estimate ~ sqrt(p(1-p)/draws) ~ 0.008.
    torch.testing.assert_close(freq_N, torch.full((n,), k / n), atol=0.04, rtol=0)


def test_random_keep_blocks_keep_whole_blocks():
    g = torch.Generator().manual_seed(1)
    keep_BK = random_keep(50, 64, 16, (8, 8), block_size=2, generator=g)
    for row in keep_BK.tolist():
        blocks = {(i // 8 // 2, i % 8 // 2) for i in row}
        assert len(blocks) == 4


def test_random_keep_deterministic_with_seed():
    a = random_keep(8, 49, 10, (7, 7), generator=torch.Generator().manual_seed(123))
    b = random_keep(8, 49, 10, (7, 7), generator=torch.Generator().manual_seed(123))
    c = random_keep(8, 49, 10, (7, 7), generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------- TokenSelector


def test_selector_none_and_full_ratio_keep_all():
    assert TokenSelector("none", 0.5, (4, 4)).select(None, 3) is None
    sel = TokenSelector("attentive", 1.0, (4, 4))
    assert sel.k == 16 and not sel.needs_relevance
    assert sel.select(None, 3) is None
    assert TokenSelector("random", 1.0, (4, 4)).select(None, 3) is None


def test_selector_rejects_bad_config():
    with pytest.raises(ValueError):
        TokenSelector("topk", 0.5, (4, 4))
    for ratio in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            TokenSelector("random", ratio, (4, 4))


def test_selector_attentive_needs_relevance():
    sel = TokenSelector("attentive", 0.5, (4, 4))
    assert sel.needs_relevance and sel.k == 8
    with pytest.raises(ValueError):
        sel.select(None, 2)
    with pytest.raises(ValueError):
        sel.select(torch.rand(3, 16), 2)  # wrong number of rows


def test_selector_attentive_equals_topk_and_random_is_seeded():
    torch.manual_seed(4)
    relevance = torch.rand(6, 64)
    sel = TokenSelector("attentive", 0.25, (8, 8), block_size=2)
    assert torch.equal(sel.select(relevance, 6), topk_keep(relevance, 16, (8, 8), block_size=2))
    rnd = TokenSelector("random", 0.5, (8, 8))
    assert not rnd.needs_relevance
    a = rnd.select(None, 6, generator=torch.Generator().manual_seed(5))
    b = random_keep(6, 64, 32, (8, 8), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (6, 32)


# ----------------------------------------------------------------------------- strategy registry

PLUGIN_FILE = '''
import torch

from aclip.methods.tokens.base import TokenStrategy, register_strategy


@register_strategy
class LeastRelevant(TokenStrategy):
    """The k least relevant patches: a strategy living outside aclip/methods/tokens/."""

    name = "test_least_relevant"
    needs_relevance = True

    def keep(self, relevance_BVN, batch, generator, device):
        return (-relevance_BVN).topk(self.k, dim=1).indices.sort(dim=1).values
'''


@pytest.fixture
def plugin_strategy(tmp_path, monkeypatch):
    """A token strategy registered by importing a new file, unregistered afterwards."""
    (tmp_path / "my_strategy.py").write_text(PLUGIN_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_strategy", raising=False)
    try:
        yield importlib.import_module("my_strategy").LeastRelevant
    finally:
        STRATEGIES.pop("test_least_relevant", None)
        sys.modules.pop("my_strategy", None)


def test_strategy_from_a_new_file_is_usable_by_the_selector(plugin_strategy):
    assert get_strategy("test_least_relevant") is plugin_strategy
    sel = TokenSelector("test_least_relevant", 0.25, (4, 4))
    assert sel.needs_relevance and sel.k == 4
    relevance = torch.arange(32.0).reshape(2, 16)
    relevance[1] = relevance[1].flip(0)
    keep = sel.select(relevance, 2)
    assert keep.tolist() == [[0, 1, 2, 3], [12, 13, 14, 15]]
    with pytest.raises(ValueError, match="test_least_relevant token selection needs"):
        sel.select(None, 2)
    # keep ratio 1 keeps every token without asking the strategy
    assert TokenSelector("test_least_relevant", 1.0, (4, 4)).select(None, 2) is None


def test_unknown_strategy_lists_the_registered_ones(plugin_strategy):
    with pytest.raises(ValueError, match="expected one of") as err:
        TokenSelector("topk", 0.5, (4, 4))
    message = str(err.value)
    assert "'topk'" in message
    for name in ("attentive", "none", "random", "test_least_relevant"):
        assert name in message


def test_register_strategy_refuses_a_taken_or_empty_name():
    class Twin(TokenStrategy):
        name = "random"

    class Nameless(TokenStrategy):
        pass

    for cls in (Twin, Nameless):
        with pytest.raises(ValueError, match="empty or taken"):
            register_strategy(cls)
    assert STRATEGIES["random"] is not Twin


def test_builtin_strategies_flags_and_keep_all_indices():
    assert {"none", "random", "attentive"} <= set(STRATEGIES)
    assert get_strategy("none").keeps_every_token
    assert get_strategy("attentive").needs_relevance
    assert not get_strategy("random").needs_relevance
    keep_all = get_strategy("none")(16, (4, 4), 1)
    assert keep_all.keep(None, 2, None, None).tolist() == [list(range(16))] * 2
