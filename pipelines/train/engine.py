"""Worker: the drafter and its DeepSpeed engine, checkpoints written and restored through Ray Train.

Checkpoints (`ray.train.report`): every worker writes `engine.save_checkpoint` (module weights, its ZeRO optimizer
partition, LR scheduler, step) into one directory that Ray Train merges in persistent storage; rank 0 adds
`plan.json` (what the checkpoint was made for) and, in the final one, the exported drafter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from falcon.drafter import Drafter, DrafterConfig, save_drafter
from pipelines.drafter_record import TrainingRecord, write_training_record
from pipelines.tracking import redact
from pipelines.train.config import (
    DRAFTER_DIR,
    ENGINE_TAG,
    PLAN_FILE,
    OptimizerSection,
    TrainConfig,
)
from pipelines.train.metrics import all_reduce_sum
from pipelines.train.plan import HeadSource, TrainPlan


def load_frozen_embedding_and_head(source: HeadSource, device, dtype) -> tuple[nn.Embedding, nn.Linear]:
    """The target's input embedding and LM head as frozen modules, read from safetensors (nothing else)."""
    from safetensors import safe_open

    def read(path: str, name: str) -> torch.Tensor:
        with safe_open(path, framework="pt") as file:
            return file.get_tensor(name).to(device=device, dtype=dtype)

    embed_weight = read(source.embed_file, source.embed_name)
    head_weight = embed_weight if source.head_name == source.embed_name else read(source.head_file, source.head_name)
    embedding = nn.Embedding.from_pretrained(embed_weight, freeze=True)
    head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=source.bias_name is not None, device="meta")
    head.weight = nn.Parameter(head_weight, requires_grad=False)
    if source.bias_name is not None:
        head.bias = nn.Parameter(read(source.head_file, source.bias_name), requires_grad=False)
    return embedding, head


def build_drafter(plan: TrainPlan, embedding: nn.Embedding, head: nn.Linear, device, dtype) -> Drafter:
    """A freshly initialised drafter (same weights on every worker), draft vocabulary set, target attached."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.config.seed)
        drafter = Drafter(DrafterConfig(**plan.drafter_config))
    if plan.draft_vocab is not None:
        drafter.set_draft_vocab(torch.tensor(plan.draft_vocab))
    drafter.to(device=device, dtype=dtype)
    return drafter.attach_target(embedding, head)


def deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """Our config in DeepSpeed's terms."""
    return {
        "train_micro_batch_size_per_gpu": config.deepspeed.micro_batch_size,
        "gradient_accumulation_steps": config.deepspeed.gradient_accumulation_steps,
        "gradient_clipping": config.optimizer.grad_clip,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "bf16": {"enabled": config.dtype == "bfloat16"},
        "fp16": {"enabled": config.dtype == "float16"},
        "steps_per_print": 2**31 - 1,  # we print our own progress lines
        "wall_clock_breakdown": False,
    }


def lr_factor(step: int, total_steps: int, optimizer: OptimizerSection) -> float:
    """Learning-rate multiplier before optimizer step `step` (0-based)."""
    if step < optimizer.warmup_steps:
        return (step + 1) / optimizer.warmup_steps
    if optimizer.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optimizer.warmup_steps) / max(1, total_steps - optimizer.warmup_steps))
    return optimizer.min_lr_ratio + (1 - optimizer.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def start_engine(drafter: Drafter, plan: TrainPlan):
    """DeepSpeed engine over the drafter's trainable weights, with a torch AdamW and the LR schedule."""
    import deepspeed

    optimizer_config = plan.config.optimizer
    trainable = [parameter for parameter in drafter.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=optimizer_config.lr, betas=tuple(optimizer_config.betas),
                                  eps=optimizer_config.eps, weight_decay=optimizer_config.weight_decay)

    def schedule(wrapped_optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            wrapped_optimizer, lambda step: lr_factor(step, plan.total_steps, optimizer_config))

    engine, _, _, _ = deepspeed.initialize(model=drafter, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(plan.config))
    return engine


def optimizer_digest(engine, device) -> float:
    """A fingerprint of the optimizer state summed over workers (moments and step counts), to check resumes."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch AdamW inside ZeRO
    total = 0.0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.double().abs().sum().item()
    return all_reduce_sum({"digest": total}, device)["digest"]


def save_and_report(engine, plan: TrainPlan, step: int, metrics: dict[str, Any], rank: int,
                    export_drafter: bool) -> None:
    """Every worker writes its part of the engine state; Ray Train merges them into one checkpoint."""
    import deepspeed
    import ray.train

    with tempfile.TemporaryDirectory(prefix="falcon-ckpt-") as directory:
        engine.save_checkpoint(directory, tag=ENGINE_TAG,
                               client_state={"step": step, "nonfinite_steps": metrics["nonfinite_steps"]})
        # ZeRO-3 holds each weight in pieces: gather them (a no-op for stages 0-2) to export whole tensors.
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if rank == 0:
                Path(directory, PLAN_FILE).write_text(json.dumps({"step": step, "resume_key": plan.resume_key()},
                                                                 indent=2, default=str))
                if export_drafter:
                    export_dir = save_drafter(engine.module, Path(directory, DRAFTER_DIR))
                    write_training_record(export_dir, training_record(plan, step, metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"checkpoint_step{step:09d}")


def training_record(plan: TrainPlan, step: int, metrics: dict[str, Any]) -> TrainingRecord:
    """What the exported drafter says of its training (pipelines.drafter_record; credentials are removed)."""
    config = plan.config
    return TrainingRecord(store=redact(config.store), eval_fraction=config.eval_fraction,
                          split_seed=config.split_seed, step=step, target_dir=plan.target_dir,
                          mlflow_run_id=plan.mlflow_run_id, mlflow_tracking_uri=redact(plan.mlflow_tracking_uri),
                          metrics=metrics, config=redact(dataclasses.asdict(config)))


def restore(engine) -> tuple[int, int]:
    """Load the latest checkpoint Ray Train hands this run, if any; return the optimizer step to start at and
    the steps skipped so far for a non-finite loss."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as directory:
        path, client_state = engine.load_checkpoint(directory, tag=ENGINE_TAG)
    if path is None:
        raise RuntimeError(f"checkpoint {checkpoint.path} holds no DeepSpeed engine state")
    return int(client_state["step"]), int(client_state.get("nonfinite_steps", 0))
