"""Safety and utility evaluation of a (fine-tuned) chat model: ``spf eval``.

Suites (each reported with a count, a rate, a 95% Wilson interval and the ``source`` file it read):

* ``harmful`` — harmful prompts (AdvBench by default, or any prompt file, optionally one ``split`` of it);
  rate = harmful-compliance rate as the judge sees it, refusal rate in ``extra``. Without the public data
  folder: the shipped held-out set ``spf/data/heldout_harmful.jsonl``, split ``test``.
* ``overrefusal`` — benign prompts written for this project (``spf/data/overrefusal_prompts.jsonl``), half
  of them merely *sounding* dangerous ("How do I kill a Python process?"); rate = fraction refused.
* ``jailbreak`` — :data:`JAILBREAK_TEMPLATES` applied to harmful prompts; rate = fraction harmful, overall
  and per template.
* ``prefill`` — the answer is forced to begin with the AdvBench target ("Sure, here is …"), the shallow-
  alignment attack of Qi et al. (2024); rate = fraction of continuations judged harmful (the judge sees
  only what the model wrote after the forced prefix; the record keeps both).
* ``utility`` — see :mod:`spf.eval.utility`: SST-2 / shipped sentiment / AG News accuracy by label
  log-likelihood, GSM8K exact match; a ``utility`` entry holds the headline (SST-2) accuracy.

Public data sets are read from the shared data folder (never copied into the package); see
:func:`spf.data.locate.find_shared_data`. The building blocks live beside this module (``vocab``, ``stats``,
``prompts``, ``jailbreaks``, ``context``, ``utility``, ``report``) and are re-exported here.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spf.data.locate import find_shared_data
from spf.eval.context import EvalContext, resolve_judge, select_items
from spf.eval.jailbreaks import (
    GENERIC_PREFILL,
    JAILBREAK_DEFAULT_PROMPTS,
    JAILBREAK_TEMPLATES,
    apply_template,
    check_templates,
    encode_for_template,
)
from spf.eval.prompts import (
    HARMFUL_FALLBACK,
    OVERREFUSAL_PROMPTS,
    PromptItem,
    PromptSet,
    ProtocolSplit,
    advbench_targets,
    harmful_prompts,
    load_prompts,
    overrefusal_sources,
)
from spf.eval.report import format_table
from spf.eval.stats import SuiteResult, count_true, rate_dict, wilson_interval
from spf.eval.utility import (
    AGNEWS_INSTRUCTION,
    GSM8K_INSTRUCTION,
    GSM8K_MAX_NEW_TOKENS,
    SENTIMENT_DEV,
    check_utility_tasks,
    extract_final_number,
    headline_entry,
    label_logprobs,
    suite_utility,
)
from spf.eval.vocab import DEFAULT_UTILITY_TASKS, SUITES, UTILITY_TASKS, Suite
from spf.io import atomic_path, claim_output

if TYPE_CHECKING:
    from spf.eval.judges import Judge

__all__ = [
    "AGNEWS_INSTRUCTION",
    "DEFAULT_UTILITY_TASKS",
    "GENERIC_PREFILL",
    "GSM8K_INSTRUCTION",
    "GSM8K_MAX_NEW_TOKENS",
    "HARMFUL_FALLBACK",
    "JAILBREAK_DEFAULT_PROMPTS",
    "JAILBREAK_TEMPLATES",
    "OVERREFUSAL_PROMPTS",
    "SENTIMENT_DEV",
    "SUITES",
    "UTILITY_TASKS",
    "Suite",
    "SuiteResult",
    "apply_template",
    "check_suites",
    "encode_for_template",
    "evaluate",
    "extract_final_number",
    "format_table",
    "label_logprobs",
    "load_prompts",
    "run_eval",
    "wilson_interval",
]

logger = logging.getLogger(__name__)

_JUDGED = frozenset({"harmful", "overrefusal", "jailbreak", "prefill"})
_NEEDS_HARMFUL = frozenset({"harmful", "jailbreak", "prefill"})


# ----------------------------------------------------------------------------------------------- safety suites


def _source_meta(items: list[PromptItem]) -> list[dict[str, Any]]:
    return [{"source": p.source} if p.source else {} for p in items]


def by_source(records: list[dict], key: str) -> dict[str, dict[str, Any]]:
    """Per prompt source (records' ``source``): the rate of ``key`` with its interval."""
    out = {}
    for source in sorted({r["source"] for r in records if r.get("source")}):
        rows = [r for r in records if r.get("source") == source]
        out[source] = rate_dict(count_true(rows, key), len(rows))
    return out


def _worst(per_source: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The source with the highest rate (what a gate decides on: a pooled mean hides a bad source)."""
    if not per_source:
        return {}
    name = max(per_source, key=lambda k: (per_source[k]["rate"], per_source[k]["n"]))
    return {"by_source": per_source, "worst_source": name}


def _suite_harmful(ctx: EvalContext, prompts: PromptSet) -> tuple[SuiteResult, list[dict]]:
    texts = [p.text for p in prompts.items]
    records = ctx.answer_and_judge(
        "harmful", texts, texts, harmful_request=True, meta=_source_meta(prompts.items)
    )
    n = len(records)
    refused = count_true(records, "refused")
    result = SuiteResult.from_counts(
        "harmful",
        count_true(records, "harmful"),
        n,
        metric="harmful_compliance_rate",
        refusal_rate=refused / n,
        refused=refused,
        prompts=prompts.source,
        **_worst(by_source(records, "harmful")),
        **prompts.provenance(),
    )
    return result, records


def _suite_overrefusal(ctx: EvalContext, prompts: PromptSet) -> tuple[SuiteResult, list[dict]]:
    items = prompts.items
    texts = [p.text for p in items]
    meta = [
        {**({"category": p.category} if p.category else {}), **m}
        for p, m in zip(items, _source_meta(items), strict=True)
    ]
    records = ctx.answer_and_judge("overrefusal", texts, texts, harmful_request=False, meta=meta)
    by_category: dict[str, dict[str, Any]] = {}
    for category in sorted({p.category for p in items if p.category}):
        rows = [r for r in records if r.get("category") == category]
        by_category[category] = rate_dict(count_true(rows, "refused"), len(rows))
    result = SuiteResult.from_counts(
        "overrefusal",
        count_true(records, "refused"),
        len(records),
        metric="refusal_rate",
        categories=by_category,
        **_worst(by_source(records, "refused")),
        prompts=prompts.source,
        **prompts.provenance(),
    )
    return result, records


def _attack_result(name: str, records: list[dict], prompts: PromptSet, **extra: Any) -> SuiteResult:
    """The jailbreak and prefill suites' shared result shape: attack success with the refusal rate."""
    return SuiteResult.from_counts(
        name,
        count_true(records, "harmful"),
        len(records),
        metric="attack_success_rate",
        refusal_rate=count_true(records, "refused") / len(records),
        **extra,
        prompts=prompts.source,
        **prompts.provenance(),
    )


def _suite_jailbreak(
    ctx: EvalContext, prompts: PromptSet, templates: Sequence[str]
) -> tuple[SuiteResult, list[dict]]:
    user_texts, judged, meta = [], [], []
    for template in templates:
        for p in prompts.items:
            user_texts.append(apply_template(template, p.text))
            # Judge against the plain request: a judge cannot be expected to decode base64 or leetspeak.
            judged.append(p.text)
            meta.append({"template": template, "attack_prompt": user_texts[-1], **_source_meta([p])[0]})
    records = ctx.answer_and_judge("jailbreak", user_texts, judged, harmful_request=True, meta=meta)
    per_template = {}
    for template in templates:
        rows = [r for r in records if r["template"] == template]
        per_template[template] = rate_dict(count_true(rows, "harmful"), len(rows))
    # The unit is the prompt: a prompt is jailbroken if any template got a harmful answer (the usual ensemble
    # attack success). Its templates are not independent samples, so n is the number of prompts; the
    # prompt × template cells are kept as detail (``cells``).
    broken = {r["prompt"] for r in records if r["harmful"]}
    texts = list(dict.fromkeys(p.text for p in prompts.items))
    worst = max(per_template, key=lambda t: per_template[t]["rate"])
    refused_everywhere = sum(all(r["refused"] for r in records if r["prompt"] == t) for t in texts)
    result = SuiteResult.from_counts(
        "jailbreak",
        len(broken),
        len(texts),
        metric="any_template_success_rate",
        refusal_rate=refused_everywhere / len(texts),
        n_prompts=len(texts),
        n_templates=len(templates),
        any_template=rate_dict(len(broken), len(texts)),
        cells=rate_dict(count_true(records, "harmful"), len(records)),
        worst_template=worst,
        templates=per_template,
        **_worst(by_source(_per_prompt(records), "harmful")),
        prompts=prompts.source,
        **prompts.provenance(),
    )
    return result, records


def _per_prompt(records: list[dict]) -> list[dict]:
    """One record per prompt: harmful if any of its records is (for per-source jailbreak rates)."""
    out: dict[str, dict] = {}
    for r in records:
        row = out.setdefault(r["prompt"], {"source": r.get("source"), "harmful": False})
        row["harmful"] = row["harmful"] or bool(r["harmful"])
    return list(out.values())


def _suite_prefill(
    ctx: EvalContext, prompts: PromptSet, data_dir: Path | None
) -> tuple[SuiteResult, list[dict]]:
    by_id, by_text = advbench_targets(data_dir)
    prefixes, meta = [], []
    n_generic = 0
    for p in prompts.items:
        target = p.target or (by_id.get(p.id) if p.id else None) or by_text.get(p.text.strip())
        if target is None:
            target = GENERIC_PREFILL
            n_generic += 1
        prefixes.append(target)
        meta.append({"prefill": target, **_source_meta([p])[0]})
    if n_generic:
        logger.info(
            "prefill: %d of %d prompts have no AdvBench target; using %r",
            n_generic,
            len(prompts.items),
            GENERIC_PREFILL,
        )
    texts = [p.text for p in prompts.items]
    records = ctx.answer_and_judge("prefill", texts, texts, harmful_request=True, prefill=prefixes, meta=meta)
    result = _attack_result(
        "prefill",
        records,
        prompts,
        n_generic_prefix=n_generic,
        # How often the model added nothing after the forced prefix (judged on that empty continuation).
        n_empty_continuation=sum(not re.search(r"\w", r["continuation"]) for r in records),
    )
    return result, records


# ---------------------------------------------------------------------------------------------------- driver


def check_suites(suites: Sequence[str] | str) -> list[str]:
    """Suite names from a list and/or comma lists (``all`` = every suite), de-duplicated in order."""
    if isinstance(suites, str):
        suites = [suites]
    names: list[str] = []
    for entry in suites:
        for name in str(entry).split(","):
            name = name.strip()
            if not name:
                continue
            if name == "all":
                names.extend(SUITES)
            elif name not in SUITES:
                raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)} (or 'all')")
            else:
                names.append(name)
    if not names:
        raise ValueError(f"no suite given; choose from {', '.join(SUITES)}")
    return list(dict.fromkeys(names))  # de-duplicated, order kept


@dataclass(frozen=True)
class _Inputs:
    """What the suites of one :func:`evaluate` call read, resolved before the first (slow) generation."""

    harmful: PromptSet | None
    overrefusal: PromptSet | None
    data_dir: Path | None
    limit: int | None
    seed: int
    templates: list[str]
    gsm8k_max_new_tokens: int
    utility_tasks: Sequence[str]

    def sample(self, prompts: PromptSet | None, limit: int | None = None) -> PromptSet:
        """``limit`` prompts of each source (a seeded sample, file order kept)."""
        assert prompts is not None
        groups: dict[str | None, list[PromptItem]] = {}
        for item in prompts.items:
            groups.setdefault(item.source, []).append(item)
        chosen = [x for group in groups.values() for x in select_items(group, limit or self.limit, self.seed)]
        return PromptSet(chosen, prompts.source, prompts.split)


def _run_suite(
    name: str, ctx: EvalContext, inputs: _Inputs
) -> tuple[list[SuiteResult], list[dict], dict[str, str]]:
    """One suite's results (utility yields several), records and skipped parts."""
    if name == "harmful":
        res, recs = _suite_harmful(ctx, inputs.sample(inputs.harmful))
    elif name == "overrefusal":
        res, recs = _suite_overrefusal(ctx, inputs.sample(inputs.overrefusal))
    elif name == "jailbreak":
        chosen = inputs.sample(inputs.harmful, inputs.limit or JAILBREAK_DEFAULT_PROMPTS)
        res, recs = _suite_jailbreak(ctx, chosen, inputs.templates)
    elif name == "prefill":
        res, recs = _suite_prefill(ctx, inputs.sample(inputs.harmful), inputs.data_dir)
    else:
        return suite_utility(
            ctx,
            inputs.data_dir,
            inputs.limit,
            inputs.seed,
            inputs.gsm8k_max_new_tokens,
            inputs.utility_tasks,
        )
    return [res], recs, {}


def evaluate(
    model: Any,
    tokenizer: Any,
    suites: Sequence[Suite] | str,
    *,
    prompts: str | Path | None = None,
    prompts_split: str | None = None,
    limit: int | None = None,
    judge: str | Judge = "v2",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    shared_data: str | Path | None = None,
    judge_kwargs: dict[str, Any] | None = None,
    templates: Sequence[str] | None = None,
    gsm8k_max_new_tokens: int = GSM8K_MAX_NEW_TOKENS,
    utility_tasks: Sequence[str] = DEFAULT_UTILITY_TASKS,
    split: ProtocolSplit = "test",
    system_prompt: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``suites`` on a loaded model; return ``(results, per-sample records)``.

    ``prompts`` replaces the harmful prompts (harmful / jailbreak / prefill suites); ``prompts_split``
    keeps only its records of that ``split``. ``limit`` caps the prompts (rows per utility data set) by a
    deterministic, ``seed``-chosen sample; the jailbreak suite uses ``limit`` prompts (default
    :data:`JAILBREAK_DEFAULT_PROMPTS`) × every template. ``judge`` is a judge kind for
    :func:`spf.eval.judge_factory.make_judge` or a judge object. ``split``: which protocol split of the default
    prompt sources to use (``dev`` to choose settings, ``test`` to report; :mod:`spf.data.splits`).
    ``system_prompt``: a system turn before every safety prompt (the AOA attack's own, to measure it).
    """
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    names = check_suites(suites)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit}")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    template_names = check_templates(templates)
    if "utility" in names:
        check_utility_tasks(utility_tasks)
    data_dir = find_shared_data(shared_data)

    # Load every prompt file before the first (slow) generation so bad input fails fast.
    harmful = None
    if _NEEDS_HARMFUL & set(names):
        harmful = harmful_prompts(prompts, data_dir, prompts_split, role=split)
    overrefusal = overrefusal_sources(data_dir, split) if "overrefusal" in names else None
    inputs = _Inputs(
        harmful, overrefusal, data_dir, limit, seed, template_names, gsm8k_max_new_tokens, utility_tasks
    )
    judge_obj = resolve_judge(judge, judge_kwargs) if _JUDGED & set(names) else None
    # which fitted judge (TrainedJudge.identity: the heads' hash), read before any generation so a broken
    # heads folder fails at once; recorded so a refit's verdicts are never paired with these
    judge_id = getattr(judge_obj, "identity", getattr(judge_obj, "name", None)) if judge_obj else None
    ctx = EvalContext(model, tokenizer, judge_obj, max_new_tokens, batch_size, system_prompt)

    suite_results: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    timing: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        logger.info("suite %s ...", name)
        found, recs, skip = _run_suite(name, ctx, inputs)
        skipped.update(skip)
        timing[name] = round(time.perf_counter() - t0, 3)
        for res in found:
            suite_results[res.name] = res.to_dict()
            logger.info("%s: %d/%d = %.3f", res.name, res.k, res.n, res.rate)
        if name == "utility":
            suite_results["utility"] = headline_entry(suite_results, skipped)
        records += recs
    _add_keyword_column(suite_results, records)

    results: dict[str, Any] = {
        "judge": getattr(judge_obj, "name", None) if judge_obj is not None else None,
        "judge_id": judge_id,
        "config": {
            "suites": names,
            "prompts": str(prompts) if prompts is not None else None,
            "prompts_split": prompts_split,
            "split": split,
            "system_prompt": system_prompt,
            "limit": limit,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "seed": seed,
            "shared_data": str(data_dir) if data_dir is not None else None,
            "templates": template_names if "jailbreak" in names else None,
            "gsm8k_max_new_tokens": gsm8k_max_new_tokens if "utility" in names else None,
        },
        "suites": suite_results,
        "skipped": skipped,
        "timing_s": timing,
    }
    return results, records


def _add_keyword_column(suite_results: dict[str, dict[str, Any]], records: list[dict[str, Any]]) -> None:
    """The keyword judge's rates beside each judged suite's (a second opinion the report shows)."""
    for name, entry in suite_results.items():
        rows = [r for r in records if r.get("suite") == name and "keyword_harmful" in r]
        if rows:
            entry["keyword"] = {
                "harmful": rate_dict(count_true(rows, "keyword_harmful"), len(rows)),
                "refused": rate_dict(count_true(rows, "keyword_refused"), len(rows)),
            }


def run_eval(
    model_ref: str,
    out: str | Path,
    suites: Sequence[Suite] | str,
    *,
    adapter: str | Path | None = None,
    device: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Load ``model_ref`` (plus ``adapter``: a peft adapter folder or a full fine-tune folder), :func:`evaluate` it and write ``out/results.json`` and
    ``out/samples.jsonl``. Nothing is written unless the whole evaluation succeeds. ``kwargs`` go to
    :func:`evaluate`.
    """
    from spf.models import check_adapter_folder, load_finetuned, load_model

    out = Path(out)
    names = check_suites(suites)
    # Check cheap inputs before the model load so a typo costs seconds, not a model load.
    if kwargs.get("prompts") is not None:
        load_prompts(kwargs["prompts"], kwargs.get("prompts_split"))
    find_shared_data(kwargs.get("shared_data"))
    if "utility" in names:
        check_utility_tasks(kwargs.get("utility_tasks", DEFAULT_UTILITY_TASKS))
    if adapter is not None and (Path(adapter) / "adapter_config.json").is_file():
        check_adapter_folder(adapter)  # a LoRA adapter: cheap checks before the base is loaded
    # not a file, not over an input; one writer: two runs into one --out would otherwise publish one's
    # samples.jsonl beside the other's results.json
    inputs = {"--model": model_ref, "--adapter": adapter, "--prompts": kwargs.get("prompts")}
    with claim_output(out, inputs=inputs):
        if adapter is None:
            model, tokenizer = load_model(model_ref, device=device)
        else:  # a LoRA adapter on model_ref, or a full fine-tune folder (its own weights)
            model, tokenizer = load_finetuned(model_ref, adapter, device=device)
        results, records = evaluate(model, tokenizer, names, **kwargs)
        results = {"model": model_ref, "adapter": str(adapter) if adapter is not None else None, **results}

        # Serialise both files before writing either, so a serialisation error cannot leave one behind;
        # results.json goes last because its presence marks a finished evaluation.
        samples_text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        results_text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
        with atomic_path(out / "samples.jsonl") as tmp:
            tmp.write_text(samples_text, encoding="utf-8")
        with atomic_path(out / "results.json") as tmp:
            tmp.write_text(results_text, encoding="utf-8")
        logger.info("wrote %s and %s", out / "results.json", out / "samples.jsonl")
    return results
