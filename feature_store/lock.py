"""One writer at a time per store: a `WRITER.lock` file at the store root, kept fresh by a heartbeat thread.

Two jobs writing one store destroy each other's work (each deletes the other's in-progress shards as
leftovers of a crash), so the extraction driver holds this lock for its whole run, and the Ray workers
writing shards for it check before each commit that the lock still names their job
(`FeatureStore.writer_owner`).

The lock file is JSON: owner (a random id per lock), host, pid, created and heartbeat (Unix times). It
is created only if absent (`Location.create_exclusive`), so two writers starting at once cannot both
get it. A lock is stale, and the next writer breaks it with a warning, when
- its holder ran on this host and that process is gone (killed with -9, say), or
- its heartbeat is older than `stale_after_s` (a holder on another host died; the hosts' clocks must
  agree to well within that timeout), or
- it cannot be parsed (it is written whole and atomically, so nobody is in the middle of writing it).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from falcon.errors import FalconError
from feature_store.storage import Location

log = logging.getLogger(__name__)

LOCK_FILE = "WRITER.lock"
DEFAULT_STALE_AFTER_S = 300.0


class StoreLockedError(FalconError, RuntimeError):
    """Another writer holds the store's writer lock, or this writer no longer holds it."""


def lock_holder(location: Location) -> dict[str, Any] | None:
    """The lock file's content: None when there is no lock, {} when the file is damaged."""
    try:
        holder = location.read_json(location.path(LOCK_FILE))
    except FileNotFoundError:
        return None
    except ValueError:  # truncated or garbled: JSONDecodeError, UnicodeDecodeError
        return {}
    return holder if isinstance(holder, dict) else {}


def stale_reason(holder: dict[str, Any], stale_after_s: float) -> str | None:
    """Why the holder of a lock is presumed dead, or None if it may still be writing."""
    try:
        host, pid, heartbeat = str(holder["host"]), int(holder["pid"]), float(holder["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return "the lock file is damaged"
    if host == socket.gethostname() and not _process_alive(pid):
        return f"its process {pid} on this host is gone"
    silent = time.time() - heartbeat
    if silent > stale_after_s:
        return f"no heartbeat for {silent:.0f} s (timeout {stale_after_s:g} s)"
    return None


def describe_holder(holder: dict[str, Any]) -> str:
    try:
        started = datetime.fromtimestamp(float(holder["created"]), UTC).isoformat(timespec="seconds")
        silent = time.time() - float(holder["heartbeat"])
        return (f"job {holder['owner']} (host {holder['host']}, pid {holder['pid']}, started {started}, "
                f"last heartbeat {silent:.0f} s ago)")
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return f"an unreadable lock {json.dumps(holder)[:200]}"


def ensure_owner(location: Location, owner: str, action: str) -> None:
    """Raise unless the store's lock names `owner`: a writer that lost its lock must not `action`."""
    holder = lock_holder(location)
    if (holder or {}).get("owner") != owner:
        now = describe_holder(holder) if holder else "nobody"
        raise StoreLockedError(
            f"this job no longer holds the writer lock {location.redacted(LOCK_FILE)} (it names {now}), so "
            f"it does not {action}: another job took the store over; let that job finish, then run this one "
            "again"
        )


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class WriterLock:
    """The writer lock of the store at `location`; `with WriterLock(location):` or `acquire()` / `release()`.

    While held, a daemon thread rewrites the heartbeat every `stale_after_s / 4` seconds.
    """

    def __init__(self, location: Location, stale_after_s: float = DEFAULT_STALE_AFTER_S):
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be > 0, got {stale_after_s}")
        self.location = location
        self.stale_after_s = stale_after_s
        self.path = location.path(LOCK_FILE)
        self.owner = uuid.uuid4().hex
        self.created = time.time()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    def acquire(self) -> WriterLock:
        """Take the lock, breaking a stale one; StoreLockedError naming the holder if a live writer has it."""
        for _ in range(3):  # a stale lock is broken, then taken in a race with any other writer breaking it
            if self.location.create_exclusive(self.path, self._content()):
                self._start_heartbeat()
                return self
            holder = lock_holder(self.location)
            if holder is None:
                continue  # released in between
            reason = stale_reason(holder, self.stale_after_s)
            if reason is None:
                raise StoreLockedError(self._held_message(holder))
            log.warning("breaking the stale writer lock %s of %s: %s", self.location.redacted(LOCK_FILE),
                        describe_holder(holder), reason)
            if lock_holder(self.location) == holder:  # not already replaced by a writer that broke it first
                self.location.remove(self.path)
        raise StoreLockedError(f"could not take the writer lock {self.location.redacted(LOCK_FILE)}: "
                               "other writers kept taking it")

    def holds(self) -> bool:
        return (lock_holder(self.location) or {}).get("owner") == self.owner

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file, unless another writer has taken the lock since."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self.holds():
            self.location.remove(self.path)

    def _content(self) -> bytes:
        values = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                  "created": self.created, "heartbeat": time.time()}
        return (json.dumps(values, indent=2, sort_keys=True) + "\n").encode()

    def _held_message(self, holder: dict[str, Any]) -> str:
        return (
            f"feature store at {self.location.redacted()} is being written by another job: "
            f"{describe_holder(holder)}. Wait for it to finish. The lock of a writer that died is stale and "
            f"broken by the next writer: at once on the same host, after {self.stale_after_s:g} s without a "
            f"heartbeat from another host; if you are sure no writer is running, delete "
            f"{self.location.redacted(LOCK_FILE)}"
        )

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="writer-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after_s / 4):
            try:
                if not self.holds():
                    log.error("lost the writer lock %s; this job's shard commits will be refused",
                              self.location.redacted(LOCK_FILE))
                    return
                self.location.write_bytes(self.path, self._content())
            except Exception as exc:  # any storage error (network, throttling): the next beat retries
                log.warning("writer lock heartbeat of %s failed: %s: %s", self.location.redacted(LOCK_FILE),
                            type(exc).__name__, exc)
