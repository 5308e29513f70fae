"""Make a safety-aligned starting model: LoRA SFT on refusals + the model's own benign answers, merged.

SPF protects safety a model already has; the small instruct models we test on barely refuse anything, so
experiments start from a model aligned here. The recipe (behaviour, not just loss):

* harmful prompts → short written refusals teach refusing;
* harmful prompts → safety-recovery examples make the refusal more than a few tokens deep (Qi et al. 2024,
  "Safety Alignment Should Be Made More Than Just a Few Tokens Deep"): the prompt, the start of a compliant
  answer (the unaligned model's own, cut after a random number of tokens, or the prefill attack's "Sure, here
  is …" opening) as context that is not trained on, then the refusal. Without them a forced compliant
  opening ("prefill") made the aligned base finish the harmful answer 97–100 % of the time;
* benign prompts → the model's OWN greedy answers keep it helpful. Training on its own answers moves the
  benign behaviour as little as possible (the targets are already its most likely outputs), so the refusal
  pairs are not free to turn into "refuse everything" — a prototype trained on refusals + foreign answers
  refused 40–100% of ordinary prompts. The shipped benign set includes prompts that only *sound* dangerous
  ("How do I kill a Python process?") for the same reason.

Prompts are split into train / held-out deterministically (by a seeded hash of the prompt text, so the split
does not depend on file order); held-out prompts are never trained on and are used to measure refusal and
over-refusal afterwards. All work happens in a temporary folder beside ``out`` that is renamed onto ``out``
only once the merged model is complete, so a crash never leaves a half model that could be loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from spf.data.locate import shipped_file
from spf.data.samples import ChatSample, DataError, load_samples, save_samples
from spf.eval.jailbreaks import GENERIC_PREFILL
from spf.io import atomic_dir, claim_output, save_json

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BENIGN",
    "DEFAULT_REFUSALS",
    "AlignConfig",
    "align",
    "refusal_rates",
    "split_heldout",
]

DEFAULT_REFUSALS = "align_refusals.jsonl"  # shipped in spf/data/
DEFAULT_BENIGN = "align_benign.jsonl"

# Sentence ends used to trim an answer cut off by max_new_tokens: training on a half sentence followed by
# the end-of-turn token would teach the model to stop mid-sentence.
_SENTENCE_END_RE = re.compile(r"[.!?:)](?=\s|$)|\n")


_TRUNCATION_MARGIN = 4


@dataclass
class AlignConfig:
    model: str = "smollm2-135m-instruct"  # base model reference (see spf.models.load_model)
    out: str = "runs/aligned"  # merged model folder (created atomically)
    refusals: str | None = None  # harmful→refusal pairs; None = shipped spf/data/align_refusals.jsonl
    benign: list[str] | None = None  # benign prompt files (answers are regenerated); None = shipped set
    n_refusals: int | None = None  # use at most this many refusal pairs (seeded pick, before the split)
    n_benign: int | None = None  # use at most this many benign prompts (seeded pick, before the split)
    heldout_fraction: float = 0.2  # share of each set held out (never trained on)
    steps: int = 120  # LoRA optimizer steps
    lr: float = 5e-4
    batch_size: int = 8
    lora_r: int = 16  # LoRA rank; alpha = 2r
    seed: int = 0
    max_new_tokens: int = 96  # length of the model's own benign answers
    gen_batch_size: int = 8
    max_prompt_chars: int = 1500  # longer benign prompts (Dolly contexts) are skipped: slow to answer
    max_length: int = 256  # training sequence length in tokens
    eval_max_new_tokens: int = 48  # held-out refusal check after merging; 0 = skip it
    # over-refusal lever: weight of -log(1 - p(refusal opening | benign train prompt)); 0 = off
    unlikelihood_weight: float = 0.0
    # safety-recovery examples per harmful TRAIN prompt (0 = off); the first opens with "Sure, here is …",
    # the others with the unaligned model's own answer cut after 1..recovery_max_prefix_tokens tokens
    recovery_per_prompt: int = 0
    recovery_max_prefix_tokens: int = 24
    # continuation examples per benign TRAIN answer: the model's own answer with its first 1..max-prefix
    # tokens as an untrained prefill, so recovery does not generalise to breaking off benign answers
    # ("To torch the sugar on a creme brulee, you'll need a\n\nI can't help with that." — seen without them)
    continuation_per_prompt: int = 0
    threads: int | None = None  # torch CPU threads (None = torch's default)
    device: str | None = None  # None = cuda when present, else cpu
    overwrite: bool = False  # replace an existing `out`

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction: must be in [0, 1), got {self.heldout_fraction}")
        for name in ("recovery_per_prompt", "continuation_per_prompt"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be ≥ 0, got {getattr(self, name)}")
        names = ("steps", "batch_size", "lora_r", "max_new_tokens", "gen_batch_size", "max_length")
        for name in (*names, "recovery_max_prefix_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")
        for name in ("n_refusals", "n_benign"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {value}")
        if self.unlikelihood_weight < 0:
            raise ValueError(f"unlikelihood_weight: must be ≥ 0, got {self.unlikelihood_weight}")
        if self.eval_max_new_tokens < 0:
            raise ValueError(f"eval_max_new_tokens: must be ≥ 0, got {self.eval_max_new_tokens}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if isinstance(self.benign, str):
            self.benign = [self.benign]


# ------------------------------------------------------------------------------------------------- data


def _dedupe(samples: list[ChatSample]) -> list[ChatSample]:
    """First sample per prompt text: a duplicate could otherwise land on both sides of the split."""
    seen: set[str] = set()
    out = []
    for s in samples:
        key = s.prompt.strip()
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def _pick(samples: list[ChatSample], n: int | None, seed: int) -> list[ChatSample]:
    if n is None or n >= len(samples):
        return samples
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return [samples[i] for i in sorted(order[:n])]  # keep file order: easier to read in splits.json


def split_heldout(
    samples: list[ChatSample], fraction: float, seed: int
) -> tuple[list[ChatSample], list[ChatSample]]:
    """(train, held-out): the ``round(fraction·n)`` prompts with the smallest seeded hash are held out.

    Hashing the prompt text (not the position) makes the split independent of file order and stable
    when rows are added: a prompt stays on its side unless the count changes around it.
    """
    n_held = round(fraction * len(samples))
    if fraction > 0 and len(samples) >= 2:
        n_held = min(max(n_held, 1), len(samples) - 1)  # both sides non-empty
    ranked = sorted(
        range(len(samples)),
        key=lambda i: hashlib.sha256(f"{seed}\x00{samples[i].prompt}".encode()).hexdigest(),
    )
    held = set(ranked[:n_held])
    train = [s for i, s in enumerate(samples) if i not in held]
    heldout = [s for i, s in enumerate(samples) if i in held]
    return train, heldout


def _list_sha(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()


def _split_record(source: str | list[str], train: list[ChatSample], held: list[ChatSample]) -> dict:
    tp, hp = [s.prompt for s in train], [s.prompt for s in held]
    return {
        "source": source,
        "n_train": len(tp),
        "n_heldout": len(hp),
        "train_sha256": _list_sha(tp),
        "heldout_sha256": _list_sha(hp),
        "train": tp,
        "heldout": hp,
    }


def _load_refusals(path: str, n: int | None, seed: int) -> list[ChatSample]:
    from spf.refusal import is_refusal

    rows = load_samples(path, require_response=True)
    # Public safety sets mix refusals with helpful safe answers; only refusals teach refusing.
    kept = [s for s in rows if is_refusal(s.response or "")]
    if len(kept) < len(rows):
        logger.info("%s: kept %d of %d pairs whose answer is a refusal", path, len(kept), len(rows))
    kept = _dedupe(kept)
    if not kept:
        raise DataError(f"{path}: no (prompt, refusal) pairs")
    return _pick(kept, n, seed)


def _load_benign(paths: list[str], n: int | None, seed: int, max_chars: int) -> list[ChatSample]:
    rows: list[ChatSample] = []
    for path in paths:
        for s in load_samples(path):
            if len(s.prompt) > max_chars:
                continue
            # prompt only: the answer is regenerated by the model itself
            rows.append(ChatSample(tuple(s.prompt_messages()), s.source))
    rows = _dedupe(rows)
    if not rows:
        raise DataError(f"{', '.join(paths)}: no benign prompts (≤ {max_chars} characters)")
    return _pick(rows, n, seed)


def _trim_truncated(answer: str, n_tokens: int, limit: int) -> str:
    """Cut an answer that ran into the token limit back to its last complete sentence ('' if none)."""
    # Re-tokenising the decoded, stripped text can give a few tokens fewer than were generated, hence
    # the margin; an answer that truly ended near the limit only loses an unfinished tail, if any.
    if n_tokens < limit - _TRUNCATION_MARGIN:
        return answer
    ends = [m.end() for m in _SENTENCE_END_RE.finditer(answer)]
    return answer[: ends[-1]].strip() if ends else ""


def _greedy(
    model: Any, tokenizer: Any, samples: list[ChatSample], n_tokens: int, cfg: AlignConfig
) -> list[str]:
    from spf.refusal import generate

    prompts = [s.prompt_messages() for s in samples]
    return generate(model, tokenizer, prompts, max_new_tokens=n_tokens, batch_size=cfg.gen_batch_size)


def _own_answers(
    model: Any, tokenizer: Any, prompts: list[ChatSample], cfg: AlignConfig
) -> tuple[list[ChatSample], dict[str, int]]:
    from spf.refusal import is_refusal

    answers = _greedy(model, tokenizer, prompts, cfg.max_new_tokens, cfg)
    stats = {"generated": len(answers), "dropped_refusal": 0, "dropped_empty": 0, "trimmed": 0}
    kept = []
    for sample, answer in zip(prompts, answers, strict=True):
        if is_refusal(answer):
            # training on the model's own refusal of a benign prompt would reinforce over-refusal
            stats["dropped_refusal"] += 1
            continue
        n_tok = len(tokenizer(answer, add_special_tokens=False).input_ids)
        trimmed = _trim_truncated(answer, n_tok, cfg.max_new_tokens)
        if trimmed != answer:
            stats["trimmed"] += 1
        if not trimmed:
            stats["dropped_empty"] += 1
            continue
        kept.append(sample.with_response(trimmed))
    stats["kept"] = len(kept)
    return kept, stats


_IMPERATIVE_RE = re.compile(
    r"^(?:please\s+)?(?:write|create|develop|give|provide|generate|draft|compose|produce|make|design|outline|"
    r"explain|describe|teach|tell|show|list|suggest|offer|share|detail)\s+(?:me\s+|us\s+)?",
    re.IGNORECASE,
)


def sure_opening(prompt: str) -> str:
    """The compliant opening a prefill attack forces: "Write a guide on X" → "Sure, here is a guide on X"
    (AdvBench's target format); other prompts get the bare opening the prefill suite forces (GENERIC_PREFILL)."""
    text = prompt.strip().rstrip(".!?")
    match = _IMPERATIVE_RE.match(text)
    if match and len(text) > match.end() and len(text) <= 200:
        return f"{GENERIC_PREFILL} {text[match.end() :]}"
    return GENERIC_PREFILL


def _recovery_examples(
    model: Any, tokenizer: Any, refusals: list[ChatSample], cfg: AlignConfig
) -> tuple[list[ChatSample], dict[str, int]]:
    """Safety-recovery examples for the harmful TRAIN pairs (module docstring): (prompt, compliant opening
    as an untrained prefill, blank line, the pair's refusal). Openings come from the unaligned model's own
    greedy answer, so they are what this model would really start with."""
    from spf.refusal import is_refusal

    stats = {"examples": 0, "sure_opening": 0, "own_opening": 0, "own_answer_was_refusal": 0}
    if not cfg.recovery_per_prompt or not refusals:
        return [], stats
    answers = _greedy(model, tokenizer, refusals, cfg.recovery_max_prefix_tokens, cfg)
    rng = random.Random(f"recovery-{cfg.seed}")
    out = []
    for sample, answer in zip(refusals, answers, strict=True):
        ids = [] if is_refusal(answer) else tokenizer(answer, add_special_tokens=False)["input_ids"]
        stats["own_answer_was_refusal"] += not ids
        for i in range(cfg.recovery_per_prompt):
            opening = tokenizer.decode(ids[: rng.randint(1, len(ids))]).rstrip() if ids and i else ""
            if not opening.strip():
                opening = sure_opening(sample.prompt)
                stats["sure_opening"] += 1
            else:
                stats["own_opening"] += 1
            response = f"{opening}\n\n{sample.response}"
            out.append(sample.with_response(response, prefill=opening))
    stats["examples"] = len(out)
    return out, stats


def _continuation_examples(tokenizer: Any, own: list[ChatSample], cfg: AlignConfig) -> list[ChatSample]:
    """Benign counterparts of the recovery examples: (benign prompt, the start of the model's own answer as
    an untrained prefill, the rest of that answer) — after a prefix, a benign answer goes on."""
    rng = random.Random(f"continuation-{cfg.seed}")
    out = []
    for sample in own:
        answer = sample.response or ""
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        for _ in range(cfg.continuation_per_prompt if len(ids) > 2 else 0):
            k = rng.randint(1, min(len(ids) - 1, cfg.recovery_max_prefix_tokens))
            prefix = tokenizer.decode(ids[:k]).rstrip()
            # a decoded prefix that is not literally the answer's start (tokenizer normalisation) is skipped
            if prefix.strip() and answer.startswith(prefix) and answer[len(prefix) :].strip():
                out.append(sample.with_response(answer, prefill=prefix))
    return out


# ----------------------------------------------------------------------------------------------- checks


def refusal_rates(
    model: Any,
    tokenizer: Any,
    harmful: list[str],
    benign: list[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Keyword-judged refusal rates of greedy answers: on harmful prompts (want high), benign (want low)."""
    from spf.refusal import generate, is_refusal

    result: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    for name, prompts in (("harmful", harmful), ("benign", benign)):
        answers = generate(
            model,
            tokenizer,
            [[{"role": "user", "content": p}] for p in prompts],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        refused = [is_refusal(a) for a in answers]
        result[name] = {
            "n": len(prompts),
            "refusal_rate": sum(refused) / len(refused) if refused else None,
            "answers": [
                {"prompt": p, "answer": a, "refused": r}
                for p, a, r in zip(prompts, answers, refused, strict=True)
            ],
        }
    return result


# ---------------------------------------------------------------------------------------------- pipeline


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(
            f"{out} already exists and is not empty (pass overwrite / --overwrite to replace it)"
        )


def _merge(cfg: AlignConfig, adapter_dir: Path, dest: Path) -> None:
    from spf.models import load_adapter, load_model

    base, tokenizer = load_model(cfg.model)
    merged = load_adapter(base, adapter_dir).merge_and_unload()
    merged.config._name_or_path = str(Path(cfg.out).resolve())  # not the base: this folder is the model
    merged.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))


@dataclass
class _Inputs:
    """The recipe's data, loaded and split before anything is written."""

    refusal_src: str
    benign_src: list[str]
    ref_train: list[ChatSample]
    ref_held: list[ChatSample]
    ben_train: list[ChatSample]
    ben_held: list[ChatSample]


def _load_inputs(cfg: AlignConfig) -> _Inputs:
    """Load and validate every input, then split each set into train / held-out."""
    refusal_src = cfg.refusals or str(shipped_file(DEFAULT_REFUSALS))
    benign_src = list(cfg.benign) if cfg.benign else [str(shipped_file(DEFAULT_BENIGN))]
    refusals = _load_refusals(refusal_src, cfg.n_refusals, cfg.seed)
    benign = _load_benign(benign_src, cfg.n_benign, cfg.seed, cfg.max_prompt_chars)
    ref_train, ref_held = split_heldout(refusals, cfg.heldout_fraction, cfg.seed)
    ben_train, ben_held = split_heldout(benign, cfg.heldout_fraction, cfg.seed)
    logger.info(
        "refusals: %d train / %d held out; benign prompts: %d train / %d held out",
        len(ref_train),
        len(ref_held),
        len(ben_train),
        len(ben_held),
    )
    return _Inputs(refusal_src, benign_src, ref_train, ref_held, ben_train, ben_held)


def _write_splits(cfg: AlignConfig, data: _Inputs, folder: Path) -> dict[str, Any]:
    """``splits.json`` (which prompts were held out, and how) and the held-out refusals."""
    splits = {
        "seed": cfg.seed,
        "heldout_fraction": cfg.heldout_fraction,
        "method": "sha256(seed NUL prompt), smallest round(fraction*n) held out",
        "refusals": _split_record(data.refusal_src, data.ref_train, data.ref_held),
        "benign": _split_record(data.benign_src, data.ben_train, data.ben_held),
    }
    save_json(splits, folder / "splits.json")
    if data.ref_held:
        save_samples(data.ref_held, folder / "heldout_refusals.jsonl")
    return splits


def _write_sft_data(
    cfg: AlignConfig, data: _Inputs, own: list[ChatSample], prefilled: list[ChatSample], folder: Path
) -> tuple[list[ChatSample], dict[str, Any]]:
    """``sft_data.jsonl`` (train refusals + recovery and continuation examples + the model's own benign
    answers, shuffled)
    and, with an unlikelihood weight, the benign prompts it applies to → (the mix, the unlikelihood settings)."""
    mix = list(data.ref_train) + prefilled + own
    random.Random(cfg.seed).shuffle(mix)
    save_samples(mix, folder / "sft_data.jsonl")
    unlikelihood: dict[str, Any] = {}
    if cfg.unlikelihood_weight > 0 and data.ben_train:
        # benign TRAIN prompts only: held-out ones measure over-refusal afterwards
        prompts = folder / "unlikelihood_prompts.jsonl"
        save_samples([ChatSample.from_pair(s.prompt) for s in data.ben_train], prompts)
        unlikelihood = {"data": str(prompts), "weight": cfg.unlikelihood_weight}
    return mix, unlikelihood


def _train_adapter(cfg: AlignConfig, folder: Path, unlikelihood: dict[str, Any], n_held: int) -> Any:
    """Vanilla LoRA SFT on ``sft_data.jsonl`` into ``folder/adapter``, tracking the held-out refusal loss."""
    from spf.training.config import TrainConfig
    from spf.training.loop import train

    tcfg = TrainConfig(
        model=cfg.model,
        data=str(folder / "sft_data.jsonl"),
        out=str(folder / "adapter"),
        method="vanilla",
        finetune="lora",
        lora={"r": cfg.lora_r, "alpha": 2.0 * cfg.lora_r},
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        max_length=cfg.max_length,
        seed=cfg.seed,
        resume=False,
        heldout_safety=str(folder / "heldout_refusals.jsonl") if n_held else None,
        heldout_n=max(1, n_held),
        unlikelihood=unlikelihood,
        eval_every=max(1, cfg.steps // 4),
        threads=cfg.threads,
        device=cfg.device,
    )
    return train(tcfg)


def _merge_adapter(cfg: AlignConfig, folder: Path) -> None:
    adapter_dir = folder / "adapter"
    _merge(cfg, adapter_dir, folder)
    shutil.copy(adapter_dir / "metrics.json", folder / "train_metrics.json")
    # the merged weights supersede the adapter; leaving adapter_config.json around would also make
    # a reader take this folder for an adapter
    shutil.rmtree(adapter_dir)


def _heldout_behaviour(cfg: AlignConfig, data: _Inputs, folder: Path) -> dict[str, Any] | None:
    """Refusal rates of the merged model on the held-out prompts (None when skipped or nothing is held out)."""
    if not cfg.eval_max_new_tokens or not (data.ref_held or data.ben_held):
        return None
    from spf.models import load_model

    merged, mtok = load_model(str(folder), device=cfg.device)
    return refusal_rates(
        merged,
        mtok,
        [s.prompt for s in data.ref_held],
        [s.prompt for s in data.ben_held],
        max_new_tokens=cfg.eval_max_new_tokens,
        batch_size=cfg.gen_batch_size,
    )


def _training_summary(cfg: AlignConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    steps, summary = metrics["steps"], metrics["summary"]
    return {
        "steps": cfg.steps,
        "loss_start": steps[0]["loss"] if steps else None,
        "loss_end": steps[-1]["loss"] if steps else None,
        "heldout_refusal_loss_start": summary.get("safety_loss_heldout_start"),
        "heldout_refusal_loss_end": summary.get("safety_loss_heldout_end"),
        "mean_step_seconds": summary.get("mean_step_seconds"),
        "unlikelihood_loss_start": steps[0].get("unlikelihood_loss") if steps else None,
        "unlikelihood_loss_end": steps[-1].get("unlikelihood_loss") if steps else None,
    }


def _report(
    cfg: AlignConfig,
    data: _Inputs,
    splits: dict,
    gen_stats: dict,
    recovery: dict,
    n_continuation: int,
    n_sft: int,
) -> dict[str, Any]:
    """``align_report.json`` without the training, behaviour and timing parts (filled in by :func:`align`)."""
    return {
        "config": asdict(cfg),
        "data": {
            "refusal_source": data.refusal_src,
            "benign_sources": data.benign_src,
            "refusals_train": len(data.ref_train),
            "refusals_heldout": len(data.ref_held),
            "benign_prompts_train": len(data.ben_train),
            "benign_prompts_heldout": len(data.ben_held),
            "benign_own_answers": gen_stats,
            "recovery_examples": recovery,
            "continuation_examples": n_continuation,
            "sft_samples": n_sft,
        },
        "split": {
            k: {f: splits[k][f] for f in ("n_train", "n_heldout", "train_sha256", "heldout_sha256")}
            for k in ("refusals", "benign")
        },
    }


def align(cfg: AlignConfig) -> Path:
    """Run the alignment recipe (module docstring); return the merged model folder ``cfg.out``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    inputs = {"--model": cfg.model, "--refusals": cfg.refusals, "--benign": cfg.benign}
    with claim_output(out, inputs=inputs):  # never over an input; one writer while the recipe runs
        _prepare_out(out, cfg.overwrite)
        return _build(cfg, out)


def _build(cfg: AlignConfig, out: Path) -> Path:
    from spf.models import load_model

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    data = _load_inputs(cfg)  # every input is checked before anything is created on disk

    with atomic_dir(out) as tmp:
        splits = _write_splits(cfg, data, tmp)
        t0 = time.perf_counter()
        model, tokenizer = load_model(cfg.model, device=cfg.device)
        own, gen_stats = _own_answers(model, tokenizer, data.ben_train, cfg)
        recovery, rec_stats = _recovery_examples(model, tokenizer, data.ref_train, cfg)
        continuation = _continuation_examples(tokenizer, own, cfg)
        del model
        timings["generate_seconds"] = time.perf_counter() - t0
        logger.info(
            "own benign answers: %s; recovery examples: %s; continuation examples: %d",
            gen_stats,
            rec_stats,
            len(continuation),
        )
        # continuation right after recovery: the mix (and its seeded shuffle) is the one the base was built on
        mix, unlikelihood = _write_sft_data(cfg, data, own, recovery + continuation, tmp)

        t0 = time.perf_counter()
        result = _train_adapter(cfg, tmp, unlikelihood, len(data.ref_held))
        timings["train_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _merge_adapter(cfg, tmp)
        timings["merge_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        behaviour = _heldout_behaviour(cfg, data, tmp)
        if behaviour is not None:
            timings["eval_seconds"] = time.perf_counter() - t0

        report = _report(cfg, data, splits, gen_stats, rec_stats, len(continuation), len(mix))
        report["training"] = _training_summary(cfg, result.metrics)
        report["heldout_behaviour"] = behaviour
        report["timings"] = {**timings, "total_seconds": time.perf_counter() - t_start}
        save_json(report, tmp / "align_report.json")
    logger.info("aligned model written to %s (%.0f s)", out, time.perf_counter() - t_start)
    return out
