"""Typed configs. Each field's ``metadata["help"]`` is its help (the `spf train` flags are generated from the
fields); ``__post_init__`` rejects bad values before any work."""

from __future__ import annotations

import functools
import itertools
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal, get_args, get_origin

from spf.core.modes import (
    ConflictScope,
    Directions,
    EstimateRoute,
    ProjectedChange,
    ProjectMode,
    ProjectOn,
    Removal,
)

# Method and BASELINE_METHODS stay here, beside the config, not in spf.training.methods: config must import
# without torch so that `spf --help` stays fast. spf.training.methods.METHODS maps each name to its class.
Method = Literal["vanilla", "spf", "safeinstr", "safegrad", "lisa", "ema"]
# the defenses of spf.training.baselines
BASELINE_METHODS: tuple[str, ...] = ("safeinstr", "safegrad", "lisa")
Finetune = Literal["lora", "full"]
FullParams = Literal["projected", "all"]
SafeGradScope = Literal["global", "module"]
SafeGradLoss = Literal["ce", "kl"]  # the refusals' cross-entropy, or SafeGrad's KL to the aligned model


def shown(value: Any) -> str:
    """A wrong value as an error message shows it, never long: a mapping by (at most 8 of) its keys (it may
    hold a credential pasted in the wrong place), a list by its length, a string or number cut at 60
    characters. Formatting is bounded too: no repr of a whole container or a many-thousand-digit int."""
    if isinstance(value, dict):
        keys = sorted(str(k)[:30] for k in list(value)[:8])
        return f"a mapping with keys {keys}{' and more' if len(value) > 8 else ''}"
    if isinstance(value, list | tuple | set):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        text = repr(value[:61])
        return text if len(value) <= 60 else text[:-1] + "..." + text[-1]
    text = repr(value) if isinstance(value, int | float | bool | None) else f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _check_choice(name: str, value: Any, kind: Any) -> None:
    allowed = get_args(kind)
    if not isinstance(value, str | int | bool | None) or value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(map(repr, allowed))}, got {shown(value)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_float(
    key: str, value: Any, ok: Callable[[float], bool], what: str, *, nullable: bool = False
) -> None:
    """``value`` is a finite number for which ``ok`` holds (NaN and ±inf never: a NaN passes every ``<``
    test and an infinite learning rate only fails at the first step, naming nothing)."""
    if value is None and nullable:
        return
    try:
        good = _is_number(value) and math.isfinite(value) and ok(value)
    except OverflowError:  # an int too large for a float
        good = False
    if not good:
        null = " or null" if nullable else ""
        raise ValueError(f"{key}: must be {what}{null}, got {shown(value)}")


def check_int(key: str, value: Any, low: int, *, nullable: bool = False, noun: str = "") -> None:
    """``value`` is an integer (not a bool) ≥ ``low`` (or None when ``nullable``)."""
    if value is None and nullable:
        return
    null = " or null" if nullable else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: must be an integer ≥ {low}{null}, got {shown(value)}")
    if value < low:
        raise ValueError(f"{key}: must be {noun}≥ {low}{null}, got {shown(value)}")


_DEVICE = re.compile(r"cpu|mps|cuda(:\d{1,3})?")


def check_device(key: str, value: Any) -> None:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or None — and the accelerator named must be present. torch is
    imported only to ask that (an accelerator was named), so the config stays importable without it."""
    if value is None:
        return
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise ValueError(f"{key}: must be cpu, cuda, cuda:N or mps (or null for auto), got {shown(value)}")
    if value == "cpu":
        return
    import torch

    if value == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{key}: 'mps' requested but no MPS device is available; use cpu")
        return
    if not torch.cuda.is_available():
        raise ValueError(f"{key}: {value!r} requested but no CUDA device is available; use cpu or null")
    index = int(value.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"{key}: {value!r} requested but only {torch.cuda.device_count()} CUDA device(s)")


def check_threads(key: str, value: Any) -> None:
    check_int(key, value, 1, nullable=True)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in get_args(tp))
    if tp is type(None):
        return value is None
    if origin is Literal:
        return True  # the choice checks name the allowed values
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, get_args(tp)[0]) for v in value)
    if tp is float:
        return _is_number(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (bool, str):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _check_types(obj: Any, section: str = "") -> None:
    """Each field holds its declared type: a --config file (or a caller) can hand any JSON value, and a
    string where a number belongs would otherwise fail later as a TypeError naming no key."""
    for name, tp in _hints(type(obj)).items():
        value = getattr(obj, name)
        if not is_dataclass(tp) and not _type_ok(value, tp):
            raise ValueError(f"{section}{name}: must be {_describe(tp)}, got {shown(value)}")


@dataclass
class LoraSettings:
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling s = alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout, in [0, 1)"})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "modules to adapt; None = every linear layer of the decoder blocks"}
    )

    def __post_init__(self) -> None:
        check_int("lora.r", self.r, 1)
        check_float("lora.alpha", self.alpha, lambda v: v > 0, "a finite number > 0")
        check_float("lora.dropout", self.dropout, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        _check_types(self, "lora.")  # after the range checks: they name the range


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
    estimate: EstimateRoute = field(
        default="separate",
        metadata={"help": "re-estimate in a pass of its own, or fused: the sample rides in the step's batch"},
    )
    diagnostics: bool = field(default=True, metadata={"help": "record the per-step spf/* diagnostics"})
    change: ProjectedChange = field(
        default="step",
        metadata={"help": "step: keep each step's change off the subspace; total: the whole change since "
                  "training began, re-projected against every new subspace"},
    )  # fmt: skip
    # the mechanism controls (issue 17): each changes one thing about SPF and is not a defense to ship
    removal: Removal = field(
        default="project",
        metadata={"help": "project: remove the safety component; shrink (control): keep the step's "
                  "direction at the length removal would leave"},
    )  # fmt: skip
    directions: Directions = field(
        default="estimated",
        metadata={"help": "estimated: the safety gradient's subspace; random (control): random orthonormal "
                  "directions of the same ranks, redrawn at every re-estimation"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_int("spf.rank", self.rank, 1)
        check_int("spf.refresh_every", self.refresh_every, 0)
        check_int("spf.sample_index", self.sample_index, 0, nullable=True)
        _check_choice("spf.mode", self.mode, ProjectMode)
        _check_choice("spf.project_on", self.project_on, ProjectOn)
        _check_choice("spf.conflict_scope", self.conflict_scope, ConflictScope)
        _check_choice("spf.estimate", self.estimate, EstimateRoute)
        _check_choice("spf.removal", self.removal, Removal)
        _check_choice("spf.directions", self.directions, Directions)
        _check_choice("spf.change", self.change, ProjectedChange)
        if self.change == "total" and (self.project_on != "update" or self.removal != "project"):
            raise ValueError("spf.change: total needs spf.project_on: update and spf.removal: project")
        if self.removal == "shrink" and self.project_on != "update":
            raise ValueError("spf.removal: shrink (the norm-matched control) needs spf.project_on: update")
        _check_types(self, "spf.")  # after the range checks: they name the range


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
        check_float("unlikelihood.weight", self.weight, lambda v: v >= 0, "a finite number ≥ 0")
        check_int("unlikelihood.batch_size", self.batch_size, 1)
        if not self.prefixes or not all(isinstance(x, str) and x.strip() for x in self.prefixes):
            raise ValueError("unlikelihood.prefixes: must be a non-empty list of non-empty strings")
        _check_types(self, "unlikelihood.")  # after the range checks: they name the range


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
    safegrad_loss: SafeGradLoss = field(
        default="ce",
        metadata={
            "help": "safegrad: safety loss — refusal cross-entropy (ce) or KL to the aligned model (kl)"
        },
    )
    safegrad_project_on: ProjectOn = field(
        default="grad",
        metadata={"help": "safegrad: project the gradient (PCGrad) or the optimizer's update (Adam-correct)"},
    )
    ema_decay: float = field(
        default=0.99,
        metadata={"help": "ema: the output is the moving average θ̄ ← d·θ̄ + (1 − d)·θ over steps (d = decay)"},
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
        check_float(
            "baselines.safeinstr_fraction", self.safeinstr_fraction, lambda v: 0 < v <= 1, "in (0, 1]"
        )
        for name in ("safegrad_batch", "safegrad_every", "lisa_align_steps", "lisa_task_steps"):
            check_int(f"baselines.{name}", getattr(self, name), 1, noun="an integer ")
        _check_choice("baselines.safegrad_scope", self.safegrad_scope, SafeGradScope)
        _check_choice("baselines.safegrad_loss", self.safegrad_loss, SafeGradLoss)
        _check_choice("baselines.safegrad_project_on", self.safegrad_project_on, ProjectOn)
        check_float("baselines.lisa_rho", self.lisa_rho, lambda v: v >= 0, "a finite number ≥ 0")
        check_float("baselines.ema_decay", self.ema_decay, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        _check_types(self, "baselines.")  # after the range checks: they name the range


@dataclass
class TrainConfig:
    model: str = field(metadata={"help": "packaged name, local folder or hub id"})
    data: str = field(metadata={"help": "chat samples (JSON/JSONL/CSV/TSV) with responses"})
    out: str = field(metadata={"help": "output folder"})
    method: Method = field(
        default="spf",
        metadata={"help": "vanilla, spf, a baseline defense, or ema (vanilla, weights averaged)"},
    )
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
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept (0 = all)"})
    snapshot_steps: list[int] = field(
        default_factory=list,
        metadata={
            "help": "also write the fine-tune as it is after each of these optimizer steps to "
            "out/snapshots/step-N/ (each in 1..steps-1, sorted; an exposure curve from one run)"
        },
    )
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
        for name, cls in _SECTIONS.items():
            setattr(self, name, _section(name, cls, getattr(self, name)))
        _check_train_config(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k)[:40] for k in set(d) - known)
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise ValueError(f"unknown training option(s): {', '.join(unknown[:5])}{more}")
        return cls(**d)


_SECTIONS: dict[str, type] = {
    "lora": LoraSettings,
    "spf": SPFSettings,
    "unlikelihood": UnlikelihoodSettings,
    "baselines": BaselineSettings,
}


def _section(name: str, cls: type, value: Any) -> Any:
    """A section given as a mapping (a --config file, a caller's dict) → its dataclass, naming the key of an
    unknown or missing entry instead of a TypeError about ``__init__``."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name}: must be a mapping of {cls.__name__} fields, got {shown(value)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in set(value) - known)
    if unknown:
        raise ValueError(f"{name}.{unknown[0][:40]}: unknown key (known: {', '.join(sorted(known))})")
    return cls(**value)


# ------------------------------------------------------------------------------- which settings are used
# A setting the chosen method or fine-tuning mode does not read is an error when it is set to anything but
# its default: `--lora-r 4 --finetune full` or a lisa knob under `method: spf` would otherwise run, silently,
# something other than what was asked. One table, read by every way a TrainConfig is built (flags, --config,
# params.yaml, bench files): (selector key, the selector values that read the keys, the keys, why).
# A selector value of SET means "when the selector is set (not None)".
SET = "<set>"
SETTINGS_USED_BY: tuple[tuple[str, tuple[str, ...], tuple[str, ...], str], ...] = (
    ("finetune", ("lora",), ("lora.r", "lora.alpha", "lora.dropout", "lora.target_modules"),
     "LoRA settings apply to finetune=lora"),
    ("finetune", ("full",), ("full_params",), "full_params applies to finetune=full"),
    ("method", ("spf",),
     ("spf.sample", "spf.sample_index", "spf.rank", "spf.mode", "spf.project_on", "spf.conflict_scope",
      "spf.refresh_every", "spf.estimate", "spf.diagnostics", "spf.removal", "spf.directions",
      "spf.change"),
     "SPF settings apply to method=spf; other methods only track the refusal loss on the sample of spf.subspace"),
    ("method", BASELINE_METHODS, ("baselines.safety_data",),
     f"the safety pairs are read by {', '.join(BASELINE_METHODS)}"),
    ("method", ("safeinstr",), ("baselines.safeinstr_fraction",), "safeinstr_* applies to method=safeinstr"),
    ("method", ("safegrad",), ("baselines.safegrad_batch", "baselines.safegrad_every",
     "baselines.safegrad_scope", "baselines.safegrad_loss", "baselines.safegrad_project_on"),
     "safegrad_* applies to method=safegrad"),
    ("method", ("ema",), ("baselines.ema_decay",), "ema_decay applies to method=ema"),
    ("method", ("lisa",), ("baselines.lisa_align_steps", "baselines.lisa_task_steps", "baselines.lisa_rho"),
     "lisa_* applies to method=lisa"),
    ("spf.sample", (SET,), ("spf.sample_index",), "sample_index picks a record of spf.sample"),
    ("unlikelihood.data", (SET,), ("unlikelihood.prefixes", "unlikelihood.weight", "unlikelihood.batch_size"),
     "the prefix penalty is on only with unlikelihood.data"),
)  # fmt: skip
# settings that name alternatives: at most one of each group may be set
EXCLUSIVE: tuple[tuple[str, ...], ...] = (("spf.subspace", "spf.sample"),)


def _get(cfg: Any, key: str) -> Any:
    """``cfg``'s value of dotted ``key``; ``cfg`` is a TrainConfig or its nested-dict form (absent = default)."""
    for i, part in enumerate(parts := key.split(".")):
        if isinstance(cfg, dict):
            if part not in cfg:
                return default_of(".".join(parts[: i + 1]))
            cfg = cfg[part]
        else:
            cfg = getattr(cfg, part)
    return cfg


def _selected(chosen: Any, users: tuple[str, ...]) -> bool:
    return chosen in users or (SET in users and chosen is not None)


def default_of(key: str) -> Any:
    """The default of a dotted TrainConfig key (``lora.r`` → 8)."""
    cls: type = TrainConfig
    *sections, name = key.split(".")
    for part in sections:
        cls = _hints(cls)[part]
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not MISSING else f.default


def uses(cfg: Any, key: str) -> bool:
    """Whether a run with ``cfg`` (a TrainConfig or its nested-dict form) reads setting ``key``: callers that
    fill settings in (the pipeline stage, a bench cell) fill only those the method reads."""
    return all(_selected(_get(cfg, sel), users) for sel, users, keys, _ in SETTINGS_USED_BY if key in keys)


def _check_used(cfg: TrainConfig) -> None:
    for group in EXCLUSIVE:
        given = [k for k in group if _get(cfg, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{given[-1]}: give one of {' or '.join(group)}, not both")
    for selector, users, keys, why in SETTINGS_USED_BY:
        chosen = _get(cfg, selector)
        if _selected(chosen, users):
            continue
        for key in keys:
            value = _get(cfg, key)
            if value != default_of(key):
                state = (
                    f"{selector} is not set"
                    if chosen is None
                    else f"{selector}={shown(chosen).strip(chr(39))}"
                )
                raise ValueError(f"{key}: set to {shown(value)}, but ignored as {state} ({why})")


def check_snapshot_steps(value: Any, steps: int) -> None:
    """``snapshot_steps``: sorted, distinct steps strictly inside the run — step ``steps`` is the final
    output itself, and a repeated or unsorted list is almost surely a typo in an exposure curve."""
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ValueError(f"snapshot_steps: must be a list of integers, got {shown(value)}")
    outside = [v for v in value if not 1 <= v < steps]
    if outside:
        raise ValueError(
            f"snapshot_steps: each step must be in 1..{steps - 1} (steps={steps}: the last step is the "
            f"final output), got {shown(outside[0])}"
        )
    for a, b in itertools.pairwise(value):
        if b <= a:
            raise ValueError(f"snapshot_steps: must be sorted without repeats, got {a} before {b}")


def _check_train_config(cfg: TrainConfig) -> None:
    """TrainConfig's own choices, ranges and the settings each method needs (before any work)."""
    _check_choice("method", cfg.method, Method)
    _check_choice("finetune", cfg.finetune, Finetune)
    _check_choice("full_params", cfg.full_params, FullParams)
    for name in ("steps", "batch_size", "grad_accum", "heldout_n"):
        check_int(name, getattr(cfg, name), 1)
    check_int("max_length", cfg.max_length, 2)  # one prompt token + one supervised response token
    for name in ("save_every", "warmup_steps", "eval_every", "task_eval_n", "keep_checkpoints"):
        check_int(name, getattr(cfg, name), 0)
    check_int("limit_data", cfg.limit_data, 1, nullable=True)
    check_snapshot_steps(cfg.snapshot_steps, cfg.steps)
    check_float("lr", cfg.lr, lambda v: v > 0, "a finite number > 0")
    check_float("weight_decay", cfg.weight_decay, lambda v: v >= 0, "a finite number ≥ 0")
    check_float("max_grad_norm", cfg.max_grad_norm, lambda v: v > 0, "a finite number > 0", nullable=True)
    check_float(
        "abort_safety_rise", cfg.abort_safety_rise, lambda v: v > 0, "a finite number > 0", nullable=True
    )
    check_threads("threads", cfg.threads)
    check_device("device", cfg.device)
    _check_types(cfg)  # the fields without a range (strings, flags, seed), after those with one
    _check_used(cfg)
    bound = cfg.abort_safety_rise
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
