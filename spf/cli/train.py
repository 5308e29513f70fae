"""``spf train``: every flag is generated from :class:`spf.training.config.TrainConfig` and its sections.

Flat fields are ``--steps``, ``--batch-size``, …; ``lora.*`` is ``--lora-*``, ``unlikelihood.*`` is
``--unlikelihood-*``; the SPF and baseline knobs keep their historical flat names (``--rank`` is
``spf.rank``, ``--safety-sample`` is ``spf.sample``, ``--lisa-rho`` is ``baselines.lisa_rho``). HF-style
spellings (``--learning_rate``, ``--max_steps``, …) are aliases of the same flags. ``--config FILE``
(YAML/JSON, TrainConfig's nested shape) gives the base values; flags override it.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from spf.cli.args import FieldFlag, add_dataclass_arguments, nested_values, typed_flags
from spf.cli.errors import UsageError

__all__ = [
    "ALIASES",
    "PREFIXES",
    "RENAME",
    "add_arguments",
    "load_config_file",
    "run",
    "train_config",
    "train_flags",
]

# section → flag prefix. "" for spf and baselines: their flags predate the generator (scripts use them)
# and their names are unambiguous without one.
PREFIXES = {"lora": "lora-", "spf": "", "unlikelihood": "unlikelihood-", "baselines": ""}
# historical flag names that differ from the field name
RENAME = {"spf.sample": "safety-sample", "limit_data": "limit"}
# extra spellings: the Hugging Face TrainingArguments names, so a TRL/Trainer command line mostly works
ALIASES = {
    "lr": ["--learning_rate"],
    "steps": ["--max_steps"],
    "out": ["--output_dir"],
    "batch_size": ["--per_device_train_batch_size"],
    "grad_accum": ["--gradient_accumulation_steps"],
    "seed": ["--seed"],
    "model": ["--model_name_or_path"],
    "limit_data": ["--limit-data"],
}
_REQUIRED = ("model", "data", "out")
_FLAGS_ATTR = "_train_flags"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spf.training.config import TrainConfig

    parser.add_argument("--config", default=None, help="YAML/JSON with TrainConfig fields; flags override it")
    flags = add_dataclass_arguments(parser, TrainConfig, prefixes=PREFIXES, rename=RENAME, aliases=ALIASES)
    parser.set_defaults(**{_FLAGS_ATTR: flags})


def train_flags() -> list[FieldFlag]:
    """The generated flags, without building a parser (for tests and docs)."""
    from spf.cli.args import dataclass_flags
    from spf.training.config import TrainConfig

    return [f for f, _, _ in dataclass_flags(TrainConfig, prefixes=PREFIXES, rename=RENAME, aliases=ALIASES)]


def load_config_file(path: Path) -> dict[str, Any]:
    """A ``--config`` file (strict YAML or JSON: no duplicate keys, aliases, NaN, empty document; at most
    1 MiB) as one mapping of TrainConfig fields; UsageError naming the file and line otherwise."""
    from spf.loaders import ConfigFileError
    from spf.loaders import load_config_file as read

    try:
        loaded = read(path)
    except ConfigFileError as exc:
        raise UsageError(f"--config {exc}") from None
    if not isinstance(loaded, dict):
        from spf.training.config import shown

        raise UsageError(f"--config {path}: expected a mapping of TrainConfig fields, got {shown(loaded)}")
    return loaded


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _explain(exc: Exception, by_key: dict[str, str], config: Path | None) -> UsageError:
    """The config's validation message, speaking the user's language: ``lora.r: must be ≥ 1`` becomes
    ``--lora-r: must be ≥ 1`` when the value came from that flag, ``FILE: lora.r: …`` when it came from
    --config; other keys the message mentions get their flag in brackets (``spf.subspace (--subspace)``)."""
    message = str(exc)
    key, sep, rest = message.partition(": ")
    if not (sep and re.fullmatch(r"[a-z_][\w.]*", key)):
        key, rest = "", message  # a cross-field message, not "key: problem"
    canonical = {f.key: f.flags[0] for f in train_flags()}

    def hint(m: re.Match[str]) -> str:
        flag = canonical.get(m.group(0))
        return f"{m.group(0)} ({flag})" if flag else m.group(0)

    # dotted keys only: a bare word such as "method" is ordinary prose in these messages
    rest = re.sub(r"(?<![\w.-])[a-z_]+\.[a-z_]+(?![\w.])", hint, rest)
    # "ignored as finetune=full" → "ignored as --finetune full": the spelling of the command line
    rest = re.sub(
        r"(?<![\w.-])([a-z_]+)=([\w.-]+)",
        lambda m: f"{canonical[m[1]]} {m[2]}" if m[1] in canonical else m[0],
        rest,
    )
    if key in by_key:
        return UsageError(f"{by_key[key]}: {rest}")
    if key:
        return UsageError(f"{config}: {key}: {rest}" if config is not None else f"{key}: {rest}")
    if config is not None and rest.startswith("unknown"):  # flags cannot name an unknown option
        return UsageError(f"{config}: {rest}")
    return UsageError(rest)


def train_config(args: argparse.Namespace):
    """The :class:`TrainConfig` for parsed ``spf train`` arguments (the --config file, then the flags)."""
    from spf.training.config import TrainConfig

    flags: list[FieldFlag] = getattr(args, _FLAGS_ATTR, None) or train_flags()
    config = Path(args.config) if getattr(args, "config", None) else None
    cfg = load_config_file(config) if config is not None else {}
    cfg = _merge(cfg, nested_values(args, flags))
    missing = [k for k in _REQUIRED if not cfg.get(k)]
    if missing:
        names = ", ".join(next(f.flags[0] for f in flags if f.key == m) for m in missing)
        raise UsageError(f"missing required option(s): {names}")
    typed = typed_flags(args)
    by_key = {f.key: typed[f.dest] for f in flags if f.dest in typed}
    try:
        return TrainConfig.from_dict(cfg)
    except ValueError as exc:  # every check lives in TrainConfig (types, ranges, unused settings)
        raise _explain(exc, by_key, config) from None


def run(args: argparse.Namespace) -> int:
    from spf.training.loop import train

    cfg = train_config(args)
    result = train(cfg)
    # CLI output, not logging: the summary is the command's result
    print(json.dumps(result.metrics["summary"], indent=2))
    print(f"wrote {result.out}")
    return 0
