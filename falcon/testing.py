"""Tiny random-weight targets built entirely in code, for tests and the jobs' "tiny" configs.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in a few milliseconds on
a fixed in-code corpus, and the model is an HF causal LM built from a config with seeded random weights.
"""

import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TINY_VOCAB_SIZE = 768

# ChatML, laid out like SmolLM2's template: a default system turn unless the caller brings one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text for the tiny BPE: prose, chat turns, numbers, punctuation and code, so that every
# kind of prompt the tests throw at it splits into a handful of multi-byte tokens.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A speculative decoder drafts several tokens at once,
and the target model checks them in a single forward pass. When the draft is right, we keep it;
when it is wrong, we keep the target's own token and start again from there.
What is the capital of France? The capital of France is Paris. What is the capital of Italy?
The capital of Italy is Rome. Berlin is the capital of Germany, and Madrid is the capital of Spain.
Please write a short story about a robot who learns to paint. Once upon a time, in a small town by
the sea, there lived a robot named Pixel. Every morning it watched the sun rise over the water.
Explain why the sky is blue. Sunlight is scattered by the molecules of the air, and blue light is
scattered more than red light because it has a shorter wavelength.
Summarise the following text in three sentences. Give me five ideas for a birthday party.
How do I sort a list in Python? You can call sorted(items) or items.sort(key=len, reverse=True).
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? 48 / 2 = 24 clips in May, so
48 + 24 = 72 clips in total. The answer is 72.
A train leaves at 9:45 and arrives at 13:10; how long is the trip? 3 hours and 25 minutes.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 50 64 100 128 256 512 1000 2024.
Prices: $3.50, $12.99, 15%, 7.5 kg, 3.14159, -42, 1e-5, 2^10 = 1024, (a + b) * c = 0.
Punctuation: commas, periods. Questions? Exclamations! Colons: semicolons; "quotes" and 'quotes',
[brackets], {braces}, <angles>, dashes - and -- and underscores_like_this, slashes / and \\ too.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()


for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

import torch
x = torch.randn(4, 8)
y = x @ x.T + 1.0
print(y.shape, y.sum().item())

function add(a, b) { return a + b; }
const total = [1, 2, 3].map((v) => v * 2).reduce(add, 0);
SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;
{"role": "user", "content": "Hello, how are you today?"}
{"role": "assistant", "content": "I am fine, thank you. How can I help you?"}
User: Can you help me plan a trip to Japan for two weeks in spring?
Assistant: Of course! Start in Tokyo for four days, then take the train to Kyoto and Osaka.
User: Translate "good morning" into French and Spanish.
Assistant: In French it is "bonjour", and in Spanish it is "buenos dias".
The meeting is on Monday, March 3rd, at 10 a.m. in room 204. Bring your notes and a laptop.
Water boils at 100 degrees Celsius at sea level, and freezes at 0 degrees.
There are 7 days in a week, 24 hours in a day, 60 minutes in an hour and 60 seconds in a minute.
"""

_FAMILY_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
}

_tokenizer_json: str | None = None


def _trained_tokenizer_json() -> str:
    """Train the byte-level BPE once per process; later calls reuse the serialized result."""
    global _tokenizer_json
    if _tokenizer_json is None:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=TINY_VOCAB_SIZE,
            special_tokens=[ENDOFTEXT, IM_START, IM_END],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator([_CORPUS], trainer=trainer)
        _tokenizer_json = bpe.to_str()
    return _tokenizer_json


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh ChatML byte-level BPE tokenizer (~768 tokens); each call returns an independent object."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHATML_TEMPLATE,
    )


def _as_auto_tokenizer_loads_it(
    tokenizer: PreTrainedTokenizerFast, config: PretrainedConfig
) -> PreTrainedTokenizerBase:
    """The tokenizer exactly as `AutoTokenizer` reloads it next to `config` (~15 ms).

    AutoTokenizer picks the class from the model type, and some classes rebuild the pipeline (qwen2 gets
    `Qwen2Tokenizer`, with NFC and its own pre-tokenizer regex). Returning the reloaded tokenizer keeps
    an in-memory tiny target and a saved-then-loaded one tokenizing, and fingerprinting, identically.
    """
    with tempfile.TemporaryDirectory() as scratch_dir:
        config.save_pretrained(scratch_dir)
        tokenizer.save_pretrained(scratch_dir)
        return AutoTokenizer.from_pretrained(scratch_dir)


def _family_config_class(family: str) -> type[PretrainedConfig]:
    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown tiny target family {family!r}; choose one of {sorted(_FAMILY_CONFIGS)}")
    return _FAMILY_CONFIGS[family]


def make_tiny_model(
    family: str = "llama",
    *,
    vocab_size: int = TINY_VOCAB_SIZE,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    initializer_range: float = 0.15,
    **special_token_ids: int | None,
) -> PreTrainedModel:
    """Random fp32 causal LM of `family` (llama, mistral, qwen2), deterministic for a given seed: the one builder
    of every tiny target (`make_tiny_target` adds its tokenizer).

    `initializer_range`: the default 0.02 gives near-flat logits, so greedy decoding would hinge on float noise;
    0.15 makes the median top-1/top-2 logit gap ~0.25 in fp32.
    """
    config = _family_config_class(family)(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=2048,
        initializer_range=initializer_range,
        **special_token_ids,
    )
    # Seed a forked RNG so building a target neither depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def make_tiny_target(
    family: str = "llama",
    *,
    seed: int = 0,
    save_dir: str | Path | None = None,
    **model_sizes: int,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`make_tiny_model` with the tiny tokenizer (its vocabulary and special tokens).

    With `save_dir`, both are saved there (safetensors) so `falcon.target.load_target(save_dir)` loads them.
    """
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(family, vocab_size=len(tokenizer), seed=seed, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **model_sizes)
    tokenizer = _as_auto_tokenizer_loads_it(tokenizer, model.config)
    if save_dir is not None:
        model.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
    return model, tokenizer
