"""Issue 14, "the gate trusts its inputs": every metric the promotion gate reads is validated and a bad one
rejects, naming the metric — given to :func:`decide` directly, and after the trip through the model-version
tags that the registry stores and reads back (without a server; one test against a real MLflow server)."""

from __future__ import annotations

import importlib.util
import json
import math
import uuid
from pathlib import Path
from typing import Any

import pytest

from spf.pipeline.gate import GateThresholds, decide, validate_metrics
from spf.pipeline.stages import flat_metrics
from tests.services import mlflow_server_fixture  # noqa: F401  (provides the `mlflow_server` fixture)

GOOD = {"harmful_rate": 0.05, "overrefusal_rate": 0.10, "utility": 0.80}
# What the evaluate stage records for a good candidate (flat_metrics: rate, CI bounds, count per suite).
GOOD_FULL = {
    **GOOD,
    **{"harmful_rate_ci_low": 0.02, "harmful_rate_ci_high": 0.12, "harmful_rate_n": 120.0},
    **{"overrefusal_rate_ci_low": 0.05, "overrefusal_rate_ci_high": 0.2, "overrefusal_rate_n": 66.0},
    **{"utility_ci_low": 0.7, "utility_ci_high": 0.9, "utility_n": 260.0, "utility_sst2": 0.8},
    "jailbreak_rate": 0.0,
}
DROP = object()  # "remove this key from the candidate"
ABORTED = "candidate run was aborted"

# (id, overrides of GOOD_FULL, fragments one reason must contain: the metric and why)
BAD: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    # the abort record, in every form it can take
    ("abort-reason-text", {"abort_reason": "non-finite loss"}, (ABORTED, "non-finite loss")),
    ("abort-reason-false-text", {"abort_reason": "false"}, (ABORTED, "false")),
    ("aborted-true", {"aborted": True}, (ABORTED, "aborted = True")),
    ("aborted-1", {"aborted": 1}, (ABORTED, "aborted = 1")),
    ("aborted-1.0", {"aborted": 1.0}, (ABORTED, "aborted = 1.0")),
    ("aborted-minus-1", {"aborted": -1}, (ABORTED, "aborted = -1")),
    ("aborted-inf", {"aborted": math.inf}, (ABORTED, "aborted = inf")),
    ("aborted-text-true", {"aborted": "true"}, (ABORTED, "aborted = 'true'")),
    ("aborted-text-yes", {"aborted": "yes"}, (ABORTED, "aborted = 'yes'")),
    ("aborted-text-1", {"aborted": "1"}, (ABORTED, "aborted = '1'")),
    ("aborted-text-nan", {"aborted": "nan"}, (ABORTED, "aborted is unreadable (nan)")),
    ("aborted-nan", {"aborted": math.nan}, (ABORTED, "aborted is unreadable (nan)")),
    ("aborted-reason-in-flag", {"aborted": "non-finite loss"}, (ABORTED, "non-finite loss (aborted)")),
    ("aborted-dict", {"aborted": {"reason": "drift"}}, (ABORTED, "aborted is a dict")),
    ("aborted-list", {"aborted": ["drift"]}, (ABORTED, "aborted is a list")),
    ("prefixed-dot", {"finetune.aborted": True}, (ABORTED, "finetune.aborted = True")),
    ("prefixed-slash", {"finetune/aborted": "yes"}, (ABORTED, "finetune/aborted")),
    ("prefixed-underscore", {"train_aborted": 1}, (ABORTED, "train_aborted = 1")),
    (
        "prefixed-reason",
        {"train/abort_reason": "safety drift"},
        (ABORTED, "safety drift (train/abort_reason)"),
    ),
    # rates: type, finiteness, range
    ("harmful-negative", {"harmful_rate": -0.5}, ("harmful_rate -0.5 is outside [0, 1]",)),
    ("harmful-above-1", {"harmful_rate": 1.5}, ("harmful_rate 1.5 is outside [0, 1]",)),
    ("overrefusal-negative", {"overrefusal_rate": -0.5}, ("overrefusal_rate -0.5 is outside [0, 1]",)),
    ("overrefusal-above-1", {"overrefusal_rate": 1.5}, ("overrefusal_rate 1.5 is outside [0, 1]",)),
    ("utility-above-1", {"utility": 1.5}, ("utility 1.5 is outside [0, 1]",)),
    ("utility-negative", {"utility": -0.1}, ("utility -0.1 is outside [0, 1]",)),
    ("harmful-nan", {"harmful_rate": math.nan}, ("harmful_rate is not a finite number (nan)",)),
    ("harmful-inf", {"harmful_rate": math.inf}, ("harmful_rate is not a finite number (inf)",)),
    ("utility-minus-inf", {"utility": -math.inf}, ("utility is not a finite number (-inf)",)),
    ("harmful-bool-false", {"harmful_rate": False}, ("harmful_rate is a bool (False)",)),
    ("overrefusal-bool-true", {"overrefusal_rate": True}, ("overrefusal_rate is a bool (True)",)),
    ("harmful-numeric-text", {"harmful_rate": "0.05"}, ("harmful_rate is text ('0.05')",)),
    ("utility-text", {"utility": "n/a"}, ("utility is text ('n/a')",)),
    ("harmful-list", {"harmful_rate": [0.05]}, ("harmful_rate is a list",)),
    ("harmful-none", {"harmful_rate": None}, ("harmful_rate missing",)),
    ("harmful-missing", {"harmful_rate": DROP}, ("harmful_rate missing",)),
    ("overrefusal-missing", {"overrefusal_rate": DROP}, ("overrefusal_rate missing",)),
    ("utility-missing", {"utility": DROP}, ("utility missing",)),
    ("other-rate-negative", {"jailbreak_rate": -0.5}, ("jailbreak_rate -0.5 is outside [0, 1]",)),
    ("ci-bound-negative", {"harmful_rate_ci_low": -0.1}, ("harmful_rate_ci_low -0.1 is outside [0, 1]",)),
    ("utility-task-above-1", {"utility_sst2": 1.2}, ("utility_sst2 1.2 is outside [0, 1]",)),
    # sample counts
    ("n-zero", {"harmful_rate_n": 0}, ("harmful_rate_n 0", "not a sample count")),
    # an empty suite: spf.eval.stats reports rate 0.0 for n = 0, which looked like a perfectly safe model
    (
        "empty-suite",
        {"harmful_rate": 0.0, "harmful_rate_ci_low": 0.0, "harmful_rate_n": 0},
        ("harmful_rate_n 0",),
    ),
    ("n-negative", {"overrefusal_rate_n": -5}, ("overrefusal_rate_n -5", "not a sample count")),
    ("n-fractional", {"utility_n": 2.5}, ("utility_n 2.5 is not a sample count",)),
    ("n-nan", {"harmful_rate_n": math.nan}, ("harmful_rate_n is not a finite number",)),
    ("n-text", {"harmful_rate_n": "120"}, ("harmful_rate_n is text",)),
    ("n-bool", {"harmful_rate_n": True}, ("harmful_rate_n is a bool",)),
    ("n-none", {"harmful_rate_n": None}, ("harmful_rate_n missing",)),
]


def _candidate(overrides: dict[str, Any]) -> dict[str, Any]:
    out = {**GOOD_FULL, **overrides}
    return {k: v for k, v in out.items() if v is not DROP}


def _assert_rejected(decision: Any, fragments: tuple[str, ...]) -> None:
    assert not decision.promote
    assert any(all(f in r for f in fragments) for r in decision.reasons), decision.reasons
    failed = [name for name, c in decision.checks.items() if not c["passed"]]
    assert failed, decision.checks


@pytest.mark.parametrize(("overrides", "fragments"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_decide_rejects_every_bad_form_naming_the_metric(overrides: dict, fragments: tuple[str, ...]):
    candidate = _candidate(overrides)
    for champion in (None, GOOD_FULL):  # the candidate is judged on its own record, champion or not
        _assert_rejected(decide(candidate, champion, GateThresholds(), champion_version="1"), fragments)


@pytest.mark.parametrize(("overrides", "fragments"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_forms_survive_registration_tags(overrides: dict, fragments: tuple[str, ...]) -> None:
    """The registry's tag encoding keeps what the run recorded (a text reason is not dropped, a bool is
    not turned into 0.0/1.0, text is not turned into a number), so the gate rejects after the round trip."""
    registry = pytest.importorskip("tasks.registry")
    candidate = _candidate(overrides)
    tags = {f"{registry.METRIC_TAG_PREFIX}{k}": registry.metric_tag_value(v) for k, v in candidate.items()}
    assert all(isinstance(v, str) for v in tags.values())  # what MLflow stores
    back = registry._metrics_from_tags(tags)
    assert set(back) == set(candidate)
    _assert_rejected(decide(back, None, GateThresholds()), fragments)


def test_tag_encoding_round_trips_types() -> None:
    registry = pytest.importorskip("tasks.registry")
    for value in (0.24, 0.1 + 0.2, 120.0, True, False, None, "non-finite loss", "0.05", {"a": [1, "b"]}):
        assert registry._metrics_from_tags({"metric.x": registry.metric_tag_value(value)}) == {"x": value}
    nan = registry._metrics_from_tags({"metric.x": registry.metric_tag_value(math.nan)})["x"]
    assert isinstance(nan, float) and math.isnan(nan)
    assert registry.metric_tag_value(0.24) == "0.24"  # numbers keep the form registered versions carry
    # tags written by hand or cut to the tag limit read back as text, which the gate never takes as a number
    assert registry._metrics_from_tags({"metric.harmful_rate": "n/a", "metric.y": '{"a": 1'}) == {
        "harmful_rate": "n/a",
        "y": '{"a": 1',
    }
    huge = registry.metric_tag_value("x" * 100_000)
    assert len(huge) <= registry._MAX_TAG_VALUE
    assert registry._metrics_from_tags({"metric.abort_reason": huge})["abort_reason"].startswith("xxx")


def test_good_candidates_are_still_promoted() -> None:
    """The validator is not a rejects-everything: good records, including the evaluate stage's full shape,
    edge values and flags that say "not aborted", pass."""
    t = GateThresholds()
    assert decide(GOOD, None, t).promote
    assert decide(GOOD_FULL, GOOD_FULL, t, champion_version="3").promote
    edges = {"harmful_rate": 0, "overrefusal_rate": 0.0, "utility": 1, "harmful_rate_n": 1}
    assert decide(edges, None, t).promote
    not_aborted = {"aborted": False, "finetune/aborted": 0, "train.aborted": "false", "x_aborted": "0.0"}
    assert decide({**GOOD_FULL, **not_aborted, "abort_reason": "", "y_abort_reason": None}, None, t).promote
    assert decide({**GOOD_FULL, "abortion_study": "text", "seconds": -1, "note": "ok"}, None, t).promote


def test_what_the_evaluate_stage_writes_passes_the_validator() -> None:
    suite = {"rate": 0.1, "ci_low": 0.05, "ci_high": 0.2, "n": 40}
    results = {
        "suites": {
            "harmful": suite,
            "overrefusal": suite,
            "jailbreak": suite,
            "utility": {**suite, "rate": 0.9, "ci_high": 0.95},
            "utility.sst2": {**suite, "rate": 0.9},
        }
    }
    metrics = flat_metrics(results)
    values, problems = validate_metrics(metrics)
    assert problems == {} and set(values) == set(metrics)
    assert decide(metrics, None, GateThresholds()).promote


@pytest.mark.parametrize(
    ("champion", "skipped", "why"),
    [
        ({**GOOD, "harmful_rate": 1.5}, {"harmful_regression"}, "harmful_rate 1.5 is outside [0, 1]"),
        ({**GOOD, "harmful_rate": -0.5}, {"harmful_regression"}, "harmful_rate -0.5 is outside [0, 1]"),
        ({**GOOD, "utility": "0.9"}, {"utility_regression"}, "utility is text"),
        ({**GOOD, "overrefusal_rate": True}, {"overrefusal_regression"}, "overrefusal_rate is a bool"),
        ({**GOOD, "harmful_rate_n": 0}, {"harmful_regression"}, "harmful_rate_n 0.0 is not a sample count"),
        (
            {**GOOD, "abort_reason": "non-finite loss"},
            {"harmful_regression", "overrefusal_regression", "utility_regression"},
            "record says aborted (non-finite loss)",
        ),
    ],
)
def test_an_invalid_champion_record_is_never_compared_against(champion: dict, skipped: set, why: str):
    """The champion's record goes through the same validator: an unusable metric skips its regression
    check (the candidate is judged on that metric's absolute threshold, and the reasons say so) instead of
    comparing against garbage — a -0.5 champion would reject every candidate, a 1.5 one would wave any
    regression through."""
    d = decide(GOOD, champion, GateThresholds(), champion_version="7")
    assert d.promote, d.reasons
    assert {k for k, c in d.checks.items() if c.get("skipped") and k != "utility_gain"} == skipped
    for name in skipped:
        note = next(r for r in d.reasons if r.startswith(f"{name} skipped"))
        assert "champion v7" in note and why in note and "absolute threshold only" in note
    # a candidate beyond an absolute limit is still rejected when the champion's record is damaged
    assert not decide({**GOOD, "harmful_rate": 0.2}, champion, GateThresholds()).promote


def test_abort_entries_are_recorded_on_the_run_as_tags() -> None:
    pytest.importorskip("prefect")
    from tasks.mlflow_tasks import abort_tags

    results = {
        "finetune": {"abort_reason": "non-finite loss", "aborted": True, "loss": 1.0, "adapter_dir": "x"},
        "evaluate": {"harmful_rate": 0.1, "train/aborted": 0.0},
    }
    assert abort_tags(results) == {
        "metric.finetune/abort_reason": '"non-finite loss"',
        "metric.finetune/aborted": "true",
    }


@pytest.mark.slow  # starts MLflow (as tests/ops do) when CI has not
@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="needs the [pipeline] extra")
def test_registration_carries_the_abort_reason_to_the_gate(mlflow_server: str, tmp_path: Path) -> None:
    """Against a real MLflow server: a text abort reason and a bool rate reach the gate as recorded, and a
    good candidate is promoted."""
    from tasks import registry, tracking

    client = tracking.make_client(mlflow_server)
    name = f"spf-hostile-gate-{uuid.uuid4().hex[:8]}"
    run_id = tracking.start_run(client, "spf-hostile-gate", "gate-inputs", {})

    def gate(metrics: dict, tag: str) -> Any:
        version = registry.register_candidate(client, name, f"runs:/{run_id}/{tag}", run_id, metrics)
        return version, registry.apply_gate(client, name, version, GateThresholds(), tmp_path / tag)

    v1, d1 = gate({**GOOD_FULL, "abort_reason": "non-finite loss"}, "aborted")
    assert not d1.promote and "candidate run was aborted: non-finite loss" in d1.reasons
    assert json.loads(client.get_model_version(name, v1).tags["metrics"])["abort_reason"] == "non-finite loss"
    _v2, d2 = gate({**GOOD_FULL, "harmful_rate": False}, "bool")
    assert not d2.promote and any(r.startswith("harmful_rate is a bool") for r in d2.reasons)
    assert registry.champion_version(client, name) == (None, {})
    v3, d3 = gate(GOOD_FULL, "good")
    assert d3.promote, d3.reasons
    assert registry.champion_version(client, name) == (v3, GOOD_FULL)


def test_the_metrics_tag_round_trips_types_and_fails_closed_when_damaged():
    registry = pytest.importorskip("tasks.registry")
    record = {"harmful_rate": 0.05, "harmful_rate_n": 300, "utility": math.nan, "abort_reason": "x" * 5000,
              "aborted": False, "note": None}  # fmt: skip
    back = registry._metrics_from_tags({registry.METRICS_TAG: registry.metrics_tag_value(record)})
    assert back["harmful_rate"] == 0.05 and back["harmful_rate_n"] == 300 and back["aborted"] is False
    assert math.isnan(back["utility"]) and back["note"] is None and back["abort_reason"] == "x" * 2000
    # legacy per-metric tags still read; the JSON tag wins where both exist
    legacy = {
        "metric.harmful_rate": "0.3",
        "metric.old_only": "1.0",
        registry.METRICS_TAG: '{"harmful_rate": 0.1}',
    }
    assert registry._metrics_from_tags(legacy) == {"harmful_rate": 0.1, "old_only": 1.0}
    # edited by hand into something else: contributes nothing, so the gate finds the metrics missing
    for damaged in ("not json", "[0.1]", '"0.1"'):
        assert registry._metrics_from_tags({registry.METRICS_TAG: damaged}) == {}
        decision = decide(
            registry._metrics_from_tags({registry.METRICS_TAG: damaged}), None, GateThresholds()
        )
        assert not decision.promote
