"""Loading, saving and tokenising chat-format training data.

Every supported file format (JSON, JSONL, CSV, TSV) is normalised into :class:`ChatSample`, a list of
``{"role", "content"}`` messages.  The rest of the library only ever sees chat samples, so prompt formatting is
decided in one place: the tokenizer's chat template (see :func:`encode_sample`).

Errors are :class:`DataError` and always say where the problem is (``file:line`` or ``file:record N``) and which
field is at fault, because data problems are usually found deep inside a long run and must be fixable without a
debugger.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spf.data.files import (
    DataError,
    data_error,
    duplicate_key,
    iter_delimited,
    iter_json,
    iter_jsonl,
    parse_json,
    read_data_text,
    type_name,
)
from spf.io import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "PROMPT_FIELDS",
    "RESPONSE_FIELDS",
    "ROLES",
    "ChatSample",
    "DataError",
    "chat_prompt_ids",
    "collate",
    "encode_sample",
    "iter_records",
    "load_samples",
    "save_samples",
    "special_token_strings",
]

ROLES: frozenset[str] = frozenset({"system", "user", "assistant"})

# Column names used by the public datasets we meet (Alpaca/Dolly: instruction, AdvBench: Behavior/goal,
# GSM8K: question, SST-2: text/sentence).  Order matters: the first one present wins.
PROMPT_FIELDS: tuple[str, ...] = (
    "prompt",
    "instruction",
    "question",
    "goal",
    "Behavior",
    "behavior",
    "query",
    "text",
    "sentence",
)
RESPONSE_FIELDS: tuple[str, ...] = ("response", "output", "answer", "target", "completion")
# Alpaca calls the extra context "input", Dolly calls it "context"; both only make sense with "instruction".
_INSTRUCTION_CONTEXT_FIELDS: tuple[str, ...] = ("input", "context")
_JSON_LIST_KEYS: tuple[str, ...] = ("data", "records", "samples")
_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".csv", ".tsv")

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF models) skip
# DataError, the error helpers and the file readers live in spf.data.files (shared with the scenario, prompt
# and utility readers); the short names are kept for this module's many call sites.
_type_name = type_name
_err = data_error


@dataclass(frozen=True)
class ChatSample:
    """One conversation: system/user/assistant messages, optionally ending with the assistant's response.

    ``messages`` holds private copies of plain dicts; use :meth:`to_messages` to get a list you may mutate.
    ``source`` is ``"file:line"`` provenance so that later errors (tokenisation, filtering) can point at the data.
    """

    messages: tuple[dict[str, str], ...]
    source: str = ""
    # Context at the start of the response that is NOT trained on: the response's first ``len(prefill)``
    # characters are conditioned on like the prompt (e.g. the harmful opening of a safety-recovery example,
    # Qi et al. 2024 — the model learns to recover from it, not to write it). "" = supervise the whole response.
    prefill: str = ""

    def __post_init__(self) -> None:
        where = self.source or "<sample>"
        if not isinstance(self.prefill, str):
            raise _err(where, f"expected a string, got {_type_name(self.prefill)}", "prefill")
        if isinstance(self.messages, (str, bytes, Mapping)) or not isinstance(self.messages, Sequence):
            raise _err(where, f"expected a list of messages, got {_type_name(self.messages)}", "messages")
        copied: list[dict[str, str]] = []
        for i, message in enumerate(self.messages):
            field = f"messages[{i}]"
            if not isinstance(message, Mapping):
                raise _err(where, f"expected a {{role, content}} object, got {_type_name(message)}", field)
            role = message.get("role")
            content = message.get("content")
            if role not in ROLES:
                raise _err(where, f"expected one of {sorted(ROLES)}, got {role!r}", f"{field}.role")
            if not isinstance(content, str):
                raise _err(where, f"expected a string, got {_type_name(content)}", f"{field}.content")
            # Copy so that later mutation of the caller's dicts cannot change a "frozen" sample or its hash.
            copied.append({"role": role, "content": content})
        if not any(m["role"] == "user" for m in copied):
            raise _err(where, "needs at least one user message", "messages")
        first = next(i for i, m in enumerate(copied) if m["role"] != "system")
        if copied[first]["role"] != "user":
            # chat templates (and the models trained on them) expect the user to speak first
            raise _err(
                where,
                "the conversation must start with a user message (after any system messages)",
                f"messages[{first}].role",
            )
        # The generation prompt is appended after the last prompt message, so it must be the user's turn;
        # anything else would train the model to answer a system or assistant message.
        prompt_part = copied[:-1] if copied[-1]["role"] == "assistant" else copied
        if not prompt_part or prompt_part[-1]["role"] != "user":
            raise _err(where, "the last message before the response must be a user message", "messages")
        if not prompt_part[-1]["content"].strip():
            raise _err(where, "prompt is empty", f"messages[{len(prompt_part) - 1}].content")
        if self.prefill:
            answer = copied[-1]["content"] if copied[-1]["role"] == "assistant" else None
            if (
                answer is None
                or not answer.startswith(self.prefill)
                or not answer[len(self.prefill) :].strip()
            ):
                raise _err(
                    where,
                    "the response must start with the prefill and go on after it (only the rest is trained on)",
                    "prefill",
                )
        object.__setattr__(self, "messages", tuple(copied))

    def __hash__(self) -> int:
        # The generated hash would fail on the dicts inside; hash what __eq__ compares instead.
        return hash((self.sha256(), self.source))

    @classmethod
    def from_pair(
        cls, prompt: str, response: str | None = None, system: str | None = None, source: str = ""
    ) -> ChatSample:
        messages: list[dict[str, str]] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        return cls(tuple(messages), source)

    @property
    def prompt(self) -> str:
        """Content of the last user message."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def response(self) -> str | None:
        """Content of the final message if it is an assistant message, else ``None``."""
        last = self.messages[-1]
        return last["content"] if last["role"] == "assistant" else None

    def prompt_messages(self) -> list[dict[str, str]]:
        """All messages except a final assistant message (what the model is conditioned on)."""
        kept = self.messages[:-1] if self.response is not None else self.messages
        return [dict(m) for m in kept]

    def to_messages(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.messages]

    def with_response(self, response: str, prefill: str = "") -> ChatSample:
        """Return a copy whose final assistant message is ``response`` (replaced, or appended if absent)."""
        messages = self.prompt_messages()
        messages.append({"role": "assistant", "content": response})
        return ChatSample(tuple(messages), self.source, prefill)

    def sha256(self) -> str:
        """Stable content hash (ignores ``source``), e.g. to de-duplicate or to check train/eval overlap."""
        content: Any = self.to_messages()
        if self.prefill:  # a different training target than the same text without it
            content = {"messages": content, "prefill": self.prefill}
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": self.to_messages()}
        if self.prefill:
            out["prefill"] = self.prefill
        return out


# --------------------------------------------------------------------------------------------------- loading


def _get_str(record: Mapping[str, Any], field: str, where: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise _err(where, f"expected a string, got {_type_name(value)}", field)
    return value


def _record_to_sample(
    record: Any,
    where: str,
    prompt_field: str | None,
    response_field: str | None,
) -> tuple[ChatSample, str]:
    """Build a sample; also return the name of the field a response would come from (for error messages)."""
    if isinstance(record, list):
        # A bare conversation, e.g. the AOA attack file: [[{role, content}, ...], ...].
        return ChatSample(tuple(record), where), "messages"
    if not isinstance(record, Mapping):
        raise _err(where, f"expected an object or a list of messages, got {_type_name(record)}")
    if "messages" in record and prompt_field is None:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise _err(where, f"expected a list of messages, got {_type_name(messages)}", "messages")
        return ChatSample(tuple(messages), where, record.get("prefill") or ""), "messages"

    columns = [str(k) for k in record if k is not None]
    if prompt_field is not None:
        if prompt_field not in record:
            raise _err(where, f"missing (columns found: {columns})", prompt_field)
        p_field = prompt_field
    else:
        found = next((f for f in PROMPT_FIELDS if f in record), None)
        if found is None:
            raise _err(
                where,
                f"no prompt column found; columns: {columns}; accepted: {list(PROMPT_FIELDS)} "
                "(or pass prompt_field=...)",
            )
        p_field = found
    prompt = _get_str(record, p_field, where)
    if p_field == "instruction":
        for extra_field in _INSTRUCTION_CONTEXT_FIELDS:
            extra = record.get(extra_field)
            if extra is None:
                continue
            if not isinstance(extra, str):
                raise _err(where, f"expected a string, got {_type_name(extra)}", extra_field)
            if extra.strip():
                prompt = f"{prompt}\n\n{extra}"
                break
    if not prompt.strip():
        raise _err(where, "prompt is empty", p_field)

    response: str | None = None
    if response_field is not None:
        if response_field not in record:
            raise _err(where, f"missing (columns found: {columns})", response_field)
        r_field: str | None = response_field
    else:
        r_field = next((f for f in RESPONSE_FIELDS if f in record), None)
    # null (JSON) and an empty cell (CSV) both mean "no response"; anything else that is not a string is a bug.
    if r_field is not None and record[r_field] is not None:
        response = _get_str(record, r_field, where)
        if not response.strip():
            response = None
    sample = ChatSample.from_pair(prompt, response, source=where)
    return sample, r_field or "/".join(RESPONSE_FIELDS)


def _iter_json(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    data = parse_json(path, text)
    if isinstance(data, dict):
        key = next((k for k in _JSON_LIST_KEYS if isinstance(data.get(k), list)), None)
        if key is None:
            raise DataError(
                f"{path.name}: expected a JSON list of records or an object with one of "
                f"{list(_JSON_LIST_KEYS)} holding a list; got an object with keys {list(data)[:10]}"
            )
        repeated = duplicate_key(data)
        if repeated is not None:
            raise _err(
                path.name, "duplicate key: the second value would silently replace the first", repeated
            )
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path.name}: expected a JSON list of records, got {_type_name(data)}")
    yield from iter_json(path, data)


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for each raw record of a JSON / JSONL / CSV / TSV data file, read through
    :func:`spf.data.files.read_data_text` (regular file, size/line limits, UTF-8, duplicate keys and
    columns, lone surrogates and chat markers refused); ``where`` is ``FILE:LINE`` or ``FILE:record N``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {list(_SUFFIXES)}")
    text = read_data_text(path, check_lines=suffix != ".json")
    if not text.strip():
        raise DataError(f"{path.name}: no records (file is empty)")
    if suffix == ".json":
        return _iter_json(path, text)
    if suffix == ".jsonl":
        return iter_jsonl(path, text)
    return iter_delimited(path, text, "\t" if suffix == ".tsv" else ",")


def load_samples(
    path: str | Path | Any,
    *,
    prompt_field: str | None = None,
    response_field: str | None = None,
    require_response: bool = False,
    limit: int | None = None,
    split: str = "train",
) -> list[ChatSample]:
    """Load a JSON / JSONL / CSV / TSV file — or a ``datasets.Dataset``, a local dataset folder, a hub id
    ``owner/name[:config]`` (``split`` picks the split; :mod:`spf.data.hub`) — into chat samples.

    Records may be ``{"messages": [...]}``, a bare list of messages, or a flat record with a prompt column
    (auto-detected from :data:`PROMPT_FIELDS`) and an optional response column (:data:`RESPONSE_FIELDS`).
    ``prompt_field`` / ``response_field`` override detection and must then be present in every record.
    ``limit`` keeps the first ``limit`` samples.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit}")
    from spf.data.hub import iter_dataset, load_source  # imports datasets only for a dataset source

    dataset = load_source(path, split)
    if dataset is None:
        records, name, label = iter_records(path), Path(path).name, str(path)
    else:
        name = label = dataset[0]
        records = iter_dataset(dataset[1], name)
    samples: list[ChatSample] = []
    for where, record in records:
        sample, r_field = _record_to_sample(record, where, prompt_field, response_field)
        if require_response and sample.response is None:
            raise _err(where, "a non-empty response is required (require_response=True)", r_field)
        samples.append(sample)
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise DataError(f"{name}: no records")
    _warn_duplicates(samples, label)
    n_with_response = sum(s.response is not None for s in samples)
    logger.info("loaded %d samples (%d with a response) from %s", len(samples), n_with_response, label)
    return samples


def _warn_duplicates(samples: list[ChatSample], path: str) -> None:
    """Duplicates are kept (repeating a sample weights it; ``repeat_epochs`` writes them on purpose) but
    logged, with the first pair's locations, since in a hand-made file they are usually a mistake."""
    first_seen: dict[str, str] = {}
    dupes: list[tuple[str, str]] = []
    for s in samples:
        key = s.sha256()
        if key in first_seen:
            dupes.append((first_seen[key], s.source))
        else:
            first_seen[key] = s.source
    if dupes:
        logger.warning(
            "%s: %d duplicate sample(s) kept (e.g. %s repeats %s); remove them unless the repetition is meant",
            path,
            len(dupes),
            dupes[0][1],
            dupes[0][0],
        )


def save_samples(samples: Iterable[ChatSample], path: str | Path) -> None:
    """Write samples as JSONL (``{"messages": [...]}`` per line) atomically.

    The file is written to a temporary sibling and moved into place with :func:`os.replace`, so a crash or a bad
    sample never leaves a truncated file that a later run would silently train on.
    """
    path = Path(path)
    count = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="\n") as fh:
        for sample in samples:
            if not isinstance(sample, ChatSample):
                raise TypeError(f"save_samples expects ChatSample objects, got {_type_name(sample)}")
            fh.write(json.dumps(sample.to_dict(), ensure_ascii=False) + "\n")
            count += 1
        if count == 0:
            # An empty file cannot be loaded back (load_samples rejects it), so refuse to write one.
            raise ValueError(f"{path}: no samples to save")
        fh.flush()
        os.fsync(fh.fileno())
    logger.info("saved %d samples to %s", count, path)


# ------------------------------------------------------------------------------------------------ tokenising


def special_token_strings(tokenizer: Any) -> tuple[str, ...]:
    """The text of every special token of ``tokenizer``: its named specials plus the added tokens marked
    special (``additional_special_tokens`` may have been replaced while the added token stays special)."""
    tokens = {str(t) for t in getattr(tokenizer, "all_special_tokens", None) or () if t}
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False) and getattr(added, "content", None):
            tokens.add(added.content)
    return tuple(sorted(tokens))


def _check_special_tokens(tokenizer: Any, sample: ChatSample, messages: list[dict[str, str]]) -> None:
    """Refuse message text holding one of the tokenizer's special tokens.

    The rendered chat template is tokenised with special tokens recognised, so such text in a message becomes
    the real token: a dataset could open a system turn or end the user's turn early. Refused rather than
    escaped, because escaping would silently change the text the user meant to train on; the static markers
    of spf.data.files are already refused when the file is read, this adds the model's own.
    """
    tokens = special_token_strings(tokenizer)
    for i, message in enumerate(messages):
        content = message["content"]
        found = next((t for t in tokens if t in content), None)
        if found is not None:
            raise _err(
                sample.source or "<sample>",
                f"contains the tokenizer's special token {found!r}, which would become a real token (e.g. "
                "an injected turn), so it is refused; remove it from the data",
                f"messages[{i}].content",
            )


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    # transformers 5.x may still hand back a BatchEncoding / dict; older versions a flat list.
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):
        if len(out) != 1:
            raise ValueError(f"apply_chat_template returned a batch of {len(out)} sequences for one sample")
        out = list(out[0])
    return [int(t) for t in out]


def encode_sample(tokenizer: Any, sample: ChatSample, *, max_length: int = 512) -> dict[str, list[int]]:
    """Tokenise ``sample`` with the tokenizer's chat template for supervised fine-tuning.

    Prompt tokens get label -100; the response tokens, including the end-of-turn token(s) the template adds
    after it, are supervised.  Over-long samples lose prompt tokens from the left first (the end of the prompt
    and the whole response matter most); only if the response alone does not fit is its right end cut.
    """
    if max_length < 2:
        # One prompt token is always kept so that at least one response token is predicted after the
        # causal-LM shift; that needs room for two tokens.
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat_template; spf formats every prompt with the "
            "model's chat template, so load an instruct/chat tokenizer or set tokenizer.chat_template"
        )
    response = sample.response
    if response is None:
        raise _err(sample.source or "<sample>", "no assistant response to train on", "response")
    _check_special_tokens(tokenizer, sample, sample.to_messages())

    prompt_ids = _chat_ids(tokenizer, sample.prompt_messages(), add_generation_prompt=True)
    if sample.prefill:
        # conditioned on, not supervised: tokenised after the generation prompt as a prefill attack is
        prompt_ids += list(tokenizer(sample.prefill, add_special_tokens=False)["input_ids"])
    full_ids = _chat_ids(tokenizer, sample.to_messages(), add_generation_prompt=False)
    if len(full_ids) > len(prompt_ids) and full_ids[: len(prompt_ids)] == prompt_ids:
        response_ids = full_ids[len(prompt_ids) :]
    else:
        # Some templates render history differently from a fresh generation prompt (e.g. they strip reasoning
        # blocks or add a date), so the prompt is not a prefix (nor is a prefill whose last token merges with
        # the text after it); then build the sequence the way it is generated at inference time: generation
        # prompt (+ prefill), response, end of sequence.
        logger.debug("%s: chat template is not prefix-stable; using prompt + response + eos", sample.source)
        rest = response[len(sample.prefill) :]
        response_ids = list(tokenizer(rest, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            response_ids.append(int(tokenizer.eos_token_id))
    if not response_ids:
        raise _err(sample.source or "<sample>", "response encodes to zero tokens", "response")

    n_prompt = min(len(prompt_ids), max(1, max_length - len(response_ids)))
    n_response = min(len(response_ids), max_length - n_prompt)
    if n_prompt < len(prompt_ids) or n_response < len(response_ids):
        logger.debug(
            "%s: truncated to %d tokens (prompt %d->%d, response %d->%d)",
            sample.source,
            max_length,
            len(prompt_ids),
            n_prompt,
            len(response_ids),
            n_response,
        )
    kept_prompt = prompt_ids[len(prompt_ids) - n_prompt :]
    kept_response = response_ids[:n_response]
    input_ids = kept_prompt + kept_response
    labels = [IGNORE_INDEX] * len(kept_prompt) + kept_response
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its EOS id when it has none (padded positions are masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def chat_prompt_ids(tokenizer: Any, sample: ChatSample) -> list[int]:
    """Token ids of ``sample``'s prompt messages plus the generation prompt (where the answer starts)."""
    messages = sample.prompt_messages()
    _check_special_tokens(tokenizer, sample, messages)
    return _chat_ids(tokenizer, messages, add_generation_prompt=True)


def collate(encoded: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded samples into a batch (labels padded with -100, attention_mask with 0)."""
    if not encoded:
        raise ValueError("collate needs at least one encoded sample")
    width = max(len(e["input_ids"]) for e in encoded)
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    attention: list[list[int]] = []
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        if len(e["labels"]) != n or len(e["attention_mask"]) != n:
            raise ValueError(f"encoded sample {i}: input_ids, labels and attention_mask differ in length")
        pad = width - n
        input_ids.append(list(e["input_ids"]) + [pad_token_id] * pad)
        labels.append(list(e["labels"]) + [IGNORE_INDEX] * pad)
        attention.append(list(e["attention_mask"]) + [0] * pad)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(attention, dtype=torch.long),
    }
