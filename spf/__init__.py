"""Safety-preserving fine-tuning (SPF): a single-sample safety subspace and a projecting optimizer.

The public names below load lazily (PEP 562): ``import spf`` — and so ``spf --help`` — does not import
torch or transformers until one of them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name → the module that defines it (the layer folders: docs/architecture.md)
_EXPORTS = {
    "BaselineSettings": "spf.training.config",
    "LoraSettings": "spf.training.config",
    "SPFSettings": "spf.training.config",
    "TrainConfig": "spf.training.config",
    "ChatSample": "spf.data.samples",
    "DataError": "spf.data.samples",
    "load_samples": "spf.data.samples",
    "save_samples": "spf.data.samples",
    "to_dataset": "spf.data.hub",
    "ModelLoadError": "spf.models",
    "load_model": "spf.models",
    "tiny_llama": "spf.models",
    "SPFOptimizer": "spf.core.optimizer",
    "SafetySubspace": "spf.core.subspace",
    "estimate_batch_subspace": "spf.core.subspace",
    "estimate_safety_subspace": "spf.core.subspace",
    "subspace_overlap": "spf.core.subspace",
    "TrainResult": "spf.training.loop",
    "train": "spf.training.loop",
    "SPFCallback": "spf.training.hf",
    "SPFTrainer": "spf.training.hf",
    "create_spf_optimizer": "spf.training.hf",
}
# submodules reachable as attributes (``spf.models.default_target_modules`` in the README)
_SUBMODULES = {
    "models",
    "io",
    "refusal",
    "generation",
    "estimate",
    "align",
    "core",
    "data",
    "training",
    "eval",
    "analysis",
    "bench",
    "pipeline",
    "cli",
}

__all__ = [
    "BaselineSettings",
    "ChatSample",
    "DataError",
    "LoraSettings",
    "ModelLoadError",
    "SPFCallback",
    "SPFOptimizer",
    "SPFSettings",
    "SPFTrainer",
    "SafetySubspace",
    "TrainConfig",
    "TrainResult",
    "create_spf_optimizer",
    "estimate_batch_subspace",
    "estimate_safety_subspace",
    "load_model",
    "load_samples",
    "save_samples",
    "subspace_overlap",
    "tiny_llama",
    "to_dataset",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"spf.{name}")
    raise AttributeError(f"module 'spf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES])


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from spf.core.optimizer import SPFOptimizer
    from spf.core.subspace import (
        SafetySubspace,
        estimate_batch_subspace,
        estimate_safety_subspace,
        subspace_overlap,
    )
    from spf.data.hub import to_dataset
    from spf.data.samples import ChatSample, DataError, load_samples, save_samples
    from spf.models import ModelLoadError, load_model, tiny_llama
    from spf.training.config import BaselineSettings, LoraSettings, SPFSettings, TrainConfig
    from spf.training.hf import SPFCallback, SPFTrainer, create_spf_optimizer
    from spf.training.loop import TrainResult, train
