"""Training throughput: Ray Train + DeepSpeed against a bare single-process torch loop doing the same CSGD steps.

    python -m pipelines.bench_train --config jobs/configs/smollm2-demo.yaml [--steps 12] [--warmup 3]

Cases, all on the config's store, drafter, precision and micro-batch size, each for warmup + steps optimizer
steps (throughput over the last `steps` only):
  bare     one process, torch AdamW + clipping, no Ray, no DeepSpeed, all CPUs as torch threads
  ray-1    Ray Train + DeepSpeed (the config's ZeRO stage), 1 worker holding all CPUs
  ray-2    Ray Train + DeepSpeed, 2 workers with half the CPUs each
Throughput = window tokens (padding excluded) per second of training steps, summed over workers; data reading
is inside the timed steps in every case. Writes bench_train.json and bench_train.md under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from falcon.csgd import csgd_step
from pipelines.ray_utils import ray_session
from pipelines.run_config import load_stage
from pipelines.train import TrainConfig, run_training
from pipelines.train.batches import batch_loader, epoch_batches, step_generator, training_windows
from pipelines.train.plan import TrainPlan, prepare_run
from pipelines.train.worker import prepare_worker


def bare_loop_tokens_per_s(plan: TrainPlan, warmup: int, steps: int, threads: int) -> dict[str, Any]:
    """The same CSGD steps as one Ray Train worker, in this process, without Ray or DeepSpeed."""
    from feature_store import FeatureStore

    config = plan.config
    drafter, lm_head_weight = prepare_worker(plan, torch.device("cpu"), threads)
    drafter.train()
    trainable = [parameter for parameter in drafter.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.optimizer.lr, betas=tuple(config.optimizer.betas),
                                  eps=config.optimizer.eps, weight_decay=config.optimizer.weight_decay)
    store = FeatureStore.open(config.store, storage_options=config.storage_options)
    dataset = training_windows(store, plan.train_indices, config)
    gas = config.deepspeed.gradient_accumulation_steps
    loader = (batch for epoch in range(config.epochs)
              for batch in batch_loader(dataset, epoch_batches(len(dataset), epoch, plan, 0, 1), config.loader_workers))
    tokens, seconds = 0.0, 0.0
    for step in range(warmup + steps):
        start = time.perf_counter()
        generator = step_generator(config.seed, 0, step)
        step_tokens = 0.0
        for _ in range(gas):
            batch = next(loader)
            out = csgd_step(drafter, batch, config.csgd, step / plan.total_steps, lm_head_weight, generator)
            (out["loss"] / gas).backward()
            step_tokens += float(batch["attention_mask"].sum())
        if config.optimizer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if step >= warmup:
            tokens, seconds = tokens + step_tokens, seconds + elapsed
        print(f"bench bare: step {step + 1}/{warmup + steps} {step_tokens / elapsed:,.0f} tok/s", flush=True)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def ray_tokens_per_s(config: TrainConfig, warmup: int, steps: int) -> dict[str, Any]:
    """A real training run (fresh, no MLflow, no intermediate checkpoints), timed from its per-step records."""
    summary = run_training(config, fresh=True)
    history = summary["result"]["history"]
    timed = [record for record in history if record["step"] > warmup]
    if len(timed) != steps:
        raise RuntimeError(f"expected {steps} timed steps, the run logged {len(timed)}")
    tokens, seconds = sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "engine": summary["engine"]}


def bench_config(config: TrainConfig, out_dir: Path, case: str, workers: int, cpus: int, total_steps: int) -> TrainConfig:
    scaling = dataclasses.replace(config.scaling, num_workers=workers, cpus_per_worker=cpus // workers,
                                  torch_threads=None)
    return dataclasses.replace(
        config, run_dir=str(out_dir / case), max_steps=total_steps, log_every=1, checkpoint_every=10**9,
        eval_max_windows=2 * workers * config.deepspeed.micro_batch_size, scaling=scaling,
        mlflow=dataclasses.replace(config.mlflow, enabled=False),
    )


def markdown(report: dict[str, Any]) -> str:
    cases = report["cases"]
    bare = cases["bare"]["tokens_per_s"]
    lines = [
        f"# Training throughput: {report['config']}",
        "",
        f"{report['steps']} timed optimizer steps after {report['warmup']} warm-up steps; micro batch "
        f"{report['micro_batch_size']} windows of <= {report['max_len']} tokens per worker, dtype {report['dtype']}, "
        f"{report['cpus']} CPUs; tokens = window tokens without padding, summed over workers.",
        "",
        "| case | tokens/s | vs bare loop |",
        "|---|---:|---:|",
    ]
    for name, case in cases.items():
        lines.append(f"| {name} | {case['tokens_per_s']:,.0f} | {case['tokens_per_s'] / bare:.0%} |")
    lines += ["", f"Ray Train + DeepSpeed, 2 workers vs 1: {report['two_vs_one_worker']:.2f}x.",
              f"Load average before / after: {report['load_before']} / {report['load_after']} "
              "(other processes on the machine skew every figure).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="runs/bench/train")
    args = parser.parse_args(argv)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = load_stage("train", args.config, args.overrides)
    total_steps = args.warmup + args.steps
    load_before = [round(x, 2) for x in os.getloadavg()]

    cases: dict[str, dict[str, Any]] = {}
    plan = prepare_run(bench_config(config, out_dir, "bare", 1, args.cpus, total_steps), fresh=True)
    cases["bare"] = bare_loop_tokens_per_s(plan, args.warmup, args.steps, args.cpus)
    with ray_session(config.ray):
        for case, workers in (("ray-1", 1), ("ray-2", 2)):
            cases[case] = ray_tokens_per_s(bench_config(config, out_dir, case, workers, args.cpus, total_steps),
                                           args.warmup, args.steps)

    report = {
        "config": args.config, "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup,
        "cpus": args.cpus, "dtype": config.dtype, "max_len": config.max_len,
        "micro_batch_size": config.deepspeed.micro_batch_size, "zero_stage": config.deepspeed.zero_stage,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "cases": cases,
        "ray_1_vs_bare": cases["ray-1"]["tokens_per_s"] / cases["bare"]["tokens_per_s"],
        "two_vs_one_worker": cases["ray-2"]["tokens_per_s"] / cases["ray-1"]["tokens_per_s"],
        "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    (out_dir / "bench_train.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "bench_train.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
