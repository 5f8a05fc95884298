"""What a launch prints and records: one project line per log interval (DeepSpeed's own progress line off
although the config sets GPT-NeoX's steps_per_print), per-layer SepLLM statistics summarised on the console
and written one by one, under GPT-NeoX's and the project's names, to TensorBoard."""
import glob
import re

import pytest
import yaml

from launch_utils import FIXTURES, run_deepy, write_run_config, write_tiny_corpus

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

CHAR_SEPARATORS = [46, 44, 63, 33, 59, 58, 32, 9, 10]


def test_one_console_line_per_interval_and_event_file_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    corpus = write_tiny_corpus(str(tmp_path / "corpus"))
    keys = dict(data_path=corpus, train_iters=4, log_interval=2, steps_per_print=1, pipe_parallel_size=1,
                zero_optimization={"stage": 0}, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
                tensorboard_dir=str(tmp_path / "tb"), USE_ORIGINAL_FULL_ATTEN=False,
                separator_token_ids=CHAR_SEPARATORS, PADDING_ID=0, init_tok_max_idx=2,
                USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, prefill_loc_win_size_list=[64, 8],
                prefill_local_window_size=8, USE_SEP_ATTN_KERNEL_ACCELERATOR=False, PRINT_KV_RATIO=True,
                print_ratio_intervals=1)
    base = {**yaml.safe_load((FIXTURES / "tiny_model.yml").read_text()),
            **yaml.safe_load((FIXTURES / "tiny_train.yml").read_text())}
    cfg = write_run_config(tmp_path / "run.yml", **{**base, **keys})
    rc, out = run_deepy([cfg], 1)
    assert rc == 0, out[-4000:]
    lines = [line for line in out.splitlines() if re.search(r"iteration\s+\d+/\s+4 \|", line)]
    assert len(lines) == 2, lines  # iterations 2 and 4
    assert not re.search(r"\bsteps: \d+ loss:", out), "DeepSpeed's own progress line was printed"
    for line in lines:
        assert len(line) < 400, line
        assert "layer_0" not in line
        # Layer 0 sees the whole sequence (window 64), layer 1 a window of 8: the range is shown.
        assert re.search(r"sepllm/kv_ratio [0-9.e-]+ \(layers [0-9.e-]+\.\.1 ?\)?", line), line
    acc = EventAccumulator(glob.glob(str(tmp_path / "tb" / "events.*"))[0])
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/lm_loss", "train/learning_rate", "runtime/samples_per_sec", "runtime/tokens_per_sec",
            "runtime/iteration_time", "runtime/flops_per_sec_per_gpu", "validation/lm_loss",
            "validation/lm_loss_ppl", "sepllm/kv_ratio", "sepllm/kv_ratio/layer_00",
            "sepllm/kv_ratio/layer_01"} <= tags, sorted(tags)
    assert [e.step for e in acc.Scalars("train/lm_loss")] == [2, 4]
    assert acc.Scalars("sepllm/kv_ratio/layer_00")[0].value == pytest.approx(1.0)
    assert acc.Scalars("sepllm/kv_ratio/layer_01")[0].value < 0.9
