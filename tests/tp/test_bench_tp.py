"""bench/bench_tp.py on CPU: one micro-batch's tensor-parallel traffic at TP=2 and 4 is exactly the formula (two
all-reduces per layer forward, one with the parallel residual, and two backward, of B*S*h; the embedding's and the
output layer's input's; three of B*S for the cross entropy; no all-gather)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_tp  # noqa: E402

pytestmark = pytest.mark.deepspeed


def test_cpu_traffic_matches_formula(capsys):
    bench_tp.run_cpu(2)
    out = capsys.readouterr().out
    assert "traffic matches the formula" in out
    for tp in (2, 4):
        assert f"| sequential | {tp} | 12 | 9 | 21 | 1180416 | 1180416 | 0 |" in out
        assert f"| parallel | {tp} | 8 | 9 | 17 | 918272 | 918272 | 0 |" in out

