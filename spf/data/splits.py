"""The fixed roles of public prompts: which AdvBench rows may feed an attack, which are dev, which are test.

Settings are chosen on ``dev`` prompts and reported on ``test`` prompts; harmful fine-tuning data (the attack)
draws only from ``attack`` rows, so no evaluation prompt is ever trained on. The split is pinned in a shipped
file of row references (``spf/data/prompt_splits.json``: AdvBench ``BehaviorID`` s, XSTest ``id`` s, and row
numbers of our own prompt files) — never the public texts, which are joined from the data folder at use time.

The file is produced by :func:`make_splits` (``python scripts/make_prompt_splits.py``): a seeded shuffle,
stratified by XSTest ``type`` so dev and test hold every kind of prompt. Pinning it (rather than recomputing)
keeps the roles fixed if a public file is re-ordered or extended.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Literal

from spf.data.locate import PACKAGE_DATA

__all__ = [
    "ADVBENCH_COUNTS",
    "SPLITS_PATH",
    "Role",
    "load_splits",
    "make_splits",
    "role_ids",
]

SPLITS_PATH = PACKAGE_DATA / "prompt_splits.json"
Role = Literal["attack", "dev", "test"]
SEED = "spf-prompt-splits-v1"
ADVBENCH_COUNTS = {"attack": 120, "dev": 100, "test": 300}  # of 520 rows
XSTEST_DEV_PER_TYPE = 6  # of 25 prompts per XSTest type: 48 unsafe + 60 safe dev, 152 + 190 test


def _shuffled(ids: Sequence[str], salt: str) -> list[str]:
    out = sorted(ids)
    random.Random(f"{SEED}/{salt}").shuffle(out)
    return out


def make_splits(
    advbench_ids: Sequence[str],
    xstest: Sequence[tuple[str, str, str]],
    ours: dict[str, int],
) -> dict:
    """The split document from the row references: AdvBench ids, XSTest ``(id, type, label)`` rows, and the
    row counts of our own prompt files (``{name: rows}``; the first quarter of each is dev)."""
    if len(set(advbench_ids)) != len(advbench_ids):
        raise ValueError("AdvBench BehaviorIDs repeat")
    need = sum(ADVBENCH_COUNTS.values())
    if len(advbench_ids) < need:
        raise ValueError(f"AdvBench has {len(advbench_ids)} rows; the split needs {need}")
    order = _shuffled(advbench_ids, "advbench")
    advbench, start = {}, 0
    for role, count in ADVBENCH_COUNTS.items():
        advbench[role] = sorted(order[start : start + count], key=_natural)
        start += count
    xs: dict[str, dict[str, list[str]]] = {"safe": {"dev": [], "test": []}, "unsafe": {"dev": [], "test": []}}
    for kind in sorted({t for _, t, _ in xstest}):
        rows = [(i, lab) for i, t, lab in xstest if t == kind]
        labels = {lab for _, lab in rows}
        if len(labels) != 1 or not labels <= {"safe", "unsafe"}:
            raise ValueError(f"XSTest type {kind!r} mixes labels {sorted(labels)}")
        picked = _shuffled([i for i, _ in rows], f"xstest/{kind}")
        label = labels.pop()
        xs[label]["dev"] += picked[:XSTEST_DEV_PER_TYPE]
        xs[label]["test"] += picked[XSTEST_DEV_PER_TYPE:]
    for label in xs.values():
        for role in label:
            label[role].sort(key=_natural)
    own = {}
    for name, n in sorted(ours.items()):
        rows = _shuffled([str(i) for i in range(n)], f"ours/{name}")
        cut = n // 4
        own[name] = {"dev": sorted(map(int, rows[:cut])), "test": sorted(map(int, rows[cut:]))}
    return {"version": 1, "seed": SEED, "advbench": advbench, "xstest": xs, "ours": own}


def _natural(key: str) -> tuple:
    """``advbench_10`` after ``advbench_9``."""
    head, _, tail = key.rpartition("_")
    return (head, int(tail)) if tail.isdigit() else (key, -1)


@cache
def load_splits(path: Path = SPLITS_PATH) -> dict:
    """The pinned split document (see the module docstring)."""
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    if doc.get("version") != 1:
        raise ValueError(f"{path}: unknown prompt-split version {doc.get('version')!r}")
    return doc


def role_ids(source: Literal["advbench", "xstest-safe", "xstest-unsafe"], role: Role) -> frozenset[str]:
    """The row references of one source in one role (XSTest has no ``attack`` rows)."""
    doc = load_splits()
    if source == "advbench":
        return frozenset(doc["advbench"][role])
    label = source.split("-", 1)[1]
    if role == "attack":
        raise ValueError("XSTest prompts are evaluation prompts only; they have no attack role")
    return frozenset(doc["xstest"][label][role])
