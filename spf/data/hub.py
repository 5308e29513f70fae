"""``datasets`` as the data layer: our samples as a ``datasets.Dataset`` and any Dataset as our samples.

A source :func:`spf.data.samples.load_samples` reads may be a data file (JSON/JSONL/CSV/TSV, our own
reader), a ``datasets.Dataset`` (a ``DatasetDict`` must name its split), a local dataset folder (written by
``Dataset.save_to_disk``, or a folder of data files laid out as a hub repository — both read by
``datasets``), or a hub id ``owner/name[:config]`` (``nyu-mll/glue:sst2``, ``walledai/AdvBench``), fetched by
``datasets.load_dataset`` when online; offline it fails with the local alternative named.

Every row goes through the same checks as a file's records (types, chat markers, lone surrogates,
per-record size) and an error names the row and field (``nyu-mll/glue:sst2[train]:row 17: field
'sentence': …``). Files stay with our reader, for one reason: ``datasets``' JSON (pyarrow) and CSV (pandas)
readers coerce values (``"007"`` → 7, an empty cell → NaN), keep the last of two duplicate keys and report a
bad record by byte block, not by line and field.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spf.data.files import DataError, check_value, max_line_bytes

if TYPE_CHECKING:  # datasets imports pyarrow and pandas: loaded only when a Dataset is used
    from datasets import Dataset

    from spf.data.samples import ChatSample

logger = logging.getLogger(__name__)

__all__ = ["LOCAL_ALTERNATIVES", "is_dataset", "is_hub_id", "iter_dataset", "load_source", "to_dataset"]

# owner/name[:config]: the hub's repository-id rules (letters, digits, - _ .), one optional config
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*(?::[\w.-]+)?$")
# what to use instead when the hub cannot be reached (`spf data` builds these from the public data folder)
LOCAL_ALTERNATIVES: dict[str, str] = {
    "glue": "`spf data sst2 --out sst2.jsonl`",
    "sst2": "`spf data sst2 --out sst2.jsonl`",
    "ag_news": "`spf data agnews --out agnews.jsonl`",
    "gsm8k": "`spf data gsm8k --out gsm8k.jsonl`",
    "advbench": "the shipped prompts spf/data/heldout_harmful.jsonl, or `spf data harmful-answers`",
}


def is_dataset(value: Any) -> bool:
    """A ``datasets.Dataset`` / ``DatasetDict``, without importing ``datasets`` for a plain path."""
    return type(value).__module__.startswith("datasets.")


def is_hub_id(source: str | Path) -> bool:
    """A string that names no local file or folder and reads as ``owner/name[:config]``."""
    text = str(source)
    return not Path(text).exists() and Path(text).suffix.lower() not in {".json", ".jsonl", ".csv", ".tsv"} and (
        _HUB_ID.match(text) is not None
    )  # fmt: skip


def _alternative(hub_id: str) -> str:
    name = hub_id.split(":", 1)[0].rsplit("/", 1)[-1].lower()
    config = hub_id.split(":", 1)[1].lower() if ":" in hub_id else ""
    hint = LOCAL_ALTERNATIVES.get(config) or LOCAL_ALTERNATIVES.get(name)
    return f"use a local copy instead: {hint}" if hint else "use a local file (JSON/JSONL/CSV/TSV) instead"


def load_hub(hub_id: str, split: str = "train", *, revision: str | None = None) -> Dataset:
    """``datasets.load_dataset(owner/name, config, split=…)``; any failure (offline, no network, no such
    dataset or split) is a :class:`DataError` naming the id and a local alternative."""
    import datasets

    name, _, config = hub_id.partition(":")
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    try:
        return datasets.load_dataset(name, config or None, split=split, revision=revision)
    except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, ValueError, hub errors…
        why = "offline (HF_HUB_OFFLINE=1)" if offline else f"{type(err).__name__}: {str(err)[:300]}"
        raise DataError(
            f"{hub_id}: could not load this dataset from the Hugging Face Hub ({why}); {_alternative(hub_id)}. "
            "If you meant a local file, it does not exist"
        ) from err


def load_folder(path: Path, split: str = "train") -> Dataset:
    """A ``save_to_disk`` folder (``load_from_disk``) or a folder of data files (``load_dataset``)."""
    import datasets

    saved = (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
    try:
        ds = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path), split=split)
    except Exception as err:
        raise DataError(
            f"{path}: not a dataset folder datasets can read ({type(err).__name__}: {err})"
        ) from err
    return ds


def pick_split(ds: Any, name: str, split: str) -> Dataset:
    if hasattr(ds, "column_names") and not isinstance(ds.column_names, dict):
        return ds
    if split not in ds:
        raise DataError(f"{name}: no split {split!r} (splits: {sorted(ds)})")
    return ds[split]


def load_source(source: Any, split: str = "train") -> tuple[str, Dataset] | None:
    """``(name, Dataset)`` for a Dataset, a dataset folder or a hub id; ``None`` for a data file."""
    if is_dataset(source):
        name = "dataset"
        return name, pick_split(source, name, split)
    path = Path(str(source))
    if path.is_dir():
        return f"{path.name}[{split}]", pick_split(load_folder(path, split), path.name, split)
    if is_hub_id(source):
        return f"{source}[{split}]", load_hub(str(source), split)
    return None


def iter_dataset(ds: Dataset, name: str = "dataset") -> Iterator[tuple[str, Any]]:
    """``(NAME:row I, row)`` for each row, checked like a file's records; ``I`` is the row's index in ``ds``.

    A column a row has no value in (``None``, as Arrow fills a key another row lacks) is left out of it,
    so a mixed file's rows read the way its records did."""
    limit = max_line_bytes()
    for i, row in enumerate(ds):
        where = f"{name}:row {i}"
        record = {k: v for k, v in row.items() if v is not None}
        if check_value(where, record) > limit:
            raise DataError(f"{where}: holds more than {limit} characters of text, over the per-record limit")
        yield where, record


def to_dataset(samples: Sequence[ChatSample]) -> Dataset:
    """Samples as a ``datasets.Dataset`` with columns ``messages`` (TRL's conversational format),
    ``prefill`` and ``source``; :func:`spf.data.samples.load_samples` reads it back to the same samples."""
    import datasets

    if not samples:
        raise ValueError("to_dataset needs at least one sample")
    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    features = datasets.Features(
        {"messages": datasets.List(message), "prefill": datasets.Value("string"), "source": datasets.Value("string")}
    )  # fmt: skip
    rows = [{"messages": list(s.messages), "prefill": s.prefill, "source": s.source} for s in samples]
    return datasets.Dataset.from_list(rows, features=features)
