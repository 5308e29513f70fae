"""Which exceptions are the user's to fix, and how the CLI reports them.

A user error (bad file, unknown model, a flag out of range, a prompt the model does not refuse) is printed
as one line ``spf: error: …`` with exit status 2. A training run aborted on a fault is ``spf: aborted: …``
with status 3. Everything else is a bug in spf and keeps its traceback (status 1): reporting an internal
``ValueError`` as "bad input" would send the user hunting for a mistake they did not make.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = ["USER_ERROR_NAMES", "UsageError", "is_user_error", "report"]


class UsageError(ValueError):
    """A command was called wrongly: a missing option, a flag's value out of range, a bad --config file.

    A ValueError, so library code that already catches ValueError for bad values keeps working."""


# The project's user-error types, by class name. They are matched by name on the exception's MRO (classes
# under ``spf.``) rather than imported: classifying an error must not import the libraries that define
# them (torch, transformers), and during the layer refactor a class may move between modules.
USER_ERROR_NAMES = frozenset(
    {
        "UsageError",
        "DataError",
        "ParamsError",
        "ModelLoadError",
        "JudgeError",
        "NotRefusedError",
        "BenchConfigError",
        "ConfigFileError",
        "OutputError",
    }
)


def _is_spf_class(exc: BaseException, names: frozenset[str] | set[str]) -> bool:
    return any(c.__name__ in names and c.__module__.startswith("spf.") for c in type(exc).__mro__)


def _names_user_file(exc: FileNotFoundError, argv: list[str]) -> bool:
    """A missing file is the user's when our code raised it with a message (no errno: a deliberate
    "X does not exist"), or when the OS reports a path the user typed on the command line."""
    if exc.errno is None:
        return True
    if exc.filename is None:
        return False
    missing = Path(str(exc.filename))
    for token in argv:
        value = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
        if value and not value.startswith("-") and (Path(value) == missing or _same_path(value, missing)):
            return True
    return False


def _same_path(value: str, missing: Path) -> bool:
    try:
        return Path(value).resolve() == missing.resolve()
    except (OSError, RuntimeError):  # a token that is not a path at all
        return False


def _speaks_of_the_command_line(exc: ValueError, argv: list[str], options: Iterable[str]) -> bool:
    """A plain ValueError is the user's when its message names one of the command's flags (only messages
    written for the user talk about ``--flags``: ``--batch-sizes: expected integers``) or quotes a value
    the user typed (``unknown suite 'harmfull'``). An internal failure ("shapes (3, 4) and (5,) not
    aligned") does neither, and keeps its traceback."""
    message = str(exc)
    flags = {o for o in options if o.startswith("--")}
    named = re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*", message)
    if any(flag in flags for flag in named):
        return True
    values = {t.split("=", 1)[-1] for t in argv if len(t) > 1 and not t.startswith("-")}
    values |= {t.split("=", 1)[1] for t in argv if t.startswith("--") and "=" in t}
    return any(f"'{v}'" in message or f'"{v}"' in message for v in values if v)


def is_user_error(exc: BaseException, argv: list[str], options: Iterable[str] = ()) -> bool:
    """True when ``exc`` reports a problem with the user's input rather than a bug in spf; ``options``
    are the option strings of the command that ran."""
    if isinstance(exc, UsageError) or _is_spf_class(exc, USER_ERROR_NAMES):
        return True
    if isinstance(exc, FileNotFoundError):
        return _names_user_file(exc, argv)
    return isinstance(exc, ValueError) and _speaks_of_the_command_line(exc, argv, options)


def report(exc: BaseException, argv: list[str], options: Iterable[str] = ()) -> int | None:
    """Print the one-line report for a user error or an aborted run and return its exit status; ``None``
    for anything else (the caller re-raises it, traceback and all)."""
    if _is_spf_class(exc, {"TrainingAborted"}):
        path = getattr(exc, "path", None)
        where = f" ({path})" if path is not None else ""
        reason, step = getattr(exc, "reason", str(exc)), getattr(exc, "step", "?")
        print(f"spf: aborted: {reason} at step {step}{where}", file=sys.stderr)
        return 3
    if is_user_error(exc, argv, options):
        print(f"spf: error: {exc}", file=sys.stderr)
        return 2
    return None
