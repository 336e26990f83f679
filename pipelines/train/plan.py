"""Driver, before any worker starts: check the target, the store, the split and an earlier checkpoint; size the run.

`prepare_run` loads the target once to fingerprint it, opens the store expecting that fingerprint, verifies every
shard, splits train / held-out, builds the draft vocabulary from the training split's token counts, sizes the run
(steps per epoch, total steps) and checks that the checkpoint a re-run would resume from was made with the same
training settings (`TrainPlan.resume_key`). Any problem is a `TrainSetupError` naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from falcon.drafter import DrafterConfig, build_draft_vocab
from pipelines.tracking import resolve_tracking_uri
from pipelines.train.batches import training_windows
from pipelines.train.config import (
    PLAN_FILE,
    RESUME_IGNORED,
    RUN_SNAPSHOT_FILE,
    TrainConfig,
    TrainSetupError,
    flatten,
)


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
