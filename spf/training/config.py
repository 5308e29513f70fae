"""Typed configs. Each field's ``metadata["help"]`` is its help (the `spf train` flags are generated from the
fields); ``__post_init__`` rejects bad values before any work."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from spf.core.modes import ConflictScope, ProjectMode, ProjectOn

# Method and BASELINE_METHODS stay here, beside the config, not in spf.training.methods: config must import
# without torch so that `spf --help` stays fast. spf.training.methods.METHODS maps each name to its class.
Method = Literal["vanilla", "spf", "safeinstr", "safegrad", "lisa"]
# the defenses of spf.training.baselines
BASELINE_METHODS: tuple[str, ...] = ("safeinstr", "safegrad", "lisa")
Finetune = Literal["lora", "full"]
FullParams = Literal["projected", "all"]
SafeGradScope = Literal["global", "module"]


def _check_choice(name: str, value: Any, kind: Any) -> None:
    allowed = get_args(kind)
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass
class LoraSettings:
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling s = alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout, in [0, 1)"})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "modules to adapt; None = every linear layer of the decoder blocks"}
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r: must be ≥ 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout: must be in [0, 1), got {self.dropout}")


@dataclass
class SPFSettings:
    subspace: str | None = field(
        default=None, metadata={"help": "folder from `spf estimate` (holds the subspace and its sample)"}
    )
    sample: str | None = field(
        default=None,
        metadata={"help": "or: a file with the (harmful prompt[, refusal]) sample, estimated at step 0"},
    )
    sample_index: int | None = field(
        default=None, metadata={"help": "which record of `sample` (None = the first one the model refuses)"}
    )
    rank: int = field(default=8, metadata={"help": "k, singular directions per module"})
    mode: ProjectMode = field(
        default="always", metadata={"help": "always project, or only when the update raises the safety loss"}
    )
    project_on: ProjectOn = field(
        default="update", metadata={"help": "project the optimizer's update (Adam-correct) or the gradient"}
    )
    conflict_scope: ConflictScope = field(
        default="module", metadata={"help": "where conflict mode tests the sign of the inner product"}
    )
    refresh_every: int = field(
        default=1, metadata={"help": "re-estimate every T steps from the same sample; 0 = never"}
    )
    diagnostics: bool = field(default=True, metadata={"help": "record the per-step spf/* diagnostics"})

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

    data: str | None = field(
        default=None, metadata={"help": "prompts on which the prefixes are pushed down; None = off"}
    )
    prefixes: list[str] = field(
        default_factory=lambda: list(DEFAULT_REFUSAL_PREFIXES),
        metadata={"help": "answer openings whose probability is pushed down"},
    )
    weight: float = field(
        default=0.5,
        metadata={"help": "added to the task loss as weight * mean(-log(1 - p(prefix | prompt)))"},
    )
    batch_size: int = field(default=4, metadata={"help": "prompts per step (each scored with every prefix)"})

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"unlikelihood.weight: must be ≥ 0, got {self.weight}")
        if self.batch_size < 1:
            raise ValueError(f"unlikelihood.batch_size: must be ≥ 1, got {self.batch_size}")
        if not self.prefixes or not all(isinstance(x, str) and x.strip() for x in self.prefixes):
            raise ValueError("unlikelihood.prefixes: must be a non-empty list of non-empty strings")


@dataclass
class BaselineSettings:
    """Knobs of the baseline defenses (spf.training.baselines; docs/baselines.md), used by their `method` only."""

    safety_data: str | None = field(
        default=None,
        metadata={"help": "(harmful prompt, refusal) pairs; needed by safeinstr, safegrad, lisa"},
    )
    safeinstr_fraction: float = field(
        default=0.1, metadata={"help": "safeinstr: adds max(1, round(fraction * len(task data))) demos"}
    )
    safegrad_batch: int = field(
        default=4, metadata={"help": "safegrad: safety pairs in the batch whose gradient g_s is computed"}
    )
    safegrad_every: int = field(
        default=1, metadata={"help": "safegrad: compute g_s and project every N steps (1 = every step)"}
    )
    safegrad_scope: SafeGradScope = field(
        default="global",
        metadata={"help": "safegrad: one dot product over all trainable params (global), or per tensor"},
    )
    lisa_align_steps: int = field(
        default=2, metadata={"help": "lisa: steps on the safety data per cycle (the cycle starts with them)"}
    )
    lisa_task_steps: int = field(default=8, metadata={"help": "lisa: steps on the task data per cycle"})
    lisa_rho: float = field(
        default=1.0,
        metadata={"help": "lisa: proximal weight, (rho/2)·||w − w_anchor||² (0 = plain bi-state)"},
    )

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
    model: str = field(metadata={"help": "packaged name, local folder or hub id"})
    data: str = field(metadata={"help": "chat samples (JSON/JSONL/CSV/TSV) with responses"})
    out: str = field(metadata={"help": "output folder"})
    method: Method = field(default="spf", metadata={"help": "vanilla, spf, or a baseline defense"})
    finetune: Finetune = field(default="lora", metadata={"help": "LoRA adapters or full fine-tuning"})
    # Full fine-tuning trains, by default, only what the SPF projection covers (the decoder blocks' linear
    # weights), for every method: otherwise SPF would leave embeddings, norms and the head unprojected, and a
    # vanilla run would train more than an SPF run — an unfair comparison. "all" trains every parameter.
    full_params: FullParams = field(
        default="projected",
        metadata={
            "help": "full fine-tuning: 'projected' = only the decoder blocks' linear weights (what SPF "
            "projects), 'all' = every parameter"
        },
    )
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings"})
    spf: SPFSettings = field(default_factory=SPFSettings, metadata={"help": "SPF settings"})
    unlikelihood: UnlikelihoodSettings = field(
        default_factory=UnlikelihoodSettings, metadata={"help": "unlikelihood (prefix penalty) settings"}
    )
    baselines: BaselineSettings = field(
        default_factory=BaselineSettings, metadata={"help": "baseline defense settings"}
    )
    steps: int = field(default=30, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "samples per micro-batch (per rank)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "linear learning-rate warm-up steps"})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "clip the total gradient norm to this; None = no clipping"}
    )
    max_length: int = field(default=256, metadata={"help": "tokens per sample (longer ones are cut)"})
    seed: int = field(default=0, metadata={"help": "seed of the model init, data order and baselines"})
    save_every: int = field(
        default=0, metadata={"help": "checkpoint every N steps (0 = only the final output)"}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept"})
    resume: bool = field(
        default=True, metadata={"help": "continue from the newest checkpoint in `out` when there is one"}
    )
    heldout_safety: str | None = field(
        default=None, metadata={"help": "(harmful prompt, refusal) pairs to track the refusal loss on"}
    )
    heldout_n: int = field(default=20, metadata={"help": "held-out safety pairs used"})
    task_eval_n: int = field(
        default=16, metadata={"help": "training samples whose mean loss is the tracked task loss (0 = off)"}
    )
    eval_every: int = field(
        default=10, metadata={"help": "held-out refusal loss every N steps (and at 0 and the end)"}
    )
    abort_safety_rise: float | None = field(
        default=None,
        metadata={
            "help": "abort (TrainingAborted + abort.json) when a tracked refusal loss (held-out pairs or the "
            "estimation sample) rises above its step-0 value by more than this at an eval point; None = "
            "never. Non-finite losses and gradients always abort."
        },
    )
    limit_data: int | None = field(default=None, metadata={"help": "use only the first N training samples"})
    threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads (None = leave torch's default)"}
    )
    device: str | None = field(default=None, metadata={"help": "None = cuda when present, else cpu"})

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
        _check_train_config(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)


def _check_train_config(cfg: TrainConfig) -> None:
    """TrainConfig's own choices, ranges and the settings each method needs (before any work)."""
    _check_choice("method", cfg.method, Method)
    _check_choice("finetune", cfg.finetune, Finetune)
    _check_choice("full_params", cfg.full_params, FullParams)
    for name in ("steps", "batch_size", "grad_accum", "heldout_n"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}: must be ≥ 1, got {getattr(cfg, name)}")
    if cfg.max_length < 2:  # one prompt token + one supervised response token
        raise ValueError(f"max_length: must be ≥ 2, got {cfg.max_length}")
    for name in ("save_every", "warmup_steps", "eval_every"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name}: must be ≥ 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ValueError(f"lr: must be > 0, got {cfg.lr}")
    bound = cfg.abort_safety_rise
    if bound is not None and (
        isinstance(bound, bool)
        or not isinstance(bound, int | float)
        or not math.isfinite(bound)
        or bound <= 0
    ):
        raise ValueError(f"abort_safety_rise: must be a finite number > 0 or None, got {bound!r}")
    if bound is not None and not (cfg.heldout_safety or cfg.method == "spf" or cfg.spf.subspace):
        raise ValueError(
            "abort_safety_rise: needs a tracked safety loss — set heldout_safety, or a safety sample "
            "(spf.subspace / spf.sample)"
        )
    if cfg.method == "spf" and not (cfg.spf.subspace or cfg.spf.sample):
        raise ValueError("method 'spf' needs spf.subspace (a folder from `spf estimate`) or spf.sample")
    if cfg.method in BASELINE_METHODS and not cfg.baselines.safety_data:
        raise ValueError(
            f"method {cfg.method!r} needs baselines.safety_data (a file of (harmful prompt, refusal) pairs)"
        )
