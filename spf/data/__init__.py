"""Data: chat samples and their loaders, threat scenarios, and the data files the project ships.

The names below load lazily (the loaders import torch), so ``spf data -h`` and the configs that only need
the scenario vocabulary stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {name: "spf.data.samples" for name in ("ChatSample", "DataError", "load_samples", "save_samples")}
_EXPORTS["to_dataset"] = "spf.data.hub"
__all__ = ["ChatSample", "DataError", "load_samples", "save_samples", "to_dataset"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("samples", "scenarios", "locate", "files", "hub"):
        return importlib.import_module(f"spf.data.{name}")
    raise AttributeError(f"module 'spf.data' has no attribute {name!r}")
