"""Real servers on loopback for the cluster tests, each started as its own process group and stopped after:
an S3 API (moto's standalone server) and an MLflow tracking server (SQLite backend, proxied artifacts)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipelines.ray_utils import free_ports, stop_process_group

BIN = Path(sys.executable).parent
# moto accepts any credentials; these stand for a user's real ones, and the tests check they never leak.
ACCESS_KEY = "AKIAFALCONTEST0KEY"
SECRET_KEY = "falcon-s3-secret-Zq81vX0pLm"


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str

    @property
    def credentials_env(self) -> dict[str, str]:
        """How a cluster's nodes usually get credentials: the environment, never the config."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1"}

    @property
    def storage_options(self) -> dict:
        """fsspec / s3fs options that point at this server (no credentials: they come from the environment)."""
        return {"client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"}}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, **self.storage_options)


@contextmanager
def serve(command: list[str], ready_url: str, log_path: Path, env: dict[str, str] | None = None,
          timeout: float = 180) -> Iterator[subprocess.Popen]:
    """Run a server until the block ends; ready once `ready_url` answers an HTTP GET."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{command[:3]} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    urllib.request.urlopen(ready_url, timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{ready_url} not up after {timeout:.0f} s") from None
                    time.sleep(0.3)
            yield process
        finally:
            stop_process_group(process)


@contextmanager
def s3_server(workdir: Path, bucket: str = "falcon") -> Iterator[S3Server]:
    """moto's S3 API on 127.0.0.1 with one empty bucket."""
    import boto3

    (port,) = free_ports(1)
    endpoint = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with serve(command, f"{endpoint}/moto-api/", workdir / "s3-server.log"):
        server = S3Server(endpoint, bucket)
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        yield server


@contextmanager
def mlflow_server(workdir: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 (SQLite backend, artifacts proxied into workdir); yields its URL, all a
    client needs."""
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{workdir / 'mlflow-server.db'}",
               "--artifacts-destination", str(workdir / "mlflow-artifacts")]
    # Its job runner (huey workers for server-side jobs) is not needed here and doubles the start-up time.
    with serve(command, f"{url}/health", workdir / "mlflow-server.log", env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}):
        yield url
