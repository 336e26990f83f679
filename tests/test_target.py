"""Target loading, anatomy and fingerprinting, on tiny random targets built in code (no downloads)."""

import copy
import hashlib
import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import falcon.gguf
from falcon.target import TargetLoadError, describe_target, load_target, target_fingerprint, target_parts
from falcon.testing import make_tiny_target

FAMILIES = ["llama", "qwen2"]
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "And the capital of France?"},
]


def random_input_ids(vocab_size: int, shape=(2, 24), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids).logits.float()


@pytest.fixture(scope="module", params=FAMILIES)
def saved_target(request, tmp_path_factory):
    """(family, in-memory model, tokenizer, saved directory)."""
    save_dir = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model, tokenizer = make_tiny_target(request.param, save_dir=save_dir)
    return request.param, model, tokenizer, save_dir


# ---------------------------------------------------------------------------------------------------
# falcon.testing


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_target_is_deterministic_and_peaked(family):
    model, tokenizer = make_tiny_target(family, seed=1)
    same_model, _ = make_tiny_target(family, seed=1)
    other_model, _ = make_tiny_target(family, seed=2)
    assert model.config.vocab_size == len(tokenizer)
    input_ids = random_input_ids(len(tokenizer), shape=(4, 32))
    logits = logits_of(model, input_ids)
    assert torch.equal(logits, logits_of(same_model, input_ids))
    assert not torch.equal(logits, logits_of(other_model, input_ids))
    # Greedy decoding must not hinge on float noise: the top-1/top-2 gap is rarely tiny.
    top2 = logits.topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]).flatten()
    assert (gap > 1e-3).float().mean() > 0.95
    assert gap.median() > 1e-2


def test_tiny_target_rejects_unknown_family():
    with pytest.raises(ValueError, match="unknown tiny target family"):
        make_tiny_target("gpt-nothing")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_tokenizer_chat_template_and_round_trip(family):
    _, tokenizer = make_tiny_target(family)
    assert 512 <= len(tokenizer) <= 1024
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou answer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
        "<|im_start|>assistant\n12 + 30 = 42.<|im_end|>\n"
        "<|im_start|>user\nAnd the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_system = tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False)
    assert without_system.startswith("<|im_start|>system\n") and not without_system.endswith("assistant\n")
    prompt_ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert tokenizer.decode(prompt_ids) == prompt
    assert prompt_ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5  # whole special tokens
    for text in ["def f(x):\n    return x ** 2  # squares", "Prices: $3.50, 15%!", "naïve café, 東京 🚀"]:
        assert tokenizer.decode(tokenizer(text).input_ids) == text


# ---------------------------------------------------------------------------------------------------
# load_target


def test_load_saved_directory_gives_identical_logits(saved_target):
    _, model, tokenizer, save_dir = saved_target
    loaded_model, loaded_tokenizer = load_target(save_dir)
    assert not loaded_model.training and loaded_model.dtype == torch.float32
    input_ids = random_input_ids(len(tokenizer))
    assert torch.equal(logits_of(model, input_ids), logits_of(loaded_model, input_ids))
    text = "What is the capital of France?"
    assert loaded_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id
    assert loaded_model.generation_config.do_sample is False
    assert loaded_model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_load_in_bfloat16(saved_target):
    _, model, tokenizer, save_dir = saved_target
    bf16_model, _ = load_target(save_dir, dtype="bfloat16")
    assert bf16_model.dtype == torch.bfloat16
    input_ids = random_input_ids(len(tokenizer))
    torch.testing.assert_close(
        logits_of(bf16_model, input_ids), logits_of(model, input_ids), atol=0.5, rtol=0.1
    )


def test_greedy_generate_is_deterministic(saved_target):
    _, _, tokenizer, save_dir = saved_target
    model, tokenizer = load_target(save_dir)
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    first = model.generate(prompt, max_new_tokens=8, min_new_tokens=8)
    second = model.generate(prompt, max_new_tokens=8, min_new_tokens=8)
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("/definitely/not/here", "does not exist"),
        ("./not-here-either", "does not exist"),
        ("/definitely/not/here.gguf", "GGUF file .* does not exist"),
        (
            "falcon-tests/not-a-cached-model",
            "neither a local path nor a model in the local Hugging Face cache",
        ),
    ],
)
def test_bad_specs_raise_clear_errors(spec, message, tmp_path):
    with pytest.raises(TargetLoadError, match=message):
        load_target(spec, cache_dir=tmp_path)


def test_bad_local_files_raise_clear_errors(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(TargetLoadError, match="unsupported target file"):
        load_target(tmp_path / "weights.bin", cache_dir=tmp_path)
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(TargetLoadError, match="not a GGUF file"):
        load_target(tmp_path / "fake.gguf", cache_dir=tmp_path)
    with pytest.raises(TargetLoadError, match="no config.json"):
        load_target(tmp_path, cache_dir=tmp_path)
    with pytest.raises(TargetLoadError, match="unsupported dtype"):
        load_target(tmp_path, dtype="float8")


def test_broken_directory_raises_target_load_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(TargetLoadError, match="cannot load target"):
        load_target(tmp_path)


# ---------------------------------------------------------------------------------------------------
# target_parts


@pytest.mark.parametrize("family", [*FAMILIES, "mistral"])
def test_target_parts_recompose_the_logits(family):
    model, tokenizer = make_tiny_target(family)
    decoder, embed_tokens, lm_head = target_parts(model)
    input_ids = random_input_ids(len(tokenizer))
    with torch.no_grad():
        hidden_states = decoder(input_ids).last_hidden_state  # (batch, seq, hidden)
        assert torch.equal(lm_head(hidden_states), model(input_ids).logits)
        from_embeddings = decoder(inputs_embeds=embed_tokens(input_ids)).last_hidden_state
    assert torch.equal(from_embeddings, hidden_states)
    assert embed_tokens.weight.shape == (len(tokenizer), model.config.hidden_size)


# ---------------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_is_stable_across_loads_and_dtypes(saved_target):
    _, model, tokenizer, save_dir = saved_target
    fingerprint = target_fingerprint(*load_target(save_dir))
    assert fingerprint == target_fingerprint(*load_target(save_dir))
    assert fingerprint == target_fingerprint(*load_target(save_dir, dtype="bfloat16"))
    fp16_model, fp16_tokenizer = load_target(save_dir, dtype="float16")
    assert fp16_model.dtype == torch.float16 and fingerprint == target_fingerprint(fp16_model, fp16_tokenizer)
    assert fingerprint == target_fingerprint(model, tokenizer)  # in memory, before saving
    architecture, digest = fingerprint.split("-")
    assert architecture == type(model).__name__ and len(digest) == 16
    int(digest, 16)


def test_fingerprint_of_a_model_cast_to_float16_elsewhere_is_refused(saved_target):
    _, model, tokenizer, _ = saved_target
    with pytest.raises(TargetLoadError, match="already cast to float16.*dtype='float16'"):
        target_fingerprint(copy.deepcopy(model).half(), tokenizer)


def test_fingerprint_changes_with_one_weight(saved_target):
    _, model, tokenizer, _ = saved_target
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.model.layers[-1].mlp.down_proj.weight[3, 5] += 0.25
    assert target_fingerprint(edited, tokenizer) != target_fingerprint(model, tokenizer)


def test_fingerprint_changes_with_the_tokenizer(saved_target):
    _, model, tokenizer, save_dir = saved_target
    other_template = AutoTokenizer.from_pretrained(save_dir)
    other_template.chat_template = tokenizer.chat_template.replace("helpful", "terse")
    extra_token = AutoTokenizer.from_pretrained(save_dir)
    extra_token.add_tokens(["<|tool|>"])
    other_eos = AutoTokenizer.from_pretrained(save_dir)
    other_eos.eos_token = "<|endoftext|>"
    fingerprints = {target_fingerprint(model, t) for t in (tokenizer, other_template, extra_token, other_eos)}
    assert len(fingerprints) == 4
    assert target_fingerprint(model, AutoTokenizer.from_pretrained(save_dir)) == target_fingerprint(
        model, tokenizer
    )


def test_fingerprint_distinguishes_families_and_configs():
    llama, tokenizer = make_tiny_target("llama")
    qwen2, _ = make_tiny_target("qwen2")
    deeper, _ = make_tiny_target("llama", num_layers=3)
    fingerprints = {target_fingerprint(m, tokenizer) for m in (llama, qwen2, deeper)}
    assert len(fingerprints) == 3


def test_describe_target(saved_target):
    family, model, tokenizer, _ = saved_target
    description = describe_target(model, tokenizer)
    assert description == {
        "architecture": type(model).__name__,
        "hidden_size": 64,
        "num_layers": 2,
        "vocab_size": len(tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "fingerprint": target_fingerprint(model, tokenizer),
    }
    assert description["architecture"].lower().startswith(family)


# ---------------------------------------------------------------------------------------------------
# GGUF conversion, with a tiny llama written to GGUF here (F32 tensors, byte-level BPE vocabulary)


def _llama_cpp_rope_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows per head in interleaved-pair order; transformers undoes this on load."""
    rows_per_half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, rows_per_half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama_gguf(model, tokenizer, path) -> None:
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    special_tokens = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special_tokens else 1 for token in tokens])  # 3: control
    writer.add_token_merges([" ".join(pair) for pair in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    state = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    gguf_names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for hf_name, gguf_name in gguf_names.items():
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", state[f"{prefix}{hf_name}.weight"])
        query = state[f"{prefix}self_attn.q_proj.weight"]
        key = state[f"{prefix}self_attn.k_proj.weight"]
        writer.add_tensor(
            f"blk.{layer}.attn_q.weight", _llama_cpp_rope_permute(query, config.num_attention_heads)
        )
        writer.add_tensor(
            f"blk.{layer}.attn_k.weight", _llama_cpp_rope_permute(key, config.num_key_value_heads)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.slow
def test_gguf_is_converted_once_and_matches_the_original(tmp_path, monkeypatch):
    model, tokenizer = make_tiny_target("llama", seed=3)
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(model, tokenizer, gguf_path)
    cache_dir = tmp_path / "cache"
    # What a conversion killed mid-write leaves behind: it must be cleaned, never loaded.
    gguf_sha256 = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    killed_conversion = cache_dir / "targets" / f"gguf-{gguf_sha256[:16]}.partial-killed"
    killed_conversion.mkdir(parents=True)
    (killed_conversion / "config.json").write_text("{")

    converted_model, converted_tokenizer = load_target(gguf_path, cache_dir=cache_dir)
    input_ids = random_input_ids(len(tokenizer))
    assert torch.equal(logits_of(converted_model, input_ids), logits_of(model, input_ids))
    text = "What is the capital of France? def f(x): return 42"
    assert converted_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert converted_tokenizer.chat_template == tokenizer.chat_template
    assert converted_tokenizer.eos_token == "<|im_end|>"
    converted_dirs = [path.name for path in (cache_dir / "targets").iterdir() if path.is_dir()]
    assert converted_dirs == [f"gguf-{gguf_sha256[:16]}"]  # no partial directory left over

    # The second load reuses the converted directory instead of converting again.
    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(falcon.gguf, "_convert_gguf", no_second_conversion)
    reloaded_model, reloaded_tokenizer = load_target(gguf_path, cache_dir=cache_dir, dtype="bfloat16")
    assert target_fingerprint(reloaded_model, reloaded_tokenizer) == target_fingerprint(
        converted_model, converted_tokenizer
    )


def test_auto_dtype_is_bfloat16_only_where_the_device_computes_it_natively(monkeypatch):
    from falcon.devices import resolve_dtype
    from pipelines.benchmark import BenchmarkConfig

    assert resolve_dtype("float16", "cpu") == "float16" and resolve_dtype("auto", "cuda:0") == "bfloat16"
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert resolve_dtype("auto", "cpu") == expected
        # Configs record the dtype they resolved to, so a store or a report says what was really used.
        config = BenchmarkConfig(dtype="auto")
        assert config.dtype == expected
