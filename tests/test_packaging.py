"""Tree tuning, MLflow packaging (SQLite registry in tmp_path) and the inference module, on a tiny target.

The module fixture saves a tiny random target, writes a small feature store from its real forwards
(tests/store_fixtures.py) and saves a random drafter for it; packaging then tunes a tree on that store,
logs the pyfunc model from code, registers it and sets the alias once for the whole file.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from falcon.csgd import CSGDConfig, csgd_step
from falcon.drafter import (
    Drafter,
    DrafterConfig,
    DrafterMismatchError,
    build_draft_vocab,
    load_drafter,
    save_drafter,
)
from falcon.generate import DrafterState, SamplingConfig, autoregressive_generate, draft_tree
from falcon.target import load_target, target_fingerprint
from falcon.testing import make_tiny_target
from falcon.tree import TreeConfig, build_tree
from pipelines.inference import PackageError, encode_prompt, generate_text, load_falcon
from pipelines.packaging import CONTENT_HASH_TAG, PackageConfig, load_package_config, run_packaging
from pipelines.tree_tuning import (
    AcceptanceStats,
    CostModel,
    TreeTuningConfig,
    choose_tree,
    decoding_positions,
    expected_tau,
    greedy_node_order,
    measure_acceptance,
    preset_tree,
    ranks_per_depth,
    true_path_ranks,
)
from tests.store_fixtures import write_target_store

MODEL_NAME = "falcon-tiny"
PROMPTS = ["What is the capital of France?", "Write a short story about a robot.", "How do I sort a list in Python?"]
TUNING = dict(max_nodes=12, max_ranks=[4, 2], max_positions=120, cache_length=32, timing_repeats=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from two threads, and on a busy 2-core machine two threads wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_briefly(drafter: Drafter, target, store, steps: int = 40) -> None:
    """A few CSGD steps on every sample of the store (one right-padded batch): a drafter that is sometimes right."""
    samples = [store.sample(i) for i in range(store.num_samples)]
    length = max(len(s["input_ids"]) for s in samples)
    batch = dict(hidden_states=torch.zeros(len(samples), length, store.metadata.hidden_size),
                 input_ids=torch.zeros(len(samples), length, dtype=torch.long),
                 loss_mask=torch.zeros(len(samples), length, dtype=torch.long))
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        batch["hidden_states"][row, :n] = torch.from_numpy(sample["hidden_states"])
        batch["input_ids"][row, :n] = torch.from_numpy(sample["input_ids"].astype(np.int64))
        batch["loss_mask"][row, :n] = torch.from_numpy(sample["loss_mask"].astype(np.int64))
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=1e-2)
    config = CSGDConfig(noise_bound=0.0, dist_weight=1.0, kl_weight=0.0)
    generator = torch.Generator().manual_seed(0)
    lm_head_weight = target.get_output_embeddings().weight.detach()
    drafter.train()
    for step in range(steps):
        loss = csgd_step(drafter, batch, config, step / steps, lm_head_weight, generator)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    drafter.eval()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("packaging")
    target_dir = root / "target"
    make_tiny_target(save_dir=target_dir)
    store = write_target_store(root / "store", target_dir, n_samples=12, samples_per_shard=6, reply_tokens=32)
    target, tokenizer = load_target(target_dir)
    fingerprint = target_fingerprint(target, tokenizer)
    torch.manual_seed(0)
    config = DrafterConfig.from_target(target.config, block_size=2, max_passes=3, draft_vocab_size=512,
                                       target_fingerprint=fingerprint)
    drafter = Drafter(config)
    drafter.set_draft_vocab(build_draft_vocab(torch.from_numpy(store.token_counts()), 512))
    drafter.attach_target(target.get_input_embeddings(), target.get_output_embeddings())
    train_briefly(drafter, target, store)
    save_drafter(drafter, root / "train" / "drafter")
    return dict(root=root, target_dir=target_dir, store=store, drafter_dir=root / "train" / "drafter",
                tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def package_config(ws, **overrides) -> PackageConfig:
    values = dict(run_dir=str(ws["root"] / "package"), drafter_dir=str(ws["drafter_dir"]), store=str(ws["root"] / "store"),
                  eval_fraction=0.5, split_seed=0, target=str(ws["target_dir"]), dtype="float32",
                  model_name=MODEL_NAME, tracking_uri=ws["tracking_uri"], tree=TreeTuningConfig(**TUNING))
    values.update(overrides)
    return PackageConfig(**values)


@pytest.fixture(scope="module")
def packaged(workspace):
    return run_packaging(package_config(workspace))


@pytest.fixture(scope="module")
def loaded_drafter(workspace):
    target, _ = load_target(workspace["target_dir"])
    return target, load_drafter(workspace["drafter_dir"], target)


# ---------------------------------------------------------------------------------------------------
# Acceptance measurement


def test_true_path_ranks_match_draft_tree(workspace, loaded_drafter):
    """Every rank measured along the truth is where draft_tree puts the true token, in every pass."""
    target, drafter = loaded_drafter
    store = workspace["store"]
    depth, max_rank = 6, 512  # the whole draft vocabulary: the true token always has a rank (or is absent)
    checked = 0
    for index in range(2):
        sample = store.sample(index)
        ids = torch.from_numpy(sample["input_ids"].astype(np.int64))
        hidden = torch.from_numpy(sample["hidden_states"])
        positions = decoding_positions(sample["loss_mask"], depth, 2, quota=5)
        ranks = true_path_ranks(drafter, hidden, ids, positions, depth, max_rank, batch_positions=3)
        for L, rank_row in zip(positions, ranks.tolist(), strict=True):
            found = next((d for d, r in enumerate(rank_row) if r == max_rank), depth)  # depths with a rank
            paths = set()
            for d in range(found):
                for r in {0, 1, rank_row[d]}:
                    paths.add(tuple(rank_row[:d]) + (r,))
            tree = build_tree(TreeConfig(paths=[list(p) for p in paths]), 2)
            state = DrafterState(hidden[None, :L], ids[None, 1:L + 1])
            with torch.inference_mode():
                node_tokens = draft_tree(drafter, tree, state, L)
            for node, path in enumerate(tree.paths, start=1):
                is_true_path = list(path) == rank_row[: len(path)]
                assert (int(node_tokens[node]) == int(ids[L + len(path)])) == is_true_path, (L, path)
                checked += 1
    assert checked > 20


def test_acceptance_table_is_a_probability_table(workspace, loaded_drafter):
    _, drafter = loaded_drafter
    stats = measure_acceptance(drafter, workspace["store"], range(4), depth=6, max_rank=4, max_positions=60)
    assert stats.ranks.shape == (stats.num_positions, 6) and 0 < stats.num_positions <= 60 + 4
    for table in (stats.conditional(), stats.unconditional()):
        assert table.shape == (6, 4)
        assert (table >= 0).all() and (table <= 1).all()
        assert (table.sum(1) <= 1 + 1e-9).all()  # ranks are disjoint events
    counts = stats.parent_counts()
    assert counts[0] == stats.num_positions and (np.diff(counts) <= 0).all()
    assert stats.empirical_tau([]) == 1.0


def test_conditional_table_and_replay_by_hand():
    ranks = np.array([[0, 0, 1], [0, 2, 0], [1, 0, 0], [2, 2, 2]])  # max_rank 2: rank 2 means "not found"
    stats = AcceptanceStats(ranks=ranks, max_rank=2, num_samples=1)
    # depth 1: all 4 rows; depth 2: rows 0-2 (depth-1 found); depth 3: rows 0 and 2 (row 1 lost at depth 2)
    assert stats.parent_counts().tolist() == [4, 3, 2]
    np.testing.assert_allclose(stats.conditional(), [[0.5, 0.25], [2 / 3, 0.0], [0.5, 0.5]])
    # chain (0), (0,0), (0,0,0): row 0 accepts 2, row 1 accepts 1, rows 2-3 accept 0
    assert stats.empirical_tau([[0], [0, 0], [0, 0, 0]]) == pytest.approx(1 + 3 / 4)
    assert stats.empirical_tau([[0], [1], [1, 0], [1, 0, 0]]) == pytest.approx(1 + (1 + 1 + 3) / 4)


# ---------------------------------------------------------------------------------------------------
# Construction


def test_greedy_order_respects_bounds_and_is_prefix_closed():
    rng = np.random.default_rng(0)
    accept = rng.uniform(0.0, 0.3, size=(6, 4))
    max_ranks = ranks_per_depth([4, 2, 1], 6)
    order = greedy_node_order(accept, 25, max_ranks)
    assert len(order) == 25
    values = [value for _, value in order]
    assert values == sorted(values, reverse=True)
    for n in range(1, len(order) + 1):
        paths = [path for path, _ in order[:n]]
        build_tree(TreeConfig(paths=[list(p) for p in paths]), 2, max_depth=6)  # raises unless prefix-closed
    assert all(len(p) <= 6 and all(r < max_ranks[d] for d, r in enumerate(p)) for p, _ in order)
    assert greedy_node_order(np.zeros((3, 2)), 10, [2, 2, 2]) == []


def synthetic_costs() -> CostModel:
    # verify(n): 10 ms for 1-2 tokens, 12 for 4, 20 for 8; one drafter pass of pass 0: 2 ms
    return CostModel(cache_length=0, verify_sizes=[1, 2, 4, 8], verify_ms=[10.0, 10.0, 12.0, 20.0],
                     first_pass_ms=2.0, pass_branches=[1, 2, 4], pass_ms=[3.0, 4.0, 6.0])


def test_chosen_tree_is_the_hand_computed_optimum():
    # Values: (0) .6, (1) .3, (0,0) .3, (1,0) .15, (0,1) .06, (1,1) .03. Greedy order (ties: shallower
    # first): (0), (1), (0,0), (1,0), (0,1), (1,1); E = 1.6, 1.9, 2.2, 2.35, 2.41, 2.44;
    # step = 2 + verify(n+1) = 12, 13, 14, 16, 18, 20 ms; E/step is largest at n = 3 (2.2 / 14).
    accept = np.array([[0.6, 0.3], [0.5, 0.1]])
    choice = choose_tree(accept, synthetic_costs(), block_size=2, max_nodes=6, max_ranks=[2, 2])
    assert choice.paths == [(0,), (1,), (0, 0)]
    assert choice.expected_tau == pytest.approx(2.2)
    assert choice.step_ms == pytest.approx(14.0)
    assert choice.expected_speedup == pytest.approx(2.2 / 14 * 10)
    assert [round(row["expected_tau"], 6) for row in choice.curve] == [1.6, 1.9, 2.2, 2.35, 2.41, 2.44]
    chain = [(0,), (0, 0)]
    chain_rate = expected_tau(chain, accept) / synthetic_costs().step(chain, 2)
    assert choice.expected_tau / choice.step_ms > chain_rate


def test_tree_beats_chain_of_same_size_when_second_ranks_are_likely():
    accept = np.array([[0.5, 0.4, 0.05]] * 4)
    for n in range(1, 5):
        greedy = [p for p, _ in greedy_node_order(accept, n, [3] * 4)]
        assert expected_tau(greedy, accept) >= expected_tau([(0,) * d for d in range(1, n + 1)], accept)
    greedy4 = [p for p, _ in greedy_node_order(accept, 4, [3] * 4)]
    assert expected_tau(greedy4, accept) > expected_tau([(0,) * d for d in range(1, 5)], accept) + 0.1


def test_draft_cost_counts_branches_per_pass():
    costs = synthetic_costs()
    paths = [(0,), (1,), (0, 0), (1, 0), (0, 0, 0), (1, 0, 0)]  # pass 1 branches: (0,0) and (1,0)
    assert costs.draft(paths, 2) == pytest.approx(2.0 + 4.0)
    assert costs.draft([], 2) == 0.0
    assert costs.verify(16) == pytest.approx(20.0 + 2.0 * 8)  # linear past the last measured size


def test_preset_resembles_the_paper_k2_tree():
    paths = [tuple(p) for p in preset_tree("falcon-k2").paths]
    assert len(paths) == 166 and max(len(p) for p in paths) == 8
    assert max(p[0] for p in paths) < 20 and all(r < 10 for p in paths for r in p[1:])
    build_tree(TreeConfig(paths=[list(p) for p in paths]), 2, max_depth=8)


# ---------------------------------------------------------------------------------------------------
# Packaging, registry, inference


def test_package_is_registered_with_alias_and_report(workspace, packaged):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(workspace["tracking_uri"])
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert int(version.version) == packaged.published.version == 1 and not packaged.published.reused
    assert version.tags[CONTENT_HASH_TAG] == json.loads((workspace["root"] / "package/package/package.json").read_text())["content_hash"]
    report = packaged.tree_report
    assert 1 <= report["summary"]["nodes"] <= TUNING["max_nodes"] and report["summary"]["depth"] <= 6
    assert np.array(report["acceptance"]["conditional"]).shape == (6, 4)
    assert report["timing"]["verify_ms"] and report["timing"]["pass_ms"] and report["curve"]
    assert report["expected_speedup"] > 0 and report["expected_tau"] >= 1.0


def test_load_by_alias_generates_losslessly(workspace, packaged):
    package = load_falcon(f"models:/{MODEL_NAME}@champion", tracking_uri=workspace["tracking_uri"], dtype="float32")
    assert package.tree_paths == packaged.tree_paths
    assert package.info["registry"]["version"] == packaged.published.version
    for prompt in PROMPTS:
        falcon = generate_text(package, prompt, max_new_tokens=24)
        input_ids = encode_prompt(package.tokenizer, prompt)
        plain = autoregressive_generate(package.target, input_ids, 24, eos_token_id=package.eos_token_ids)
        assert falcon.token_ids == plain.tokens
        assert falcon.tau >= 1.0 and falcon.tokens_per_s > 0


def test_load_by_version_and_local_dir(workspace, packaged):
    by_version = load_falcon(f"models:/{MODEL_NAME}/1", tracking_uri=workspace["tracking_uri"], dtype="float32")
    local = load_falcon(packaged.package_dir, dtype="float32")
    assert by_version.tree_paths == local.tree_paths == packaged.tree_paths
    assert by_version.fingerprint == local.fingerprint


def test_fingerprint_mismatch_is_refused(workspace, packaged):
    other = make_tiny_target(seed=1)
    with pytest.raises(DrafterMismatchError, match="made for target"):
        load_falcon(packaged.package_dir, target=other)


def test_inference_cli_generates_and_compares(packaged, capsys):
    from pipelines.inference import main

    assert main(["--model", packaged.package_dir, "--prompt", PROMPTS[0], "--max-new-tokens", "8",
                 "--dtype", "float32"]) == 0
    output = capsys.readouterr().out
    assert "lookup chain off" in output and "identical output" in output and "speedup" in output
    assert main(["--model", "no/such/package", "--prompt", "Hi"]) == 1
    assert "neither an existing directory nor an MLflow URI" in capsys.readouterr().err


def test_bad_lookup_settings_in_a_package_are_refused(packaged, tmp_path):
    import shutil

    package_dir = tmp_path / "package"
    shutil.copytree(packaged.package_dir, package_dir)
    tree = json.loads((package_dir / "tree.json").read_text())
    (package_dir / "tree.json").write_text(json.dumps({**tree, "lookup": {"num_tokens": 2, "min_ngram": 0}}))
    with pytest.raises(PackageError, match="bad lookup settings"):
        load_falcon(package_dir, dtype="float32")


def test_pyfunc_predict_returns_text_and_stats(workspace, packaged, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", workspace["tracking_uri"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion", model_config={"dtype": "float32"})
    out = model.predict(pd.DataFrame({"prompt": PROMPTS[:2]}), params={"max_new_tokens": 8})
    assert list(out.columns) == ["text", "num_tokens", "tau", "tokens_per_s", "seconds", "steps"]
    assert len(out) == 2 and (out["num_tokens"] > 0).all() and (out["tau"] >= 1.0).all()
    package = load_falcon(packaged.package_dir, dtype="float32")
    assert out["text"][0] == generate_text(package, PROMPTS[0], 8).text
    sampled = model.predict([PROMPTS[0]], params={"max_new_tokens": 8, "temperature": 0.8, "seed": 3})
    assert sampled["num_tokens"][0] > 0


def test_job_rerun_reuses_the_version(workspace, packaged, capsys):
    from mlflow.tracking import MlflowClient

    from jobs.package_drafter import main

    ws = workspace
    config_path = ws["root"] / "job.yaml"
    config_path.write_text(yaml.safe_dump({
        "train": {"run_dir": str(ws["root"] / "train"), "store": str(ws["root"] / "store"), "eval_fraction": 0.5},
        "package": {"run_dir": str(ws["root"] / "package"), "target": str(ws["target_dir"]), "dtype": "float32",
                    "model_name": MODEL_NAME, "tracking_uri": ws["tracking_uri"], "tree": TUNING},
    }))
    config = load_package_config(config_path)
    assert config.drafter_dir == str(ws["drafter_dir"]) and config.split_seed == 0
    assert main(["--config", str(config_path)]) == 0
    output = capsys.readouterr().out
    assert f"models:/{MODEL_NAME}@champion" in output and "reused" in output
    client = MlflowClient(ws["tracking_uri"])
    assert [int(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'")] == [1]

    # Another tree is other content: a new version takes the alias. Re-running the first config finds its
    # version again but does not move the alias back to it: that is a deliberate promotion.
    assert main(["--config", str(config_path), "--set", "tree.mode=fixed", "--set", "tree.branching=[2,1]"]) == 0
    assert int(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == 2
    capsys.readouterr()
    assert main(["--config", str(config_path)]) == 0
    assert int(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == 2
    output = capsys.readouterr().out
    assert f"models:/{MODEL_NAME}/1" in output and "alias 'champion' left on version 2, newer than this version 1" in output
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 2

    # So are other lookup settings, and the loaded package decodes with them.
    assert main(["--config", str(config_path), "--set", "lookup.num_tokens=3"]) == 0
    assert int(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == 3
    package = load_falcon(f"models:/{MODEL_NAME}@champion", tracking_uri=ws["tracking_uri"], dtype="float32")
    assert package.decoder.lookup.num_tokens == 3 and package.info["lookup"]["num_tokens"] == 3
    assert {v.tags.get("falcon.package_check") for v in client.search_model_versions(f"name='{MODEL_NAME}'")} == {"passed"}


def checked_config(ws, tmp_path, **tree) -> PackageConfig:
    """A fixed tree without the store (nothing measured), registered under its own name."""
    return package_config(ws, run_dir=str(tmp_path / "run"), store=None, model_name="falcon-tiny-checked",
                          tree=TreeTuningConfig(mode="fixed", **tree))


def test_a_version_failing_the_check_gets_no_alias(workspace, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(workspace["tracking_uri"])
    good = run_packaging(checked_config(workspace, tmp_path, branching=[2, 1]))
    assert good.published.alias == "champion" and good.published.version == 1
    # Rank 600 is beyond the 512-token draft vocabulary: packaging writes it, loading it back refuses it.
    with pytest.raises(PackageError, match="falcon-tiny-checked/2 failed packaging's check.*rank 600"):
        run_packaging(checked_config(workspace, tmp_path, paths=[[0], [600]]))
    assert int(client.get_model_version_by_alias("falcon-tiny-checked", "champion").version) == 1
    assert client.get_model_version("falcon-tiny-checked", "2").tags["falcon.package_check"].startswith("failed: ")


def test_a_version_that_decodes_wrongly_gets_no_alias(workspace, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from falcon.generate import FalconDecoder

    good = run_packaging(checked_config(workspace, tmp_path, branching=[1]))
    correct_generate = FalconDecoder.generate

    def off_by_one_token(self, *args, **kwargs):  # a decoder bug: the last token is another one
        result = correct_generate(self, *args, **kwargs)
        result.tokens[-1] = (result.tokens[-1] + 1) % self.target.config.vocab_size
        return result

    monkeypatch.setattr(FalconDecoder, "generate", off_by_one_token)
    with pytest.raises(PackageError, match="failed packaging's check.*no numerical tie explains it"):
        run_packaging(checked_config(workspace, tmp_path, branching=[1, 1]))
    champion = MlflowClient(workspace["tracking_uri"]).get_model_version_by_alias("falcon-tiny-checked", "champion")
    assert int(champion.version) == good.published.version


def test_job_reports_a_missing_drafter(workspace, tmp_path, capsys):
    from jobs.package_drafter import main

    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump({"package": {"run_dir": str(tmp_path / "run"),
                                                       "drafter_dir": str(tmp_path / "nothing")}}))
    assert main(["--config", str(config_path)]) == 1
    assert "no drafter at" in capsys.readouterr().err


def test_sampled_generation_runs(workspace, packaged):
    package = load_falcon(packaged.package_dir, dtype="float32")
    out = generate_text(package, [{"role": "user", "content": PROMPTS[1]}], 12, SamplingConfig(temperature=0.7, seed=0))
    assert 0 < out.num_tokens <= 12


def test_packaging_refuses_a_drafter_of_another_target(workspace, tmp_path):
    other_dir = tmp_path / "other-target"
    make_tiny_target(seed=1, save_dir=other_dir)
    with pytest.raises(DrafterMismatchError, match="trained for target"):
        run_packaging(package_config(workspace, target=str(other_dir), run_dir=str(tmp_path / "run")))
