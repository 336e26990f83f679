"""Feature extraction on a local Ray with tiny random targets: round trip, kill -9 and resume, rejects, refusal."""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from falcon.generate import SamplingConfig, autoregressive_generate
from falcon.target import load_target, target_fingerprint, target_parts
from falcon.testing import make_tiny_target
from feature_store import FeatureStore
from feature_store.lock import LOCK_FILE, WriterLock
from feature_store.schema import bfloat16_bits_to_float32, float32_to_bfloat16_bits
from feature_store.storage import Location
from pipelines.extract import ExtractConfig, ExtractError, run
from pipelines.extract.records import record_seed
from pipelines.extract.run import open_store
from pipelines.extract.target_features import forward_batches, forward_features
from pipelines.run_config import load_stage
from pipelines.tokenization import tokenize_conversation
from tests.servers import ACCESS_KEY, SECRET_KEY, s3_server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "jobs" / "configs" / "tiny.yaml"
JOB = REPO / "jobs" / "extract_features.py"
MAX_NEW_TOKENS = 12
# Sampled self-distillation: the replies must still be reproducible per record (the resume test relies on it).
SAMPLING = SamplingConfig(temperature=0.8, top_p=0.95, seed=7)
PROMPTS = [
    "What is the capital of France?",
    "Explain why the sky is blue.",
    "Please write a short story about a robot who learns to paint.",
    "How do I sort a list in Python?",
    "Give me five ideas for a birthday party.",
    "Translate \"good morning\" into French and Spanish.",
    "How many clips did Natalia sell altogether in April and May?",
    "Summarise the following text in three sentences. Water boils at 100 degrees Celsius at sea level.",
    "A train leaves at 9:45 and arrives at 13:10; how long is the trip?",
    "Can you help me plan a trip to Japan for two weeks in spring?",
    "What is the capital of Italy?",
]
DIALOGUES = [
    [{"role": "user", "content": "What is the capital of Italy?"},
     {"role": "assistant", "content": "The capital of Italy is Rome."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Hello, how are you today?"},
     {"role": "assistant", "content": "I am fine, thank you. How can I help you?"},
     {"role": "user", "content": "Tell me about Berlin."},
     {"role": "assistant", "content": "Berlin is the capital of Germany."}],
    # Ends with an unanswered user turn: the target writes the last reply.
    [{"role": "user", "content": "def add(a, b): what does it return?"},
     {"role": "assistant", "content": "It returns a + b."},
     {"role": "user", "content": "And for [1, 2, 3]?"}],
]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("extract")


@pytest.fixture(scope="module")
def target_dir(workdir):
    make_tiny_target("llama", save_dir=workdir / "target")
    return workdir / "target"


@pytest.fixture(scope="module")
def inputs(workdir):
    """16 records mixing ShareGPT and OpenAI rows, prompt-only (to generate) and answered ones."""
    rows = [{"id": f"prompt-{i}", "conversations": [{"from": "human", "value": text}]}
            for i, text in enumerate(PROMPTS)]
    rows += [{"id": f"dialogue-{i}", "messages": messages} for i, messages in enumerate(DIALOGUES)]
    rows += [{"id": "prompt-sys", "messages": [{"role": "system", "content": "Answer in French."},
                                               {"role": "user", "content": "Where is Madrid?"}]},
             {"id": "prompt-code", "messages": [{"role": "user", "content": "Write fibonacci in Python."}]}]
    path = workdir / "inputs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, rows


def extract_main(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("extract_features_job", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job.main(argv)


def make_config(target_dir, input_path, store, run_dir, *more: str) -> ExtractConfig:
    overrides = [f"target={target_dir}", f"inputs=[{input_path}]", f"store={store}", f"run_dir={run_dir}",
                 "max_samples=null", f"generation.max_new_tokens={MAX_NEW_TOKENS}",
                 f"generation.temperature={SAMPLING.temperature}", f"generation.top_p={SAMPLING.top_p}",
                 f"generation.seed={SAMPLING.seed}", *more]
    return load_stage("extract", TINY_CONFIG, overrides)


def cli_overrides(cfg: ExtractConfig) -> list[str]:
    return ["--set", f"target={cfg.target}", "--set", f"inputs={cfg.inputs}", "--set", f"store={cfg.store}",
            "--set", f"run_dir={cfg.run_dir}", "--set", "max_samples=null",
            "--set", f"generation.max_new_tokens={MAX_NEW_TOKENS}",
            "--set", f"generation.temperature={cfg.generation.temperature}",
            "--set", f"generation.top_p={cfg.generation.top_p}", "--set", f"generation.seed={cfg.generation.seed}"]


@pytest.fixture(scope="module")
def reference_run(local_ray, workdir, target_dir, inputs):
    """One uninterrupted extraction, shared by the round-trip, refusal and resume tests."""
    cfg = make_config(target_dir, inputs[0], workdir / "store-ref", workdir / "run-ref")
    summary = run(cfg)
    return cfg, summary


@pytest.fixture(scope="module")
def greedy_run(local_ray, workdir, target_dir, inputs):
    """The same extraction with greedy replies, whose features come from the decode that wrote them."""
    cfg = make_config(target_dir, inputs[0], workdir / "store-greedy", workdir / "run-greedy",
                      "generation.temperature=0.0")
    return cfg, run(cfg)


@pytest.mark.parametrize("run_fixture", ["reference_run", "greedy_run"])
def test_round_trip_features_equal_unbatched_target_forward(run_fixture, request, target_dir, inputs):
    cfg, summary = request.getfixturevalue(run_fixture)
    sampling = SamplingConfig(cfg.generation.temperature, cfg.generation.top_p, cfg.generation.seed)
    _, rows = inputs
    model, tokenizer = load_target(target_dir, dtype=cfg.dtype)
    decoder, _, lm_head = target_parts(model)
    store = FeatureStore.open(cfg.store, expect_fingerprint=target_fingerprint(model, tokenizer))

    assert summary["rejects"] == {} and summary["samples_written"] == len(rows) == store.num_samples
    assert summary["replies_generated"] == len(PROMPTS) + 3  # 11 prompts, 2 more prompt-only, 1 open dialogue
    assert store.verify().ok
    assert store.sample_ids() == [row["id"] for row in rows]  # input order, nothing lost

    lengths = store.sample_lengths()
    padded_batches = [b for s in range(0, len(rows), 2) for b in forward_batches(lengths[s:s + 2], 1024)
                      if len(b) > 1 and len({lengths[s + i] for i in b}) > 1]
    assert padded_batches, "the extraction must have run padded batches of unequal lengths"

    for index, row in enumerate(rows):
        stored = store.sample(index)
        messages = row.get("messages") or [{"role": "user", "content": row["conversations"][0]["value"]}]
        prompt = tokenize_conversation(messages, tokenizer, cfg.max_len, sample_id=row["id"])
        input_ids, loss_mask = prompt["input_ids"], prompt["loss_mask"]
        if prompt["needs_generation"]:  # the reply must be the target's own, sampled ones seeded per record
            seed = record_seed(sampling.seed, row["id"])
            reply = autoregressive_generate(model, torch.as_tensor(input_ids, dtype=torch.long), MAX_NEW_TOKENS,
                                            tokenizer.eos_token_id,
                                            SamplingConfig(sampling.temperature, sampling.top_p, seed)).tokens
            input_ids = np.concatenate([input_ids, reply])
            loss_mask = np.concatenate([loss_mask, np.ones(len(reply), np.uint8)])
        np.testing.assert_array_equal(stored["input_ids"], input_ids)
        np.testing.assert_array_equal(stored["loss_mask"], loss_mask)
        assert stored["loss_mask"].sum() > 0

        expected = forward_features(decoder, lm_head, [torch.as_tensor(input_ids, dtype=torch.long)], cfg.topk)[0]
        hidden = expected["hidden_states"].numpy()
        # bf16 storage: equal to the unbatched forward rounded to bf16, up to one bf16 step for float noise.
        np.testing.assert_allclose(stored["hidden_states"], bfloat16_bits_to_float32(float32_to_bfloat16_bits(hidden)),
                                   rtol=2**-7, atol=1e-6)
        full_logits = lm_head(torch.as_tensor(hidden)).detach().float()  # (T, vocab)
        np.testing.assert_allclose(stored["logsumexp"], full_logits.logsumexp(-1).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stored["topk_values"], expected["topk_values"].numpy(), rtol=1e-5, atol=1e-5)
        # Indices may swap only between near-equal logits: the stored ids must carry the stored values.
        np.testing.assert_allclose(full_logits.gather(1, torch.as_tensor(stored["topk_indices"]).long()).numpy(),
                                   stored["topk_values"], rtol=1e-5, atol=1e-5)


def test_a_target_that_does_not_load_fails_the_job_with_one_line(local_ray, workdir, inputs, capsys):
    # It fails inside a Ray task, which re-raises it with the worker's traceback as its message.
    missing = make_config(workdir / "no-such-target", inputs[0], workdir / "store-none", workdir / "run-none")
    assert extract_main(["--config", str(TINY_CONFIG), *cli_overrides(missing)]) == 1
    err = capsys.readouterr().err
    assert "extract_features: error:" in err and "no-such-target" in err, err[-3000:]
    assert "Traceback" not in err and 'File "' not in err, err[-3000:]


def test_store_of_another_target_is_refused_with_a_clear_message(reference_run, workdir, inputs, capsys):
    cfg, _ = reference_run
    make_tiny_target("llama", seed=1, save_dir=workdir / "other-target")
    other = make_config(workdir / "other-target", inputs[0], cfg.store, workdir / "run-other")
    with pytest.raises(ExtractError, match="holds features of target") as refused:
        run(other)
    stored_fingerprint = FeatureStore.open(cfg.store).metadata.target_fingerprint
    assert stored_fingerprint in str(refused.value) and "--fresh" in str(refused.value)

    capsys.readouterr()
    argv = ["--config", str(TINY_CONFIG), *cli_overrides(other)]
    assert extract_main(argv) == 1
    err = capsys.readouterr().err
    assert "extract_features: error:" in err and "holds features of target" in err and "Traceback" not in err
    assert FeatureStore.open(cfg.store).num_samples == len(inputs[1])  # untouched


@pytest.fixture(scope="module")
def s3(workdir):
    with s3_server(workdir) as server:
        yield server


def test_kill_9_mid_run_on_s3_then_rerun_gives_the_identical_store(reference_run, local_ray, workdir, inputs, s3):
    """The job SIGKILLed after its first commit into a bucket on an S3 API server, credentials in the config
    (redacted wherever they go), then re-run. (On local disk the same kill is a store-level test in
    test_feature_store, and a lost node mid-extraction then a re-run is in test_cluster.)"""
    reference_cfg, _ = reference_run
    run_dir, store = workdir / "run-killed", f"s3://{s3.bucket}/store-killed"
    more = [f"storage_options={json.dumps({'key': ACCESS_KEY, 'secret': SECRET_KEY, **s3.storage_options})}"]
    cfg = make_config(reference_cfg.target, reference_cfg.inputs[0], store, run_dir, *more)
    location = Location(str(cfg.store), cfg.storage_options)
    log_path = workdir / "killed-run.log"
    log = open(log_path, "w")
    job = subprocess.Popen(
        [sys.executable, str(JOB), "--config", str(TINY_CONFIG), *cli_overrides(cfg),
         *(arg for item in more for arg in ("--set", item)), "--set", f"ray.address={local_ray}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    deadline = time.monotonic() + 120
    while not location.glob(location.path("shards", "shard-*", "COMMITTED.json")):
        assert job.poll() is None, f"the job ended before committing a shard; see {log.name}"
        assert time.monotonic() < deadline, "no shard committed within 120 s"
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    log.close()

    open_killed = partial(FeatureStore.open, str(cfg.store), storage_options=cfg.storage_options)
    n_shards = len(FeatureStore.open(reference_cfg.store).shards)
    committed = open_killed().committed_shards()
    assert 0 < len(committed) < n_shards, f"kill landed after the run ended ({len(committed)} shards)"
    time.sleep(2)  # let Ray reap the dead driver's actors
    _, rows = inputs
    to_reply = sum(1 for i, row in enumerate(rows) if i // cfg.samples_per_shard not in committed
                   and ("conversations" in row or row["messages"][-1]["role"] == "user"))

    summary = run(cfg)
    assert summary["shards_skipped"] == len(committed)
    assert summary["shards_written"] == n_shards - len(committed)
    assert summary["replies_generated"] == to_reply  # the shards not committed are done again, identically

    resumed, reference = open_killed(), FeatureStore.open(reference_cfg.store)
    assert resumed.metadata == reference.metadata
    assert resumed.read_manifest().to_pylist() == reference.read_manifest().to_pylist()  # incl. checksums
    assert resumed.verify().ok and not resumed.verify().partial
    written = [log_path, *run_dir.rglob("*")]
    assert not [p for p in written if p.is_file() and SECRET_KEY.encode() in p.read_bytes()]
    objects = location.fs.find(location.root)
    assert objects and not [p for p in objects if SECRET_KEY.encode() in location.fs.cat_file(p)]


def test_a_truncated_commit_record_is_reported_and_the_shard_extracted_again(reference_run, workdir, caplog):
    reference_cfg, _ = reference_run
    store = workdir / "store-damaged"
    shutil.copytree(reference_cfg.store, store)
    record = store / "shards" / "shard-00001" / "COMMITTED.json"
    record.write_bytes(record.read_bytes()[:50])
    cfg = make_config(reference_cfg.target, reference_cfg.inputs[0], store, workdir / "run-damaged")

    summary = run(cfg)
    assert "shard-00001" in caplog.text and "COMMITTED.json" in caplog.text
    assert summary["shards_written"] == 1 and summary["replies_generated"] > 0
    resumed, reference = FeatureStore.open(cfg.store), FeatureStore.open(reference_cfg.store)
    assert resumed.read_manifest().to_pylist() == reference.read_manifest().to_pylist()
    assert resumed.verify().ok


def damage_bytes(path: Path) -> None:
    """Overwrite 16 bytes in the middle of a file, as a bad disk sector or a torn copy would."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(255 - b for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


def test_a_committed_shard_with_corrupt_data_is_named_removed_and_extracted_again(reference_run, workdir, capsys):
    reference_cfg, _ = reference_run
    store = workdir / "store-corrupt"
    shutil.copytree(reference_cfg.store, store)
    chunk_files = sorted((store / "shards" / "shard-00001" / "hidden_states").rglob("c/*/*"))
    assert chunk_files, "the hidden states of shard-00001 must be in a chunk file"
    damage_bytes(chunk_files[0])  # its COMMITTED.json stays intact
    assert not FeatureStore.open(str(store)).verify().ok
    cfg = make_config(reference_cfg.target, reference_cfg.inputs[0], store, workdir / "run-corrupt")
    n_shards = len(FeatureStore.open(reference_cfg.store).shards)

    capsys.readouterr()
    summary = run(cfg)
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == n_shards - 1
    assert list(summary["shards_corrupt"]) == ["shard-00001"]
    assert "shard-00001" in capsys.readouterr().out  # the printed summary names it
    resumed, reference = FeatureStore.open(cfg.store), FeatureStore.open(reference_cfg.store)
    assert resumed.read_manifest().to_pylist() == reference.read_manifest().to_pylist()  # incl. checksums
    assert resumed.verify().ok and not resumed.verify().partial


def test_a_second_job_on_a_locked_store_is_refused_with_a_clear_message(reference_run, workdir, capsys):
    reference_cfg, _ = reference_run
    cfg = make_config(reference_cfg.target, reference_cfg.inputs[0], workdir / "store-locked", workdir / "run-locked")
    first_job = WriterLock(Location(cfg.store)).acquire()
    try:
        with pytest.raises(ExtractError, match="being written by another job"):
            run(cfg)
        capsys.readouterr()
        assert extract_main(["--config", str(TINY_CONFIG), *cli_overrides(cfg)]) == 1
        err = capsys.readouterr().err
        assert "extract_features: error:" in err and LOCK_FILE in err and "Traceback" not in err
    finally:
        first_job.release()
    assert not (Path(cfg.store) / "store.json").exists()  # the refused job wrote nothing


def steal_lock_after_first_commit(store: Path, stop: threading.Event) -> None:
    """What another job does that deleted a live lock by hand: take the store over once a shard is committed."""
    while not stop.is_set() and not list((store / "shards").glob("shard-*/COMMITTED.json")):
        time.sleep(0.01)
    if not stop.is_set():
        holder = {"owner": "the-other-job", "host": "other-host", "pid": 1, "created": time.time(),
                  "heartbeat": time.time()}
        Location(str(store)).write_json(str(store / LOCK_FILE), holder)


def test_a_lock_lost_inside_a_shard_writer_fails_the_job_with_one_clear_line(local_ray, workdir, target_dir, inputs,
                                                                             capsys):
    cfg = make_config(target_dir, inputs[0], workdir / "store-stolen", workdir / "run-stolen")
    stop = threading.Event()
    thief = threading.Thread(target=steal_lock_after_first_commit, args=(Path(cfg.store), stop), daemon=True)
    thief.start()
    capsys.readouterr()
    try:
        code = extract_main(["--config", str(TINY_CONFIG), *cli_overrides(cfg)])
    finally:
        stop.set()
        thief.join()
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("extract_features: error:")]
    assert code == 1 and len(error_lines) == 1, err
    assert "no longer holds the writer lock" in error_lines[0] and "the-other-job" in error_lines[0]
    assert "write shard" in error_lines[0]  # refused inside a Ray shard writer, not by the driver's last check
    assert "Traceback" not in error_lines[0] and "RayTaskError" not in error_lines[0]
    assert FeatureStore.open(cfg.store).committed_shards()  # the shards committed before the take-over stay


def test_fresh_recreates_the_store_under_the_jobs_lock(reference_run, workdir):
    reference_cfg, _ = reference_run
    store = workdir / "store-fresh"
    shutil.copytree(reference_cfg.store, store)
    cfg = make_config(reference_cfg.target, reference_cfg.inputs[0], store, workdir / "run-fresh")
    old = FeatureStore.open(cfg.store)
    with WriterLock(Location(cfg.store)) as lock:
        new = open_store(cfg, old.metadata, fresh=True)
        assert new.num_samples == 0 and new.metadata.store_id != old.metadata.store_id
        assert Location(cfg.store).read_json(str(store / LOCK_FILE))["owner"] == lock.owner  # still held


def test_bad_rows_are_counted_by_reason_and_the_rest_extracted(local_ray, workdir, target_dir):
    good = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."}]
    too_long_prompt = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 60},
                       {"role": "assistant", "content": "Yes."}]
    long_reply = [{"role": "user", "content": "Count."},
                  {"role": "assistant", "content": "1 2 3 4 5 6 7 8 9 10 " * 40}]
    lines = [
        json.dumps({"id": "long-1", "messages": too_long_prompt}),  # over_long (tokenise stage, in a worker)
        json.dumps({"id": "long-2", "messages": too_long_prompt}),  # same: shard 0 ends up empty
        json.dumps({"id": "good-1", "messages": good}),
        "{not json",  # invalid_json
        json.dumps({"id": "empty", "messages": []}),  # empty_conversation
        json.dumps({"messages": [{"content": "who am I?"}]}),  # missing_role
        json.dumps({"messages": [{"role": "tool", "content": "42"}]}),  # unknown_role
        json.dumps({"messages": [{"role": "assistant", "content": "Hi."}]}),  # no_user_turn
        json.dumps({"id": "prompt-only", "messages": good[:1]}),  # no_assistant_turn: generation is off
        json.dumps({"id": "good-1", "messages": good}),  # duplicate_id
        json.dumps({"id": "good-2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}),
        json.dumps({"id": "truncated", "messages": long_reply}),  # kept, cut to max_len
    ]
    path = workdir / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = make_config(target_dir, path, workdir / "store-bad", workdir / "run-bad", "generation.enabled=false",
                      "max_len=128")
    summary = run(cfg)

    assert summary["rejects"] == {
        "over_long": 2, "invalid_json": 1, "empty_conversation": 1, "missing_role": 1, "unknown_role": 1,
        "no_user_turn": 1, "no_assistant_turn": 1, "duplicate_id": 1, "truncated": 1,
    }
    assert summary["rejected"] == 9
    logged = [json.loads(line) for line in (Path(cfg.run_dir) / "rejects.jsonl").read_text().splitlines()]
    assert sorted(entry["reason"] for entry in logged) == sorted(
        ["over_long"] * 2 + ["invalid_json", "empty_conversation", "missing_role", "unknown_role",
                             "no_user_turn", "no_assistant_turn", "duplicate_id"])
    assert {e["sample_id"] for e in logged if e["reason"] == "over_long"} == {"long-1", "long-2"}

    store = FeatureStore.open(cfg.store)
    assert store.sample_ids() == ["good-1", "good-2", "truncated"]
    assert store.committed_shards() == {1, 2}  # shard 0 lost both samples; nothing to store
    assert int(store.sample_lengths()[-1]) == 128
