"""The benchmark on a tiny packaged drafter: report contents, definitions, and an audit that catches a bad method."""

from __future__ import annotations

import json

import pytest
import torch

from falcon.drafter import Drafter, DrafterConfig, save_drafter
from falcon.lookup import LookupConfig
from falcon.target import load_target, target_fingerprint
from falcon.testing import make_tiny_target
from pipelines.benchmark import BenchmarkConfig, BenchmarkError, run_benchmark
from pipelines.benchmark.audit import DivergenceAuditor, first_divergence
from pipelines.benchmark.config import DatasetSpec, ExtraDrafter
from pipelines.benchmark.methods import Run
from pipelines.benchmark.run import read_samples
from pipelines.inference import encode_prompt, load_falcon
from pipelines.packaging import PackageConfig, run_packaging
from pipelines.tracking import MlflowConfig
from pipelines.tree_tuning import TreeTuningConfig

PROMPTS = ["What is the capital of France?", "Write a short story about a robot.", "How do I sort a list?"]

pytestmark = pytest.mark.slow  # Ray Train / DeepSpeed / MLflow end to end


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark")
    make_tiny_target("qwen2", save_dir=root / "target")
    target, tokenizer = load_target(root / "target")
    fingerprint = target_fingerprint(target, tokenizer)
    for name, block_size in (("k2", 2), ("k1", 1)):
        torch.manual_seed(0)
        drafter = Drafter(DrafterConfig.from_target(target.config, block_size=block_size, max_passes=3,
                                                    target_fingerprint=fingerprint))
        drafter.attach_target(target.get_input_embeddings(), target.get_output_embeddings())
        save_drafter(drafter, root / name)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    run_packaging(PackageConfig(run_dir=str(root / "package"), drafter_dir=str(root / "k2"), target=str(root / "target"),
                                dtype="float32", model_name="falcon-bench-test",
                                mlflow=MlflowConfig(tracking_uri=tracking_uri),
                                tree=TreeTuningConfig(mode="fixed", branching=[3, 2, 1, 1]),
                                lookup=LookupConfig(num_tokens=4, min_ngram=1)))
    rows = [{"id": f"mt-{i}", "messages": [{"role": "user", "content": p}], "turns": [p, "Now say it shorter."]}
            for i, p in enumerate(PROMPTS)]
    (root / "mt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "code.jsonl").write_text(json.dumps({"id": "c0", "messages": [
        {"role": "user", "content": "def add(a, b):\n    return a + b\n\nWrite add3 like add."}]}) + "\n")
    return dict(root=root, tracking_uri=tracking_uri)


def bench_config(ws, **overrides) -> BenchmarkConfig:
    values = dict(model="models:/falcon-bench-test@champion",
                  mlflow=MlflowConfig(tracking_uri=ws["tracking_uri"], experiment="bench-test"),
                  run_dir=str(ws["root"] / "bench"), dtype="float32", max_new_tokens=16, warmup_prompts=1,
                  datasets=[DatasetSpec("mt_bench", str(ws["root"] / "mt.jsonl"), max_samples=2, second_turn=True),
                            DatasetSpec("code", str(ws["root"] / "code.jsonl"))],
                  extra_drafters=[ExtraDrafter("k1", str(ws["root"] / "k1"))])
    values.update(overrides)
    return BenchmarkConfig(**values)


def test_report_covers_every_method_and_dataset_and_is_lossless(workspace):
    report = run_benchmark(bench_config(workspace))
    bench = workspace["root"] / "bench"
    for name in ("report.json", "report.md", "speedup.png", "accepted_lengths.png"):
        assert (bench / name).is_file(), name
    assert set(report["results"]) == {"mt_bench", "code"}
    mt = report["results"]["mt_bench"]
    assert set(mt["methods"]) == {"autoregressive", "falcon", "falcon-drafter-only", "hf_generate", "prompt_lookup", "k1"}
    assert report["model"]["lookup"] == {"num_tokens": 4, "max_ngram": 3, "min_ngram": 1, "max_tokens": 4, "growth": 1.0,
                                         "chain_only_match": None}
    assert mt["methods"]["falcon"]["samples"] == 4  # two prompts x two turns
    assert [s["id"] for s in report["samples"]["mt_bench"]["falcon"]] == ["mt-0", "mt-0/turn2", "mt-1", "mt-1/turn2"]
    for result in report["results"].values():
        assert result["baseline"] in ("autoregressive", "hf_generate")
        assert result["methods"][result["baseline"]]["speedup"] == pytest.approx(1.0)
        for name, method in result["methods"].items():
            assert method["real_divergences"] == 0, (name, report["samples"])
            assert method["speedup"] > 0 and method["tokens_per_s_mean"] > 0
        for name in ("falcon", "falcon-drafter-only", "k1"):  # our decoders: exactly the reference, and tau counts the bonus token
            assert result["methods"][name]["identical"] == result["methods"][name]["samples"]
            assert result["methods"][name]["tau"] >= 1.0 and 0 <= result["methods"][name]["alpha"] <= 1
    k1_depths = {a for recs in report["samples"]["mt_bench"]["k1"] for a in recs["accepted"]}
    assert max(k1_depths) <= 1 + 3  # the k = 1 drafter's tree was cut to its 3 passes
    assert "| falcon |" in (bench / "report.md").read_text() and "Spec-Bench" in (bench / "report.md").read_text()

    from mlflow.tracking import MlflowClient

    run = MlflowClient(workspace["tracking_uri"]).get_run(report["mlflow_run_id"])
    assert "mt_bench.falcon.speedup" in run.data.metrics


def test_audit_flags_a_method_that_changes_a_token_as_real(workspace):
    package = load_falcon(workspace["root"] / "package", dtype="float32")
    prompt_ids = encode_prompt(package.tokenizer, PROMPTS[0])
    from falcon.generate import autoregressive_generate

    reference = autoregressive_generate(package.target, prompt_ids, 12).tokens
    with torch.inference_mode():
        logits = package.target(torch.cat([prompt_ids, torch.tensor([reference[:5]])], dim=1)).logits[0, -1]
    worst = int(logits.argmin())  # a token far below the argmax: never a tie
    changed = reference[:5] + [worst] + reference[6:]
    assert first_divergence(reference, changed) == 5
    audit = DivergenceAuditor(package.target, tie_factor=2).audit(prompt_ids, reference, changed, 5)
    # float32 inference against a float64 reference: the rounding error is tiny, the margin is not.
    assert audit["kind"] == "real" and audit["exact_top1"] == reference[5]
    assert audit["exact_margin"] > 1e-3 and audit["rounding_error"] < 1e-3
    lenient = DivergenceAuditor(package.target, tie_factor=1e12).audit(prompt_ids, reference, changed, 5)
    assert lenient["kind"] == "tie"
    # An output cut short (a spurious EOS or a lost tail) is real whatever the factor.
    assert DivergenceAuditor(package.target, 1e12).audit(prompt_ids, reference, reference[:7], 7)["kind"] == "real"
    assert first_divergence(reference, list(reference)) is None


def test_helpers_and_errors(workspace, tmp_path):
    assert Run([1, 2, 3], 0.5).tokens_per_s == 6.0
    with pytest.raises(BenchmarkError, match="fetch_data"):
        read_samples(DatasetSpec("x", str(tmp_path / "missing.jsonl")))
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "messages": [{"role": "system", "content": "x"}]}\n')
    with pytest.raises(BenchmarkError, match="bad.jsonl:1"):
        read_samples(DatasetSpec("x", str(tmp_path / "bad.jsonl")))
    with pytest.raises(ValueError, match="unique"):
        bench_config(workspace, datasets=[DatasetSpec("a", "x"), DatasetSpec("a", "y")])
    with pytest.raises(BenchmarkError, match="no drafter directory"):
        run_benchmark(bench_config(workspace, extra_drafters=[ExtraDrafter("gone", str(tmp_path / "none"))],
                                   mlflow=MlflowConfig(workspace["tracking_uri"], enabled=False)))
