"""What a benchmark run reports: per-method summaries, the machine, report.md, the plots and the MLflow run."""

from __future__ import annotations

import os
import platform
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from pipelines.benchmark.config import ACCEPTED_PNG, BASELINES, SPEEDUP_PNG, BenchmarkConfig
from pipelines.tracking import ensure_experiment, redact


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
    experiment_id = ensure_experiment(MlflowClient(tracking_uri), config.mlflow.experiment, tracking_uri)
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
