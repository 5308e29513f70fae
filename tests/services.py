"""Real local services for tests, all through ``scripts/services.sh`` (the script CI and developers use).

* :class:`Services` — servers of this test's own, in a temporary folder on free ports, that a test may
  stop and start one by one (outage drills) without touching the shared ones.
* ``mlflow_server`` — a session-wide MLflow tracking URI: the one CI started (``MLFLOW_TRACKING_URI``),
  else our own S3 + MLflow (Prefect is not needed for tracking and costs seconds on a 2-core box).
* ``local_services`` — all three (``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL``):
  CI's when it exported them, else our own.

Import a fixture into a test module (``from tests.services import local_services_fixture  # noqa: F401``).
Both are session-scoped, so several modules share one set of servers, stopped at the end of the session.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "services.sh"
ALL = ("s3", "mlflow", "prefect")
URL_KEYS = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_block(n: int) -> int:
    """The first of ``n`` consecutive free ports, below the ephemeral range (so no client socket takes one
    between this check and the server's start): SeaweedFS's internal servers (scripts/services.sh)."""
    import random

    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 30000 - n)
        try:
            socks = []
            for port in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports in 20000-30000")


class Services:
    """``scripts/services.sh`` servers in ``folder`` on free ports (fixed for this object's life, so a
    stopped service comes back at the same URL; MLflow keeps its SQLite file and SeaweedFS its objects
    across a restart)."""

    def __init__(
        self, folder: str | Path, names: tuple[str, ...] = ALL, extra_env: dict[str, str] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.names = tuple(names)
        self.ports = {name: free_port() for name in ALL}
        self.ports["s3aux"] = free_port_block(9)
        self.extra_env = dict(extra_env or {})  # for the servers (e.g. AWS_MAX_ATTEMPTS for MLflow's S3)

    def _env(self, names: tuple[str, ...]) -> dict[str, str]:
        return {
            **os.environ,
            **self.extra_env,
            "SPF_SERVICES_DIR": str(self.folder),
            "SPF_S3_PORT": str(self.ports["s3"]),
            "SPF_S3_AUX_PORT": str(self.ports["s3aux"]),
            "SPF_MLFLOW_PORT": str(self.ports["mlflow"]),
            "SPF_PREFECT_PORT": str(self.ports["prefect"]),
            "SPF_SERVICES": " ".join(names),
        }

    def _run(self, verb: str, names: tuple[str, ...], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SCRIPT), verb],
            env=self._env(names or self.names),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, *names: str) -> None:
        """Start ``names`` (default: all of this object's services); fail the test when one does not."""
        proc = self._run("start", names, 400)
        if proc.returncode != 0:
            pytest.fail(f"scripts/services.sh start failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)

    def stop(self, *names: str) -> None:
        """Stop ``names`` (default: all); the others keep running."""
        self._run("stop", names, 120)

    @property
    def urls(self) -> dict[str, str]:
        p = self.ports
        return {
            "PREFECT_API_URL": f"http://127.0.0.1:{p['prefect']}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{p['mlflow']}",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{p['s3']}",
        }


# Registered under the name `mlflow_server`; the function has another name so that importing it into a
# test module and requesting `mlflow_server` as an argument is not a redefinition (ruff F811).
@pytest.fixture(scope="session", name="mlflow_server")
def mlflow_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI of a running MLflow server (artifacts proxied to S3)."""
    existing = os.environ.get("MLFLOW_TRACKING_URI")
    if existing:
        yield existing
        return
    services = Services(tmp_path_factory.mktemp("services"), ("s3", "mlflow"))
    try:
        services.start()
        yield services.urls["MLFLOW_TRACKING_URI"]
    finally:
        services.stop()


@pytest.fixture(scope="session", name="local_services")
def local_services_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI`` and ``AWS_ENDPOINT_URL`` of running servers."""
    if all(os.environ.get(k) for k in URL_KEYS):
        yield {k: os.environ[k] for k in URL_KEYS}
        return
    services = Services(tmp_path_factory.mktemp("services"))
    try:
        services.start()
        yield services.urls
    finally:
        services.stop()
