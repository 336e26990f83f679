"""Speculative generation with a Falcon drafter and a candidate tree, and the plain autoregressive baseline.

One decoding step (batch 1):
  1. draft:  the drafter reads the target features it has not seen yet, then runs its passes over the tree,
             k tokens per pass and branch (with lookup on, a chain of tokens copied from the context is
             added under the root; on a long match the chain alone is verified, without a drafter pass);
  2. verify: the target runs root + tree in ONE forward with tree attention over its KV cache;
  3. accept: the longest path the target agrees with (greedy), or the path speculative sampling keeps,
             plus one token from the target itself (the bonus token);
  4. compact: keep the accepted path's KV entries and features, drop the rest.

Greedy output is the target's greedy output token for token; sampled output has the target's distribution
(each node's children are point-mass proposals checked one by one against the residual target distribution).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from falcon.devices import synchronize
from falcon.drafter import Drafter, check_drafter_matches
from falcon.drafting import DrafterState, draft_tree
from falcon.lookup import NO_PROPOSAL, LookupConfig, NgramIndex
from falcon.tree import Tree, TreeConfig, build_tree, tree_attention_mask, with_chain


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class StepStats:
    drafted: int  # draft tokens in the tree this step
    accepted: int  # draft tokens accepted, the bonus token excluded
    depth: int  # depth of the tree this step (the longest path that could have been accepted)
    draft_s: float
    verify_s: float
    total_s: float
    chain: int = 0  # of the drafted tokens, those of the lookup chain (all of them on a chain-only step)


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens only
    prefill_s: float
    total_s: float
    steps: list[StepStats] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.total_s if self.total_s > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        """tau: tokens produced per target forward after the prefill (accepted + bonus); plain decoding = 1."""
        return sum(s.accepted + 1 for s in self.steps) / len(self.steps) if self.steps else 1.0


def _as_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def warp_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Target probabilities after temperature and top-p, in float32: the distribution plain sampling uses."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _pick(logits_row: torch.Tensor, sampling: SamplingConfig, generator) -> int:
    if sampling.greedy:
        return int(logits_row.argmax())
    probs = warp_probs(logits_row, sampling).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def _check_prompt(input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"batch size 1 only: expected prompt ids of shape (1, L), got {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. apply the chat template)")
    return input_ids


def _target_forward(target, input_ids, position_ids, cache, attention_mask=None):
    """Last hidden states (the LM head's input) and logits for every input position."""
    out = target.get_decoder()(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
        past_key_values=cache, use_cache=True,
    )
    hidden_states = out.last_hidden_state
    return hidden_states, target.get_output_embeddings()(hidden_states)


def _generator(sampling: SamplingConfig):
    if sampling.greedy:
        return None
    generator = torch.Generator()
    generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    return generator


def _finish(tokens: list[int], new: list[int], eos: set[int], max_new_tokens: int) -> bool:
    """Append `new` to `tokens`, stopping at EOS (kept) or at max_new_tokens. True when generation is over."""
    for token in new:
        tokens.append(token)
        if token in eos or len(tokens) >= max_new_tokens:
            return True
    return False


@torch.inference_mode()
def autoregressive_generate(target, input_ids, max_new_tokens: int, eos_token_id=None,
                            sampling: SamplingConfig | None = None) -> GenerationResult:
    """Plain decoding, one target forward per token: the baseline, with the same interface as Falcon."""
    sampling = sampling or SamplingConfig()
    input_ids = _check_prompt(input_ids).to(target.device)
    eos, generator, device = _as_set(eos_token_id), _generator(sampling), target.device
    start = time.perf_counter()
    cache = DynamicCache()
    length = input_ids.shape[1]
    _, logits = _target_forward(target, input_ids, torch.arange(length, device=device)[None], cache)
    tokens: list[int] = []
    done = _finish(tokens, [_pick(logits[0, -1], sampling, generator)], eos, max_new_tokens)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    steps = []
    while not done:
        step_start = time.perf_counter()
        position = torch.tensor([[length]], device=device)
        _, logits = _target_forward(target, torch.tensor([[tokens[-1]]], device=device), position, cache)
        length += 1
        done = _finish(tokens, [_pick(logits[0, -1], sampling, generator)], eos, max_new_tokens)
        synchronize(device)
        elapsed = time.perf_counter() - step_start
        steps.append(StepStats(drafted=0, accepted=0, depth=0, draft_s=0.0, verify_s=elapsed, total_s=elapsed))
    return GenerationResult(tokens, prefill_s, time.perf_counter() - start, steps)


def accept_greedy(tree: Tree, node_tokens: torch.Tensor, logits: torch.Tensor) -> tuple[list[int], int]:
    """Deepest node whose whole path matches the target's argmax. Returns (path node ids from root, bonus)."""
    target_next = logits.argmax(-1)  # (N+1,)
    match = node_tokens == target_next[tree.parents.clamp(min=0)]
    match[0] = True
    path_ok = ~(tree.tree_mask & ~match[None, :]).any(-1)  # every node on the path from the root matches
    best = int((tree.depths * path_ok).argmax())
    path = tree.tree_mask[best].nonzero().flatten().tolist()  # node ids are in depth order
    return path, int(target_next[best])


def accept_sampled(tree: Tree, node_tokens: list[int], logits: torch.Tensor, sampling: SamplingConfig,
                   generator) -> tuple[list[int], int]:
    """Speculative sampling down the tree with point-mass proposals.

    At a node with target distribution p, try its children in rank order: accept child token x with
    probability p'(x) / sum(p'), where p' is p with the already-rejected children's tokens zeroed. If one is
    accepted, go down; if all are rejected, draw the bonus from p'. Each node thus emits exactly a draw from
    p, so the output has the target's distribution whatever the drafter proposes.
    """
    node, path = 0, [0]
    while True:
        residual = warp_probs(logits[node], sampling).cpu()
        for child in tree.children[node]:
            token = node_tokens[child]
            mass = residual.sum()
            if mass > 0 and torch.rand((), generator=generator) * mass < residual[token]:
                node = child
                path.append(child)
                break
            residual[token] = 0.0
        else:
            return path, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


def keep_cache_entries(cache: DynamicCache, start: int, keep: torch.Tensor) -> None:
    """Move cache entries at absolute positions `keep` (sorted, >= start) to start.., drop everything after."""
    end = start + keep.numel()
    for layer in cache.layers:
        layer.keys[:, :, start:end] = layer.keys.index_select(2, keep)
        layer.values[:, :, start:end] = layer.values.index_select(2, keep)
    dropped = cache.get_seq_length() - end
    if dropped:
        cache.crop(-dropped)  # transformers 5 takes the number of tokens to drop, as a negative count


class FalconDecoder:
    """A target, a drafter and a tree, checked once against each other; `generate` runs the decode loop.

    With `lookup` on, a step whose context repeats its last n-gram also verifies the tokens that followed
    that n-gram before, as a chain under the root beside the drafter's tree; once the match is long enough
    (lookup.chain_only_match), the chain alone, without a drafter pass (falcon.lookup).
    """

    def __init__(self, target, drafter: Drafter, tree: TreeConfig | list | Tree, target_fingerprint: str | None = None,
                 lookup: LookupConfig | None = None):
        if target_fingerprint is not None:
            check_drafter_matches(drafter.config, target_fingerprint)
        if drafter.config.hidden_size != target.config.get_text_config().hidden_size:
            raise ValueError(
                f"drafter hidden size {drafter.config.hidden_size} does not match the target's "
                f"{target.config.get_text_config().hidden_size}"
            )
        if not drafter.attached:
            drafter.attach_target(target.get_input_embeddings(), target.get_output_embeddings())
        device = target.device
        if not isinstance(tree, Tree):
            tree = build_tree(tree, drafter.config.block_size, drafter.config.max_tree_depth, device)
        elif tree.block_size != drafter.config.block_size or tree.depth > drafter.config.max_tree_depth:
            raise ValueError(
                f"tree built for block size {tree.block_size}, depth {tree.depth}; the drafter has block size "
                f"{drafter.config.block_size} and supports depth {drafter.config.max_tree_depth}"
            )
        self.target, self.drafter, self.tree = target, drafter.eval(), tree
        self.lookup = lookup or LookupConfig()
        root_only = build_tree(TreeConfig(paths=[]), drafter.config.block_size, device=device)
        chain_lengths = range(self.lookup.max_tokens + 1)
        self.trees = [with_chain(tree, n) for n in chain_lengths]  # by lookup chain length
        self.chain_trees = [with_chain(root_only, n) for n in chain_lengths]  # no drafter pass: the chain alone

    def _step_tree(self, context: NgramIndex | None, length: int) -> tuple[Tree, list[int]]:
        """The tree this step verifies and the lookup chain in it. Without a full block to draft from (length < k)
        or on a long match, the drafter is not run."""
        proposal = context.propose() if context is not None else NO_PROPOSAL
        drafts = length >= self.drafter.config.block_size and not proposal.chain_only
        return (self.trees if drafts else self.chain_trees)[len(proposal.tokens)], proposal.tokens

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens: int, eos_token_id=None,
                 sampling: SamplingConfig | None = None) -> GenerationResult:
        target, drafter = self.target, self.drafter
        sampling = sampling or SamplingConfig()
        input_ids = _check_prompt(input_ids).to(target.device)
        eos, generator, device = _as_set(eos_token_id), _generator(sampling), target.device
        start = time.perf_counter()

        cache = DynamicCache()
        length = input_ids.shape[1]  # tokens in the target's KV cache
        hidden_states, logits = _target_forward(target, input_ids, torch.arange(length, device=device)[None], cache)
        tokens: list[int] = []
        root = _pick(logits[0, -1], sampling, generator)
        done = _finish(tokens, [root], eos, max_new_tokens)
        state = DrafterState(hidden_states, torch.cat([input_ids[:, 1:], torch.tensor([[root]], device=device)], 1))
        context = NgramIndex(self.lookup, input_ids[0].tolist() + [root]) if self.lookup.enabled else None
        synchronize(device)
        prefill_s = time.perf_counter() - start

        steps: list[StepStats] = []
        while not done:
            step_start = time.perf_counter()
            tree, continuation = self._step_tree(context, length)
            if tree.paths:
                node_tokens = draft_tree(drafter, tree, state, length)
            else:
                node_tokens = torch.zeros(tree.num_nodes + 1, dtype=torch.long, device=device)
            node_tokens[0] = root
            if continuation:
                node_tokens[len(tree.paths) + 1:] = torch.tensor(continuation, device=device)
            synchronize(device)
            draft_end = time.perf_counter()

            mask = tree_attention_mask(tree.tree_mask, length, hidden_states.dtype)
            hidden_states, logits = _target_forward(
                target, node_tokens[None], (length + tree.depths)[None], cache, attention_mask=mask
            )
            if sampling.greedy:
                path, bonus = accept_greedy(tree, node_tokens, logits[0])
            else:
                path, bonus = accept_sampled(tree, node_tokens.tolist(), logits[0], sampling, generator)
            verify_end = time.perf_counter()

            path_index = torch.tensor(path, device=device)
            new_tokens = node_tokens[path_index[1:]].tolist() + [bonus]
            keep_cache_entries(cache, length, length + path_index)
            state.append(hidden_states[:, path_index], torch.tensor([new_tokens], device=device))
            length += len(path)
            root = bonus
            if context is not None:
                context.extend(new_tokens)
            done = _finish(tokens, new_tokens, eos, max_new_tokens)
            synchronize(device)
            steps.append(StepStats(
                drafted=tree.num_nodes, accepted=len(path) - 1, depth=tree.max_path_length,
                draft_s=draft_end - step_start, verify_s=verify_end - draft_end,
                total_s=time.perf_counter() - step_start, chain=tree.chain_length,
            ))
        return GenerationResult(tokens, prefill_s, time.perf_counter() - start, steps)
