from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from spf.data.locate import REPO_SHARED_DATA as SHARED_DATA  # the one locator

# Two cores here: more threads than cores makes CPU tests slower, not faster.
torch.set_num_threads(int(os.environ.get("SPF_TEST_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_mlflow_globals():
    """MLflow's fluent API keeps a process-wide tracking URI and active experiment: a test that sets
    them (mlflow.set_tracking_uri, set_experiment, or transformers' MLflowCallback) must not redirect
    a later test's runs to its store. set_experiment also exports MLFLOW_EXPERIMENT_ID for subprocesses.
    Snapshot all three and put them back, without importing MLflow."""
    import sys

    env = os.environ.get("MLFLOW_EXPERIMENT_ID")
    fluent = sys.modules.get("mlflow.tracking.fluent")
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    saved = (getattr(utils, "_tracking_uri", None), getattr(fluent, "_active_experiment_id", None))
    yield
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    fluent = sys.modules.get("mlflow.tracking.fluent")
    if utils is not None:
        utils._tracking_uri = saved[0]
    if fluent is not None:
        fluent._active_experiment_id = saved[1]
    if env is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = env
