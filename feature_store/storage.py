"""Where a store lives: a local directory or any fsspec URL, and the few file operations the store needs.

Local paths (and `file://` URLs) use the OS directly so that shard commits can be atomic renames and
data can be fsync'ed. Other URLs (`s3://`, `gs://`, `memory://`, ...) go through fsspec; there a
single-object write (`write_bytes`) is atomic, but a directory rename is not, which is why the shard
commit protocol (see `feature_store.shard`) relies on a commit record rather than on renames there.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem

from pipelines.tracking import redact_text


class Location:
    """An fsspec filesystem plus the store's root path inside it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def redacted(self, *parts: str) -> str:
        """The URL (joined with `parts`) as messages and logs show it: no `user:password@`, no secret query
        values. Built from the URL, not `path()`: fsspec may keep credentials in the root, scheme stripped."""
        return "/".join([redact_text(self.url).rstrip("/"), *parts])

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_json(self, path: str) -> Any:
        return json.loads(self.fs.cat_file(path))

    def read_many(self, paths: list[str]) -> dict[str, bytes]:
        """Contents of several small files in one call (fsspec batches these on object stores)."""
        if not paths:
            return {}
        contents = self.fs.cat(paths)
        # fsspec may return keys with or without the protocol; map them back to the given paths.
        by_stripped = {self.fs._strip_protocol(k): v for k, v in contents.items()}
        return {p: by_stripped[self.fs._strip_protocol(p)] for p in paths}

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole small file so that readers see either nothing or all of it."""
        if not self.is_local:
            self.fs.pipe_file(path, data)  # one PUT: atomic on object stores
            return
        tmp = _write_synced(f"{path}.tmp-{os.getpid()}", data)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))

    def write_json(self, path: str, value: Any) -> None:
        self.write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Write a small file only if none exists at `path`; False if one does. Readers never see it half written.

        Local: a hard link of a complete temporary file, atomic. fsspec: the filesystem's write-if-absent
        (atomic where the backend supports it, e.g. a conditional PUT), then a read back, so that a backend
        that only checks for existence before writing still tells the loser of a close race that it lost.
        """
        if not self.is_local:
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return self.fs.cat_file(path) == data
        tmp = _write_synced(f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}", data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
        fsync_dir(os.path.dirname(path))
        return True

    def list_names(self, path: str) -> list[str]:
        """Base names of the entries directly under `path`; empty when it does not exist."""
        self.forget_listings()
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(os.path.basename(e.rstrip("/")) for e in entries)

    def remove(self, path: str) -> None:
        """Delete a file or a directory tree; nothing happens if it is absent."""
        if self.is_local:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def nbytes(self, path: str) -> int:
        """Total size of the files under `path`."""
        self.forget_listings()
        return int(self.fs.du(path, total=True))

    def glob(self, pattern: str) -> list[str]:
        self.forget_listings()
        return self.fs.glob(pattern)

    def forget_listings(self) -> None:
        # Object-store filesystems cache listings; other processes (Ray workers) add shards behind our back.
        self.fs.invalidate_cache()

    def zarr_store(self, path: str, read_only: bool) -> zarr.abc.store.Store:
        if self.is_local:
            return zarr.storage.LocalStore(path, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.fs.unstrip_protocol(path), storage_options=self.storage_options or None, read_only=read_only
        )


def fsync_tree(path: str) -> None:
    """Flush every file and directory under a local path to disk, so a rename after it is durable."""
    for directory, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(directory)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: str, data: bytes) -> str:
    """Write a local file and flush it to disk (its directory created if needed); returns `path`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path
