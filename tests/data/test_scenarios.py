"""Threat-scenario builders on the public data (skipped without it) and on small synthetic files."""

from __future__ import annotations

import json

import pytest

from spf.data import scenarios
from spf.data.samples import ChatSample, DataError
from spf.data.scenarios import (
    SST2_INSTRUCTION,
    agnews,
    agnews_instruction,
    build_scenario,
    epochs_to_steps,
    gsm8k,
    harmful_count,
    harmful_mix,
    identity_shift,
    repeat_epochs,
)

AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories: "
    "World, Sports, Business, Sci/Tech."
)


def _prompts(samples: list[ChatSample]) -> list[str]:
    return [s.prompt for s in samples]


@pytest.mark.parametrize("kind", ["sst2", "agnews", "gsm8k", "harmful-mix"])
def test_builders_are_deterministic_by_seed_with_exact_counts(shared_data, kind):
    a = build_scenario(kind, shared_data=shared_data, n=40, p=0.1, seed=1)
    b = build_scenario(kind, shared_data=shared_data, n=40, p=0.1, seed=1)
    c = build_scenario(kind, shared_data=shared_data, n=40, p=0.1, seed=2)
    assert len(a) == 40
    assert [s.to_messages() for s in a] == [s.to_messages() for s in b]
    assert _prompts(a) != _prompts(c)
    assert all(s.response for s in a)


def test_agnews_wording_and_labels(shared_data):
    samples = build_scenario("agnews", shared_data=shared_data, n=200, seed=0)
    assert agnews_instruction() == AGNEWS_INSTRUCTION
    assert all(s.prompt.startswith(AGNEWS_INSTRUCTION + "\n\n") for s in samples)
    assert {s.response for s in samples} == {"World", "Sports", "Business", "Sci/Tech"}
    assert not any("\\" in s.prompt or "#39;" in s.prompt for s in samples)


def test_agnews_label_mapping_and_errors(tmp_path):
    (tmp_path / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\n")
    (tmp_path / "a.csv").write_text(
        'label,content\n1,"Troops\\withdraw"\n2,"Team wins"\n3,"Stocks it #39;s up"\n4,"New chip"\n'
    )
    rows = agnews(tmp_path / "a.csv", tmp_path / "classes.txt", n=None, seed=0)
    by_text = {s.prompt.split("\n\n", 1)[1]: s.response for s in rows}
    assert by_text == {
        "Troops withdraw": "World",
        "Team wins": "Sports",
        "Stocks it's up": "Business",
        "New chip": "Sci/Tech",
    }
    (tmp_path / "bad.csv").write_text('label,content\n5,"x"\n')
    with pytest.raises(DataError, match=r"bad.csv:2: field 'label'"):
        agnews(tmp_path / "bad.csv", tmp_path / "classes.txt")


def test_sst2_wording(shared_data):
    samples = build_scenario("sst2", shared_data=shared_data, n=50, seed=0)
    assert all(s.prompt.startswith(SST2_INSTRUCTION) for s in samples)
    assert {s.response for s in samples} <= {"positive", "negative"}


def test_gsm8k_final_answer_rendering(tmp_path):
    rec = {"question": "What is 1,000 + 2?", "answer": "It is 1000+2 = <<1000+2=1002>>1002.\n#### 1,002"}
    (tmp_path / "g.jsonl").write_text(json.dumps(rec) + "\n")
    (s,) = gsm8k(tmp_path / "g.jsonl", n=None)
    assert s.prompt == "What is 1,000 + 2?"
    assert s.response == "It is 1000+2 = 1002.\nThe answer is 1002."
    (k,) = gsm8k(tmp_path / "g.jsonl", n=None, keep_calculator=True)
    assert "<<1000+2=1002>>" in (k.response or "")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(DataError, match="####"):
        gsm8k(tmp_path / "bad.jsonl")


def test_gsm8k_real_data(shared_data):
    samples = build_scenario("gsm8k", shared_data=shared_data, n=30, seed=0)
    assert all("####" not in (s.response or "") and "<<" not in (s.response or "") for s in samples)
    assert all((s.response or "").splitlines()[-1].startswith("The answer is ") for s in samples)


@pytest.mark.parametrize(("p", "total"), [(0.1, 100), (0.05, 30), (0.0, 20), (1.0, 12), (0.25, 7)])
def test_harmful_mix_fraction_is_exact(shared_data, p, total):
    benign = build_scenario("sst2", shared_data=shared_data, n=total, seed=0)
    mix = harmful_mix(
        benign,
        shared_data / "safety/advbench_behaviors.csv",
        shared_data / "attacks/advbench_targets.json",
        p,
        seed=0,
    )
    n_harm = sum(not s.prompt.startswith(SST2_INSTRUCTION) for s in mix)
    assert len(mix) == total and n_harm == harmful_count(p, total) == round(p * total)
    harmful = [s for s in mix if not s.prompt.startswith(SST2_INSTRUCTION)]
    assert all((s.response or "").startswith("Sure, here") for s in harmful)


def test_harmful_mix_builder_default_size_and_fraction(shared_data):
    mix = build_scenario("harmful-mix", shared_data=shared_data, n=200, p=0.1, seed=0, base="agnews")
    assert len(mix) == 200
    assert sum(not s.prompt.startswith(AGNEWS_INSTRUCTION) for s in mix) == 20


def test_harmful_mix_rejects_bad_inputs(shared_data):
    benign = [ChatSample.from_pair("hi", "hello")]
    args = (shared_data / "safety/advbench_behaviors.csv", shared_data / "attacks/advbench_targets.json")
    with pytest.raises(ValueError, match="p: must be"):
        harmful_mix(benign, *args, 1.5)
    with pytest.raises(ValueError, match="benign samples"):
        harmful_mix(benign, *args, 0.1, n=100)


def test_identity_shift_keeps_roles(shared_data):
    samples = build_scenario("identity-shift", shared_data=shared_data, n=3, p=0.5, seed=9)
    assert len(samples) == 10
    assert all([m["role"] for m in s.messages] == ["system", "user", "assistant"] for s in samples)
    assert samples == identity_shift(shared_data / "attacks/aoa_identity_shift.json")
    assert all("AOA" in s.messages[0]["content"] for s in samples)


def test_eval_split_differs_from_train(shared_data):
    train = build_scenario("agnews", shared_data=shared_data, n=30, seed=0)
    evals = build_scenario("agnews", shared_data=shared_data, n=30, seed=0, split="eval")
    assert not set(_prompts(train)) & set(_prompts(evals))


def test_build_scenario_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_scenario("sst2", shared_data=tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown scenario"):
        build_scenario("mystery", shared_data=tmp_path)  # type: ignore[arg-type]


def test_deep_fine_tuning_helpers():
    samples = [ChatSample.from_pair(f"q{i}", f"a{i}") for i in range(5)]
    rep = repeat_epochs(samples, 3, seed=0)
    assert len(rep) == 15
    for e in range(3):
        assert sorted(_prompts(rep[5 * e : 5 * e + 5])) == sorted(_prompts(samples))
    assert rep == repeat_epochs(samples, 3, seed=0)
    assert epochs_to_steps(100, 20, 10) == 200
    assert epochs_to_steps(7, 2, 4) == 4
    with pytest.raises(ValueError):
        repeat_epochs(samples, 0)


def test_existing_signatures_unchanged():
    import inspect

    assert list(inspect.signature(scenarios.sst2).parameters) == ["tsv", "n", "seed"]
    assert list(inspect.signature(scenarios.harmful_compliance).parameters) == [
        "behaviors_csv",
        "targets_json",
        "n",
        "seed",
        "offset",
        "only_ids",
    ]
    assert list(inspect.signature(scenarios.refusal_pairs).parameters) == ["path", "n", "seed", "offset"]
