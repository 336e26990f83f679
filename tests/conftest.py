import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_causal_lm(family: str = "llama", vocab_size: int = 300, seed: int = 0):
    """A random fp32 target built from a config; a large init range keeps greedy decoding away from ties."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, attn_implementation="sdpa",
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    else:
        raise ValueError(family)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_causal_lm("llama")


@pytest.fixture(scope="session")
def tiny_qwen2():
    return tiny_causal_lm("qwen2", seed=1)
