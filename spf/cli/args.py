"""Command-line flags generated from config dataclasses, so a new config field is a new flag with no
hand-kept table to forget (the way PEFT, TRL and litgpt derive their CLIs).

Each field becomes ``--name`` (``_`` → ``-``; a nested dataclass's fields get its section prefix): ``int``,
``float`` and ``str`` are argparse types, a ``Literal`` gives choices, ``bool`` gives ``--x/--no-x``, a
``list[str]`` takes one or more values, ``X | None`` also accepts ``none``. Help comes from
``field(metadata={"help": ...})`` plus the default. Flags default to *absent* (``argparse.SUPPRESS``), so
the namespace holds only what the user typed, and each generated action records the spelling typed: an
error found later by the config's validation can then name the flag the user wrote, not the dotted key.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FieldFlag",
    "add_dataclass_arguments",
    "count",
    "dataclass_flags",
    "device",
    "finite_float",
    "nested_values",
    "non_negative_int",
    "positive_int",
    "typed_flags",
]

# the namespace attribute where generated actions record {dest: option string typed}
_TYPED = "_typed_flags"
_NONE_WORDS = ("none", "null")


@dataclass(frozen=True)
class FieldFlag:
    """One generated flag: the dotted config key it sets and its option strings (the first is canonical)."""

    key: str  # "lora.r", "steps"
    flags: tuple[str, ...]  # ("--lora-r",)
    dest: str  # argparse dest: the key with "." → "__", unique and reversible


def _record(namespace: argparse.Namespace, dest: str, option_string: str | None) -> None:
    typed = getattr(namespace, _TYPED, None)
    if typed is None:
        typed = {}
        setattr(namespace, _TYPED, typed)
    typed[dest] = option_string


class _Store(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _record(namespace, self.dest, option_string)


class _Flag(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _record(namespace, self.dest, option_string)


def typed_flags(namespace: argparse.Namespace) -> dict[str, str]:
    """``{dest: the option string the user typed}`` for every generated flag given on the command line."""
    return dict(getattr(namespace, _TYPED, None) or {})


def _optional(scalar: type) -> Any:
    """argparse type for ``X | None``: ``none``/``null`` → None, anything else parsed as X."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() in _NONE_WORDS else scalar(text)

    parse.__name__ = scalar.__name__  # argparse names the type in "invalid int value: 'x'"
    return parse


# ------------------------------------------------------------------- argparse types of the other commands
# A count or size flag is checked when it is parsed, so `--n -5` is an error naming the flag (argparse:
# "argument --n: must be an integer ≥ 1, got -5"), never a slice that keeps all but the last five rows.
# (`spf train`'s flags are generated from TrainConfig and checked there: one path with --config and
# params.yaml.)


def count(low: int) -> Any:
    """An argparse type: an integer ≥ ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {low}, got {text[:40]!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {low}, got {text[:40]}")
        return value

    parse.__name__ = "int"
    return parse


positive_int = count(1)
non_negative_int = count(0)  # where 0 means "off"


def finite_float(low: float | None = None, high: float | None = None) -> Any:
    """An argparse type: a finite float in [``low``, ``high``] (either bound optional); NaN and inf never."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text[:40]!r}") from None
        lo, hi = "-inf" if low is None else low, "inf" if high is None else high
        if (
            not math.isfinite(value)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            raise argparse.ArgumentTypeError(f"must be a finite number in [{lo}, {hi}], got {text[:40]}")
        return value

    parse.__name__ = "float"
    return parse


def device(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, present on this machine (TrainConfig's check)."""
    from spf.training.config import check_device

    try:
        check_device("device", text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).partition(": ")[2]) from None
    return text


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _argparse_kwargs(tp: Any, where: str) -> dict[str, Any]:
    """argparse keywords for a field of type ``tp``; a type we cannot map is a bug in the config, loudly."""
    inner, optional = _unwrap_optional(tp)
    if inner is bool:
        return {"action": _Flag}
    if typing.get_origin(inner) is typing.Literal:
        choices = list(typing.get_args(inner))
        return {"action": _Store, "choices": choices, "type": type(choices[0])}
    if typing.get_origin(inner) is list and typing.get_args(inner) in ((str,), (int,), (float,)):
        return {"action": _Store, "nargs": "+", "type": typing.get_args(inner)[0]}
    if inner in (int, float, str):
        # a None-able path stays a plain string: "none" could be a file name
        return {"action": _Store, "type": _optional(inner) if optional and inner is not str else inner}
    raise TypeError(f"{where}: no command-line form for type {tp!r}; add one in spf/cli/args.py")


def _default_text(f: dataclasses.Field) -> str | None:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return None  # required
    if isinstance(value, list):
        return " ".join(map(str, value)) or "[]"
    return str(value)


def _help(f: dataclasses.Field, kwargs: dict[str, Any]) -> str:
    text = f.metadata.get("help", "")
    default = _default_text(f)
    suffix = "required" if default is None else f"default: {default}"
    # argparse %-formats help strings
    return (f"{text} ({suffix})" if text else f"({suffix})").replace("%", "%%")


def dataclass_flags(
    cls: type,
    *,
    prefixes: Mapping[str, str] | None = None,
    rename: Mapping[str, str] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
    _section: str = "",
) -> list[tuple[FieldFlag, dataclasses.Field, Any]]:
    """Walk ``cls`` (and its nested dataclass fields) into ``(flag, field, type)`` triples.

    ``prefixes``: section → flag prefix (``{"lora": "lora-"}``; default: the section name and a dash);
    ``rename``: dotted key → flag name without dashes (``{"spf.sample": "safety-sample"}``);
    ``aliases``: dotted key → extra option strings (``{"lr": ["--learning_rate"]}``)."""
    prefixes, rename, aliases = prefixes or {}, rename or {}, aliases or {}
    hints = typing.get_type_hints(cls)
    out: list[tuple[FieldFlag, dataclasses.Field, Any]] = []
    for f in dataclasses.fields(cls):
        key = f"{_section}.{f.name}" if _section else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += dataclass_flags(tp, prefixes=prefixes, rename=rename, aliases=aliases, _section=key)
            continue
        prefix = prefixes.get(_section, f"{_section}-") if _section else ""
        name = rename.get(key, prefix + f.name.replace("_", "-"))
        flags = (f"--{name}", *(a for a in aliases.get(key, ()) if a != f"--{name}"))
        out.append((FieldFlag(key, flags, key.replace(".", "__")), f, tp))
    return out


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, **naming: Any
) -> list[FieldFlag]:
    """Add one flag per field of ``cls`` (see :func:`dataclass_flags` for ``naming``); returns them."""
    flags = []
    for flag, f, tp in dataclass_flags(cls, **naming):
        kwargs = _argparse_kwargs(tp, f"{cls.__name__}.{flag.key}")
        metavar = (
            None if "choices" in kwargs or kwargs["action"] is _Flag else flag.key.rsplit(".", 1)[-1].upper()
        )
        parser.add_argument(
            *flag.flags,
            dest=flag.dest,
            default=argparse.SUPPRESS,
            help=_help(f, kwargs),
            **({"metavar": metavar} if metavar else {}),
            **kwargs,
        )
        flags.append(flag)
    return flags


def nested_values(namespace: argparse.Namespace, flags: Sequence[FieldFlag]) -> dict[str, Any]:
    """The typed flags as a nested dict (``{"lora": {"r": 4}, "steps": 3}``), ready to merge into a config."""
    out: dict[str, Any] = {}
    for flag in flags:
        if not hasattr(namespace, flag.dest):
            continue  # not typed (the default is the dataclass's own)
        *sections, name = flag.key.split(".")
        node = out
        for s in sections:
            node = node.setdefault(s, {})
        node[name] = getattr(namespace, flag.dest)
    return out
