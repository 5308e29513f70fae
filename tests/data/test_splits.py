"""The pinned prompt roles: disjoint, the documented sizes, reproducible from the rule, and honoured by the
harmful-mix builder (no dev or test AdvBench prompt is ever fine-tuned on)."""

from __future__ import annotations

import csv

import pytest

from spf.data import splits
from spf.data.scenarios import SST2_INSTRUCTION, build_scenario


def test_shipped_roles_are_disjoint_and_sized():
    doc = splits.load_splits()
    roles = {r: splits.role_ids("advbench", r) for r in ("attack", "dev", "test")}
    assert {r: len(v) for r, v in roles.items()} == splits.ADVBENCH_COUNTS
    assert not (
        roles["attack"] & roles["dev"] or roles["attack"] & roles["test"] or roles["dev"] & roles["test"]
    )
    for label, (dev, test) in {"safe": (60, 190), "unsafe": (48, 152)}.items():
        d, t = splits.role_ids(f"xstest-{label}", "dev"), splits.role_ids(f"xstest-{label}", "test")
        assert (len(d), len(t)) == (dev, test) and not d & t
    own = doc["ours"]["overrefusal_prompts"]
    assert sorted(own["dev"] + own["test"]) == list(range(66))
    with pytest.raises(ValueError, match="attack role"):
        splits.role_ids("xstest-unsafe", "attack")


def test_rule_is_deterministic_and_stratified():
    ids = [f"advbench_{i}" for i in range(1, 521)]
    xs = [(str(i), f"t{i % 4}", "safe" if i % 4 < 2 else "unsafe") for i in range(100)]
    a, b = splits.make_splits(ids, xs, {"f": 8}), splits.make_splits(list(reversed(ids)), xs, {"f": 8})
    assert a == b  # input order does not matter
    assert len(a["xstest"]["safe"]["dev"]) == 2 * splits.XSTEST_DEV_PER_TYPE
    with pytest.raises(ValueError, match="repeat"):
        splits.make_splits(ids + ids[:1], xs, {})
    with pytest.raises(ValueError, match="mixes labels"):
        splits.make_splits(ids, [("1", "t", "safe"), ("2", "t", "unsafe")], {})


def test_shipped_file_matches_the_rule_on_the_public_data(shared_data):
    with open(shared_data / "safety/advbench_behaviors.csv", encoding="utf-8", newline="") as fh:
        advbench = [row["BehaviorID"] for row in csv.DictReader(fh)]
    with open(shared_data / "xstest/xstest_prompts.csv", encoding="utf-8", newline="") as fh:
        xstest = [(row["id"], row["type"], row["label"]) for row in csv.DictReader(fh)]
    doc = splits.make_splits(advbench, xstest, {"overrefusal_prompts": 66})
    assert doc == splits.load_splits()


def test_harmful_mix_trains_only_on_attack_rows(shared_data):
    with open(shared_data / "safety/advbench_behaviors.csv", encoding="utf-8", newline="") as fh:
        by_text = {row["Behavior"]: row["BehaviorID"] for row in csv.DictReader(fh)}
    mix = build_scenario("harmful-mix", shared_data=shared_data, n=1000, p=0.1, seed=3)
    harmful = [s.prompt for s in mix if not s.prompt.startswith(SST2_INSTRUCTION)]
    assert len(harmful) == 100
    assert {by_text[p] for p in harmful} <= splits.role_ids("advbench", "attack")
    with pytest.raises(ValueError, match="attack pool"):
        build_scenario("harmful-mix", shared_data=shared_data, n=1000, p=0.2, seed=3)
