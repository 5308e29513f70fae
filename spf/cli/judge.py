"""``spf judge``: verdicts for a file of (prompt, response) pairs → ``DIR/verdicts.jsonl`` + ``DIR/summary.json``.

FILE is JSONL / JSON / CSV / TSV with a ``prompt`` column and a ``response`` (or ``completion``) column; an
optional ``harmful_request`` column (true/false) says whether each prompt asks for something harmful — where
it is absent the judge decides. ``verdicts.jsonl`` holds one row per input row, in order: ``refused``,
``harmful``, ``score`` and ``judge``, plus the keyword judge's ``keyword_refused`` / ``keyword_harmful`` as
a second opinion.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from spf.eval.vocab import JUDGES  # constants only: `spf judge -h` loads no torch

__all__ = ["add_arguments", "read_pairs", "run"]

_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="JSONL/JSON/CSV/TSV with prompt and response columns")
    parser.add_argument("--out", required=True, help="output folder for verdicts.jsonl and summary.json")
    parser.add_argument("--judge", choices=JUDGES, default="v2", help="default: v2 (the trained judge)")
    parser.add_argument("--judge-model", default=None, help="guard model folder for --judge llm")


def _flag(value: Any, where: str) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError(f"{where}: field 'harmful_request': expected true or false, got {value!r}")


def read_pairs(path: str | Path) -> tuple[list[str], list[str], list[bool | None]]:
    """(prompts, responses, harmful_request flags) of a judge input file; ``DataError`` naming FILE:LINE."""
    from spf.data.samples import DataError, iter_records

    prompts, responses, flags = [], [], []
    for where, rec in iter_records(path):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with prompt and response fields")
        prompt = rec.get("prompt")
        response = rec.get("response", rec.get("completion"))
        if not isinstance(prompt, str):
            raise DataError(f"{where}: field 'prompt': missing or not a string")
        if not isinstance(response, str):
            raise DataError(f"{where}: field 'response' (or 'completion'): missing or not a string")
        try:
            flags.append(_flag(rec.get("harmful_request"), where))
        except ValueError as exc:
            raise DataError(str(exc)) from exc
        prompts.append(prompt)
        responses.append(response)
    if not prompts:
        raise DataError(f"{path}: no rows")
    return prompts, responses, flags


def run(args: argparse.Namespace) -> int:
    import torch

    from spf.eval.context import resolve_judge
    from spf.eval.judges import KeywordJudge
    from spf.io import atomic_path, claim_output

    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)
    with claim_output(args.out, inputs={"--input": [args.input]}):
        prompts, responses, flags = read_pairs(args.input)
        kwargs = {"model_path": args.judge_model} if args.judge_model else None
        judge = resolve_judge(args.judge, kwargs)
        verdicts = judge(prompts, responses, harmful_request=flags)
        keyword = KeywordJudge()(prompts, responses, harmful_request=flags)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps(
                {
                    "refused": v.refused,
                    "harmful": v.harmful,
                    "score": round(v.score, 6),
                    "judge": v.judge,
                    "keyword_refused": k.refused,
                    "keyword_harmful": k.harmful,
                }
            )
            for v, k in zip(verdicts, keyword, strict=True)
        ]
        n = len(verdicts)
        summary = {
            "input": str(args.input),
            "rows": n,
            "judge": verdicts[0].judge,
            "refused": sum(v.refused for v in verdicts) / n,
            "harmful": sum(v.harmful for v in verdicts) / n,
            "keyword_refused": sum(k.refused for k in keyword) / n,
            "keyword_harmful": sum(k.harmful for k in keyword) / n,
            "harmful_request_given": sum(f is not None for f in flags),
        }
        with atomic_path(out / "verdicts.jsonl") as tmp:
            tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        with atomic_path(out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(
        f"{n} rows judged by {summary['judge']}: refused {summary['refused']:.3f}, harmful {summary['harmful']:.3f}"
        f" (keyword: {summary['keyword_refused']:.3f}, {summary['keyword_harmful']:.3f})"
    )
    print(f"wrote {out / 'verdicts.jsonl'}")
    return 0
