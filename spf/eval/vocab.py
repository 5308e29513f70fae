"""The evaluation vocabulary: suite names and utility task names, declared once.

A module of constants without torch, so configuration code (``spf.pipeline.params``, the CLI) can validate
names without importing the evaluation harness.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["DEFAULT_UTILITY_TASKS", "JUDGES", "SUITES", "UTILITY_TASKS", "JudgeKind", "Suite", "UtilityTask"]

Suite = Literal["harmful", "overrefusal", "jailbreak", "prefill", "utility"]
SUITES: tuple[str, ...] = get_args(Suite)

# v2: the trained judge (spf.eval.trained_judge), the default; keyword: the phrase rules, reported beside it;
# embedding: the first MiniLM judge; llm: a local guard model folder.
JudgeKind = Literal["v2", "keyword", "embedding", "llm"]
JUDGES: tuple[str, ...] = get_args(JudgeKind)

# sst2 / agnews / gsm8k read the public data folder; sentiment is the project's own held-out sentiment set
# (spf/data/sentiment_dev.jsonl), what sst2 falls back to when the public folder is absent.
UtilityTask = Literal["sst2", "sentiment", "agnews", "gsm8k"]
UTILITY_TASKS: tuple[str, ...] = get_args(UtilityTask)
# What a utility suite runs when no task list is given: the public tasks (sst2 falls back on its own).
DEFAULT_UTILITY_TASKS: tuple[str, ...] = ("sst2", "agnews", "gsm8k")
