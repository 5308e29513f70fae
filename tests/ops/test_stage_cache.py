"""The Prefect stage cache key: content hashes of parameters and inputs; reuse only a matching output."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("prefect")  # the optional [pipeline] stack: a core-only install skips this file

from spf.pipeline.params import PipelineParams
from tasks.stages import STAMP, input_key, output_matches


def _params(tmp_path: Path, **finetune) -> dict:
    p = PipelineParams().to_dict()
    p["runtime"]["workdir"] = str(tmp_path / "outputs")
    p["finetune"].update(finetune)
    return p


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_input_key_follows_its_own_section_and_input_bytes(tmp_path):
    out = tmp_path / "outputs"
    for name in ("aligned", "data", "subspace"):
        _write(out / name / "x.bin", name)
    base = input_key("finetune", _params(tmp_path))
    assert input_key("finetune", _params(tmp_path)) == base  # deterministic
    assert input_key("finetune", _params(tmp_path, steps=7)) != base  # its parameter section
    other = _params(tmp_path)
    other["gate"]["max_harmful_rate"] = 0.5  # a section it does not read
    assert input_key("finetune", other) == base
    _write(out / "subspace" / "x.bin", "changed")  # the bytes of an input
    assert input_key("finetune", _params(tmp_path)) != base
    assert input_key("prepare", _params(tmp_path)) == input_key("prepare", _params(tmp_path, steps=9))


def test_prepare_key_follows_the_prompts_its_heldout_set_is_filtered_against(tmp_path):
    """The held-out prompts drop whatever alignment and the baselines train on: a new file there re-runs it."""
    base = input_key("prepare", _params(tmp_path))
    aligned = _params(tmp_path)
    aligned["align"]["refusals"] = "my_refusals.jsonl"
    baseline = _params(tmp_path)
    baseline["finetune"]["baselines"]["safety_data"] = "pairs.jsonl"
    assert input_key("prepare", aligned) != base and input_key("prepare", baseline) != base
    other = _params(tmp_path)
    other["align"]["steps"] = 7  # the rest of align is not prepare's business
    assert input_key("prepare", other) == base


def test_cached_output_is_reused_only_while_its_stamp_matches(tmp_path):
    p = _params(tmp_path)
    key = input_key("prepare", p)
    data = tmp_path / "outputs" / "data"
    assert not output_matches("prepare", p, key)  # nothing on disk: run
    _write(data / STAMP, key + "\n")
    assert output_matches("prepare", p, key)
    # another run with other parameters overwrote the output: its stamp no longer matches
    p2 = _params(tmp_path)
    p2["prepare"]["n"] = 7
    _write(data / STAMP, input_key("prepare", p2) + "\n")
    assert not output_matches("prepare", p, key)


def test_aligned_folder_is_kept_across_a_new_align_option_at_its_default(tmp_path):
    """An aligned folder built before an `align` key existed is still the same base while that key is at
    its default (no 20-min rebuild); a changed value, a changed old key or an unreadable record rebuilds."""
    import json
    from dataclasses import asdict

    from spf.pipeline.params import AlignParams
    from spf.pipeline.stages import _same_align

    record = tmp_path / "align_params.json"
    old = asdict(AlignParams())
    del old["unlikelihood_weight"]  # written before the option existed
    record.write_text(json.dumps(old))
    assert _same_align(record, AlignParams())
    assert not _same_align(record, AlignParams(unlikelihood_weight=0.1))
    assert not _same_align(record, AlignParams(steps=121))
    record.write_text("{not json")
    assert not _same_align(record, AlignParams())


def test_effective_params_keep_the_files_comments(tmp_path):
    """A run with overrides (`-S estimate.rank=16`) edits the values in params.yaml like `dvc exp run -S`,
    keeping its comments and order; equal parameters leave the file alone; a broken file is rewritten."""
    import yaml

    from tasks.stages import write_params

    path = tmp_path / "params.yaml"
    text = (
        "# every knob\n"
        "estimate:\n"
        "  rank: 8          # k per module\n"
        "  loss: ce         # ce | margin\n"
        "finetune:\n"
        "  steps: 40\n"
        "  old_key: 1\n"
    )
    path.write_text(text)
    same = yaml.safe_load(text)
    stamp = path.stat().st_mtime_ns
    write_params(same, path)
    assert path.read_text() == text and path.stat().st_mtime_ns == stamp

    effective = {"estimate": {"rank": 16, "loss": "ce"}, "finetune": {"steps": 40, "lr": 0.0005}}
    write_params(effective, path)
    out = path.read_text()
    assert yaml.safe_load(out) == effective
    assert "# every knob" in out and "# k per module" in out and "# ce | margin" in out
    assert out.index("estimate:") < out.index("finetune:")

    path.write_text("estimate: [unclosed\n")
    write_params(effective, path)
    assert yaml.safe_load(path.read_text()) == effective


def test_write_back_round_trip_restores_the_teams_file(tmp_path):
    """The flow's params.yaml write-back (tasks.stages): a run that overrides a nested finetune key writes
    it in place; `overridden` says the team's file differs; `restore_params` puts its bytes back."""
    import yaml

    from spf.pipeline.presets import smoke_params
    from tasks.stages import overridden, restore_params, write_params

    path = tmp_path / "params.yaml"
    path.write_text("# the team's file\n" + yaml.safe_dump(smoke_params(), sort_keys=False))
    original = path.read_bytes()
    team = PipelineParams.from_dict(smoke_params()).to_dict()
    assert not overridden(original, team)  # only defaults spelled out: nothing to restore
    run = PipelineParams.from_dict({**smoke_params(), "finetune": {"lora": {"r": 4}}}).to_dict()
    assert overridden(original, run)
    write_params(run, path)
    assert yaml.safe_load(path.read_text())["finetune"]["lora"]["r"] == 4
    assert "# the team's file" in path.read_text()
    restore_params(path, original)
    assert path.read_bytes() == original
    restore_params(path, None)  # there was no file before the run
    assert not path.exists()
    assert overridden(b"finetune: [broken", team)  # an unreadable original counts as different
