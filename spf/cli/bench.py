"""``spf bench run | cell | report | list | compare``: the defense benchmark's command line (:mod:`spf.bench`)."""

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
    cmp = sub.add_parser("compare", help="paired tests of one finished cell against another (A − B)")
    cmp.add_argument("config")
    cmp.add_argument("a", help="cell id, e.g. ablation:fused")
    cmp.add_argument("b", help="cell id, e.g. spf@mix10")
    cmp.add_argument("--json", default=None, help="also write the rows to this JSON file")
    for p in (r, c, rep, ls, cmp):
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
    if args.bench_command == "compare":
        return _compare(cfg, args)
    if args.bench_command == "run":
        codes = run_bench(cfg, only=args.only, lanes=args.lanes)
        if args.report:
            print(f"wrote {write_report(cfg)}")
        return 1 if any(codes.values()) else 0
    print(f"wrote {write_report(cfg)}")
    return 0


def _compare(cfg, args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from spf.bench.compare import cell_rows, table_lines
    from spf.bench.report import collect
    from spf.io import save_json

    try:
        rows = cell_rows(cfg, collect(cfg)["cells"], args.a, args.b)
    except KeyError as exc:
        print(f"spf: error: {cfg.source}: {exc.args[0]}", file=sys.stderr)
        return 2
    if not rows:
        print(f"spf: error: {args.a} and {args.b} share no step, suite and seed to pair", file=sys.stderr)
        return 2
    print("\n".join(table_lines(rows, cfg.noninferiority_margin)))
    if args.json:
        out = {"config": cfg.source, "seeds": cfg.seeds, "a": args.a, "b": args.b,
               "rows": [asdict(r) for r in rows]}  # fmt: skip
        save_json(out, Path(args.json), tracked_ok=True)  # e.g. docs/results/*.json, asked for by name
        print(f"wrote {args.json}")
    return 0
