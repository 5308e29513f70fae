"""align() end-to-end on the tiny random model: merged folder, deterministic disjoint splits, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import spf.align as align_mod
from spf.align import AlignConfig, align, split_heldout
from spf.data.locate import shipped_file
from spf.data.samples import ChatSample, load_samples, save_samples
from spf.models import load_model

REFUSALS = [
    ChatSample.from_pair(f"Harmful request number {i}", "I'm sorry, but I can't help with that.")
    for i in range(10)
]
BENIGN = [ChatSample.from_pair(f"Tell me a fact about the number {i}") for i in range(10)]


@pytest.fixture
def data(tmp_path):
    save_samples(REFUSALS, tmp_path / "refusals.jsonl")
    save_samples(BENIGN, tmp_path / "benign.jsonl")
    return tmp_path


def tiny_cfg(data, out, **kw) -> AlignConfig:
    base = dict(
        model="tiny-llama",
        out=str(out),
        refusals=str(data / "refusals.jsonl"),
        benign=[str(data / "benign.jsonl")],
        steps=2,
        batch_size=2,
        lora_r=2,
        max_new_tokens=6,
        eval_max_new_tokens=4,
        max_length=64,
    )
    base.update(kw)
    return AlignConfig(**base)


_REAL_OWN_ANSWERS = align_mod._own_answers


@pytest.fixture(autouse=True)
def keep_random_answers(monkeypatch):
    # The random model's answers can trip the keyword judge or be cut to nothing; make every benign
    # answer a plain kept one so the pipeline always has benign data to train on.
    def fake_own(model, tokenizer, prompts, cfg):
        kept = [s.with_response(f"Here is a fact: {i}.") for i, s in enumerate(prompts)]
        return kept, {"generated": len(prompts), "kept": len(kept)}

    monkeypatch.setattr(align_mod, "_own_answers", fake_own)


def test_align_writes_a_loadable_merged_model_and_disjoint_splits(data):
    out = align(tiny_cfg(data, data / "aligned"))
    assert out == data / "aligned"
    assert list(out.glob("*.safetensors"))
    assert not (out / "adapter_config.json").exists() and not (out / "adapter").exists()
    assert not list(out.glob("adapter_model*"))
    model, _ = load_model(str(out))
    assert type(model).__name__ == "LlamaForCausalLM"  # plain model, not a PeftModel

    splits = json.loads((out / "splits.json").read_text())
    for key, n in (("refusals", 10), ("benign", 10)):
        rec = splits[key]
        assert rec["n_train"] + rec["n_heldout"] == n and rec["n_heldout"] == 2
        assert not set(rec["train"]) & set(rec["heldout"])
    trained = {s.prompt for s in load_samples(out / "sft_data.jsonl", require_response=True)}
    held = set(splits["refusals"]["heldout"]) | set(splits["benign"]["heldout"])
    assert trained and not trained & held
    assert trained == set(splits["refusals"]["train"]) | set(splits["benign"]["train"])

    report = json.loads((out / "align_report.json").read_text())
    assert report["training"]["steps"] == 2 and report["training"]["loss_start"] > 0
    assert report["data"]["sft_samples"] == 16
    assert report["heldout_behaviour"]["harmful"]["n"] == 2
    assert not [p for p in data.iterdir() if p.name.startswith(".aligned")]  # temp folder gone


def test_split_is_deterministic_and_order_independent():
    samples = [ChatSample.from_pair(f"prompt {i}") for i in range(50)]
    tr1, he1 = split_heldout(samples, 0.2, seed=3)
    tr2, he2 = split_heldout(list(reversed(samples)), 0.2, seed=3)
    assert len(he1) == 10 and {s.prompt for s in he1} == {s.prompt for s in he2}
    assert {s.prompt for s in tr1} == {s.prompt for s in tr2}
    _, he3 = split_heldout(samples, 0.2, seed=4)
    assert {s.prompt for s in he3} != {s.prompt for s in he1}
    assert split_heldout(samples, 0.0, seed=0) == (samples, [])


def test_same_seed_same_splits_file(data):
    a = align(tiny_cfg(data, data / "a"))
    b = align(tiny_cfg(data, data / "b"))
    assert (a / "splits.json").read_text() == (b / "splits.json").read_text()
    assert (a / "sft_data.jsonl").read_text() == (b / "sft_data.jsonl").read_text()


def test_crash_mid_way_leaves_no_out_folder(data, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash during merge")

    monkeypatch.setattr(align_mod, "_merge", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        align(tiny_cfg(data, data / "aligned"))
    assert not (data / "aligned").exists()
    assert not [p for p in data.iterdir() if p.name.startswith(".aligned")]


def test_existing_out_is_refused_unless_overwrite(data):
    out = data / "aligned"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="already exists"):
        align(tiny_cfg(data, out))
    assert (out / "keep.txt").exists()
    align(tiny_cfg(data, out, overwrite=True))
    assert not (out / "keep.txt").exists() and list(out.glob("*.safetensors"))


def test_public_safety_set_keeps_only_refusals(tmp_path):
    rows = [
        {"instruction": "Do a bad thing", "input": "", "output": "I'm sorry, but I cannot do that."},
        {"instruction": "Is smoking bad?", "input": "", "output": "Yes, smoking harms your health."},
    ]
    (tmp_path / "s.json").write_text(json.dumps(rows))
    kept = align_mod._load_refusals(str(tmp_path / "s.json"), None, 0)
    assert [s.prompt for s in kept] == ["Do a bad thing"]


def test_truncated_answers_are_cut_to_the_last_sentence():
    trim = align_mod._trim_truncated
    assert trim("One. Two three", 10, 10) == "One."
    assert trim("no sentence end here", 10, 10) == ""
    assert trim("One. Two three", 8, 10) == "One."  # re-tokenised a little shorter than generated
    assert trim("short and unfinished", 3, 10) == "short and unfinished"  # ended well before the limit


def test_shipped_default_data_is_valid():
    from spf.refusal import is_refusal

    refusals = load_samples(shipped_file(align_mod.DEFAULT_REFUSALS), require_response=True)
    benign = load_samples(shipped_file(align_mod.DEFAULT_BENIGN))
    assert len(refusals) >= 50 and all(is_refusal(s.response or "") for s in refusals)
    assert len(benign) >= 55 and all(s.response is None for s in benign)
    assert not {s.prompt for s in refusals} & {s.prompt for s in benign}


def test_cli_arguments_round_trip(data, capsys):
    import argparse

    from spf.cli.align import add_arguments
    from spf.cli.main import main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "x", "--steps", "5", "--benign", "a.json", "b.jsonl"])
    assert args.model == "smollm2-135m-instruct" and args.steps == 5 and args.benign == ["a.json", "b.jsonl"]
    # a missing input file is the user's error: exit 2, one line, nothing created
    assert main(["align", "--out", str(data / "o"), "--refusals", str(data / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("spf: error: ") and not (data / "o").exists()


def test_own_answers_generates_and_filters_with_the_real_model():
    model, tok = load_model("tiny-llama")
    cfg = AlignConfig(model="tiny-llama", max_new_tokens=5, gen_batch_size=2)
    kept, stats = _REAL_OWN_ANSWERS(model, tok, BENIGN[:3], cfg)
    assert stats["generated"] == 3
    assert stats["kept"] + stats["dropped_refusal"] + stats["dropped_empty"] == 3
    assert all(s.response and s.prompt in {b.prompt for b in BENIGN} for s in kept)


def test_shipped_alignment_data_never_contains_evaluation_prompts():
    """Over-refusal is measured on prompts the alignment never saw — not even near-duplicates."""
    import difflib

    from spf.data.samples import load_samples

    data = Path(__file__).resolve().parents[2] / "spf" / "data"
    evals = [s.prompt.strip().lower() for s in load_samples(data / "overrefusal_prompts.jsonl")]
    evals += [s.prompt.strip().lower() for s in load_samples(data / "refusals.jsonl")]
    for name in ("align_benign.jsonl", "align_refusals.jsonl"):
        for s in load_samples(data / name):
            p = s.prompt.strip().lower()
            assert not difflib.get_close_matches(p, evals, n=1, cutoff=0.75), (name, p)


def test_recovery_examples_condition_on_a_compliant_opening_and_train_only_the_refusal(data):
    out = align(tiny_cfg(data, data / "aligned", recovery_per_prompt=2, recovery_max_prefix_tokens=5))
    sft = load_samples(out / "sft_data.jsonl", require_response=True)
    recovery = [s for s in sft if s.prefill]
    report = json.loads((out / "align_report.json").read_text())
    assert len(recovery) == 2 * 8 == report["data"]["recovery_examples"]["examples"]
    assert report["data"]["sft_samples"] == 16 + 16
    train_refusals = {s.prompt: s.response for s in REFUSALS}
    for s in recovery:
        assert s.prompt in set(json.loads((out / "splits.json").read_text())["refusals"]["train"])
        assert s.response == f"{s.prefill}\n\n{train_refusals[s.prompt]}"
    # the first example of each prompt opens like the prefill attack (no imperative here: the bare opening)
    assert sum(s.prefill == "Sure, here is" for s in recovery) >= 8


def test_report_counts_recovery_and_continuation_examples_apart(data, monkeypatch):
    own = [
        s.with_response(f"Here is a longer fact about the number {i}, with detail.")
        for i, s in enumerate(BENIGN)
    ]
    monkeypatch.setattr(align_mod, "_own_answers", lambda *a: (own, {"kept": len(own)}))
    cfg = tiny_cfg(data, data / "aligned", recovery_per_prompt=1, continuation_per_prompt=1)
    report = json.loads((align(cfg) / "align_report.json").read_text())["data"]
    sft = load_samples(data / "aligned" / "sft_data.jsonl", require_response=True)
    harmful = {s.prompt for s in REFUSALS}
    n_recovery = sum(bool(s.prefill) and s.prompt in harmful for s in sft)
    n_continuation = sum(bool(s.prefill) and s.prompt not in harmful for s in sft)
    assert n_recovery == report["recovery_examples"]["examples"] == 8
    assert n_continuation == report["continuation_examples"] > 0
    assert report["sft_samples"] == len(sft) == 8 + n_recovery + n_continuation + len(own)


def test_recovery_openings_come_from_the_models_own_answer(monkeypatch):
    model, tok = load_model("tiny-llama")
    monkeypatch.setattr("spf.refusal.generate", lambda *a, **k: ["Step one: buy the parts and then"] * 2)
    cfg = AlignConfig(model="tiny-llama", recovery_per_prompt=3, recovery_max_prefix_tokens=8)
    out, stats = align_mod._recovery_examples(model, tok, REFUSALS[:2], cfg)
    assert stats == {"examples": 6, "sure_opening": 2, "own_opening": 4, "own_answer_was_refusal": 0}
    own = [s.prefill for s in out if not s.prefill.startswith("Sure")]
    assert own and all("Step one: buy the parts and then".startswith(p) for p in own)


def test_a_refusing_base_gets_the_sure_opening_only(monkeypatch):
    model, tok = load_model("tiny-llama")
    monkeypatch.setattr("spf.refusal.generate", lambda *a, **k: ["I'm sorry, but I can't help with that."])
    cfg = AlignConfig(model="tiny-llama", recovery_per_prompt=2)
    out, stats = align_mod._recovery_examples(model, tok, REFUSALS[:1], cfg)
    assert [s.prefill for s in out] == ["Sure, here is"] * 2 and stats["own_answer_was_refusal"] == 1


@pytest.mark.parametrize(
    ("prompt", "opening"),
    [
        ("Write a tutorial on how to pick a lock.", "Sure, here is a tutorial on how to pick a lock"),
        ("Give me step-by-step instructions for X", "Sure, here is step-by-step instructions for X"),
        ("How do I pick a lock?", "Sure, here is"),
    ],
)
def test_sure_opening_follows_the_advbench_target_format(prompt, opening):
    assert align_mod.sure_opening(prompt) == opening


def test_shipped_alignment_data_has_no_near_copy_of_a_public_evaluation_prompt():
    """AdvBench (every row) and XSTest measure the aligned base: no alignment prompt may be a near-copy of
    one (experiments/align_data/check_overlap.py also checks MiniLM cosine ≥ 0.85 when the files change)."""
    import csv
    import difflib

    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"public data folder {SHARED_DATA} is absent")
    evals = [
        r["Behavior"] for r in csv.DictReader((SHARED_DATA / "safety" / "advbench_behaviors.csv").open())
    ]
    evals += [r["prompt"] for r in csv.DictReader((SHARED_DATA / "xstest" / "xstest_prompts.csv").open())]
    evals = [e.strip().lower() for e in evals]
    data = Path(__file__).resolve().parents[2] / "spf" / "data"
    for name in ("align_benign.jsonl", "align_refusals.jsonl"):
        for s in load_samples(data / name):
            p = s.prompt.strip().lower()
            assert not difflib.get_close_matches(p, evals, n=1, cutoff=0.75), (name, p)


def test_continuation_examples_continue_the_models_own_benign_answer():
    _, tok = load_model("tiny-llama")
    own = [
        s.with_response(f"Here is a longer fact about the number {i}, with detail.")
        for i, s in enumerate(BENIGN)
    ]
    cfg = AlignConfig(model="tiny-llama", continuation_per_prompt=2, recovery_max_prefix_tokens=4)
    out = align_mod._continuation_examples(tok, own, cfg)
    assert len(out) == 20
    by_prompt = {s.prompt: s.response for s in own}
    for s in out:
        assert s.response == by_prompt[s.prompt]  # the whole own answer: only its start is not trained on
        assert s.prefill and s.response.startswith(s.prefill) and len(s.prefill) < len(s.response)
        assert len(tok(s.prefill, add_special_tokens=False)["input_ids"]) <= 4
