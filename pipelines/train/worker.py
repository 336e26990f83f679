"""Worker: `train_loop_per_worker`, what each Ray Train worker runs.

Read the target's frozen embedding and LM head straight from its safetensors files, build the drafter, wrap it
in a DeepSpeed engine, resume from `ray.train.get_checkpoint()` if there is one, and run CSGD steps
(`falcon.csgd.csgd_step`), evaluating on the held-out split every epoch and checkpointing every
`checkpoint_every` steps and at each epoch end.

Non-finite losses: every worker's losses of a step are checked before any backward and the verdict is shared,
so all workers skip the same steps (no backward, no optimizer step: NaN never reaches the weights, whatever the
ZeRO stage). Skipped steps are counted (`train/nonfinite_steps`, carried in checkpoints); beyond
`max_nonfinite_steps` the run stops with a `TrainingDivergedError`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from falcon.csgd import csgd_step
from falcon.devices import DTYPES
from falcon.drafter import Drafter
from pipelines.tracking import redact
from pipelines.train.batches import (
    batch_loader,
    epoch_batches,
    eval_batches,
    step_generator,
    training_windows,
)
from pipelines.train.config import TrainingDivergedError
from pipelines.train.engine import (
    build_drafter,
    load_frozen_embedding_and_head,
    optimizer_digest,
    restore,
    save_and_report,
    start_engine,
)
from pipelines.train.metrics import (
    MlflowLogger,
    ProgressMeter,
    all_reduce_sum,
    checkpoint_metrics,
    evaluate,
    progress,
    report_eval,
)
from pipelines.train.plan import TrainPlan


def prepare_worker(plan: TrainPlan, device: torch.device, threads: int) -> tuple[Drafter, torch.Tensor]:
    """What every worker (and bench_train's bare loop) starts from: its torch threads, denormals flushed, the
    target's frozen embedding and LM head read from safetensors, a fresh drafter; and the full LM head weight,
    the teacher when the store has no top-k logits."""
    torch.set_num_threads(threads)
    if plan.config.flush_denormal:
        torch.set_flush_denormal(True)
    dtype = DTYPES[plan.config.dtype]
    embedding, head = load_frozen_embedding_and_head(plan.head_source, device, dtype)
    return build_drafter(plan, embedding, head, device, dtype), head.weight.detach()


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    plan: TrainPlan = loop_config["plan"]
    config = plan.config
    # Before DeepSpeed is imported: it compiles a communication op on first use and caches it there.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", plan.torch_extensions_dir)
    import ray.train
    import ray.train.torch

    from feature_store import FeatureStore

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    drafter, lm_head_weight = prepare_worker(
        plan, device, config.scaling.torch_threads or max(1, int(config.scaling.cpus_per_worker)))
    engine = start_engine(drafter, plan)
    module: Drafter = engine.module
    start_step, nonfinite_steps = restore(engine)
    resumed_digest = optimizer_digest(engine, device) if start_step else None

    store = FeatureStore.open(config.store, storage_options=config.storage_options)
    train_set = training_windows(store, plan.train_indices, config)
    eval_set = training_windows(store, plan.eval_indices, config)
    held_out = eval_batches(len(eval_set), plan, rank, world)
    logger = MlflowLogger(plan.mlflow_tracking_uri, plan.mlflow_run_id) if rank == 0 else MlflowLogger(None, None)
    engine_info = {"engine": type(engine).__name__, "zero_stage": engine.zero_optimization_stage(),
                   "world_size": world, "dtype": str(next(module.parameters()).dtype).removeprefix("torch."),
                   "device": str(device)}
    history: list[dict[str, float]] = []
    if rank == 0:
        where = f"resuming at step {start_step}" if start_step else "starting"
        progress(f"train: {where} of {plan.total_steps} ({plan.steps_per_epoch} per epoch, "
                 f"{plan.num_train_windows} training windows); {engine_info}")
    if start_step >= plan.total_steps:  # an earlier run already finished and exported
        return {"start_step": start_step, "end_step": start_step, "history": history, **engine_info,
                "resumed_optimizer_digest": resumed_digest, "nonfinite_steps": nonfinite_steps}

    gas = config.deepspeed.gradient_accumulation_steps
    step, last_eval = start_step, {}
    meter = ProgressMeter(plan, start_step, device)
    while step < plan.total_steps:
        epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
        batches = epoch_batches(len(train_set), epoch, plan, rank, world)[step_in_epoch * gas:]
        loader = batch_loader(train_set, batches, config.loader_workers)
        for _ in range(plan.steps_per_epoch - step_in_epoch):
            if not optimizer_step(engine, loader, plan, step, rank, lm_head_weight, meter):
                nonfinite_steps += 1
                skip_nonfinite_step(step + 1, nonfinite_steps, plan, logger, rank)
            step += 1
            end_of_epoch = step % plan.steps_per_epoch == 0
            if step % config.log_every == 0 or end_of_epoch or step == plan.total_steps:
                record = meter.flush(step, engine.get_lr()[0], nonfinite_steps)
                history.append(record)
                if rank == 0:
                    logger.log({key: value for key, value in record.items() if key.startswith("train/")}, step)
                    if meter.due(step):
                        progress(meter.line(record))
            if step == plan.total_steps:
                break
            if end_of_epoch or step % config.checkpoint_every == 0:
                paused_at = time.perf_counter()
                if end_of_epoch:
                    last_eval = evaluate(module, eval_set, held_out, plan, lm_head_weight, device)
                    report_eval(last_eval, step, logger, rank)
                metrics = checkpoint_metrics(step, history, last_eval, engine_info, optimizer_digest(engine, device),
                                             nonfinite_steps)
                save_and_report(engine, plan, step, metrics, rank, export_drafter=False)
                meter.discount(time.perf_counter() - paused_at)  # evaluating and saving are not training

    last_eval = evaluate(module, eval_set, held_out, plan, lm_head_weight, device)
    report_eval(last_eval, step, logger, rank)
    digest = optimizer_digest(engine, device)
    save_and_report(engine, plan, step, checkpoint_metrics(step, history, last_eval, engine_info, digest,
                                                           nonfinite_steps), rank, export_drafter=True)
    return {"start_step": start_step, "end_step": step, "history": history, "eval": last_eval, **engine_info,
            "resumed_optimizer_digest": resumed_digest, "optimizer_digest": digest, "nonfinite_steps": nonfinite_steps}


def optimizer_step(engine, loader, plan: TrainPlan, step: int, rank: int, lm_head_weight, meter: ProgressMeter) -> bool:
    """One optimizer step over its micro-batches; False, with nothing applied, when a loss was not finite.

    Every worker checks its losses before any backward and the verdict is shared, so all workers skip the same
    steps (one worker stepping alone would hang DeepSpeed's collectives). With gradient accumulation the step's
    forwards therefore all run before its backwards, holding each micro-batch's activations until then. The
    step's batches are read either way: the position in the data stays a function of the step.
    """
    config = plan.config
    generator = step_generator(config.seed, rank, step)
    micro_batches = []
    for _ in range(config.deepspeed.gradient_accumulation_steps):
        batch = next(loader)
        out = csgd_step(engine.module, batch, config.csgd, step / plan.total_steps, lm_head_weight, generator)
        micro_batches.append((out, batch))
    nonfinite = sum(not bool(torch.isfinite(out["loss"]).all()) for out, _ in micro_batches)
    if all_reduce_sum({"nonfinite": nonfinite}, lm_head_weight.device)["nonfinite"]:
        return False
    for out, batch in micro_batches:
        engine.backward(out["loss"])
        engine.step()
        meter.add(out, batch)
    return True


def skip_nonfinite_step(step: int, count: int, plan: TrainPlan, logger: MlflowLogger, rank: int) -> None:
    """Report optimizer step `step` (1-based) skipped for a non-finite loss; beyond the limit, stop the run."""
    limit = plan.config.max_nonfinite_steps
    if rank == 0:
        progress(f"train: step {step}: the loss is not finite on at least one worker, step skipped "
                 f"({count} so far, at most {limit})")
    if count > limit:
        logger.log({"train/nonfinite_steps": count}, step)
        raise TrainingDivergedError(
            f"the loss was not finite in {count} optimizer steps (the last at step {step}), more than "
            f"max_nonfinite_steps {limit}; those steps were skipped, so the weights are still finite. Look for "
            f"extreme feature values in {redact(plan.config.store)} (re-extract the shards holding them) or lower "
            "optimizer.lr; re-running resumes from the last checkpoint, or raise max_nonfinite_steps"
        )
