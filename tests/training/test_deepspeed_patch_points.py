"""The DeepSpeed internals the trainer replaces (megatron/training.py) still exist with the signatures and the
call sites the replacements rely on. DeepSpeed has no public hook for these; requirements pin the tested
range, and an upgrade that moves one of them fails here, by name, instead of silently dropping the grad-norm
log, the fast bf16 overflow check or the non-finite step guard."""
import inspect

import pytest

deepspeed = pytest.importorskip("deepspeed")

from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer  # noqa: E402
from deepspeed.runtime.pipe.engine import PipelineEngine  # noqa: E402
from deepspeed.runtime.utils import CheckOverflow, clip_grad_norm_  # noqa: E402


def params_of(fn):
    return list(inspect.signature(fn).parameters)


def test_fp32_clip_hook_point():
    """_record_fp32_clip_norm replaces engine.clip_fp32_gradients (no arguments) and stores the norm in
    engine._global_grad_norm, which get_global_grad_norm returns."""
    assert params_of(DeepSpeedEngine.clip_fp32_gradients) == ["self"]
    step = inspect.getsource(DeepSpeedEngine._take_model_step)
    assert "self.clip_fp32_gradients()" in step and "self.optimizer.step()" in step
    assert "self._take_model_step(" in inspect.getsource(PipelineEngine._exec_optimizer_step)
    assert "return self._global_grad_norm" in inspect.getsource(DeepSpeedEngine.get_global_grad_norm)
    assert params_of(clip_grad_norm_)[:2] == ["parameters", "max_norm"] and "mpu" in params_of(clip_grad_norm_)
    assert "return total_norm" in inspect.getsource(clip_grad_norm_)  # the pre-clipping norm is returned


def test_bf16_overflow_check_hook_point():
    """_fast_bf16_overflow_check replaces optimizer.overflow_checker.has_overflow_serial(params)."""
    assert params_of(CheckOverflow.has_overflow_serial) == ["self", "params"]
    assert "self.has_overflow_serial(" in inspect.getsource(CheckOverflow.has_overflow)
    assert "self.overflow_checker = CheckOverflow(" in inspect.getsource(FP16_Optimizer.__init__)


def test_optimizer_step_is_called_through_the_attribute():
    """NonFiniteStepGuard wraps optimizer.step by assignment: the engine must call it as an attribute."""
    assert "self.optimizer.step()" in inspect.getsource(DeepSpeedEngine._take_model_step)
