"""The methods compared, each a function from (1, L) prompt ids to a `Run`: plain decoding, transformers' generate
and prompt lookup, the package, the package without its lookup chain, extra drafters."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from falcon.devices import synchronize
from falcon.drafter import load_drafter
from falcon.generate import FalconDecoder, GenerationResult
from falcon.tree import TreeConfig
from pipelines.benchmark.config import DRAFTER_ONLY, BenchmarkConfig, BenchmarkError, ExtraDrafter
from pipelines.inference import FalconPackage


@dataclass
class Run:
    """One method on one sample."""

    tokens: list[int]
    seconds: float
    steps: int = 0  # target forwards after the prefill
    accepted: list[int] = field(default_factory=list)  # per step: accepted draft tokens + bonus
    depth: int = 0  # draft tokens on the deepest tree path, summed over steps

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def _from_result(result: GenerationResult) -> Run:
    return Run(list(result.tokens), result.total_s, len(result.steps),
               [s.accepted + 1 for s in result.steps], sum(s.depth for s in result.steps))


def hf_generate_method(target, eos: list[int], max_new_tokens: int, **extra) -> Callable[[torch.Tensor], Run]:
    """transformers' `generate`, greedy; `extra` adds e.g. prompt_lookup_num_tokens. Target forwards counted."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos[0], **extra)

    def run(input_ids: torch.Tensor) -> Run:
        forwards = []
        hook = target.register_forward_hook(lambda *_: forwards.append(1))
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                output = target.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                         generation_config=config)
            synchronize(input_ids.device)
            seconds = time.perf_counter() - start
        finally:
            hook.remove()
        return Run(output[0, input_ids.shape[1]:].tolist(), seconds, steps=max(len(forwards) - 1, 0))

    return run


def build_methods(config: BenchmarkConfig, package: FalconPackage) -> dict[str, Callable[[torch.Tensor], Run]]:
    from falcon.generate import autoregressive_generate

    target, eos, n = package.target, package.eos_token_ids, config.max_new_tokens
    methods: dict[str, Callable[[torch.Tensor], Run]] = {
        "autoregressive": lambda ids: _from_result(autoregressive_generate(target, ids, n, eos_token_id=eos)),
        "falcon": lambda ids: _from_result(package.decoder.generate(ids, n, eos_token_id=eos)),
    }
    if config.hf_generate:
        methods["hf_generate"] = hf_generate_method(target, eos, n)
    if config.prompt_lookup:
        methods["prompt_lookup"] = hf_generate_method(
            target, eos, n, prompt_lookup_num_tokens=config.prompt_lookup_num_tokens,
            max_matching_ngram_size=config.prompt_lookup_max_ngram)
    if config.drafter_only and package.decoder.lookup.enabled:
        drafter_only = FalconDecoder(target, package.drafter, package.tree_paths)
        methods[DRAFTER_ONLY] = lambda ids: _from_result(drafter_only.generate(ids, n, eos_token_id=eos))
    for extra in config.extra_drafters:
        decoder = extra_decoder(extra, package)
        methods[extra.name] = lambda ids, decoder=decoder: _from_result(decoder.generate(ids, n, eos_token_id=eos))
    return methods


def extra_decoder(extra: ExtraDrafter, package: FalconPackage) -> FalconDecoder:
    drafter_dir = Path(extra.drafter_dir)
    if not drafter_dir.is_dir():
        raise BenchmarkError(f"extra drafter {extra.name!r}: no drafter directory at {drafter_dir}")
    drafter = load_drafter(drafter_dir, package.target, target_fingerprint=package.fingerprint)
    drafter.to(device=package.target.device, dtype=package.target.dtype)
    if extra.paths is not None or extra.branching is not None:
        tree: Any = TreeConfig(paths=extra.paths, branching=extra.branching)
    else:
        tree = [p for p in package.tree_paths if len(p) <= drafter.config.max_tree_depth]
    return FalconDecoder(package.target, drafter, tree, target_fingerprint=package.fingerprint)
