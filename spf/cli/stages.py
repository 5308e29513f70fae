"""The pipeline stages (what dvc.yaml runs): ``spf <stage> --params params.yaml [-S key=value …]``.

Every knob comes from the parameter file; ``-S`` overrides one. ``prepare``, ``finetune`` and ``evaluate``
exist only as stages; ``align``, ``estimate`` and ``analyze`` are also stand-alone commands and run as the
stage when ``--params`` is given (their other options are then ignored).
"""

from __future__ import annotations

import argparse
import json

__all__ = ["add_arguments", "add_params_arguments", "run"]


def add_params_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--params",
        required=required,
        help="pipeline parameter file (params.yaml): run this as a pipeline stage"
        + ("" if required else "; other options are then ignored"),
    )
    parser.add_argument(
        "-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The stage-only commands: ``--params`` is required."""
    add_params_arguments(parser, required=True)


def run(args: argparse.Namespace) -> int:
    from spf.pipeline.params import load_params
    from spf.pipeline.stages import run_stage

    params = load_params(args.params, args.set)
    summary = run_stage(args.command, params)
    # CLI output: the stage's summary is its result (dvc and the Prefect tasks read the files instead)
    print(json.dumps(summary, indent=2, default=str))
    return 0
