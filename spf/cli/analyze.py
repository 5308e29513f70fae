"""``spf analyze``: insights I–III on a model → ``analysis.json``, PNG figures and ``summary.md``.

The measurement is :func:`spf.analysis.measure.run_analysis`; this module maps flags onto it. Every input
is checked before the model is loaded, and nothing is written on error.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path

from spf.cli.args import count, finite_float, positive_int
from spf.cli.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run"]

_POSITIVE = ("n_utility", "match_pool", "max_k", "rank", "n_singles", "layer_stride", "max_length")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``spf analyze`` (``--threads``/``--device``/``-v`` come from the CLI's common options)."""
    from spf.analysis.measure import UTILITY_TASKS

    p = parser
    p.add_argument("--model", help="smollm2-135m-instruct | local folder | hub id | tiny-llama (required)")
    p.add_argument("--safety", help="(harmful prompt, refusal) pairs, JSON/JSONL/CSV/TSV (required)")
    p.add_argument("--utility", default=",".join(UTILITY_TASKS), help="comma-separated tasks (shared data)")
    p.add_argument(
        "--utility-file", action="append", default=[], metavar="NAME=PATH", help="utility task from a file"
    )
    p.add_argument(
        "--n-utility", type=positive_int, default=100, help="utility samples per task for the cosines"
    )
    p.add_argument(
        "--match-pool", type=positive_int, default=1000, help="candidates per task for token matching"
    )
    p.add_argument("--batch-sizes", default="1,4,16,64", help="safety batch sizes (overlap and batch CER)")
    p.add_argument("--max-k", type=positive_int, default=50, help="CER(k) for k = 1..max-k")
    p.add_argument("--rank", type=positive_int, default=8, help="k of the overlap φ@k")
    p.add_argument("--n-singles", type=positive_int, default=8, help="single safety samples compared")
    p.add_argument("--modules", nargs="*", default=None, help="module names or globs (default: all linears)")
    p.add_argument("--layer-stride", type=positive_int, default=1, help="keep every N-th decoder layer")
    p.add_argument("--max-length", type=count(2), default=512)
    p.add_argument(
        "--tolerance", type=finite_float(0.0), default=0.1, help="relative token-count tolerance of matching"
    )
    p.add_argument("--shared-data", default=None, help="public data folder (default: ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder: analysis.json, PNGs, summary.md (required)")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text[:60]!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag}: expected positive integers, got {text[:60]!r}")
    return values


def _utility_files(specs: list[str]) -> dict[str, str]:
    from spf.data.samples import DataError

    files: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UsageError(f"--utility-file: expected NAME=PATH, got {spec[:80]!r}")
        if not Path(path).is_file():
            raise DataError(f"--utility-file {name}: {path}: file not found")
        files[name.strip()] = path.strip()
    return files


def _check_flags(args: argparse.Namespace) -> list[int]:
    """Flag checks that need no file; returns the batch sizes."""
    missing = [f"--{k}" for k in ("model", "safety", "out") if getattr(args, k) is None]
    if missing:
        raise UsageError(f"{', '.join(missing)} required (or run the pipeline stage with --params FILE)")
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    for flag in _POSITIVE:
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be ≥ 1, got {getattr(args, flag)}")
    if not 0 <= args.tolerance < 1:
        raise UsageError(f"--tolerance must be in [0, 1), got {args.tolerance}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    return batch_sizes


def _meta(args: argparse.Namespace, files: dict[str, str]) -> dict:
    """What the analysis records about how it was asked for (``config`` in analysis.json)."""
    return {
        "model": args.model,
        "safety": str(args.safety),
        "utility_files": {k: str(v) for k, v in files.items()},
        "layer_stride": args.layer_stride,
        "module_patterns": args.modules,
        "threads": args.threads,
        "seed": args.seed,
        "match_pool": args.match_pool,
    }


def run(args: argparse.Namespace) -> int:
    """``spf analyze``: check every input, load the model, measure, write the folder, print the headlines."""
    import torch

    from spf.analysis.measure import (
        AnalyzeSettings,
        analysis_summary,
        load_utility,
        run_analysis,
        select_modules,
        write_analysis,
    )
    from spf.data.samples import load_samples
    from spf.models import load_model

    batch_sizes = _check_flags(args)
    files = _utility_files(args.utility_file)
    tasks = [t.strip() for t in args.utility.split(",") if t.strip()]
    if not tasks and not files:
        raise UsageError("no utility task: give --utility and/or --utility-file")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("spf analyze draws its figures with matplotlib: pip install 'spf[analysis]'")
    safety = load_samples(args.safety, require_response=True)
    n_pool = max(args.n_utility, args.match_pool)
    try:  # an unknown task name is the user's
        utility = load_utility(tasks, files=files, shared_data=args.shared_data, n=n_pool, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    from spf.io import claim_output

    inputs = {"--model": args.model, "--safety": args.safety, "--utility-file": list(files.values())}
    with claim_output(args.out, inputs=inputs):  # checked before the model load; one writer until published
        if args.threads:
            torch.set_num_threads(args.threads)
        model, tok = load_model(args.model, device=args.device)
        try:  # --modules patterns that match nothing
            modules = select_modules(model, args.modules, layer_stride=args.layer_stride)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        logger.info(
            "analysing %d modules with %d safety samples, utility %s",
            len(modules),
            len(safety),
            {t: len(s) for t, s in utility.items()},
        )
        settings = AnalyzeSettings(
            n_utility=args.n_utility,
            batch_sizes=batch_sizes,
            max_k=args.max_k,
            rank=args.rank,
            n_singles=args.n_singles,
            modules=modules,
            max_length=args.max_length,
            tolerance=args.tolerance,
        )
        analysis = run_analysis(model, tok, safety, utility, settings, meta=_meta(args, files))
        out = write_analysis(analysis, args.out)
    for line in analysis_summary(analysis):
        print(line)
    print(f"wrote {out}/analysis.json, summary.md and {len(analysis['figures'])} figures")
    return 0
