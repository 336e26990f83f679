"""`run_benchmark`: read the datasets, run every method on every prompt in rotating order, audit, report."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipelines.benchmark.audit import DivergenceAuditor, first_divergence
from pipelines.benchmark.config import REPORT_JSON, REPORT_MD, BenchmarkConfig, BenchmarkError, DatasetSpec
from pipelines.benchmark.methods import build_methods
from pipelines.benchmark.report import (
    DEFINITIONS,
    format_markdown,
    log_to_mlflow,
    machine_info,
    plot,
    summarise,
)
from pipelines.inference import FalconPackage, encode_prompt, load_falcon
from pipelines.ray_utils import use_torch_threads
from pipelines.tracking import redact, resolve_tracking_uri


@dataclass
class Sample:
    id: str
    messages: list[dict[str, str]]
    turn: int = 1
    next_turn: str | None = None  # MT-Bench's second user turn


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


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    """Measure every method on every dataset; write and log the report; return it."""
    for spec in config.datasets:  # fail on a missing file before loading anything
        read_samples(spec)
    use_torch_threads(config.torch_threads)
    tracking_uri = resolve_tracking_uri(config.mlflow.tracking_uri)
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
    if config.mlflow.enabled:
        report["mlflow_run_id"] = log_to_mlflow(config, tracking_uri, report, files)
    return report
