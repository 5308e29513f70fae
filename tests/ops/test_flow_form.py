"""The spf-pipeline run form: typed fields with params.yaml's values, dropdowns for the vocabularies, and
only the fields a user changed overriding the workspace's params.yaml (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("prefect")

from flows.pipeline import build_params, changed_fields, spf_pipeline
from spf.pipeline.params import load_params
from spf.pipeline.presets import smoke_params
from tasks.tracking import flatten

ROOT = Path(__file__).resolve().parents[2]


def test_the_form_shows_params_yaml_values_and_dropdowns():
    schema = spf_pipeline.parameters.model_dump()["properties"]
    team = flatten(load_params(ROOT / "params.yaml").to_dict())
    for field, key in {"base_model": "align.model", "rank": "estimate.rank", "steps": "finetune.steps",
                       "lr": "finetune.lr", "max_harmful_rate": "gate.max_harmful_rate", "gate_mode": "gate.mode",
                       "registered_model": "tracking.registered_model"}.items():  # fmt: skip
        assert schema[field]["default"] == team[key], field
        assert "anyOf" not in schema[field]  # a typed field, not an "X | None" toggle
    assert schema["scenario"]["enum"][:2] == ["sst2", "agnews"] and "spf" in schema["method"]["enum"]
    assert schema["gate_mode"]["enum"] == ["enforce", "shadow", "manual"]
    assert (
        schema["rank"]["minimum"] == 1 and schema["max_harmful_rate"]["maximum"] == 1
    )  # the UI checks bounds
    assert schema["rank"]["description"] == "k, safety directions per module"  # from the docstring's Args
    with pytest.raises(Exception, match="greater than or equal to 1"):
        spf_pipeline.validate_parameters({"rank": 0})


def test_fields_left_at_their_defaults_defer_to_the_run_time_params_file(tmp_path: Path):
    team = flatten(load_params(ROOT / "params.yaml").to_dict())
    own = smoke_params()  # a workspace whose params.yaml differs from the deployed defaults
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(own))
    untouched = {k: team[k] for k in ("align.model", "estimate.rank", "finetune.steps")}
    assert changed_fields(untouched) == {}
    p = build_params(str(tmp_path / "params.yaml"), changed_fields(untouched), None)
    assert (p.align.model, p.estimate.rank, p.finetune.steps) == ("tiny-llama", 2, 2)  # the file's values
    changed = {**untouched, "estimate.rank": 3}
    p = build_params(str(tmp_path / "params.yaml"), changed_fields(changed), {"finetune.batch_size": 1})
    assert (p.align.model, p.estimate.rank, p.finetune.batch_size) == ("tiny-llama", 3, 1)
