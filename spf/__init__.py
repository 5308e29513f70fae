"""Safety-preserving fine-tuning (SPF): a single-sample safety subspace and a projecting optimizer."""

from spf.config import BaselineSettings, LoraSettings, SPFSettings, TrainConfig
from spf.data import ChatSample, DataError, load_samples, save_samples
from spf.models import ModelLoadError, load_model, tiny_llama
from spf.optimizer import SPFOptimizer
from spf.subspace import SafetySubspace, estimate_batch_subspace, estimate_safety_subspace, subspace_overlap
from spf.training import TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "BaselineSettings",
    "ChatSample",
    "DataError",
    "LoraSettings",
    "ModelLoadError",
    "SPFOptimizer",
    "SPFSettings",
    "SafetySubspace",
    "TrainConfig",
    "TrainResult",
    "estimate_batch_subspace",
    "estimate_safety_subspace",
    "load_model",
    "load_samples",
    "save_samples",
    "subspace_overlap",
    "tiny_llama",
    "train",
]
