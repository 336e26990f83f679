"""Dtype names as configs spell them, the dtype a device runs fastest, and the sync before a timer is read."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str) -> str:
    """`dtype`, or for "auto" the fastest inference dtype of `device`: bfloat16 on CUDA and on CPUs with native
    bf16 arithmetic (AVX512-BF16 / AMX), else float32. Without it a CPU emulates bf16 matmuls: SmolLM2-135M
    decoded 2.6x slower in bfloat16 than in float32 on an AVX2-only AMD EPYC."""
    if dtype != "auto":
        return dtype
    if torch.device(device).type == "cpu":
        return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
    return "bfloat16"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
