"""A tracked copy of a benchmark's finished evaluations, so a run can go on on another machine or session.

The work folder (``runs/bench/…``: adapters, snapshots, data) is big and lives outside version control; a
powered benchmark takes longer than one working session on a 2-core machine. With ``keep:`` set in the
benchmark file, every finished evaluation is copied there — its ``results.json`` and its per-prompt verdicts
(``verdicts.jsonl.gz``: the judged records *without the generated text*, so no harmful completion is ever
committed) — with each seed's training metrics and each finished ``cell.json``. A fresh work folder is
filled back from it: an evaluation found there is not run again, and a seed whose every evaluation and
metrics are there is not trained again.

Kept evaluations are valid only for the aligned base they were made on: ``base.json`` records its
fingerprint, and a run on another base is refused rather than pairing verdicts of two bases. A rebuild of the
same recipe is not always bit-identical (float sums on a busy CPU: docs/results/aligned_base.md); so
``base.json`` also records what the base decides on a fixed probe (:func:`base_probe`: next-token choices and
greedy answers), and a rebuild whose weights differ but whose probe is identical is accepted as the same base
(its fingerprint is added to ``equivalent``, with a warning). A base that decides any of it differently, or a
kept base without a probe, is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from spf.io import atomic_path, path_sha256, save_json

logger = logging.getLogger(__name__)

__all__ = ["KEPT_FIELDS", "Keep", "KeptBaseMismatch", "base_fingerprint", "base_probe"]

# what the paired tests read from a judged record (spf.bench.verdicts); the answer text stays out
KEPT_FIELDS = ("suite", "prompt", "source", "template", "harmful", "refused", "correct", "score")
_VERDICTS = "verdicts.jsonl.gz"


class KeptBaseMismatch(RuntimeError):
    """The kept evaluations were made on another aligned base than the benchmark's."""


def base_fingerprint(ref: str) -> str:
    """A model folder: the hash of its safetensors (its weights); a packaged or hub name: the name."""
    folder = Path(ref)
    if not folder.is_dir():
        return f"name:{ref}"
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights to fingerprint")
    return "sha256:" + hashlib.sha256(" ".join(path_sha256(f) for f in files).encode()).hexdigest()


# the probe: our own dev prompts (shipped, so a fresh clone has them)
PROBE_FILES = (("heldout_harmful.jsonl", 24), ("overrefusal_prompts.jsonl", 16))
PROBE_TOKENS = 32


def _probe_prompts() -> list[str]:
    from spf.data.files import iter_jsonl, read_data_text
    from spf.data.locate import PACKAGE_DATA

    out = []
    for name, n in PROBE_FILES:
        path = PACKAGE_DATA / name
        rows = [r for _, r in iter_jsonl(path, read_data_text(path)) if r.get("split") == "dev"]
        out += [r["prompt"] for r in rows[:n]]
    return out


def base_probe(ref: str) -> str:
    """sha256 of what the model decides on the probe prompts: its argmax next token at every position of each
    chat-rendered prompt, and its greedy answer (``PROBE_TOKENS`` new tokens) — what kept verdicts depend on.
    Equal for two bases that decide alike there. The digest covers the prompts too; cached beside the folder
    per (weight fingerprint, prompts)."""
    import torch

    from spf.generation import generate
    from spf.models import load_model

    folder = Path(ref)
    prompts = _probe_prompts()
    key = {"fingerprint": base_fingerprint(ref), "prompts": _digest(prompts), "tokens": PROBE_TOKENS}
    cache = folder.parent / f".{folder.name}.probe.json"
    if cache.is_file():
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if {k: cached.get(k) for k in key} == key:
            return str(cached["probe"])
    model, tokenizer = load_model(ref)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    choices = []
    for chat in chats:  # one at a time: no padding, so nothing depends on the batch
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        with torch.no_grad():
            choices.append(
                model(input_ids=tokenizer(text, return_tensors="pt").input_ids).logits[0].argmax(-1).tolist()
            )
    answers = generate(model, tokenizer, chats, max_new_tokens=PROBE_TOKENS)
    probe = _digest([key["prompts"], choices, answers])
    save_json({**key, "probe": probe}, cache, tracked_ok=True)
    return probe


def _digest(obj: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


def _slim(line: str) -> str:
    rec = json.loads(line)
    return json.dumps({k: rec[k] for k in KEPT_FIELDS if k in rec}, ensure_ascii=False)


class Keep:
    """Mirror of ``work``'s evaluation folders under ``root`` (same relative paths)."""

    def __init__(self, root: str | Path, work: Path, aligned: str):
        self.root, self.work, self.aligned = Path(root), Path(work), aligned

    def _at(self, path: Path) -> Path:
        return self.root / Path(path).relative_to(self.work)

    def check_base(self) -> None:
        """Refuse kept evaluations of another base; record the base (and its probe) on first use."""
        here = base_fingerprint(self.aligned)
        path = self.root / "base.json"
        probe = (lambda: base_probe(self.aligned)) if Path(self.aligned).is_dir() else (lambda: None)
        if not path.is_file():
            save_json({"aligned": self.aligned, "fingerprint": here, "probe": probe()}, path, tracked_ok=True)
            return
        kept = json.loads(path.read_text(encoding="utf-8"))
        if here == kept.get("fingerprint") or here in kept.get("equivalent", []):
            return
        if kept.get("probe") and probe() == kept["probe"]:
            logger.warning(
                "%s: weights %s differ from the kept base's %s, but it decides the probe identically (next "
                "tokens and greedy answers): accepted as the same base (added to base.json `equivalent`)",
                self.aligned,
                here,
                kept.get("fingerprint"),
            )
            kept["equivalent"] = [*kept.get("equivalent", []), here]
            save_json(kept, path, tracked_ok=True)
            return
        why = (
            "decides the probe differently" if kept.get("probe") else "the kept base has no probe to compare"
        )
        raise KeptBaseMismatch(
            f"{path}: the kept evaluations are of aligned base {kept.get('aligned')!r} "
            f"({kept.get('fingerprint')}), but {self.aligned!r} is {here} ({why}): rebuild the base with the "
            f"benchmark's recipe, or move {self.root} away to start the benchmark afresh"
        )

    def save_eval(self, out: Path) -> None:
        """Copy one finished ``run_eval`` folder (results + answer-free verdict records)."""
        dest = self._at(out)
        dest.mkdir(parents=True, exist_ok=True)
        lines = (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()
        body = "".join(_slim(line) + "\n" for line in lines if line.strip()).encode()
        with atomic_path(dest / _VERDICTS, tracked_ok=True) as tmp, gzip.GzipFile(tmp, "wb", mtime=0) as fh:
            fh.write(body)
        # results.json last: its presence means the copy is whole
        with atomic_path(dest / "results.json", tracked_ok=True) as tmp:
            shutil.copyfile(out / "results.json", tmp)

    def has_eval(self, out: Path) -> bool:
        return (self._at(out) / "results.json").is_file()

    def restore_eval(self, out: Path) -> bool:
        """Fill ``out`` from the kept copy if there is one; True when restored."""
        src = self._at(out)
        if not (src / "results.json").is_file() or not (src / _VERDICTS).is_file():
            return False
        out.mkdir(parents=True, exist_ok=True)
        with gzip.open(src / _VERDICTS, "rb") as fh, atomic_path(out / "samples.jsonl") as tmp:
            Path(tmp).write_bytes(fh.read())
        with atomic_path(out / "results.json") as tmp:
            shutil.copyfile(src / "results.json", tmp)
        logger.info("%s: restored from %s", out, src)
        return True

    def save_json(self, record: dict[str, Any], path: Path) -> None:
        """A small JSON of the work folder (a seed's training metrics, a ``cell.json``) kept as it is."""
        save_json(record, self._at(path), tracked_ok=True)

    def load_json(self, path: Path) -> dict[str, Any] | None:
        src = self._at(path)
        return json.loads(src.read_text(encoding="utf-8")) if src.is_file() else None
