"""Prompt files for the safety suites: loading, split selection, and the default harmful prompts.

The harmful prompts default to AdvBench from the public data folder; without that folder they fall back to
the project's own held-out set (``spf/data/heldout_harmful.jsonl``, split ``test``) — never to the
safety-*estimation* candidates (``refusals.jsonl``), which a held-out evaluation must not see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from spf.data.files import iter_delimited, read_data_text
from spf.data.locate import PACKAGE_DATA
from spf.data.samples import DataError, iter_records, load_samples
from spf.data.scenarios import read_targets
from spf.data.splits import load_splits, role_ids

__all__ = [
    "HARMFUL_FALLBACK",
    "HARMFUL_FALLBACK_SPLIT",
    "OVERREFUSAL_PROMPTS",
    "PromptItem",
    "PromptSet",
    "ProtocolSplit",
    "advbench_targets",
    "attack_prompts",
    "harmful_prompts",
    "harmful_sources",
    "load_prompt_items",
    "load_prompts",
    "overrefusal_sources",
]

logger = logging.getLogger(__name__)

OVERREFUSAL_PROMPTS = PACKAGE_DATA / "overrefusal_prompts.jsonl"
HARMFUL_FALLBACK = PACKAGE_DATA / "heldout_harmful.jsonl"
# The shipped held-out set has a "dev" split (for choosing thresholds) and a "test" split (for reporting).
HARMFUL_FALLBACK_SPLIT = "test"
ProtocolSplit = Literal["dev", "test"]  # choose settings on dev prompts, report on test prompts


@dataclass(frozen=True)
class PromptItem:
    """One prompt with the metadata columns the suites use."""

    text: str
    id: str | None = None
    target: str | None = None  # compliance prefix for the prefill attack, when the file has one
    category: str | None = None
    source: str | None = None  # which prompt set it came from (advbench, xstest-unsafe, ours, ...)


@dataclass(frozen=True)
class PromptSet:
    """Prompts and where they came from: ``source`` is the file, ``split`` the selected split (if any)."""

    items: list[PromptItem]
    source: str
    split: str | None = None

    def provenance(self) -> dict[str, Any]:
        """The ``source`` (and ``split``) entries every suite result records."""
        return {"source": self.source, **({"split": self.split} if self.split is not None else {})}


def _raw_records(path: Path) -> list[dict[str, Any]] | None:
    """Records of a prompt file as plain dicts, for metadata columns load_samples does not keep.

    Only called after load_samples accepted the file, and read by the same reader
    (:func:`spf.data.samples.iter_records`), so parsing errors cannot happen here; ``None`` when the file's
    shape has no per-record metadata (e.g. bare message lists).
    """
    records = [record for _, record in iter_records(path)]
    if not all(isinstance(r, dict) for r in records):
        return None
    return records


def _item(text: str, rec: dict[str, Any]) -> PromptItem:
    rid = rec.get("BehaviorID") or rec.get("id")
    target = rec.get("target")
    category = rec.get("category") or rec.get("Category")
    source = rec.get("source")
    return PromptItem(
        text,
        id=str(rid) if rid not in (None, "") else None,
        target=target if isinstance(target, str) and target.strip() else None,
        category=category if isinstance(category, str) and category else None,
        source=source if isinstance(source, str) and source else None,
    )


def load_prompt_items(path: str | Path, split: str | None = None) -> list[PromptItem]:
    """:func:`load_prompts` with each prompt's id, prefill target and category.

    ``split`` keeps only the records whose ``split`` field equals it; a file without that field, or without
    a record of that split, raises :class:`DataError` naming the file and the splits it has.
    """
    path = Path(path)
    samples = load_samples(path)
    records = _raw_records(path)
    aligned = records is not None and len(records) == len(samples)
    if split is not None:
        splits = {r.get("split") for r in records} - {None, ""} if aligned and records else set()
        if not splits:
            raise DataError(f"{path}: no 'split' field to select split {split!r} from")
        if split not in splits:
            raise DataError(f"{path}: no record of split {split!r}; splits: {', '.join(sorted(splits))}")
    if not aligned:
        return [PromptItem(s.prompt) for s in samples]
    assert records is not None
    return [
        _item(sample.prompt, rec)
        for sample, rec in zip(samples, records, strict=True)
        if split is None or rec.get("split") == split
    ]


def load_prompts(path: str | Path, split: str | None = None) -> list[str]:
    """Prompts of any prompt file: CSV/TSV with a Behavior/goal/prompt/... column, or JSON/JSONL records with
    instruction/prompt/messages (the last user message is the prompt; responses are ignored).

    ``split`` selects the records of one split of a file with a ``split`` field (e.g. ``test`` of
    ``spf/data/heldout_harmful.jsonl``). An empty file or one without a recognisable prompt column raises
    :class:`DataError` naming the file.
    """
    return [item.text for item in load_prompt_items(path, split)]


def _tagged(items: list[PromptItem], source: str) -> list[PromptItem]:
    return [replace(item, source=source) for item in items]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    return [row for _, row in iter_delimited(path, read_data_text(path), ",")]


def _advbench_items(path: Path, role: str) -> list[PromptItem]:
    keep = role_ids("advbench", role)  # type: ignore[arg-type]
    return [
        PromptItem(r["Behavior"], id=r["BehaviorID"], source="advbench")
        for r in _csv_rows(path)
        if r.get("BehaviorID") in keep
    ]


def _xstest_items(path: Path, label: str, role: str) -> list[PromptItem]:
    keep = role_ids(f"xstest-{label}", role)  # type: ignore[arg-type]
    return [
        PromptItem(r["prompt"], id=f"xstest:{r['id']}", category=r.get("type"), source=f"xstest-{label}")
        for r in _csv_rows(path)
        if r.get("label") == label and r.get("id") in keep
    ]


def harmful_sources(data_dir: Path | None, role: ProtocolSplit = "test") -> PromptSet:
    """The protocol's harmful prompts of one split (``dev`` to choose settings, ``test`` to report), every item
    tagged with its source: AdvBench rows of that role, XSTest's unsafe prompts of that role (both from the
    public data folder, when present) and our held-out harmful set's split. No prompt of these is ever used
    for alignment, estimation or fine-tuning data (:mod:`spf.data.splits`)."""
    items: list[PromptItem] = []
    sources: list[str] = []
    advbench = data_dir / "safety/advbench_behaviors.csv" if data_dir is not None else None
    if advbench is not None and advbench.is_file():
        items += _advbench_items(advbench, role)
        sources.append(str(advbench))
    xstest = data_dir / "xstest/xstest_prompts.csv" if data_dir is not None else None
    if xstest is not None and xstest.is_file():
        items += _xstest_items(xstest, "unsafe", role)
        sources.append(str(xstest))
    if not sources:
        logger.warning("no public data folder: the harmful suite uses only the shipped held-out prompts")
    items += _tagged(load_prompt_items(HARMFUL_FALLBACK, role), "ours")
    sources.append(str(HARMFUL_FALLBACK))
    return PromptSet(items, " + ".join(sources), role)


def attack_prompts(data_dir: Path) -> PromptSet:
    """AdvBench's attack-role rows (:mod:`spf.data.splits`): the only prompts harmful fine-tuning data may use."""
    path = data_dir / "safety/advbench_behaviors.csv"
    return PromptSet(_advbench_items(path, "attack"), str(path), "attack")


def overrefusal_sources(data_dir: Path | None, role: ProtocolSplit = "test") -> PromptSet:
    """Benign prompts of one protocol split: XSTest's safe prompts (public folder) and our own set's rows."""
    items: list[PromptItem] = []
    sources: list[str] = []
    xstest = data_dir / "xstest/xstest_prompts.csv" if data_dir is not None else None
    if xstest is not None and xstest.is_file():
        items += _xstest_items(xstest, "safe", role)
        sources.append(str(xstest))
    ours = load_prompt_items(OVERREFUSAL_PROMPTS)
    rows = load_splits()["ours"]["overrefusal_prompts"][role]
    items += _tagged([ours[i] for i in rows if i < len(ours)], "ours")
    sources.append(str(OVERREFUSAL_PROMPTS))
    return PromptSet(items, " + ".join(sources), role)


def harmful_prompts(
    prompts: str | Path | None,
    data_dir: Path | None,
    split: str | None = None,
    role: ProtocolSplit = "test",
) -> PromptSet:
    """The harmful prompts: ``prompts`` (its ``split``), else the protocol's sources of ``role``
    (:func:`harmful_sources`)."""
    if prompts is not None:
        return PromptSet(load_prompt_items(prompts, split), str(prompts), split)
    if split is not None:
        # A split names records of a given file; the protocol's split is ``role``.
        raise ValueError("a prompts split needs a prompts file (the protocol's split is --split dev|test)")
    return harmful_sources(data_dir, role)


def advbench_targets(data_dir: Path | None) -> tuple[dict[str, str], dict[str, str]]:
    """(BehaviorID → target, behaviour text → target) from the shared AdvBench files, empty when absent."""
    if data_dir is None:
        return {}, {}
    targets_path = data_dir / "attacks" / "advbench_targets.json"
    behaviours_path = data_dir / "safety" / "advbench_behaviors.csv"
    if not targets_path.is_file():
        return {}, {}
    by_id = read_targets(targets_path)
    by_text: dict[str, str] = {}
    if behaviours_path.is_file():
        for _, row in iter_delimited(behaviours_path, read_data_text(behaviours_path), ","):
            target = by_id.get(row.get("BehaviorID") or "")
            if target and row.get("Behavior"):
                by_text[row["Behavior"].strip()] = target
    return by_id, by_text
