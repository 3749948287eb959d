"""A real S3-compatible HTTP server for tests and benchmarks: moto's server mode in a
subprocess on 127.0.0.1, with one bucket, and the `Settings` that point at it.

    with MotoS3Server() as server:
        settings = server.settings("results")   # results_uri s3://<bucket>/results
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from ports import free_port
from proctor.settings import Settings

ACCESS_KEY = "proctor-test-key"
SECRET_KEY = "proctor-test-secret"
REGION = "us-east-1"


class MotoS3Server:
    """Starts `python -m moto.server` and creates `bucket`; `stop()` ends the process."""

    def __init__(self, bucket: str = "proctor-results", home: Path | None = None, start_timeout_s: float = 30.0):
        self.bucket = bucket
        self.home = home or Path(tempfile.mkdtemp(prefix="proctor-s3-"))
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    def start(self) -> MotoS3Server:
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = (self.home / "moto.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"moto server exited with {self.process.returncode}: "
                                   f"{(self.home / 'moto.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not answer on {self.endpoint} in "
                                       f"{self.start_timeout_s}s") from None
                time.sleep(0.05)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self):  # noqa: ANN201 - a boto3 S3 client
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        )

    def settings(self, prefix: str = "results", **overrides: object) -> Settings:
        values: dict[str, object] = {
            "results_uri": f"s3://{self.bucket}/{prefix}",
            "s3_endpoint_url": self.endpoint,
            "s3_region": REGION,
            "s3_access_key_id": ACCESS_KEY,
            "s3_secret_access_key": SECRET_KEY,
            "home": self.home,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "log", None) is not None:
            self.log.close()
            self.log = None

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
