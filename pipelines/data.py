"""Conversations in: read user files into one normalised record (tokenised by `pipelines.tokenization`).

The normalised record, the one format every later stage consumes:

    {"id": str, "messages": [{"role": "system" | "user" | "assistant", "content": str}, ...], "source": str}

plus, for multi-turn benchmarks, an optional `"turns": [str, ...]` holding every user turn.

Readers accept ShareGPT (`conversations: [{"from": "human" | "gpt" | "system", "value": ...}]`) and OpenAI
(`messages: [{"role", "content"}]`) records, stored as a JSON array, JSON lines (optionally gzipped) or
Parquet. A row that cannot be used is skipped, counted by reason in a `RejectCounter` and written to its
rejects file; nothing raises mid-file and nothing disappears silently.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import json
import os
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import pyarrow.parquet as pq

from falcon.errors import FalconError

DEFAULT_MAX_CHARS = 200_000
FORMATS = ("auto", "sharegpt", "openai")

REJECT_REASONS = {
    "invalid_json": "line or file is not valid JSON",
    "too_nested": "JSON nested deeper than the parser can recurse",
    "truncated_file": "compressed file is cut short or damaged; its rows after that point are lost",
    "bad_schema": "row is not an object with a 'messages' or 'conversations' list",
    "empty_conversation": "conversation has no messages",
    "missing_role": "a message has no role",
    "unknown_role": "a message has a role other than system/user/assistant",
    "bad_text": "text is not a string, or not valid UTF-8",
    "empty_message": "a message has empty text",
    "no_user_turn": "conversation has no user message",
    "first_turn_not_user": "first non-system message is not from the user",
    "no_assistant_turn": "conversation has no assistant reply (one is required here)",
    "over_long": "longer than the configured character or token limit",
    "duplicate_id": "id already seen in this read",
    "chat_template_error": "the tokenizer's chat template refused the conversation",
    "chat_template_mismatch": "the chat template renders a conversation prefix differently from the whole",
}
# Rows counted for the report but kept.
KEPT_NOTES = {"truncated": "cut to max_len tokens, assistant tokens remain"}

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


class DataError(FalconError, ValueError):
    """A whole input (file, glob, tokenizer) is unusable; raised before any row is produced from it."""


class Rejected(NamedTuple):
    """Why one row or sample was skipped; `reason` is a key of REJECT_REASONS."""

    reason: str
    detail: str = ""


class RejectCounter:
    """Counts skipped rows by reason and appends each one to a JSONL rejects file.

    `counts` is a plain dict, so Ray workers can return it and the driver `merge`s them.
    """

    def __init__(self, log_path: str | Path | None = None, raw_chars: int = 500):
        self.counts: dict[str, int] = {}
        self.log_path = Path(log_path) if log_path is not None else None
        self.raw_chars = raw_chars

    def reject(self, reason: str, *, raw: Any = None, detail: str = "", **where: Any) -> None:
        """Count one skipped row; `where` locates it (source_file + line/index, or sample_id)."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self.log_path is None:
            return
        raw_text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
        entry = {**where, "reason": reason, "detail": detail, "raw": raw_text[: self.raw_chars]}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # backslashreplace: a lone surrogate in the raw text must not stop the log from being written.
        with open(self.log_path, "a", encoding="utf-8", errors="backslashreplace") as log:
            log.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def note(self, reason: str) -> None:
        """Count a row that is kept but changed (see KEPT_NOTES)."""
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def merge(self, other: RejectCounter | Mapping[str, int]) -> None:
        counts = other.counts if isinstance(other, RejectCounter) else other
        for reason, count in counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + int(count)

    @property
    def rejected(self) -> int:
        return sum(count for reason, count in self.counts.items() if reason not in KEPT_NOTES)

    def table(self, title: str = "skipped rows") -> str:
        if not self.counts:
            return f"{title}: none"
        width = max(len(reason) for reason in self.counts)
        lines = [f"{title}:"]
        for reason, count in sorted(self.counts.items(), key=lambda item: (-item[1], item[0])):
            meaning = KEPT_NOTES.get(reason) or REJECT_REASONS.get(reason, "")
            kept = " (kept)" if reason in KEPT_NOTES else ""
            lines.append(f"  {reason:<{width}}  {count:>8}{kept}  {meaning}")
        lines.append(f"  {'rejected':<{width}}  {self.rejected:>8}")
        if self.log_path is not None and self.rejected:
            lines.append(f"  details: {self.log_path}")
        return "\n".join(lines)


# ---------------------------------------------------------------- normalisation


def _message_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    # OpenAI's multi-part content: usable only when every part is text.
    if isinstance(content, list) and content and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return "".join(part["text"] for part in content)
    return None


def _normalize_message(turn: Any, schema: str, position: int) -> dict[str, str] | Rejected:
    if not isinstance(turn, dict):
        return Rejected("bad_schema", f"message {position} is a {type(turn).__name__}, not an object")
    role_key, text_key, roles = (
        ("from", "value", _SHAREGPT_ROLES) if schema == "sharegpt" else ("role", "content", _OPENAI_ROLES)
    )
    role = turn.get(role_key)
    if role is None:
        return Rejected("missing_role", f"message {position} has no {role_key!r}")
    normalized_role = roles.get(role.lower()) if isinstance(role, str) else None
    if normalized_role is None:
        return Rejected("unknown_role", f"message {position} has role {role!r}")
    text = _message_text(turn.get(text_key))
    if text is None:
        return Rejected("bad_text", f"message {position} {text_key!r} is {type(turn.get(text_key)).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from a "\ud800" escape
        return Rejected("bad_text", f"message {position} is not valid Unicode: {exc.reason}")
    if not text.strip():
        return Rejected("empty_message", f"message {position} ({normalized_role}) is empty")
    return {"role": normalized_role, "content": text}


def _schema_of(raw: dict[str, Any], format: str) -> str | None:
    if format in ("auto", "openai") and "messages" in raw:
        return "openai"
    if format in ("auto", "sharegpt") and "conversations" in raw:
        return "sharegpt"
    return None


def normalize_record(
    raw: Any,
    *,
    default_id: str,
    default_source: str,
    format: str = "auto",
    require_reply: bool = False,
    max_chars: int | None = DEFAULT_MAX_CHARS,
) -> dict[str, Any] | Rejected:
    """One raw ShareGPT/OpenAI row -> the normalised record, or why it cannot be used."""
    if not isinstance(raw, dict):
        return Rejected("bad_schema", f"row is a {type(raw).__name__}, not an object")
    schema = _schema_of(raw, format)
    if schema is None:
        wanted = {"auto": "'messages' or 'conversations'", "openai": "'messages'", "sharegpt": "'conversations'"}
        return Rejected("bad_schema", f"row has no {wanted[format]} field")
    turns = raw["messages" if schema == "openai" else "conversations"]
    if not isinstance(turns, list):
        return Rejected("bad_schema", f"{schema} field is a {type(turns).__name__}, not a list")
    if not turns:
        return Rejected("empty_conversation")
    messages = []
    for position, turn in enumerate(turns):
        message = _normalize_message(turn, schema, position)
        if isinstance(message, Rejected):
            return message
        messages.append(message)
    roles = [message["role"] for message in messages]
    if "user" not in roles:
        return Rejected("no_user_turn")
    if next(role for role in roles if role != "system") != "user":
        return Rejected("first_turn_not_user")
    if require_reply and "assistant" not in roles:
        return Rejected("no_assistant_turn")
    n_chars = sum(len(message["content"]) for message in messages)
    if max_chars is not None and n_chars > max_chars:
        return Rejected("over_long", f"{n_chars} characters > max_chars {max_chars}")
    record_id = raw.get("id")
    source = raw.get("source")
    record: dict[str, Any] = {
        "id": str(record_id) if isinstance(record_id, (str, int)) and str(record_id) else default_id,
        "messages": messages,
        "source": source if isinstance(source, str) and source else default_source,
    }
    if "turns" in raw:
        user_turns = raw["turns"]
        if not (isinstance(user_turns, list) and user_turns and all(isinstance(t, str) and t for t in user_turns)):
            return Rejected("bad_schema", "'turns' is not a list of non-empty strings")
        record["turns"] = user_turns
    return record


# ---------------------------------------------------------------- files


def _container(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    name = name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    return None


def _input_files(path_or_glob: str | Path) -> list[Path]:
    path = Path(path_or_glob)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _container(p))
    elif path.is_file():
        if _container(path) is None:
            raise DataError(f"{path}: unsupported file type; expected .json, .jsonl(.gz) or .parquet")
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path_or_glob), recursive=True))
        files = [p for p in files if p.is_file() and _container(p)]
    if not files:
        raise DataError(f"no conversation files (.json, .jsonl, .parquet) match {str(path_or_glob)!r}")
    return files


def _jsonl_rows(lines: Iterable[bytes]) -> Iterator[tuple[dict[str, int], Any, Any]]:
    """(location, parsed row or Rejected, raw text) per non-blank line."""
    for number, line in enumerate(lines, start=1):
        line = line.rstrip(b"\r\n")
        try:
            text = line.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            yield {"line": number}, Rejected("bad_text", f"line is not valid UTF-8: {exc.reason}"), repr(line)
            continue
        if not text.strip():
            continue
        try:
            yield {"line": number}, json.loads(text), text
        except json.JSONDecodeError as exc:
            yield {"line": number}, Rejected("invalid_json", str(exc)), text
        except RecursionError as exc:
            yield {"line": number}, Rejected("too_nested", str(exc)), text


def _intact_lines(stream: BinaryIO, damage: list[tuple[int, str]]) -> Iterator[bytes]:
    """The lines of a (gzip) stream up to where it is cut or damaged; appends (lines read, error) to `damage`."""
    count = 0
    try:
        for line in stream:
            count += 1
            yield line
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:  # gzip cut short, or its bytes damaged
        damage.append((count, f"{type(exc).__name__}: {exc}"))


def _file_rows(path: Path) -> Iterator[tuple[dict[str, int], Any, Any]]:
    """(location, parsed row or Rejected, raw) per row; a damaged gzip file gives its intact rows, then a reject."""
    damage: list[tuple[int, str]] = []
    yield from _intact_rows(path, damage)
    for lines_read, error in damage:
        yield {"line": lines_read + 1}, Rejected("truncated_file", error), ""


def _intact_rows(path: Path, damage: list[tuple[int, str]]) -> Iterator[tuple[dict[str, int], Any, Any]]:
    container = _container(path)
    if container == "parquet":
        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        index = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield {"index": index}, row, row
                index += 1
        return
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as stream:
        if container == "jsonl":
            yield from _jsonl_rows(_intact_lines(stream, damage))
            return
        data = b"".join(_intact_lines(stream, damage))
    # A .json file is either one JSON array or JSON lines under the wrong suffix.
    if not data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        yield from _jsonl_rows(data.splitlines())
        return
    if damage:
        return  # the rows of a cut JSON array cannot be told apart; the damage is reported for the file
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{path}: not a valid JSON array ({type(exc).__name__}: {exc})") from None
    for index, row in enumerate(rows):
        yield {"index": index}, row, row


def read_conversations(
    path_or_glob: str | Path,
    format: str = "auto",
    *,
    rejects: RejectCounter,
    require_reply: bool = False,
    max_chars: int | None = DEFAULT_MAX_CHARS,
) -> Iterator[dict[str, Any]]:
    """Normalised records from a file, a directory or a glob of ShareGPT/OpenAI JSON, JSONL or Parquet.

    `format` forces the row schema ("sharegpt" or "openai"); "auto" picks it per row from its keys.
    With `require_reply`, rows without an assistant message are rejected (training on given replies);
    without it they are kept as prompts for self-distillation.
    """
    if format not in FORMATS:
        raise DataError(f"unknown conversation format {format!r}; choose one of {FORMATS}")
    seen_ids: set[str] = set()
    for path in _input_files(path_or_glob):
        stem = path.name.split(".")[0]
        for where, row, raw in _file_rows(path):
            location = next(iter(where.values()))
            record = (
                row
                if isinstance(row, Rejected)
                else normalize_record(
                    row,
                    default_id=default_id(path, location),
                    default_source=stem,
                    format=format,
                    require_reply=require_reply,
                    max_chars=max_chars,
                )
            )
            if not isinstance(record, Rejected) and record["id"] in seen_ids:
                record = Rejected("duplicate_id", f"id {record['id']!r}")
            if isinstance(record, Rejected):
                rejects.reject(record.reason, source_file=str(path), **where, detail=record.detail, raw=raw)
                continue
            seen_ids.add(record["id"])
            yield record


def default_id(path: Path, location: int) -> str:
    """The id of a row without one: file stem, a hash of the path as the inputs name it, row index or line.

    Unique per file (not per stem, nor per path inside one input folder: two inputs may each hold a
    `train.jsonl`) and the same on every run over the same inputs, which resuming an extraction relies on.
    """
    path_hash = hashlib.sha256(path.as_posix().encode()).hexdigest()[:8]
    return f"{path.name.split('.')[0]}-{path_hash}-{location}"


@contextlib.contextmanager
def _atomic_output(path: Path) -> Iterator[BinaryIO]:
    """A binary stream that replaces `path` only once fully written (a crash leaves the old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp_path, "xb") as out:
            yield out
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with _atomic_output(Path(path)) as out:
        out.write(data)


# Characters str.splitlines() breaks at that json.dumps(ensure_ascii=False) leaves raw inside strings;
# escaped, every line of our JSONL survives readers that split text naively.
_LINE_BREAKS_ESCAPED = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def write_jsonl_atomic(path: str | Path, records: Iterable[Mapping[str, Any]]) -> tuple[int, str]:
    """Write records as UTF-8 JSON lines, atomically; returns (count, sha256 of the file)."""
    digest = hashlib.sha256()
    count = 0
    with _atomic_output(Path(path)) as out:
        for record in records:
            line = (json.dumps(record, ensure_ascii=False).translate(_LINE_BREAKS_ESCAPED) + "\n").encode("utf-8")
            digest.update(line)
            out.write(line)
            count += 1
    return count, digest.hexdigest()
