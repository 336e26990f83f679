"""The lookup chain tuned with the tree: replay on hand-built sequences, the joint choice on hand-built tables and
costs, the tuner on a real tiny store, and the tuned settings through a package and back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from falcon.generate import autoregressive_generate
from falcon.lookup import LookupConfig
from falcon.target import describe_target, load_target, target_fingerprint
from falcon.testing import make_tiny_target
from pipelines.config import ConfigError
from pipelines.inference import load_falcon
from pipelines.lookup_tuning import (
    ChainReplay,
    LookupTuningConfig,
    TreeCandidates,
    choose_lookup,
    decode_walk,
    evaluate_policy,
    lookup_candidates,
    replay_chain,
)
from pipelines.package_format import write_package
from pipelines.run_config import load_stage
from pipelines.tree_tuning import TreeTuningConfig, TreeTuningError, resolve_tree
from pipelines.tree_tuning.acceptance import AcceptanceStats
from tests.store_fixtures import write_target_store
from tests.test_package_loading import save_random_drafter

TUNING = dict(max_nodes=8, max_ranks=[4, 2], max_positions=80, cache_length=32, timing_repeats=2)


# ---------------------------------------------------------------------------------------------------
# Replay and the joint choice, by hand


def test_replay_counts_the_match_and_the_agreeing_chain_tokens():
    tokens = [10, 11, 12, 13, 14, 20, 10, 11, 12, 13, 99, 21]
    # L=5 (root 20): never seen. L=6 (root 10): 1-gram match ending at 0; the chain 11 12 13 14 meets the truth
    # 11 12 13 99: 3 agree. L=8: (10, 11, 12) ends at 2 (nothing before it): match 3; chain 13 14 20 vs 13 99 21:
    # 1 agrees, the truth ends there. L=10 (root 99): no match.
    replay = replay_chain(tokens, [5, 6, 8, 10], LookupConfig(num_tokens=1), match_cap=64, max_chain=4)
    assert replay.match_length.tolist() == [0, 1, 3, 0] and replay.agreed.tolist() == [0, 3, 1, 0]
    # A loop: the chain repeats the period past the context's end, and the truth follows it all the way.
    loop = replay_chain([5, 7, 5, 7, 5, 7, 5, 7, 5], [4], LookupConfig(num_tokens=1), match_cap=64, max_chain=4)
    assert loop.match_length.tolist() == [3] and loop.agreed.tolist() == [4]
    # A long copy: the match counts back up to the cap.
    copy = list(range(100, 120))
    long = replay_chain(copy + [7] + copy, [30, 35], LookupConfig(num_tokens=1), match_cap=8, max_chain=4)
    assert long.match_length.tolist() == [8, 8] and long.agreed.tolist() == [4, 4]


def test_accepted_depths_replay_nested_trees():
    stats = AcceptanceStats(ranks=np.array([[0, 0, 1], [0, 2, 0], [1, 0, 0], [2, 2, 2]]), max_rank=2, num_samples=1)
    order = [(0,), (1,), (0, 0), (1, 0), (0, 0, 1)]
    assert stats.accepted_depths(order).tolist() == [[1, 1, 2, 2, 3], [1, 1, 1, 1, 1], [0, 1, 1, 2, 2],
                                                    [0, 0, 0, 0, 0]]


def linear_verify(base: float = 10.0, per_token: float = 0.5, size: int = 80) -> np.ndarray:
    return np.array([base + per_token * (n - 1) for n in range(size)])


def one_tree(accepted: list[int], tau: float = 1.5) -> TreeCandidates:
    return TreeCandidates(paths=[[(0,), (0, 0)]], expected_tau=np.array([tau]), draft_ms=np.array([2.0]),
                          accepted=np.array(accepted)[:, None])


def one_step_samples(match_length, agreed, max_chain: int) -> ChainReplay:
    """A replay whose every position is a sample of its own: each is one step of its decode."""
    match_length, agreed = np.asarray(match_length, dtype=np.int64), np.asarray(agreed, dtype=np.int64)
    return ChainReplay(match_length, agreed, max_chain, np.arange(len(agreed)), np.zeros(len(agreed), dtype=np.int64))


def test_policy_figures_by_hand():
    replay = one_step_samples([0, 1, 5, 12], [0, 0, 3, 10], max_chain=16)
    policy = LookupConfig(num_tokens=2, max_tokens=8, growth=1.0, chain_only_match=10)
    # chains 0, 2, 5, 8 tokens (the last alone: match 12 >= 10); accepted max(tree, chain): 1, 0, 3, 8 against the
    # tree's 1, 0, 1, 2: gain 2 per position. Steps: 2 + verify(3), 2 + verify(5), 2 + verify(8), verify(9).
    [figures] = evaluate_policy(policy, one_tree([1, 0, 1, 2]), replay, linear_verify(), plain_ms=10.0)
    assert figures.expected_tau == pytest.approx(1.5 + 2.0)
    assert figures.empirical_tau == pytest.approx(1 + (1 + 0 + 3 + 8) / 4)
    assert figures.step_ms == pytest.approx((13.0 + 14.0 + 15.5 + 14.0) / 4)
    assert figures.expected_speedup == pytest.approx(3.5 * 10.0 / 14.125)
    [off] = evaluate_policy(LookupConfig(), one_tree([1, 0, 1, 2]), replay, linear_verify(), plain_ms=10.0)
    assert (off.expected_tau, off.step_ms) == (pytest.approx(1.5), pytest.approx(2.0 + 11.0))  # the tree alone


def test_steps_follow_the_decode_through_each_sample():
    # Sample 0 measured at L = 2..7: the step at 2 accepts 3 tokens (+ the target's), so the next step is at 6,
    # whose 2 (+ 1) end the sample. Sample 1 at L = 3, 5: the step at 3 accepts 0, the next measured after 4 is 5.
    replay = ChainReplay(np.array([4, 4, 4, 4, 0, 0, 0, 0]), np.array([3, 3, 3, 3, 0, 0, 0, 0]), 8,
                         np.array([0, 0, 0, 0, 0, 0, 1, 1]), np.array([2, 3, 4, 5, 6, 7, 3, 5]))
    policy = LookupConfig(num_tokens=4, chain_only_match=4)  # 4-token chains, verified alone
    tree = [1, 1, 1, 1, 2, 0, 0, 1]
    walked = decode_walk(replay, np.array([[3, 3, 3, 3, 2, 0, 0, 1]]).T)
    assert np.flatnonzero(walked[:, 0]).tolist() == [0, 4, 6, 7]
    [figures] = evaluate_policy(policy, one_tree(tree), replay, linear_verify(), plain_ms=10.0)
    # The same steps with the policy: L = 2 (the chain alone: 3), 6 (the tree: 2), and 3, 5 of sample 1 (0, 1).
    assert figures.empirical_tau == pytest.approx(1 + (3 + 2 + 0 + 1) / 4)
    # Without the chain: steps at 2, 4, 6 (tree 1, 1, 2) and 3, 5 (0, 1): the chain's gain over that walk.
    assert figures.expected_tau == pytest.approx(1.5 + (3 + 2 + 0 + 1) / 4 - (1 + 1 + 2 + 0 + 1) / 5)
    assert figures.step_ms == pytest.approx((verify_at(5) + 3 * (2.0 + verify_at(3))) / 4)
    with pytest.raises(ValueError, match="ordered"):
        ChainReplay(np.zeros(2), np.zeros(2), 8, np.array([0, 0]), np.array([5, 3]))


def verify_at(tokens: int) -> float:
    return float(linear_verify()[tokens])


def choose(replay: ChainReplay, accepted: list[int]) -> LookupConfig:
    candidates = lookup_candidates(LookupTuningConfig(mode="tuned", max_chain=replay.max_chain))
    return choose_lookup(candidates, one_tree(accepted), replay, linear_verify(), plain_ms=10.0)[0].lookup


def test_a_copy_heavy_table_chooses_a_long_chain_without_the_drafter():
    # Long matches whose continuation the target repeats for 30 tokens; the drafter gets 1 token.
    chosen = choose(one_step_samples(np.full(50, 20), np.full(50, 30), max_chain=32), [1] * 50)
    assert chosen.chain_length(20) >= 24 and chosen.chain_only(20)


def test_a_table_without_matches_or_with_junk_matches_chooses_no_chain():
    assert not choose(one_step_samples(np.zeros(50), np.zeros(50), 32), [1] * 50).enabled
    # 1-token matches the truth never follows: any chain only costs verification.
    junk = choose(one_step_samples(np.ones(50), np.zeros(50), 32), [1] * 50)
    assert junk.chain_length(1) == 0


def test_fresh_short_chains_and_growth_on_long_matches():
    # Half the positions: short matches where 2 tokens agree; half: long copies where 24 agree.
    replay = one_step_samples([1] * 25 + [24] * 25, [2] * 25 + [24] * 25, max_chain=32)
    chosen = choose(replay, [0] * 50)
    assert 1 <= chosen.chain_length(1) <= 4 and chosen.chain_length(24) >= 24


def test_candidates_fixed_alone_or_the_bounded_grid():
    fixed = LookupTuningConfig(num_tokens=6)
    assert lookup_candidates(fixed) == [LookupConfig(num_tokens=6)]
    grid = lookup_candidates(LookupTuningConfig(mode="tuned", max_chain=16, min_ngram=2))
    assert not grid[0].enabled and all(c.max_tokens <= 16 and c.min_ngram >= 2 for c in grid)
    assert any(c.max_tokens > c.num_tokens for c in grid) and any(c.chain_only_match for c in grid)
    assert len({json.dumps(c.__dict__, sort_keys=True) for c in grid}) == len(grid)


@pytest.mark.parametrize("values, message", [(dict(mode="auto"), "lookup.mode"), (dict(max_chain=0), "max_chain"),
                                             (dict(max_chain=1000), "max_chain")])
def test_bad_lookup_tuning_config_is_refused(values, message):
    with pytest.raises(ValueError, match=message):
        LookupTuningConfig(**values)


def test_package_config_reads_the_lookup_mode(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"package": {"run_dir": str(tmp_path), "drafter_dir": str(tmp_path), "store": "s",
                                                "lookup": {"mode": "tuned", "max_chain": 24}}}))
    config = load_stage("package", path)
    assert isinstance(config.lookup, LookupTuningConfig) and config.lookup.mode == "tuned"
    assert config.lookup.max_chain == 24
    assert load_stage("package", path, ["lookup.mode=fixed", "lookup.num_tokens=4"]).lookup.settings() == \
        LookupConfig(num_tokens=4)
    with pytest.raises(ConfigError, match="lookup.mode"):
        load_stage("package", path, ["lookup.mode=sometimes"])


# ---------------------------------------------------------------------------------------------------
# The tuner on a real tiny store, and the package round trip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from two threads on a busy machine
    root = tmp_path_factory.mktemp("lookup-tuning")
    make_tiny_target(save_dir=root / "target")
    store = write_target_store(root / "store", root / "target", n_samples=6, samples_per_shard=6, reply_tokens=40)
    target, tokenizer = load_target(root / "target")
    fingerprint = target_fingerprint(target, tokenizer)
    drafter_dir = save_random_drafter(root / "drafter", target, fingerprint)
    from falcon.drafter import load_drafter

    target_ref = {"spec": str(root / "target"), "fingerprint": fingerprint, "trust_remote_code": False,
                  "description": describe_target(target, tokenizer)}
    yield dict(root=root, store=store, target=target, tokenizer=tokenizer, drafter_dir=drafter_dir,
               drafter=load_drafter(drafter_dir, target), target_ref=target_ref)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tuned_report(workspace):
    _, report = resolve_tree(TreeTuningConfig(**TUNING), workspace["drafter"], workspace["target"],
                             workspace["store"], range(6), LookupTuningConfig(mode="tuned", max_chain=16))
    return report


def test_the_tuner_chooses_lookup_settings_with_the_tree(tuned_report):
    lookup = tuned_report["lookup"]
    settings = LookupConfig(**lookup["settings"])
    assert lookup["mode"] == "tuned" and settings.max_tokens <= 16
    assert lookup["replay"]["positions"] == tuned_report["acceptance"]["positions"]
    assert lookup["replay"]["with_match"] > 0  # tiny random targets repeat themselves
    # Lookup off is one of the candidates, with every tree: the pair chosen is at least as fast.
    assert tuned_report["expected_speedup"] >= lookup["tree_only"]["expected_speedup"] - 1e-9
    assert lookup["ranking"][0]["lookup"] == lookup["settings"]
    assert tuned_report["timing"]["verify_ms"][str(TUNING["max_nodes"] + 1 + 16)] > 0  # root + tree + chain timed


def test_lookup_tuned_without_a_store_is_refused(workspace):
    with pytest.raises(TreeTuningError, match="lookup.mode tuned needs the target, the feature store"):
        resolve_tree(TreeTuningConfig(mode="fixed", branching=[2, 1]), workspace["drafter"],
                     lookup=LookupTuningConfig(mode="tuned"))
    _, report = resolve_tree(TreeTuningConfig(mode="fixed", branching=[2, 1]), workspace["drafter"],
                             lookup=LookupTuningConfig(num_tokens=5))
    assert report["lookup"] == {"mode": "fixed", "settings": {**LookupConfig(num_tokens=5).__dict__}}


def test_tuned_lookup_settings_survive_the_package_round_trip(workspace, tuned_report, tmp_path):
    settings = LookupConfig(num_tokens=2, max_tokens=12, growth=2.0, chain_only_match=8)  # as a tuner writes them
    report = {**tuned_report, "lookup": {**tuned_report["lookup"], "settings": settings.__dict__}}
    meta = write_package(tmp_path / "package", workspace["drafter_dir"], tuned_report["paths"], report,
                         workspace["target_ref"], settings)
    other = write_package(tmp_path / "other", workspace["drafter_dir"], tuned_report["paths"], report,
                          workspace["target_ref"], LookupConfig(num_tokens=2, max_tokens=12, growth=1.0,
                                                                chain_only_match=8))
    assert meta["content_hash"] != other["content_hash"]  # every setting of the policy is content
    package = load_falcon(tmp_path / "package", target=(workspace["target"], workspace["tokenizer"]))
    assert package.decoder.lookup == settings and package.info["lookup"] == settings.__dict__
    prompt = torch.tensor([[5, 9, 13, 5, 9, 13, 5, 9]])
    assert package.decoder.generate(prompt, 24).tokens == autoregressive_generate(workspace["target"], prompt, 24).tokens


def test_a_package_with_a_fixed_chain_from_before_still_loads(workspace, tuned_report, tmp_path):
    write_package(tmp_path / "package", workspace["drafter_dir"], tuned_report["paths"], tuned_report,
                  workspace["target_ref"], LookupConfig())
    tree_file = tmp_path / "package" / "tree.json"
    tree = json.loads(tree_file.read_text())
    tree_file.write_text(json.dumps({**tree, "lookup": {"num_tokens": 6, "max_ngram": 3, "min_ngram": 1}}))
    lookup = load_falcon(tmp_path / "package", target=(workspace["target"], workspace["tokenizer"])).decoder.lookup
    assert (lookup.num_tokens, lookup.max_tokens, lookup.chain_only_match) == (6, 6, None)
