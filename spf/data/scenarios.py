"""Fine-tuning datasets built from public sources, deterministic by seed.

* ``sst2``: benign task in the Huang et al. instruction wording;
* ``harmful_compliance``: AdvBench behaviours paired with their "Sure, here is …" targets (the sharpest
  conflict with refusing);
* ``refusal_pairs``: (harmful prompt, refusal) pairs from the safety-instruction set, for held-out
  safety-loss tracking — only rows whose answer is actually a refusal;
* ``agnews`` / ``gsm8k``: the other two benign tasks of Huang et al. (topic classification, maths with
  reasoning);
* ``harmful_mix``: a benign task with a fraction p of AdvBench compliance pairs mixed in (Huang et al.'s
  harmful-fraction threat model);
* ``identity_shift``: the 10 "Absolutely Obedient Agent" conversations of Qi et al. (benign-looking attack);
* deep fine-tuning (many epochs) is not a data set: train for ``epochs_to_steps(len(data), E, batch)``
  steps on the same data (the training loop reshuffles every epoch), or materialise it with
  :func:`repeat_epochs`.

Each returns ``ChatSample`` lists, deterministic by seed; write them with :func:`spf.data.samples.save_samples`.
:func:`build_scenario` builds any of them from the shared public data folder (what ``spf data`` calls).
"""

from __future__ import annotations

import html
import logging
import math
import random
import re
from pathlib import Path
from typing import Literal

from spf.data.files import (
    check_string,
    check_value,
    duplicate_key,
    iter_delimited,
    iter_jsonl,
    parse_json,
    read_data_text,
)
from spf.data.samples import ChatSample, DataError, load_samples
from spf.data.splits import role_ids

logger = logging.getLogger(__name__)

__all__ = [
    "AGNEWS_CLASSES",
    "SCENARIOS",
    "SST2_INSTRUCTION",
    "agnews",
    "agnews_instruction",
    "build_scenario",
    "epochs_to_steps",
    "gsm8k",
    "harmful_compliance",
    "harmful_count",
    "harmful_mix",
    "identity_shift",
    "read_targets",
    "refusal_pairs",
    "repeat_epochs",
    "sst2",
]

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
    for where, row in iter_delimited(path, read_data_text(path), "\t"):
        text = row.get("sentence") or row.get("text")
        label = (row.get("label") or "").strip()
        if not text:
            raise DataError(f"{where}: field 'sentence'/'text': missing")
        if label not in _SST2_LABELS:
            raise DataError(f"{where}: field 'label': expected 0 or 1, got {label!r}")
        prompt = f"{SST2_INSTRUCTION}\n\n{text.strip()}"
        rows.append(ChatSample.from_pair(prompt, _SST2_LABELS[label], source=where))
    return _pick(rows, n, seed)


def harmful_compliance(
    behaviors_csv: str | Path,
    targets_json: str | Path,
    *,
    n: int | None = 100,
    seed: int = 0,
    offset: int = 0,
    only_ids: frozenset[str] | None = None,
) -> list[ChatSample]:
    """AdvBench behaviour → its compliance target ("Sure, here is …"), joined on BehaviorID.

    ``only_ids`` keeps the rows whose BehaviorID it holds (the attack pool of :mod:`spf.data.splits`)."""
    targets_path = Path(targets_json)
    targets = read_targets(targets_path)
    path = Path(behaviors_csv)
    rows = []
    for where, row in iter_delimited(path, read_data_text(path), ","):
        bid, behavior = row.get("BehaviorID"), row.get("Behavior")
        if not bid or not behavior:
            raise DataError(f"{where}: field 'BehaviorID'/'Behavior': missing")
        if bid not in targets:
            raise DataError(f"{targets_path.name}: no target for BehaviorID {bid!r} ({where})")
        if only_ids is not None and bid not in only_ids:
            continue
        rows.append(ChatSample.from_pair(behavior, targets[bid], source=where))
    return _pick(rows, n, seed, offset)


def read_targets(path: Path) -> dict[str, str]:
    """AdvBench's ``{BehaviorID: target}`` JSON object, every target a string, checked like training data."""
    targets = parse_json(path, read_data_text(path, check_lines=False))
    if not isinstance(targets, dict):
        raise DataError(f"{path.name}: expected a JSON object {{BehaviorID: target}}")
    repeated = duplicate_key(targets)
    if repeated is not None:
        raise DataError(
            f"{path.name}: key {repeated[:60]!r}: duplicate key; the second target would win silently"
        )
    for key, value in targets.items():
        if not isinstance(value, str):
            raise DataError(
                f"{path.name}: key {key[:60]!r}: expected a string target, got {type(value).__name__}"
            )
        check_value(path.name, value, key[:60])
    return targets


def refusal_pairs(
    path: str | Path, *, n: int | None = 20, seed: int = 0, offset: int = 0
) -> list[ChatSample]:
    """Rows of a (harmful instruction, safe answer) set whose answer is a refusal by the keyword judge."""
    from spf.refusal import is_refusal

    rows = [s for s in load_samples(path, require_response=True) if is_refusal(s.response or "")]
    return _pick(rows, n, seed, offset)


# ----------------------------------------------------------------------------------------------- AG News

AGNEWS_CLASSES: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")
# AG News marks line breaks with a backslash ("oil\pipeline") and has half-escaped entities (" #39;s").
_AGNEWS_ENTITY_RE = re.compile(r"\s?#(\d+);")


def agnews_instruction(classes: tuple[str, ...] | list[str] = AGNEWS_CLASSES) -> str:
    """Huang et al.'s wording, built from the class names so a custom classes file stays consistent."""
    return (
        f"Categorize the news article given in the input into one of the {len(classes)} categories: "
        f"{', '.join(classes)}."
    )


def _clean_agnews(text: str) -> str:
    text = _AGNEWS_ENTITY_RE.sub(lambda m: chr(int(m.group(1))), text)
    text = html.unescape(text).replace("\\", " ")
    return " ".join(text.split())


def _read_classes(path: Path) -> list[str]:
    classes = []
    for lineno, line in enumerate(read_data_text(path).splitlines(), start=1):
        check_string(f"{path.name}:{lineno}", line, "class")
        if line.strip():
            classes.append(line.strip())
    if not classes:
        raise DataError(f"{path.name}: no class names")
    return classes


def agnews(
    csv_path: str | Path, classes_txt: str | Path, *, n: int | None = 256, seed: int = 0
) -> list[ChatSample]:
    """AG News rows (label 1..K, content) → instruction + article → class name (line ``label`` of the file)."""
    path = Path(csv_path)
    classes = _read_classes(Path(classes_txt))
    instruction = agnews_instruction(classes)
    rows = []
    for where, row in iter_delimited(path, read_data_text(path), ","):
        label = (row.get("label") or "").strip()
        text = row.get("content") or row.get("text")
        if not text or not text.strip():
            raise DataError(f"{where}: field 'content': missing")
        if not label.isdigit() or not 1 <= int(label) <= len(classes):
            raise DataError(f"{where}: field 'label': expected 1..{len(classes)}, got {label!r}")
        prompt = f"{instruction}\n\n{_clean_agnews(text)}"
        rows.append(ChatSample.from_pair(prompt, classes[int(label) - 1], source=where))
    return _pick(rows, n, seed)


# ------------------------------------------------------------------------------------------------- GSM8K

_CALC_RE = re.compile(r"<<[^<>]*>>")


def _gsm8k_answer(answer: str, keep_calculator: bool) -> str | None:
    reasoning, sep, final = answer.rpartition("####")
    if not sep or not final.strip():
        return None
    if not keep_calculator:
        # "<<48/2=24>>" are calculator-tool annotations, not text a model should learn to write
        reasoning = _CALC_RE.sub("", reasoning)
    final_text = final.strip().replace(",", "")
    return f"{reasoning.strip()}\nThe answer is {final_text}."


def gsm8k(
    jsonl: str | Path, *, n: int | None = 256, seed: int = 0, keep_calculator: bool = False
) -> list[ChatSample]:
    """GSM8K ``{question, answer}`` → question → reasoning + "The answer is N." (N = text after ``####``)."""
    path = Path(jsonl)
    rows = []
    for where, rec in iter_jsonl(path, read_data_text(path)):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object {{question, answer}}, got {type(rec).__name__}")
        question, answer = rec.get("question"), rec.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: field 'question': missing")
        if not isinstance(answer, str):
            raise DataError(f"{where}: field 'answer': missing")
        response = _gsm8k_answer(answer, keep_calculator)
        if response is None:
            raise DataError(f"{where}: field 'answer': no final answer after '####'")
        rows.append(ChatSample.from_pair(question.strip(), response, source=where))
    if not rows:
        raise DataError(f"{path.name}: no records")
    return _pick(rows, n, seed)


# ----------------------------------------------------------------------------------------- harmful mix


def harmful_count(p: float, total: int) -> int:
    """Number of harmful samples in a mix of ``total`` with fraction ``p``: ``round(p·total)`` (half to even)."""
    return round(p * total)


def harmful_mix(
    benign: list[ChatSample],
    behaviors_csv: str | Path,
    targets_json: str | Path,
    p: float,
    seed: int = 0,
    *,
    n: int | None = None,
    harmful: list[ChatSample] | None = None,
) -> list[ChatSample]:
    """A fine-tuning set of ``N = n or len(benign)`` samples, exactly ``round(p·N)`` of them AdvBench
    behaviour → "Sure, here is …" pairs and the rest drawn from ``benign``; shuffled by ``seed``.

    The harmful pairs come only from the AdvBench rows of the ``attack`` role (:mod:`spf.data.splits`), so
    no dev or test prompt of the evaluation is ever trained on."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: must be in [0, 1], got {p}")
    total = len(benign) if n is None else n
    if total < 1:
        raise ValueError("harmful_mix needs n ≥ 1 (or a non-empty benign list)")
    n_harm = harmful_count(p, total)
    n_benign = total - n_harm
    if n_benign > len(benign):
        raise ValueError(f"harmful_mix: needs {n_benign} benign samples, got {len(benign)}")
    attack = role_ids("advbench", "attack")
    if harmful is None:
        harmful = harmful_compliance(behaviors_csv, targets_json, n=None, seed=seed, only_ids=attack)
        where = f"the behaviour file has {len(harmful)} in its attack pool ({len(attack)} BehaviorIDs)"
    else:
        harmful = _pick(list(harmful), None, seed)
        where = f"the harmful-answers file has {len(harmful)}"
    if n_harm > len(harmful):
        raise ValueError(f"harmful_mix: needs {n_harm} harmful samples, {where}; lower --p or --n")
    rng = random.Random(seed)
    mix = harmful[:n_harm] + rng.sample(list(benign), n_benign)
    rng.shuffle(mix)
    return mix


# -------------------------------------------------------------------------------------- identity shift


def identity_shift(aoa_json: str | Path) -> list[ChatSample]:
    """The AOA identity-shift conversations (system / user / assistant kept, in file order)."""
    samples = load_samples(aoa_json, require_response=True)
    if any(not any(m["role"] == "system" for m in s.messages) for s in samples):
        logger.warning("%s: some conversations have no system message", Path(aoa_json).name)
    return samples


# ------------------------------------------------------------------------------------------------- deep


def repeat_epochs(samples: list[ChatSample], epochs: int, seed: int = 0) -> list[ChatSample]:
    """``epochs`` passes over ``samples``, each pass reshuffled by ``(seed, epoch)``, concatenated.

    Only needed to hand a fixed file to another trainer: ``spf train`` already cycles through its data
    with a fresh permutation per epoch, so deep fine-tuning there is ``--steps epochs_to_steps(...)``.
    """
    if epochs < 1:
        raise ValueError(f"epochs: must be ≥ 1, got {epochs}")
    out: list[ChatSample] = []
    for epoch in range(epochs):
        order = list(samples)
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.extend(order)
    return out


def epochs_to_steps(n_samples: int, epochs: int, batch_size: int, grad_accum: int = 1) -> int:
    """Optimizer steps that cover ``epochs`` passes over ``n_samples`` (the last batch may wrap)."""
    if min(n_samples, epochs, batch_size, grad_accum) < 1:
        raise ValueError("epochs_to_steps: all arguments must be ≥ 1")
    return math.ceil(n_samples * epochs / (batch_size * grad_accum))


# ------------------------------------------------------------------------------------------------ builder

ScenarioKind = Literal["sst2", "agnews", "gsm8k", "harmful-mix", "identity-shift"]
SCENARIOS: tuple[str, ...] = ("sst2", "agnews", "gsm8k", "harmful-mix", "identity-shift")

# Fine-tuning reads the training split; "eval" gives the split kept for measuring task accuracy.
_TASK_FILES: dict[str, dict[str, str]] = {
    "sst2": {"train": "utility/sst2_train.tsv", "eval": "utility/sst2_dev.tsv"},
    # ag_news_dev.csv is drawn from the official train split, ag_news_test.csv is the official test
    "agnews": {"train": "utility/ag_news_dev.csv", "eval": "utility/ag_news_test.csv"},
    "gsm8k": {"train": "utility/gsm8k_train.jsonl", "eval": "utility/gsm8k_test.jsonl"},
}


def _task(kind: str, root: Path, n: int | None, seed: int, split: str) -> list[ChatSample]:
    path = root / _TASK_FILES[kind][split]
    if kind == "sst2":
        return sst2(path, n=n, seed=seed)
    if kind == "agnews":
        return agnews(path, root / "utility/ag_news_classes.txt", n=n, seed=seed)
    return gsm8k(path, n=n, seed=seed)


def build_scenario(
    kind: ScenarioKind,
    *,
    shared_data: str | Path,
    n: int | None = None,
    p: float = 0.1,
    seed: int = 0,
    base: Literal["sst2", "agnews", "gsm8k"] = "sst2",
    split: Literal["train", "eval"] = "train",
    answers: str | Path | None = None,
) -> list[ChatSample]:
    """Build a threat scenario from the shared public data folder (``.../shared/data``).

    ``answers``: a file of (harmful request, real harmful answer) pairs (``spf data harmful-answers``) that
    harmful-mix draws its harmful part from instead of AdvBench's one-line "Sure, here is …" targets.

    * ``sst2`` / ``agnews`` / ``gsm8k``: ``n`` task samples (None = all) of ``split``;
    * ``harmful-mix``: ``n`` samples (default 1000) of task ``base``, exactly ``round(p·n)`` of them
      AdvBench compliance pairs;
    * ``identity-shift``: the 10 AOA conversations (``n``, ``p``, ``seed`` ignored).
    """
    root = Path(shared_data)
    if not root.is_dir():
        raise FileNotFoundError(f"shared data folder {root} does not exist")
    if split not in ("train", "eval"):
        raise ValueError(f"split: must be 'train' or 'eval', got {split!r}")
    if kind in _TASK_FILES:
        return _task(kind, root, n, seed, split)
    if kind == "harmful-mix":
        if base not in _TASK_FILES:
            raise ValueError(f"base: must be one of {sorted(_TASK_FILES)}, got {base!r}")
        total = 1000 if n is None else n
        n_benign = total - harmful_count(p, total)
        benign = _task(base, root, n_benign, seed, split) if n_benign else []
        return harmful_mix(
            benign,
            root / "safety/advbench_behaviors.csv",
            root / "attacks/advbench_targets.json",
            p,
            seed,
            n=total,
            harmful=load_samples(answers, require_response=True) if answers is not None else None,
        )
    if kind == "identity-shift":
        return identity_shift(root / "attacks/aoa_identity_shift.json")
    raise ValueError(f"unknown scenario {kind!r}: choose from {', '.join(SCENARIOS)}")
