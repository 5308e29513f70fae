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
