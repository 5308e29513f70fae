"""``spf data``: fine-tuning datasets (the threat scenarios) built from public sources or given files."""

from __future__ import annotations

import argparse

from spf.cli.args import finite_float, non_negative_int, positive_int
from spf.cli.errors import UsageError

__all__ = ["FILE_KINDS", "add_arguments", "run"]

# kinds built from files named with --src (the rest come from the shared data folder)
FILE_KINDS = ("harmful-compliance", "refusals")
_BASES = ("sst2", "agnews", "gsm8k")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spf.data.scenarios import SCENARIOS

    d = parser
    d.add_argument(
        "kind",
        choices=[*SCENARIOS, *FILE_KINDS],
        help="task sets; harmful-mix (fraction --p of AdvBench compliance pairs in a --base task set); "
        "identity-shift (the 10 AOA conversations); harmful-compliance and refusals read --src files",
    )
    d.add_argument("--src", nargs="+", help="harmful-compliance: CSV TARGETS_JSON; refusals: JSON; sst2: TSV")
    d.add_argument("--shared-data", default=None, help="public data folder (default: ../shared/data)")
    d.add_argument("--n", type=positive_int, default=None, help="samples (default: all)")
    d.add_argument("--p", type=finite_float(0.0, 1.0), default=0.1, help="harmful fraction for harmful-mix")
    d.add_argument("--base", choices=_BASES, default="sst2")
    d.add_argument("--split", choices=["train", "eval"], default="train")
    d.add_argument("--epochs", type=positive_int, default=1, help="repeat the set (deep fine-tuning)")
    d.add_argument("--offset", type=non_negative_int, default=0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True)


def _from_files(args: argparse.Namespace) -> list:
    from spf.data import scenarios

    if not args.src:
        raise UsageError(f"{args.kind} needs --src")
    if args.kind == "sst2":
        return scenarios.sst2(args.src[0], n=args.n, seed=args.seed)
    if args.kind == "harmful-compliance":
        if len(args.src) != 2:
            raise UsageError("harmful-compliance needs --src BEHAVIORS_CSV TARGETS_JSON")
        return scenarios.harmful_compliance(
            args.src[0], args.src[1], n=args.n, seed=args.seed, offset=args.offset
        )
    return scenarios.refusal_pairs(args.src[0], n=args.n, seed=args.seed, offset=args.offset)


def run(args: argparse.Namespace) -> int:
    from spf.data import scenarios
    from spf.data.locate import require_shared_data
    from spf.data.samples import save_samples
    from spf.io import check_output

    if args.epochs < 1:
        raise UsageError(f"--epochs must be ≥ 1, got {args.epochs}")
    if args.n is not None and args.n < 1:
        raise UsageError(f"--n must be ≥ 1, got {args.n}")
    if not 0.0 <= args.p <= 1.0:
        raise UsageError(f"--p must be in [0, 1], got {args.p}")
    check_output(args.out, inputs={"--src": args.src or []}, kind="file")
    if args.kind in FILE_KINDS or (args.kind == "sst2" and args.src):
        samples = _from_files(args)
    else:
        samples = scenarios.build_scenario(
            args.kind,
            shared_data=require_shared_data(args.shared_data),
            n=args.n,
            p=args.p,
            seed=args.seed,
            base=args.base,
            split=args.split,
        )
    if args.epochs > 1:
        samples = scenarios.repeat_epochs(samples, args.epochs, seed=args.seed)
    save_samples(samples, args.out)
    # CLI output: the count is the command's result
    print(f"wrote {len(samples)} samples to {args.out}")
    return 0
