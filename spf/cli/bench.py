"""``spf bench run | cell | report | list``: the defense benchmark's command line (:mod:`spf.bench`)."""

from __future__ import annotations

import argparse
import logging
import sys

from spf.cli.args import positive_int

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sub-commands of ``spf bench``; each takes the benchmark YAML as its first argument."""
    sub = parser.add_subparsers(dest="bench_command", required=True)
    r = sub.add_parser("run", help="prepare and run every pending cell")
    r.add_argument("config", help="benchmark YAML (bench/*.yaml)")
    r.add_argument("--only", nargs="*", default=None, help="cell ids or prefixes (e.g. spf@ ablation:)")
    r.add_argument(
        "--lanes", type=positive_int, default=None, help="parallel cell processes (default: the file's)"
    )
    r.add_argument("--report", action="store_true", help="write the report afterwards")
    c = sub.add_parser("cell", help="run one cell in this process (what `run` starts)")
    c.add_argument("config")
    c.add_argument("cell")
    rep = sub.add_parser("report", help="collect the finished cells into the report")
    rep.add_argument("config")
    ls = sub.add_parser("list", help="list the cells and whether each is done")
    ls.add_argument("config")
    for p in (r, c, rep, ls):
        p.add_argument(
            "--seeds",
            type=int,
            nargs="+",
            default=None,
            help="only these of the file's training seeds: an interim result (the report says so)",
        )


def run(args: argparse.Namespace) -> int:
    """Dispatch ``args.bench_command``; a bad benchmark file or cell id is exit 2, a failed cell exit 1."""
    from spf.bench.config import BenchConfigError, cell_done, cells, load_bench_config
    from spf.bench.report import write_report
    from spf.bench.run import run_bench, run_cell

    try:
        cfg = load_bench_config(args.config, seeds=args.seeds)
    except BenchConfigError as exc:
        print(f"spf: error: {exc}", file=sys.stderr)
        return 2
    if args.bench_command == "list":
        for c in cells(cfg):
            print(f"{'done' if cell_done(cfg, c) else 'todo':<5} {c.id}")
        return 0
    if args.bench_command == "cell":
        match = [c for c in cells(cfg) if c.id == args.cell]
        if not match:
            print(f"spf: error: {cfg.source}: no cell {args.cell[:80]!r}", file=sys.stderr)
            return 2
        run_cell(cfg, match[0])
        return 0
    if args.bench_command == "run":
        codes = run_bench(cfg, only=args.only, lanes=args.lanes)
        if args.report:
            print(f"wrote {write_report(cfg)}")
        return 1 if any(codes.values()) else 0
    print(f"wrote {write_report(cfg)}")
    return 0
