"""The training loop: model, optimizer and DeepSpeed engine set-up, train / evaluate / save.

``pretrain(neox_args)`` is what ``train.py`` runs on every rank. Two execution paths share everything
but the step itself:

* pipeline (``pipe_parallel_size >= 1``): the model is a DeepSpeed ``PipelineModule`` and
  ``engine.train_batch`` runs the micro-batches of one step through the pipeline schedule;
* sequential (``pipe_parallel_size == 0``): ``model.to_sequential()`` and one forward / backward /
  ``engine.step`` per micro-batch (DeepSpeed applies the optimizer at the accumulation boundary).

Bad steps: a step whose gradients are not finite is skipped (the optimizer is not applied, its state
is untouched) and counted; ``max_consecutive_bad_steps`` such steps in a row stop the run with exit
code 1 and nothing is saved past the last good checkpoint. With fp16 the loss scaler's own overflow
skips are normal and only a non-finite *loss* counts as bad.

A non-finite loss whose gradients are finite (an inf added to the loss) is made a bad step too: the
loss is multiplied by NaN when it is not finite, so every gradient is NaN on every stage and replica, and
the guard of each rank skips the step without an extra collective.

Signals: from the start of ``pretrain``, SIGTERM / SIGINT (and deepy.py's stop-request file) are recorded
(``megatron.utils.StopSignal``: repeats within a few seconds are the same request, a later repeat forces
exit 128 + signal number); at the next step boundary every rank agrees (one small all-reduce per step),
saves a checkpoint and ``pretrain`` returns 0. A request before training starts ends the run with 0 and
saves nothing. Resuming a run that already reached ``train_iters`` runs nothing and returns 0.
"""
import time
from typing import Iterator, Optional

import torch

from megatron import checkpointing
from megatron.initialize import initialize_megatron
from megatron.learning_rates import build_lr_scheduler, learning_rate
from megatron.logging import TrainingLogger, tee_text_logs
from megatron.model.loss import lm_loss
from megatron.model.sepllm.stats import KVRatioTracker
from megatron.neox_arguments.optimizer_args import TRAINER_OPTIMIZERS
from megatron.param_stats import ParameterStatistics
from megatron.utils import (StopSignal, all_reduce_max, get_ltor_masks_and_position_ids,
                            get_params_for_weight_decay_optimization, print_rank_0, stop_request_path)

EXIT_OK = 0
EXIT_BAD_STEPS = 1
EXIT_SAVE_FAILED = 3  # a checkpoint could not be written (full disk) and checkpoint_save_failure is 'exit'


# ------------------------------------------------------------------------------------------- batches
def get_batch(batch: dict, eod_token: Optional[int], eod_mask_loss: bool, device):
    """Splits ``{"text": [B, S+1]}`` into ``tokens`` (inputs), ``labels`` (next tokens), the loss mask
    and position ids, on ``device``."""
    if not isinstance(batch, dict) or "text" not in batch:
        raise ValueError(f"a training batch must be a dict with key 'text', got {type(batch).__name__}")
    text = batch["text"].to(device=device, dtype=torch.long, non_blocking=True)
    tokens = text[:, :-1].contiguous()
    labels = text[:, 1:].contiguous()
    loss_mask, position_ids = get_ltor_masks_and_position_ids(tokens, eod_token, eod_mask_loss)
    return tokens, labels, loss_mask, position_ids


def model_inputs(tokens, position_ids):
    """The model's input tuple ``(input_ids, position_ids)``: causality is implied by the attention
    layers, so no ``[B,1,S,S]`` mask is built or sent through the pipeline."""
    return tokens, position_ids


def poison_non_finite(loss: torch.Tensor) -> torch.Tensor:
    """``loss``, or NaN when it is not finite, so that its gradients are not finite either.

    An inf added to the loss leaves the gradients finite, and the optimizer would apply the step; with
    NaN gradients every stage and data-parallel replica skips it (:class:`NonFiniteStepGuard`). No host
    sync; a finite loss is multiplied by exactly 1.0, which changes no bit of it or of its gradients."""
    return loss * torch.where(torch.isfinite(loss), 1.0, float("nan")).to(loss.dtype)


def pipe_loss_fn(outputs, targets):
    """``PipelineModule.loss_fn``: ``targets`` is ``(labels, loss_mask)`` as :func:`get_batch_pipe` gives."""
    labels, loss_mask = targets
    return poison_non_finite(lm_loss(outputs, labels, loss_mask))


class PipeBatchFn:
    """``engine.set_batch_fn`` callable: raw ``{"text": ...}`` -> ``(inputs, (labels, loss_mask))``.

    ``tracker`` (a :class:`KVRatioTracker`) sees the tokens of training batches; the engine calls the same
    function for evaluation batches, during which the trainer sets ``training`` to False.
    """

    def __init__(self, eod_token, eod_mask_loss, device, tracker: Optional[KVRatioTracker] = None):
        self.eod_token, self.eod_mask_loss, self.device = eod_token, eod_mask_loss, device
        self.tracker = tracker
        self.training = True

    def __call__(self, batch):
        tokens, labels, loss_mask, position_ids = get_batch(batch, self.eod_token, self.eod_mask_loss, self.device)
        if self.training and self.tracker is not None:
            self.tracker.observe(tokens)
        return model_inputs(tokens, position_ids), (labels, loss_mask)


# ----------------------------------------------------------------------------------------- optimizer
class NonFiniteStepGuard:
    """Wraps the basic optimizer's ``step`` so a step with non-finite gradients is not applied.

    DeepSpeed calls the basic optimizer's ``step`` from every wrapper (ZeRO, bf16, fp16), so the guard
    sees the gradients the update would use. A NaN loss makes every gradient NaN (and the data-parallel
    all-reduce spreads it), so all ranks reach the same decision without an extra collective.
    """

    def __init__(self, optimizer, group=None):
        self.optimizer = optimizer
        self._step = optimizer.step
        optimizer.step = self.step
        # Ranks that hold different parameters (tensor-parallel shards, pipeline stages) decide together: a
        # gradient that overflowed in one rank's shard only must stop the step on every rank, or the replicated
        # parameters would be stepped on some ranks and not on others.
        self.group = group
        self.skipped = False
        self.grad_norm: Optional[torch.Tensor] = None
        # Per-parameter statistics read inside the step (megatron/param_stats.py); None unless configured.
        self.stats = None

    def reset(self) -> None:
        self.skipped = False

    def _flag_device(self):
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                return p.device
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    @torch.no_grad()
    def step(self, *args, **kwargs):
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = None
        if grads:
            # One multi-tensor kernel for all per-tensor norms, then their norm (fp32).
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
            self.grad_norm = norm
            finite = torch.isfinite(norm)
        if self.group is not None:
            device = grads[0].device if grads else self._flag_device()
            bad = torch.zeros((), dtype=torch.float32, device=device) if finite is None else (~finite).float()
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX, group=self.group)
            finite = bad == 0
        # One host sync per step: the decision to skip must be taken on the host.
        if finite is not None and not bool(finite):
            self.skipped = True
            return None
        if self.stats is not None:
            self.stats.capture()
        return self._step(*args, **kwargs)


def optimizer_spec(neox_args):
    """``(kind, params)``: the derived ``optimizer_type`` and the ``optimizer.params`` the config gives."""
    params = dict((neox_args.optimizer or {}).get("params") or {})
    return neox_args.optimizer_type, params


def build_optimizer(neox_args, model: torch.nn.Module, device):
    """The trainer's optimizer: ``Adam``/``AdamW`` -> torch AdamW (decoupled weight decay, as GPT-NeoX's
    apex FusedAdam in adam_w_mode), fused kernels on CUDA."""
    kind, params = optimizer_spec(neox_args)
    if kind not in TRAINER_OPTIMIZERS:
        raise ValueError(f"optimizer.type={kind!r}: the trainer builds Adam/AdamW; other types must be "
                         "handed to DeepSpeed through the config's optimizer section")
    groups = get_params_for_weight_decay_optimization(model, neox_args.weight_decay)
    # Adam's own defaults where the config gives no value (GPT-NeoX's FusedAdam has the same).
    betas = tuple(params.get("betas", (0.9, 0.999)))
    eps = float(params.get("eps", 1e-8))
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=learning_rate(neox_args), betas=betas, eps=eps, **kwargs)


def deepspeed_config_dict(neox_args) -> dict:
    cfg = neox_args.deepspeed_config()
    bf16 = cfg.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled") and "check_grad_overflow" not in bf16:
        # DeepSpeed's bf16 overflow check (ZeRO paths) tests every gradient tensor with a host sync each;
        # the trainer's NonFiniteStepGuard makes the same decision once per step.
        cfg["bf16"] = dict(bf16, check_grad_overflow=False)
    if "scheduler" in cfg:
        raise ValueError("the DeepSpeed config has a 'scheduler' section; the learning-rate schedule is the "
                         "trainer's (lr_decay_style, warmup, lr_decay_iters, min_lr)")
    return cfg


def build_model(neox_args, topology):
    from megatron.model import GPT2ModelPipe

    # Vocabulary-parallel logits: the loss (megatron/mpu/cross_entropy.py) never gathers them.
    model = GPT2ModelPipe(neox_args, topology=topology, parallel_output=True)
    if not neox_args.is_pipe_parallel:
        return model.to_sequential(), False
    model.loss_fn = pipe_loss_fn
    return model, True


def _record_fp32_clip_norm(engine) -> None:
    """Keeps the pre-clipping gradient norm DeepSpeed computes when it clips fp32 gradients without ZeRO
    (it discards it there; the ZeRO/bf16/fp16 optimizers keep theirs). The norm stays a device tensor."""
    if engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization() \
            or not engine.gradient_clipping() > 0.0:
        return
    from deepspeed.runtime.utils import clip_grad_norm_

    from megatron import mpu

    # Replicated parameters counted once per tensor-parallel group on every stage (megatron/mpu/grads.py).
    groups = mpu.ClipGroups(engine.mpu) if engine.mpu is not None else None

    def clip_fp32_gradients():
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=groups)

    engine.clip_fp32_gradients = clip_fp32_gradients


def _fast_bf16_overflow_check(engine) -> None:
    """DeepSpeed wraps bf16 without ZeRO or pipeline in its FP16_Optimizer, whose overflow check tests
    every gradient tensor with a host sync each (~150 per step for Pythia-160M: a third of the step time
    on an H100). The same answer comes from one multi-tensor norm and one sync. bf16 only: there a norm
    overflows only if the gradients themselves are not finite (fp16 keeps DeepSpeed's element check)."""
    checker = getattr(engine.optimizer, "overflow_checker", None)
    if not engine.bfloat16_enabled() or checker is None:
        return

    def has_overflow_serial(params):
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return False
        return not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).float().sum()))

    checker.has_overflow_serial = has_overflow_serial


def setup_model_and_optimizer(neox_args, topology, device):
    """Builds the model, the optimizer, the DeepSpeed engine and the LR scheduler.

    Returns ``(engine, scheduler, guard, is_pipe)``.
    """
    import deepspeed

    from megatron import mpu

    model, is_pipe = build_model(neox_args, topology)
    ds_config = deepspeed_config_dict(neox_args)
    # The pipeline engine takes its grid from the PipelineModule; the sequential model needs it passed, or
    # DeepSpeed would average gradients (and broadcast weights) over the tensor-parallel ranks too.
    grid = None if is_pipe else mpu.get_grid()
    if "optimizer" in ds_config:
        # DeepSpeed builds it (DeepSpeed-only types, or use_deepspeed_optimizer).
        groups = get_params_for_weight_decay_optimization(model, neox_args.weight_decay)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                               dist_init_required=False, mpu=grid)
    else:
        optimizer = build_optimizer(neox_args, model, device)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                               dist_init_required=False, mpu=grid)
    _record_fp32_clip_norm(engine)
    _fast_bf16_overflow_check(engine)
    basic = engine.basic_optimizer if getattr(engine, "basic_optimizer", None) is not None else engine.optimizer
    grid = mpu.get_grid()
    # The ranks of one data-parallel replica (pipe x tensor), when there are several.
    group = grid.get_model_parallel_group() if grid is not None and grid.get_model_parallel_world_size() > 1 else None
    guard = NonFiniteStepGuard(basic, group=group)
    stats = ParameterStatistics(engine.module, basic, neox_args)
    guard.stats = stats if stats.enabled else None
    scheduler = build_lr_scheduler(neox_args, basic)
    return engine, scheduler, guard, is_pipe


# ----------------------------------------------------------------------------------------------- steps
def train_step_sequential(engine, data_iter: Iterator, neox_args, eod_token, device,
                          tracker: Optional[KVRatioTracker] = None) -> torch.Tensor:
    """One optimizer step as ``gradient_accumulation_steps`` forward/backward passes; returns the
    mean micro-batch loss (a device tensor, not synchronised). ``tracker`` sees each micro-batch's tokens."""
    losses = []
    for _ in range(neox_args.gradient_accumulation_steps):
        tokens, labels, loss_mask, position_ids = get_batch(next(data_iter), eod_token,
                                                            neox_args.eod_mask_loss, device)
        if tracker is not None:
            tracker.observe(tokens)
        logits = engine(model_inputs(tokens, position_ids))
        loss = poison_non_finite(lm_loss(logits, labels, loss_mask))
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate(engine, data_source, neox_args, eod_token, device, is_pipe: bool) -> Optional[float]:
    """Mean loss over ``eval_iters`` steps' worth of micro-batches (averaged over data-parallel ranks)."""
    if data_source is None or not neox_args.eval_iters:
        return None
    data_iter = data_source if hasattr(data_source, "__next__") else iter(data_source)
    total = torch.zeros((), dtype=torch.float32, device=device)
    count = 0
    if is_pipe:
        for _ in range(neox_args.eval_iters):
            # Stages other than the last receive the loss by broadcast, shaped [1].
            total += engine.eval_batch(data_iter=data_iter).detach().float().reshape(()).to(device)
            count += 1
        return float(total / max(count, 1))
    engine.eval()
    try:
        for _ in range(neox_args.eval_iters):
            for _ in range(neox_args.gradient_accumulation_steps):
                tokens, labels, loss_mask, position_ids = get_batch(
                    next(data_iter), eod_token, neox_args.eod_mask_loss, device)
                total += lm_loss(engine(model_inputs(tokens, position_ids)), labels, loss_mask).float()
                count += 1
    finally:
        engine.train()
    mean = total / max(count, 1)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(mean)
        mean /= torch.distributed.get_world_size()
    return float(mean)


def _loss_scale(engine) -> Optional[float]:
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(opt, attr, None)
        if isinstance(value, (int, float)) or torch.is_tensor(value):
            return float(value)
    return None


def _grad_norm(engine, guard: NonFiniteStepGuard, is_pipe: bool, pipe_stages: int,
               model_parallel_size: int = 1) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    # The guard sees this rank's whole gradient only without ZeRO partitioning, pipeline stages and
    # tensor-parallel shards.
    if guard.grad_norm is not None and engine.zero_optimization_stage() == 0 and (not is_pipe or pipe_stages == 1) \
            and model_parallel_size == 1:
        return float(guard.grad_norm)
    return None


# -------------------------------------------------------------------------------------------- driver
class Trainer:
    """Holds the state of one training run on one rank."""

    def __init__(self, neox_args, engine, scheduler, guard, is_pipe, device, eod_token, logger: TrainingLogger):
        self.args = neox_args
        self.engine, self.scheduler, self.guard = engine, scheduler, guard
        self.is_pipe, self.device, self.eod = is_pipe, device, eod_token
        self.logger = logger
        self.fp16 = neox_args.precision == "fp16"
        self.pipe_stages = neox_args.pipe_stages
        # PRINT_KV_RATIO: the statistics of the training micro-batches this rank reads (rank 0 logs its own).
        tracker = KVRatioTracker(neox_args)
        self.kv_tracker = tracker if tracker.enabled else None
        self.batch_fn = PipeBatchFn(eod_token, neox_args.eod_mask_loss, device, self.kv_tracker) if is_pipe else None

    def save(self, iteration: int, consumed: int) -> None:
        start = time.perf_counter()
        try:
            # num_iters as GPT-NeoX counts it, steps taken (the scheduler here holds the last step's rate); a
            # resume here takes the position from the iteration anyway.
            schedule = dict(self.scheduler.state_dict(), num_iters=int(iteration))
            path = checkpointing.save_checkpoint(self.args, iteration, self.engine, consumed,
                                                 {"lr_scheduler": schedule})
        except checkpointing.CheckpointSaveFailed as exc:
            # Every rank gets the same failure, so all of them go on or stop together.
            if self.args.checkpoint_save_failure == "continue":
                self.logger.print(f"checkpoint save failed, training goes on (checkpoint_save_failure: continue): {exc}")
                return
            self.logger.print(f"checkpoint save failed, stopping (checkpoint_save_failure: exit): {exc}")
            raise SystemExit(EXIT_SAVE_FAILED) from None
        self.logger.print(f"saved checkpoint {path} at iteration {iteration} ({time.perf_counter() - start:.1f} s)")

    def run_eval(self, iteration: int, data_source, split: str) -> Optional[float]:
        if self.batch_fn is not None:
            self.batch_fn.training = False
        try:
            loss = evaluate(self.engine, data_source, self.args, self.eod, self.device, self.is_pipe)
        finally:
            if self.batch_fn is not None:
                self.batch_fn.training = True
        if loss is not None:
            self.logger.log_evaluation(iteration, split, loss)
        return loss

    def train(self, train_iter, valid_iter, iteration: int, consumed: int, stop: Optional[StopSignal] = None) -> int:
        """Runs until ``train_iters``, a stop request, ``exit_interval`` or too many bad steps.

        ``stop``: the request ``pretrain`` installed at start-up; without one, signals are handled from here
        on. Returns the process exit code.
        """
        args, engine = self.args, self.engine
        own_stop = stop is None
        if own_stop:
            stop = StopSignal().install()
        if self.is_pipe:
            engine.set_batch_fn(self.batch_fn)
        engine.train()
        log_interval, eval_interval = args.log_interval, args.eval_interval
        exit_interval = args.exit_interval or 0
        max_bad = args.max_consecutive_bad_steps
        # Losses stay on the device between log lines; only the log interval synchronises them.
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        good_in_interval, iters_in_interval, skipped_in_interval, consecutive_bad = 0, 0, 0, 0
        interval_start = time.perf_counter()
        try:
            while iteration < args.train_iters:
                lr = self.scheduler.step(iteration)
                self.guard.reset()
                if self.guard.stats is not None and (iteration + 1) % log_interval == 0:
                    self.guard.stats.arm()
                if self.is_pipe:
                    loss = engine.train_batch(data_iter=train_iter).detach().float().reshape(()).to(self.device)
                else:
                    loss = train_step_sequential(engine, train_iter, args, self.eod, self.device,
                                                 self.kv_tracker).float()
                iteration += 1
                args.iteration = iteration
                consumed += args.train_batch_size
                if self.fp16:
                    bad = not bool(torch.isfinite(loss))
                else:
                    bad = self.guard.skipped or not engine.was_step_applied()
                bad_any, stop_any = all_reduce_max([float(bad), float(stop.requested)], self.device)
                iters_in_interval += 1
                if bad_any:
                    consecutive_bad += 1
                    skipped_in_interval += 1
                    self.logger.print(f"iteration {iteration}: non-finite loss/gradients, step skipped "
                                      f"({consecutive_bad} in a row)")
                    if max_bad and consecutive_bad >= max_bad:
                        self.logger.print(f"stopping: {consecutive_bad} consecutive bad steps "
                                          f"(max_consecutive_bad_steps={max_bad}); nothing saved after the last "
                                          "good checkpoint")
                        return EXIT_BAD_STEPS
                else:
                    consecutive_bad = 0
                    loss_sum += loss
                    good_in_interval += 1

                if iteration % log_interval == 0:
                    self._log(iteration, lr, loss_sum, good_in_interval, skipped_in_interval,
                              iters_in_interval, time.perf_counter() - interval_start)
                    loss_sum.zero_()
                    good_in_interval, iters_in_interval, skipped_in_interval = 0, 0, 0
                    interval_start = time.perf_counter()

                stopping = bool(stop_any) or (exit_interval and iteration % exit_interval == 0)
                # A skipped step left the weights as they were; its scheduled save is skipped too so that
                # checkpoints are only written after good steps (a stop request still saves).
                scheduled = not bad_any and (checkpointing.should_save(args, iteration)
                                             or iteration == args.train_iters)
                if args.save and (stopping or scheduled):
                    self.save(iteration, consumed)
                if stopping:
                    why = stop.name if stop_any else f"exit_interval={exit_interval}"
                    if stop_any and not stop.requested:
                        why = "a stop request on another rank"
                    self.logger.print(f"exiting at iteration {iteration} on {why}"
                                      + ("" if args.save else " (no 'save' directory: nothing saved)"))
                    return EXIT_OK
                if eval_interval and iteration % eval_interval == 0 and valid_iter is not None:
                    self.run_eval(iteration, valid_iter, "validation")
                    interval_start = time.perf_counter()
        finally:
            if own_stop:
                stop.restore()
        return EXIT_OK

    def _log(self, iteration, lr, loss_sum, good, skipped, iters, elapsed) -> None:
        loss = loss_sum.clone()
        if not self.is_pipe and torch.distributed.is_initialized():
            # The pipeline engine already averages over data-parallel ranks; the sequential path does not.
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
        metrics = {"learning_rate": lr, "skipped_iters": skipped}
        if good:  # an interval of only skipped steps has no loss to report
            metrics["lm_loss"] = float(loss) / good
        norm = _grad_norm(self.engine, self.guard, self.is_pipe, self.pipe_stages, self.args.model_parallel_size)
        if norm is not None:
            metrics["grad_norm"] = norm
        scale = _loss_scale(self.engine)
        if scale is not None:
            metrics["loss_scale"] = scale
        if self.kv_tracker is not None:
            metrics.update({f"sepllm/{k}": v for k, v in self.kv_tracker.report_if_due().items()})
        self.logger.log_training(iteration, metrics, iters, elapsed)
        if self.guard.stats is not None:
            # Hundreds of per-parameter values: dashboards only, under GPT-NeoX's names, not the console line.
            self.logger.log_scalars(iteration, self.guard.stats.collect(), prefix=None)


def _eod_token(tokenizer) -> Optional[int]:
    """The end-of-document id (None for a SentencePiece model without one)."""
    return None if tokenizer.eod is None else int(tokenizer.eod)


def pretrain(neox_args) -> int:
    """Trains the model ``neox_args`` describes; returns the exit code (0 done, already complete or stopped
    cleanly, 1 stopped after too many bad steps)."""
    # Installed first, so that a signal during start-up (model build, checkpoint load) stops the run cleanly.
    stop_file = stop_request_path(neox_args.neox_config_file) if neox_args.neox_config_file else None
    stop = StopSignal(stop_file).install()
    try:
        return _pretrain(neox_args, stop)
    finally:
        stop.restore()


def _pretrain(neox_args, stop: StopSignal) -> int:
    topology, device = initialize_megatron(neox_args)
    tee_text_logs(neox_args.log_dir, neox_args.rank)
    from megatron.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(neox_args)
    engine, scheduler, guard, is_pipe = setup_model_and_optimizer(neox_args, topology, device)
    iteration, consumed = 0, 0
    if neox_args.load:
        load_iter, load_consumed = checkpointing.load_checkpoint(
            neox_args, engine, load_optimizer_states=not neox_args.no_load_optim and not neox_args.finetune,
            scheduler=None if neox_args.finetune else scheduler)
        if not neox_args.finetune:
            iteration, consumed = load_iter, load_consumed
        print_rank_0(f"loaded checkpoint from {neox_args.load} at iteration {load_iter}")
    neox_args.iteration = iteration
    if iteration >= neox_args.train_iters:
        # A requeued job that had finished: its final save, evaluation and test already ran.
        print_rank_0(f"training is complete: the checkpoint is at iteration {iteration}, train_iters is "
                     f"{neox_args.train_iters}; nothing to run")
        return EXIT_OK
    if consumed != iteration * neox_args.train_batch_size:
        raise ValueError(f"the checkpoint consumed {consumed} samples in {iteration} iterations, which does not "
                         f"match train_batch_size={neox_args.train_batch_size}; resuming with a different global "
                         "batch size would replay or skip data")

    from megatron.data.data_utils import build_train_valid_test_data_iterators

    # Starting a DataLoader iterator draws its base seed from the default stream, after a resume's RNG restore;
    # the stream training (dropout) uses is the one the checkpoint saved, on a fresh run and a resumed one alike.
    rng = checkpointing.get_rng_state()
    train_iter, valid_iter, test_iter = build_train_valid_test_data_iterators(neox_args)
    checkpointing.set_rng_state(rng)
    # Every rank must take the same branch: a request seen by one rank only would leave the others waiting
    # in their first collective.
    if all_reduce_max([float(stop.requested)], device)[0]:
        print_rank_0(f"stop requested before training started ({stop.name or 'on another rank'}): exiting, "
                     "nothing trained, nothing saved")
        return EXIT_OK
    rank = torch.distributed.get_rank()
    logger = TrainingLogger(neox_args, rank=rank)
    trainer = Trainer(neox_args, engine, scheduler, guard, is_pipe, device, _eod_token(tokenizer), logger)
    try:
        if iteration == 0 and 0 in checkpointing.checkpoint_iterations(neox_args) and neox_args.save:
            trainer.save(0, 0)
        if train_iter is None:
            raise ValueError("no training data: the train split is empty (check data paths and 'split')")
        code = trainer.train(train_iter, valid_iter, iteration, consumed, stop=stop)
        if code == EXIT_OK and neox_args.iteration >= neox_args.train_iters:
            if valid_iter is not None and neox_args.eval_interval \
                    and neox_args.iteration % neox_args.eval_interval != 0:
                trainer.run_eval(neox_args.iteration, valid_iter, "validation")
            trainer.run_eval(neox_args.iteration, test_iter, "test")
    finally:
        logger.close()
    return code
