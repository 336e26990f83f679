"""Worker: metrics summed over workers, held-out evaluation, progress lines and MLflow logging (rank 0).

Evaluation (held-out split, no noise): the loss parts, top-1 accuracy a_d at every depth d = 1..2k of two drafter
passes (depths 1..k teacher-forced, pass 0; depths k+1..2k from pass 1, which reads the drafter's own outputs for
the previous block as decoding feeds them, falcon.passes), and the expected acceptance length of a chain draft of
depth D = max_passes x k, counting the target's bonus token:

    tau_chain = 1 + sum_{d=1..D} prod_{i=1..d} a_i,   a_i for i > 2k repeating pass 1's a_{k+1..2k}

It treats each depth as accepted independently, so it is a proxy to compare runs; the tree tuner replays the
real decode. Throughput ("tokens/s") counts window tokens, padding excluded, summed over all workers.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from falcon.csgd import csgd_eval_metrics
from falcon.drafter import Drafter
from pipelines.train.batches import batch_loader
from pipelines.train.plan import TrainPlan


def all_reduce_sum(values: dict[str, float], device) -> dict[str, float]:
    """Element-wise sum of the same keys over all workers."""
    names = sorted(values)
    tensor = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(names, tensor.tolist(), strict=True))


def chain_acceptance_length(acc_by_depth: Sequence[float], depth: int, block_size: int) -> float:
    """tau_chain = 1 + sum_{d=1..depth} prod_{i<=d} a_i: expected accepted tokens, bonus included.

    acc_by_depth: top-1 at depths 1..m (m a multiple of block_size); deeper passes read the drafter's own
    outputs like the last measured one, so depths past m repeat its last block of accuracies.
    """
    measured, k = len(acc_by_depth), block_size
    tau, all_accepted = 1.0, 1.0
    for d in range(depth):
        accuracy = acc_by_depth[d if d < measured else measured - k + (d - measured) % k]
        all_accepted *= 0.0 if math.isnan(accuracy) else accuracy
        tau += all_accepted
    return tau


@torch.no_grad()
def evaluate(module: Drafter, dataset, batches, plan: TrainPlan, lm_head_weight, device) -> dict[str, float]:
    """Held-out metrics over all workers: loss parts, top-1 by block position and by depth, tau_chain."""
    module.eval()
    k = module.config.block_size
    depths = range(1, 2 * k + 1)  # top-1 at every depth of two drafter passes (pass 0: depths 1..k)
    sums = {"positions": 0.0, **{f"{name}_sum": 0.0 for name in ("loss", "reg", "dist", "kl", "ce")},
            **{f"correct_{d}": 0.0 for d in depths}, **{f"count_{d}": 0.0 for d in depths}}
    for batch in batch_loader(dataset, batches, plan.config.loader_workers):
        metrics = csgd_eval_metrics(module, batch, plan.config.csgd, lm_head_weight)
        positions = float(metrics["num_positions"])
        sums["positions"] += positions
        for name in ("loss", "reg", "dist", "kl", "ce"):
            sums[f"{name}_sum"] += float(metrics[name]) * positions
        for d in depths:
            sums[f"correct_{d}"] += float(metrics["top1_depth_correct"][d - 1])
            sums[f"count_{d}"] += float(metrics["top1_depth_count"][d - 1])
    module.train()
    totals = all_reduce_sum(sums, device)
    positions = max(totals["positions"], 1.0)
    by_depth = [totals[f"correct_{d}"] / totals[f"count_{d}"] if totals[f"count_{d}"] else math.nan for d in depths]
    accuracy = by_depth[:k]  # pass 0, teacher-forced: by block position
    result = {f"eval/{name}": totals[f"{name}_sum"] / positions for name in ("loss", "reg", "dist", "kl", "ce")}
    result.update({f"eval/top1_pos{j + 1}": accuracy[j] for j in range(k)})
    result.update({f"eval/top1_depth_{d}": by_depth[d - 1] for d in depths})
    result["eval/top1"] = sum(totals[f"correct_{d}"] for d in depths[:k]) / positions
    result["eval/tau_chain"] = chain_acceptance_length(by_depth, module.config.max_tree_depth, k)
    result["eval/positions"] = totals["positions"]
    return result


class MlflowLogger:
    """Metrics into the driver's MLflow run (rank 0 only); a no-op without a run."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.client = None
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(key.replace("/", "."), float(value), now, step)
                   for key, value in metrics.items() if isinstance(value, (int, float)) and math.isfinite(value)]
        self.client.log_batch(self.run_id, metrics=entries)


class ProgressMeter:
    """Training metrics between two log lines, summed over workers when flushed; throughput and ETA."""

    PARTS = ("loss", "top1", "reg", "kl", "ce")
    LINES = 20  # progress lines per run, however long: the job log stays one screen (MLflow gets every record)

    def __init__(self, plan: TrainPlan, start_step: int, device):
        self.plan, self.start_step, self.device = plan, start_step, device
        self.session_start = time.perf_counter()
        self.restart_interval()

    def restart_interval(self) -> None:
        self.sums = dict.fromkeys((*self.PARTS, "micro_batches", "tokens"), 0.0)
        self.glance_ratio: float | None = None
        self.pass1 = dict.fromkeys(("pass1_loss", "pass1_top1", "pass1_micro_batches"), 0.0)
        self.interval_start = time.perf_counter()

    def discount(self, seconds: float) -> None:
        """Leave `seconds` of the current interval out of its throughput."""
        self.interval_start += seconds

    def add(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        self.sums["micro_batches"] += 1
        self.sums["tokens"] += float(batch["attention_mask"].sum())
        for name in self.PARTS:
            self.sums[name] += float(out[name].detach())
        if "glance_ratio" in out:
            self.glance_ratio = float(out["glance_ratio"])
        if "pass1_loss" in out:  # the pass-1 objective is on (from csgd.pass1_start)
            self.pass1["pass1_micro_batches"] += 1
            self.pass1["pass1_loss"] += float(out["pass1_loss"])
            self.pass1["pass1_top1"] += float(out["pass1_top1"])

    def flush(self, step: int, lr: float, nonfinite_steps: int) -> dict[str, float]:
        """The interval's record (a collective: every worker calls it at the same steps); its loss parts are NaN
        when every step of the interval was skipped for a non-finite loss."""
        totals = all_reduce_sum({**self.sums, **self.pass1}, self.device)
        elapsed = time.perf_counter() - self.interval_start
        trained = totals["micro_batches"]
        record = {"step": step, "seconds": elapsed, "tokens": totals["tokens"],
                  "train/tokens_per_s": totals["tokens"] / max(elapsed, 1e-9), "train/lr": lr,
                  "train/epoch": step / self.plan.steps_per_epoch, "train/nonfinite_steps": nonfinite_steps,
                  **{f"train/{name}": totals[name] / trained if trained else math.nan for name in self.PARTS}}
        if self.glance_ratio is not None:
            record["train/glance_ratio"] = self.glance_ratio
        if totals["pass1_micro_batches"]:
            record.update({f"train/{name}": totals[name] / totals["pass1_micro_batches"]
                           for name in ("pass1_loss", "pass1_top1")})
        self.restart_interval()
        return record

    def due(self, step: int) -> bool:
        """Whether the record flushed at `step` gets a progress line: the first, about every 1/LINES of the
        run, and the last."""
        every = self.plan.config.log_every
        stride = max(every, math.ceil(self.plan.total_steps / self.LINES / every) * every)
        return step - self.start_step <= every or step % stride == 0 or step == self.plan.total_steps

    def line(self, record: dict[str, float]) -> str:
        step, total = int(record["step"]), self.plan.total_steps
        eta = (time.perf_counter() - self.session_start) / max(1, step - self.start_step) * (total - step)
        skipped = record["train/nonfinite_steps"]
        skipped = f" | {skipped} non-finite steps skipped" if skipped else ""
        return (f"train: step {step}/{total} epoch {record['train/epoch']:.2f} | loss {record['train/loss']:.4f} "
                f"top1 {record['train/top1']:.3f} | {record['train/tokens_per_s']:,.0f} tok/s | "
                f"ETA {format_duration(eta)}{skipped}")


def progress(message: str) -> None:
    """One line in the job log. Written to the process's real stdout: Ray Train's print patch would log it
    and, with stdout wrapped by another library, print it a second time."""
    sys.__stdout__.write(message + "\n")
    sys.__stdout__.flush()


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def report_eval(metrics: dict[str, float], step: int, logger: MlflowLogger, rank: int) -> None:
    if rank != 0:
        return
    logger.log(metrics, step)
    by_position = " ".join(f"{metrics[key]:.3f}" for key in sorted(metrics) if key.startswith("eval/top1_pos"))
    progress(f"eval: step {step} | loss {metrics['eval/loss']:.4f} | top-1 by block position {by_position} | "
             f"tau_chain {metrics['eval/tau_chain']:.2f}")


def checkpoint_metrics(step: int, history: list[dict[str, float]], last_eval: dict[str, float],
                       engine_info: dict[str, Any], digest: float, nonfinite_steps: int) -> dict[str, Any]:
    latest = history[-1] if history else {}
    return {"step": step, **{k: v for k, v in latest.items() if k.startswith("train/")}, **last_eval,
            **engine_info, "optimizer_digest": digest, "nonfinite_steps": nonfinite_steps}
