"""The LM loss against a per-token formula written out from its definition."""
import math

import torch

from megatron.model import cross_entropy
from megatron.model.loss import lm_loss


def brute_force(logits, labels, mask):
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for s in range(logits.shape[1]):
            if mask[b, s]:
                row = [float(v) for v in logits[b, s]]
                log_z = math.log(sum(math.exp(v) for v in row))
                total += log_z - row[int(labels[b, s])]
                count += 1
    return total / count if count else 0.0


def test_lm_loss_matches_the_definition_and_the_pipeline_form():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g).to(torch.bfloat16)  # upcast to fp32 inside
    labels = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    expected = brute_force(logits.float(), labels, mask)
    assert abs(float(lm_loss(logits, labels, mask)) - expected) < 1e-5
    assert lm_loss(logits, labels, mask).dtype == torch.float32
    assert float(cross_entropy(logits, (labels, mask))) == float(lm_loss(logits, labels, mask))
    # Every position masked: 0, not NaN.
    assert float(lm_loss(logits, labels, torch.zeros_like(mask))) == 0.0
