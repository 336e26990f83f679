"""Small feature stores written from a real target's forward passes, for tests that need a store without
running the Ray Data extraction job.

Each sample is a chat-templated prompt followed by the target's own greedy reply (self-distillation, as the
extraction job does), the loss mask on the reply, and the final-norm hidden states of one target forward.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from falcon.csgd import CSGDConfig, csgd_step
from falcon.drafter import Drafter, DrafterConfig, build_draft_vocab, save_drafter
from falcon.generate import autoregressive_generate
from falcon.target import load_target, target_fingerprint, target_parts
from falcon.testing import make_tiny_target
from feature_store import FeatureStore, StoreMetadata
from pipelines.drafter_record import TrainingRecord, write_training_record

PROMPTS = (
    "What is the capital of France?",
    "Write a short story about a robot who learns to paint.",
    "How do I sort a list in Python?",
    "Explain why the sky is blue.",
    "Give me five ideas for a birthday party.",
    "How many days are in a week?",
    "Translate good morning into French and Spanish.",
    "Summarise the following text in three sentences.",
)


def prompt_ids(tokenizer, index: int) -> torch.Tensor:
    """(1, T) ids of a distinct chat prompt: the PROMPTS cycle, each round numbered."""
    text = f"{PROMPTS[index % len(PROMPTS)]} ({index // len(PROMPTS) + 1})"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return torch.tensor([tokenizer(rendered, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def self_distilled_samples(target, tokenizer, n_samples: int, reply_tokens: int) -> list[dict]:
    """Prompt + the target's greedy reply, with the hidden states the target's LM head reads."""
    decoder, _, _ = target_parts(target)
    samples = []
    for index in range(n_samples):
        prompt = prompt_ids(tokenizer, index)
        reply = autoregressive_generate(target, prompt, reply_tokens).tokens
        input_ids = torch.cat([prompt, torch.tensor([reply])], dim=1)  # (1, T)
        hidden_states = decoder(input_ids).last_hidden_state[0]  # (T, h)
        loss_mask = torch.zeros(input_ids.shape[1], dtype=torch.uint8)
        loss_mask[prompt.shape[1]:] = 1
        samples.append(dict(sample_id=f"sample-{index:04d}", input_ids=input_ids[0], loss_mask=loss_mask,
                            hidden_states=hidden_states))
    return samples


def write_target_store(url: str | Path, target_dir: str | Path, *, n_samples: int = 24,
                       samples_per_shard: int = 6, reply_tokens: int = 48) -> FeatureStore:
    """A committed store of `n_samples` self-distilled samples of the target saved at `target_dir`."""
    target, tokenizer = load_target(target_dir)
    metadata = StoreMetadata(
        target_fingerprint=target_fingerprint(target, tokenizer),
        tokenizer=f"{type(tokenizer).__name__}(vocab={len(tokenizer)})",
        hidden_size=target.config.hidden_size,
        vocab_size=target.config.vocab_size,
        topk=0,
        extraction_config={"fixture": "tests/store_fixtures.py", "reply_tokens": reply_tokens},
    )
    store = FeatureStore.create(str(url), metadata)
    threads = torch.get_num_threads()
    # One thread: a tiny model gains nothing from two, and on a busy 2-core machine two threads were
    # measured 30x slower (each step waits on a preempted thread).
    torch.set_num_threads(1)
    try:
        samples = self_distilled_samples(target, tokenizer, n_samples, reply_tokens)
    finally:
        torch.set_num_threads(threads)
    for shard_id, start in enumerate(range(0, n_samples, samples_per_shard)):
        store.write_shard(shard_id, samples[start:start + samples_per_shard])
    store.commit_manifest()
    return store


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


def trained_drafter_workspace(root: Path) -> dict:
    """A tiny target, a 12-sample store of its replies and a briefly trained drafter for it, under `root`; the
    drafter records half the store as its held-out split, as the training job would."""
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
    write_training_record(root / "train" / "drafter",
                          TrainingRecord(store=str(root / "store"), eval_fraction=0.5, split_seed=0))
    return dict(root=root, target_dir=target_dir, store=store, drafter_dir=root / "train" / "drafter",
                tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
