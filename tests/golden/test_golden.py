"""Golden losses: each attention mode's tiny deterministic deepy.py run reproduces its stored losses.

Bitwise on a machine with the fingerprint the files were made on (torch build, CPU vector flags); on another
machine within 1e-5 relative, which still catches any real change of the numerics. A change that is meant
to move them regenerates the files with ``python tests/golden/regenerate.py`` and says why in its commit.
"""
import math

import pytest

import golden_utils as g

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


@pytest.mark.parametrize("mode", sorted(g.MODES))
def test_losses_match_golden(mode, tmp_path):
    golden = g.load_golden(mode)
    assert golden["keys"] == g.MODES[mode], f"{mode}: the mode's keys changed; regenerate its golden file"
    losses = g.run_mode(mode, tmp_path)
    assert sorted(losses) == list(range(1, g.ITERATIONS + 1))
    expected = golden["losses"]
    if golden["fingerprint"] == g.fingerprint():
        assert losses == expected, _diff(losses, expected)
    else:
        bad = {i: (losses[i], expected[i]) for i in expected
               if not math.isclose(losses[i], expected[i], rel_tol=1e-5, abs_tol=0.0)}
        assert not bad, _diff(losses, expected)


def test_modes_differ_from_each_other():
    """Each mode's file guards its own numerics: no two modes share a loss curve (a mode switch that
    silently fell back to another path would), except the one pair that must: on CPU the Sep-Attention
    kernel mode trains with the mask-based path (FlexAttention has no CPU backward)."""
    curves = {mode: tuple(g.load_golden(mode)["losses"].values()) for mode in g.MODES}
    assert curves.pop("sepllm_kernel") == curves["sepllm_mask"]
    assert len(set(curves.values())) == len(curves), curves


def _diff(new: dict, old: dict) -> str:
    rows = [f"  iteration {i:3d}: golden {old.get(i)!r}  now {new.get(i)!r}"
            for i in sorted(set(new) | set(old)) if new.get(i) != old.get(i)]
    return "losses moved:\n" + "\n".join(rows) + "\n(python tests/golden/regenerate.py, if deliberate)"
