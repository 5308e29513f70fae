"""A real MLflow server for tests: the one CI started (``MLFLOW_TRACKING_URI``), else our own.

Import the fixture into a test module (``from tests.services import mlflow_server_fixture  # noqa: F401``);
it is session-scoped, so several modules share one server. When it starts servers itself it uses
``scripts/services.sh`` (the same script CI and developers use) with free ports and a temporary
services folder, starts only S3 + MLflow (Prefect is not needed for tracking and costs seconds on a
2-core box), and stops them at the end of the session.
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Registered under the name `mlflow_server`; the function has another name so that importing it into a
# test module and requesting `mlflow_server` as an argument is not a redefinition (ruff F811).
@pytest.fixture(scope="session", name="mlflow_server")
def mlflow_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI of a running MLflow server (artifacts proxied to S3)."""
    existing = os.environ.get("MLFLOW_TRACKING_URI")
    if existing:
        yield existing
        return
    env = {
        **os.environ,
        "SPF_SERVICES_DIR": str(tmp_path_factory.mktemp("services")),
        "SPF_S3_PORT": str(free_port()),
        "SPF_MLFLOW_PORT": str(free_port()),
        "SPF_PREFECT_PORT": str(free_port()),
        "SPF_SERVICES": "s3 mlflow",
    }
    start = subprocess.run(
        ["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    try:
        if start.returncode != 0:
            pytest.fail(f"scripts/services.sh start failed:\n{start.stdout}\n{start.stderr}", pytrace=False)
        yield f"http://127.0.0.1:{env['SPF_MLFLOW_PORT']}"
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120, check=False)
