"""Package a trained drafter with its decoding tree and target reference as one MLflow model, register it,
check it, and point an alias at it.

    result = run_packaging(load_stage("package", "jobs/configs/smollm2-demo.yaml"))  # pipelines.run_config
    result.model_uri  # models:/falcon-smollm2@champion

Steps: load the target and the drafter (fingerprints checked against each other and against the store),
choose the tree (`pipelines.tree_tuning`: tuned on the held-out split training left out, a preset or a fixed
shape), write the package directory (layout in `pipelines.package_format`), log it as a pyfunc model FROM
CODE (`pipelines/falcon_pyfunc.py`; nothing pickled) in an MLflow run, registered under `model_name`. Then
the check: the registered version is loaded back from the registry (drafter, tree, target fingerprint) and
decodes a short prompt as plain greedy decoding does (a divergence passes only as a numerical tie, judged as
the benchmark does); its verdict is the version's `falcon.package_check` tag. Only a version that passed gets
the alias, and never when the alias already points at a newer version: moving it back is a deliberate
promotion (README), not a side effect of re-running an old config.

Idempotence: the package's content hash (drafter weights and config, tree paths, lookup settings, target fingerprint)
is a tag of the model version. When a version of `model_name` already carries the hash, no run and no version
are made; that version is checked and gets the alias as above. A tuned tree is kept in `run_dir` with the inputs it was
tuned for and reused on re-runs (timings are noisy, so re-tuning could give another tree); `fresh=True`
re-tunes.

Environment of the logged model: `pip_requirements` pins this environment's versions of the libraries
below plus this project (`falcon-factory`), which is not on PyPI: a server loading the model must have the
project installed (`pip install <repo>` or a wheel from `pip wheel <repo>`) and, for a GPU, a CUDA build
of torch instead of the pinned CPU one; with `--env-manager local` MLflow uses the server's environment.
The target itself is not in the package: the server needs it at the spec recorded in target.json (the
default SmolLM2 target is fetched from PyPI on first use), or `model_config={"target": spec}` at load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from falcon.devices import resolve_dtype
from falcon.drafter import CONFIG_FILE, WEIGHTS_FILE, DrafterMismatchError, load_drafter
from falcon.lookup import LookupConfig
from falcon.target import describe_target, load_target, remote_code_digest, target_fingerprint
from pipelines.benchmark.audit import DivergenceAuditor, first_divergence
from pipelines.benchmark.config import DEFAULT_TIE_FACTOR
from pipelines.drafter_record import TRAIN_INFO_FILE, read_training_record
from pipelines.inference import FalconPackage, encode_prompt, generate_text, load_falcon
from pipelines.lookup_tuning import LookupTuningConfig, describe_lookup
from pipelines.package_format import (
    PREDICT_COLUMNS,
    PREDICT_PARAMS,
    PYFUNC_ARTIFACT,
    PackageError,
    write_package,
)
from pipelines.ray_utils import use_torch_threads
from pipelines.tracking import MlflowConfig, ensure_experiment, redact, resolve_tracking_uri
from pipelines.tree_tuning import TreeTuningConfig, resolve_tree

PYFUNC_FILE = Path(__file__).with_name("falcon_pyfunc.py")
CONTENT_HASH_TAG = "falcon.content_hash"
CHECK_TAG = "falcon.package_check"  # on each checked version: "passed", or "failed: <why>"
CHECK_PROMPT = "What is the capital of France?"
CHECK_TOKENS = 16  # decoded by the check: a few Falcon steps, enough to use the tree below its first pass
MODEL_ARTIFACT_NAME = "falcon"
TUNED_TREES_DIR = "tuned_trees"  # in run_dir: each tuned tree with the inputs it was tuned for
SUMMARY_FILE = "summary.json"
PACKAGE_SUBDIR = "package"
# The libraries the pyfunc imports at load time, pinned to this environment's versions.
REQUIRED_DISTRIBUTIONS = ("falcon-factory", "torch", "transformers", "tokenizers", "safetensors", "accelerate",
                          "gguf", "filelock", "numpy", "pandas", "pyyaml", "mlflow")
# TrainConfig's defaults, used when the train section does not set them: the tree is tuned on the same
# held-out samples training left out.


@dataclass
class PackageConfig:
    run_dir: str  # tuned_trees/, summary.json and the staged package/
    drafter_dir: str | None = None  # a training run's drafter/ (in a run config: <train.run_dir>/drafter)
    # Feature store of the held-out samples the tree is tuned on; None: the one the drafter's training record names
    # (pipelines.drafter_record), whose held-out split is always the one training recorded.
    store: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for the store URL
    target: str | None = None  # load_target spec (None: SmolLM2-135M-Instruct); must be the drafter's target
    trust_remote_code: bool = False
    device: str = "cpu"  # where the tree is timed, and the pyfunc's default device
    dtype: str = "auto"  # the inference dtype (auto: see falcon.devices.resolve_dtype); the tree is tuned in it
    torch_threads: int | None = None  # threads of the tree timing runs (None: every core, as a server would use)
    model_name: str = "falcon-drafter"  # registered model name
    alias: str = "champion"
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="falcon-drafter-package"))
    tree: TreeTuningConfig = field(default_factory=TreeTuningConfig)
    # A chain of tokens copied from the context, verified beside the tree (falcon.lookup): fixed as given
    # (num_tokens 0: off) or tuned with the tree (pipelines.lookup_tuning).
    lookup: LookupTuningConfig = field(default_factory=LookupTuningConfig)

    def __post_init__(self) -> None:
        self.dtype = resolve_dtype(self.dtype, self.device)
        if not self.mlflow.enabled:
            raise ValueError("mlflow.enabled is false, but packaging registers the model in MLflow's registry")
        if not self.run_dir:
            raise ValueError("run_dir must be set")
        if not self.model_name or any(c in self.model_name for c in "'\"/@:"):
            raise ValueError(f"model_name {self.model_name!r} must be non-empty without quotes, '/', '@' or ':'")
        if not self.alias or self.alias == "latest" or (self.alias[0] in "vV" and self.alias[1:].isdigit()):
            raise ValueError(f"alias {self.alias!r} is reserved or empty (MLflow forbids 'latest' and 'v<N>')")
        if not isinstance(self.lookup, LookupTuningConfig):  # decoder settings given directly: used as given
            self.lookup = LookupTuningConfig(**asdict(self.lookup))


# ---------------------------------------------------------------------------------------------------
# The package directory


def target_reference(spec: str | None, target, tokenizer, trust_remote_code: bool) -> dict[str, Any]:
    """target.json: where the target loads from, what it must be, and the digest of its own Python code.

    `trust_remote_code` only records how the package was made: loading never takes it from here.
    """
    spec = str(Path(spec).resolve()) if spec and Path(spec).exists() else spec
    return {"spec": spec, "fingerprint": target_fingerprint(target, tokenizer), "trust_remote_code": trust_remote_code,
            "code_sha256": remote_code_digest(spec), "description": describe_target(target, tokenizer)}


# ---------------------------------------------------------------------------------------------------
# MLflow


@dataclass
class PublishedModel:
    name: str
    version: int
    reused: bool  # an existing version already held this content
    run_id: str | None
    tracking_uri: str
    alias: str | None = None  # the alias now pointing at this version; None until the check passed and it moved
    alias_note: str | None = None  # why the alias was left where it was

    @property
    def version_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else self.version_uri


def pip_requirements() -> list[str]:
    """This environment's versions of what the pyfunc imports (local labels such as +cpu dropped)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in REQUIRED_DISTRIBUTIONS]


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {int: "long", float: "double"}
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # one string column: a DataFrame, a list of str or a str all fit
        outputs=Schema([ColSpec(kind, name) for name, kind in PREDICT_COLUMNS.items()]),
        params=ParamSchema([ParamSpec(name, kinds[type(value)], value) for name, value in PREDICT_PARAMS.items()]),
    )


def find_version(client, name: str, digest: str):
    """The newest version of `name` tagged with this content hash, or None."""
    versions = client.search_model_versions(f"name='{name}' and tags.`{CONTENT_HASH_TAG}` = '{digest}'")
    return max(versions, key=lambda v: int(v.version), default=None)


def publish(package_dir: Path, digest: str, *, alias: str, target, tokenizer, **registration) -> PublishedModel:
    """Register the package (or find the version holding it), check that version, and only then move the alias.

    `registration`: the keyword arguments of `register_package`. Raises PackageError when the check fails.
    """
    registered = register_package(package_dir, digest, **registration)
    check_registered_version(registered, target, tokenizer)
    return point_alias(registered, alias)


def register_package(package_dir: Path, digest: str, *, model_name: str, tracking_uri: str, experiment: str,
                     model_config: dict[str, Any], params: dict[str, Any], metrics: dict[str, float],
                     tags: dict[str, str]) -> PublishedModel:
    """Log the package as a pyfunc model from code and register it, or reuse a version with this hash. No alias.

    Sets mlflow's process-wide tracking URI to `tracking_uri`: logging a model goes through the fluent API.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    tracking_uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    existing = find_version(client, model_name, digest)
    if existing is not None:
        return PublishedModel(model_name, int(existing.version), True, existing.run_id, tracking_uri)
    experiment_id = ensure_experiment(client, experiment, tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"package-{model_name}") as run:
        mlflow.log_params(redact(params))
        mlflow.log_metrics(metrics)
        mlflow.set_tags(redact(tags))
        model_info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_NAME,
            python_model=str(PYFUNC_FILE),
            artifacts={PYFUNC_ARTIFACT: str(package_dir)},
            pip_requirements=pip_requirements(),
            signature=model_signature(),
            model_config=model_config,
            metadata={"falcon_content_hash": digest},
        )
        version = mlflow.register_model(model_info.model_uri, model_name, tags={CONTENT_HASH_TAG: digest})
    return PublishedModel(model_name, int(version.version), False, run.info.run_id, tracking_uri)


def check_registered_version(published: PublishedModel, target, tokenizer) -> None:
    """Load the version back from the registry and decode with it; tag the verdict; PackageError if it failed.

    The load checks the drafter, the tree and the target fingerprint; `target` is the target it was made for.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(published.tracking_uri)
    try:
        package = load_falcon(published.version_uri, tracking_uri=published.tracking_uri, target=(target, tokenizer))
        check_decodes_like_greedy(package)
    except (PackageError, DrafterMismatchError) as error:
        client.set_model_version_tag(published.name, str(published.version), CHECK_TAG, f"failed: {error}"[:4000])
        raise PackageError(f"{published.version_uri} failed packaging's check, so no alias was moved: {error}") from None
    client.set_model_version_tag(published.name, str(published.version), CHECK_TAG, "passed")


def check_decodes_like_greedy(package: FalconPackage) -> None:
    """Falcon's greedy output on CHECK_PROMPT must be plain greedy decoding's, up to a numerical tie."""
    falcon = generate_text(package, CHECK_PROMPT, CHECK_TOKENS)
    plain = generate_text(package, CHECK_PROMPT, CHECK_TOKENS, method="autoregressive")
    index = first_divergence(plain.token_ids, falcon.token_ids)
    if index is None:
        return
    prompt_ids = encode_prompt(package.tokenizer, CHECK_PROMPT).to(package.target.device)
    verdict = DivergenceAuditor(package.target, DEFAULT_TIE_FACTOR).audit(prompt_ids, plain.token_ids,
                                                                        falcon.token_ids, index)
    if verdict["kind"] != "tie":
        raise PackageError(f"decoding {CHECK_PROMPT!r}, Falcon left plain greedy decoding at token {index} and no "
                           f"numerical tie explains it ({verdict}): the package decodes wrongly")


def point_alias(published: PublishedModel, alias: str) -> PublishedModel:
    """Point `alias` at the version, unless it already points at a newer one: it never moves back silently."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(published.tracking_uri)
    current = client.get_registered_model(published.name).aliases.get(alias)
    if current is not None and int(current) > published.version:
        return replace(published, alias_note=(
            f"alias {alias!r} left on version {current}, newer than this version {published.version}; to serve "
            f"this one, promote it deliberately (set_registered_model_alias, see the README)"))
    client.set_registered_model_alias(published.name, alias, str(published.version))
    return replace(published, alias=alias)


# ---------------------------------------------------------------------------------------------------
# The job


@dataclass
class PackageResult:
    published: PublishedModel
    tree_paths: list[list[int]]
    tree_report: dict[str, Any]
    package_dir: str
    lookup: LookupConfig

    @property
    def model_uri(self) -> str:
        return self.published.model_uri


def _tuning_key(config: PackageConfig, drafter_dir: Path, fingerprint: str, held_out: HeldOut | None) -> dict[str, Any]:
    """What a tuned tree depends on; a stored tree made for another key is re-tuned."""
    digest = hashlib.sha256((drafter_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
    return {"drafter_sha256": digest, "target_fingerprint": fingerprint,
            "held_out": dataclasses.asdict(held_out) if held_out else None, "device": config.device,
            "dtype": config.dtype, "tree": dataclasses.asdict(config.tree), "lookup": dataclasses.asdict(config.lookup)}


@dataclass
class HeldOut:
    """The held-out samples a tree is measured on: the split the drafter's training left out."""

    store: str
    eval_fraction: float
    split_seed: int


def held_out_split(config: PackageConfig, drafter_dir: Path) -> HeldOut | None:
    """The split to measure on, from the drafter's training record (its store unless `config.store` names one).
    None when nothing is tuned and no store was named: fixed and preset trees are then packaged unmeasured."""
    tuned = "tuned" in (config.tree.mode, config.lookup.mode)
    if not tuned and config.store is None:
        return None
    record = read_training_record(drafter_dir)
    return HeldOut(config.store or record.store, record.eval_fraction, record.split_seed)


def _resolve_tree_report(config: PackageConfig, drafter, target, fingerprint: str, drafter_dir: Path,
                         run_dir: Path, fresh: bool) -> dict[str, Any]:
    """The tree and lookup settings and their report; tuned ones are kept per inputs in run_dir and reused
    unless `fresh`."""
    held_out = held_out_split(config, drafter_dir)
    key = _tuning_key(config, drafter_dir, fingerprint, held_out)
    key_digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stored_path = run_dir / TUNED_TREES_DIR / f"{key_digest}.json"
    tuned = "tuned" in (config.tree.mode, config.lookup.mode)
    if tuned and not fresh and stored_path.is_file():
        stored = json.loads(stored_path.read_text())
        if stored.get("key") == key:
            print(f"package: reusing the tree tuned earlier for the same inputs ({stored_path}; --fresh re-tunes)",
                  file=sys.stderr)
            return stored["report"]
    store = eval_indices = None
    if held_out is not None:
        from feature_store import FeatureStore

        store = FeatureStore.open(held_out.store, expect_fingerprint=fingerprint, storage_options=config.storage_options)
        _, eval_indices = store.split(held_out.eval_fraction, held_out.split_seed)
        print(f"package: {len(eval_indices)} held-out samples of {store.num_samples} in {redact(held_out.store)}",
              file=sys.stderr)
    _, report = resolve_tree(config.tree, drafter, target, store, eval_indices, config.lookup)
    if tuned:
        stored_path.parent.mkdir(parents=True, exist_ok=True)
        stored_path.write_text(json.dumps({"key": key, "report": report}, indent=1) + "\n")
    return report


def run_packaging(config: PackageConfig, *, fresh: bool = False) -> PackageResult:
    """Tune (or resolve) the tree, write the package, log / register / alias it; see the module docstring."""
    drafter_dir = Path(config.drafter_dir or "")
    if not (drafter_dir / CONFIG_FILE).is_file() or not (drafter_dir / WEIGHTS_FILE).is_file():
        raise PackageError(f"no drafter at {drafter_dir}: run jobs/train_csgd.py first, or set package.drafter_dir")
    run_dir = Path(config.run_dir)
    use_torch_threads(config.torch_threads)
    target, tokenizer = load_target(config.target, device=config.device, dtype=config.dtype,
                                    trust_remote_code=config.trust_remote_code)
    fingerprint = target_fingerprint(target, tokenizer)
    drafter = load_drafter(drafter_dir, target, target_fingerprint=fingerprint)
    report = _resolve_tree_report(config, drafter, target, fingerprint, drafter_dir, run_dir, fresh)
    tree_paths, lookup = report["paths"], LookupConfig(**report["lookup"]["settings"])

    target_ref = target_reference(config.target, target, tokenizer, config.trust_remote_code)
    package_dir = run_dir / PACKAGE_SUBDIR
    meta = write_package(package_dir, drafter_dir, tree_paths, report, target_ref, lookup)
    summary = report["summary"]
    params = {"tree_mode": report["mode"], "tree_nodes": summary["nodes"], "tree_depth": summary["depth"],
              "block_size": report["block_size"], "target_fingerprint": fingerprint, "drafter_dir": str(drafter_dir),
              "device": config.device, "dtype": config.dtype,
              "lookup_mode": config.lookup.mode, "lookup_tokens": lookup.num_tokens, "lookup_max_tokens": lookup.max_tokens}
    metrics = {key: float(report[key]) for key in ("expected_tau", "empirical_tau", "expected_speedup", "step_ms",
                                                    "plain_step_ms") if key in report}
    tags = {CONTENT_HASH_TAG: meta["content_hash"]}
    record = read_training_record(drafter_dir) if (drafter_dir / TRAIN_INFO_FILE).is_file() else None
    if record is not None and record.mlflow_run_id:
        tags["falcon.train_run_id"] = record.mlflow_run_id
    published = publish(package_dir, meta["content_hash"], alias=config.alias, target=target, tokenizer=tokenizer,
                        model_name=config.model_name, tracking_uri=config.mlflow.tracking_uri,
                        experiment=config.mlflow.experiment,
                        model_config={"device": config.device, "dtype": config.dtype},
                        params=params, metrics=metrics, tags=tags)
    result = PackageResult(published, tree_paths, report, str(package_dir), lookup)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(redact({
        "model_uri": published.model_uri, "name": published.name, "version": published.version,
        "alias": published.alias, "alias_note": published.alias_note, "reused_version": published.reused,
        "run_id": published.run_id,
        "tracking_uri": published.tracking_uri, "content_hash": meta["content_hash"], "tree": summary,
        "lookup": asdict(lookup), **metrics,
    }), indent=2) + "\n")
    return result


def describe_result(result: PackageResult) -> str:
    """Human-readable lines for the job's output."""
    published, report, summary = result.published, result.tree_report, result.tree_report["summary"]
    state = "existing version reused (same content)" if published.reused else "new version registered"
    lines = [
        f"model: {published.model_uri} -> {published.name} version {published.version} ({state}; checked: loads "
        "back from the registry and decodes as plain greedy decoding)",
        *([f"alias: {published.alias_note}"] if published.alias_note else []),
        f"registry: {redact(published.tracking_uri)}",
        f"tree ({report['mode']}): {summary['nodes']} nodes, depth {summary['depth']}, per depth "
        f"{summary['nodes_per_depth']}, branches per drafter pass {summary['pass_branches']}",
    ]
    if "expected_tau" in report:
        lines.append(
            f"expected tau {report['expected_tau']:.2f} (held-out replay {report['empirical_tau']:.2f}); step "
            f"{report['step_ms']:.1f} ms vs plain {report['plain_step_ms']:.1f} ms; expected speedup "
            f"{report['expected_speedup']:.2f}x (drafting + verification only, loop overhead excluded)"
        )
    lookup_report = report["lookup"]
    lines.append(f"{describe_lookup(result.lookup)} ({lookup_report['mode']}"
                 + ("; in the expected figures above)" if "tree_only" in lookup_report else ")"))
    if "tree_only" in lookup_report and result.lookup.enabled:
        tree_only = lookup_report["tree_only"]
        lines.append(f"without the chain: expected tau {tree_only['expected_tau']:.2f}, speedup "
                     f"{tree_only['expected_speedup']:.2f}x")
    if "warning" in report:
        lines.append(f"warning: {report['warning']}")
    return "\n".join(lines)
