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

__all__ = ["ALIASES", "PREFIXES", "RENAME", "add_arguments", "run", "train_config", "train_flags"]

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


def _load_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"--config {path}: file not found") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(text)
        else:
            loaded = json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError
        raise UsageError(f"--config {path}: not valid JSON ({exc})") from None
    except Exception as exc:  # yaml.YAMLError (yaml is imported lazily, so no name to catch)
        if type(exc).__module__.startswith("yaml"):
            # one line, as every spf error: the mark's line and the parser's short complaint
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UsageError(f"--config {path}{where}: not valid YAML ({problem})") from None
        raise
    if not isinstance(loaded, dict):
        raise UsageError(f"{path}: expected a mapping of TrainConfig fields")
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
    cfg = _load_config_file(config) if config is not None else {}
    cfg = _merge(cfg, nested_values(args, flags))
    missing = [k for k in _REQUIRED if not cfg.get(k)]
    if missing:
        names = ", ".join(next(f.flags[0] for f in flags if f.key == m) for m in missing)
        raise UsageError(f"missing required option(s): {names}")
    typed = typed_flags(args)
    by_key = {f.key: typed[f.dest] for f in flags if f.dest in typed}
    try:
        return TrainConfig.from_dict(cfg)
    except ValueError as exc:
        raise _explain(exc, by_key, config) from exc
    except TypeError as exc:
        # flags are typed by argparse, so only a --config file can hand a field the wrong type
        if config is None:
            raise
        raise UsageError(f"{config}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    from spf.training.loop import train

    cfg = train_config(args)
    result = train(cfg)
    # CLI output, not logging: the summary is the command's result
    print(json.dumps(result.metrics["summary"], indent=2))
    print(f"wrote {result.out}")
    return 0
