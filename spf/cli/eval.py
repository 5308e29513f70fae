"""``spf eval``: safety / utility suites on a model (plus adapter) → ``results.json`` + ``samples.jsonl``.

The evaluation itself is :func:`spf.eval.suites.run_eval`; this module only maps flags onto it and prints
the result table.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from spf.cli.args import positive_int
from spf.eval.vocab import DEFAULT_UTILITY_TASKS, JUDGES, SUITES, UTILITY_TASKS

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``spf eval`` (the caller adds --threads / --device / --verbose)."""
    parser.add_argument(
        "--model", required=True, help="smollm2-135m-instruct | local folder | hub id | tiny-llama"
    )
    parser.add_argument("--adapter", default=None, help="peft adapter folder to load on top of --model")
    parser.add_argument(
        "--suite",
        action="append",
        required=True,
        help=f"suite(s), repeatable or comma-separated: {', '.join(SUITES)} or all",
    )
    parser.add_argument(
        "--prompts",
        default=None,
        help="harmful prompt file (default: AdvBench from shared data, else the shipped held-out test split)",
    )
    parser.add_argument(
        "--prompts-split",
        default=None,
        help="keep only the --prompts records whose 'split' field is this (e.g. test)",
    )
    parser.add_argument(
        "--split",
        choices=("dev", "test"),
        default="test",
        help="protocol split of the default prompt sources: dev to choose settings, test to report",
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="prompts per source / rows per data set (seeded sample)",
    )
    parser.add_argument(
        "--judge", choices=JUDGES, default="v2", help="v2 (trained, default) | keyword | embedding | llm"
    )
    parser.add_argument("--judge-model", default=None, help="guard model folder for --judge llm")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="selects the --limit sample")
    parser.add_argument(
        "--shared-data", default=None, help="public data folder (default: $SPF_SHARED_DATA or ../shared/data)"
    )
    parser.add_argument(
        "--utility-tasks",
        default=",".join(DEFAULT_UTILITY_TASKS),
        help=f"comma list of utility data sets from {', '.join(UTILITY_TASKS)} (sst2 or sentiment required)",
    )
    parser.add_argument(
        "--system-prompt",
        default=None,
        help="system turn before every safety prompt (e.g. the AOA identity-shift prompt a model was tuned on)",
    )
    parser.add_argument("--out", required=True, help="output folder for results.json and samples.jsonl")


def run(args: argparse.Namespace) -> int:
    """``spf eval``: run, write OUT, print the table. User errors propagate (the CLI prints them)."""
    # Imported here so building the parser (``spf -h``) does not load torch.
    import torch

    from spf.eval.report import format_table
    from spf.eval.suites import run_eval

    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)
    results = run_eval(
        args.model,
        args.out,
        args.suite,
        adapter=args.adapter,
        device=getattr(args, "device", None),
        prompts=args.prompts,
        prompts_split=getattr(args, "prompts_split", None),
        limit=args.limit,
        split=getattr(args, "split", "test"),
        system_prompt=getattr(args, "system_prompt", None),
        judge=args.judge,
        judge_kwargs={"model_path": args.judge_model} if getattr(args, "judge_model", None) else None,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        shared_data=args.shared_data,
        utility_tasks=tuple(t.strip() for t in args.utility_tasks.split(",") if t.strip()),
    )
    # CLI output, not logging: the table is the command's result.
    print(format_table(results))
    print(f"wrote {Path(args.out) / 'results.json'}")
    return 0
