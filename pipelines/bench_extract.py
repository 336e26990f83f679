"""Benchmark: the extraction pipeline's forward + write stages against a bare loop of target forwards.

    python -m pipelines.bench_extract --config jobs/configs/smollm2-demo.yaml [--repeats 3] [--set key=value]

Both sides process the same already-tokenised samples (from `--tokens-from`, by default the config's store,
so run the extraction first; generation is not timed), grouped into the same shards and forward batches:
- bare: one process, `torch` on every core, `forward_features` (forward + top-k + logsumexp) per batch,
  and for reference the plain HF forward (decoder + LM head, no top-k);
- pipeline: a local Ray, shard rows of token ids -> `ExtractFeatures` actor pool -> `FeatureStoreSink`
  into a scratch store, exactly as `pipelines.extract` runs them. End to end includes starting the
  actors (loading the target); steady state counts the tokens committed after the first shard, over
  the time from the first commit to the last.
Repeats alternate bare and pipeline runs so that load from other processes hits both alike; medians are
reported. Also: stored bytes per token against raw fp16 hidden states + top-k. Results go to
`<out>/bench.json` and `<out>/bench.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from feature_store import FeatureStore
from feature_store.shard import COMMIT_FILE, SHARDS_DIR
from pipelines.config import load_section
from pipelines.data import RejectCounter
from pipelines.extract import (
    ExtractConfig,
    feature_stages,
    forward_batches,
    forward_features,
    load_actor_target,
    read_records,
    store_metadata,
    tokenize_record,
    write_features,
)
from pipelines.ray_utils import ray_session

PIPELINE_GOAL, STORAGE_GOAL = 0.85, 1.0


def token_samples(cfg: ExtractConfig, source: str | None, tokenizer) -> tuple[list[dict[str, Any]], str]:
    """(samples with sample_id, input_ids, loss_mask; where they came from)."""
    if source and Path(source).exists():
        store = FeatureStore.open(source)
        samples = []
        for index in range(store.num_samples):
            sample = store.sample(index)
            samples.append({key: sample[key] for key in ("sample_id", "input_ids", "loss_mask")})
        return samples, f"store {source}"
    # No store yet: the inputs' conversations as they are (prompt-only ones keep just their prompt).
    records = read_records(cfg, RejectCounter())
    samples = []
    for record in records:
        sample = tokenize_record({**record, "generated_ids": []}, tokenizer, cfg.max_len)
        if isinstance(sample, dict):
            samples.append({"sample_id": record["id"], "input_ids": sample["input_ids"],
                            "loss_mask": sample["loss_mask"]})
    return samples, f"tokenised inputs {cfg.inputs} (no replies)"


def shard_rows(samples: list[dict[str, Any]], samples_per_shard: int) -> list[dict[str, Any]]:
    """Rows in the shape the tokenise stage hands to the forward stage."""
    rows = []
    for shard_id, start in enumerate(range(0, len(samples), samples_per_shard)):
        shard = samples[start : start + samples_per_shard]
        lengths = [len(s["input_ids"]) for s in shard]
        rows.append({
            "shard_id": shard_id,
            "info": "{}",
            "sample_ids": json.dumps([s["sample_id"] for s in shard]),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "input_ids": np.concatenate([s["input_ids"] for s in shard]).astype(np.int32),
            "loss_mask": np.concatenate([s["loss_mask"] for s in shard]).astype(np.uint8),
        })
    return rows


def bare_seconds(model, samples: list[dict[str, Any]], cfg: ExtractConfig, features: bool) -> float:
    """One pass over the samples in the pipeline's shards and forward batches, in this process."""
    from falcon.target import target_parts

    decoder, _, lm_head = target_parts(model)
    started = time.perf_counter()
    for start in range(0, len(samples), cfg.samples_per_shard):
        shard = samples[start : start + cfg.samples_per_shard]
        for positions in forward_batches([len(s["input_ids"]) for s in shard], cfg.forward_batch_tokens):
            sequences = [torch.as_tensor(shard[i]["input_ids"], dtype=torch.long) for i in positions]
            if features:
                forward_features(decoder, lm_head, sequences, cfg.topk)
            else:
                with torch.inference_mode():
                    for sequence in sequences:  # the HF forward, unbatched: logits for every token
                        model(input_ids=sequence[None], use_cache=False)
    return time.perf_counter() - started


def pipeline_run(rows, cfg: ExtractConfig, metadata, store_url: str) -> dict[str, float]:
    """End-to-end seconds, and steady-state tokens/s from the shards' commit times."""
    shutil.rmtree(store_url, ignore_errors=True)
    store = FeatureStore.create(store_url, metadata)
    started = time.time()
    results = write_features(
        feature_stages(ray.data.from_items(rows, override_num_blocks=len(rows)), cfg, store), cfg, store
    )
    elapsed = time.time() - started
    tokens = {r["shard_id"]: r["n_tokens"] for r in results}
    commits = sorted((os.path.getmtime(Path(store_url, SHARDS_DIR, r.name, COMMIT_FILE)), r.shard_id)
                     for r in FeatureStore.open(store_url).shards)
    steady_tokens = sum(tokens[shard_id] for _, shard_id in commits[1:])
    steady_s = commits[-1][0] - commits[0][0]
    return {"seconds": elapsed, "steady_tokens_per_s": steady_tokens / steady_s if steady_s > 0 else float("nan"),
            "first_commit_s": commits[0][0] - started}


def storage_figures(store_url: str) -> dict[str, Any]:
    store = FeatureStore.open(store_url)
    stored = sum(record.nbytes for record in store.shards) / store.num_tokens
    fp16 = dataclasses.replace(store.metadata, hidden_dtype="float16", topk_dtype="float16")
    return {
        "stored_bytes_per_token": round(stored, 1),
        "raw_fp16_bytes_per_token": fp16.raw_bytes_per_token(),
        "raw_fp16_layout": f"fp16 hidden {2 * fp16.hidden_size} + top-{fp16.topk} fp16 values and int32 ids "
                           f"{6 * fp16.topk} + fp32 logsumexp 4 + int32 id 4 + uint8 mask 1",
        "raw_store_dtypes_bytes_per_token": store.metadata.raw_bytes_per_token(),
        "stored_vs_raw_fp16": round(stored / fp16.raw_bytes_per_token(), 3),
        "hidden_dtype": store.metadata.hidden_dtype,
        "topk": store.metadata.topk,
        "topk_dtype": store.metadata.topk_dtype,
    }


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "platform": platform.platform()}


def markdown(result: dict[str, Any]) -> str:
    bare, pipe, store = result["bare"], result["pipeline"], result["storage"]
    lines = [
        "# Feature extraction benchmark",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; load average "
        f"{result['load_average_before']} before, {result['load_average_after']} after (shared machine).",
        f"Target {result['target']['architecture']} {result['target']['fingerprint']} in {result['dtype']}; "
        f"{result['samples']} samples, {result['tokens']} tokens from {result['source']}; "
        f"{result['repeats']} alternating repeats, medians.",
        "",
        "| | tokens/s | runs (s) |",
        "|---|---|---|",
        f"| bare loop, {bare['threads']} torch threads, forward + top-k + logsumexp | "
        f"{bare['tokens_per_s']:.0f} | {bare['runs_s']} |",
        f"| bare HF forward only (logits, unbatched) | {result['bare_logits']['tokens_per_s']:.0f} | "
        f"{result['bare_logits']['runs_s']} |",
        f"| pipeline end to end ({pipe['actors']} actors x {pipe['threads']} threads, incl. actor start) | "
        f"{pipe['tokens_per_s']:.0f} | {pipe['runs_s']} |",
        f"| pipeline steady state (first to last shard commit) | {pipe['steady_tokens_per_s']:.0f} | |",
        "",
        f"Pipeline / faster bare loop ({result['bare_best_tokens_per_s']:.0f} tokens/s): "
        f"**{result['pipeline_vs_bare']:.2f}** end to end, "
        f"**{result['pipeline_steady_vs_bare']:.2f}** steady state (goal >= {PIPELINE_GOAL}).",
        "",
        f"Storage: **{store['stored_bytes_per_token']} bytes/token** stored vs {store['raw_fp16_bytes_per_token']} "
        f"raw ({store['raw_fp16_layout']}): **{store['stored_vs_raw_fp16']}x** (goal <= {STORAGE_GOAL}x); "
        f"stored as {store['hidden_dtype']} hidden, top-{store['topk']} {store['topk_dtype']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tokens-from", default=None, help="store to take token ids from (default: the config's)")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the bare loop")
    parser.add_argument("--out", default="runs/bench_extract")
    args = parser.parse_args(argv)
    cfg = load_section(ExtractConfig, args.config, "extract", args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    torch.set_num_threads(args.threads)
    model, tokenizer = load_actor_target(cfg, dataclasses.replace(cfg.forward_actors, torch_threads=args.threads))
    from falcon.target import describe_target

    target = describe_target(model, tokenizer)
    samples, source = token_samples(cfg, args.tokens_from or cfg.store, tokenizer)
    samples = samples[: args.max_samples]
    n_tokens = sum(len(s["input_ids"]) for s in samples)
    rows = shard_rows(samples, cfg.samples_per_shard)
    metadata = store_metadata(cfg, target, tokenizer, [{"id": s["sample_id"]} for s in samples])
    print(f"bench: {len(samples)} samples, {n_tokens} tokens, {len(rows)} shards from {source}", file=sys.stderr)

    bare_features, bare_logits, pipeline = [], [], []
    # Ray runs its workers at nice 15; on a shared machine that alone would lose the race against the bare
    # loop (nice 0). Same priority for both (the local Ray's raylet reads this when it starts).
    os.environ.setdefault("RAY_worker_niceness", "0")
    with ray_session(cfg.ray):
        for repeat in range(args.repeats):
            bare_features.append(bare_seconds(model, samples, cfg, features=True))
            bare_logits.append(bare_seconds(model, samples, cfg, features=False))
            pipeline.append(pipeline_run(rows, cfg, metadata, str(out / "store")))
            print(f"bench: repeat {repeat + 1}: bare {n_tokens / bare_features[-1]:.0f} tokens/s, pipeline "
                  f"{n_tokens / pipeline[-1]['seconds']:.0f} end to end, "
                  f"{pipeline[-1]['steady_tokens_per_s']:.0f} steady", file=sys.stderr)

    # The honest baseline is the faster of the two bare loops.
    bare_tps = n_tokens / min(statistics.median(bare_features), statistics.median(bare_logits))
    pipeline_tps = n_tokens / statistics.median(run["seconds"] for run in pipeline)
    steady_tps = statistics.median(run["steady_tokens_per_s"] for run in pipeline)
    result = {
        "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "config": args.config,
        "overrides": args.overrides,
        "target": target,
        "dtype": cfg.dtype,
        "source": source,
        "samples": len(samples),
        "tokens": n_tokens,
        "shards": len(rows),
        "repeats": args.repeats,
        "bare": {"threads": args.threads, "runs_s": [round(s, 2) for s in bare_features],
                 "tokens_per_s": n_tokens / statistics.median(bare_features)},
        "bare_logits": {"runs_s": [round(s, 2) for s in bare_logits],
                        "tokens_per_s": n_tokens / statistics.median(bare_logits)},
        "bare_best_tokens_per_s": bare_tps,
        "pipeline": {"actors": cfg.forward_actors.num_actors, "threads": cfg.forward_actors.torch_threads,
                     "runs_s": [round(run["seconds"], 2) for run in pipeline], "tokens_per_s": pipeline_tps,
                     "steady_tokens_per_s": steady_tps,
                     "first_commit_s": [round(run["first_commit_s"], 2) for run in pipeline]},
        "pipeline_vs_bare": pipeline_tps / bare_tps,
        "pipeline_steady_vs_bare": steady_tps / bare_tps,
        "storage": storage_figures(str(out / "store")),
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
