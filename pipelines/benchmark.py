"""Benchmark a packaged Falcon drafter against plain decoding of its target, with a losslessness audit.

    python jobs/benchmark.py --config jobs/configs/smollm2-demo.yaml [--set key=value ...]

Protocol (stated in every report):
- Same process, same target object, dtype and threads for every method; batch 1; greedy; the same prompts
  (chat template, first user turn; MT-Bench's second turn as an option) and the same max_new_tokens; a
  warm-up of every method first. For each prompt the methods run one after another, the order rotating
  from prompt to prompt, so that load from elsewhere on the machine hits every method alike.
- Methods: `autoregressive` (the project's own plain decoding loop), `hf_generate` (transformers'
  greedy `generate`), `falcon` (the registered drafter and tree, with the package's context-lookup chain if
  it has one), `falcon-drafter-only` (the same without the lookup chain), `prompt_lookup` (transformers'
  prompt-lookup decoding) and any extra drafter directory (ablations), decoded with the package's tree cut
  to the depth that drafter supports, or a tree of its own.
- The baseline is the faster of `autoregressive` and `hf_generate` (by mean per-sample tokens/s), so no
  speedup is claimed against a slow loop.
- tokens/s of a sample: new tokens / wall time of the whole call, prefill included.
- speedup (Spec-Bench): mean per-sample tokens/s of the method / mean per-sample tokens/s of the baseline.
- tau: tokens produced per target forward after the prefill, the bonus token included (plain decoding 1.00).
- alpha: accepted draft tokens / draft tokens on the deepest path the tree offered, over all steps.
- Losslessness: every output is compared token for token with `autoregressive`. At the first divergence the
  target is re-run on prompt + common prefix in the inference dtype and in higher precision; the divergence is
  a numerical tie when the exact margin between the two tokens is within `tie_factor` times (the rounding
  error the inference dtype made on that margin + one ulp of the logits), else real (DivergenceAuditor).

Outputs in run_dir: report.json, report.md, speedup.png, accepted_lengths.png; logged to MLflow too.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from falcon.drafter import load_drafter
from falcon.generate import FalconDecoder, GenerationResult
from falcon.target import resolve_dtype
from falcon.tree import TreeConfig
from pipelines.config import load_section
from pipelines.inference import FalconPackage, encode_prompt, load_falcon
from pipelines.ray_utils import use_torch_threads
from pipelines.tracking import ensure_experiment, redact, resolve_tracking_uri

BASELINES = ("autoregressive", "hf_generate")
DRAFTER_ONLY = "falcon-drafter-only"
REPORT_JSON, REPORT_MD = "report.json", "report.md"
SPEEDUP_PNG, ACCEPTED_PNG = "speedup.png", "accepted_lengths.png"


class BenchmarkError(ValueError):
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
    tracking_uri: str = "sqlite:///runs/mlflow.db"
    run_dir: str = "runs/benchmark"
    target: str | None = None  # None: the target the package names
    trust_remote_code: bool = False  # import the target's own model code; never taken from the package
    device: str = "cpu"
    dtype: str = "auto"  # auto: see falcon.target.resolve_dtype
    torch_threads: int | None = None  # None: every core (Ray starts jobs with one thread)
    max_new_tokens: int = 256
    warmup_prompts: int = 2
    datasets: list[DatasetSpec] = field(default_factory=lambda: [
        DatasetSpec("mt_bench", "data/mtbench.jsonl"),
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
    mlflow: bool = True
    experiment: str = "falcon-benchmark"

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


@dataclass
class Sample:
    id: str
    messages: list[dict[str, str]]
    turn: int = 1
    next_turn: str | None = None  # MT-Bench's second user turn


@dataclass
class Run:
    """One method on one sample."""

    tokens: list[int]
    seconds: float
    steps: int = 0  # target forwards after the prefill
    accepted: list[int] = field(default_factory=list)  # per step: accepted draft tokens + bonus
    depth: int = 0  # draft tokens on the deepest tree path, summed over steps

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------------
# Methods: each maps (1, L) prompt ids to a Run


def _from_result(result: GenerationResult) -> Run:
    return Run(list(result.tokens), result.total_s, len(result.steps),
               [s.accepted + 1 for s in result.steps], sum(s.depth for s in result.steps))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_generate_method(target, eos: list[int], max_new_tokens: int, **extra) -> Callable[[torch.Tensor], Run]:
    """transformers' `generate`, greedy; `extra` adds e.g. prompt_lookup_num_tokens. Target forwards counted."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos[0], **extra)

    def run(input_ids: torch.Tensor) -> Run:
        forwards = []
        hook = target.register_forward_hook(lambda *_: forwards.append(1))
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                output = target.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                         generation_config=config)
            _synchronize(input_ids.device)
            seconds = time.perf_counter() - start
        finally:
            hook.remove()
        return Run(output[0, input_ids.shape[1]:].tolist(), seconds, steps=max(len(forwards) - 1, 0))

    return run


def build_methods(config: BenchmarkConfig, package: FalconPackage) -> dict[str, Callable[[torch.Tensor], Run]]:
    from falcon.generate import autoregressive_generate

    target, eos, n = package.target, package.eos_token_ids, config.max_new_tokens
    methods: dict[str, Callable[[torch.Tensor], Run]] = {
        "autoregressive": lambda ids: _from_result(autoregressive_generate(target, ids, n, eos_token_id=eos)),
        "falcon": lambda ids: _from_result(package.decoder.generate(ids, n, eos_token_id=eos)),
    }
    if config.hf_generate:
        methods["hf_generate"] = hf_generate_method(target, eos, n)
    if config.prompt_lookup:
        methods["prompt_lookup"] = hf_generate_method(
            target, eos, n, prompt_lookup_num_tokens=config.prompt_lookup_num_tokens,
            max_matching_ngram_size=config.prompt_lookup_max_ngram)
    if config.drafter_only and package.decoder.lookup.enabled:
        drafter_only = FalconDecoder(target, package.drafter, package.tree_paths)
        methods[DRAFTER_ONLY] = lambda ids: _from_result(drafter_only.generate(ids, n, eos_token_id=eos))
    for extra in config.extra_drafters:
        decoder = extra_decoder(extra, package)
        methods[extra.name] = lambda ids, decoder=decoder: _from_result(decoder.generate(ids, n, eos_token_id=eos))
    return methods


def extra_decoder(extra: ExtraDrafter, package: FalconPackage) -> FalconDecoder:
    drafter_dir = Path(extra.drafter_dir)
    if not drafter_dir.is_dir():
        raise BenchmarkError(f"extra drafter {extra.name!r}: no drafter directory at {drafter_dir}")
    drafter = load_drafter(drafter_dir, package.target, target_fingerprint=package.fingerprint)
    drafter.to(device=package.target.device, dtype=package.target.dtype)
    if extra.paths is not None or extra.branching is not None:
        tree: Any = TreeConfig(paths=extra.paths, branching=extra.branching)
    else:
        tree = [p for p in package.tree_paths if len(p) <= drafter.config.max_tree_depth]
    return FalconDecoder(package.target, drafter, tree, target_fingerprint=package.fingerprint)


# ---------------------------------------------------------------------------------------------------
# Losslessness audit


REFERENCE_DTYPE = {torch.bfloat16: torch.float32, torch.float16: torch.float32, torch.float32: torch.float64}
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """Spacing of `dtype` numbers at |magnitude|: the rounding step of a logit stored in that dtype."""
    exponent = math.floor(math.log2(max(abs(magnitude), torch.finfo(dtype).tiny)))
    return 2.0 ** (exponent - MANTISSA_BITS[dtype])


def first_divergence(reference: list[int], other: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(reference, other, strict=False)):
        if a != b:
            return i
    return None if len(reference) == len(other) else min(len(reference), len(other))


class DivergenceAuditor:
    """Classifies the first divergence of a method's output from plain greedy decoding.

    At the divergence the reference chose token a and the method token b. Both are greedy choices, made from
    logits computed along different paths (one token at a time vs. a batched tree), so they can differ only
    through rounding. The target is re-run on prompt + common prefix twice: in the inference dtype, and in a
    higher precision (float32 for bf16/fp16, float64 for float32) standing in for exact arithmetic. Let m be
    the exact margin logit(a) - logit(b), e the rounding error the inference dtype made on that margin along
    this path (|m_inference - m|), and u one unit in the last place of the logits in the inference dtype (each
    path rounds its output logits independently: in bf16 logits near 20 come in steps of 0.125). The
    divergence is a numerical tie when |m| <= tie_factor x (e + u): rounding of the size observed there can
    flip the choice. Otherwise it is real: a bug, not arithmetic. An output that is a strict
    prefix of the other is real too (both stop at the same EOS tokens, so no close choice explains it).
    """

    def __init__(self, target, tie_factor: float):
        self.target, self.tie_factor = target, tie_factor
        self._reference_model = None

    def _reference(self):
        if self._reference_model is None:  # made once, at the first divergence: it costs a copy of the weights
            import copy

            self._reference_model = copy.deepcopy(self.target).to(REFERENCE_DTYPE[self.target.dtype])
        return self._reference_model

    @staticmethod
    def _last_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=input_ids).logits[0, -1].double()  # (vocab,)

    def audit(self, prompt_ids: torch.Tensor, reference: list[int], other: list[int], index: int) -> dict[str, Any]:
        prefix = torch.tensor([reference[:index]], dtype=prompt_ids.dtype, device=prompt_ids.device)
        input_ids = torch.cat([prompt_ids, prefix], dim=1)  # (1, prompt + index)
        inference = self._last_logits(self.target, input_ids)
        exact = self._last_logits(self._reference(), input_ids)
        a = reference[index] if index < len(reference) else None
        b = other[index] if index < len(other) else None
        if a is None or b is None:  # one output is a strict prefix of the other: no choice was close, a bug
            return {"index": index, "reference_token": a, "method_token": b, "kind": "real"}
        exact_margin = float(exact[a] - exact[b])
        error = abs(float(inference[a] - inference[b]) - exact_margin)
        logit_ulp = ulp(self.target.dtype, max(abs(float(inference[a])), abs(float(inference[b]))))
        bound = self.tie_factor * (error + logit_ulp)
        tie = abs(exact_margin) <= bound
        return {
            "index": index, "reference_token": a, "method_token": b,
            "exact_margin": exact_margin, "rounding_error": error, "logit_ulp": logit_ulp, "tie_bound": bound,
            "inference_margin": float(inference[a] - inference[b]),
            "exact_top1": int(exact.argmax()), "kind": "tie" if tie else "real",
        }


# ---------------------------------------------------------------------------------------------------
# Data


def read_samples(spec: DatasetSpec) -> list[Sample]:
    path = Path(spec.path)
    if not path.is_file():
        raise BenchmarkError(f"dataset {spec.name!r}: {path} not found (run `python jobs/fetch_data.py` first)")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            messages = [m for m in record["messages"] if m["role"] != "assistant"][:1]
            if not messages or messages[0]["role"] != "user":
                raise KeyError("no first user turn")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BenchmarkError(f"{path}:{number}: not an OpenAI-messages record with a user turn ({exc})") from None
        turns = record.get("turns") or []
        samples.append(Sample(str(record.get("id", f"{spec.name}-{number}")), messages,
                              next_turn=turns[1] if spec.second_turn and len(turns) > 1 else None))
        if spec.max_samples is not None and len(samples) >= spec.max_samples:
            break
    if not samples:
        raise BenchmarkError(f"dataset {spec.name!r}: {path} holds no samples")
    return samples


# ---------------------------------------------------------------------------------------------------
# Measuring


def measure_dataset(spec: DatasetSpec, methods: dict[str, Callable], package: FalconPackage,
                    auditor: DivergenceAuditor, rotation: list[int]) -> dict[str, list[dict[str, Any]]]:
    """Per method, one record per sample: tokens/s, tau inputs, and the audit against `autoregressive`."""
    names = list(methods)
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    queue = read_samples(spec)
    progress = tqdm(total=len(queue), desc=f"benchmark {spec.name}", unit=" prompt", file=sys.stderr)
    while queue:
        sample = queue.pop(0)
        prompt_ids = encode_prompt(package.tokenizer, sample.messages).to(package.target.device)
        start = rotation[0] % len(names)
        rotation[0] += 1
        runs = {name: methods[name](prompt_ids) for name in names[start:] + names[:start]}
        reference = runs["autoregressive"].tokens
        for name, run in runs.items():
            index = first_divergence(reference, run.tokens)
            audit = None if index is None else auditor.audit(prompt_ids, reference, run.tokens, index)
            records[name].append({"id": sample.id, "turn": sample.turn, "prompt_tokens": prompt_ids.shape[1],
                                  "new_tokens": len(run.tokens), "seconds": run.seconds,
                                  "tokens_per_s": run.tokens_per_s, "steps": run.steps, "accepted": run.accepted,
                                  "depth": run.depth, "identical": index is None, "divergence": audit})
        if sample.next_turn is not None:  # the second turn follows the reference's first reply, for every method
            reply = package.tokenizer.decode(reference, skip_special_tokens=True)
            queue.insert(0, Sample(f"{sample.id}/turn2", [*sample.messages, {"role": "assistant", "content": reply},
                                                          {"role": "user", "content": sample.next_turn}], turn=2))
            progress.total += 1
        progress.update(1)
    progress.close()
    return records


def summarise_method(name: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["tokens_per_s"] for r in records]
    tokens = sum(r["new_tokens"] for r in records)
    steps = sum(r["steps"] for r in records)
    accepted = [a for r in records for a in r["accepted"]]
    depth = sum(r["depth"] for r in records)
    divergences = [r["divergence"] for r in records if r["divergence"] is not None]
    if name in BASELINES:
        tau: float | None = 1.0
    elif accepted:
        tau = sum(accepted) / len(accepted)
    else:  # prompt lookup: forwards counted by a hook; the prefill forward yields the first token
        tau = (tokens - len(records)) / steps if steps else None
    return {
        "samples": len(records),
        "new_tokens": tokens,
        "seconds": sum(r["seconds"] for r in records),
        "tokens_per_s_mean": statistics.fmean(rates),
        "tokens_per_s_median": statistics.median(rates),
        "tau": tau,
        "alpha": (sum(accepted) - len(accepted)) / depth if depth else None,
        "accepted_histogram": dict(sorted(Counter(accepted).items())),
        "identical": sum(r["identical"] for r in records),
        "ties": sum(d["kind"] == "tie" for d in divergences),
        "real_divergences": sum(d["kind"] == "real" for d in divergences),
    }


def summarise(records: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Per dataset: per method summary with speedup over the faster baseline."""
    summary = {}
    for dataset, by_method in records.items():
        methods = {name: summarise_method(name, recs) for name, recs in by_method.items()}
        baseline = max((m for m in BASELINES if m in methods), key=lambda m: methods[m]["tokens_per_s_mean"])
        base_rate = methods[baseline]["tokens_per_s_mean"]
        for stats in methods.values():
            stats["speedup"] = stats["tokens_per_s_mean"] / base_rate if base_rate else None
        summary[dataset] = {"baseline": baseline, "methods": methods}
    return summary


# ---------------------------------------------------------------------------------------------------
# Reporting


def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def format_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Falcon benchmark: {report['model']['uri']}",
        "",
        f"{report['date']} · {report['machine']['cpu']} · {report['machine']['cores']} cores · "
        f"{report['machine']['torch_threads']} torch threads · device {report['machine']['device']} · "
        f"{report['config']['dtype']} · batch 1 · greedy · max_new_tokens {report['config']['max_new_tokens']}",
        "",
        f"Target {report['model']['target']}; drafter k={report['model']['drafter'].get('block_size')}, "
        f"draft vocab {report['model']['drafter'].get('draft_vocab_size')}; tree {report['model']['tree']}; "
        f"context lookup {report['model'].get('lookup') or 'off'}",
        "",
    ]
    for dataset, result in report["results"].items():
        lines += [f"## {dataset}  (baseline: {result['baseline']})", "",
                  "| method | samples | tokens/s mean | tokens/s median | speedup | τ | α | identical | ties | real divergences |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in result["methods"].items():
            lines.append(
                f"| {name} | {m['samples']} | {m['tokens_per_s_mean']:.1f} | {m['tokens_per_s_median']:.1f} | "
                f"{_fmt(m['speedup'], '.2f')}x | {_fmt(m['tau'], '.2f')} | {_fmt(m['alpha'], '.2f')} | "
                f"{m['identical']}/{m['samples']} | {m['ties']} | {m['real_divergences']} |")
        lines.append("")
    lines += ["## Definitions", "", *(f"- {line}" for line in report["definitions"]), ""]
    return "\n".join(lines)


DEFINITIONS = [
    "tokens/s of a sample: new tokens / wall time of the whole call, prefill included.",
    "speedup (Spec-Bench): mean per-sample tokens/s of the method / that of the baseline; the baseline is the "
    "faster of the project's plain decoding loop (autoregressive) and transformers' greedy generate (hf_generate).",
    "τ: tokens produced per target forward after the prefill, bonus token included (plain decoding = 1.00).",
    "α: accepted draft tokens / draft tokens on the deepest path the tree offered, summed over steps.",
    "identical: outputs equal to `autoregressive` token for token. At a first divergence the target is re-run on "
    "the prompt + common prefix in the inference dtype and in higher precision (float32 for bf16, float64 for "
    "float32): with m the high-precision margin between the reference's token and the method's, e the rounding "
    "error the inference dtype made on m and u one ulp of the logits in that dtype, the divergence is a numerical "
    "tie when |m| <= tie_factor x (e + u), else a real divergence (a bug).",
]


def plot(report: dict[str, Any], run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    datasets = list(results)
    methods = [m for m in next(iter(results.values()))["methods"] if m not in BASELINES] + list(BASELINES)
    methods = [m for m in methods if all(m in results[d]["methods"] for d in datasets)]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(datasets), 3.6))
    for i, method in enumerate(methods):
        values = [results[d]["methods"][method]["speedup"] or 0.0 for d in datasets]
        bars = ax.bar([x + i * width for x in range(len(datasets))], values, width, label=method)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(datasets))], datasets)
    ax.set_ylabel("speedup over the baseline")
    ax.set_title(f"Speedup, {report['machine']['device']}, {report['config']['dtype']}, batch 1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [run_dir / SPEEDUP_PNG]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    drafted = [m for m in methods if any(results[d]["methods"][m]["accepted_histogram"] for d in datasets)]
    if drafted:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for method in drafted:
            counts: Counter = Counter()
            for d in datasets:
                counts.update({int(k): v for k, v in results[d]["methods"][method]["accepted_histogram"].items()})
            total = sum(counts.values())
            xs = sorted(counts)
            ax.plot(xs, [counts[x] / total for x in xs], marker="o", label=method)
        ax.set_xlabel("tokens accepted per step (bonus included)")
        ax.set_ylabel("fraction of steps")
        ax.set_title("Accepted length per step, all datasets")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(run_dir / ACCEPTED_PNG)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def log_to_mlflow(config: BenchmarkConfig, tracking_uri: str, report: dict[str, Any], files: list[Path]) -> str:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(MlflowClient(tracking_uri), config.experiment, tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=redact(f"benchmark {report['model']['uri']}")) as run:
        mlflow.log_params(redact({"model": report["model"]["uri"], "registry_version":
                                  str(report["model"].get("registry", {}).get("version")),
                                  "target_fingerprint": report["model"]["fingerprint"], "dtype": config.dtype,
                                  "device": config.device, "max_new_tokens": config.max_new_tokens,
                                  "datasets": ",".join(d.name for d in config.datasets),
                                  "cpu": report["machine"]["cpu"]}))
        for dataset, result in report["results"].items():
            for method, m in result["methods"].items():
                for key in ("tokens_per_s_mean", "speedup", "tau", "alpha", "real_divergences", "ties"):
                    if m[key] is not None:
                        mlflow.log_metric(f"{dataset}.{method}.{key}", float(m[key]))
        for path in files:
            mlflow.log_artifact(str(path))
        return run.info.run_id


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    """Measure every method on every dataset; write and log the report; return it."""
    for spec in config.datasets:  # fail on a missing file before loading anything
        read_samples(spec)
    use_torch_threads(config.torch_threads)
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    package = load_falcon(config.model, device=config.device, dtype=config.dtype, tracking_uri=tracking_uri,
                          target=config.target, trust_remote_code=config.trust_remote_code)
    methods = build_methods(config, package)

    warmup = read_samples(config.datasets[0])[: config.warmup_prompts]
    for sample in tqdm(warmup, desc="warm-up", unit=" prompt", file=sys.stderr):
        prompt_ids = encode_prompt(package.tokenizer, sample.messages).to(package.target.device)
        for method in methods.values():
            method(prompt_ids)

    rotation = [0]
    auditor = DivergenceAuditor(package.target, config.tie_factor)
    records = {spec.name: measure_dataset(spec, methods, package, auditor, rotation) for spec in config.datasets}
    report = redact({  # written, logged and printed: no credentials
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine_info(config.device),
        "config": asdict(config),
        "model": {"uri": config.model, "fingerprint": package.fingerprint, "target": package.info["target"].get("spec")
                  or package.info["target"].get("architecture"), "drafter": package.info.get("drafter", {}),
                  "tree": package.info.get("tree", {}), "lookup": package.info.get("lookup"), "registry": package.info.get("registry", {})},
        "definitions": DEFINITIONS,
        "results": summarise(records),
        "samples": records,
    })
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n")
    (run_dir / REPORT_MD).write_text(format_markdown(report))
    files = [run_dir / REPORT_JSON, run_dir / REPORT_MD, *plot(report, run_dir)]
    if config.mlflow:
        report["mlflow_run_id"] = log_to_mlflow(config, tracking_uri, report, files)
    return report


def load_benchmark_config(path: str | Path, overrides: list[str] | None = None) -> BenchmarkConfig:
    return load_section(BenchmarkConfig, path, "benchmark", overrides)
