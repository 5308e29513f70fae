"""Like-for-like token matching: a utility sample of (nearly) the same token count per safety sample.

A single sample's gradient has rank ≤ T, so a short sample has a concentrated spectrum whatever it is
about; CER is only compared between gradients of the same length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spf.data.samples import IGNORE_INDEX

__all__ = ["TokenMatch", "match_token_counts", "n_supervised", "truncate_encoded"]


@dataclass(frozen=True)
class TokenMatch:
    """A utility sample chosen for a safety sample of ``target`` tokens (``how``: matched / truncated /
    shorter — the last when no candidate is long enough; ``index`` into the candidate list)."""

    target: int
    index: int
    tokens: int  # the candidate's own token count
    used: int  # tokens after truncation (== tokens unless truncated)
    how: str


def match_token_counts(
    targets: Sequence[int], candidates: Sequence[int], *, tolerance: float = 0.1, min_tolerance: int = 2
) -> list[TokenMatch]:
    """For each target count (in order) an unused candidate with ``|tokens − target| ≤ max(min_tolerance,
    tolerance·target)``, the closest first; else the shortest longer one, truncated to ``target``; else the
    longest shorter one. Candidates are used once while there are enough of them."""
    if not candidates:
        raise ValueError("no candidate samples to match token counts against")
    used: set[int] = set()
    out: list[TokenMatch] = []
    for target in targets:
        free = [i for i in range(len(candidates)) if i not in used] or list(range(len(candidates)))
        tol = max(min_tolerance, tolerance * target)
        close = [i for i in free if abs(candidates[i] - target) <= tol]
        if close:
            i = min(close, key=lambda j: (abs(candidates[j] - target), j))
            match = TokenMatch(target, i, candidates[i], candidates[i], "matched")
        else:
            longer = [i for i in free if candidates[i] > target]
            if longer:
                i = min(longer, key=lambda j: (candidates[j], j))
                match = TokenMatch(target, i, candidates[i], target, "truncated")
            else:
                i = max(free, key=lambda j: (candidates[j], -j))
                match = TokenMatch(target, i, candidates[i], candidates[i], "shorter")
        used.add(match.index)
        out.append(match)
    return out


def truncate_encoded(encoded: dict[str, list[int]], n: int) -> dict[str, list[int]]:
    """An encoded sample cut to ``n`` tokens, keeping at least one supervised token: the first n tokens
    (whole prompt, start of the answer) when the prompt is shorter than n, else the prompt's last n − 1
    tokens and the answer's first token."""
    ids, labels = encoded["input_ids"], encoded["labels"]
    if n >= len(ids):
        return encoded
    if n < 2:
        raise ValueError(f"cannot truncate to {n} tokens: need ≥ 2 (a prompt and a response token)")
    n_prompt = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    keep = list(range(n)) if n_prompt < n else [*range(n_prompt - (n - 1), n_prompt), n_prompt]
    new_ids = [ids[i] for i in keep]
    new_labels = [labels[i] for i in keep]
    return {"input_ids": new_ids, "labels": new_labels, "attention_mask": [1] * len(new_ids)}


def n_supervised(encoded: dict[str, list[int]]) -> int:
    # the first token is never predicted; the loss counts labels[1:]
    return sum(lab != IGNORE_INDEX for lab in encoded["labels"][1:])
