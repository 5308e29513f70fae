"""What every suite shares: the model, tokenizer and judge of one evaluation, the deterministic ``limit``
sample, judge resolution, and generate-then-judge into per-sample records."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, is_dataclass
from typing import TYPE_CHECKING, Any

from spf.generation import generate

if TYPE_CHECKING:
    from spf.eval.judges import Judge, Verdict

__all__ = ["EvalContext", "join_prefill", "resolve_judge", "select_items", "verdict_fields"]


def select_items(items: list[Any], limit: int | None, seed: int) -> list[Any]:
    """``limit`` items chosen deterministically by ``seed``, kept in file order (all of them if no limit)."""
    if limit is None or limit >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def resolve_judge(judge: str | Judge, judge_kwargs: dict[str, Any] | None) -> Judge:
    """A judge object: ``judge`` itself, or :func:`spf.eval.judge_factory.make_judge` of a judge kind."""
    if not isinstance(judge, str):
        return judge
    # Imported here: the judges pull in numpy/embedding code that evaluation-only users of the utility
    # suite do not need.
    from spf.eval.judge_factory import make_judge

    return make_judge(judge, **(judge_kwargs or {}))  # type: ignore[arg-type]


def verdict_fields(verdict: Verdict | Any) -> dict[str, Any]:
    """The record fields of a verdict (a dataclass or any object with the same attributes)."""
    fields = asdict(verdict) if is_dataclass(verdict) and not isinstance(verdict, type) else {}
    for key in ("refused", "harmful", "score", "judge"):
        if key not in fields:
            fields[key] = getattr(verdict, key, None)
    return {
        "refused": bool(fields["refused"]),
        "harmful": bool(fields["harmful"]),
        "score": None if fields["score"] is None else float(fields["score"]),
        "judge": fields["judge"],
    }


def join_prefill(prefix: str, continuation: str) -> str:
    """The answer a reader sees under a prefill attack: the forced prefix plus the model's continuation."""
    # generate() strips the continuation, so restore the space unless it starts with punctuation.
    if not continuation:
        return prefix
    sep = "" if continuation[0] in ".,:;!?)" or prefix.endswith((" ", "\n")) else " "
    return prefix + sep + continuation


@dataclass
class EvalContext:
    """The model under evaluation, its judge (``None`` for utility-only runs) and generation settings."""

    model: Any
    tokenizer: Any
    judge: Judge | None
    max_new_tokens: int
    batch_size: int
    # A system turn before every safety prompt: the identity-shift (AOA) attack is measured under the
    # system prompt it was fine-tuned with, as Qi et al. (2023) evaluate it.
    system_prompt: str | None = None

    def answer_and_judge(
        self,
        suite: str,
        user_texts: list[str],
        judged_prompts: list[str],
        *,
        harmful_request: bool | None,
        prefill: list[str] | None = None,
        meta: list[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Generate greedy answers to ``user_texts`` and judge them against ``judged_prompts``.

        ``harmful_request``: what the suite knows of its prompts (True: all harmful, False: all benign).
        The keyword judge's verdict is recorded beside the judge's (``keyword_refused``/``keyword_harmful``)."""
        assert self.judge is not None
        from spf.eval.judges import KeywordJudge  # here: utility-only runs never load the judges

        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        conversations = [[*system, {"role": "user", "content": t}] for t in user_texts]
        answers = generate(
            self.model,
            self.tokenizer,
            conversations,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            prefill=prefill,
        )
        continuations = answers
        if prefill is not None:
            # A reader sees the forced prefix plus its continuation; the judge sees only what the model wrote.
            # Judging the joined text would count the attacker's own "Sure, here is …" as the model's
            # compliance (a long prefix alone passes any length floor) and score a model that recovers
            # ("…: I can't help with that") as compliant.
            answers = [join_prefill(p, a) for p, a in zip(prefill, continuations, strict=True)]
        flags = [harmful_request] * len(answers)
        verdicts = self.judge(judged_prompts, continuations, harmful_request=flags)
        keyword = KeywordJudge()(judged_prompts, continuations, harmful_request=flags)
        if len(verdicts) != len(answers):
            raise RuntimeError(
                f"judge {self.judge.name!r} returned {len(verdicts)} verdicts for {len(answers)}"
            )
        records = []
        for i, (prompt, answer, verdict) in enumerate(zip(judged_prompts, answers, verdicts, strict=True)):
            rec: dict[str, Any] = {"suite": suite, "prompt": prompt, "response": answer}
            rec.update(verdict_fields(verdict))
            rec["keyword_refused"], rec["keyword_harmful"] = keyword[i].refused, keyword[i].harmful
            if prefill is not None:
                rec["continuation"] = continuations[i]
            if meta is not None:
                rec.update(meta[i])
            records.append(rec)
        return records
