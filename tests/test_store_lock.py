"""The writer lock of a feature store: one writer at a time, stale locks of dead writers broken, lost locks noticed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pytest
from test_feature_store import make_metadata, make_samples

from feature_store.lock import LOCK_FILE, StoreLockedError, WriterLock
from feature_store.schema import StoreMismatchError
from feature_store.storage import Location
from feature_store.store import FeatureStore


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    url = f"memory://lock-test-{uuid.uuid4().hex}"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def write_lock_file(url: str, **holder) -> None:
    values = {"owner": "someone-else", "host": socket.gethostname(), "pid": os.getpid(),
              "created": time.time(), "heartbeat": time.time()} | holder
    location = Location(url)
    location.write_json(location.path(LOCK_FILE), values)


def test_a_second_writer_is_refused_naming_the_holder(url):
    first = WriterLock(Location(url)).acquire()
    try:
        with pytest.raises(StoreLockedError) as refused:
            WriterLock(Location(url)).acquire()
        message = str(refused.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert LOCK_FILE in message and "stale" in message  # says how a dead holder's lock is broken
    finally:
        first.release()
    assert not Location(url).exists(Location(url).path(LOCK_FILE))
    WriterLock(Location(url)).acquire().release()  # released: the next writer gets it


def test_the_lock_of_a_writer_killed_with_sigkill_is_broken(tmp_path, caplog):
    url, marker = str(tmp_path / "store"), tmp_path / "locked"
    child = (
        f"import sys, time, pathlib; sys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
        "from feature_store.lock import WriterLock\n"
        "from feature_store.storage import Location\n"
        f"WriterLock(Location({url!r})).acquire()\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the child never took the lock"
            time.sleep(0.01)
        with pytest.raises(StoreLockedError, match=f"pid {proc.pid}"):
            WriterLock(Location(url)).acquire()  # alive: held
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    lock = WriterLock(Location(url)).acquire()  # same host, process gone: stale, broken at once
    try:
        assert f"pid {proc.pid}" in caplog.text and "stale" in caplog.text
        assert Location(url).read_json(Location(url).path(LOCK_FILE))["owner"] == lock.owner
    finally:
        lock.release()


def test_the_heartbeat_keeps_a_live_lock_and_a_silent_one_goes_stale(url):
    live = WriterLock(Location(url), stale_after_s=0.6).acquire()
    try:
        time.sleep(1.5)  # well past the timeout: only the heartbeat keeps the lock fresh
        with pytest.raises(StoreLockedError):
            WriterLock(Location(url), stale_after_s=0.6).acquire()
    finally:
        live.release()

    # A writer on another host that stopped beating 100 s ago: stale only once the timeout is shorter.
    write_lock_file(url, host="another-host", pid=1, created=time.time() - 200, heartbeat=time.time() - 100)
    with pytest.raises(StoreLockedError, match="another-host"):
        WriterLock(Location(url), stale_after_s=300).acquire()
    WriterLock(Location(url), stale_after_s=60).acquire().release()

    Location(url).write_bytes(Location(url).path(LOCK_FILE), b'{"owner": "trunc')  # damaged: nobody holds it
    WriterLock(Location(url)).acquire().release()


def test_a_writer_that_lost_its_lock_cannot_commit(url):
    store = FeatureStore.create(url, make_metadata())
    lock = WriterLock(store.location).acquire()
    try:
        store.writer_owner = lock.owner
        store.write_shard(0, make_samples(0))
        write_lock_file(url)  # someone deleted the lock by hand and another job took it
        with pytest.raises(StoreLockedError, match="no longer holds"):
            store.write_shard(1, make_samples(1))
        assert store.committed_shards() == {0}
    finally:
        lock.release()
    assert Location(url).read_json(Location(url).path(LOCK_FILE))["owner"] == "someone-else"  # not ours to delete


def test_lock_and_store_errors_never_show_url_credentials(caplog):
    name = f"lock-test-{uuid.uuid4().hex}"
    url, shown = f"memory://writer:pa55word@{name}/store?sig=t0ps3cr3t", f"memory://{name}/store?sig=***"
    store = FeatureStore.create(url, make_metadata())
    messages = []
    lock = WriterLock(store.location).acquire()
    try:
        with pytest.raises(StoreLockedError) as held:
            WriterLock(Location(url)).acquire()
        messages.append(str(held.value))
        store.writer_owner = lock.owner
        write_lock_file(url)
        with pytest.raises(StoreLockedError) as lost:
            store.write_shard(0, make_samples(0))
        messages.append(str(lost.value))
    finally:
        lock.release()
    for refused in (lambda: FeatureStore.open(url, expect_fingerprint="another-target"),
                    lambda: FeatureStore.create(url, make_metadata(topk=0)),
                    lambda: FeatureStore.open(url.replace("/store", "/nothing-here"))):
        with pytest.raises((StoreMismatchError, FileNotFoundError)) as error:
            refused()
        messages.append(str(error.value))
    Location(url).write_json(Location(url).path("store.json"), {})  # re-created by another job, say
    with pytest.raises((StoreMismatchError, ValueError)) as recreated:
        store.check_writer("write shard 1")
    messages.append(str(recreated.value))
    messages.append(repr(store))
    fs, root = fsspec.core.url_to_fs(url)
    fs.rm(root.rsplit("/", 1)[0], recursive=True)

    assert len(messages) == 7
    for message in messages:
        assert "pa55word" not in message and "t0ps3cr3t" not in message, message
        assert shown in message or shown.replace("/store", "/nothing-here") in message, message
    assert "pa55word" not in caplog.text and "t0ps3cr3t" not in caplog.text
