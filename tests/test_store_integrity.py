"""Feature store integrity: store identity, damaged commit records and manifests, a leak-free split."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_feature_store import checksums, make_metadata, make_sample, make_samples, write_missing_shards

import feature_store.shard as shard_module
from feature_store.inspect import main as inspect_main
from feature_store.schema import StoreMismatchError
from feature_store.store import FeatureStore


def truncate(path: Path, keep: int = 40) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_a_writer_of_a_recreated_store_cannot_commit_into_it(tmp_path, monkeypatch):
    url = tmp_path / "store"
    old = FeatureStore.create(str(url), make_metadata())
    old.write_shard(0, make_samples(0))

    shutil.rmtree(url)  # what `--fresh` does while a writer of the old store may still run
    new = FeatureStore.create(str(url), make_metadata())
    with pytest.raises(StoreMismatchError, match="re-created"):
        old.write_shard(1, make_samples(1))
    assert new.committed_shards() == set() and list((url / "shards").iterdir()) == []

    # Re-created while the old writer is inside a shard: it must not commit it at the end either.
    write_array, recreated = shard_module._write_array, []

    def recreate_midway(group, name, data):
        write_array(group, name, data)
        if not recreated:
            recreated.append(True)
            shutil.rmtree(url)
            FeatureStore.create(str(url), make_metadata())

    monkeypatch.setattr(shard_module, "_write_array", recreate_midway)
    with pytest.raises(StoreMismatchError, match="re-created"):
        new.write_shard(2, make_samples(2))
    monkeypatch.undo()
    latest = FeatureStore.open(str(url))
    assert latest.num_samples == 0 and latest.verify().ok


def test_a_shard_of_another_store_identity_is_reported_ignored_and_replaced(tmp_path, caplog):
    url, other = tmp_path / "store", tmp_path / "other"
    write_missing_shards(str(url), n_shards=2)
    write_missing_shards(str(other), n_shards=3)
    # Same metadata, same shard bytes, but committed for the other store (a writer that outlived a re-create).
    shutil.copytree(other / "shards" / "shard-00002", url / "shards" / "shard-00002")

    with caplog.at_level(logging.WARNING):
        store = FeatureStore.open(str(url))
    assert "shard-00002" in caplog.text and "another store" in caplog.text
    assert [r.shard_id for r in store.shards] == [0, 1] and store.committed_shards() == {0, 1}
    assert list(store.ignored) == ["shard-00002"]
    report = store.verify()
    assert not report.ok and "shard-00002" in str(report)

    rerun = write_missing_shards(str(url), n_shards=3)
    assert rerun.verify().ok and not rerun.ignored
    assert checksums(rerun) == checksums(FeatureStore.open(str(other)))


def test_a_truncated_commit_record_is_reported_and_its_shard_written_again(tmp_path, caplog, capsys):
    clean = write_missing_shards(str(tmp_path / "clean"), n_shards=3)
    url = tmp_path / "store"
    write_missing_shards(str(url), n_shards=3)
    truncate(url / "shards" / "shard-00001" / "COMMITTED.json")

    with caplog.at_level(logging.WARNING):
        store = FeatureStore.open(str(url))
    assert "shard-00001" in caplog.text and "COMMITTED.json" in caplog.text
    assert [r.shard_id for r in store.shards] == [0, 2] and store.committed_shards() == {0, 2}
    report = store.verify()
    assert not report.ok and list(report.ignored) == ["shard-00001"] and report.missing == []
    assert "shard-00001" in str(report)
    assert inspect_main([str(url), "--verify"]) == 1
    assert "not committed    shard-00001: unreadable COMMITTED.json" in capsys.readouterr().out

    rerun = write_missing_shards(str(url), n_shards=3)  # the next extraction run
    assert checksums(rerun) == checksums(clean)
    assert rerun.verify().ok and not rerun.ignored


def test_committed_shards_with_corrupt_data_are_named_removed_and_written_again(tmp_path, caplog):
    clean = write_missing_shards(str(tmp_path / "clean"), n_shards=4)
    url = tmp_path / "store"
    write_missing_shards(str(url), n_shards=4)
    truncate(url / "shards" / "shard-00001" / "hidden_states" / "c" / "0" / "0", keep=300)  # a torn chunk file
    shutil.rmtree(url / "shards" / "shard-00002" / "topk_indices")  # an array gone; both commit records intact
    store = FeatureStore.open(str(url))
    assert store.committed_shards() == {0, 1, 2, 3}  # the commit records alone cannot tell

    with caplog.at_level(logging.WARNING):
        corrupt = store.remove_corrupt_shards()
    assert sorted(corrupt) == ["shard-00001", "shard-00002"] and "topk_indices" in corrupt["shard-00002"]
    assert "shard-00001" in caplog.text and "shard-00002" in caplog.text
    assert store.committed_shards() == {0, 3} and [r.shard_id for r in store.shards] == [0, 3]
    assert sorted(p.name for p in (url / "shards").iterdir()) == ["shard-00000", "shard-00003"]
    assert store.remove_corrupt_shards() == {}  # the good shards stay

    rerun = write_missing_shards(str(url), n_shards=4)  # what the extraction run does next
    assert checksums(rerun) == checksums(clean)
    assert rerun.verify().ok


def test_a_damaged_manifest_is_rebuilt_with_a_warning(tmp_path, caplog):
    url = tmp_path / "store"
    store = write_missing_shards(str(url), n_shards=3)
    expected = store.read_manifest().to_pylist()
    truncate(url / "manifest.parquet", keep=100)

    with caplog.at_level(logging.WARNING):
        report = FeatureStore.open(str(url)).verify()
    assert report.ok and report.checked == ["shard-00000", "shard-00001", "shard-00002"]
    assert "manifest.parquet" in caplog.text and "rebuil" in caplog.text
    assert pq.read_table(url / "manifest.parquet").to_pylist() == expected


def test_training_setup_opens_a_store_with_damaged_files(tmp_path):
    """The training plan's own store check: a rebuildable file is rebuilt, a damaged shard is named."""
    from pipelines.train import TrainConfig, TrainSetupError
    from pipelines.train.plan import open_checked_store

    url = tmp_path / "store"
    write_missing_shards(str(url), n_shards=3)
    config = TrainConfig(store=str(url), run_dir=str(tmp_path / "run"))
    fingerprint = make_metadata().target_fingerprint
    (url / "manifest.parquet").write_bytes(b"PAR1 not a parquet file")
    assert open_checked_store(config, fingerprint).num_samples == 12

    truncate(url / "shards" / "shard-00002" / "COMMITTED.json")
    with pytest.raises(TrainSetupError, match="shard-00002"):
        open_checked_store(config, fingerprint)
    store = open_checked_store(dataclasses.replace(config, verify_store=False), fingerprint)
    train, eval_ = store.split(0.25)
    assert store.num_samples == 8 and sorted([*train, *eval_]) == list(range(8))


def conversation_samples(n_samples: int, seed: int) -> list[dict]:
    """Samples with a 4-token prompt (no loss) before their reply tokens."""
    rng = np.random.default_rng(seed)
    samples = []
    for j in range(n_samples):
        sample, _ = make_sample(rng, f"conv-{j}", int(rng.integers(8, 30)))
        sample["loss_mask"] = np.arange(len(sample["input_ids"])) >= 4
        samples.append(sample)
    return samples


def regenerated(sample: dict, rng: np.random.Generator) -> dict:
    """The same prompt with another reply, as a re-run of self-distillation with sampling would give."""
    reply, _ = make_sample(rng, f"regen-{sample['sample_id']}", int(rng.integers(2, 20)))
    return {
        name: np.concatenate([sample[name][:4], reply[name]]) if name != "sample_id" else reply[name]
        for name in sample
    } | {"loss_mask": np.arange(4 + len(reply["input_ids"])) >= 4}


def test_split_keeps_a_conversation_on_one_side_whatever_its_id(tmp_path):
    store = FeatureStore.create(str(tmp_path), make_metadata())
    originals = conversation_samples(40, seed=0)
    rng = np.random.default_rng(1)
    store.write_shard(0, originals)
    store.write_shard(1, [dict(s, sample_id=f"copy-of-{s['sample_id']}") for s in originals])
    store.write_shard(2, [regenerated(s, rng) for s in originals])
    store = FeatureStore.open(str(tmp_path))
    for seed in range(5):
        _, eval_ = store.split(0.5, seed=seed)
        is_eval = np.isin(np.arange(store.num_samples), eval_).reshape(3, 40)
        assert (is_eval[0] == is_eval[1]).all(), "the same conversation under two ids landed on both sides"
        assert (is_eval[0] == is_eval[2]).all(), "the same prompt with another reply landed on both sides"
        assert 0 < is_eval[0].sum() < 40
