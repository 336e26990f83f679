"""Load a packaged Falcon drafter (MLflow registry or a local directory) and generate text with it.

    package = load_falcon("models:/falcon-smollm2@champion")          # or models:/NAME/3, or a local dir
    out = generate_text(package, "What is the capital of France?", max_new_tokens=64)
    print(out.text, out.tau, out.tokens_per_s)

    python -m pipelines.inference --model models:/falcon-smollm2@champion --prompt "..."

A package is a directory (layout in `pipelines.package_format`, written by `pipelines.packaging`).
Registered models hold it as the pyfunc artifact `package` (`pipelines/falcon_pyfunc.py`). The target is
loaded from the spec the package names, or given by the caller; either way its fingerprint must be the one
the package was made for.

Loading reads data only: nothing a package brings is executed. `trust_remote_code` (a target's own model code)
is off unless the caller turns it on; target.json's flag only records how the package was made. With it on,
the target's Python files must be the ones the package was made with (`code_sha256`), checked before import.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from falcon.devices import resolve_dtype
from falcon.drafter import DrafterMismatchError, load_drafter
from falcon.generate import FalconDecoder, GenerationResult, SamplingConfig, autoregressive_generate
from falcon.lookup import LookupConfig
from falcon.target import (
    TargetLoadError,
    describe_target,
    eos_token_ids,
    load_target,
    remote_code_digest,
    target_fingerprint,
)
from falcon.tree import MAX_TREE_NODES, Tree, TreeConfig, TreeError, build_tree
from pipelines.package_format import DRAFTER_DIR, TREE_FILE, PackageError, find_package_dir, read_package
from pipelines.tracking import DEFAULT_TRACKING_URI, resolve_tracking_uri


@dataclass
class FalconPackage:
    """A loaded package: the decoder and everything it was built from."""

    decoder: FalconDecoder
    target: Any  # transformers PreTrainedModel
    tokenizer: Any
    drafter: Any  # falcon.drafter.Drafter
    tree_paths: list[list[int]]
    fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)  # source, registry version, target, tree, expectations

    @property
    def eos_token_ids(self) -> list[int]:
        return sorted(eos_token_ids(self.target, self.tokenizer))


# ---------------------------------------------------------------------------------------------------
# Locating a package


def _registry_version(uri: str, tracking_uri: str) -> dict[str, Any]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> name, version, alias, run id, source, and the version's
    artifact location (`download_uri`): download_artifacts' `tracking_uri=` does not reach the model registry,
    which would then be the process default (a fresh ./mlflow.db) and not know the model."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    reference = uri.removeprefix("models:/")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in reference:
            name, number = reference.rsplit("/", 1)
            alias, version = None, client.get_model_version(name, number)
        else:
            raise PackageError(f"{uri!r}: give a version or an alias (models:/NAME/VERSION or models:/NAME@ALIAS)")
        download_uri = client.get_model_version_download_uri(version.name, version.version)
    except MlflowException as error:
        raise PackageError(f"cannot resolve {uri} in the registry at {tracking_uri}: {error.message}") from None
    return {"name": version.name, "version": int(version.version), "alias": alias, "run_id": version.run_id,
            "source": version.source, "tags": dict(version.tags), "download_uri": download_uri}


def _download(uri: str, tracking_uri: str, destination: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination),
                                                        tracking_uri=tracking_uri))
    except MlflowException as error:
        raise PackageError(f"cannot download {uri} from {tracking_uri}: {error.message}") from None


# ---------------------------------------------------------------------------------------------------
# Loading


def load_falcon(uri: str | Path, *, device: str = "cpu", dtype: str = "auto", tracking_uri: str | None = None,
                target=None, trust_remote_code: bool = False) -> FalconPackage:
    """Load a package and its target, check they belong together, and build the decoder.

    uri: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, another MLflow artifact URI (`runs:/...`), or a local
    package / MLflow model / packaging run directory.
    target: None (load the target spec the package names, on `device` in `dtype`), another load_target spec
    (the same target stored elsewhere), or an already loaded `(model, tokenizer)`.
    trust_remote_code: import the target's own model code (its config's auto_map). Only the caller turns it on;
    the target's Python files are then checked against the package before anything imports them.
    Raises DrafterMismatchError when the target is not the one the package was made for, PackageError when the
    package or its target cannot be read.
    """
    uri = str(uri)
    info: dict[str, Any] = {"uri": uri}
    if Path(uri).exists():
        return _load_from_dir(find_package_dir(uri), info, device, dtype, target, trust_remote_code)
    if "://" not in uri and not uri.startswith("models:/"):
        raise PackageError(f"{uri!r} is neither an existing directory nor an MLflow URI (models:/NAME@ALIAS)")
    tracking_uri = resolve_tracking_uri(tracking_uri)
    info["tracking_uri"] = tracking_uri
    if uri.startswith("models:/"):
        info["registry"] = _registry_version(uri, tracking_uri)
        uri = info["registry"]["download_uri"]
    with tempfile.TemporaryDirectory(prefix="falcon-package-") as scratch:
        model_dir = _download(uri, tracking_uri, Path(scratch))
        # Everything is read into memory here (safetensors are loaded, not mapped), so the scratch can go.
        return _load_from_dir(find_package_dir(model_dir), info, device, dtype, target, trust_remote_code)


def _load_from_dir(package_dir: Path, info: dict[str, Any], device: str, dtype: str, target,
                   trust_remote_code: bool) -> FalconPackage:
    meta, target_ref, tree = read_package(package_dir)

    model, tokenizer, spec = _package_target(target_ref, target, device, dtype, trust_remote_code)
    fingerprint = _checked_fingerprint(target_ref, model, tokenizer, spec)
    drafter = load_drafter(package_dir / DRAFTER_DIR, model, target_fingerprint=fingerprint)
    try:
        # Packages from before lookup: off; from before the adaptive chain: a fixed chain of num_tokens.
        lookup = LookupConfig(**tree.get("lookup", {}))
    except (TypeError, ValueError) as error:
        raise PackageError(f"{package_dir / TREE_FILE}: bad lookup settings {tree.get('lookup')!r}: {error}") from error
    decoder = FalconDecoder(model, drafter, _package_tree(tree, drafter, model.device, package_dir / TREE_FILE),
                            target_fingerprint=fingerprint, lookup=lookup)
    info.update(
        package_dir=str(package_dir),
        content_hash=meta.get("content_hash"),
        expected=meta.get("expected", {}),
        target={"spec": target_ref.get("spec"), **describe_target(model, tokenizer)},
        tree=tree.get("summary", {}),
        lookup=asdict(lookup),
        drafter={"block_size": drafter.config.block_size, "draft_vocab_size": drafter.config.draft_vocab_size,
                 "num_layers": drafter.config.num_layers, "max_passes": drafter.config.max_passes},
    )
    return FalconPackage(decoder, model, tokenizer, drafter, [list(p) for p in tree["paths"]], fingerprint, info)


def _package_target(target_ref: dict[str, Any], target, device: str, dtype: str,
                    trust_remote_code: bool) -> tuple[Any, Any, str]:
    """(model, tokenizer, spec) of the target: given, or loaded from the caller's spec or the package's."""
    if isinstance(target, tuple):
        return *target, "(given)"
    spec = target_ref.get("spec") if target is None else os.fspath(target)
    if trust_remote_code:
        _check_target_code(target_ref, spec)
    try:
        return *load_target(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code), spec
    except TargetLoadError as error:
        if not trust_remote_code and target_ref.get("trust_remote_code"):
            raise PackageError(
                f"the package's target {spec!r} runs its own model code and was packaged with trust_remote_code, "
                "which is never taken from a package: pass trust_remote_code=True yourself (CLI "
                "--trust-remote-code, pyfunc model_config {'trust_remote_code': true}) only if you trust the "
                f"Python files of that target ({error})"
            ) from None
        raise PackageError(f"cannot load the package's target {spec!r}: {error}") from None


def _check_target_code(target_ref: dict[str, Any], spec: str | None) -> None:
    """The target's Python files must be those the package was made with, checked before anything imports them."""
    found, expected = remote_code_digest(spec), target_ref.get("code_sha256")
    if found != expected:
        raise DrafterMismatchError(
            f"the Python code of target {spec!r} (sha256 {found or 'none'}) is not the code this package was made "
            f"with (sha256 {expected or 'none'}); refusing to import it: load the target the package was made for"
        )


def _checked_fingerprint(target_ref: dict[str, Any], model, tokenizer, spec: str) -> str:
    try:
        fingerprint = target_fingerprint(model, tokenizer)
    except TargetLoadError as error:
        raise PackageError(f"cannot fingerprint the target {spec!r}: {error}") from None
    if fingerprint != target_ref["fingerprint"]:
        made_for = target_ref.get("description", {})
        raise DrafterMismatchError(
            f"this package was made for target {target_ref['fingerprint']} ({made_for.get('architecture', '?')}, "
            f"{made_for.get('num_layers', '?')} layers, spec {target_ref.get('spec')!r}) but the target loaded from "
            f"{spec!r} is {fingerprint}; load the target named in the package (or the same weights stored "
            "elsewhere), or package a drafter trained for this target"
        )
    return fingerprint


def _package_tree(tree: dict[str, Any], drafter, device, path: Path) -> Tree:
    """The package's tree, checked against what the drafter can propose: bad trees fail here, not on a request."""
    if "paths" not in tree:
        raise PackageError(f"damaged package: {path} has no 'paths' list")
    try:
        return build_tree(TreeConfig(paths=tree["paths"]), drafter.config.block_size, drafter.config.max_tree_depth,
                          device, num_candidates=drafter.config.draft_vocab_size or drafter.config.vocab_size,
                          max_nodes=MAX_TREE_NODES)
    except TreeError as error:
        raise PackageError(f"{path}: this tree cannot be served: {error}") from None


# ---------------------------------------------------------------------------------------------------
# Text in, text out


@dataclass
class TextGeneration:
    text: str
    token_ids: list[int]
    method: str  # "falcon" or "autoregressive"
    result: GenerationResult = field(repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tau(self) -> float:
        """Mean tokens per target forward after the prefill (accepted drafts + bonus); 1 for plain decoding."""
        return self.result.mean_accepted

    @property
    def tokens_per_s(self) -> float:
        """New tokens over the whole call, prefill included."""
        return self.result.tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "num_tokens": self.num_tokens, "tau": self.tau,
                "tokens_per_s": self.tokens_per_s, "seconds": self.result.total_s, "steps": len(self.result.steps)}


def encode_prompt(tokenizer, prompt: str | list[dict[str, str]]) -> torch.Tensor:
    """(1, L) ids: the chat template over [user: prompt] or over the messages, with the assistant turn opened.

    A plain string with a tokenizer that has no chat template is encoded as is (a base model's prompt).
    """
    if isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise PackageError("chat messages need a tokenizer with a chat template; pass a plain string instead")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PackageError("the prompt encodes to no tokens")
    return torch.tensor([ids])


def generate_text(package: FalconPackage, prompt: str | list[dict[str, str]], max_new_tokens: int = 256,
                  sampling: SamplingConfig | None = None, *, method: str = "falcon") -> TextGeneration:
    """Generate a reply with Falcon (or, `method="autoregressive"`, plain decoding of the same target)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    input_ids = encode_prompt(package.tokenizer, prompt)
    eos = package.eos_token_ids
    if method == "falcon":
        result = package.decoder.generate(input_ids, max_new_tokens, eos_token_id=eos, sampling=sampling)
    elif method == "autoregressive":
        result = autoregressive_generate(package.target, input_ids, max_new_tokens, eos_token_id=eos, sampling=sampling)
    else:
        raise ValueError(f"method must be 'falcon' or 'autoregressive', got {method!r}")
    text = package.tokenizer.decode(result.tokens, skip_special_tokens=True)
    return TextGeneration(text, list(result.tokens), method, result)


# ---------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate with a packaged Falcon drafter and compare with plain decoding.")
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a package dir")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--tracking-uri", default=None, help=f"default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI}")
    parser.add_argument("--target", default=None, help="load_target spec overriding the one in the package")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="import the target's own model code; only for code you trust (a package never turns it on)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-decoding comparison")
    args = parser.parse_args(argv)
    try:
        package = load_falcon(args.model, device=args.device, dtype=args.dtype, tracking_uri=args.tracking_uri,
                              target=args.target, trust_remote_code=args.trust_remote_code)
    except (PackageError, DrafterMismatchError) as error:
        print(f"inference: error: {error}", file=sys.stderr)
        return 1
    registry = package.info.get("registry")
    source = f"{registry['name']} v{registry['version']}" if registry else package.info["package_dir"]
    tree, lookup = package.info["tree"], package.decoder.lookup
    chain = f"{lookup.num_tokens}..{lookup.max_tokens}" if lookup.max_tokens > lookup.num_tokens else lookup.num_tokens
    print(f"model {source}: target {package.info['target']['architecture']} ({package.fingerprint}), "
          f"tree {tree.get('nodes')} nodes depth {tree.get('depth')}, lookup chain "
          f"{chain or 'off'}, {resolve_dtype(args.dtype, args.device)} on {args.device}")
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    generate_text(package, args.prompt, 4, sampling)  # warm-up: first calls pay one-off allocation costs
    falcon = generate_text(package, args.prompt, args.max_new_tokens, sampling)
    print(f"\n{falcon.text}\n")
    print(f"falcon:         {falcon.num_tokens} tokens, tau {falcon.tau:.2f}, {falcon.tokens_per_s:.1f} tokens/s")
    if not args.no_baseline:
        generate_text(package, args.prompt, 4, sampling, method="autoregressive")
        plain = generate_text(package, args.prompt, args.max_new_tokens, sampling, method="autoregressive")
        same = "identical output" if plain.token_ids == falcon.token_ids else "outputs differ"
        print(f"plain decoding: {plain.num_tokens} tokens, {plain.tokens_per_s:.1f} tokens/s; speedup "
              f"{falcon.tokens_per_s / plain.tokens_per_s:.2f}x ({same})")
    print("tau = tokens per target forward after the prefill (accepted + bonus); tokens/s includes the prefill")
    return 0


if __name__ == "__main__":
    sys.exit(main())
