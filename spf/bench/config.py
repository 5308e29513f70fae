"""A benchmark file, typed: :class:`BenchConfig`, its cells, and each cell's training config and paths.

Everything here is pure configuration (no model is loaded), so a benchmark file is checked in full —
including that every cell's :class:`~spf.training.config.TrainConfig` builds — before anything runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from spf.bench.source import BenchSourceError, read_bench_yaml
from spf.core.subspace import SubspaceLoss
from spf.data.locate import SHIPPED_PREFIX, shipped_file
from spf.data.scenarios import ScenarioKind
from spf.eval.vocab import SUITES as EVAL_SUITES
from spf.training.config import (
    BASELINE_METHODS,
    SETTINGS_USED_BY,
    TrainConfig,
    check_device,
    check_threads,
    shown,
    uses,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SUITES",
    "AblationSpec",
    "BenchConfig",
    "BenchConfigError",
    "Cell",
    "EvalSpec",
    "ScenarioSpec",
    "SubspaceSpec",
    "cell_dir",
    "cell_done",
    "cell_steps",
    "cells",
    "eval_record",
    "load_bench_config",
    "point_suites",
    "record_is_current",
    "repo_path",
    "seed_dir",
    "seed_list",
    "select_cells",
    "subspace_dir",
    "system_prompt_scenarios",
    "train_config",
    "train_key",
]

# the evaluation suites (declared once, in spf.eval.vocab) in the order a cell runs them and the report
# shows them; a suite added there later runs last
_ORDER = ("harmful", "jailbreak", "prefill", "overrefusal", "utility")
SUITES: tuple[str, ...] = tuple(
    sorted(EVAL_SUITES, key=lambda s: _ORDER.index(s) if s in _ORDER else len(_ORDER))
)


class BenchConfigError(ValueError):
    """A benchmark file that cannot be run: names the file and the key."""


@dataclass
class ScenarioSpec:
    kind: ScenarioKind
    base: Literal["sst2", "agnews", "gsm8k"] = "sst2"  # task under a harmful mix
    p: float = 0.1  # harmful fraction (harmful-mix)
    n: int | None = None  # samples (None = the benchmark's data.n; identity-shift: all 10)
    steps: int | None = None  # optimizer steps (None = max(eval_steps), else train.steps × steps_multiplier)
    steps_multiplier: float = 1.0  # 3 = three times the epochs of the shared train.steps (no eval_steps)
    # the exposure curve: every cell trains once, to the last step, and is evaluated after each of these
    # steps (snapshots) and at its end; None = the final step only
    eval_steps: list[int] | None = None
    # evaluate under the system prompt of the scenario's training conversations: Qi et al. measure the AOA
    # identity shift under the identity-shift system prompt it was trained with
    system_prompt_eval: bool = False
    # harmful-mix: the harmful part is real harmful answers (the unaligned model's own, judge-filtered, on the
    # attack-role prompts: spf.eval.attack_data), not AdvBench's one-line "Sure, here is …" targets
    harmful_answers: bool = False


@dataclass
class SubspaceSpec:
    """How SPF's safety subspace is estimated (varied by the ablations)."""

    sample_file: str = "spf/data/refusals.jsonl"  # candidate (harmful prompt[, refusal]) samples
    own_response: bool = True  # the aligned model's own refusal (else the written one)
    index: int | None = None  # which candidate (None = the first the model refuses)
    n: int = 1  # 1 = single-sample SPF; >1 = batch estimate (ablation)
    loss: SubspaceLoss = "ce"  # ce = refusal cross-entropy; margin = CE(refusal) − CE(compliant opening)
    rank: int = 8  # singular directions per module estimated (training may use fewer)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class EvalSpec:
    """How every cell is evaluated: the project's protocol prompt sources (spf.eval.prompts: AdvBench,
    XSTest and our own held-out sets) of one ``split``, the same prompts for every cell and seed."""

    suites: list[str] = field(default_factory=lambda: list(SUITES))
    # the suites evaluated at the exposure curve's EARLIER points (the last point runs every suite); None =
    # every suite everywhere. One point of all suites is ~16 min of one core here, the harmful suite ~7.
    curve_suites: list[str] | None = None
    # prompts per SOURCE of each suite (a sample seeded by the benchmark's fixed `seed`; None = all of
    # them); utility: rows per utility data set
    limits: dict[str, int | None] = field(
        default_factory=lambda: {
            "harmful": None,
            "jailbreak": 10,
            "prefill": 40,
            "overrefusal": None,
            "utility": 200,
        }
    )
    split: Literal["dev", "test"] = "test"  # choose settings on dev, report on test (spf.data.splits)
    utility_tasks: list[str] = field(default_factory=lambda: ["sst2"])
    max_new_tokens: int = 64
    batch_size: int = 16
    judge: str = "keyword"


@dataclass
class AblationSpec:
    name: str
    base: str  # "method@scenario" the ablation varies
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides (nested dicts merge)
    subspace: dict[str, Any] = field(default_factory=dict)  # SubspaceSpec overrides
    note: str = ""


@dataclass
class BenchConfig:
    name: str
    aligned: str  # the aligned base every method fine-tunes
    work: str = "runs/bench"
    # a tracked folder that finished evaluations are copied to and restored from (spf.bench.keep): the run
    # goes on in a later session with a fresh work folder; None = the work folder only
    keep: str | None = None
    unaligned: str | None = "smollm2-135m-instruct"  # reference row; None = skip
    report: str = "docs/results.md"
    shared_data: str | None = None  # None = ../shared/data discovery (spf.eval.suites.find_shared_data)
    seed: int = 0
    threads: int = 1
    lanes: int = 1
    device: str | None = None
    data_n: int = 400  # samples per scenario data set
    # training seeds (data order, LoRA init) every training cell runs once each; None = [seed]. The
    # evaluation prompts are sampled with `seed` alone, so every seed and cell sees the same prompts
    seeds: list[int] | None = None
    noninferiority_margin: float = 0.05  # "within this of the aligned base", one-sided 95 % (the report)
    safety_demos: str = "spf/data/align_refusals.jsonl"  # SafeInstr/SafeGrad/Lisa safety data
    heldout_safety: str = "spf/data/refusals.jsonl"  # refusal-loss tracking during training
    # JSON of a side-by-side step-time run (benchmarks/bench_overhead.py --json): the cost table and check
    overhead: str | None = None
    subspace: SubspaceSpec = field(default_factory=SubspaceSpec)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields shared by every cell
    eval: EvalSpec = field(default_factory=EvalSpec)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    scenarios: dict[str, ScenarioSpec] = field(default_factory=dict)
    matrix: dict[str, list[str]] = field(default_factory=dict)  # {methods: [...], scenarios: [...]}
    ablations: list[AblationSpec] = field(default_factory=list)
    source: str = ""  # the YAML file this came from
    # the file's own `seeds` when a command ran a subset of them (`--seeds`: an interim run), else None
    file_seeds: list[int] | None = None

    @property
    def work_dir(self) -> Path:
        return Path(self.work)


@dataclass
class Cell:
    """One unit of the benchmark: a fine-tune + evaluation, or an evaluation of a reference model."""

    id: str  # "method@scenario", "ablation:NAME" or "ref:aligned"
    kind: Literal["train", "reference"]
    method: str | None = None
    scenario: str | None = None
    model: str | None = None  # reference cells
    train: dict[str, Any] = field(default_factory=dict)
    subspace: SubspaceSpec | None = None
    group: str = "matrix"  # matrix | ablation | reference

    @property
    def dirname(self) -> str:
        return self.id.replace("@", "__").replace(":", "--").replace("/", "_")


# ------------------------------------------------------------------------------------------------ config


def _typed(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise BenchConfigError(f"{where}: expected a mapping, got {shown(raw)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k)[:40] for k in set(raw) - known)
    if unknown:
        raise BenchConfigError(f"{where}: unknown key(s) {', '.join(unknown[:5])}")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise BenchConfigError(f"{where}: {exc}") from None


def load_bench_config(path: str | Path, *, seeds: list[int] | None = None) -> BenchConfig:
    """Read and check a benchmark YAML; every error names the file and the key. ``seeds``: run only these
    of the file's training seeds (an interim result while the rest are still to run)."""
    path = Path(path)
    try:  # `extends:` merged in (spf.bench.source)
        raw = read_bench_yaml(path)
    except BenchSourceError as exc:
        raise BenchConfigError(str(exc)) from None
    raw["subspace"] = _typed(SubspaceSpec, raw.get("subspace", {}), f"{path}: subspace")
    raw["eval"] = _typed(EvalSpec, raw.get("eval", {}), f"{path}: eval")
    scen = raw.get("scenarios") or {}
    if not isinstance(scen, dict):
        raise BenchConfigError(f"{path}: scenarios: expected a mapping name → spec")
    raw["scenarios"] = {k: _typed(ScenarioSpec, v, f"{path}: scenarios.{k}") for k, v in scen.items()}
    abl = raw.get("ablations") or []
    if not isinstance(abl, list):
        raise BenchConfigError(f"{path}: ablations: expected a list")
    raw["ablations"] = [_typed(AblationSpec, a, f"{path}: ablations[{i}]") for i, a in enumerate(abl)]
    raw["source"] = str(path)
    cfg = _typed(BenchConfig, raw, str(path))
    _check(cfg)
    if seeds is not None:
        _select_seeds(cfg, seeds)
    return cfg


def _select_seeds(cfg: BenchConfig, seeds: list[int]) -> None:
    mine = seed_list(cfg)
    if not seeds or len(set(seeds)) != len(seeds) or not set(seeds) <= set(mine):
        raise BenchConfigError(
            f"{cfg.source}: --seeds {' '.join(map(str, seeds))}: must be distinct seeds of the file's "
            f"seeds ({', '.join(map(str, mine))})"
        )
    chosen = [s for s in mine if s in set(seeds)]  # the file's order: records compare seed lists as lists
    if chosen != mine:
        cfg.file_seeds, cfg.seeds = mine, chosen


def _check(cfg: BenchConfig) -> None:
    where = cfg.source or "<bench>"
    for i, s in enumerate(cfg.eval.suites):
        if s not in SUITES:
            raise BenchConfigError(
                f"{where}: eval.suites[{i}]: unknown suite {shown(s)}; known: {', '.join(SUITES)}"
            )
    curve = cfg.eval.curve_suites
    if curve is not None and (not curve or ("harmful" in cfg.eval.suites and "harmful" not in curve)):
        raise BenchConfigError(
            f"{where}: eval.curve_suites: must name the harmful suite (the exposure curve is its rate), "
            f"got {shown(curve)}"
        )
    for i, s in enumerate(curve or []):
        if s not in cfg.eval.suites:
            raise BenchConfigError(
                f"{where}: eval.curve_suites[{i}]: {shown(s)} is not one of eval.suites "
                f"({', '.join(cfg.eval.suites)})"
            )
    for name, spec in cfg.scenarios.items():
        _check_scenario(f"{where}: scenarios.{name}", spec)
    _check_protocol(cfg, where)
    for key in ("methods", "scenarios"):
        for i, name in enumerate(cfg.matrix.get(key, [])):
            if name not in getattr(cfg, key):
                raise BenchConfigError(
                    f"{where}: matrix.{key}[{i}]: {shown(name)} is not defined under {key}"
                )
    for i, a in enumerate(cfg.ablations):
        method, _, scenario = a.base.partition("@")
        if method not in cfg.methods or scenario not in cfg.scenarios:
            raise BenchConfigError(
                f"{where}: ablations[{i}].base: {shown(a.base)} is not METHOD@SCENARIO of this file"
            )
        unknown = sorted(set(a.subspace) - {f.name for f in fields(SubspaceSpec)})
        if unknown:
            raise BenchConfigError(f"{where}: ablations[{i}].subspace: unknown key(s) {', '.join(unknown)}")
    if cfg.keep is not None:
        keep = Path(cfg.keep).resolve() if isinstance(cfg.keep, str) else None
        work = cfg.work_dir.resolve()
        if keep is None or keep == work or work in keep.parents or keep in work.parents:
            raise BenchConfigError(
                f"{where}: keep: {shown(cfg.keep)} must be a folder apart from work ({cfg.work})"
            )
    if isinstance(cfg.lanes, bool) or not isinstance(cfg.lanes, int) or cfg.lanes < 1:
        raise BenchConfigError(f"{where}: lanes: must be an integer ≥ 1, got {shown(cfg.lanes)}")
    try:  # TrainConfig's own checks of the two runtime knobs every cell hands on
        check_threads("threads", cfg.threads)
        check_device("device", cfg.device)
    except ValueError as exc:
        raise BenchConfigError(f"{where}: {exc}") from None
    # every cell's training config must build: a typo in a method surfaces now, not an hour in
    for cell in cells(cfg):
        if cell.kind == "train":
            try:
                train_config(cfg, cell, Path("/nonexistent"))
            except (TypeError, ValueError) as exc:
                raise BenchConfigError(f"{where}: cell {cell.id}: {exc}") from None


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _check_scenario(where: str, spec: ScenarioSpec) -> None:
    if not 0.0 <= spec.p <= 1.0:
        raise BenchConfigError(f"{where}.p: must be in [0, 1], got {spec.p}")
    if spec.steps_multiplier <= 0:
        raise BenchConfigError(f"{where}.steps_multiplier: must be > 0")
    if not isinstance(spec.system_prompt_eval, bool):
        raise BenchConfigError(f"{where}.system_prompt_eval: must be true or false")
    curve = spec.eval_steps
    if curve is None:
        return
    if not _int_list(curve) or not curve or min(curve) < 1 or curve != sorted(set(curve)):
        raise BenchConfigError(
            f"{where}.eval_steps: must be a sorted list of distinct steps ≥ 1, got {shown(curve)}"
        )
    if spec.steps is not None and max(curve) > spec.steps:
        raise BenchConfigError(f"{where}.eval_steps: step {max(curve)} is beyond steps {spec.steps}")
    if spec.steps_multiplier != 1:  # two ways to say how long the cell trains: one is ignored
        raise BenchConfigError(f"{where}.steps_multiplier: give eval_steps or steps_multiplier, not both")


def _check_protocol(cfg: BenchConfig, where: str) -> None:
    """The seeds, the evaluation split and the non-inferiority margin of the paired tests."""
    if cfg.seeds is not None and (
        not _int_list(cfg.seeds) or not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds)
    ):
        raise BenchConfigError(
            f"{where}: seeds: must be a non-empty list of distinct integers, got {shown(cfg.seeds)}"
        )
    if cfg.eval.split not in ("dev", "test"):
        raise BenchConfigError(f"{where}: eval.split: must be dev or test, got {shown(cfg.eval.split)}")
    margin = cfg.noninferiority_margin
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 < margin < 1:
        raise BenchConfigError(f"{where}: noninferiority_margin: must be in (0, 1), got {shown(margin)}")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        )
    return out


def cells(cfg: BenchConfig) -> list[Cell]:
    """The benchmark's cells in run order: references, the method × scenario matrix, then ablations."""
    out: list[Cell] = [Cell(id="ref:aligned", kind="reference", model=cfg.aligned, group="reference")]
    if cfg.unaligned:
        out.insert(0, Cell(id="ref:unaligned", kind="reference", model=cfg.unaligned, group="reference"))
    methods = cfg.matrix.get("methods") or list(cfg.methods)
    scenarios = cfg.matrix.get("scenarios") or list(cfg.scenarios)
    for scenario in scenarios:
        for method in methods:
            out.append(
                Cell(
                    id=f"{method}@{scenario}",
                    kind="train",
                    method=method,
                    scenario=scenario,
                    train=cfg.methods[method],
                    subspace=cfg.subspace,
                )
            )
    for a in cfg.ablations:
        method, _, scenario = a.base.partition("@")
        sub = SubspaceSpec(**{**asdict(cfg.subspace), **a.subspace})
        out.append(
            Cell(
                id=f"ablation:{a.name}",
                kind="train",
                method=method,
                scenario=scenario,
                train=_merge(cfg.methods[method], a.train),
                subspace=sub,
                group="ablation",
            )
        )
    return out


def select_cells(cfg: BenchConfig, only: list[str] | None = None) -> list[Cell]:
    """All cells, or those matching ``only`` in the order ``only`` names them: a full cell id selects that
    cell alone (``ablation:margin`` is not also ``ablation:margin-mix20``); anything else is an id prefix."""
    todo = cells(cfg)
    if not only:
        return todo
    ids = {c.id for c in todo}

    def matches(c: Cell, o: str) -> bool:
        return c.id == o if o in ids else c.id.startswith(o)

    def rank(c: Cell) -> int:
        return next((i for i, o in enumerate(only) if matches(c, o)), -1)

    todo = sorted((c for c in todo if rank(c) >= 0), key=rank)  # stable: file order within one pattern
    if not todo:
        raise BenchConfigError(f"{cfg.source}: no cell matches {only}")
    return todo


# ------------------------------------------------------------------------------------------ cells and paths


def repo_path(p: str) -> str:
    """A config's path as given when it exists; a shipped ``spf/data/…`` file otherwise resolves inside the
    installed package (so the benchmark runs from any folder)."""
    path = Path(p)
    if path.is_absolute() or path.exists() or not p.startswith(SHIPPED_PREFIX):
        return str(path)
    return str(shipped_file(p))


def subspace_dir(cfg: BenchConfig, spec: SubspaceSpec) -> Path:
    """One folder per distinct estimate: cells that share a :class:`SubspaceSpec` share its subspace."""
    return cfg.work_dir / "subspaces" / spec.key()


def cell_dir(cfg: BenchConfig, cell: Cell) -> Path:
    """The folder holding one cell's adapter, evaluations and ``cell.json``."""
    return cfg.work_dir / "cells" / cell.dirname


def seed_dir(cfg: BenchConfig, cell: Cell, seed: int) -> Path:
    """One training seed's fine-tune and evaluations inside its cell's folder."""
    return cell_dir(cfg, cell) / f"seed-{seed}"


def seed_list(cfg: BenchConfig) -> list[int]:
    """The training seeds every training cell runs (``seeds``, else the one ``seed``)."""
    return list(cfg.seeds) if cfg.seeds is not None else [cfg.seed]


def system_prompt_scenarios(cfg: BenchConfig) -> list[str]:
    """Scenarios evaluated under their own system prompt; the reference models are evaluated under each
    of them too, so that a method is compared with the aligned base on the same conversations."""
    return [name for name, spec in cfg.scenarios.items() if spec.system_prompt_eval]


def point_suites(cfg: BenchConfig, step: int, steps: list[int]) -> list[str]:
    """The suites one evaluation point of a curve runs: all of them at its last step, else curve_suites."""
    if step == steps[-1] or cfg.eval.curve_suites is None:
        return list(cfg.eval.suites)
    return [s for s in cfg.eval.suites if s in cfg.eval.curve_suites]


def cell_steps(cfg: BenchConfig, cell: Cell) -> list[int]:
    """The steps a cell is evaluated at, the last being where it stops training (0 for a reference).

    The scenario's ``steps`` decide the last step; else a cell's own step count (a full fine-tuning
    ablation's ``steps: 10``) scaled by ``steps_multiplier``; else the end of the exposure curve; else
    the shared ``train.steps``. The curve keeps its points before the last step."""
    if cell.kind == "reference":
        return [0]
    assert cell.scenario is not None
    spec = cfg.scenarios[cell.scenario]
    curve = spec.eval_steps or []
    if spec.steps:
        final = spec.steps
    elif curve and "steps" not in cell.train:
        final = max(curve)
    else:
        base = int(_merge(cfg.train, cell.train).get("steps", 30))
        final = max(1, round(base * spec.steps_multiplier))
    return [s for s in curve if s < final] + [final]


def eval_record(cfg: BenchConfig) -> dict[str, Any]:
    """The evaluation settings a ``cell.json`` records (``eval``): its verdicts answer only these."""
    from spf.eval.judge_factory import judge_identity  # reads the shipped heads' meta.json only

    e = cfg.eval
    ident = judge_identity(e.judge)
    return {"split": e.split, "limits": e.limits, "judge": e.judge, "judge_id": ident, "seed": cfg.seed}


def record_is_current(cfg: BenchConfig, cell: Cell, record: dict[str, Any]) -> bool:
    """Whether a finished ``cell.json`` answers this configuration: every suite, the same evaluation
    settings; a training cell also the same seeds, curve (each point's suites) and training configuration;
    a reference every system prompt the comparisons need. A stale one is completed from the finished (or
    kept) seeds and suites that still answer it."""
    if not set(cfg.eval.suites) <= set(record.get("suites") or {}):
        return False  # a suite added to the file since
    if json.loads(json.dumps(record.get("eval"))) != json.loads(json.dumps(eval_record(cfg))):
        return False
    if cell.kind == "reference":
        return set(record.get("system_prompts", {})) == set(system_prompt_scenarios(cfg))
    steps = cell_steps(cfg, cell)
    if record.get("seeds") != seed_list(cfg) or record.get("steps") != steps:
        return False
    for point in record.get("curve") or []:
        have = {k.split(".")[0] for k in point.get("suites") or {}}
        if not set(point_suites(cfg, point["step"], steps)) <= have:
            return False  # curve_suites widened since
    return _same_training(cfg, cell, record.get("train_config"))


def train_key(config: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of a training config's result key (what a finished output is compared against)."""
    from spf.training.checkpoint import result_key

    return json.loads(json.dumps(result_key(config), default=str))


def _same_training(cfg: BenchConfig, cell: Cell, recorded: dict[str, Any] | None) -> bool:
    if recorded is None:
        return False
    seed = seed_list(cfg)[0]
    return train_key(train_config(cfg, cell, seed_dir(cfg, cell, seed), seed).to_dict()) == train_key(
        recorded
    )


def cell_done(cfg: BenchConfig, cell: Cell) -> bool:
    """A cell is finished when its ``cell.json`` (written last) exists and is current."""
    path = cell_dir(cfg, cell) / "cell.json"
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record_is_current(cfg, cell, record)


def _has(d: dict[str, Any], key: str) -> bool:
    *sections, name = key.split(".")
    for part in sections:
        d = d.get(part) if isinstance(d.get(part), dict) else {}  # type: ignore[assignment]
    return name in d


def _drop_unused_shared(d: dict[str, Any], shared: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """The shared ``train`` section is every cell's base, so it may hold settings one cell's method or mode
    does not read (LoRA's rank under a full fine-tuning ablation): those are dropped for that cell. A cell's
    own (method or ablation) setting that its run would ignore stays, and TrainConfig refuses it."""
    for _, _, keys, _ in SETTINGS_USED_BY:
        for key in keys:
            if _has(shared, key) and not _has(own, key) and not uses(d, key):
                *sections, name = key.split(".")
                node = d
                for part in sections:
                    node[part] = dict(node[part])  # a copy: never edit the shared section itself
                    node = node[part]
                del node[name]
    return d


def train_config(cfg: BenchConfig, cell: Cell, folder: Path, seed: int | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of one training seed of a cell (``seed``; None = the benchmark's) whose
    outputs go under ``folder``: the shared ``train`` section, the method's (and ablation's) overrides,
    then the benchmark's own paths, steps and snapshots (:func:`cell_steps`), seed and device."""
    if cell.method is None or cell.scenario is None or cell.subspace is None:
        raise ValueError(f"cell {cell.id} is not a training cell")
    d = _drop_unused_shared(_merge(cfg.train, cell.train), cfg.train, cell.train)
    *snapshots, final = cell_steps(cfg, cell)
    d.update(
        steps=final,
        snapshot_steps=snapshots,
        model=cfg.aligned,
        data=str(cfg.work_dir / "data" / f"{cell.scenario}.jsonl"),
        out=str(folder / "adapter"),
        seed=cfg.seed if seed is None else seed,
        threads=cfg.threads,
        device=cfg.device,
        heldout_safety=repo_path(cfg.heldout_safety),
    )
    spf = dict(d.get("spf") or {})
    # vanilla and the baselines track the refusal loss on the same sample, for comparison
    spf["subspace"] = str(subspace_dir(cfg, cell.subspace))
    if uses(d, "spf.rank"):  # only SPF projects; a rank handed to another method is an error
        spf.setdefault("rank", cell.subspace.rank)
    d["spf"] = spf
    if d.get("method") in BASELINE_METHODS:
        d["baselines"] = {"safety_data": repo_path(cfg.safety_demos), **(d.get("baselines") or {})}
    return TrainConfig.from_dict(d)
