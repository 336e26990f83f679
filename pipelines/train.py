"""CSGD training of a Falcon drafter on Ray Train + DeepSpeed, reading a feature store.

The recipe, top to bottom:

1. `prepare_run` (driver, before any worker starts): load the target once to fingerprint it, open the store
   expecting that fingerprint, verify every shard, split train / held-out, build the draft vocabulary from the
   training split's token counts, size the run (steps per epoch, total steps) and check that the checkpoint a
   re-run would resume from was made with the same training settings (`TrainPlan.resume_key`). Any problem is
   a `TrainSetupError` naming it.
2. `run_training` (driver): open the MLflow run, start or join Ray, run a `TorchTrainer` whose workers execute
   `train_loop_per_worker`, then copy the exported drafter out of the final checkpoint into the run directory
   and log it to MLflow.
3. `train_loop_per_worker` (each Ray Train worker): read the target's frozen embedding and LM head straight
   from its safetensors files, build the drafter, wrap it in a DeepSpeed engine (ZeRO stage, precision,
   clipping and accumulation from the config; a torch AdamW so no DeepSpeed op is compiled for the
   optimizer), resume from `ray.train.get_checkpoint()` if there is one, and run CSGD steps
   (`falcon.csgd.csgd_step`), evaluating on the held-out split every epoch.

Data: a deterministic distributed sampler over max_len windows of the training samples (`FeatureDataset`).
Each epoch the windows are shuffled with a seed derived from (seed, epoch); worker r takes every world-th
window of that order, and each worker reads its own windows from the store by random access. This was chosen
over Ray Data streaming ingest because the position in the data is then a pure function of the optimizer
step: a resumed run continues with exactly the batches it would have seen (Ray Data's streaming split cannot
be resumed mid-epoch), no extra Ray Data actors compete for the CPUs, and nothing is copied through the object
store. The last `len(windows) mod (world x micro_batch x accumulation)` windows of each shuffled epoch are
left out (a different few each epoch) so that every worker runs the same number of steps.

Randomness: the noise and the glancing draw of step s on worker r come from a generator seeded with
(seed, r, s), so no RNG state needs saving and a resumed run draws exactly what an uninterrupted one would.
The drafter's initial weights come from `seed` (identical on every worker).

Schedules run over the planned steps (`epochs` x steps per epoch, cut by `max_steps`): the learning rate
(linear warm-up, then constant or cosine) and CSGD's glancing ratio, which falls with the training progress
p = step / planned steps (falcon.csgd.glance_ratio: 0.4 (1 - p) in the paper, 0.35 (1 - p) + 0.1 officially).

Teacher: the target's top-k logits as the store keeps them, renormalised over those k tokens, when the store
has them (`csgd.teacher: auto`); else its LM head over the stored features, a full-vocabulary matmul that
was ~27% of a demo step on CPU (`csgd.teacher: lm_head` forces it).

Evaluation (held-out split, every epoch and at the end, no noise): the loss parts, top-1 accuracy a_d at
every depth d = 1..2k of two drafter passes (depths 1..k teacher-forced, pass 0; depths k+1..2k from pass 1,
which reads the drafter's own outputs for the previous block as decoding feeds them, falcon.passes), and the
expected acceptance length of a chain draft of depth D = max_passes x k, counting the target's bonus token:

    tau_chain = 1 + sum_{d=1..D} prod_{i=1..d} a_i,   a_i for i > 2k repeating pass 1's a_{k+1..2k}

It treats each depth as accepted independently, so it is a proxy to compare runs; the tree tuner replays the
real decode.

Non-finite losses: every worker's losses of a step are checked before any backward and the verdict is shared,
so all workers skip the same steps (no backward, no optimizer step: NaN never reaches the weights, whatever the
ZeRO stage). Skipped steps are counted (`train/nonfinite_steps`, carried in checkpoints); beyond
`max_nonfinite_steps` the run stops with a `TrainingDivergedError`, and a drafter whose weights are not all
finite is never exported.

Checkpoints (`ray.train.report`, every `checkpoint_every` steps, at each epoch end and at the end): every
worker writes `engine.save_checkpoint` (module weights, its ZeRO optimizer partition, LR scheduler, step) into
one directory that Ray Train merges in persistent storage; rank 0 adds `plan.json` (what the checkpoint was
made for) and, in the final one, the exported drafter. Re-running with the same `run_dir` resumes from the
latest checkpoint Ray Train committed to its run snapshot (RunConfig(name, storage_path)); after a kill -9 that
can be one report older than the newest checkpoint directory, and the steps in between are redone with the
same batches. `fresh=True` deletes the run directory first (after the inputs were checked).

Outputs in `run_dir`: Ray Train's checkpoints, `drafter/` (safetensors + drafter_config.json with the target
fingerprint; the draft vocabulary map is the `draft_to_target` tensor; train_info.json), `summary.json`, and
`mlflow_run_id`. Throughput ("tokens/s") counts window tokens, padding excluded, summed over all workers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from falcon.csgd import CSGDConfig, csgd_eval_metrics, csgd_step
from falcon.drafter import WEIGHTS_FILE, Drafter, DrafterConfig, build_draft_vocab, save_drafter
from pipelines.ray_utils import RayConfig
from pipelines.tracking import ensure_experiment, redact, resolve_tracking_uri

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LR_SCHEDULES = ("constant", "cosine")
ENGINE_TAG = "engine"  # DeepSpeed's sub-directory inside every checkpoint
PLAN_FILE = "plan.json"
DRAFTER_DIR = "drafter"
TRAIN_INFO_FILE = "train_info.json"
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


class TrainSetupError(ValueError):
    """Training cannot start as configured; the message names the problem and what to do."""


class TrainingDivergedError(TrainSetupError):
    """Training met more non-finite losses than allowed, or made non-finite weights; the message says what to do."""


# ---------------------------------------------------------------------------------------------------
# Config


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
class MlflowSection:
    enabled: bool = True
    tracking_uri: str = "sqlite:///runs/mlflow.db"
    experiment: str = "falcon-drafter-train"


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
    mlflow: MlflowSection = field(default_factory=MlflowSection)
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


# ---------------------------------------------------------------------------------------------------
# Driver: validate the inputs and plan the run


@dataclass
class HeadSource:
    """Where the target's embedding and LM head live: safetensors files and tensor names."""

    embed_file: str
    embed_name: str
    head_file: str  # the embedding's file and name when the head is tied to it
    head_name: str
    bias_name: str | None = None  # LM head bias, in head_file


@dataclass
class TrainPlan:
    """Everything the workers need, computed and checked once on the driver."""

    config: TrainConfig
    run_dir: str  # absolute
    storage_path: str
    run_name: str
    target_dir: str
    target_fingerprint: str
    head_source: HeadSource
    drafter_config: dict[str, Any]
    draft_vocab: np.ndarray | None  # (draft_vocab_size,) target ids, sorted
    train_indices: np.ndarray
    eval_indices: np.ndarray
    num_train_windows: int
    num_eval_windows: int
    steps_per_epoch: int
    total_steps: int
    torch_extensions_dir: str
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None

    def resume_key(self) -> dict[str, str | None]:
        """What a checkpoint must have been made for to be resumed by this plan: every training setting that
        changes the weights (dotted names, RESUME_IGNORED left out), the target, the drafter and the data split."""
        settings = flatten(dataclasses.asdict(self.config))
        key = {name: value for name, value in settings.items()
               if not any(name == ignored or name.startswith(f"{ignored}.") for ignored in RESUME_IGNORED)}
        key.update(flatten({"drafter_config": self.drafter_config}))
        key.update(target_fingerprint=self.target_fingerprint, draft_vocab_sha256=_array_digest(self.draft_vocab),
                   train_indices_sha256=_array_digest(self.train_indices))
        return key


def _array_digest(array: np.ndarray | None) -> str | None:
    import hashlib

    return None if array is None else hashlib.sha256(np.ascontiguousarray(array, dtype=np.int64)).hexdigest()


def resolve_local(path: str) -> str:
    """Absolute form of a local path (workers may run in another directory); URLs unchanged."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def prepare_run(config: TrainConfig, *, fresh: bool = False) -> TrainPlan:
    """Check the target, the store, the split and (unless `fresh`) any earlier checkpoint; size the run."""
    from falcon.target import TargetLoadError, default_cache_dir, load_target, target_fingerprint

    # Workers run in Ray Train's own directories: hand them absolute paths.
    config = dataclasses.replace(config, store=resolve_local(config.store))
    run_dir = Path(resolve_local(config.run_dir))
    try:
        target, tokenizer = load_target(config.target, dtype="bfloat16", trust_remote_code=config.trust_remote_code)
    except TargetLoadError as exc:
        raise TrainSetupError(f"target: {exc}") from None
    fingerprint = target_fingerprint(target, tokenizer)
    target_dir = local_model_dir(target.name_or_path)
    drafter_config = DrafterConfig.from_target(
        target.config, **dataclasses.asdict(config.drafter), target_fingerprint=fingerprint
    )
    del target  # only the fingerprint, config and directory are needed here
    head_source = locate_embedding_and_head(target_dir, config.trust_remote_code)

    store = open_checked_store(config, fingerprint)
    if config.csgd.teacher == "topk" and not store.metadata.topk:
        raise TrainSetupError(f"csgd.teacher is 'topk' but feature store {config.store} holds no top-k logits "
                              "(extracted with topk 0): set csgd.teacher to lm_head or auto")
    train_indices, eval_indices = store.split(config.eval_fraction, seed=config.split_seed)
    for name, indices in (("training", train_indices), ("held-out", eval_indices)):
        if len(indices) == 0:
            raise TrainSetupError(
                f"feature store {config.store}: the {name} split is empty ({store.num_samples} samples, "
                f"eval_fraction {config.eval_fraction}); extract more samples or change eval_fraction"
            )
    draft_vocab = None
    if config.drafter.draft_vocab_size is not None:
        if config.drafter.draft_vocab_size > drafter_config.vocab_size:
            raise TrainSetupError(f"drafter.draft_vocab_size {config.drafter.draft_vocab_size} exceeds the "
                                  f"target vocabulary ({drafter_config.vocab_size})")
        counts = torch.from_numpy(store.token_counts(train_indices))
        draft_vocab = build_draft_vocab(counts, config.drafter.draft_vocab_size).numpy()

    num_train_windows = len(training_windows(store, train_indices, config))
    num_eval_windows = len(training_windows(store, eval_indices, config))
    windows_per_step = (config.scaling.num_workers * config.deepspeed.micro_batch_size
                        * config.deepspeed.gradient_accumulation_steps)
    steps_per_epoch = num_train_windows // windows_per_step
    if steps_per_epoch == 0:
        raise TrainSetupError(
            f"the training split has {num_train_windows} windows of max_len {config.max_len}, fewer than one "
            f"optimizer step takes ({windows_per_step} = workers x micro_batch_size x gradient_accumulation_steps)"
        )
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    plan = TrainPlan(
        config=config,
        run_dir=str(run_dir),
        storage_path=resolve_local(config.storage_path) if config.storage_path else str(run_dir.parent),
        run_name=run_dir.name,
        target_dir=target_dir,
        target_fingerprint=fingerprint,
        head_source=head_source,
        drafter_config=dataclasses.asdict(drafter_config),
        draft_vocab=draft_vocab,
        train_indices=train_indices,
        eval_indices=eval_indices,
        num_train_windows=num_train_windows,
        num_eval_windows=num_eval_windows,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        torch_extensions_dir=str(default_cache_dir().resolve() / "torch_extensions"),
        mlflow_tracking_uri=resolve_tracking_uri(config.mlflow.tracking_uri) if config.mlflow.enabled else None,
    )
    if not fresh:
        check_resumable(plan)
    return plan


def open_checked_store(config: TrainConfig, fingerprint: str):
    """The store, refused if missing, made for another target, or holding a corrupt or missing shard."""
    from feature_store import FeatureStore, StoreMismatchError

    try:
        store = FeatureStore.open(config.store, expect_fingerprint=fingerprint,
                                  storage_options=config.storage_options)
    except (FileNotFoundError, StoreMismatchError) as exc:
        raise TrainSetupError(f"feature store: {exc}") from None
    if config.verify_store:
        report = store.verify()
        if not report.ok:
            raise TrainSetupError(
                f"feature store {config.store} failed verification; re-run the extraction job to rewrite the "
                f"named shards (or delete them so it extracts them again):\n{report}"
            )
    if store.num_samples == 0:
        raise TrainSetupError(f"feature store {config.store} holds no committed samples")
    return store


def training_windows(store, indices: np.ndarray, config: TrainConfig):
    """The FeatureDataset of the given samples' training windows (max_len, context_tokens)."""
    from feature_store import FeatureDataset

    return FeatureDataset(store, indices, config.max_len, config.context_tokens)


def local_model_dir(name_or_path: str) -> str:
    """The directory a target was loaded from: a local path, or a hub id's snapshot in the local HF cache."""
    if Path(name_or_path).is_dir():
        return str(Path(name_or_path).resolve())
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, local_files_only=True)


def locate_embedding_and_head(target_dir: str, trust_remote_code: bool = False) -> HeadSource:
    """Find the input embedding and LM head tensors in a target's safetensors files, without loading it.

    The module names come from the model built on the meta device (no memory); the files from
    `model.safetensors.index.json` or `model.safetensors`. A tied head reads the embedding tensor.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(target_dir)
    model_config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    module_names = {module: name for name, module in skeleton.named_modules()}
    embed, head = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
    embed_name = f"{module_names[embed]}.weight"
    head_name = embed_name if head.weight is embed.weight else f"{module_names[head]}.weight"
    bias_name = f"{module_names[head]}.bias" if getattr(head, "bias", None) is not None else None

    files = safetensors_weight_map(directory)
    missing = [name for name in (embed_name, head_name, bias_name) if name is not None and name not in files]
    if missing:
        raise TrainSetupError(f"target {target_dir}: tensors {missing} are not in its safetensors files")
    return HeadSource(
        embed_file=str(directory / files[embed_name]), embed_name=embed_name,
        head_file=str(directory / files[head_name]), head_name=head_name, bias_name=bias_name,
    )


def safetensors_weight_map(directory: Path) -> dict[str, str]:
    """{tensor name: file name} of a HF model directory's safetensors checkpoint (sharded or not)."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = directory / "model.safetensors"
    if not single.is_file():
        raise TrainSetupError(f"target {directory} has no model.safetensors(.index.json); convert it to safetensors")
    with safe_open(str(single), framework="pt") as file:
        return {name: single.name for name in file.keys()}


def check_resumable(plan: TrainPlan) -> None:
    """Refuse to resume a checkpoint made with other training settings (TrainPlan.resume_key).

    The checkpoint compared is the one a re-run resumes from, the latest in Ray Train's run snapshot: a newer
    directory is a partial write (a worker killed while saving) that Ray Train skips as well.
    """
    committed = committed_checkpoint(plan)
    if committed is None:
        return
    name = committed[0]
    saved_plan = read_run_file(plan, name, PLAN_FILE)
    if saved_plan is None:
        raise TrainSetupError(f"{plan.run_dir}: checkpoint {name}, which a re-run resumes from, has no {PLAN_FILE}, "
                              "so its settings cannot be checked; pass --fresh to start over, or use another run_dir")
    saved, wanted = json.loads(saved_plan)["resume_key"], plan.resume_key()
    differences = [f"{key}: checkpoint {saved.get(key)!r} != now {value!r}"
                   for key, value in wanted.items() if saved.get(key) != value]
    differences += [f"{key}: checkpoint {saved[key]!r}, no such setting now" for key in saved if key not in wanted]
    if differences:
        raise TrainSetupError(
            f"{plan.run_dir} holds a checkpoint ({name}) of a run with other settings, so it cannot be "
            "resumed:\n  " + "\n  ".join(differences) + "\npass --fresh to start over, or use another run_dir"
        )


def committed_checkpoint(plan: TrainPlan) -> tuple[str, dict[str, Any]] | None:
    """(directory name, reported metrics) of the checkpoint a re-run of this plan resumes from: the latest in
    Ray Train's run snapshot. None before a first checkpoint was committed."""
    snapshot = read_run_file(plan, RUN_SNAPSHOT_FILE)
    latest = json.loads(snapshot).get("latest_checkpoint_result") if snapshot else None
    return None if latest is None else (latest["checkpoint_dir_name"], latest["metrics"])


def read_run_file(plan: TrainPlan, *parts: str) -> str | None:
    """A file of the Ray Train run in its storage (a local path or a pyarrow URL, as Ray Train reads it), or None."""
    from pyarrow import fs

    location = "/".join([plan.storage_path.rstrip("/"), plan.run_name, *parts])
    filesystem, path = fs.FileSystem.from_uri(location) if "://" in location else (fs.LocalFileSystem(), location)
    if filesystem.get_file_info(path).type == fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


# ---------------------------------------------------------------------------------------------------
# Worker: model, engine, data


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


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The generator of noise and glancing for one optimizer step of one worker."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def epoch_batches(num_windows: int, epoch: int, plan: TrainPlan, rank: int, world: int) -> list[list[int]]:
    """This worker's micro-batches of window positions for one epoch, in order."""
    micro = plan.config.deepspeed.micro_batch_size
    order = np.random.default_rng([plan.config.seed, epoch]).permutation(num_windows)
    mine = order[rank::world][: plan.steps_per_epoch * plan.config.deepspeed.gradient_accumulation_steps * micro]
    return [mine[i:i + micro].tolist() for i in range(0, len(mine), micro)]


def eval_batches(num_windows: int, plan: TrainPlan, rank: int, world: int) -> list[list[int]]:
    """This worker's share of the held-out windows (a fixed random subset if eval_max_windows is set)."""
    order = np.arange(num_windows)
    if plan.config.eval_max_windows is not None and num_windows > plan.config.eval_max_windows:
        order = np.sort(np.random.default_rng([plan.config.seed, 1]).permutation(num_windows)
                        [: plan.config.eval_max_windows])
    mine = order[rank::world]
    micro = plan.config.deepspeed.micro_batch_size
    return [mine[i:i + micro].tolist() for i in range(0, len(mine), micro)]


def batch_loader(dataset, batches: Sequence[Sequence[int]], workers: int) -> Iterator[dict[str, torch.Tensor]]:
    from feature_store import collate_features

    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_features,
                                            num_workers=workers))


# ---------------------------------------------------------------------------------------------------
# Worker: metrics across workers


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


def optimizer_digest(engine, device) -> float:
    """A fingerprint of the optimizer state summed over workers (moments and step counts), to check resumes."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch AdamW inside ZeRO
    total = 0.0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.double().abs().sum().item()
    return all_reduce_sum({"digest": total}, device)["digest"]


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


# ---------------------------------------------------------------------------------------------------
# Worker: checkpoints


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
                    (export_dir / TRAIN_INFO_FILE).write_text(
                        json.dumps(train_info(plan, step, metrics), indent=2, default=str) + "\n")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"checkpoint_step{step:09d}")


def train_info(plan: TrainPlan, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """What the exported drafter says of its training (train_info.json, copied into packages): no credentials."""
    return redact({"step": step, "target_dir": plan.target_dir, "store": plan.config.store,
                   "mlflow_run_id": plan.mlflow_run_id, "metrics": metrics, "config": dataclasses.asdict(plan.config)})


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


# ---------------------------------------------------------------------------------------------------
# Worker: the training loop


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
    torch.set_num_threads(config.scaling.torch_threads or max(1, int(config.scaling.cpus_per_worker)))
    if config.flush_denormal:
        torch.set_flush_denormal(True)
    device, dtype = ray.train.torch.get_device(), DTYPES[config.dtype]

    embedding, head = load_frozen_embedding_and_head(plan.head_source, device, dtype)
    lm_head_weight = head.weight.detach()  # the full target head: the teacher when the store has no top-k
    engine = start_engine(build_drafter(plan, embedding, head, device, dtype), plan)
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


# ---------------------------------------------------------------------------------------------------
# Driver: MLflow run, Ray Train, export


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


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
    Path(plan.run_dir, SUMMARY_FILE).write_text(json.dumps(redact(summary), indent=2, default=str) + "\n")
    _finish_mlflow_run(plan, "FINISHED", drafter_dir)
    print(f"train: done in {format_duration(summary['seconds'])}; drafter {drafter_dir}; "
          f"MLflow run {plan.mlflow_run_id} ({summary['mlflow_tracking_uri']})")
    return {**summary, "result": outcome}


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
