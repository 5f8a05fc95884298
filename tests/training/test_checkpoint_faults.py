"""Checkpoint faults without a launch: interrupted saves, stale leftovers, a missing or empty `latest`, fsync
order, a full disk (a real 2 MiB tmpfs where mounting is allowed), layouts and damaged files."""
import errno
import os
import types

import pytest
import torch

from megatron import checkpoint_layout as cl
from megatron import checkpointing as ck
from megatron.checkpoint_io import CheckpointError
from megatron.neox_arguments import ConfigError
from test_checkpointing import FakeEngine, make_args


class FailingEngine(FakeEngine):
    """Starts writing the checkpoint, then fails as a full disk makes torch fail."""

    def __init__(self, exc):
        super().__init__()
        self.exc = exc

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"partial")
        raise self.exc


class BigEngine(FakeEngine):
    """Writes a real ``size``-byte tensor with torch.save (to fill a small file system)."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({"client_state": client_state, "w": torch.zeros(self.size // 4)},
                   os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))


def names(path):
    return sorted(os.listdir(path))


# ------------------------------------------------------------------------------- interrupted saves
def test_interrupted_save_leaves_only_a_tmp_dir_and_the_next_save_removes_leftovers(tmp_path, capsys):
    args = make_args(tmp_path)
    root = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(args, 1, FakeEngine(crash_after_partial_write=True), 8)
    # A kill during the very first save: nothing carries a final name, and `latest` does not exist.
    assert names(root) == ["global_step1.tmp"]
    with pytest.raises(FileNotFoundError, match=r"no checkpoint there .*global_step1\.tmp are incomplete saves"):
        ck.resolve_checkpoint(str(root))

    ck.save_checkpoint(args, 2, FakeEngine(), 16)
    # What other kills leave, beside files that are not ours.
    (root / "latest.tmp.4242").write_text("global_step9")
    (root / "global_step2" / "configs.tmp.77").mkdir()
    (root / "global_step2" / "rng_state" / "rank_00001.pt.tmp.12").write_bytes(b"x")
    (root / "global_step5.tmp").mkdir()
    (root / "global_step3.bak").mkdir()
    (root / "notes.tmp").write_text("mine")
    ck.save_checkpoint(args, 3, FakeEngine(), 24)
    assert names(root) == ["global_step2", "global_step3", "global_step3.bak", "latest", "notes.tmp"]
    assert "configs.tmp.77" not in names(root / "global_step2")
    assert names(root / "global_step2" / "rng_state") == ["rank_00000.pt"]
    assert "removed leftovers of an interrupted save" in capsys.readouterr().out
    assert (root / "latest").read_text() == "global_step3"
    assert (root / "global_step3" / "layout.json").exists()


def test_missing_or_empty_latest_names_the_newest_complete_checkpoint(tmp_path):
    args = make_args(tmp_path)
    root = tmp_path / "ckpt"
    ck.save_checkpoint(args, 2, FakeEngine(), 16)
    ck.save_checkpoint(args, 4, FakeEngine(), 32)
    (root / "global_step6").mkdir()  # a half-written directory of an older version: no configs/
    (root / "latest").unlink()
    with pytest.raises(FileNotFoundError) as err:
        ck.resolve_checkpoint(str(root))
    msg = str(err.value)
    assert "no 'latest' file" in msg and "global_step2, global_step4" in msg
    assert msg.endswith(f"set load: {root / 'global_step4'}")
    (root / "latest").write_text("\n")
    with pytest.raises(FileNotFoundError, match=f"'latest' file {root / 'latest'} is empty; the newest complete "
                                                f"checkpoint is {root / 'global_step4'}"):
        ck.resolve_checkpoint(str(root))


def test_files_are_flushed_before_the_rename_and_latest(tmp_path, monkeypatch):
    args = make_args(tmp_path)
    events = []
    real_tree, real_replace = ck.fsync_tree, os.replace

    def fsync_tree(path):
        events.append(("fsync", os.path.basename(path), sorted(os.listdir(path))))
        real_tree(path)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(ck, "fsync_tree", fsync_tree)
    monkeypatch.setattr(os, "replace", replace)
    ck.save_checkpoint(args, 1, FakeEngine(), 8)
    flushed = [e for e in events if e[0] == "fsync"]
    assert flushed == [("fsync", "global_step1.tmp",
                        ["configs", "layout.json", "mp_rank_00_model_states.pt", "rng_state"])]
    assert events.index(flushed[0]) < events.index(("replace", "latest"))


def test_saving_an_iteration_again_replaces_it_and_a_crash_in_between_restores_it(tmp_path):
    args = make_args(tmp_path)
    root = tmp_path / "ckpt"
    ck.save_checkpoint(args, 2, FakeEngine(), 16)
    ck.save_checkpoint(args, 2, FakeEngine(), 16, client_state={"second": True})
    state = torch.load(root / "global_step2" / "mp_rank_00_model_states.pt", weights_only=False)["client_state"]
    assert state["second"] and names(root) == ["global_step2", "latest"]
    # Killed after moving the old copy aside, before the new one took its name: the next save puts it back.
    os.rename(root / "global_step2", root / "global_step2.replaced.tmp")
    ck.save_checkpoint(args, 3, FakeEngine(), 24)
    assert names(root) == ["global_step2", "global_step3", "latest"]


# ----------------------------------------------------------------------------------------- full disk
@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 192")])
def test_failed_write_removes_the_partial_checkpoint_and_keeps_latest(tmp_path, exc):
    args = make_args(tmp_path)
    root = tmp_path / "ckpt"
    ck.save_checkpoint(args, 2, FakeEngine(), 16)
    with pytest.raises(ck.CheckpointSaveFailed) as err:
        ck.save_checkpoint(args, 4, FailingEngine(exc), 32)
    msg = str(err.value)
    assert f"could not write checkpoint {root / 'global_step4.tmp'}" in msg
    assert ("No space left on device (ENOSPC)" in msg) if isinstance(exc, OSError) else "inline_container" in msg
    assert " MiB free on " in msg and "MiB needed" in msg and "'latest' still names global_step2" in msg
    assert names(root) == ["global_step2", "latest"] and (root / "latest").read_text() == "global_step2"


def test_other_errors_are_not_taken_for_a_full_disk(tmp_path):
    with pytest.raises(RuntimeError, match="a bug"):
        ck.save_checkpoint(make_args(tmp_path), 1, FailingEngine(RuntimeError("a bug")), 8)


def test_too_little_free_space_refuses_before_writing(tmp_path, monkeypatch):
    args = make_args(tmp_path)
    root = tmp_path / "ckpt"
    ck.save_checkpoint(args, 2, FakeEngine(), 16)
    size = sum(p.stat().st_size for p in (root / "global_step2").rglob("*") if p.is_file())
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=size - 1, total=0, used=0))
    engine = FakeEngine(crash_after_partial_write=True)  # would leave a partial directory if it were called
    with pytest.raises(ck.CheckpointSaveFailed, match=rf"not enough disk space for a checkpoint in {root}: .* "
                                                      r"free, about .* needed .*'latest' still names global_step2"):
        ck.save_checkpoint(args, 4, engine, 32)
    assert names(root) == ["global_step2", "latest"]


@pytest.fixture
def tiny_fs(tmp_path):
    from launch_utils import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "tmpfs", "2m") as mount_point:
        yield mount_point


def test_real_full_disk(tiny_fs):
    args = make_args(tiny_fs)
    root = tiny_fs / "ckpt"
    ck.save_checkpoint(args, 1, BigEngine(1_200_000), 8)
    # The estimate before writing is the previous checkpoint's size: with 0.8 MiB free it refuses...
    with pytest.raises(ck.CheckpointSaveFailed, match="not enough disk space"):
        ck.save_checkpoint(args, 2, BigEngine(1_200_000), 16)
    # ...and a checkpoint larger than its predecessor fails in torch's writer, which is caught as well.
    (root / "global_step1" / "mp_rank_00_model_states.pt").write_bytes(b"")  # make the previous one look small
    (tiny_fs / "filler").write_bytes(b"0" * 1_200_000)  # without giving its space back
    with pytest.raises(ck.CheckpointSaveFailed, match="could not write checkpoint .*global_step3.tmp"):
        ck.save_checkpoint(args, 3, BigEngine(1_200_000), 24)
    assert names(root) == ["global_step1", "latest"] and (root / "latest").read_text() == "global_step1"


def test_trainer_save_goes_on_or_exits_by_config(tmp_path):
    from megatron.training import EXIT_SAVE_FAILED, Trainer

    lines = []
    logger = types.SimpleNamespace(print=lines.append)
    scheduler = types.SimpleNamespace(state_dict=lambda: {})
    for policy in ("continue", "exit"):
        args = make_args(tmp_path / policy, checkpoint_save_failure=policy)
        trainer = Trainer.__new__(Trainer)
        trainer.args, trainer.engine, trainer.scheduler, trainer.logger = \
            args, FailingEngine(OSError(errno.ENOSPC, "No space left on device")), scheduler, logger
        if policy == "continue":
            trainer.save(1, 8)
            assert "training goes on" in lines[-1]
        else:
            with pytest.raises(SystemExit) as exc:
                trainer.save(1, 8)
            assert exc.value.code == EXIT_SAVE_FAILED == 3 and "stopping" in lines[-1]


# --------------------------------------------------------------------------------------------- layout
def layout_args(**over):
    """A resolved config of a 2-rank ZeRO-1 run; ``over`` changes fields of it (another layout)."""
    from megatron.neox_arguments import Environment, NeoXArgs

    args = NeoXArgs.from_dict(dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
                                   padded_vocab_size=128, USE_ORIGINAL_FULL_ATTEN=True, no_weight_tying=True,
                                   num_gpus=2, zero_optimization={"stage": 1}, pipe_parallel_size=0,
                                   train_micro_batch_size_per_gpu=1),
                              env=Environment(cuda_device_count=0, environ={}))
    for key, value in over.items():
        setattr(args, key, value)
    return args


def saved_checkpoint(tmp_path, **over):
    ckpt = tmp_path / "global_step2"
    (ckpt / "configs").mkdir(parents=True)
    args = layout_args(**over)
    cl.write_layout(str(ckpt), cl.layout_of(args))
    args.save_resolved(str(ckpt / "configs" / "resolved_config.yml"))
    return str(ckpt)


def test_resume_plan_by_layout(tmp_path):
    ckpt = saved_checkpoint(tmp_path)  # 2 ranks, sequential, ZeRO-1
    assert cl.resume_plan(layout_args(), ckpt) == (True, cl.layout_of(layout_args()))
    one = dict(global_num_gpus=1, data_parallel_size=1)
    with pytest.raises(ConfigError) as err:
        cl.resume_plan(layout_args(**one), ckpt)
    assert str(err.value) == (
        f"key 'load': checkpoint {ckpt} was saved with world size 2 (data parallel 2, sequential model, model parallel "
        "1, ZeRO stage 1); this run has world size 1 (data parallel 1, sequential model, model parallel 1, ZeRO stage "
        "1), and ZeRO stage 1 partitions the optimizer state over the 2 data-parallel ranks and DeepSpeed cannot "
        "re-partition it. Resume the weights with a fresh optimizer (set 'no_load_optim: true' to keep the iteration "
        "count, or 'finetune: true' to restart at iteration 0), or keep the optimizer state by converting the "
        f"checkpoint: python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state --input_folder {ckpt} "
        f"--output_folder {tmp_path}_universal/global_step2, then set 'load: {tmp_path}_universal/global_step2' and "
        "'checkpoint: {load_universal: true}', or run in the saved layout")
    universal = dict(checkpoint={"load_universal": True}, **one)
    with pytest.raises(ConfigError, match=r"'checkpoint.load_universal' is true, but .* is not a universal checkpoint "
                                          r"\(no zero/ folder\); convert it: python -m deepspeed"):
        cl.resume_plan(layout_args(**universal), ckpt)
    os.mkdir(os.path.join(ckpt, "zero"))
    assert cl.resume_plan(layout_args(**universal), ckpt)[0] is True
    assert cl.resume_plan(layout_args(no_load_optim=True, **one), ckpt)[0] is False
    assert cl.resume_plan(layout_args(finetune=True, **one), ckpt)[0] is False
    with pytest.raises(ConfigError, match="pipeline and sequential checkpoints"):
        cl.resume_plan(layout_args(pipe_parallel_size=1, data_parallel_size=2), ckpt)
    with pytest.raises(ConfigError, match=r"the ZeRO stage changes \(1 -> 2\)"):
        cl.resume_plan(layout_args(zero_stage=2), ckpt)


def test_zero0_data_parallel_change_keeps_the_optimizer_but_pipeline_stages_do_not(tmp_path):
    ckpt = saved_checkpoint(tmp_path, zero_stage=0, pipe_parallel_size=2, data_parallel_size=1)
    assert cl.resume_plan(layout_args(zero_stage=0, pipe_parallel_size=2, data_parallel_size=1, global_num_gpus=2),
                          ckpt)[0]
    assert cl.resume_plan(layout_args(zero_stage=0, pipe_parallel_size=2, data_parallel_size=2, global_num_gpus=4),
                          ckpt)[0]
    with pytest.raises(ConfigError, match="split by pipeline stage"):
        cl.resume_plan(layout_args(zero_stage=0, pipe_parallel_size=1, data_parallel_size=1, global_num_gpus=1), ckpt)


def test_model_keys_must_match(tmp_path):
    ckpt = saved_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match=f"key 'num_layers' is 3, but checkpoint {ckpt} was saved with "
                                          "num_layers=2"):
        cl.resume_plan(layout_args(num_layers=3, finetune=True), ckpt)


def test_damaged_files_are_named(tmp_path):
    ckpt = tmp_path / "global_step2"
    ckpt.mkdir()
    layout = cl.Layout(world_size=1, data_parallel_size=1, pipe_parallel_size=1, model_parallel_size=1, zero_stage=0)
    config = {"num_layers": 2, "no_weight_tying": True}
    for i in (0, 2, 3, 5, 6):
        torch.save({"w": torch.ones(3)}, ckpt / f"layer_{i:02d}-model_00-model_states.pt")
    torch.save({"module": None}, ckpt / "mp_rank_00_model_states.pt")
    cl.check_files(str(ckpt), layout, config)
    os.unlink(ckpt / "layer_03-model_00-model_states.pt")
    with pytest.raises(CheckpointError, match=f"missing checkpoint file {ckpt / 'layer_03-model_00-model_states.pt'}"):
        cl.check_files(str(ckpt), layout, config)
    torch.save({"w": torch.ones(3)}, ckpt / "layer_03-model_00-model_states.pt")
    path = ckpt / "layer_02-model_00-model_states.pt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=f"checkpoint file {path} is truncated or corrupt"):
        cl.check_files(str(ckpt), layout, config)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"checkpoint file {path} is empty"):
        cl.check_files(str(ckpt), layout, config)


def test_weights_load_into_another_layout_with_shapes_checked(tmp_path):
    """A pipeline checkpoint's layer files into the sequential model (the same module objects, layer by layer)."""
    from megatron.model.utils import SequentialWrapper

    def model(hidden):
        return SequentialWrapper([torch.nn.Embedding(10, hidden), ck_lambda(), torch.nn.Linear(hidden, hidden)])

    def ck_lambda():
        from megatron.model.utils import Lambda

        return Lambda(lambda x: x)

    source = model(4)
    ckpt = tmp_path / "global_step2"
    ckpt.mkdir()
    torch.save(source.sequential[0].state_dict(), ckpt / "layer_00-model_00-model_states.pt")
    torch.save(source.sequential[2].state_dict(), ckpt / "layer_02-model_00-model_states.pt")
    torch.save({"module": None, "iteration": 2, "consumed_train_samples": 16}, ckpt / "mp_rank_00_model_states.pt")
    target = model(4)
    engine = types.SimpleNamespace(module=target, optimizer=None)
    args = layout_args(zero_stage=0, num_layers=0)
    client = cl.load_weights_any_layout(engine, str(ckpt), args)
    assert client["iteration"] == 2
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match=r"layer_00-model_00-model_states.pt: tensor 'weight' of layer 0 has "
                                              r"shape \[10, 4\] in the checkpoint, but this run's model expects "
                                              r"\[10, 8\]"):
        cl.load_weights_any_layout(types.SimpleNamespace(module=model(8), optimizer=None), str(ckpt), args)


def test_launcher_check_is_for_training_only(tmp_path):
    ckpt = saved_checkpoint(tmp_path)  # 2 ranks, ZeRO-1
    one = dict(global_num_gpus=1, data_parallel_size=1, load=ckpt)
    with pytest.raises(ConfigError, match="^key 'load': checkpoint .* was saved with world size 2"):
        cl.check_resume_before_launch(layout_args(user_script="/x/train.py", **one))
    # generate.py / eval.py read the weights through their own readers, in any layout.
    cl.check_resume_before_launch(layout_args(user_script="/x/generate.py", **one))
    os.unlink(os.path.join(ckpt, "layout.json"))
    os.unlink(os.path.join(ckpt, "configs", "resolved_config.yml"))  # taken for GPT-NeoX's: layout from its files
    with pytest.raises(ConfigError, match="^key 'load': .*global_step2 holds neither layer_XX"):  # and it has none
        cl.check_resume_before_launch(layout_args(user_script="/x/train.py", **one))


class Killed(BaseException):
    """A kill: not an Exception, so no handler of the code under test runs (only `finally` blocks)."""


def _complete(path):
    return all(os.path.exists(os.path.join(path, n)) for n in
               ("configs/resolved_config.yml", "layout.json", "mp_rank_00_model_states.pt", "rng_state/rank_00000.pt"))


@pytest.mark.parametrize("earlier", [False, True], ids=["first_save", "later_save"])
def test_a_kill_at_every_file_operation_of_a_save_leaves_a_consistent_directory(tmp_path, monkeypatch, earlier):
    """Kills the save at its 1st, 2nd, ... file-system operation (opens, writes, fsyncs, renames, removals) until
    one save runs through: after each, `latest` is absent or names a complete checkpoint, every global_step<N>
    directory is complete, and the next save succeeds and leaves no leftovers."""
    import builtins
    import shutil

    ops = {"os": ("open", "rename", "replace", "makedirs", "mkdir", "fsync", "unlink", "remove", "rmdir"),
           "shutil": ("rmtree", "copyfile"), "torch": ("save",), "builtins": ("open",)}
    modules = {"os": os, "shutil": shutil, "torch": torch, "builtins": builtins}
    kills = 0
    for k in range(1, 500):
        args = make_args(tmp_path / str(k))
        root = tmp_path / str(k) / "ckpt"
        if earlier:
            ck.save_checkpoint(args, 2, FakeEngine(), 16)
        count = [0]
        with monkeypatch.context() as m:
            for mod, names_ in ops.items():
                for name in names_:
                    real = getattr(modules[mod], name)

                    def op(*a, _real=real, **kw):
                        count[0] += 1
                        if count[0] == k:
                            raise Killed()
                        return _real(*a, **kw)

                    m.setattr(modules[mod], name, op)
            try:
                ck.save_checkpoint(args, 4, FakeEngine(), 32)
                finished = True
            except Killed:
                finished = False
        if finished:
            break
        kills += 1
        latest = root / "latest"
        if latest.exists():
            assert latest.read_text() in ("global_step2", "global_step4") and _complete(root / latest.read_text()), k
        else:
            assert not earlier, k
        for path in (root.iterdir() if root.exists() else []):
            if ck.TAG_PATTERN.match(path.name):
                assert _complete(path), (k, path)
        ck.save_checkpoint(args, 6, FakeEngine(), 48)
        assert ck.stale_temporaries(str(root)) == [] and latest.read_text() == "global_step6", k
    assert kills > 10, kills  # the save was really cut at each of its operations
    print(f"{kills} kill points checked")


def test_vocabulary_size_is_compared_where_it_is_known(tmp_path):
    ckpt = saved_checkpoint(tmp_path, padded_vocab_size=512)
    assert cl.resume_plan(layout_args(padded_vocab_size=None), ckpt)[0]  # a launcher that could not build it
    with pytest.raises(ConfigError, match="key 'padded_vocab_size' is 1024, but checkpoint .* padded_vocab_size=512"):
        cl.resume_plan(layout_args(padded_vocab_size=1024), ckpt)


def test_a_load_deepspeed_fails_on_names_the_tensor_and_both_shapes(tmp_path):
    args = make_args(tmp_path)
    ck.save_checkpoint(args, 2, FakeEngine(), 16)

    class ShapeEngine(FakeEngine):
        def load_checkpoint(self, *a, **kw):
            torch.nn.Linear(4, 4).load_state_dict({"weight": torch.zeros(8, 4), "bias": torch.zeros(4)})

    args.load = args.save
    with pytest.raises(CheckpointError, match=r"could not be loaded: RuntimeError: size mismatch for weight: copying a "
                                              r"param with shape torch.Size\(\[8, 4\]\) from checkpoint, the shape in "
                                              r"current model is torch.Size\(\[4, 4\]\)"):
        ck.load_checkpoint(args, ShapeEngine())
