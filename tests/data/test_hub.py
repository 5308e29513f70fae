"""datasets as the data layer: Dataset in and out, dataset folders, hub ids (offline here), row-level errors."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

from spf.cli.main import main  # noqa: E402
from spf.data.hub import is_hub_id, to_dataset  # noqa: E402
from spf.data.samples import ChatSample, DataError, load_samples, save_samples  # noqa: E402

SAMPLES = [
    ChatSample.from_pair("Name a colour", "Blue."),
    ChatSample(
        (
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Count to two"},
            {"role": "assistant", "content": "One, two."},
        ),
        prefill="One,",
    ),
    ChatSample.from_pair("A prompt with no answer yet"),
]


def test_samples_round_trip_through_a_dataset():
    ds = to_dataset(SAMPLES)
    assert ds.column_names == ["messages", "prefill", "source"] and len(ds) == 3
    assert ds[1]["messages"][0] == {"role": "system", "content": "Be brief."}  # TRL's conversational format
    back = load_samples(ds)
    assert [s.messages for s in back] == [s.messages for s in SAMPLES]
    assert [s.prefill for s in back] == ["", "One,", ""]
    assert back[2].response is None and back[0].source == "dataset:row 0"


def test_a_users_dataset_with_its_own_columns_loads_and_bad_rows_name_row_and_field():
    ds = datasets.Dataset.from_dict({"instruction": ["Say hi", "Say bye"], "output": ["Hi!", "Bye!"]})
    assert [s.response for s in load_samples(ds)] == ["Hi!", "Bye!"]
    typed = datasets.Dataset.from_dict({"prompt": ["a", "b"], "response": [1, 2]})
    with pytest.raises(DataError, match=r"dataset:row 0: field 'response': expected a string, got int"):
        load_samples(typed)
    marked = datasets.Dataset.from_dict(
        {"prompt": ["fine", "now <|im_start|>system"], "response": ["x", "y"]}
    )
    with pytest.raises(DataError, match=r"dataset:row 1: field 'prompt': contains the chat marker"):
        load_samples(marked)
    with pytest.raises(DataError, match=r"dataset:row 0: .*a non-empty response is required"):
        load_samples(datasets.Dataset.from_dict({"prompt": ["q"], "response": [None]}), require_response=True)


def test_a_dataset_dict_needs_its_split():
    dd = datasets.DatasetDict({"train": to_dataset(SAMPLES[:1]), "test": to_dataset(SAMPLES[1:2])})
    assert load_samples(dd)[0].prompt_messages()[-1]["content"] == "Name a colour"
    assert load_samples(dd, split="test")[0].prefill == "One,"
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: \['test', 'train'\]\)"):
        load_samples(dd, split="validation")


def test_dataset_folders_load_through_datasets(tmp_path):
    to_dataset(SAMPLES).save_to_disk(str(tmp_path / "saved"))  # Dataset.save_to_disk → load_from_disk
    assert [s.messages for s in load_samples(tmp_path / "saved")] == [s.messages for s in SAMPLES]
    repo = tmp_path / "repo" / "data"  # a hub repository's layout, on disk → load_dataset(folder)
    repo.mkdir(parents=True)
    rows = [{"prompt": f"Question {i}", "response": f"Answer {i}"} for i in range(3)]
    (repo / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_samples(tmp_path / "repo")
    assert [s.response for s in loaded] == ["Answer 0", "Answer 1", "Answer 2"]
    assert loaded[2].source == "repo[train]:row 2"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: not a dataset folder"):
        load_samples(tmp_path / "empty")


def test_a_hub_id_offline_fails_with_the_local_alternative(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        load_samples("nyu-mll/glue:sst2")
    text = str(err.value)
    assert text.startswith("nyu-mll/glue:sst2: could not load") and "offline" in text
    assert "spf data sst2 --out sst2.jsonl" in text
    with pytest.raises(DataError, match=r"heldout_harmful\.jsonl"):
        load_samples("walledai/AdvBench")


def test_a_hub_id_online_goes_to_load_dataset_with_its_config_and_split(monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, *, split, revision=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"sentence": ["it is great", "dull"], "label": [1, 0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    samples = load_samples("nyu-mll/glue:sst2", split="validation")
    assert calls == [("nyu-mll/glue", "sst2", "validation")]
    assert samples[0].source == "nyu-mll/glue:sst2[validation]:row 0" and samples[1].response is None


@pytest.mark.parametrize(
    ("text", "hub"),
    [("nyu-mll/glue", True), ("walledai/AdvBench", True), ("nyu-mll/glue:sst2", True), ("gsm8k", True),
     ("task.jsonl", False), ("runs/data/task.csv", False), ("a/b/c", False), ("../x", False)],
)  # fmt: skip
def test_hub_ids_are_told_from_file_paths(text, hub):
    assert is_hub_id(text) is hub


def test_a_missing_file_is_still_a_file_error(tmp_path):
    with pytest.raises((DataError, FileNotFoundError), match=r"missing\.jsonl"):
        load_samples(tmp_path / "missing.jsonl")


def test_spf_train_takes_a_dataset_folder(tmp_path):
    save_samples([ChatSample.from_pair(f"Say {i}", f"{i}.") for i in range(4)], tmp_path / "task.jsonl")
    to_dataset(load_samples(tmp_path / "task.jsonl")).save_to_disk(str(tmp_path / "task-ds"))
    rc = main(["train", "--model", "tiny-llama", "--data", str(tmp_path / "task-ds"), "--method", "vanilla",
               "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "ft")])  # fmt: skip
    assert rc == 0 and (tmp_path / "ft" / "adapter_model.safetensors").is_file()
