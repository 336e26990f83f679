"""The `extract` section (`ExtractConfig`, with its `generation` block) and the extraction's error."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from falcon.devices import DTYPES, resolve_dtype
from falcon.errors import FalconError
from feature_store.lock import DEFAULT_STALE_AFTER_S
from feature_store.schema import HIDDEN_DTYPES, TOPK_DTYPES
from pipelines.data import DEFAULT_MAX_CHARS, FORMATS
from pipelines.ray_utils import ActorPoolConfig, RayConfig


class ExtractError(FalconError, RuntimeError):
    """The extraction cannot run as configured; the message says why and what to do."""


@dataclass
class GenerationConfig:
    # Generate the assistant reply of records that end with a user turn (self-distillation). Off: such
    # records are rejected ("no_assistant_turn").
    enabled: bool = True
    # Cap on new tokens; each reply is further capped at max_len - prompt length.
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # sampling seed; each record draws from its own generator seeded by (seed, id)
    # Greedy replies are decoded up to this many prompts of a shard at a time (left-padded; on CPU a step of
    # 64 rows costs far less than 64 steps of one), within batch_tokens = rows x (prompt + reply budget), which
    # bounds the KV cache. Sampled replies go one by one, so a record's seed fixes its reply.
    batch_size: int = 64
    batch_tokens: int = 16384

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1 or self.batch_tokens < 1:
            raise ValueError(f"generation.batch_size and batch_tokens must be >= 1, got {self.batch_size}, "
                             f"{self.batch_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")

    def content_settings(self) -> dict[str, Any]:
        """The settings that change generated replies (recorded in the store's metadata)."""
        return {
            "enabled": self.enabled,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p if self.temperature > 0 else 1.0,
            "seed": self.seed if self.temperature > 0 else 0,
        }


@dataclass
class ExtractConfig:
    inputs: list[str]  # files, directories or globs of ShareGPT / OpenAI JSON, JSONL(.gz) or Parquet
    store: str  # feature store URL: a local path or any fsspec URL (s3://, gs://, ...)
    run_dir: str = "runs/extract"  # local folder for rejects.jsonl and summary.json of the last run
    input_format: str = "auto"  # "auto" | "sharegpt" | "openai"
    max_chars: int | None = DEFAULT_MAX_CHARS  # longer conversations are rejected before tokenising
    shuffle_seed: int | None = None  # shuffle the records (deterministically) before taking max_samples
    max_samples: int | None = None  # keep the first N records
    target: str | None = None  # falcon.target.load_target spec; None: the default SmolLM2-135M-Instruct
    trust_remote_code: bool = False
    device: str = "cpu"
    dtype: str = "auto"  # dtype of the target forward (auto: see falcon.devices.resolve_dtype)
    max_len: int = 2048  # tokens per sample, prompt + reply
    samples_per_shard: int = 64
    hidden_dtype: str = "bfloat16"
    topk: int = 32  # stored top-k logits per token (0: none)
    topk_dtype: str = "float32"  # bf16 logits are exact in float32 and compress to their bf16 size
    forward_batch_tokens: int = 8192  # padded tokens (rows x longest) per target forward
    forward_actors: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    task_num_cpus: float = 0.25  # CPU reservation of the tokenise and write tasks
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for the store URL
    # The store's writer lock is stale once its heartbeat is this old (a job on another host died).
    lock_timeout_s: float = DEFAULT_STALE_AFTER_S
    # Re-read the committed shards of an existing store, re-extract the corrupt ones: ~1 s per 100 MB here,
    # so seconds for the demo but hours for a store of a 7B target's ShareGPT features (~500 GB).
    verify_on_resume: bool = True

    def __post_init__(self) -> None:
        self.dtype = resolve_dtype(self.dtype, self.device)  # the store records the dtype its features had
        checks = [
            (bool(self.inputs), f"inputs must name at least one file, got {self.inputs!r}"),
            (self.input_format in FORMATS, f"input_format must be one of {FORMATS}"),
            (self.dtype in DTYPES, f"dtype must be one of {sorted(DTYPES)} or auto"),
            (self.hidden_dtype in HIDDEN_DTYPES, f"hidden_dtype must be one of {sorted(HIDDEN_DTYPES)}"),
            (self.topk_dtype in TOPK_DTYPES, f"topk_dtype must be one of {sorted(TOPK_DTYPES)}"),
            (self.topk >= 0, "topk must be >= 0"),
            (self.max_len >= 2, "max_len must be >= 2"),
            (self.samples_per_shard >= 1, "samples_per_shard must be >= 1"),
            (self.forward_batch_tokens >= 1, "forward_batch_tokens must be >= 1"),
            (self.max_samples is None or self.max_samples >= 1, "max_samples must be >= 1 or null"),
            (self.task_num_cpus > 0, "task_num_cpus must be > 0"),
            (self.lock_timeout_s > 0, "lock_timeout_s must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def content_settings(self) -> dict[str, Any]:
        """Settings that change the stored features, for the store's metadata (not resources or paths)."""
        return {
            "max_len": self.max_len,
            "samples_per_shard": self.samples_per_shard,
            "dtype": self.dtype,
            "generation": self.generation.content_settings(),
        }
