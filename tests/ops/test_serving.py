"""The registered champion served by ``mlflow models serve`` from a fresh virtualenv built only from the
model's own ``requirements.txt`` — no checkout, no project venv: what a deployment does."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from tasks import registry, tracking
from tests.services import mlflow_server_fixture  # noqa: F401  (the `mlflow_server` fixture)

pytestmark = pytest.mark.slow


def local_find_links() -> str | None:
    """The local wheel folder pip's configuration names (as scripts/setup.sh finds it), or None."""
    if os.environ.get("SPF_FIND_LINKS"):
        return os.environ["SPF_FIND_LINKS"]
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            for folder in value.strip().strip("'\"").split():
                if Path(folder).is_dir():
                    return folder
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def champion_dir(mlflow_server: str, tmp_path: Path) -> Path:
    """A LoRA adapter on the tiny model, logged, registered and made champion; its artifacts downloaded."""
    import mlflow.artifacts
    from peft import LoraConfig, get_peft_model

    import spf

    client = tracking.make_client(mlflow_server)
    base, _ = spf.load_model("tiny-llama")
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    run_id = tracking.start_run(client, f"spf-test-serve-{uuid.uuid4().hex[:8]}", "serve", {})
    uri = tracking.log_adapter_model(client, run_id, adapter, "tiny-llama", max_new_tokens=4)
    tracking.end_run(client, run_id)
    name = f"spf-test-serve-{uuid.uuid4().hex[:8]}"
    version = registry.register_candidate(client, name, uri, run_id, {"harmful_rate": 0.0}, {})
    client.set_registered_model_alias(name, registry.CHAMPION, version)
    source = client.get_model_version_download_uri(name, version)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(tmp_path / "champion"), tracking_uri=mlflow_server
    )
    return Path(local)


def test_the_champion_serves_from_a_fresh_env_built_from_its_requirements(champion_dir: Path, tmp_path: Path):
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed (scripts/setup.sh installs it)")
    env_dir = tmp_path / "fresh-env"
    subprocess.run([uv, "venv", "-q", str(env_dir), "--python", sys.executable], check=True)
    python = env_dir / "bin" / "python"
    install = [
        uv,
        "pip",
        "install",
        "-q",
        "--python",
        str(python),
        "-r",
        str(champion_dir / "requirements.txt"),
    ]
    if (links := local_find_links()) is not None:
        install += ["--find-links", links]  # the CPU torch wheel, as setup.sh does
    subprocess.run(install, check=True, timeout=900)
    # nothing of this checkout is importable there: spf comes from the model's own code folder
    probe = subprocess.run([str(python), "-c", "import spf"], capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode != 0

    port = free_port()
    # the environment activated, as a deployment's would be (the server starts `uvicorn` from PATH)
    path = f"{env_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    serve = [str(env_dir / "bin" / "mlflow"), "models", "serve", "-m", str(champion_dir), "--env-manager",
             "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not come up in 300 s"
            time.sleep(1)
        body = json.dumps({"inputs": ["Hello", "How are you?"], "params": {"max_new_tokens": 3}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    predictions = answer["predictions"]
    assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions), answer
