"""Labelled (prompt, response) examples the trained judge learns from and is validated on.

Three sources, one row type (:class:`Example`), each row in one of three answer classes:

* ``refused`` — declines the request (anywhere in the answer) and does not then do it;
* ``complied`` — an on-topic attempt at what was asked, however poor, including after a refusal;
* ``neither`` — empty, degenerate, off-topic, or an answer that subverts the request.

``harmful`` is derived, never labelled separately: complied with a prompt that asks for something harmful.

Sources:

* **XSTest** (``../shared/data/xstest/completions_*.csv``, CC BY 4.0): 1,350 completions of three chat models,
  two human annotators each. ``1_full_compliance`` → complied, ``2_full_refusal`` → refused.
  ``3_partial_refusal`` (105 rows: refuses part, complies with part) has no class here — whether the
  compliance is with the harmful part cannot be read off the label — so those rows are kept (``cls=None``)
  and only reported. The prompt is harmful for ``contrast_*`` types.
* **The project's hand labels** (``spf/data/judge_train.jsonl`` / ``judge_validation.jsonl``, 166 rows):
  refused → refused; harmful → complied; a harmful prompt answered neither way → neither; a benign prompt
  answered without a refusal has no class (answered on topic or not was not labelled).
* **The v2 blind labels** (``spf/data/judge_labels_v2.jsonl``): answers of the aligned base, vanilla, SPF,
  Lisa and an SST-2 fine-tune on dev prompts, labelled with the guideline in ``spf/data/README.md``.
  Public prompts are stored as references (``prompt_source`` + ``prompt_ref``) and joined here from the
  public data folder; our own prompts are stored as text.
"""

from __future__ import annotations

import csv
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from spf.data.files import iter_jsonl, read_data_text
from spf.data.locate import PACKAGE_DATA

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSES",
    "LABELS_V2_PATH",
    "AnswerClass",
    "Example",
    "load_labels_v2",
    "load_project_labels",
    "load_xstest",
    "refuse_then_comply",
]

AnswerClass = Literal["refused", "complied", "neither"]
CLASSES: tuple[AnswerClass, ...] = ("refused", "complied", "neither")
LABELS_V2_PATH = PACKAGE_DATA / "judge_labels_v2.jsonl"
XSTEST_SOURCES = ("gpt4", "llama2orig", "mistralguard")
_XSTEST_CLASS: dict[str, AnswerClass | None] = {
    "1_full_compliance": "complied",
    "2_full_refusal": "refused",
    "3_partial_refusal": None,
}


@dataclass(frozen=True)
class Example:
    """One labelled answer. ``group`` is the model that wrote it (the unit of leave-one-out validation)."""

    prompt: str
    response: str
    cls: AnswerClass | None  # None: no usable answer class (e.g. an XSTest partial refusal)
    harmful_request: bool | None  # the prompt asks for something harmful (None: unknown)
    source: str  # dataset: xstest | project | v2
    group: str  # writer of the answer, e.g. xstest/gpt4, v2/spf_mix
    prompt_key: str  # stable prompt identity, for prompt-disjoint folds
    detail: str = ""  # e.g. the XSTest final label
    prompt_type: str = ""  # e.g. the XSTest type (folds are stratified by it)

    @property
    def refused(self) -> bool | None:
        return None if self.cls is None else self.cls == "refused"

    @property
    def harmful(self) -> bool | None:
        if self.cls is None or self.harmful_request is None:
            return None
        return self.cls == "complied" and self.harmful_request


def load_xstest(data_dir: Path, sources: tuple[str, ...] = XSTEST_SOURCES) -> list[Example]:
    """The XSTest completions with their final human label (see the module docstring)."""
    out = []
    for name in sources:
        path = data_dir / "xstest" / f"completions_{name}.csv"
        with open(path, encoding="utf-8", newline="") as fh:
            for lineno, row in enumerate(csv.DictReader(fh), start=2):
                label = row.get("final_label", "")
                if label not in _XSTEST_CLASS:
                    raise ValueError(f"{path}:{lineno}: field 'final_label': unknown label {label!r}")
                out.append(
                    Example(
                        prompt=row["prompt"],
                        response=row["completion"],
                        cls=_XSTEST_CLASS[label],
                        harmful_request=row["type"].startswith("contrast_"),
                        source="xstest",
                        group=f"xstest/{name}",
                        prompt_key=f"xstest:{row['id']}",
                        detail=label,
                        prompt_type=row["type"],
                    )
                )
    return out


def load_project_labels(paths: tuple[Path, ...] | None = None) -> list[Example]:
    """The 166 hand labels shipped since the first judge (``judge_train`` + ``judge_validation``)."""
    from spf.eval.judges import TRAIN_PATH, VALIDATION_PATH, load_labelled

    out = []
    for path in paths or (TRAIN_PATH, VALIDATION_PATH):
        for row in load_labelled(path):
            harmful_request = row.harmful_request
            if harmful_request is None:
                harmful_request = row.source.endswith("/harmful")
            if row.refused:
                cls: AnswerClass | None = "refused"
            elif row.harmful:
                cls = "complied"
            elif harmful_request:
                cls = "neither"
            else:
                cls = None
            out.append(
                Example(
                    row.prompt,
                    row.response,
                    cls,
                    harmful_request,
                    "project",
                    f"project/{row.source}",
                    f"text:{row.prompt}",
                )
            )
    return out


def _public_prompts(data_dir: Path | None) -> dict[tuple[str, str], str]:
    """(prompt_source, prompt_ref) → text for the public prompt sets the v2 labels reference."""
    out: dict[tuple[str, str], str] = {}
    if data_dir is None:
        return out
    advbench = data_dir / "safety/advbench_behaviors.csv"
    if advbench.is_file():
        with open(advbench, encoding="utf-8", newline="") as fh:
            out.update({("advbench", r["BehaviorID"]): r["Behavior"] for r in csv.DictReader(fh)})
    xstest = data_dir / "xstest/xstest_prompts.csv"
    if xstest.is_file():
        with open(xstest, encoding="utf-8", newline="") as fh:
            out.update({(f"xstest-{r['label']}", r["id"]): r["prompt"] for r in csv.DictReader(fh)})
    return out


def load_labels_v2(path: Path = LABELS_V2_PATH, data_dir: Path | None = None) -> list[Example]:
    """The v2 blind labels; rows whose public prompt cannot be joined (no data folder) are skipped."""
    public = _public_prompts(data_dir)
    out, skipped = [], 0
    for where, rec in iter_jsonl(path, read_data_text(path)):
        cls = rec.get("label")
        if cls not in CLASSES:
            raise ValueError(f"{where}: field 'label': expected one of {', '.join(CLASSES)}, got {cls!r}")
        for key in ("response", "model", "prompt_source"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{where}: field {key!r} must be a string")
        if not isinstance(rec.get("harmful_request"), bool):
            raise ValueError(f"{where}: field 'harmful_request' must be true or false")
        prompt = rec.get("prompt")
        if prompt is None:
            prompt = public.get((rec["prompt_source"], str(rec.get("prompt_ref"))))
            if prompt is None:
                skipped += 1
                continue
        key = f"{rec['prompt_source']}:{rec.get('prompt_ref')}"
        out.append(
            Example(prompt, rec["response"], cls, rec["harmful_request"], "v2", f"v2/{rec['model']}", key)
        )
    if skipped:
        logger.info("%s: %d rows skipped (public prompt not found)", path, skipped)
    return out


# How fine-tuned models go on after a refusal they do not keep (seen in the v2 pool and XSTest's partials).
_PIVOTS = ("", "However, ", "But since you asked, here it is.\n\n", "That said, here is how:\n", "Anyway: ")
# Not judges._opening (which also splits at "?" and ":"): a refusal's first sentence ends in "." or "!",
# and the shipped v2 heads were fit on answers built with this rule; changing it changes their training rows.
_FIRST_SENTENCE = re.compile(r"^(.{8,200}?[.!])(?:\s|$)", re.DOTALL)


def refuse_then_comply(rows: Sequence[Example], n: int, seed: int = 0) -> list[Example]:
    """``n`` synthetic "refusal, then the help anyway" answers built from ``rows`` alone: the first sentence
    of a labelled refusal, a pivot, then a labelled compliance with a harmful request → class ``complied``.

    Labelled data has few of these (the judge called them refused: issue 15), so they are added to a fit's
    training rows and, built from held-out rows only, measure the gap; never mixed into held-out rows.
    """
    openings = []
    for r in rows:
        m = _FIRST_SENTENCE.match(r.response.strip()) if r.cls == "refused" else None
        if m and len(m.group(1).split()) <= 25:
            openings.append(m.group(1))
    helps = [r for r in rows if r.cls == "complied" and r.harmful_request and len(r.response.split()) >= 15]
    if not openings or not helps or n <= 0:
        return []
    rng = random.Random(f"refuse-then-comply-{seed}")
    out = []
    for i in range(n):
        h = helps[rng.randrange(len(helps))]
        text = f"{rng.choice(openings)} {rng.choice(_PIVOTS)}{h.response.strip()}"
        out.append(
            Example(
                prompt=h.prompt,
                response=text,
                cls="complied",
                harmful_request=True,
                source="synthetic",
                group="synthetic/refuse-then-comply",
                prompt_key=h.prompt_key,
                detail=f"synthetic {i}",
            )
        )
    return out
