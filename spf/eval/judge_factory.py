"""Judges by name: the one place that knows every kind (``spf.eval.vocab.JudgeKind``), so the judge modules
need not import each other."""

from __future__ import annotations

from typing import Any

from spf.eval.judges import EmbeddingJudge, Judge, JudgeError, KeywordJudge, LlamaGuardJudge
from spf.eval.trained_judge import TrainedJudge
from spf.eval.vocab import JUDGES, JudgeKind

__all__ = ["judge_identity", "make_judge"]

_KINDS: dict[str, type] = {
    "v2": TrainedJudge,
    "keyword": KeywordJudge,
    "embedding": EmbeddingJudge,
    "llm": LlamaGuardJudge,
}


def make_judge(kind: JudgeKind, **kwargs: Any) -> Judge:
    """A judge by name; ``kwargs`` go to its constructor (``llm`` needs ``model_path``, a local guard folder)."""
    if kind not in _KINDS:
        raise JudgeError(f"unknown judge kind {kind!r}; choose {', '.join(JUDGES)}")
    if kind == "llm" and "model_path" not in kwargs:
        raise JudgeError("the llm judge needs model_path= (a local guard model folder)")
    return _KINDS[kind](**kwargs)


def judge_identity(kind: JudgeKind) -> str:
    """What an evaluation by the default judge of ``kind`` records as ``judge_id``: the trained judge's name
    with its shipped heads' hash (a refit makes older verdicts stale), any other kind its name."""
    return TrainedJudge().identity if kind == "v2" else kind
