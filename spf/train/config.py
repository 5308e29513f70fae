"""Typed configs. Each field's comment is its help; ``__post_init__`` rejects bad values before any work."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from spf.core.optimizer import ConflictScope, ProjectMode, ProjectOn

Method = Literal["vanilla", "spf", "safeinstr", "safegrad", "lisa"]
BASELINE_METHODS: tuple[str, ...] = ("safeinstr", "safegrad", "lisa")  # the defenses of spf.train.baselines
Finetune = Literal["lora", "full"]
SafeGradScope = Literal["global", "module"]


def _check_choice(name: str, value: Any, kind: Any) -> None:
    allowed = get_args(kind)
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass
class LoraSettings:
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # scaling s = alpha / r
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None = every linear layer of the decoder blocks

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r: must be ≥ 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout: must be in [0, 1), got {self.dropout}")


@dataclass
class SPFSettings:
    subspace: str | None = None  # folder from `spf estimate` (holds the subspace and its sample)
    sample: str | None = None  # or: a file with the (harmful prompt[, refusal]) sample, estimated at step 0
    sample_index: int | None = None  # which record of `sample` (None = the first one the model refuses)
    rank: int = 8  # k, singular directions per module
    mode: ProjectMode = "always"
    project_on: ProjectOn = "update"
    conflict_scope: ConflictScope = "module"
    refresh_every: int = 1  # re-estimate every T steps from the same sample; 0 = never
    diagnostics: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"spf.rank: must be ≥ 1, got {self.rank}")
        if self.refresh_every < 0:
            raise ValueError(f"spf.refresh_every: must be ≥ 0, got {self.refresh_every}")
        _check_choice("spf.mode", self.mode, ProjectMode)
        _check_choice("spf.project_on", self.project_on, ProjectOn)
        _check_choice("spf.conflict_scope", self.conflict_scope, ConflictScope)


DEFAULT_REFUSAL_PREFIXES = ["I'm sorry", "I cannot", "I can't"]


@dataclass
class UnlikelihoodSettings:
    """Penalise answer openings (by default refusals) on a set of prompts — an over-refusal lever for align."""

    data: str | None = None  # prompts on which the prefixes are pushed down; None = off
    prefixes: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSAL_PREFIXES))
    weight: float = 0.5  # added to the task loss as weight * mean(-log(1 - p(prefix | prompt)))
    batch_size: int = 4  # prompts per step (each scored with every prefix)

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"unlikelihood.weight: must be ≥ 0, got {self.weight}")
        if self.batch_size < 1:
            raise ValueError(f"unlikelihood.batch_size: must be ≥ 1, got {self.batch_size}")
        if not self.prefixes or not all(isinstance(x, str) and x.strip() for x in self.prefixes):
            raise ValueError("unlikelihood.prefixes: must be a non-empty list of non-empty strings")


@dataclass
class BaselineSettings:
    """Knobs of the baseline defenses (spf.train.baselines; docs/baselines.md), used by their `method` only."""

    safety_data: str | None = None  # (harmful prompt, refusal) pairs; needed by safeinstr, safegrad, lisa
    safeinstr_fraction: float = 0.1  # safeinstr: adds max(1, round(fraction * len(task data))) demos
    safegrad_batch: int = 4  # safegrad: safety pairs in the batch whose gradient g_s is computed
    safegrad_every: int = 1  # safegrad: compute g_s and project every N steps (1 = every step)
    safegrad_scope: SafeGradScope = "global"  # one dot product over all trainable params, or per tensor
    lisa_align_steps: int = 2  # lisa: steps on the safety data per cycle (the cycle starts with them)
    lisa_task_steps: int = 8  # lisa: steps on the task data per cycle
    lisa_rho: float = 1.0  # lisa: proximal weight, (rho/2)·||w − w_anchor||² (0 = plain bi-state)

    def __post_init__(self) -> None:
        f = self.safeinstr_fraction
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0.0 < f <= 1.0:
            raise ValueError(f"baselines.safeinstr_fraction: must be in (0, 1], got {f}")
        for name in ("safegrad_batch", "safegrad_every", "lisa_align_steps", "lisa_task_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"baselines.{name}: must be an integer ≥ 1, got {value!r}")
        _check_choice("baselines.safegrad_scope", self.safegrad_scope, SafeGradScope)
        rho = self.lisa_rho
        if isinstance(rho, bool) or not isinstance(rho, int | float) or not 0.0 <= rho < float("inf"):
            raise ValueError(f"baselines.lisa_rho: must be a finite number ≥ 0, got {rho}")


@dataclass
class TrainConfig:
    model: str  # packaged name, local folder or hub id
    data: str  # chat samples (JSON/JSONL/CSV/TSV) with responses
    out: str  # output folder
    method: Method = "spf"
    finetune: Finetune = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    spf: SPFSettings = field(default_factory=SPFSettings)
    unlikelihood: UnlikelihoodSettings = field(default_factory=UnlikelihoodSettings)
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    steps: int = 30  # optimizer steps
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    max_length: int = 256
    seed: int = 0
    save_every: int = 0  # checkpoint every N steps (0 = only the final output)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint in `out` when there is one
    heldout_safety: str | None = None  # (harmful prompt, refusal) pairs to track the refusal loss on
    heldout_n: int = 20
    task_eval_n: int = 16  # training samples whose mean loss is the tracked task loss (0 = off)
    eval_every: int = 10  # held-out refusal loss every N steps (and at 0 and the end)
    # abort (TrainingAborted + abort.json) when a tracked refusal loss (held-out pairs or the estimation
    # sample) rises above its step-0 value by more than this at an eval point; None = never. Non-finite
    # losses and gradients always abort.
    abort_safety_rise: float | None = None
    limit_data: int | None = None
    threads: int | None = None  # torch CPU threads (None = leave torch's default)
    device: str | None = None  # None = cuda when present, else cpu

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if isinstance(self.spf, dict):
            self.spf = SPFSettings(**self.spf)
        if isinstance(self.unlikelihood, dict):
            self.unlikelihood = UnlikelihoodSettings(**self.unlikelihood)
        if isinstance(self.baselines, dict):
            known = {f.name for f in fields(BaselineSettings)}
            unknown = sorted(set(self.baselines) - known)
            if unknown:
                raise ValueError(f"baselines.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
            self.baselines = BaselineSettings(**self.baselines)
        _check_choice("method", self.method, Method)
        _check_choice("finetune", self.finetune, Finetune)
        for name in ("steps", "batch_size", "grad_accum", "heldout_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")
        if self.max_length < 2:  # one prompt token + one supervised response token
            raise ValueError(f"max_length: must be ≥ 2, got {self.max_length}")
        for name in ("save_every", "warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be ≥ 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        bound = self.abort_safety_rise
        if bound is not None and (
            isinstance(bound, bool)
            or not isinstance(bound, int | float)
            or not math.isfinite(bound)
            or bound <= 0
        ):
            raise ValueError(f"abort_safety_rise: must be a finite number > 0 or None, got {bound!r}")
        if bound is not None and not (self.heldout_safety or self.method == "spf" or self.spf.subspace):
            raise ValueError(
                "abort_safety_rise: needs a tracked safety loss — set heldout_safety, or a safety sample "
                "(spf.subspace / spf.sample)"
            )
        if self.method == "spf" and not (self.spf.subspace or self.spf.sample):
            raise ValueError(
                "method 'spf' needs spf.subspace (a folder from `spf estimate`) or spf.sample"
            )
        if self.method in BASELINE_METHODS and not self.baselines.safety_data:
            raise ValueError(
                f"method {self.method!r} needs baselines.safety_data (a file of (harmful prompt, refusal) pairs)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)
