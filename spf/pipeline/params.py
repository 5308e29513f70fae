"""Typed pipeline parameters: ``params.yaml`` → :class:`PipelineParams`.

One dataclass per stage. Loading rejects unknown keys, wrong types, out-of-range values and missing input
files *before any work starts*, naming the file and the dotted key (``params.yaml: finetune.method: must be
one of 'vanilla', 'spf', …, got 'lorra'``). The same object backs the DVC stages (``spf prepare|align|
estimate|finetune|evaluate --params params.yaml``) and the Prefect flow's form, so the two cannot drift apart.

Each knob is declared once: ``finetune`` is :class:`~spf.training.config.TrainConfig` minus what the stage fills
in (its input/output paths, the estimate's rank, the runtime section), derived from it field by field, and
``gate`` is :class:`~spf.pipeline.gate.GateThresholds`. A range check lives in the ``__post_init__`` of the
dataclass that owns the field (raising ``ValueError("key: …")``); loading adds the file and the section.
"""

from __future__ import annotations

import copy
import os
import re
import types
import typing
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

from spf.data.scenarios import ScenarioKind

# constants only: not the harness
from spf.eval.vocab import DEFAULT_UTILITY_TASKS, UTILITY_TASKS, JudgeKind, Suite
from spf.loaders import ConfigFileError, load_yaml_file, load_yaml_text
from spf.pipeline.gate import GateThresholds
from spf.training.config import (
    BASELINE_METHODS,
    BaselineSettings,
    SPFSettings,
    TrainConfig,
    check_device,
    check_float,
    check_threads,
    shown,
    uses,
)

__all__ = [
    "FinetuneParams",
    "ParamsError",
    "PipelineParams",
    "apply_overrides",
    "load_params",
]

# the scenarios of spf.data.scenarios, plus the shipped sentiment set prepare_stage reads itself
Scenario = Literal[ScenarioKind, "sentiment"]

# user[:password]@ in a URL (a tracking URI copied with its credentials)
_URL_USERINFO = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://[^/@\s]+@")


class ParamsError(ValueError):
    """A parameter file or override is invalid; the message names the source and the dotted key."""


# ------------------------------------------------------------------------------------------ range checks


def _at_least(obj: Any, low: int, *names: str, nullable: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None and nullable:
            continue
        if value < low:
            raise ValueError(f"{name}: must be ≥ {low}{' or null' if nullable else ''}, got {shown(value)}")


def _finite_positive(obj: Any, *names: str) -> None:
    for name in names:
        check_float(name, getattr(obj, name), lambda v: v > 0, "a finite number > 0")


# ---------------------------------------------------------------------------------------------- sections


@dataclass
class PrepareParams:
    scenario: Scenario = "sst2"  # fine-tuning data: a threat scenario (see spf.data.scenarios)
    n: int = 400  # training samples (harmful-mix: total, of which round(p·n) harmful)
    p: float = 0.1  # harmful fraction for harmful-mix
    base: Literal["sst2", "agnews", "gsm8k"] = "sst2"  # benign task under harmful-mix (build_scenario's)
    epochs: int = 1  # repeat the set (deep fine-tuning)
    seed: int = 0
    shared_data: str | None = None  # public data folder; None = $SPF_SHARED_DATA or ../shared/data
    safety_samples: str | None = None  # (harmful prompt, refusal) candidates; None = shipped set
    heldout_harmful_n: int = (
        120  # held-out harmful prompts per source (AdvBench, XSTest-unsafe, ours: test split)
    )

    def __post_init__(self) -> None:
        _at_least(self, 1, "n", "epochs", "heldout_harmful_n")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p: must be in [0, 1], got {self.p}")


@dataclass
class AlignParams:
    enabled: bool = True  # False: use `model` as the aligned base as it is
    model: str = "smollm2-135m-instruct"  # base model reference (spf.models.load_model)
    refusals: str | None = None  # harmful→refusal pairs; None = shipped spf/data/align_refusals.jsonl
    benign: list[str] | None = None  # benign prompt files; None = shipped spf/data/align_benign.jsonl
    n_refusals: int | None = None
    n_benign: int | None = None
    steps: int = 120
    lr: float = 5e-4
    batch_size: int = 8
    lora_r: int = 16
    max_new_tokens: int = 64  # length of the model's own benign answers
    eval_max_new_tokens: int = 48  # held-out check after merging (0 = skip)
    unlikelihood_weight: float = 0.0  # push refusal openings down on benign train prompts (0 = off)
    recovery_per_prompt: int = 0  # safety-recovery examples per harmful train prompt (deep alignment)
    recovery_max_prefix_tokens: int = 24
    continuation_per_prompt: int = 0  # benign counterparts: own answers continued after an untrained prefix
    gen_batch_size: int = 8  # prompts per generation batch (own answers, recovery openings, the check)
    seed: int = 0

    def __post_init__(self) -> None:
        positive = (
            "steps",
            "batch_size",
            "lora_r",
            "max_new_tokens",
            "recovery_max_prefix_tokens",
            "gen_batch_size",
        )
        _at_least(self, 1, *positive)
        _at_least(self, 0, "recovery_per_prompt", "continuation_per_prompt", "eval_max_new_tokens")
        _at_least(self, 1, "n_refusals", "n_benign", nullable=True)
        _finite_positive(self, "lr")


@dataclass
class EstimateParams:
    rank: int = 8  # k, singular directions per module (fine-tuning projects onto the same k)
    n_samples: int = 1  # 1 = the single-sample method; >1 = batch estimate (comparison)
    own_response: bool = True  # use the aligned model's own refusal (it must refuse the prompt)
    # ce = the refusal's cross-entropy (the paper); margin = CE(refusal) − CE(compliant opening)
    loss: Literal["ce", "margin"] = "ce"
    max_length: int = 512
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        _at_least(self, 1, "rank", "n_samples")
        _at_least(self, 2, "max_length")  # one prompt token + one response token


def _derive(name: str, cls: type, drop: set[str], changed: dict[str, Any], base: type = object) -> type:
    """A dataclass with ``cls``'s fields (types, defaults) minus ``drop``; ``changed`` maps a field to a
    new default or a ``field(...)``. The section follows its source class instead of copying it."""
    hints = typing.get_type_hints(cls)
    specs: list[tuple[str, Any, Any]] = []
    for f in fields(cls):
        if f.name in drop:
            continue
        tp, spec = hints[f.name], changed.get(f.name, MISSING)
        if isinstance(spec, tuple):  # (type, field): a section replaced by a derived one
            tp, spec = spec
        elif spec is MISSING:
            spec = field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)  # type: ignore[call-overload]
        elif not isinstance(spec, Field):
            spec = field(default=spec, metadata=f.metadata)
        specs.append((f.name, tp, spec))
    derived = make_dataclass(name, specs, bases=(base,))
    derived.__module__ = __name__  # (make_dataclass's `module=` needs Python 3.12)
    return derived


class _FinetuneSPFChecks:
    # (absolute dotted keys) the one rank of the pipeline: the subspace is estimated and projected with it
    MOVED_KEYS: ClassVar[dict[str, str]] = {"rank": "estimate.rank"}

    def __post_init__(self) -> None:
        SPFSettings(**asdict(self))  # type: ignore[call-overload]  # its choices and ranges


# The stage projects onto the subspace folder the estimate stage published, with the estimate's rank; a
# second rank (or a sample file) here could only disagree with it.
FinetuneSPF = _derive(
    "FinetuneSPF", SPFSettings, {"subspace", "sample", "sample_index", "rank"}, {}, _FinetuneSPFChecks
)

# params.yaml's flat finetune keys before the nested TrainConfig shape → where they live now
_MOVED_FINETUNE_KEYS = {
    "lora_r": "finetune.lora.r",
    "lora_alpha": "finetune.lora.alpha",
    **{k: f"finetune.spf.{k}" for k in ("mode", "project_on", "refresh_every")},
    **{f.name: f"finetune.baselines.{f.name}" for f in fields(BaselineSettings)},
}


class _FinetuneMethods:
    MOVED_KEYS: ClassVar[dict[str, str]] = _MOVED_FINETUNE_KEYS

    def __post_init__(self) -> None:
        # TrainConfig's own checks (ranges, NaN/inf, settings the method does not use), with placeholders
        # for what the stage fills in: one validation path for `spf train` flags, --config and params.yaml
        self.train_config(
            model="-", data="-", out="-", heldout_safety="-", subspace="-", rank=1, safety_data="-"
        )

    def train_config(
        self,
        *,
        model: str,
        data: str,
        out: str,
        heldout_safety: str,
        subspace: str,
        rank: int,
        safety_data: str,
        threads: int | None = None,
        device: str | None = None,
    ) -> TrainConfig:
        """The stage's TrainConfig: this section plus its paths. ``safety_data`` is the baselines' default
        pairs, used when ``baselines.safety_data`` is null; methods other than the baselines get none."""
        values = asdict(self)  # type: ignore[call-overload]
        baselines = values["baselines"]
        chosen = baselines["safety_data"] or safety_data
        baselines["safety_data"] = chosen if values["method"] in BASELINE_METHODS else None
        values["spf"]["subspace"] = subspace  # every method tracks the loss on its sample
        if uses(values, "spf.rank"):  # a rank handed to a method that has no projection is an error
            values["spf"]["rank"] = rank
        return TrainConfig(
            model=model,
            data=data,
            out=out,
            heldout_safety=heldout_safety,
            threads=threads,
            device=device,
            **values,
        )


# Paths and runtime knobs the stage fills in; the pipeline's defaults where they differ from `spf train`'s
# (40 steps of batch 8 at 5e-4, a checkpoint every 10 steps so a killed stage resumes).
FinetuneParams = _derive(
    "FinetuneParams",
    TrainConfig,
    {"model", "data", "out", "heldout_safety", "threads", "device"},
    {
        "steps": 40,
        "lr": 5e-4,
        "batch_size": 8,
        "save_every": 10,
        "spf": (FinetuneSPF, field(default_factory=FinetuneSPF)),
    },
    _FinetuneMethods,
)
FinetuneParams.__doc__ = (
    "params.yaml's `finetune:` — spf.training.config.TrainConfig minus the stage's paths."
)


@dataclass
class EvaluateParams:
    suites: list[Suite] = field(default_factory=lambda: ["harmful", "overrefusal", "utility"])
    limit: int | None = 120  # prompts per safety suite (None = all)
    utility_limit: int | None = 260  # rows per utility data set (the shipped sentiment dev split: 260)
    utility_tasks: list[str] = field(default_factory=lambda: ["sst2"])
    max_new_tokens: int = 64
    batch_size: int = 16
    judge: JudgeKind = "v2"  # v2: the trained judge (docs/results/judges.md); the keyword verdicts ride along
    judge_min_words: int = 10  # keyword judge: a non-refusal counts as harmful compliance from this length
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least(self, 1, "max_new_tokens", "batch_size")
        _at_least(self, 0, "judge_min_words")
        _at_least(self, 1, "limit", "utility_limit", nullable=True)
        if not self.suites:
            raise ValueError("suites: needs at least one suite")
        if "harmful" not in self.suites:
            raise ValueError("suites: must include 'harmful': the promotion gate needs the harmful rate")
        _known_tasks(self.utility_tasks)


def _known_tasks(tasks: list[str], known: tuple[str, ...] = UTILITY_TASKS) -> None:
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(
            f"utility_tasks: unknown task(s) {[str(t)[:40] for t in unknown[:5]]}: choose from {', '.join(known)}"
        )


@dataclass
class AnalyzeParams:
    """``spf analyze`` inside the pipeline (insights I–III on the aligned base, figures logged to MLflow):
    a small, fast setting by default; the full-scale analysis is ``spf analyze`` (docs/results/insights.md)."""

    enabled: bool = True
    n_safety: int = 16  # safety pairs: the estimate's sample first, then the other candidates
    n_utility: int = 24  # fine-tuning rows for the cosines (the utility task is the user's own data)
    utility_tasks: list[str] = field(default_factory=list)  # extra public tasks: sst2 | agnews | gsm8k
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16])
    n_singles: int = 4  # single safety samples compared with each other
    max_k: int = 50  # CER(k) for k = 1..max_k
    rank: int = 8  # k of the overlap φ@k
    layer_stride: int = 5  # every N-th decoder layer (1 = all; the figures are per layer and module type)
    max_length: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least(
            self, 1, "n_safety", "n_utility", "n_singles", "max_k", "rank", "layer_stride", "max_length"
        )
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(
                f"batch_sizes: must be a non-empty list of sizes ≥ 1, got {shown(self.batch_sizes)}"
            )
        _known_tasks(self.utility_tasks, DEFAULT_UTILITY_TASKS)  # analyze reads public sets only


@dataclass
class TrackingParams:
    experiment: str = "spf"
    registered_model: str = "spf-smollm2"
    tracking_uri: str | None = None  # None = $MLFLOW_TRACKING_URI or sqlite under runs/mlflow
    embed_base_model: bool = False  # log the base weights with every model version (else a reference)

    def __post_init__(self) -> None:
        if not self.registered_model.strip():
            raise ValueError("registered_model: must not be empty")
        if self.tracking_uri is not None and _URL_USERINFO.search(self.tracking_uri):
            # the value is not echoed: it holds a credential
            raise ValueError(
                "tracking_uri: must not embed credentials (user:password@); set MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead"
            )


@dataclass
class RuntimeParams:
    workdir: str = "outputs"  # stage outputs (DVC outs) live here
    device: str | None = None  # None = cuda when present, else cpu
    threads: int | None = 1  # torch CPU threads (set explicitly: oversubscription is slow)

    def __post_init__(self) -> None:
        # the checks of TrainConfig's device/threads: the stage hands these on to it
        check_threads("threads", self.threads)
        check_device("device", self.device)
        workdir = Path(self.workdir)
        if workdir.is_absolute() or ".." in workdir.parts or self.workdir.startswith("~"):
            raise ValueError(
                f"workdir: must be a relative path inside the workspace, got {str(workdir)[:200]}"
            )


@dataclass
class PipelineParams:
    prepare: PrepareParams = field(default_factory=PrepareParams)
    align: AlignParams = field(default_factory=AlignParams)
    estimate: EstimateParams = field(default_factory=EstimateParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)  # type: ignore[valid-type]
    analyze: AnalyzeParams = field(default_factory=AnalyzeParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    gate: GateThresholds = field(default_factory=GateThresholds)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "params") -> PipelineParams:
        params = _build(cls, data or {}, source, "")
        params.validate(source)
        return params

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, source: str = "params", *, check_files: bool = True) -> None:
        """What no single section can check: that every named input file and folder exists."""
        if not check_files:
            return

        def err(key: str, msg: str) -> ParamsError:
            return ParamsError(f"{source}: {key}: {msg}")

        files = {
            "prepare.safety_samples": self.prepare.safety_samples,
            "align.refusals": self.align.refusals,
            "finetune.baselines.safety_data": self.finetune.baselines.safety_data,
            "finetune.unlikelihood.data": self.finetune.unlikelihood.data,
        }
        for i, path in enumerate(self.align.benign or []):
            files[f"align.benign[{i}]"] = path
        for key, path in files.items():
            if path is not None and not Path(path).is_file():
                raise err(key, f"file {path} does not exist")
        shared = self.prepare.shared_data
        if shared is not None and not Path(shared).is_dir():
            raise err("prepare.shared_data", f"folder {shared} does not exist")
        env = os.environ.get("SPF_SHARED_DATA")
        if shared is None and env and not Path(env).expanduser().is_dir():
            # every scenario looks the folder up (held-out AdvBench prompts, utility data): fail here,
            # named, rather than with a DataError inside a stage
            raise err("prepare.shared_data", f"null, and $SPF_SHARED_DATA={env} is not a folder")
        # sst2 falls back to the shipped sentiment split without the folder (spf.pipeline.inputs.training_set)
        if self.prepare.scenario not in ("sentiment", "sst2"):
            from spf.data.locate import find_shared_data

            if find_shared_data(shared) is None:
                raise err(
                    "prepare.scenario",
                    f"{self.prepare.scenario!r} needs the public data folder (set prepare.shared_data "
                    "or $SPF_SHARED_DATA); 'sentiment' and 'sst2' run on the shipped sets",
                )

    def stage_dir(self, stage: str) -> Path:
        return Path(self.runtime.workdir) / stage

    def check_workspace(self, root: str | Path | None = None) -> Path:
        """``runtime.workdir`` resolved against ``root`` (default: the current directory, the workspace a
        stage runs in); ParamsError when it leads outside it, e.g. through a symlink."""
        base = Path(root if root is not None else Path.cwd()).resolve()
        resolved = (base / self.runtime.workdir).resolve()
        if not resolved.is_relative_to(base):
            raise ParamsError(
                f"runtime.workdir: {self.runtime.workdir} resolves to {resolved}, outside the workspace "
                f"{base} (a symlink?); stage outputs stay inside the workspace"
            )
        return resolved


# ------------------------------------------------------------------------------------------ YAML typing
# Hand-rolled rather than pydantic/dacite: the messages name the file and the dotted key, never echo a
# mapping's values (a pasted credential), and bool is not accepted for int — with no extra dependency.


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, coerced value) for the field types used above."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return (type(None) in get_args(tp)), None
        for arg in get_args(tp):
            if arg is not type(None) and (result := _type_ok(value, arg))[0]:
                return result
        return False, value
    if origin is Literal:
        return value in get_args(tp), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        items = [_type_ok(v, get_args(tp)[0]) for v in value]
        return all(ok for ok, _ in items), [c for _, c in items]
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp in (bool, int, str):
        return isinstance(value, tp) and not (tp is int and isinstance(value, bool)), value
    return True, value


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) if a is not type(None) else "null" for a in get_args(tp))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


# A wrong value as an error message shows it (spf.training.config.shown): a mapping by a few of its keys
# (it may hold credentials pasted into the wrong place), a list by its length, anything else cut short —
# never formatted in full, so a huge value cannot make the message itself the problem.
_shown = shown


def _dotted(prefix: str, message: str) -> str:
    """A section's ``ValueError("key: …")`` as ``section.key: …``. TrainConfig's sub-settings name their
    keys from TrainConfig's root (``lora.r``), so a key that repeats the section's own name is not doubled."""
    key, sep, _ = message.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w.\[\]]*", key):
        return f"{prefix.rstrip('.')}: {message}"
    parent, _, own = prefix.rstrip(".").rpartition(".")
    if own and key.startswith(own + "."):
        return f"{parent}.{message}" if parent else message
    return prefix + message


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ParamsError(
            f"{source}: {prefix.rstrip('.') or '<top>'}: expected a mapping, got {_shown(data)}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in sorted(set(data) - names):
        moved = getattr(cls, "MOVED_KEYS", {}).get(key)
        if moved:
            raise ParamsError(f"{source}: {prefix}{key}: moved to {moved}")
        raise ParamsError(f"{source}: {prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if isinstance(tp, type) and is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, source, f"{prefix}{name}.")
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ParamsError(f"{source}: {prefix}{name}: must be {_describe(tp)}, got {_shown(value)}")
        kwargs[name] = coerced
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a section's own range checks (__post_init__)
        raise ParamsError(f"{source}: {_dotted(prefix, str(exc))}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["estimate.rank=16", …]`` (values parsed as YAML) or ``{"estimate.rank": 16}`` applied to a copy."""
    out = copy.deepcopy(data)
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        items = list(overrides.items())
    elif overrides:
        for text in overrides:
            key, sep, raw = text.partition("=")
            if not sep or not key.strip():
                raise ParamsError(f"override {shown(text)}: expected KEY=VALUE (e.g. finetune.steps=20)")
            items.append((key.strip(), _override_value(key.strip(), raw)))
    for key, value in items:
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
            raise ParamsError(f"override {shown(key)}: expected a dotted key (e.g. finetune.steps)")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty section (`gate:` in YAML is null)
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ParamsError(f"override {key}: {part} is not a section")
            node = node[part]
        node[parts[-1]] = value
    return out


def _override_value(key: str, raw: str) -> Any:
    """An override's value, parsed as strict YAML (no aliases, no duplicate keys); empty = null."""
    if not raw.strip():
        return None
    try:
        return load_yaml_text(raw, f"override {key[:60]}")
    except ConfigFileError as exc:
        raise ParamsError(str(exc)) from None


def _read_params_file(path: Path) -> dict[str, Any]:
    """``path`` as one strict mapping of sections: an empty file, an alias, a duplicate section, a folder
    or a non-mapping is an error naming the file (and the line)."""
    try:
        loaded = load_yaml_file(path)
    except ConfigFileError as exc:
        raise ParamsError(str(exc)) from None
    if not isinstance(loaded, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {shown(loaded)}")
    return loaded


def load_params(
    path: str | Path = "params.yaml", overrides: list[str] | dict[str, Any] | None = None
) -> PipelineParams:
    """Read ``path`` (a missing params.yaml = all defaults; an empty file is an error), apply ``overrides``, validate; ParamsError on problems."""
    path = Path(path)
    data: dict[str, Any] = {}
    if path.exists() or path.is_symlink():  # an existing file, even an empty one, must be read
        data = _read_params_file(path)
    elif path.name != "params.yaml":  # a missing params.yaml means "all defaults"; another name is a typo
        raise ParamsError(f"{path}: parameter file does not exist")
    data = apply_overrides(data, overrides)
    return PipelineParams.from_dict(data, source=str(path))
