"""The ``utility`` suite: classification accuracy by label log-likelihood and GSM8K exact match.

* ``sst2`` — SST-2 dev sentences from the public data folder; without that folder it falls back to
  ``sentiment`` (logged, and the result's ``source`` names the file actually scored);
* ``sentiment`` — the project's own held-out sentiment set (``spf/data/sentiment_dev.jsonl``, SST-2
  instruction format); its training split ``sentiment_train.jsonl`` is never evaluated on;
* ``agnews`` — AG News test articles, 4 classes; ``gsm8k`` — GSM8K test problems, final-number match
  (Huang et al. wording). Both need the public folder and are skipped (with the reason) without it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch

from spf.data.files import check_string, iter_delimited, iter_jsonl, read_data_text
from spf.data.locate import PACKAGE_DATA
from spf.data.samples import ChatSample, DataError, load_samples, pad_token_id
from spf.eval.context import EvalContext, select_items
from spf.eval.stats import SuiteResult
from spf.eval.vocab import DEFAULT_UTILITY_TASKS, UTILITY_TASKS
from spf.generation import generate, model_device

__all__ = [
    "AGNEWS_INSTRUCTION",
    "GSM8K_INSTRUCTION",
    "GSM8K_MAX_NEW_TOKENS",
    "SENTIMENT_DEV",
    "SENTIMENT_LABELS",
    "check_utility_tasks",
    "classification",
    "extract_final_number",
    "headline_entry",
    "label_logprobs",
    "suite_utility",
]

logger = logging.getLogger(__name__)

SENTIMENT_DEV = PACKAGE_DATA / "sentiment_dev.jsonl"
SENTIMENT_LABELS = ["negative", "positive"]
AGNEWS_INSTRUCTION = "Categorize the news article given in the input into one of the 4 categories: World, Sports, Business, Sci/Tech."
GSM8K_INSTRUCTION = (
    "Solve the problem step by step. Give the final numeric answer on the last line after '####'."
)
# GSM8K needs room for a worked solution; 64 tokens (the safety default) cuts most answers off.
GSM8K_MAX_NEW_TOKENS = 256


def _forward_last_logits(model: Any, input_ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    # Left padding: position ids must count real tokens only, or padded rows see shifted positions.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        # logits_to_keep avoids materialising [batch, seq, vocab] logits when only the label positions matter.
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=keep)
    except TypeError:
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)
    return out.logits[:, -keep:, :].float()


def label_logprobs(
    model: Any, tokenizer: Any, prompts: Sequence[str], labels: Sequence[str], *, batch_size: int = 16
) -> torch.Tensor:
    """``[len(prompts), len(labels)]`` summed log-probabilities of each label as the assistant's answer.

    Each prompt is rendered as a user turn with the chat template and generation prompt; the label's tokens
    follow directly (as greedy decoding would produce them). Rows are length-sorted and left-padded so every
    label ends at the last position, and only the last few positions' logits are computed.
    """
    if not prompts:
        return torch.empty(0, len(labels))
    prefix_ids = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        prefix_ids.append(list(tokenizer(text, add_special_tokens=False).input_ids))
    label_ids = [list(tokenizer(label, add_special_tokens=False).input_ids) for label in labels]
    if any(not ids for ids in label_ids):
        raise ValueError(f"a label encodes to zero tokens: {list(labels)}")
    rows = [(i, j) for i in range(len(prompts)) for j in range(len(labels))]
    rows.sort(key=lambda r: len(prefix_ids[r[0]]) + len(label_ids[r[1]]))
    scores = torch.empty(len(prompts), len(labels), dtype=torch.float64)
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                seqs = [prefix_ids[i] + label_ids[j] for i, j in batch]
                width = max(len(s) for s in seqs)
                ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
                mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
                max_label = max(len(label_ids[j]) for _, j in batch)
                keep = max_label + 1
                logprobs = torch.log_softmax(_forward_last_logits(model, ids, mask, keep), dim=-1)
                for b, (i, j) in enumerate(batch):
                    lab = label_ids[j]
                    # Token at sequence position width-L+t is predicted by the logits one position earlier,
                    # which sits at index keep-1-L+t of the kept window.
                    idx = torch.arange(len(lab), device=device) + (keep - 1 - len(lab))
                    tok = torch.tensor(lab, device=device)
                    scores[i, j] = logprobs[b, idx, tok].sum().item()
    finally:
        model.train(was_training)
    return scores


def classification(
    ctx: EvalContext, name: str, prompts: list[str], gold: list[int], labels: list[str], source: str
) -> tuple[SuiteResult, list[dict]]:
    scores = label_logprobs(ctx.model, ctx.tokenizer, prompts, labels, batch_size=ctx.batch_size)
    predicted = scores.argmax(dim=1).tolist()
    records = []
    for prompt, g, p, row in zip(prompts, gold, predicted, scores.tolist(), strict=True):
        records.append(
            {
                "suite": name,
                "prompt": prompt,
                "response": labels[p],
                "gold": labels[g],
                "correct": p == g,
                "label_logprobs": dict(zip(labels, row, strict=True)),
            }
        )
    correct = sum(r["correct"] for r in records)
    result = SuiteResult.from_counts(
        name, correct, len(records), metric="accuracy", labels=labels, source=source
    )
    return result, records


def _sentiment_gold(samples: list[ChatSample]) -> list[int]:
    gold = []
    for s in samples:
        answer = (s.response or "").strip().lower()
        if answer not in SENTIMENT_LABELS:
            raise DataError(f"{s.source}: field 'response': expected positive/negative, got {s.response!r}")
        gold.append(SENTIMENT_LABELS.index(answer))
    return gold


def _sst2_rows(
    data_dir: Path | None, limit: int | None, seed: int
) -> tuple[list[str], list[int], str] | None:
    """SST-2 dev prompts, gold labels and source; ``None`` when the public file is absent."""
    path = data_dir / "utility" / "sst2_dev.tsv" if data_dir is not None else None
    if path is None or not path.is_file():
        return None
    from spf.data.scenarios import sst2

    samples = select_items(sst2(path, n=None, seed=seed), limit, seed)
    return [s.prompt for s in samples], _sentiment_gold(samples), str(path)


def _sentiment_rows(limit: int | None, seed: int) -> tuple[list[str], list[int], str]:
    samples = select_items(load_samples(SENTIMENT_DEV, require_response=True), limit, seed)
    return [s.prompt for s in samples], _sentiment_gold(samples), str(SENTIMENT_DEV)


def _agnews_rows(data_dir: Path, limit: int | None, seed: int) -> tuple[list[str], list[int], list[str], str]:
    path = data_dir / "utility" / "ag_news_test.csv"
    classes_path = data_dir / "utility" / "ag_news_classes.txt"
    classes = []
    for lineno, name in enumerate(read_data_text(classes_path).splitlines(), start=1):
        check_string(f"{classes_path.name}:{lineno}", name, "class")
        if name.strip():
            classes.append(name.strip())
    rows: list[tuple[str, int]] = []
    for where, row in iter_delimited(path, read_data_text(path), ","):
        try:
            label = int(row["label"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: field 'label': expected 1..{len(classes)}") from exc
        if not 1 <= label <= len(classes):
            raise DataError(f"{where}: field 'label': expected 1..{len(classes)}, got {label}")
        # The AG News dump uses a backslash where the original article had a line break.
        content = " ".join((row.get("content") or "").replace("\\", " ").split())
        rows.append((f"{AGNEWS_INSTRUCTION}\n\n{content}", label - 1))
    rows = select_items(rows, limit, seed)
    return [r[0] for r in rows], [r[1] for r in rows], classes, str(path)


_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _to_number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "")).normalize()
    except InvalidOperation:
        return None


def extract_final_number(text: str) -> Decimal | None:
    """The number after the last '####' if there is one, else the last number in ``text``."""
    if "####" in text:
        # After '####' the first number is the answer (GSM8K's own format).
        after = _NUMBER_RE.findall(text.rsplit("####", 1)[1])
        if after:
            return _to_number(after[0])
    # In free text the last number is usually the conclusion.
    numbers = _NUMBER_RE.findall(text)
    return _to_number(numbers[-1]) if numbers else None


def _gsm8k(
    ctx: EvalContext, data_dir: Path, limit: int | None, seed: int, max_new_tokens: int
) -> tuple[SuiteResult, list[dict]]:
    path = data_dir / "utility" / "gsm8k_test.jsonl"
    problems: list[tuple[str, Decimal]] = []
    for where, rec in iter_jsonl(path, read_data_text(path)):
        record = rec if isinstance(rec, dict) else {}
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise DataError(f"{where}: fields 'question' and 'answer': expected strings")
        gold = extract_final_number(answer.rsplit("####", 1)[-1])
        if gold is None:
            raise DataError(f"{where}: field 'answer': no number after '####'")
        problems.append((question, gold))
    problems = select_items(problems, limit, seed)
    prompts = [f"{q}\n\n{GSM8K_INSTRUCTION}" for q, _ in problems]
    answers = generate(
        ctx.model,
        ctx.tokenizer,
        [[{"role": "user", "content": p}] for p in prompts],
        max_new_tokens=max_new_tokens,
        batch_size=ctx.batch_size,
    )
    records = []
    for (question, gold), answer in zip(problems, answers, strict=True):
        predicted = extract_final_number(answer)
        records.append(
            {
                "suite": "utility.gsm8k",
                "prompt": question,
                "response": answer,
                "gold": str(gold),
                "predicted": None if predicted is None else str(predicted),
                "correct": predicted == gold,
            }
        )
    correct = sum(r["correct"] for r in records)
    result = SuiteResult.from_counts(
        "utility.gsm8k",
        correct,
        len(records),
        metric="accuracy",
        max_new_tokens=max_new_tokens,
        source=str(path),
    )
    return result, records


def check_utility_tasks(tasks: Sequence[str]) -> list[str]:
    """``tasks`` in :data:`UTILITY_TASKS` order; ValueError for an unknown task or none of sst2/sentiment
    (one of them is the suite's headline ``utility`` entry)."""
    unknown = sorted(set(tasks) - set(UTILITY_TASKS))
    if unknown or not {"sst2", "sentiment"} & set(tasks):
        raise ValueError(
            f"utility tasks: choose from {', '.join(UTILITY_TASKS)} (sst2 or sentiment required), "
            f"got {list(tasks)}"
        )
    return [t for t in UTILITY_TASKS if t in tasks]


def _sentiment_tasks(
    ctx: EvalContext, data_dir: Path | None, limit: int | None, seed: int, tasks: list[str]
) -> tuple[list[SuiteResult], list[dict]]:
    """utility.sst2 and/or utility.sentiment; the shipped set is scored at most once."""
    results: list[SuiteResult] = []
    records: list[dict] = []
    sst2_rows = _sst2_rows(data_dir, limit, seed) if "sst2" in tasks else None
    if sst2_rows is not None:
        res, recs = classification(ctx, "utility.sst2", *sst2_rows[:2], SENTIMENT_LABELS, sst2_rows[2])
        results.append(res)
        records += recs
    fallback = "sst2" in tasks and sst2_rows is None
    if fallback:
        logger.warning(
            "SST-2 dev set (utility/sst2_dev.tsv) not found in the shared data folder; utility.sst2 is the "
            "accuracy on the shipped held-out sentiment set %s instead",
            SENTIMENT_DEV.name,
        )
    if fallback or "sentiment" in tasks:
        prompts, gold, source = _sentiment_rows(limit, seed)
        first = "utility.sst2" if fallback else "utility.sentiment"
        res, recs = classification(ctx, first, prompts, gold, SENTIMENT_LABELS, source)
        if fallback:
            results.append(replace(res, extra={**res.extra, "fallback_for": "sst2"}))
        if "sentiment" in tasks:
            # Same rows, same scores: report them under their own name without scoring them twice.
            results.append(replace(res, name="utility.sentiment", extra=dict(res.extra)))
        records += recs
    return results, records


def suite_utility(
    ctx: EvalContext,
    data_dir: Path | None,
    limit: int | None,
    seed: int,
    gsm8k_max_new_tokens: int,
    tasks: Sequence[str] = DEFAULT_UTILITY_TASKS,
) -> tuple[list[SuiteResult], list[dict], dict[str, str]]:
    """Results of the requested utility ``tasks``, their records, and ``{task: reason}`` of skipped ones."""
    chosen = check_utility_tasks(tasks)
    results, records = _sentiment_tasks(ctx, data_dir, limit, seed, chosen)
    skipped: dict[str, str] = {}

    utility = data_dir / "utility" if data_dir is not None else None
    if "agnews" not in chosen:
        skipped["utility.agnews"] = "not requested"
    elif (
        utility is not None
        and (utility / "ag_news_test.csv").is_file()
        and (utility / "ag_news_classes.txt").is_file()
    ):
        prompts, gold, classes, source = _agnews_rows(utility.parent, limit, seed)
        res, recs = classification(ctx, "utility.agnews", prompts, gold, classes, source)
        results.append(res)
        records += recs
    else:
        skipped["utility.agnews"] = "AG News (utility/ag_news_test.csv) not found in the shared data folder"

    if "gsm8k" not in chosen:
        skipped["utility.gsm8k"] = "not requested"
    elif utility is not None and (utility / "gsm8k_test.jsonl").is_file():
        res, recs = _gsm8k(ctx, utility.parent, limit, seed, gsm8k_max_new_tokens)
        results.append(res)
        records += recs
    else:
        skipped["utility.gsm8k"] = "GSM8K (utility/gsm8k_test.jsonl) not found in the shared data folder"

    for name, reason in skipped.items():
        logger.warning("skipping %s: %s", name, reason)
    return results, records, skipped


def headline_entry(suite_results: dict[str, dict[str, Any]], skipped: dict[str, str]) -> dict[str, Any]:
    """The contract's ``utility`` entry: a copy of the SST-2 accuracy (the headline task of Huang et al.),
    or of the shipped sentiment accuracy when SST-2 was not requested; ``entry`` names the copied result."""
    entry = "utility.sst2" if "utility.sst2" in suite_results else "utility.sentiment"
    headline = {**suite_results[entry], "entry": entry}
    if skipped:
        headline["skipped"] = dict(skipped)
    return headline
