"""The Falcon drafter: LSTM fusion of [target feature, next-token embedding] (each RMS-normalised), relaxed-causal
decoder blocks.

Position i of the drafter reads (f_i, e(t_{i+1})): the target's last hidden state at i and the embedding of
the token after it. It predicts f_{i+k}, the target feature k steps ahead; logits come from the target's frozen
LM head. Positions are grouped in blocks of k that see each other (relaxed causal mask), so one pass over a
block of k known positions predicts the next k features at once (semi-autoregressive).

The target's embedding and LM head are shared, frozen and never saved with the drafter: `attach_target` wires
them in after construction or loading. A reduced draft vocabulary keeps only the LM-head rows of the most
frequent target tokens; `draft_to_target` maps draft ids back to target ids.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from falcon.errors import FalconError

CONFIG_FILE = "drafter_config.json"
WEIGHTS_FILE = "model.safetensors"


class DrafterMismatchError(FalconError, ValueError):
    """A drafter used with a target it was not trained for."""


@dataclass
class DrafterConfig:
    hidden_size: int
    vocab_size: int  # the target's vocabulary
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    block_size: int = 2  # k: tokens proposed per drafter pass
    num_layers: int = 1  # decoder blocks after the LSTM
    lstm_layers: int = 2
    draft_vocab_size: int | None = None  # None: the full target vocabulary
    max_passes: int = 4  # drafter passes per decoding step the drafter is meant for; bounds the tree depth
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    target_fingerprint: str = ""

    @property
    def max_tree_depth(self) -> int:
        return self.max_passes * self.block_size

    @classmethod
    def from_target(cls, target_config, **overrides) -> DrafterConfig:
        """Take the sizes that must match from a transformers config (Llama-, Qwen2-, Mistral-like)."""
        text_config = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        num_heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
        rope_theta = getattr(text_config, "rope_theta", None)
        rope_parameters = getattr(text_config, "rope_parameters", None)
        if rope_theta is None and isinstance(rope_parameters, dict):
            rope_theta = rope_parameters.get("rope_theta")
        values = dict(
            hidden_size=text_config.hidden_size,
            vocab_size=text_config.vocab_size,
            num_heads=num_heads,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            intermediate_size=text_config.intermediate_size,
            rms_norm_eps=getattr(text_config, "rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta or 10000.0),
        )
        values.update(overrides)
        return cls(**values)


def relaxed_causal_mask(num_positions: int, block_size: int, device=None, align_end: bool = False) -> torch.Tensor:
    """Bool (T, T), True where query i may attend key j: every earlier block and its own whole block.

    Training aligns blocks at position 0. At inference the newest k positions must form one block, so blocks
    are aligned to end at the last position instead (`align_end`).
    """
    positions = torch.arange(num_positions, device=device)
    offset = (-num_positions) % block_size if align_end else 0
    block_ids = (positions + offset) // block_size
    return block_ids[None, :] <= block_ids[:, None]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape (B, T, head_dim) for integer positions (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, d); cos/sin: (B, T, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, x, cos, sin, past_kv=None, attn_mask=None):
        """x: (B, T, h). past_kv: (keys, values), each (B or 1, kv_heads, P, d), prepended to this chunk's.

        attn_mask: bool, broadcastable to (B, 1, T, P + T), True = attend; None = attend to everything.
        Returns the output (B, T, h) and this chunk's own (keys, values) so the caller owns the cache.
        """
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = k, v
        if past_kv is not None:
            past_k, past_v = past_kv
            keys = torch.cat([past_k.expand(batch, -1, -1, -1), k], dim=2)
            values = torch.cat([past_v.expand(batch, -1, -1, -1), v], dim=2)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=attn_mask, enable_gqa=self.num_heads != self.num_kv_heads
        )
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, past_kv=None, attn_mask=None):
        attn_out, kv = self.attn(self.input_norm(x), cos, sin, past_kv, attn_mask)
        x = x + attn_out
        return x + self.mlp(self.post_attn_norm(x)), kv


class Drafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        # The target's features (RMS ~2, single dimensions up to ~50 on SmolLM2) would drown its embeddings
        # (RMS ~0.14) in the LSTM's input; normalising both first made held-out top-1 after 150 steps 0.17
        # instead of 0.11 on the demo store.
        self.feature_norm = RMSNorm(h, config.rms_norm_eps)
        self.token_norm = RMSNorm(h, config.rms_norm_eps)
        self.fusion = nn.LSTM(2 * h, h, num_layers=config.lstm_layers, batch_first=True)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(h, config.rms_norm_eps)
        if config.draft_vocab_size is not None:
            self.register_buffer("draft_to_target", torch.arange(config.draft_vocab_size), persistent=True)
        else:
            self.draft_to_target = None
        # Shared with the target; filled by attach_target, never saved.
        self.register_buffer("embed_weight", None, persistent=False)
        self.register_buffer("head_weight", None, persistent=False)
        self.register_buffer("head_bias", None, persistent=False)

    # -- wiring ---------------------------------------------------------------------------------------
    def attach_target(self, embed_tokens: nn.Module, lm_head: nn.Module) -> Drafter:
        """Share the target's frozen token embedding and LM head (rows of the draft vocabulary only)."""
        head_weight = lm_head.weight.detach()
        head_bias = lm_head.bias.detach() if getattr(lm_head, "bias", None) is not None else None
        if self.draft_to_target is not None:
            index = self.draft_to_target.to(head_weight.device)
            head_weight = head_weight.index_select(0, index)
            head_bias = head_bias.index_select(0, index) if head_bias is not None else None
        self.embed_weight = embed_tokens.weight.detach()
        self.head_weight = head_weight
        self.head_bias = head_bias
        return self

    def set_draft_vocab(self, draft_to_target: torch.Tensor) -> None:
        if self.config.draft_vocab_size != draft_to_target.numel():
            raise ValueError(
                f"draft vocabulary has {draft_to_target.numel()} ids, config says {self.config.draft_vocab_size}"
            )
        if (draft_to_target[1:] <= draft_to_target[:-1]).any():
            raise ValueError("draft vocabulary ids must be strictly increasing (see build_draft_vocab)")
        self.draft_to_target.copy_(draft_to_target)

    @property
    def attached(self) -> bool:
        return self.embed_weight is not None

    # -- forward pieces ---------------------------------------------------------------------------------
    def fuse(self, hidden_states, next_ids, lstm_state=None):
        """hidden_states (B, T, h) + next_ids (B, T) target ids -> fused (B, T, h), LSTM state."""
        if not self.attached:
            raise RuntimeError("drafter has no target attached: call attach_target(embed, lm_head) first")
        if next_ids.shape[1] == 0:  # nn.LSTM refuses empty sequences; nothing to read leaves the state as is
            return hidden_states.new_zeros(hidden_states.shape[0], 0, self.config.hidden_size), lstm_state
        fused, lstm_state = self.fusion(self.fusion_inputs(hidden_states, next_ids), lstm_state)
        # A batch_first LSTM returns time-major memory for batch > 1; bf16 CPU matmuls on that layout took
        # 20-60x longer (a drafter pass over 4 tree branches: 18 ms instead of 0.3 ms for the LM head alone).
        return fused.contiguous(), lstm_state

    def fusion_inputs(self, hidden_states, next_ids):
        """The LSTM's input: [normalised feature, normalised next-token embedding] (B, T, 2h)."""
        embeds = F.embedding(next_ids, self.embed_weight).to(hidden_states.dtype)
        return torch.cat([self.feature_norm(hidden_states), self.token_norm(embeds)], dim=-1)

    def decode(self, fused, position_ids, past_kv=None, attn_mask=None):
        """Decoder blocks over fused (B, T, h) -> predicted features (B, T, h), per-layer (keys, values)."""
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, fused.dtype)
        x, new_kv = fused, []
        for layer, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, past_kv[layer] if past_kv is not None else None, attn_mask)
            new_kv.append(kv)
        return x, new_kv

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits from predicted features (..., h) -> (..., V_draft)."""
        return F.linear(self.norm(features), self.head_weight, self.head_bias)

    def forward(self, hidden_states, next_ids, position_ids=None, attn_mask=None):
        """Training pass over whole windows from a zero LSTM state: predicted features (B, T, h)."""
        batch, length = next_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=next_ids.device).expand(batch, length)
        if attn_mask is None:
            attn_mask = relaxed_causal_mask(length, self.config.block_size, next_ids.device)
        fused, _ = self.fuse(hidden_states, next_ids)
        features, _ = self.decode(fused, position_ids, attn_mask=attn_mask)
        return features

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids if self.draft_to_target is None else self.draft_to_target[draft_ids]


def build_draft_vocab(token_counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent target ids (ties broken by id), sorted by id: the draft-to-target map."""
    if size > token_counts.numel():
        raise ValueError(f"draft vocabulary of {size} is larger than the target vocabulary {token_counts.numel()}")
    counts = token_counts.double() - torch.arange(token_counts.numel(), dtype=torch.float64) * 1e-12
    return torch.topk(counts, size).indices.sort().values


def save_drafter(drafter: Drafter, directory: str | Path) -> Path:
    """Weights as safetensors (shared target tensors excluded) + the config as JSON."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in drafter.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(drafter.config), indent=2) + "\n")
    return directory


def load_drafter_config(directory: str | Path) -> DrafterConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no drafter in {directory}: {CONFIG_FILE} is missing")
    values = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(DrafterConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown drafter config keys {unknown} (written by a newer version?)")
    return DrafterConfig(**values)


def check_drafter_matches(config: DrafterConfig, target_fingerprint: str) -> None:
    if config.target_fingerprint and config.target_fingerprint != target_fingerprint:
        raise DrafterMismatchError(
            f"this drafter was trained for target {config.target_fingerprint!r} but the target given is "
            f"{target_fingerprint!r}; train a drafter for this target or load the target it was made for"
        )


def load_drafter(directory: str | Path, target=None, *, target_fingerprint: str | None = None, device=None,
                 dtype=None) -> Drafter:
    """Load a saved drafter; with `target` (a transformers causal LM) attach it, on the target's device and dtype.

    With `target_fingerprint` (see `falcon.target.target_fingerprint`), refuse a drafter made for another target.
    """
    config = load_drafter_config(directory)
    if target_fingerprint is not None:
        check_drafter_matches(config, target_fingerprint)
    drafter = Drafter(config)
    drafter.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)), strict=True)
    if target is not None:
        device = device or next(target.parameters()).device
        dtype = dtype or next(target.parameters()).dtype
    drafter.to(device=device, dtype=dtype)
    if target is not None:
        drafter.attach_target(target.get_input_embeddings(), target.get_output_embeddings())
    return drafter.eval()
