"""Training: the typed config, the loop, the defenses as method objects, callbacks and checkpoints.

``from spf.training import train, TrainingAborted`` keeps working as it did when this was one module; the
names load lazily, so importing the config (``spf.training.config``, torch-free) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ABORT_FILE": "spf.training.callbacks",
    "TrainingAborted": "spf.training.callbacks",
    "TrainResult": "spf.training.loop",
    "load_safety_samples": "spf.training.loop",
    "train": "spf.training.loop",
}
__all__ = ["ABORT_FILE", "TrainResult", "TrainingAborted", "load_safety_samples", "train"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spf.training' has no attribute {name!r}")
