"""LR schedules against a direct transcription of GPT-NeoX's AnnealingLR formulas."""
import math
import random

import pytest
import torch

from megatron.learning_rates import AnnealingLR, build_lr_scheduler
from megatron.neox_arguments import ConfigError, NeoXArgs, Environment
from megatron.neox_arguments.derive import warmup_iterations

CPU = Environment(cuda_device_count=0, environ={})
SMALL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
         "padded_vocab_size": 128, "USE_ORIGINAL_FULL_ATTEN": True}


def resolved(**keys):
    return NeoXArgs.from_dict({**SMALL, **keys}, env=CPU)


def reference_lr(it, start, min_lr, warmup, end, style):
    if warmup > 0 and it <= warmup:
        return start * it / warmup
    it = min(it, end) - warmup
    span = end - warmup
    if style == "linear":
        lr = start * (span - it) / span
    elif style == "cosine":
        lr = min_lr + (start - min_lr) / 2.0 * (math.cos(math.pi * it / span) + 1)
    elif style == "exponential":
        lr = start * math.exp(-0.693 * it / end)
    else:
        lr = start
    return max(lr, min_lr)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "exponential"])
def test_schedule_matches_reference_on_random_settings(style):
    rng = random.Random(0)
    for _ in range(20):
        end = rng.randint(10, 500)
        warmup = rng.randint(0, end // 2)
        start = rng.uniform(1e-5, 1e-2)
        min_lr = rng.uniform(0, start)
        sched = AnnealingLR(None, start, warmup, end, style, min_lr)
        for it in list(range(0, end + 20, 3)) + [end, end + 1000]:
            assert sched.get_lr(it) == pytest.approx(reference_lr(it, start, min_lr, warmup, end, style), rel=1e-12, abs=1e-15)


def test_warmup_fraction_and_iterations():
    assert warmup_iterations(0.01, 143000) == 0.01 * 143000  # the Pythia schedule
    assert warmup_iterations(0.01, 150) == 1.5  # GPT-NeoX does not round the product
    assert warmup_iterations(0.0, 100) == 0
    assert warmup_iterations(25, 100) == 25
    assert warmup_iterations(1.0, 100) == 100  # GPT-NeoX: the whole of lr_decay_iters
    with pytest.raises(ConfigError, match="'warmup'"):
        warmup_iterations(-0.1, 100)
    with pytest.raises(ConfigError, match="whole"):
        warmup_iterations(2.5, 100)


def test_integer_and_fractional_warmup_through_the_config():
    """The derived warmup_iters is what the scheduler uses: an integer warmup is iterations, a fraction is
    GPT-NeoX's unrounded share of lr_decay_iters."""
    s = build_lr_scheduler(resolved(lr=1e-3, train_iters=100, warmup=25, lr_decay_style="exponential"), None)
    assert s.warmup_iter == 25 and s.get_lr(25) == pytest.approx(1e-3) and s.get_lr(24) < 1e-3
    assert s.get_lr(125) == pytest.approx(1e-3 * math.exp(-0.693), rel=1e-12) or s.get_lr(125) == s.get_lr(100)
    s = build_lr_scheduler(resolved(lr=1e-3, train_iters=150, warmup=0.01), None)
    assert s.warmup_iter == 1.5 and s.get_lr(1) == pytest.approx(1e-3 / 1.5)
    with pytest.raises(ConfigError, match="'warmup'"):
        resolved(lr=1e-3, train_iters=100, warmup=2.5)


def test_endpoints_floor_and_clamp():
    s = AnnealingLR(None, 6e-4, 10, 110, "cosine", 6e-5)
    assert s.get_lr(0) == 0.0
    assert s.get_lr(5) == pytest.approx(3e-4)
    assert s.get_lr(10) == pytest.approx(6e-4)
    assert s.get_lr(110) == pytest.approx(6e-5)
    assert s.get_lr(10_000) == pytest.approx(6e-5)  # clamped after lr_decay_iters, no cosine wrap-around
    lin = AnnealingLR(None, 1e-3, 0, 100, "linear", 1e-4)
    assert lin.get_lr(99) == pytest.approx(1e-4)  # 1e-5 from the line, floored at min_lr
    assert all(lin.get_lr(i) >= lin.get_lr(i + 1) for i in range(150))


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="lr_decay_style"):
        AnnealingLR(None, 1e-3, 0, 10, "triangular")
    with pytest.raises(ValueError, match="lr_decay_iters"):
        AnnealingLR(None, 1e-3, 0, 0)
    with pytest.raises(ValueError, match="min_lr"):
        AnnealingLR(None, 1e-3, 0, 10, "cosine", 1e-2)


def test_writes_param_groups_and_resumes():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [], "lr_mult": 0.5}], lr=1.0)
    s = AnnealingLR(opt, 1e-3, 4, 20, "cosine", 1e-4)
    for it in range(12):
        lr = s.step(it)
    assert opt.param_groups[0]["lr"] == lr and opt.param_groups[1]["lr"] == pytest.approx(lr * 0.5)
    resumed = AnnealingLR(torch.optim.AdamW([p], lr=1.0), 1e-3, 4, 20, "cosine", 1e-4)
    resumed.load_state_dict(s.state_dict())
    assert [resumed.step() for _ in range(10)] == [s.step() for _ in range(10)]


def test_build_from_args_uses_optimizer_params_and_iteration():
    args = resolved(optimizer={"type": "Adam", "params": {"lr": 6e-4}}, train_iters=200, lr_decay_iters=100,
                    warmup=0.1, lr_decay_style="linear", min_lr=0.0)
    args.iteration = 30
    s = build_lr_scheduler(args, None)
    assert s.warmup_iter == 10 and s.end_iter == 100 and s.num_iters == 30
    assert s.get_lr() == pytest.approx(6e-4 * 70 / 90)


def test_derived_warmup_iters_wins():
    s = build_lr_scheduler(resolved(lr=1e-3, train_iters=50, warmup_iters=7, lr_decay_style="cosine"), None)
    assert s.warmup_iter == 7 and s.end_iter == 50


def test_resumed_schedule_follows_gpt_neox_rule():
    saved = AnnealingLR(None, 1e-3, 10, 100, "cosine", 1e-4, last_iter=40).state_dict()
    same = AnnealingLR(None, 1e-3, 10, 100, "cosine", 1e-4)
    same.reconcile(saved)  # agreeing schedules need no key
    edited = AnnealingLR(None, 5e-4, 10, 200, "cosine", 1e-4)
    with pytest.raises(ValueError, match=r"start_lr 0.001 \(checkpoint\) vs 0.0005 \(config\); end_iter 100 "
                                         r"\(checkpoint\) vs 200 \(config\).*override_lr_scheduler"):
        edited.reconcile(saved)
    edited.reconcile(saved, override=True)
    assert (edited.start_lr, edited.end_iter) == (5e-4, 200)
    edited.reconcile(saved, use_checkpoint=True)
    assert (edited.start_lr, edited.end_iter) == (1e-3, 100)
    assert edited.get_lr(40) == same.get_lr(40)
    with pytest.raises(ConfigError, match="both true"):
        resolved(lr=1e-3, train_iters=10, override_lr_scheduler=True, use_checkpoint_lr_scheduler=True)
