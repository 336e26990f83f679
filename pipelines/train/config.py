"""The training config (`TrainConfig`, the `train` section of a run's YAML), its errors and the run's file names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from falcon.csgd import CSGDConfig
from falcon.devices import DTYPES
from falcon.errors import FalconError
from pipelines.ray_utils import RayConfig
from pipelines.tracking import MlflowConfig

LR_SCHEDULES = ("constant", "cosine")


ENGINE_TAG = "engine"  # DeepSpeed's sub-directory inside every checkpoint


PLAN_FILE = "plan.json"


DRAFTER_DIR = "drafter"


MLFLOW_RUN_ID_FILE = "mlflow_run_id"


SUMMARY_FILE = "summary.json"


RUN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it committed


# Settings that leave the trained weights unchanged (where the run reads and writes, how it is scheduled,
# logged and checked); every other TrainConfig field, new ones included, is part of the resume key.
RESUME_IGNORED = (
    "store", "run_dir", "target", "trust_remote_code", "storage_path", "storage_options", "checkpoint_every",
    "keep_checkpoints", "log_every", "eval_max_windows", "verify_store", "loader_workers", "max_failures",
    "max_nonfinite_steps", "mlflow", "ray", "scaling.use_gpu", "scaling.cpus_per_worker", "scaling.gpus_per_worker",
    "scaling.backend", "scaling.torch_threads",
)


class TrainSetupError(FalconError, ValueError):
    """Training cannot start as configured; the message names the problem and what to do."""


class TrainingDivergedError(TrainSetupError):
    """Training met more non-finite losses than allowed, or made non-finite weights; the message says what to do."""


@dataclass
class DrafterSection:
    block_size: int = 2  # k; 1 is the EAGLE-style autoregressive ablation
    num_layers: int = 1
    lstm_layers: int = 2
    draft_vocab_size: int | None = None  # None: the full target vocabulary
    max_passes: int = 4  # drafter passes per decoding step; sets the chain depth of tau_chain


@dataclass
class OptimizerSection:
    lr: float = 3e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.5  # max global gradient norm; 0 disables clipping
    warmup_steps: int = 0
    schedule: str = "constant"  # after warm-up: "constant" or "cosine" (down to min_lr_ratio x lr)
    min_lr_ratio: float = 0.1


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2
    micro_batch_size: int = 4  # windows per worker per forward
    gradient_accumulation_steps: int = 1


@dataclass
class ScalingSection:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu
    backend: str | None = None  # torch.distributed backend; None: nccl with GPUs, gloo without
    torch_threads: int | None = None  # intra-op threads per worker; None: cpus_per_worker (at least 1)


@dataclass
class TrainConfig:
    store: str  # feature store URL (local path or fsspec URL)
    run_dir: str  # checkpoints, the exported drafter and the summary; the Ray Train run is its basename
    target: str | None = None  # falcon.target.load_target spec; None: the default SmolLM2-135M-Instruct
    trust_remote_code: bool = False
    dtype: str = "bfloat16"  # training precision: float32 | bfloat16 | float16 (DeepSpeed bf16 / fp16)
    eval_fraction: float = 0.05
    split_seed: int = 0
    max_len: int = 2048  # tokens per training window
    # Prompt tokens kept before a sample's first loss token (null: all). They carry no loss and the target's
    # features already summarise them; on the demo store 64 cut the tokens a step processes by a third.
    context_tokens: int | None = None
    epochs: int = 20
    max_steps: int | None = None  # stop after this many optimizer steps (also shortens the schedules)
    seed: int = 0
    checkpoint_every: int = 500  # optimizer steps; checkpoints are also taken at each epoch end
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_max_windows: int | None = None  # evaluate on at most this many held-out windows (fixed subset)
    verify_store: bool = True  # re-read and checksum every shard before training
    loader_workers: int = 0  # DataLoader processes per worker reading the store
    # Flush float32 denormals to zero on CPU: without it a CSGD step was measured 15x slower here, the
    # second pass feeding the drafter's own tiny outputs back through the LSTM.
    flush_denormal: bool = True
    max_failures: int = 0  # worker-group restarts from the latest checkpoint before the run fails
    max_nonfinite_steps: int = 10  # optimizer steps skipped for a non-finite loss before the run stops
    storage_path: str | None = None  # Ray Train storage; None: the parent of run_dir (local)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for the store URL
    drafter: DrafterSection = field(default_factory=DrafterSection)
    csgd: CSGDConfig = field(default_factory=CSGDConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="falcon-drafter-train"))
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        positive = {
            "max_len": self.max_len, "epochs": self.epochs, "checkpoint_every": self.checkpoint_every,
            "keep_checkpoints": self.keep_checkpoints, "log_every": self.log_every,
            "drafter.block_size": self.drafter.block_size, "drafter.num_layers": self.drafter.num_layers,
            "drafter.lstm_layers": self.drafter.lstm_layers, "drafter.max_passes": self.drafter.max_passes,
            "deepspeed.micro_batch_size": self.deepspeed.micro_batch_size,
            "deepspeed.gradient_accumulation_steps": self.deepspeed.gradient_accumulation_steps,
            "scaling.num_workers": self.scaling.num_workers,
        }
        checks = [(value >= 1, f"{name} must be >= 1, got {value}") for name, value in positive.items()]
        checks += [
            (self.dtype in DTYPES, f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"),
            (0.0 < self.eval_fraction < 1.0, f"eval_fraction must be in (0, 1), got {self.eval_fraction}"),
            (self.max_len >= self.drafter.block_size + 2,
             f"max_len {self.max_len} leaves no supervised position for block size {self.drafter.block_size}"),
            (self.context_tokens is None or self.context_tokens >= 0, "context_tokens must be >= 0 or null"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 or null, got {self.max_steps}"),
            (self.eval_max_windows is None or self.eval_max_windows >= 1, "eval_max_windows must be >= 1 or null"),
            (self.drafter.draft_vocab_size is None or self.drafter.draft_vocab_size >= 1,
             "drafter.draft_vocab_size must be >= 1 or null"),
            (self.deepspeed.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage must be 0-3, got {self.deepspeed.zero_stage}"),
            (self.optimizer.lr > 0, f"optimizer.lr must be > 0, got {self.optimizer.lr}"),
            (len(self.optimizer.betas) == 2 and all(0 <= b < 1 for b in self.optimizer.betas),
             f"optimizer.betas must be two numbers in [0, 1), got {self.optimizer.betas}"),
            (self.optimizer.grad_clip >= 0, "optimizer.grad_clip must be >= 0"),
            (self.optimizer.warmup_steps >= 0, "optimizer.warmup_steps must be >= 0"),
            (self.optimizer.schedule in LR_SCHEDULES, f"optimizer.schedule must be one of {LR_SCHEDULES}"),
            (0 <= self.optimizer.min_lr_ratio <= 1, "optimizer.min_lr_ratio must be in [0, 1]"),
            (self.loader_workers >= 0, "loader_workers must be >= 0"),
            (self.max_failures >= 0, "max_failures must be >= 0"),
            (self.max_nonfinite_steps >= 0, f"max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}"),
            (self.scaling.cpus_per_worker >= 0 and self.scaling.gpus_per_worker >= 0,
             "scaling.cpus_per_worker and scaling.gpus_per_worker must be >= 0"),
            (self.dtype != "float16" or self.scaling.use_gpu, "dtype float16 needs GPUs; use float32 or bfloat16"),
            (bool(self.run_dir), "run_dir must be set"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def backend(self) -> str:
        return self.scaling.backend or ("nccl" if self.scaling.use_gpu else "gloo")


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat
