"""A throwaway CA and a TLS-only Redis with a password, for tests of `rediss://`."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis as redis_lib

from tests.support.passwords import (
    PASSWORD,
)
from tests.support.servers import free_port


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server's certificate


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> Certs:
    """Two CAs in `d`, and a server certificate for 127.0.0.1 signed by the first;
    skips the test where there is no openssl command."""
    if not shutil.which("openssl"):
        pytest.skip("no openssl command to make a throwaway CA and server certificate")
    for ca in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN=eventbuffer test {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
            cwd=d,
        )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr", cwd=d,
    )  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.pem", cwd=d,
    )  # fmt: skip
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "other-ca.pem")


@dataclass
class TlsRedis:
    port: int
    certs: Certs

    def url(self, password: str = PASSWORD, ca: Path | None = None, db: int = 0) -> str:
        ca_file = quote(str(ca or self.certs.ca), safe="")
        return (
            f"rediss://:{quote(password, safe='')}@127.0.0.1:{self.port}/{db}"
            f"?ssl_cert_reqs=required&ssl_ca_certs={ca_file}"
        )

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.url())


@contextmanager
def serve_tls_redis(certs: Certs, directory: Path) -> Iterator[TlsRedis]:
    """A TLS-only redis-server requiring `PASSWORD`, its files in `directory`; skips the
    test where there is no redis-server, or one built without TLS."""
    binary = shutil.which("redis-server")
    if not binary:
        pytest.skip("no redis-server binary to run a TLS Redis")
    port = free_port()
    log = directory / "redis.log"
    process = subprocess.Popen(
        [
            binary,
            "--port", "0",  # TLS only: no plain-text port at all
            "--tls-port", str(port),
            "--tls-cert-file", str(certs.cert),
            "--tls-key-file", str(certs.key),
            "--tls-ca-cert-file", str(certs.ca),
            "--tls-auth-clients", "no",
            "--requirepass", PASSWORD,
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    server = TlsRedis(port, certs)
    client = server.client()
    deadline = time.monotonic() + 10
    try:
        while True:
            if process.poll() is not None:
                reason = (process.stderr.read() if process.stderr else b"").decode(errors="replace")
                reason += log.read_text(errors="replace") if log.exists() else ""
                pytest.skip(f"this redis-server cannot serve TLS: {reason.strip()[-300:]}")
            try:
                client.ping()
                break
            except redis_lib.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield server
    finally:
        client.close()
        process.terminate()
        process.wait(10)
