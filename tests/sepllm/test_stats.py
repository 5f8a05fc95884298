"""KV-retention ratio and attention-map density: hand-computed values and the tracker."""
import pytest
import torch

from megatron.model.sepllm import rule
from megatron.model.sepllm.stats import KVRatioTracker, kv_statistics
from tests.sepllm import brute


def test_known_input_hand_computed():
    # S = 8, a = 1, W = 2 (E = 1), separator at position 4 (id 3). Row by row (q: visible keys):
    # q0:{0} q1:{0,1} q2:{0,1,2} q3:{0,2,3} q4:{0,3,4} q5:{0,4,5} q6:{0,4,5,6} q7:{0,4,6,7}
    # map kept = 1+2+3+3+3+3+4+4 = 23 of (1+8)*8/2 = 36 causal entries; last row keeps 4 of 8.
    ids = torch.tensor([[5, 5, 5, 5, 3, 5, 5, 5]])
    args = brute.args(num_layers=2, init_tok_max_idx=0, prefill_local_window_size=2,
                      USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, prefill_loc_win_size_list=[2, 8])
    out = kv_statistics(ids, args)
    assert out["kv_ratio/layer_00"] == pytest.approx(4 / 8)
    assert out["attn_density/layer_00"] == pytest.approx(23 / 36)
    assert out["kv_ratio/layer_01"] == pytest.approx(1.0)  # W = 8 >= S: full causal
    assert out["attn_density/layer_01"] == pytest.approx(1.0)
    assert out["kv_ratio"] == pytest.approx((4 + 8 + 1e-6) / (16 + 1e-6))
    assert out["attn_density"] == pytest.approx((23 + 36 + 1e-6) / (72 + 1e-6))
    assert rule.kv_ratio_totals(1, 8) == (8, 36)


def test_tracker_accumulates_without_lag():
    args = brute.args(num_layers=1, prefill_local_window_size=4, PRINT_KV_RATIO=True, print_ratio_intervals=2,
                      USE_SEP_ATTN_KERNEL_ACCELERATOR=False)
    gen = torch.Generator().manual_seed(0)
    batches = [brute.random_ids(2, 30, gen) for _ in range(3)]
    tracker = KVRatioTracker(args)
    tracker.observe(batches[0])
    assert not tracker.due(1) and tracker.due(2)
    first = tracker.summary()
    masks = brute.prefill_mask(batches[0], 3, 4)
    assert first["kv_ratio"] == pytest.approx(float(masks[:, -1].sum()) / 60, rel=1e-6)
    assert first["attn_density"] == pytest.approx(float(masks.sum()) / (2 * 31 * 30 / 2), rel=1e-6)
    tracker.observe(batches[1])
    tracker.observe(batches[2])
    second = tracker.summary()
    both = torch.cat([brute.prefill_mask(b, 3, 4) for b in batches[1:]])
    assert second["attn_density"] == pytest.approx(float(both.sum()) / (4 * 465), rel=1e-6)
    every = torch.cat([masks, both])
    assert second["cum_kv_ratio"] == pytest.approx(float(every[:, -1].sum()) / 180, rel=1e-6)
    assert tracker.summary() == {}


def test_tracker_streaming_and_disabled():
    ids = torch.tensor([[3, 3, 3, 3, 3, 3]])
    stream = kv_statistics(ids, brute.args(num_layers=1, streamingLLM=True, init_tok_max_idx=0,
                                           prefill_local_window_size=2))
    assert stream["kv_ratio"] == pytest.approx(3 / 6)  # separators do not count in StreamingLLM
    assert not KVRatioTracker(brute.args()).enabled  # PRINT_KV_RATIO off
    assert not KVRatioTracker(brute.args(PRINT_KV_RATIO=True, USE_ORIGINAL_FULL_ATTEN=True)).enabled


def test_trainer_batch_function_feeds_training_batches_only():
    """The trainer's tracker sees the micro-batches it trains on, not evaluation batches, and reports once
    print_ratio_intervals of them were seen. The model's metadata builder records nothing."""
    from megatron.model.sepllm.meta import build_attn_meta
    from megatron.training import PipeBatchFn

    args = brute.args(num_layers=1, init_tok_max_idx=0, prefill_local_window_size=2, PRINT_KV_RATIO=True,
                      print_ratio_intervals=2)
    tracker = KVRatioTracker(args)
    # get_batch takes text of S+1 tokens: inputs are the first S.
    batch = {"text": torch.tensor([[5, 5, 5, 5, 3, 5, 5, 5, 9]])}
    fn = PipeBatchFn(eod_token=None, eod_mask_loss=False, device=torch.device("cpu"), tracker=tracker)
    build_attn_meta(batch["text"][:, :-1], None, args)  # a forward alone is not counted
    fn.training = False
    fn(batch)  # an evaluation batch: not counted
    fn.training = True
    fn(batch)
    assert tracker.report_if_due() == {}  # 1 of 2 training batches
    fn(batch)
    out = tracker.report_if_due()
    # a = 1 initial token, separator at 4, window 2 (diagonal excluded): last row keeps {0, 4, 6, 7} of 8.
    assert out["kv_ratio"] == pytest.approx(4 / 8)
    assert out["attn_density"] == pytest.approx(23 / 36)
    assert tracker.report_if_due() == {}


def test_tensor_identity_cache_keys_on_identity_versions_and_keeps_recent_anchors():
    from megatron.model.sepllm.mask_cache import TensorIdentityCache

    built = []

    def build(tag):
        return lambda: built.append(tag) or tag

    one = TensorIdentityCache(max_anchors=1)
    a = torch.zeros(3)
    assert one.get((a,), 8, build("a8")) == "a8" and one.get((a,), 8, build("again")) == "a8"
    assert one.get((a,), 4, build("a4")) == "a4"  # another key of the same micro-batch
    assert one.get((a.clone(),), 8, build("copy")) == "copy"  # equal values, other tensor: rebuilt
    assert one.get((a,), 8, build("a8 again")) == "a8 again"  # one anchor only: a was evicted
    a.add_(1)  # in place: the version moves, the entry no longer matches
    assert one.get((a,), 8, build("changed")) == "changed"
    two = TensorIdentityCache(max_anchors=2)
    b, c = torch.zeros(2), torch.zeros(2)
    two.get((b,), 0, build("b"))
    two.get((c,), 0, build("c"))
    assert two.get((b,), 0, build("b rebuilt")) == "b"  # a backward after the next forward still finds it
    assert built == ["a8", "a4", "copy", "a8 again", "changed", "b", "c"]
