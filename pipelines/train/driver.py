"""Driver: the MLflow run, Ray Train's `TorchTrainer` over `train_loop_per_worker`, the exported drafter.

Re-running with the same `run_dir` resumes from the latest checkpoint Ray Train committed to its run snapshot
(RunConfig(name, storage_path)), or returns the summary of a run that already trained every step and exported its
drafter without starting Ray Train; after a kill -9 that can be one report older than the newest checkpoint
directory, and the steps in between are redone with the same batches. `fresh=True` deletes the run directory
first (after the inputs were checked). A drafter whose weights are not all finite is never exported.

Outputs in `run_dir`: Ray Train's checkpoints, `drafter/` (safetensors + drafter_config.json with the target
fingerprint; the draft vocabulary map is the `draft_to_target` tensor; train_info.json), `summary.json`, and
`mlflow_run_id`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from falcon.drafter import WEIGHTS_FILE
from pipelines.tracking import ensure_experiment, redact
from pipelines.train.config import (
    DRAFTER_DIR,
    MLFLOW_RUN_ID_FILE,
    SUMMARY_FILE,
    TrainConfig,
    TrainingDivergedError,
    TrainSetupError,
    flatten,
)
from pipelines.train.metrics import format_duration
from pipelines.train.plan import TrainPlan, committed_checkpoint, prepare_run
from pipelines.train.worker import train_loop_per_worker


def make_trainer(plan: TrainPlan):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = plan.config.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend=plan.config.backend),
        run_config=RunConfig(
            name=plan.run_name,
            storage_path=plan.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=plan.config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=plan.config.max_failures),
        ),
    )


def run_training(config: TrainConfig, *, fresh: bool = False) -> dict[str, Any]:
    """Validate, train on Ray Train + DeepSpeed (resuming if run_dir holds a checkpoint), export, summarise."""
    from pipelines.ray_utils import ray_session

    started = time.perf_counter()
    plan = prepare_run(config, fresh=fresh)
    if fresh and Path(plan.run_dir).exists():  # only once the inputs are known to be good
        print(f"train: --fresh: removing {plan.run_dir}", file=sys.stderr)
        shutil.rmtree(plan.run_dir)
    finished = None if fresh else finished_run(plan)
    if finished is not None:  # nothing to train: no Ray Train workers started, nothing logged again
        print(f"train: the run in {plan.run_dir} already trained its {plan.total_steps} steps and exported "
              f"{finished['drafter_dir']} (--fresh trains it again)", file=sys.stderr)
        return finished
    plan.mlflow_run_id = open_mlflow_run(plan)
    print(f"train: target {plan.target_fingerprint}, {len(plan.train_indices)} training / "
          f"{len(plan.eval_indices)} held-out samples, {plan.total_steps} steps on "
          f"{config.scaling.num_workers} worker(s); run directory {plan.run_dir}", file=sys.stderr)
    try:
        with ray_session(config.ray):
            result = make_trainer(plan).fit()
        drafter_dir = export_drafter(result.checkpoint, plan.run_dir)
    except BaseException as error:
        _finish_mlflow_run(plan, "FAILED")
        diverged = diverged_worker_error(error)
        if diverged is not None:
            raise diverged from None
        raise
    outcome = result.return_value or {}
    summary = {
        "run_dir": plan.run_dir,
        "drafter_dir": str(drafter_dir),
        "mlflow_run_id": plan.mlflow_run_id,
        "mlflow_tracking_uri": redact(plan.mlflow_tracking_uri),
        "target_fingerprint": plan.target_fingerprint,
        "steps": plan.total_steps,
        "start_step": outcome.get("start_step"),
        "nonfinite_steps": outcome.get("nonfinite_steps"),
        "eval": outcome.get("eval") or (result.metrics or {}),
        "engine": {key: outcome.get(key) for key in ("engine", "zero_stage", "world_size", "dtype", "device")},
        "seconds": time.perf_counter() - started,
    }
    _finish_mlflow_run(plan, "FINISHED", drafter_dir)
    # Last: a summary marks the run finished, and a re-run returns it (finished_run) without training again.
    Path(plan.run_dir, SUMMARY_FILE).write_text(json.dumps(redact(summary), indent=2, default=str) + "\n")
    print(f"train: done in {format_duration(summary['seconds'])}; drafter {drafter_dir}; "
          f"MLflow run {plan.mlflow_run_id} ({summary['mlflow_tracking_uri']})")
    return {**summary, "result": outcome}


def finished_run(plan: TrainPlan) -> dict[str, Any] | None:
    """The summary of an earlier run of this plan (prepare_run checked its settings) that trained every step and
    exported its drafter; None when there is anything left to do."""
    committed = committed_checkpoint(plan)
    summary_path = Path(plan.run_dir, SUMMARY_FILE)
    if committed is None or committed[1].get("step") != plan.total_steps or not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("steps") != plan.total_steps or not Path(summary["drafter_dir"], WEIGHTS_FILE).is_file():
        return None
    return {**summary, "result": {"start_step": plan.total_steps, "end_step": plan.total_steps, "reused": True}}


def open_mlflow_run(plan: TrainPlan) -> str | None:
    """The run's MLflow run id: the one recorded in run_dir when resuming, else a new run with the params."""
    if plan.mlflow_tracking_uri is None:
        return None
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(plan.mlflow_tracking_uri)
    id_file = Path(plan.run_dir, MLFLOW_RUN_ID_FILE)
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        return run_id
    experiment_id = ensure_experiment(client, plan.config.mlflow.experiment, plan.mlflow_tracking_uri)
    run = client.create_run(experiment_id, run_name=plan.run_name, tags={"falcon.job": "train_csgd"})
    entries = [Param(key, value[:6000]) for key, value in mlflow_params(plan).items()]
    for start in range(0, len(entries), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=entries[start:start + 100])
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run.info.run_id + "\n")
    return run.info.run_id


def mlflow_params(plan: TrainPlan) -> dict[str, str]:
    """The run's MLflow params: the config (no credentials) and the plan's sizes."""
    params = flatten({"config": redact(dataclasses.asdict(plan.config))})
    params.update({
        "target_fingerprint": plan.target_fingerprint, "target_dir": plan.target_dir,
        "train_samples": str(len(plan.train_indices)), "eval_samples": str(len(plan.eval_indices)),
        "train_windows": str(plan.num_train_windows), "eval_windows": str(plan.num_eval_windows),
        "steps_per_epoch": str(plan.steps_per_epoch), "total_steps": str(plan.total_steps),
    })
    return params


def diverged_worker_error(error: BaseException) -> TrainingDivergedError | None:
    """The TrainingDivergedError a worker stopped the run with, out of Ray Train's wrapping, if that was the cause."""
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        cause = getattr(failure, "_base_exc", failure)  # Ray Train's UserExceptionWithTraceback holds it there
        if isinstance(cause, TrainingDivergedError):
            return cause
    return None


def export_drafter(checkpoint, run_dir: str) -> Path:
    """Copy the drafter exported in the final Ray Train checkpoint to run_dir/drafter, unless a weight is not
    finite (then nothing is copied)."""
    if checkpoint is None:
        raise TrainSetupError(f"the run in {run_dir} reported no checkpoint")
    destination = Path(run_dir, DRAFTER_DIR)
    with checkpoint.as_directory() as directory:
        source = Path(directory, DRAFTER_DIR)
        if not source.is_dir():
            raise TrainSetupError(
                f"the latest checkpoint of {run_dir} has no exported drafter (max_steps lowered below a "
                "checkpoint taken earlier?); raise max_steps or pass --fresh")
        broken = non_finite_tensors(source)
        if broken:
            raise TrainingDivergedError(
                f"the drafter of the run in {run_dir} has weights that are not finite ({', '.join(broken[:5])}), "
                "so it was not exported; check the store for extreme values or lower optimizer.lr, then pass --fresh")
        if destination.exists():
            shutil.rmtree(destination)
        shutil.copytree(source, destination)
    return destination


def non_finite_tensors(drafter_dir: Path) -> list[str]:
    """Names of the saved drafter's tensors holding NaN or inf."""
    from safetensors.torch import load_file

    weights = load_file(str(drafter_dir / WEIGHTS_FILE))
    return sorted(name for name, tensor in weights.items() if not bool(torch.isfinite(tensor).all()))


def _finish_mlflow_run(plan: TrainPlan, status: str, drafter_dir: Path | None = None) -> None:
    if plan.mlflow_run_id is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(plan.mlflow_tracking_uri)
    if drafter_dir is not None:
        client.log_artifacts(plan.mlflow_run_id, str(drafter_dir), DRAFTER_DIR)
    client.set_terminated(plan.mlflow_run_id, status)
