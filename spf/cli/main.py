"""``spf`` command line: ``estimate``, ``train``, ``data``, ``eval``, ``align``, ``analyze``, ``bench`` and the
pipeline stages (``prepare``, ``align``, ``estimate``, ``analyze``, ``finetune``, ``evaluate`` with
``--params params.yaml``).

One table maps each command to the module that defines it (``add_arguments(parser)`` and
``run(args) -> int``). A command's module is imported only when that command is parsed, so ``spf --help``
loads neither torch nor transformers and answers at once.

Errors a user can fix (bad file, unknown model, a prompt the model does not refuse) print one line
``spf: error: …`` and exit with status 2; nothing partial is written. A training run aborted on a fault
(non-finite loss or gradient, safety-loss drift past ``abort_safety_rise``) prints ``spf: aborted: …`` and
exits with status 3, leaving ``abort.json`` and no finished adapter. Anything else is a bug and raises
with its traceback (see :mod:`spf.cli.errors`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass

from spf.cli.args import device, positive_int
from spf.cli.errors import report

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    help: str
    module: str  # defines add_arguments(parser) and run(args) -> int
    common: bool = False  # add --threads / --device / -v (those the module does not define itself)
    # None: no pipeline form; False: optional --params (the stage form); True: --params required
    params: bool | None = None


COMMANDS: dict[str, Command] = {
    "estimate": Command(
        "estimate the safety subspace from one (harmful prompt, refusal) sample",
        "spf.cli.estimate",
        common=True,
        params=False,
    ),
    "train": Command(
        "fine-tune (vanilla, SPF or a baseline defense) with LoRA or full fine-tuning",
        "spf.cli.train",
        common=True,
    ),
    "data": Command("build fine-tuning datasets (threat scenarios) from public sources", "spf.cli.data"),
    "eval": Command(
        "safety / utility evaluation → results.json + samples.jsonl", "spf.cli.eval", common=True
    ),
    "align": Command(
        "make a safety-aligned base model (LoRA SFT merged into full weights)", "spf.cli.align", params=False
    ),
    "analyze": Command(
        "insights I-III: CER, cosine, overlap → analysis.json + PNGs",
        "spf.cli.analyze",
        common=True,
        params=False,
    ),
    "judge": Command(
        "judge (prompt, response) pairs: refused / harmful / score → DIR/verdicts.jsonl",
        "spf.cli.judge",
        common=True,
    ),
    "bench": Command("every defense × threat scenario (+ ablations) → docs/results.md", "spf.cli.bench"),
    # Pipeline stages (what dvc.yaml runs): every knob comes from params.yaml; `-S key=value` overrides.
    "prepare": Command(
        "pipeline stage: fine-tuning data, safety samples, held-out harmful prompts",
        "spf.cli.stages",
        params=True,
    ),
    "finetune": Command(
        "pipeline stage: vanilla/SPF fine-tuning of the aligned base", "spf.cli.stages", params=True
    ),
    "evaluate": Command(
        "pipeline stage: safety + utility evaluation of the fine-tuned model", "spf.cli.stages", params=True
    ),
}


def resolve(name: str) -> tuple[Callable[[argparse.ArgumentParser], None], Run]:
    """``(add_arguments, run)`` of command ``name``, importing its module now."""
    mod = importlib.import_module(COMMANDS[name].module)
    return mod.add_arguments, mod.run


def _add_common(p: argparse.ArgumentParser) -> None:
    have = p._option_string_actions  # a module may define --threads/--device itself (train: from its config)
    if "--threads" not in have:
        p.add_argument(
            "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
        )
    if "--device" not in have:
        p.add_argument(
            "--device",
            type=device,
            default=None,
            help="cpu | cuda | cuda:N | mps (default: cuda when present)",
        )
    if "--verbose" not in have:
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def populate(name: str, parser: argparse.ArgumentParser) -> None:
    """Add command ``name``'s options to its sub-parser (once)."""
    if getattr(parser, "_spf_populated", False):
        return
    parser._spf_populated = True  # type: ignore[attr-defined]
    cmd = COMMANDS[name]
    add_arguments, _ = resolve(name)
    add_arguments(parser)
    if cmd.common:
        _add_common(parser)
    if cmd.params is False:  # the stage-only commands' module adds a required --params itself
        from spf.cli.stages import add_params_arguments

        add_params_arguments(parser, required=False)


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its errors on one line, as every other spf error (no usage block; the
    sub-parsers inherit it): ``spf data: error: argument --n: must be an integer ≥ 1, got -5``."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _LazySubParsers(argparse._SubParsersAction):
    """Sub-parsers whose options are added when the command is chosen: building every command's
    options would import every library (torch, transformers) just to print ``spf --help``."""

    def __call__(self, parser, namespace, values, option_string=None):
        name = values[0]
        if name in self._name_parser_map and name in COMMANDS:
            populate(name, self._name_parser_map[name])
        super().__call__(parser, namespace, values, option_string)


class _Version(argparse.Action):
    """``--version``, looked up only when asked (importlib.metadata scans the installed distributions)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"spf {version()}")  # stdout, as argparse's own version action
        parser.exit()


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("spf")
    except PackageNotFoundError:  # run from a source tree that is not installed
        import spf

        return spf.__version__


def build_parser() -> argparse.ArgumentParser:
    """The ``spf`` parser; each command's options are added when it is parsed (see :func:`populate`)."""
    parser = _Parser(prog="spf", description="Safety-preserving fine-tuning")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", action=_LazySubParsers)
    for name, cmd in COMMANDS.items():
        sub.add_parser(name, help=cmd.help, description=cmd.help)
    return parser


_build_parser = build_parser  # the name tests and scripts used before the table


def _train_config(args: argparse.Namespace):
    """``spf train``'s TrainConfig for parsed arguments (kept here for callers of the old name)."""
    from spf.cli.train import train_config

    return train_config(args)


class _TqdmHandler(logging.Handler):
    """Log lines through ``tqdm.write``, so a line printed during training does not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never take the command down
            self.handleError(record)


def _configure_logging(verbose: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    # basicConfig leaves a logging setup the caller already made (pytest, an embedding script) alone
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def _runner(args: argparse.Namespace) -> Run:
    if getattr(args, "params", None):  # the pipeline-stage form of align / estimate / analyze
        from spf.cli.stages import run

        return run
    return resolve(args.command)[1]


def _options(parser: argparse.ArgumentParser, command: str) -> list[str]:
    """The option strings of ``command``'s sub-parser (what an error message may name)."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return list(action.choices[command]._option_string_actions)
    return []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(getattr(args, "verbose", False))
    run = _runner(args)
    try:
        return run(args)
    except Exception as exc:
        code = report(exc, argv, _options(parser, args.command))
        if code is None:
            raise  # a bug: keep the traceback
        return code


if __name__ == "__main__":
    sys.exit(main())
