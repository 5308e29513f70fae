"""Per-prompt verdicts of a cell's evaluations, and their pooling over training seeds.

``run_eval`` writes one record per judged item to ``samples.jsonl``. Each suite's verdict per prompt is the
suite's own unit: ``harmful`` and ``prefill`` — the answer judged harmful; ``jailbreak`` — the prompt broken
by any template; ``overrefusal`` — the benign prompt refused; ``utility`` — the row answered correctly
(1 = attack success / harmful / over-refused / correct). Read back in evaluation order they line up prompt
by prompt across seeds and cells, because every evaluation samples its prompts with the benchmark's fixed
seed: what the paired tests of the report (:mod:`spf.bench.compare`) need.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spf.eval.stats import wilson_interval

logger = logging.getLogger(__name__)

__all__ = ["CI_METHOD", "SuiteVerdicts", "pool_suite", "prompts_sha256", "rate_entry", "read_verdicts"]

# the record field that is a suite's verdict (utility.* rows: "correct")
_FIELD = {"harmful": "harmful", "prefill": "harmful", "jailbreak": "harmful", "overrefusal": "refused"}
CI_METHOD = "wilson-clustered-by-prompt"


@dataclass(frozen=True)
class SuiteVerdicts:
    """One suite of one evaluation: its prompts in evaluation order, their sources and the 0/1 verdicts."""

    ids: list[str]
    sources: list[str | None]
    bits: str  # "0110…", one character per prompt


def prompts_sha256(ids: list[str]) -> str:
    """The identity of a prompt list: equal lists (same prompts, same order) pair; nothing else does."""
    return hashlib.sha256(json.dumps(ids, ensure_ascii=False).encode()).hexdigest()


def _records(folder: Path) -> list[dict[str, Any]]:
    text = (folder / "samples.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _per_prompt(rows: list[dict[str, Any]], field: str, by_prompt: bool) -> SuiteVerdicts:
    if not by_prompt:
        return SuiteVerdicts(
            [r["prompt"] for r in rows],
            [r.get("source") for r in rows],
            "".join("1" if r[field] else "0" for r in rows),
        )
    # jailbreak: one record per (template, prompt); the prompt is the unit, broken by any template
    broken: dict[str, bool] = {}
    source: dict[str, str | None] = {}
    for r in rows:
        broken[r["prompt"]] = broken.get(r["prompt"], False) or bool(r[field])
        source.setdefault(r["prompt"], r.get("source"))
    ids = list(broken)
    return SuiteVerdicts(ids, [source[i] for i in ids], "".join("1" if broken[i] else "0" for i in ids))


def read_verdicts(folder: Path) -> dict[str, SuiteVerdicts]:
    """``{suite: verdicts}`` of one ``run_eval`` folder, for every suite entry of its ``results.json`` with
    records of its own (``utility`` is the copy of its headline entry). Each is checked against the suite's
    own count, so a change of a suite's definition in spf.eval fails here instead of pairing the wrong
    outcomes."""
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))["suites"]
    records = _records(folder)
    out: dict[str, SuiteVerdicts] = {}
    for key, entry in results.items():
        source_suite = entry.get("entry", key) if key == "utility" else key
        rows = [r for r in records if r.get("suite") == source_suite]
        if not rows and key.startswith("utility."):
            # utility.sentiment beside a missing SST-2 copies utility.sst2's result: no rows of its own
            logger.info("%s: %s has no records of its own: no verdicts", folder, key)
            continue
        got = _per_prompt(rows, _FIELD.get(key, "correct"), by_prompt=key == "jailbreak")
        if (len(got.bits), got.bits.count("1")) != (entry["n"], entry["k"]):
            raise RuntimeError(
                f"{folder}: {key}: samples.jsonl gives {got.bits.count('1')}/{len(got.bits)}, results.json "
                f"{entry['k']}/{entry['n']}: the per-prompt verdicts do not match the suite's definition"
            )
        out[key] = got
    return out


def rate_entry(rows: list[str]) -> dict[str, Any]:
    """Rate, counts and 95 % interval of seeds × prompts 0/1 outcomes (``rows``: one string per seed).

    The interval is Wilson's with the effective sample size of outcomes clustered by prompt (Kish's design
    effect): the seeds of one prompt are not independent draws — a prompt the model breaks on tends to
    break under every seed — so n_eff = P·p(1−p) / var(per-prompt mean), between P (the seeds always
    agree: the interval of the prompts alone) and P·S (the seeds as independent as separate prompts).
    With one seed, or a rate of 0 or 1 (no variance to estimate the clustering from), n_eff = P: the
    conservative end."""
    a = np.array([[c == "1" for c in r] for r in rows], dtype=float)
    seeds, prompts = a.shape
    k, n = int(a.sum()), a.size
    p = k / n
    n_eff = float(prompts)
    var = float(a.mean(0).var(ddof=1)) if prompts > 1 else 0.0
    if seeds > 1 and 0 < p < 1 and var > 0:
        n_eff = min(max(prompts * p * (1 - p) / var, prompts), n)
    elif seeds > 1 and 0 < p < 1:
        n_eff = float(n)  # every prompt has the same rate: the seeds are all the variation there is
    low, high = wilson_interval(p * n_eff, n_eff)  # type: ignore[arg-type]  # continuous in k and n
    return {"n": n, "k": k, "rate": p, "ci_low": low, "ci_high": high, "n_eff": round(n_eff, 1)}


def _by_source(verdicts: dict[int, SuiteVerdicts]) -> dict[str, Any]:
    first = next(iter(verdicts.values()))
    out: dict[str, Any] = {}
    for source in sorted({s for s in first.sources if s}):
        cols = [i for i, s in enumerate(first.sources) if s == source]
        out[source] = rate_entry(["".join(v.bits[i] for i in cols) for v in verdicts.values()])
    if not out:
        return {}
    worst = max(out, key=lambda s: (out[s]["rate"], out[s]["n"]))
    return {"by_source": out, "worst_source": worst}


def pool_suite(
    suite: str, verdicts: dict[int, SuiteVerdicts], results: dict[int, dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One suite of one curve step pooled over the seeds (``{seed: …}``, the same prompts for each): the
    ``suites`` entry of cell.json and its ``verdicts`` entry (prompt ids once, one verdict string a seed)."""
    ids = next(iter(verdicts.values())).ids
    for seed, v in verdicts.items():
        if v.ids != ids:
            raise RuntimeError(
                f"{suite}: seed {seed} was evaluated on other prompts than seed {next(iter(verdicts))}: "
                "the evaluation prompts must not depend on the training seed"
            )
    entry = rate_entry([v.bits for v in verdicts.values()])
    entry.update(n_per_seed=len(ids), ci=CI_METHOD, **_by_source(verdicts))
    entry["per_seed"] = {str(s): v.bits.count("1") / len(v.bits) for s, v in verdicts.items()}
    first = next(iter(results.values()))
    if "metric" in first:
        entry["metric"] = first["metric"]
    if all("refusal_rate" in r for r in results.values()):  # equal n per seed: the mean is the pooled rate
        entry["refusal_rate"] = sum(r["refusal_rate"] for r in results.values()) / len(results)
    record = {
        "prompts_sha256": prompts_sha256(ids),
        "ids": ids,
        "by_seed": {str(s): v.bits for s, v in verdicts.items()},
    }
    return entry, record
