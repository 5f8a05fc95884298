"""The rule module against loop-based twins written from the reference text."""
import itertools

import pytest
import torch

from megatron.model.sepllm import rule
from tests.sepllm import brute
from tests.sepllm.brute import SEPS

SEQ = 80
CASES = list(itertools.product([0, 3], [1, 5, 64, 200], [True, False]))  # a, W (200 >= S), EXCLUDE_DIAGONAL


@pytest.mark.parametrize("num_init,window,excl", CASES)
def test_dense_prefill_mask_matches_brute_force(num_init, window, excl):
    gen = torch.Generator().manual_seed(num_init * 1000 + window + excl)
    ids = brute.random_ids(2, SEQ, gen)
    flags = rule.separator_flags(ids, SEPS)
    got = rule.dense_mask(flags, torch.zeros(2, dtype=torch.long), num_init, window, excl)
    assert torch.equal(got, brute.prefill_mask(ids, num_init, window, excl))


@pytest.mark.parametrize("pads", [[0, 5], [9, 2], [SEQ, 1], [SEQ - 1, 0]])
def test_adaptive_init_with_left_padding(pads):
    gen = torch.Generator().manual_seed(sum(pads))
    ids = brute.random_ids(2, SEQ, gen, pad_left=pads)
    start = rule.adaptive_init_start(ids, brute.PAD)
    flags = rule.separator_flags(ids, SEPS)
    got = rule.dense_mask(flags, start, 3, 8)
    assert torch.equal(got, brute.prefill_mask(ids, 3, 8, adaptive=True))


def test_separator_flags_disabled():
    ids = torch.tensor([[3, 7, -1, 5]])
    assert not rule.separator_flags(ids, [-1]).any()
    assert not rule.separator_flags(ids, None).any()
    assert rule.separator_flags(ids, [3, 7]).tolist() == [[True, True, False, False]]


def test_mask_mod_matches_dense_mask_per_layer():
    """Each layer's mask_mod keeps its own window, even when built in a loop (no late binding)."""
    from torch.nn.attention.flex_attention import create_mask

    gen = torch.Generator().manual_seed(5)
    ids = brute.random_ids(2, 48, gen, pad_left=[0, 4])
    flags = rule.separator_flags(ids, SEPS)
    start = rule.adaptive_init_start(ids, brute.PAD)
    windows = [100, 4, 4, 1, 100]
    mods = [rule.make_mask_mod(flags, start, 3, w, True) for w in windows]
    for w, mod in zip(windows, mods):
        dense = create_mask(mod, 2, 1, 48, 48, device="cpu")[:, 0]
        assert torch.equal(dense, brute.prefill_mask(ids, 3, w, adaptive=True)), w


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("num_init,gen_window", [(0, 1), (3, 4), (3, 64)])
def test_decode_steps_after_prefill(adaptive, num_init, gen_window):
    gen = torch.Generator().manual_seed(11 + num_init + gen_window)
    prefill = 20
    ids = brute.random_ids(2, prefill + 6, gen, pad_left=[0, 6])
    valid = ids != brute.PAD
    start = rule.adaptive_init_start(ids[:, :prefill], brute.PAD) if adaptive else torch.zeros(2, dtype=torch.long)
    for total in range(prefill + 1, prefill + 7):
        cur = ids[:, :total]
        got = rule.decode_mask(rule.separator_flags(cur, SEPS), start, num_init, gen_window,
                               key_valid=valid[:, :total], init_limit=prefill)
        want = brute.decode_row(cur, prefill, num_init, gen_window, adaptive=adaptive, key_valid=valid[:, :total])
        assert torch.equal(got[:, 0], want), total


def test_decode_row_equals_last_prefill_row_without_padding():
    gen = torch.Generator().manual_seed(3)
    ids = brute.random_ids(1, 30, gen)
    flags = rule.separator_flags(ids, SEPS)
    zero = torch.zeros(1, dtype=torch.long)
    # The brute-force prefill predicate's last row (loops over the reference's text), not the rule again.
    assert torch.equal(rule.decode_mask(flags, zero, 3, 6)[:, 0], brute.prefill_mask(ids, 3, 6)[:, -1])


def test_bipe_positions_and_incremental_continuation():
    gen = torch.Generator().manual_seed(7)
    ids = brute.random_ids(3, 50, gen)
    intra, inter = rule.bipe_positions(ids, SEPS)
    want_intra, want_inter = brute.bipe(ids)
    assert torch.equal(intra, want_intra) and torch.equal(inter, want_inter)
    # Prefill of 17 tokens, then one token at a time, then a chunk: same positions as all at once.
    pieces_intra, pieces_inter, offsets = [], [], None
    for lo, hi in [(0, 17)] + [(t, t + 1) for t in range(17, 30)] + [(30, 50)]:
        chunk = ids[:, lo:hi]
        a, b = rule.bipe_positions(chunk, SEPS, offsets)
        pieces_intra.append(a)
        pieces_inter.append(b)
        offsets = rule.bipe_next_offsets(chunk, SEPS, a, b)
    assert torch.equal(torch.cat(pieces_intra, 1), want_intra)
    assert torch.equal(torch.cat(pieces_inter, 1), want_inter)


def test_bipe_known_values():
    ids = torch.tensor([[5, 3, 5, 5, 7, 3, 5]])
    intra, inter = rule.bipe_positions(ids, SEPS)
    assert intra.tolist() == [[0, 1, 0, 1, 2, 0, 0]]
    assert inter.tolist() == [[0, 0, 1, 1, 1, 2, 3]]


def test_layer_windows_and_errors():
    args = brute.args(num_layers=4, prefill_local_window_size=9, generate_local_window_size=5,
                      USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, prefill_loc_win_size_list=[64, 2, 2, 64])
    assert rule.layer_windows(args, 4, "prefill") == [64, 2, 2, 64]
    assert rule.layer_windows(args, 4, "generate") == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="num_layers is 3"):
        rule.layer_windows(args, 3, "prefill")
    with pytest.raises(ValueError, match="phase"):
        rule.layer_windows(args, 4, "decode")


@pytest.mark.parametrize("num_init,window,excl", CASES)
def test_kept_counts_closed_form_matches_mask(num_init, window, excl):
    gen = torch.Generator().manual_seed(window + 17 * num_init)
    ids = brute.random_ids(2, SEQ, gen)
    mask = brute.prefill_mask(ids, num_init, window, excl)
    last, full = rule.kept_counts(rule.separator_flags(ids, SEPS), torch.zeros(2, dtype=torch.long),
                                  num_init, window, excl)
    assert last.tolist() == mask[:, -1].sum(-1).tolist()
    assert full.tolist() == mask.sum((-1, -2)).tolist()


def test_kernel_package_mask_is_the_brute_force_predicate():
    """The Sep-Attention kernel's dense twin (the rule, by construction) against the brute-force predicate, with
    left padding and the adaptive initial tokens."""
    kernel = pytest.importorskip("megatron.model.sepllm.kernel")
    gen = torch.Generator().manual_seed(2)
    ids = brute.random_ids(2, SEQ, gen, pad_left=[3, 0])
    flags = rule.separator_flags(ids, SEPS)
    start = rule.adaptive_init_start(ids, brute.PAD)
    for window, excl in [(1, True), (7, False), (200, True)]:
        assert torch.equal(kernel.dense_sep_mask(flags, start, 3, window, excl),
                           brute.prefill_mask(ids, 3, window, excl, adaptive=True))


@pytest.mark.parametrize("interval,adaptive,pads", [(1, False, [0, 0]), (5, False, [0, 0]), (3, True, [0, 7]),
                                                    (4, True, [SEQ, 2])])
def test_fixed_interval_mask_matches_brute_force(interval, adaptive, pads):
    """FixLLM: the interval flags in place of the separator flags give the loop twin's mask."""
    gen = torch.Generator().manual_seed(interval * 10 + sum(pads))
    ids = brute.random_ids(2, SEQ, gen, pad_left=pads)
    start = rule.adaptive_init_start(ids, brute.PAD) if adaptive else torch.zeros(2, dtype=torch.long)
    flags = rule.fixed_interval_flags(torch.arange(SEQ), start, interval)
    got = rule.dense_mask(flags, start, 3, 6)
    assert torch.equal(got, brute.prefill_mask(ids, 3, 6, adaptive=adaptive, interval=interval))


def test_fixed_interval_flags_known_values():
    flags = rule.fixed_interval_flags(torch.arange(12), torch.tensor([0, 2]), 5)
    assert flags[0].nonzero().flatten().tolist() == [4, 9]
    assert flags[1].nonzero().flatten().tolist() == [6, 11]
    with pytest.raises(ValueError, match="fixed_sep_intervals_list"):
        rule.fixed_interval_flags(torch.arange(4), torch.tensor([0]), 0)
