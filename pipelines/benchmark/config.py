"""The `benchmark` section (`BenchmarkConfig`: datasets, baselines, extra drafters) and the benchmark's error."""

from __future__ import annotations

from dataclasses import dataclass, field

from falcon.devices import resolve_dtype
from falcon.errors import FalconError
from pipelines.tracking import MlflowConfig

BASELINES = ("autoregressive", "hf_generate")


DRAFTER_ONLY = "falcon-drafter-only"


REPORT_JSON, REPORT_MD = "report.json", "report.md"


SPEEDUP_PNG, ACCEPTED_PNG = "speedup.png", "accepted_lengths.png"


class BenchmarkError(FalconError, ValueError):
    """The benchmark cannot run as configured; the message says why."""


# How close a divergence's exact margin must be to pass as a numerical tie (also packaging's check).
DEFAULT_TIE_FACTOR = 2.0


@dataclass
class DatasetSpec:
    name: str
    path: str  # OpenAI-messages JSONL as written by jobs/fetch_data.py
    max_samples: int | None = 80  # the first N records
    second_turn: bool = False  # MT-Bench: also the second turn, after the reference's first reply


@dataclass
class ExtraDrafter:
    name: str  # method name in the report, e.g. "no-csgd" or "k1"
    drafter_dir: str  # a drafter directory (a training run's drafter/)
    # Tree: explicit rank paths or a branching list; neither: the package's tree cut to the drafter's depth.
    paths: list[list[int]] | None = None
    branching: list[int] | None = None


@dataclass
class BenchmarkConfig:
    model: str = "models:/falcon-smollm2@champion"  # models:/NAME@ALIAS, models:/NAME/VERSION or a local dir
    run_dir: str = "runs/benchmark"
    target: str | None = None  # None: the target the package names
    trust_remote_code: bool = False  # import the target's own model code; never taken from the package
    device: str = "cpu"
    dtype: str = "auto"  # auto: see falcon.devices.resolve_dtype
    torch_threads: int | None = None  # None: every core (Ray starts jobs with one thread)
    max_new_tokens: int = 256
    warmup_prompts: int = 2
    datasets: list[DatasetSpec] = field(default_factory=lambda: [
        DatasetSpec("mt_bench", "data/mt_bench.jsonl"),
        DatasetSpec("humaneval", "data/humaneval.jsonl"),
        DatasetSpec("gsm8k", "data/gsm8k.jsonl"),
    ])
    hf_generate: bool = True
    prompt_lookup: bool = True
    prompt_lookup_num_tokens: int = 10
    prompt_lookup_max_ngram: int = 2
    extra_drafters: list[ExtraDrafter] = field(default_factory=list)
    # A package decoding with a context-lookup chain (falcon.lookup) is also run without it, as `falcon-drafter-only`
    drafter_only: bool = True
    # A divergence is a numerical tie when the exact margin between the two tokens is at most this many times
    # (the rounding error the inference dtype made on it + one ulp of the logits) (DivergenceAuditor).
    tie_factor: float = DEFAULT_TIE_FACTOR
    # The registry `model` is resolved in, and where the report is logged (enabled: false logs nothing).
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="falcon-benchmark"))

    def __post_init__(self) -> None:
        self.dtype = resolve_dtype(self.dtype, self.device)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.datasets:
            raise ValueError("datasets must name at least one dataset")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        methods = ["falcon", *BASELINES, "prompt_lookup", DRAFTER_ONLY, *(e.name for e in self.extra_drafters)]
        if len(set(methods)) != len(methods):
            raise ValueError(f"extra drafter names must differ from each other and from {methods[:5]}")
