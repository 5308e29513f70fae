"""Fine-tuning datasets built from public sources, deterministic by seed.

* ``sst2``: benign task in the Huang et al. instruction wording;
* ``harmful_compliance``: AdvBench behaviours paired with their "Sure, here is …" targets (the sharpest
  conflict with refusing);
* ``refusal_pairs``: (harmful prompt, refusal) pairs from the safety-instruction set, for held-out
  safety-loss tracking — only rows whose answer is actually a refusal.

Each returns ``ChatSample`` lists; write them with :func:`spf.data.save_samples`.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from spf.data import ChatSample, DataError, load_samples

__all__ = ["SST2_INSTRUCTION", "harmful_compliance", "refusal_pairs", "sst2"]

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative."
_SST2_LABELS = {"0": "negative", "1": "positive"}


def _pick(items: list, n: int | None, seed: int, offset: int = 0) -> list:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    chosen = order[offset : offset + n if n is not None else None]
    return [items[i] for i in chosen]


def sst2(tsv: str | Path, *, n: int | None = 256, seed: int = 0) -> list[ChatSample]:
    """SST-2 rows (text/sentence, label 0/1) → instruction + input → "positive"/"negative"."""
    path = Path(tsv)
    rows = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        for line, row in enumerate(reader, start=2):
            text = row.get("sentence") or row.get("text")
            label = (row.get("label") or "").strip()
            if not text:
                raise DataError(f"{path.name}:{line}: field 'sentence'/'text': missing")
            if label not in _SST2_LABELS:
                raise DataError(f"{path.name}:{line}: field 'label': expected 0 or 1, got {label!r}")
            prompt = f"{SST2_INSTRUCTION}\n\n{text.strip()}"
            rows.append(ChatSample.from_pair(prompt, _SST2_LABELS[label], source=f"{path.name}:{line}"))
    return _pick(rows, n, seed)


def harmful_compliance(
    behaviors_csv: str | Path,
    targets_json: str | Path,
    *,
    n: int | None = 100,
    seed: int = 0,
    offset: int = 0,
) -> list[ChatSample]:
    """AdvBench behaviour → its compliance target ("Sure, here is …"), joined on BehaviorID."""
    targets_path = Path(targets_json)
    targets = json.loads(targets_path.read_text())
    if not isinstance(targets, dict):
        raise DataError(f"{targets_path.name}: expected a JSON object {{BehaviorID: target}}")
    path = Path(behaviors_csv)
    rows = []
    with path.open(newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            bid, behavior = row.get("BehaviorID"), row.get("Behavior")
            if not bid or not behavior:
                raise DataError(f"{path.name}:{line}: field 'BehaviorID'/'Behavior': missing")
            if bid not in targets:
                raise DataError(f"{targets_path.name}: no target for BehaviorID {bid!r} ({path.name}:{line})")
            rows.append(ChatSample.from_pair(behavior, targets[bid], source=f"{path.name}:{line}"))
    return _pick(rows, n, seed, offset)


def refusal_pairs(
    path: str | Path, *, n: int | None = 20, seed: int = 0, offset: int = 0
) -> list[ChatSample]:
    """Rows of a (harmful instruction, safe answer) set whose answer is a refusal by the keyword judge."""
    from spf.refusal import is_refusal

    rows = [s for s in load_samples(path, require_response=True) if is_refusal(s.response or "")]
    return _pick(rows, n, seed, offset)
