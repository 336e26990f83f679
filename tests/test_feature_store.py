"""Feature store: round trips, exact top-k probabilities, atomic commits under crashes, checks, readers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from feature_store.dataset import FeatureDataset, collate_features
from feature_store.inspect import main as inspect_main
from feature_store.schema import (
    SampleError,
    StoreMetadata,
    StoreMismatchError,
    bfloat16_bits_to_float32,
    float32_to_bfloat16_bits,
)
from feature_store.store import FeatureStore

HIDDEN, VOCAB, TOPK = 64, 1000, 8


def make_metadata(**overrides) -> StoreMetadata:
    values = dict(
        target_fingerprint="target-abc123",
        tokenizer="tiny-tokenizer",
        hidden_size=HIDDEN,
        vocab_size=VOCAB,
        topk=TOPK,
        extraction_config={"max_len": 512, "samples_per_shard": 4},
    )
    return StoreMetadata(**(values | overrides))


def make_sample(
    rng: np.random.Generator, sample_id: str, n_tokens: int, topk: int = TOPK
) -> tuple[dict, np.ndarray]:
    """A synthetic sample plus the full-vocabulary logits [T, V] its top-k arrays come from."""
    logits = (rng.standard_normal((n_tokens, VOCAB)) * 3).astype(np.float32)
    sample = {
        "sample_id": sample_id,
        "input_ids": rng.integers(0, VOCAB, n_tokens),
        "loss_mask": rng.integers(0, 2, n_tokens).astype(bool),
        "hidden_states": rng.standard_normal((n_tokens, HIDDEN)).astype(np.float32) * 2,
    }
    if topk:
        top = np.argpartition(-logits, topk, axis=1)[:, :topk]  # unordered top-k, then sort those k
        indices = np.take_along_axis(top, np.argsort(-np.take_along_axis(logits, top, 1), axis=1), 1)
        sample["topk_values"] = np.take_along_axis(logits, indices, axis=1)
        sample["topk_indices"] = indices
        sample["logsumexp"] = np.log(np.exp(logits.astype(np.float64)).sum(axis=1)).astype(np.float32)
    return sample, logits


def make_samples(shard_id: int, n_samples: int = 4, max_tokens: int = 200, topk: int = TOPK) -> list[dict]:
    """Deterministic samples of one shard: the same shard id always gives the same data."""
    rng = np.random.default_rng(1000 + shard_id)
    return [
        make_sample(rng, f"conv-{shard_id}-{j}", int(rng.integers(1, max_tokens)), topk)[0]
        for j in range(n_samples)
    ]


def write_missing_shards(url: str, n_shards: int, max_tokens: int = 200) -> FeatureStore:
    """What an extraction job does: create or reopen the store, write every shard not yet committed."""
    store = FeatureStore.create(url, make_metadata())
    done = store.committed_shards()
    for shard_id in range(n_shards):
        if shard_id not in done:
            store.write_shard(shard_id, make_samples(shard_id, max_tokens=max_tokens))
    store.commit_manifest()
    return store


def shard_files(root: Path) -> dict[str, bytes]:
    """Every file under shards/, commit records without the store_id (each store has its own)."""
    files = {}
    for p in sorted((root / "shards").rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "COMMITTED.json":
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != "store_id"}).encode()
            files[str(p.relative_to(root))] = data
    return files


def checksums(store: FeatureStore) -> dict[str, str]:
    return {r.name: r.checksum for r in store.shards}


def assert_sample_equal(read: dict, written: dict, hidden_dtype: str, topk: int) -> None:
    assert read["sample_id"] == written["sample_id"]
    np.testing.assert_array_equal(read["input_ids"], np.asarray(written["input_ids"]))
    np.testing.assert_array_equal(read["loss_mask"], np.asarray(written["loss_mask"]).astype(np.uint8))
    hidden = written["hidden_states"]
    if isinstance(hidden, torch.Tensor):  # bfloat16 tensors must come back bit for bit
        expected_hidden = hidden.float().numpy()
    elif hidden_dtype == "bfloat16":  # float32 input: rounded to bfloat16 exactly as torch rounds
        expected_hidden = torch.from_numpy(hidden).to(torch.bfloat16).float().numpy()
    else:
        expected_hidden = hidden.astype(np.float16)
    assert read["hidden_states"].dtype == expected_hidden.dtype
    np.testing.assert_array_equal(read["hidden_states"], expected_hidden)
    if topk:
        np.testing.assert_array_equal(read["topk_values"], written["topk_values"].astype(np.float32))
        np.testing.assert_array_equal(read["topk_indices"], written["topk_indices"])
        np.testing.assert_array_equal(read["logsumexp"], written["logsumexp"])
    else:
        assert not {"topk_values", "topk_indices", "logsumexp"} & set(read)


@pytest.mark.parametrize(("hidden_dtype", "topk"), [("bfloat16", TOPK), ("float16", TOPK), ("float16", 0)])
def test_round_trip_is_exact(tmp_path, hidden_dtype, topk):
    store = FeatureStore.create(str(tmp_path), make_metadata(hidden_dtype=hidden_dtype, topk=topk))
    written = []
    for shard_id in range(3):
        samples = make_samples(shard_id, n_samples=3 + shard_id, topk=topk)
        if hidden_dtype == "bfloat16":  # torch bf16 input must come back bit for bit
            for s in samples:
                s["hidden_states"] = torch.from_numpy(s["hidden_states"]).to(torch.bfloat16)
        store.write_shard(shard_id, samples)
        written += samples

    store = FeatureStore.open(str(tmp_path))
    assert store.num_samples == len(written)
    assert store.num_tokens == sum(len(s["input_ids"]) for s in written)
    for i, sample in enumerate(written):
        assert_sample_equal(store.sample(i), sample, hidden_dtype, topk)
    on_disk = {p.name for p in (tmp_path / "shards" / "shard-00000").iterdir()}
    assert ("topk_values" in on_disk) == bool(topk)


def test_bfloat16_rounding_matches_torch():
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.standard_normal(10_000).astype(np.float32) * 100,
            # exact ties between two bfloat16 neighbours: round to even both ways
            (np.array([0x3F808000, 0x3F818000, 0xBF808000], dtype=np.uint32)).view(np.float32),
        ]
    )
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bfloat16_bits(values), expected)
    widened = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bfloat16_bits_to_float32(expected), widened)


@pytest.mark.parametrize("topk_dtype", ["float32", "float16"])
def test_topk_probabilities_exact_via_logsumexp(tmp_path, topk_dtype):
    store = FeatureStore.create(str(tmp_path), make_metadata(topk_dtype=topk_dtype))
    rng = np.random.default_rng(7)
    sample, logits = make_sample(rng, "only", 50)
    store.write_shard(0, [sample])
    read = FeatureStore.open(str(tmp_path)).sample(0)

    logits64 = logits.astype(np.float64)
    softmax = np.exp(logits64 - logits64.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    expected = np.take_along_axis(softmax, read["topk_indices"], axis=1)
    probs = np.exp(read["topk_values"].astype(np.float64) - read["logsumexp"][:, None])
    relative_error = np.abs(probs / expected - 1)
    if topk_dtype == "float32":
        assert relative_error.max() < 1e-5
    else:  # a logit v rounded to float16 moves by at most |v| * 2^-11
        assert (relative_error <= np.abs(logits.max()) * 2.0**-11 * 1.01 + 1e-5).all()
    np.testing.assert_array_equal(read["topk_indices"], np.argsort(-logits, axis=1)[:, :TOPK])


def test_random_access_across_shards(tmp_path):
    store = FeatureStore.create(str(tmp_path), make_metadata())
    expected = []
    for shard_id, n in [(0, 3), (2, 1), (5, 4)]:  # shard ids need not be contiguous
        samples = make_samples(shard_id, n_samples=n)
        store.write_shard(shard_id, samples)
        expected += samples
    store = FeatureStore.open(str(tmp_path))
    assert [r.shard_id for r in store.shards] == [0, 2, 5]
    assert store.sample_ids() == [s["sample_id"] for s in expected]
    np.testing.assert_array_equal(store.sample_lengths(), [len(s["input_ids"]) for s in expected])
    for i in np.random.default_rng(1).permutation(len(expected)):
        assert_sample_equal(store.sample(int(i)), expected[i], "bfloat16", TOPK)

    longest = int(np.argmax(store.sample_lengths()))
    full, part = store.sample(longest), store.sample(longest, 3, 9)
    for name in ("input_ids", "hidden_states", "topk_values", "logsumexp"):
        np.testing.assert_array_equal(part[name], full[name][3:9])
    for bad in (-1, len(expected)):
        with pytest.raises(IndexError, match="out of range"):
            store.sample(bad)
    with pytest.raises(IndexError, match="token range"):
        store.sample(0, 5, 5)


def test_split_is_deterministic_disjoint_and_stable_when_shards_are_added(tmp_path):
    store = FeatureStore.create(str(tmp_path), make_metadata())
    for shard_id in (0, 2, 4, 6):
        store.write_shard(shard_id, make_samples(shard_id, n_samples=50, max_tokens=5))
    store = FeatureStore.open(str(tmp_path))
    train, eval_ = store.split(0.2, seed=3)
    again_train, again_eval = FeatureStore.open(str(tmp_path)).split(0.2, seed=3)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(eval_, again_eval)
    assert not set(train) & set(eval_)
    assert sorted([*train, *eval_]) == list(range(200))
    assert 20 <= len(eval_) <= 60  # 40 expected
    assert set(store.split(0.2, seed=4)[1]) != set(eval_)

    ids = store.sample_ids()
    eval_ids = {ids[i] for i in eval_}
    for shard_id in (1, 5):  # in between: the global indices of most earlier samples shift
        store.write_shard(shard_id, make_samples(shard_id, n_samples=50, max_tokens=5))
    grown = FeatureStore.open(str(tmp_path))
    grown_ids = grown.sample_ids()
    grown_eval_ids = {grown_ids[i] for i in grown.split(0.2, seed=3)[1]}
    assert grown_eval_ids & set(ids) == eval_ids


def test_manifest_and_metadata_content(tmp_path):
    metadata = make_metadata()
    store = FeatureStore.create(str(tmp_path), metadata)
    written = {shard_id: make_samples(shard_id, n_samples=2 + shard_id) for shard_id in range(3)}
    records = [store.write_shard(shard_id, samples) for shard_id, samples in written.items()]
    assert store.read_manifest() is None
    assert store.commit_manifest() == records

    assert json.loads((tmp_path / "store.json").read_text()) == store.metadata.to_dict()
    assert store.metadata == metadata and len(store.metadata.store_id) == 32  # the id given at create
    rows = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
    assert [r["name"] for r in rows] == ["shard-00000", "shard-00001", "shard-00002"]
    for row, record, samples in zip(rows, records, written.values(), strict=True):
        shard_dir = tmp_path / "shards" / record.name
        assert row["n_samples"] == len(samples)
        assert row["n_tokens"] == sum(len(s["input_ids"]) for s in samples)
        assert row["n_loss_tokens"] == sum(int(s["loss_mask"].sum()) for s in samples)
        stored = sum(
            p.stat().st_size for p in shard_dir.rglob("*") if p.is_file() and p.name != "COMMITTED.json"
        )
        assert row["nbytes"] == stored
        assert row["checksum"] == record.checksum
        assert json.loads((shard_dir / "COMMITTED.json").read_text()) == record.to_json()
        assert record.store_id == store.metadata.store_id
    assert store.num_samples == 2 + 3 + 4  # commit_manifest refreshed the read view


def _fake_partial_shards(root: Path, scratch: Path) -> None:
    """Leave what killed writers leave: a half-written tmp dir and, as on object stores, a shard dir
    whose commit record never got written."""
    scratch_store = FeatureStore.create(str(scratch), make_metadata())
    for shard_id in (2, 3):
        scratch_store.write_shard(shard_id, make_samples(shard_id))
    tmp = root / "shards" / ".tmp-shard-00002-0123abcd"
    shutil.copytree(scratch / "shards" / "shard-00002", tmp)
    (tmp / "COMMITTED.json").unlink()
    shutil.rmtree(tmp / "hidden_states")
    no_record = root / "shards" / "shard-00003"
    shutil.copytree(scratch / "shards" / "shard-00003", no_record)
    (no_record / "COMMITTED.json").unlink()


def test_crash_leftovers_are_invisible_and_rerun_matches_clean_run(tmp_path):
    clean = write_missing_shards(str(tmp_path / "clean"), n_shards=5)

    crashed = tmp_path / "crashed"
    store = FeatureStore.create(str(crashed), make_metadata())
    for shard_id in (0, 1, 4):
        store.write_shard(shard_id, make_samples(shard_id))
    _fake_partial_shards(crashed, tmp_path / "scratch")

    assert store.committed_shards() == {0, 1, 4}
    reopened = FeatureStore.open(str(crashed))
    assert [r.shard_id for r in reopened.shards] == [0, 1, 4]
    report = reopened.verify()
    assert report.ok and sorted(report.partial) == [".tmp-shard-00002-0123abcd", "shard-00003"]

    rerun = write_missing_shards(str(crashed), n_shards=5)
    assert sorted(os.listdir(crashed / "shards")) == [f"shard-0000{i}" for i in range(5)]
    assert checksums(rerun) == checksums(clean)
    assert shard_files(crashed) == shard_files(tmp_path / "clean")
    assert rerun.verify().ok


def test_kill_9_mid_shard_then_rerun_matches_clean_run(tmp_path):
    clean = write_missing_shards(str(tmp_path / "clean"), n_shards=5)
    killed = tmp_path / "killed"
    marker = tmp_path / "inside-shard-2"
    # The writer pauses after the first array of shard 2 so the kill lands mid-shard however loaded the machine
    # is (polling for the temporary directory raced with zarr clearing it on a busy 2-core box).
    child = (
        f"import sys, time, pathlib; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import feature_store.shard as shard\n"
        "from test_feature_store import write_missing_shards\n"
        "write_array = shard._write_array\n"
        "def pausing(group, name, data):\n"
        "    write_array(group, name, data)\n"
        "    if group.attrs['shard_id'] == 2:\n"
        f"        pathlib.Path({str(marker)!r}).touch()\n"
        "        time.sleep(600)\n"
        "shard._write_array = pausing\n"
        f"write_missing_shards({str(killed)!r}, n_shards=5)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "writer exited before it was killed"
            assert time.monotonic() < deadline, "writer never reached shard 2"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    leftovers = os.listdir(killed / "shards")
    assert any(n.startswith(".tmp-shard-00002-") for n in leftovers), leftovers  # killed mid-shard
    assert FeatureStore.open(str(killed)).committed_shards() == {0, 1}

    rerun = write_missing_shards(str(killed), n_shards=5)
    assert checksums(rerun) == checksums(clean)
    assert shard_files(killed) == shard_files(tmp_path / "clean")


def test_already_committed_shard_is_left_alone(tmp_path):
    store = FeatureStore.create(str(tmp_path), make_metadata())
    first = store.write_shard(0, make_samples(0))
    before = shard_files(tmp_path)
    assert store.write_shard(0, make_samples(0)) == first  # e.g. a retried Ray task
    assert shard_files(tmp_path) == before


def test_mismatched_fingerprint_or_schema_is_refused(tmp_path):
    url = str(tmp_path)
    FeatureStore.create(url, make_metadata())
    assert FeatureStore.create(url, make_metadata()).metadata == make_metadata()  # same metadata: reopened
    with pytest.raises(StoreMismatchError, match=r"target_fingerprint: 'target-abc123' != 'target-other'"):
        FeatureStore.create(url, make_metadata(target_fingerprint="target-other"))
    with pytest.raises(StoreMismatchError, match=r"extraction_config"):
        FeatureStore.create(url, make_metadata(extraction_config={"max_len": 1024}))
    with pytest.raises(FileExistsError):
        FeatureStore.create(url, make_metadata(), exist_ok=False)
    with pytest.raises(StoreMismatchError, match=r"'target-abc123'.*'target-other'"):
        FeatureStore.open(url, expect_fingerprint="target-other")
    assert FeatureStore.open(url, expect_fingerprint="target-abc123").metadata.tokenizer == "tiny-tokenizer"

    stored = json.loads((tmp_path / "store.json").read_text())
    (tmp_path / "store.json").write_text(json.dumps(stored | {"schema_version": 99}))
    with pytest.raises(StoreMismatchError, match=r"schema_version 99.*schema_version 2"):
        FeatureStore.open(url)
    (tmp_path / "store.json").write_text(json.dumps(stored | {"schema_version": 1}))
    with pytest.raises(StoreMismatchError, match=r"schema_version 1.*no store_id.*--fresh"):
        FeatureStore.open(url)
    with pytest.raises(FileNotFoundError, match="no feature store"):
        FeatureStore.open(str(tmp_path / "elsewhere"))


def test_verify_names_corrupt_and_missing_shards(tmp_path):
    store = FeatureStore.create(str(tmp_path), make_metadata())
    for shard_id in range(4):
        store.write_shard(shard_id, make_samples(shard_id, max_tokens=400))
    store.commit_manifest()
    (tmp_path / "shards" / ".tmp-shard-00009-0123abcd" / "input_ids").mkdir(parents=True)
    report = store.verify()
    assert report.ok and report.partial == [".tmp-shard-00009-0123abcd"]
    assert store.remove_partial_shards() == [".tmp-shard-00009-0123abcd"]
    assert store.verify().partial == []

    chunk_file = tmp_path / "shards" / "shard-00001" / "hidden_states" / "c" / "0" / "0"
    data = bytearray(chunk_file.read_bytes())
    data[len(data) // 3] ^= 0xFF
    chunk_file.write_bytes(bytes(data))
    shutil.rmtree(tmp_path / "shards" / "shard-00002")

    report = FeatureStore.open(str(tmp_path)).verify()
    assert not report.ok
    assert list(report.corrupt) == ["shard-00001"] and "checksum" in report.corrupt["shard-00001"]
    assert report.missing == ["shard-00002"]
    assert "shard-00001" in str(report) and "shard-00002" in str(report)
    reader = FeatureStore.open(str(tmp_path))
    with pytest.raises(ValueError, match="checksum"):  # a damaged chunk raises, never returns garbage
        for i in range(reader.num_samples):
            reader.sample(i)


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls(tmp_path, scheme):
    url = f"memory://feature-store-test-{uuid.uuid4().hex}" if scheme == "memory" else f"file://{tmp_path}"
    fs, root = fsspec.core.url_to_fs(url)
    try:
        store = FeatureStore.create(url, make_metadata())
        samples = {shard_id: make_samples(shard_id) for shard_id in range(3)}
        for shard_id in (0, 2):
            store.write_shard(shard_id, samples[shard_id])
        # A writer killed on an object store leaves the shard's files without a commit record.
        fs.makedirs(f"{root}/shards/shard-00001/input_ids", exist_ok=True)
        fs.pipe_file(f"{root}/shards/shard-00001/input_ids/zarr.json", b"{half written")
        assert store.committed_shards() == {0, 2}
        store.write_shard(1, samples[1])
        store.commit_manifest()

        reopened = FeatureStore.open(url, expect_fingerprint="target-abc123")
        assert reopened.num_samples == 12
        for i, sample in enumerate([s for shard_id in range(3) for s in samples[shard_id]]):
            assert_sample_equal(reopened.sample(i), sample, "bfloat16", TOPK)
        assert reopened.verify().ok
        assert reopened.read_manifest().num_rows == 3
    finally:
        if scheme == "memory":
            fs.rm(root, recursive=True)


def test_write_shard_rejects_bad_samples_without_writing(tmp_path):
    store = FeatureStore.create(str(tmp_path), make_metadata(hidden_dtype="float16"))

    def broken(**changes):
        sample = make_samples(0, n_samples=1)[0]
        for key, value in changes.items():
            if value is None:
                del sample[key]
            else:
                sample[key] = value
        return [sample]

    t = len(make_samples(0, n_samples=1)[0]["input_ids"])
    cases = [
        (broken(hidden_states=None), "missing key 'hidden_states'"),
        (
            broken(hidden_states=np.zeros((t, HIDDEN + 1))),
            r"hidden_states has shape .* expected .*hidden_size",
        ),
        (broken(hidden_states=np.full((t, HIDDEN), np.nan)), "NaN or inf"),
        (broken(hidden_states=np.full((t, HIDDEN), 1e6)), "overflows float16"),
        (broken(input_ids=np.full(t, VOCAB)), "outside"),
        (broken(input_ids=np.zeros(0, dtype=int)), "non-empty 1-D"),
        (broken(loss_mask=np.full(t, 2)), "only 0 and 1"),
        (broken(topk_indices=np.zeros((t, TOPK), dtype=np.float32)), "integer dtype"),
        (broken(logsumexp=np.full(t, -100.0)), "exceed logsumexp"),
        (broken(sample_id=""), "sample_id"),
        (make_samples(0, n_samples=1) * 2, "duplicate sample_id"),
        ([], "no samples"),
    ]
    for samples, message in cases:
        with pytest.raises(SampleError, match=message):
            store.write_shard(0, samples)
    assert store.committed_shards() == set()
    assert os.listdir(tmp_path / "shards") == []


def test_token_counts_over_loss_masked_tokens(tmp_path):
    store = FeatureStore.create(str(tmp_path), make_metadata())
    written = []
    for shard_id in range(3):
        samples = make_samples(shard_id)
        store.write_shard(shard_id, samples)
        written += samples
    store = FeatureStore.open(str(tmp_path))

    def expected(samples):
        ids = np.concatenate([s["input_ids"][s["loss_mask"]] for s in samples])
        return np.bincount(ids, minlength=VOCAB)

    np.testing.assert_array_equal(store.token_counts(), expected(written))
    subset = [1, 4, 5, 11]
    np.testing.assert_array_equal(store.token_counts(subset), expected([written[i] for i in subset]))


def test_feature_dataset_windows_and_collate(tmp_path):
    store = FeatureStore.create(str(tmp_path), make_metadata())
    store.write_shard(0, make_samples(0, n_samples=6, max_tokens=60))
    store = FeatureStore.open(str(tmp_path))
    lengths = store.sample_lengths()
    indices = [5, 0, 3]

    whole = FeatureDataset(store, indices)
    assert len(whole) == 3 and len(whole[0]["input_ids"]) == lengths[5]

    dataset = FeatureDataset(store, indices, max_len=16)
    assert len(dataset) == sum(-(-lengths[i] // 16) for i in indices)
    for sample_index in indices:  # windows tile each sample exactly once, in order
        rows = dataset.windows[dataset.windows[:, 0] == sample_index]
        assert rows[0, 1] == 0 and rows[-1, 2] == lengths[sample_index]
        assert (rows[1:, 1] == rows[:-1, 2]).all() and (rows[:, 2] - rows[:, 1] <= 16).all()
        pieces = [dataset[int(i)] for i in np.flatnonzero(dataset.windows[:, 0] == sample_index)]
        full = store.sample(sample_index)
        np.testing.assert_array_equal(torch.cat([p["input_ids"] for p in pieces]).numpy(), full["input_ids"])
        np.testing.assert_array_equal(
            torch.cat([p["hidden_states"] for p in pieces]).float().numpy(), full["hidden_states"]
        )

    items = [dataset[i] for i in range(len(dataset))]
    assert items[0]["hidden_states"].dtype == torch.bfloat16
    assert items[0]["input_ids"].dtype == torch.int64 and items[0]["topk_indices"].dtype == torch.int64
    batch = FeatureDataset.collate(items)
    n, t = len(items), max(len(item["input_ids"]) for item in items)
    assert batch["hidden_states"].shape == (n, t, HIDDEN) and batch["topk_values"].shape == (n, t, TOPK)
    for row, item in enumerate(items):
        length = len(item["input_ids"])
        assert batch["attention_mask"][row].sum() == length
        assert torch.equal(batch["hidden_states"][row, :length], item["hidden_states"])
        assert torch.equal(batch["loss_mask"][row, :length], item["loss_mask"])
        assert not batch["loss_mask"][row, length:].any() and not batch["hidden_states"][row, length:].any()
    # DataLoader workers get a forked or pickled copy of the store; zarr must work there too.
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, num_workers=2, collate_fn=FeatureDataset.collate
    )
    assert sum(int(b["attention_mask"].sum()) for b in loader) == sum(int(lengths[i]) for i in indices)

    padded = collate_features(items[:2], pad_token_id=7)
    short = int(padded["attention_mask"].sum(1).argmin())
    assert (padded["input_ids"][short][~padded["attention_mask"][short]] == 7).all()
    with pytest.raises(ValueError, match="max_len"):
        FeatureDataset(store, max_len=0)
    with pytest.raises(IndexError):
        FeatureDataset(store, [6])


def test_feature_dataset_context_tokens_trims_prompts(tmp_path):
    store = FeatureStore.create(str(tmp_path), make_metadata())
    samples = make_samples(0, n_samples=6, max_tokens=60)
    samples[2]["loss_mask"][:] = False  # no loss anywhere: its windows start at its last token
    store.write_shard(0, samples)
    store = FeatureStore.open(str(tmp_path))
    lengths = store.sample_lengths()
    firsts = store.first_loss_positions()
    for sample, first in zip(samples, firsts, strict=True):
        hits = np.flatnonzero(sample["loss_mask"])
        assert first == (hits[0] if hits.size else len(sample["loss_mask"]))

    dataset = FeatureDataset(store, max_len=8, context_tokens=3)
    for sample_index in range(6):
        rows = dataset.windows[dataset.windows[:, 0] == sample_index]
        start = min(max(firsts[sample_index] - 3, 0), lengths[sample_index] - 1)
        assert rows[0, 1] == start and rows[-1, 2] == lengths[sample_index]
        assert (rows[1:, 1] == rows[:-1, 2]).all() and (rows[:, 2] - rows[:, 1] <= 8).all()
        loss_tokens = sum(int(dataset[int(i)]["loss_mask"].sum()) for i in np.flatnonzero(dataset.windows[:, 0] == sample_index))
        assert loss_tokens == samples[sample_index]["loss_mask"].sum()  # no loss-masked token is dropped
    untrimmed = FeatureDataset(store, context_tokens=10_000)
    np.testing.assert_array_equal(untrimmed.windows[:, 1], 0)
    with pytest.raises(ValueError, match="context_tokens"):
        FeatureDataset(store, context_tokens=-1)


def test_inspect_prints_summary(tmp_path, capsys):
    store = write_missing_shards(str(tmp_path), n_shards=2)
    assert inspect_main([str(tmp_path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "target           target-abc123" in out
    assert f"samples          {store.num_samples}" in out
    assert "2 committed (ids 0..1)" in out and "up to date" in out and "OK" in out
    assert inspect_main([str(tmp_path / "missing")]) == 2
