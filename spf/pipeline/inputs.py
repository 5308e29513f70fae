"""Which data a pipeline run uses, and the record of it.

Resolution order for every input: the public data folder (``prepare.shared_data`` / ``$SPF_SHARED_DATA`` /
``<repo>/../shared/data``) → the default this project ships in ``spf/data`` (data we wrote ourselves). A fresh
clone without the public folder therefore runs the default ``params.yaml`` end to end, and every run records
what it used — role, source, file, rows, sha256 — in ``data/manifest.json`` (which the MLflow run and the gate
artifact carry on).

The held-out harmful prompts must never have been seen by a training, alignment or estimation step: they are
filtered against the training set, the safety-estimation candidates, the alignment refusals and the
baselines' safety pairs (normalised text, so case and punctuation do not hide a repeat).
"""

from __future__ import annotations

import csv
import logging
import random
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from spf.data.locate import shipped_file
from spf.data.samples import ChatSample, load_samples
from spf.io import path_sha256

if TYPE_CHECKING:
    from spf.pipeline.params import PipelineParams

logger = logging.getLogger(__name__)

__all__ = [
    "DataInput",
    "heldout_harmful",
    "manifest",
    "manifest_inputs",
    "normalise_prompt",
    "resolve_overrefusal",
    "resolve_utility_dev",
    "seen_prompts",
    "source_name",
    "training_set",
]

Role = Literal["train", "heldout_harmful", "safety", "utility_dev", "overrefusal"]
Source = Literal["shipped", "shared", "user"]

# the shipped defaults (spf/data/README.md says how each was written)
SHIPPED_TRAIN = "sentiment_train.jsonl"
SHIPPED_UTILITY_DEV = "sentiment_dev.jsonl"
SHIPPED_OVERREFUSAL = "overrefusal_prompts.jsonl"
SHARED_SST2_DEV = "utility/sst2_dev.tsv"


@dataclass(frozen=True)
class DataInput:
    """One entry of the run's data manifest."""

    role: Role
    source: Source
    path: str  # machine-independent: spf/data/…, shared/…, or the path as the user gave it
    rows: int
    sha256: str  # of the file as read (train: of the written train.jsonl the run trains on)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def source_name(path: Path, shared: Path | None) -> tuple[Source, str]:
    """``(source, name)`` for an input file: ``spf/data/…`` (shipped) or ``shared/…`` (the public folder), else
    the path as given. An absolute path in an output would make its hash — the DVC and Prefect cache key —
    depend on where the checkout lives."""
    roots: list[tuple[Path, Source, str]] = [(Path(str(resources.files("spf"))), "shipped", "spf")]
    if shared is not None:
        roots.append((shared, "shared", "shared"))
    for root, source, label in roots:
        try:
            return source, f"{label}/{path.resolve().relative_to(root.resolve()).as_posix()}"
        except ValueError:
            continue
    return "user", str(path)


def describe(role: Role, path: Path, rows: int, shared: Path | None) -> DataInput:
    source, name = source_name(path, shared)
    return DataInput(role, source, name, rows, path_sha256(path))


_NON_WORD = re.compile(r"[\W_]+")


def normalise_prompt(text: str) -> str:
    """Lower case, punctuation and spacing removed: the key two prompts are 'the same row' under."""
    return _NON_WORD.sub(" ", text.lower()).strip()


# ---------------------------------------------------------------------------------------------- training


def training_set(
    scenario: str, shared: Path | None, *, n: int, p: float, seed: int, base: str
) -> tuple[list[ChatSample], Path | None]:
    """The fine-tuning samples and the file they came from (None = built from several public files).

    ``sst2`` without the public folder, and ``sentiment``, use the shipped sentiment training split: n rows
    drawn without repetition while they last (then cycled), so a default run never trains on a dev row.
    """
    if scenario == "sentiment" or (scenario == "sst2" and shared is None):
        if scenario == "sst2":
            logger.warning(
                "public data folder not found: training on the shipped sentiment split (%s, written by the "
                "project) instead of SST-2 — set prepare.shared_data or $SPF_SHARED_DATA for the public sets",
                SHIPPED_TRAIN,
            )
        path = shipped_file(SHIPPED_TRAIN)
        pool = load_samples(path, require_response=True)
        order = random.Random(seed).sample(range(len(pool)), len(pool))
        return [pool[order[i % len(order)]] for i in range(n)], path
    from spf.data.scenarios import build_scenario

    if shared is None:  # PipelineParams.validate names this case before any stage runs
        raise FileNotFoundError(f"scenario {scenario!r} needs the public data folder")
    return build_scenario(scenario, shared_data=shared, n=n, p=p, seed=seed, base=base), None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- held out


def heldout_harmful(
    shared: Path | None, *, n: int, seed: int, seen: dict[str, list[str]]
) -> tuple[list[tuple[str, str]], Path, dict[str, int]]:
    """Held-out harmful prompts as ``(prompt, source)``: up to ``n`` per source of the protocol's test split
    (AdvBench test rows and XSTest's unsafe test prompts from the public folder, our held-out test split;
    :func:`spf.eval.prompts.harmful_sources`, the rule ``spf eval`` follows), so the gate can decide on the
    worst source.

    ``seen`` maps a name (train, safety candidates, alignment refusals, …) to the prompts some step trained,
    aligned or estimated on; every prompt equal to one of them (after :func:`normalise_prompt`) is removed,
    and the count removed per name is returned, so the manifest shows the filter worked. The returned path
    is the primary source file (AdvBench when present, else the shipped set).
    """
    from spf.eval.prompts import HARMFUL_FALLBACK, harmful_sources  # the eval's own rule

    found = harmful_sources(shared, "test")
    keep = [(item.text, item.source or "ours") for item in found.items]
    removed: dict[str, int] = {}
    for name, texts in seen.items():
        block = {normalise_prompt(t) for t in texts}
        kept = [q for q in keep if normalise_prompt(q[0]) not in block]
        removed[name] = len(keep) - len(kept)
        keep = kept
    chosen: list[tuple[str, str]] = []
    for source in dict.fromkeys(src for _, src in keep):
        rows = [q for q in keep if q[1] == source]
        random.Random(f"{seed}/{source}").shuffle(rows)
        if len(rows) < n:
            logger.info(
                "held-out harmful source %s: %d prompts (heldout_harmful_n = %d)", source, len(rows), n
            )
        chosen += rows[:n]
    advbench = shared / "safety/advbench_behaviors.csv" if shared is not None else None
    primary = advbench if advbench is not None and advbench.is_file() else HARMFUL_FALLBACK
    return chosen, primary, removed


def write_heldout_csv(prompts: list[tuple[str, str]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "source"])
        writer.writerows(prompts)


# ---------------------------------------------------------------------------------------------- eval sets


def resolve_utility_dev(shared: Path | None) -> tuple[Path, int]:
    """The utility dev split the evaluate stage scores (the SST-2 dev set, else the shipped sentiment dev
    split — disjoint from the shipped training split by construction, checked by a test)."""
    if shared is not None and (shared / SHARED_SST2_DEV).is_file():
        from spf.data.files import iter_delimited, read_data_text

        path = shared / SHARED_SST2_DEV
        # the shared reader: regular files only, size/line limits, duplicate columns refused
        return path, sum(1 for _ in iter_delimited(path, read_data_text(path), "\t"))
    path = shipped_file(SHIPPED_UTILITY_DEV)
    return path, len(load_samples(path, require_response=True))


def resolve_overrefusal() -> tuple[Path, int]:
    path = shipped_file(SHIPPED_OVERREFUSAL)
    return path, len(load_samples(path))


# ---------------------------------------------------------------------------------------------- manifest


def seen_prompts(p: PipelineParams, train: list, safety: list) -> dict[str, list[str]]:
    """Prompts a training, alignment or estimation step sees: the held-out set must share none of them."""
    align_file = Path(p.align.refusals) if p.align.refusals else shipped_file("align_refusals.jsonl")
    seen = {
        "train": [s.prompt for s in train],
        "safety_candidates": [s.prompt for s in safety],
        "alignment_refusals": [s.prompt for s in load_samples(align_file)],
    }
    baseline = p.finetune.baselines.safety_data
    if baseline and Path(baseline).resolve() != align_file.resolve():
        seen["baseline_safety"] = [s.prompt for s in load_samples(baseline)]
    return seen


def manifest(
    p: PipelineParams,
    shared: Path | None,
    tmp: Path,
    train_file: Path | None,
    safety_src: Path,
    heldout_file: Path,
    removed: dict[str, int],
    *,
    n_train: int,
    n_safety: int,
    n_heldout: int,
) -> dict[str, Any]:
    """``data/manifest.json``: the flat summary the stage has always returned, plus ``inputs`` (the row
    counts are the lists the stage wrote to ``tmp``; the hashes are of those files)."""
    train_source, train_name = (
        source_name(train_file, shared)
        if train_file
        else ("shared", f"shared (scenario {p.prepare.scenario})")
    )
    utility_file, utility_rows = resolve_utility_dev(shared)
    over_file, over_rows = resolve_overrefusal()
    entries = [
        DataInput("train", train_source, train_name, n_train, path_sha256(tmp / "train.jsonl")),
        describe("safety", safety_src, n_safety, shared),
        DataInput(
            "heldout_harmful",
            *source_name(heldout_file, shared),
            n_heldout,
            path_sha256(tmp / "heldout_harmful.csv"),
        ),
        describe("utility_dev", utility_file, utility_rows, shared),
        describe("overrefusal", over_file, over_rows, shared),
    ]
    return {
        "scenario": p.prepare.scenario,
        "n_train": n_train,
        "n_safety": n_safety,
        "n_heldout_harmful": n_heldout,
        "train_source": train_name,
        "heldout_source": entries[2].path,
        "safety_source": entries[1].path,
        "train_sha256": entries[0].sha256,
        "heldout_removed": removed,  # prompts dropped because a training/alignment/estimation step saw them
        "inputs": [e.to_dict() for e in entries],
    }


def manifest_inputs(data_dir: str | Path) -> list[dict[str, Any]]:
    """The ``inputs`` of a prepare stage's ``manifest.json`` in ``data_dir`` (none when the file is absent)."""
    import json

    path = Path(data_dir) / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")).get("inputs", []) if path.is_file() else []
