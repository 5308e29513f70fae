"""The default run on a fresh clone: the shipped data, its disjointness, and the prepare stage with the
public data folder hidden (what a user without ``../shared/data`` gets from the README's run command)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import spf.data.locate as locate
from spf.data.locate import shipped_file
from spf.data.samples import load_samples
from spf.pipeline.inputs import normalise_prompt
from spf.pipeline.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[2]


def _jsonl(name: str) -> list[dict]:
    with shipped_file(name).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _keys(rows: list[dict], field: str = "prompt") -> set[str]:
    return {normalise_prompt(r[field]) for r in rows}


# prompts that some alignment, estimation, training or judge-fitting step reads
SEEN_FILES = ("refusals.jsonl", "align_refusals.jsonl", "align_benign.jsonl", "judge_train.jsonl")


@pytest.fixture
def no_public_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fresh clone: no ``$SPF_SHARED_DATA`` and no ``../shared/data`` beside the checkout."""
    monkeypatch.delenv("SPF_SHARED_DATA", raising=False)
    monkeypatch.setattr(locate, "REPO_SHARED_DATA", tmp_path / "no-shared-data")
    assert locate.find_shared_data() is None


def test_shipped_heldout_harmful_shares_no_row_with_any_seen_set() -> None:
    rows = _jsonl("heldout_harmful.jsonl")
    test = [r for r in rows if r["split"] == "test"]
    dev = [r for r in rows if r["split"] == "dev"]
    assert len(test) >= 100 and len(dev) >= 20
    assert len(_keys(rows)) == len(rows), "duplicate prompts inside the held-out set"
    assert not _keys(test) & _keys(dev)
    for name in SEEN_FILES:
        assert not _keys(rows) & _keys(_jsonl(name)), f"held-out prompt also in {name}"


def test_shipped_utility_dev_is_disjoint_from_its_training_split() -> None:
    train = load_samples(shipped_file("sentiment_train.jsonl"), require_response=True)
    dev = load_samples(shipped_file("sentiment_dev.jsonl"), require_response=True)
    assert len(dev) >= 200 and len(train) >= 400
    train_keys = {normalise_prompt(s.prompt) for s in train}
    assert not train_keys & {normalise_prompt(s.prompt) for s in dev}
    for split in (train, dev):  # balanced labels: accuracy 0.5 is chance, not a constant answer's luck
        labels = [s.response for s in split]
        assert set(labels) == {"positive", "negative"}
        assert abs(labels.count("positive") - labels.count("negative")) <= len(labels) * 0.1


def test_default_params_validate_and_prepare_without_public_data(no_public_data, tmp_path: Path) -> None:
    params = load_params(ROOT / "params.yaml")  # the README's default, unchanged
    params.runtime.workdir = str(tmp_path / "outputs")
    from spf.pipeline.stages import prepare_stage

    out = prepare_stage(params)
    data = Path(out["data_dir"])
    manifest = json.loads((data / "manifest.json").read_text())
    by_role = {e["role"]: e for e in manifest["inputs"]}
    assert set(by_role) == {"train", "safety", "heldout_harmful", "utility_dev", "overrefusal"}
    assert all(e["source"] == "shipped" and e["path"].startswith("spf/data/") for e in by_role.values())
    assert by_role["heldout_harmful"]["path"] == "spf/data/heldout_harmful.jsonl"
    assert by_role["utility_dev"]["path"] == "spf/data/sentiment_dev.jsonl"
    assert by_role["utility_dev"]["rows"] >= 200

    with (data / "heldout_harmful.csv").open(newline="", encoding="utf-8") as fh:
        heldout = [r["prompt"] for r in csv.DictReader(fh)]
    assert len(heldout) >= 100 and by_role["heldout_harmful"]["rows"] == len(heldout)
    held = {normalise_prompt(h) for h in heldout}
    # never a prompt that alignment, safety estimation or training saw
    estimation = {normalise_prompt(s.prompt) for s in load_samples(data / "safety.jsonl")}
    alignment = _keys(_jsonl("align_refusals.jsonl")) | _keys(_jsonl("align_benign.jsonl"))
    train = load_samples(data / "train.jsonl", require_response=True)
    assert not held & estimation and not held & alignment
    assert not held & {normalise_prompt(s.prompt) for s in train}
    # utility is scored on rows the run never trained on
    dev = {normalise_prompt(s.prompt) for s in load_samples(shipped_file("sentiment_dev.jsonl"))}
    assert not dev & {normalise_prompt(s.prompt) for s in train}
    assert len(train) == params.prepare.n


def test_a_seen_prompt_is_removed_from_the_heldout_set(no_public_data, tmp_path: Path) -> None:
    """A user's safety candidates that repeat a held-out prompt (other case and punctuation) push it out."""
    first_test = next(r["prompt"] for r in _jsonl("heldout_harmful.jsonl") if r["split"] == "test")
    candidates = tmp_path / "candidates.jsonl"
    rows = [
        {"prompt": first_test.upper().rstrip(".?!") + " !!", "response": "I can't help with that."},
        *({"prompt": r["prompt"], "response": r["response"]} for r in _jsonl("refusals.jsonl")),
    ]
    candidates.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    params = load_params(ROOT / "params.yaml")
    params.runtime.workdir = str(tmp_path / "outputs")
    params.prepare.safety_samples = str(candidates)
    from spf.pipeline.stages import prepare_stage

    out = prepare_stage(params)
    assert out["heldout_removed_safety_candidates"] == 1
    with (Path(out["data_dir"]) / "heldout_harmful.csv").open(newline="", encoding="utf-8") as fh:
        assert first_test not in {r["prompt"] for r in csv.DictReader(fh)}
    manifest = json.loads((Path(out["data_dir"]) / "manifest.json").read_text())
    safety = next(e for e in manifest["inputs"] if e["role"] == "safety")
    assert safety["source"] == "user" and safety["rows"] == len(rows)


def test_public_scenarios_still_name_the_missing_folder(no_public_data, tmp_path: Path) -> None:
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["prepare"]["scenario"] = "harmful-mix"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ParamsError, match=r"prepare\.scenario: 'harmful-mix' needs the public data folder"):
        load_params(path)
