"""CSGD training of a Falcon drafter on Ray Train + DeepSpeed, reading a feature store.

The recipe, top to bottom, one module per stage:

1. `config`: the `train` section (`TrainConfig`) and the run's file names.
2. `plan.prepare_run` (driver, before any worker starts): fingerprint the target, check the store and the split,
   build the draft vocabulary, size the run, refuse to resume a checkpoint made with other settings.
3. `driver.run_training`: open the MLflow run, run a `TorchTrainer` whose workers execute
   `worker.train_loop_per_worker`, copy the exported drafter out of the final checkpoint, log it to MLflow.
4. `worker` (each Ray Train worker) with `engine` (drafter, DeepSpeed engine, checkpoints) and `metrics`
   (held-out evaluation, progress, MLflow metrics).

Schedules run over the planned steps (`epochs` x steps per epoch, cut by `max_steps`): the learning rate
(linear warm-up, then constant or cosine) and CSGD's glancing ratio, which falls with the training progress
p = step / planned steps (falcon.csgd.glance_ratio: 0.4 (1 - p) in the paper, 0.35 (1 - p) + 0.1 officially).

Teacher: the target's top-k logits as the store keeps them, renormalised over those k tokens, when the store
has them (`csgd.teacher: auto`); else its LM head over the stored features, a full-vocabulary matmul that
was ~27% of a demo step on CPU (`csgd.teacher: lm_head` forces it).
"""

from pipelines.train.config import TrainConfig, TrainingDivergedError, TrainSetupError
from pipelines.train.driver import run_training

__all__ = ["TrainConfig", "TrainSetupError", "TrainingDivergedError", "run_training"]
