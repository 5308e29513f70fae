"""Safety-gated MLflow model registry: candidates get the ``challenger`` alias; only a version that
passes :func:`spf.pipeline.gate.decide` gets ``champion``.

Metrics travel as model-version tags (``metric.harmful_rate`` ...) rather than being looked up in the
run: the version then carries its own evidence, and the gate reads exactly what was registered.

Aliases, not stages: stages are deprecated in MLflow 3. Consumers load ``models:/NAME@champion``.

Concurrent pipelines: MLflow has no conditional alias update, so every move of ``champion`` (the gate, a
rollback) happens inside :class:`RegistryLock` — a registered model ``<NAME>.lock`` whose creation is
atomic through the tracking server's database (unique model name). Inside it the champion is re-read and
the candidate judged against the champion *at that moment*, so two runs finishing together end with the
one the gate's rule picks, never a lost update.
"""

from __future__ import annotations

import json
import logging
import numbers
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from spf.pipeline.gate import GateDecision, GateThresholds, decide
from tasks.registry_lock import (  # the lock's names stay importable from here (callers, tests)
    LOCK_SUFFIX,  # noqa: F401
    RegistryLock,
    RegistryLockLost,
    RegistryLockTimeout,  # noqa: F401
    already_exists,
    is_missing,
)
from tasks.tracking import MAX_PARAM_VALUE_LENGTH, make_client, redact, resolve_tracking_uri

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
PENDING = "pending-approval"  # gate.mode manual: a passing candidate waits here for a person's approval
# registry version descriptions are capped server-side (a 5000-character column in the SQL stores)
_MAX_DESCRIPTION = 5000
METRIC_TAG_PREFIX = "metric."  # one tag per metric: versions registered before METRICS_TAG
METRICS_TAG = "metrics"  # every metric of a version, one JSON object
MAX_CAS_ATTEMPTS = 3
REGISTRATION_KEY_TAG = "spf.registration_key"
# Model-version tag values are capped server-side; the full decision is in the report file anyway.
_MAX_TAG_VALUE = MAX_PARAM_VALUE_LENGTH - 1000
_MAX_METRIC_TEXT = 1000  # a text metric (an abort reason) is cut to this many characters on the version


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
        logger.info("created registered model %s", name)
    except MlflowException as exc:
        if not already_exists(exc):
            raise


def _source_for(client: MlflowClient, model_uri: str) -> str:
    """``runs:/ID/path`` -> the run's real artifact location (what ``mlflow.register_model`` stores).

    Resolved with *this* client, not MLflow's global tracking URI, so a client pointed at another
    server registers the right location.
    """
    if model_uri.startswith("models:/m-"):
        # A LoggedModel: its artifact location, looked up here. Given `models:/m-…` itself, the server
        # resolves it with MLflow's *global* client in its own process (sqlite:///mlflow.db in its cwd
        # unless MLFLOW_TRACKING_URI is set there), which does not find a model logged to its real store.
        return client.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    if not model_uri.startswith("runs:/"):
        return model_uri
    run_id, _, artifact_path = model_uri[len("runs:/") :].partition("/")
    root = client.get_run(run_id).info.artifact_uri.rstrip("/")
    return f"{root}/{artifact_path}" if artifact_path else root


def metric_tag_value(value: Any) -> str:
    """A metric as a model-version tag value that reads back as what was recorded (:func:`_tag_metric`).

    A real number is its full-precision ``repr`` (``0.24``; "nan"/"inf" stay visible and fail the gate), the
    form every version registered so far carries. Anything else - a text ``abort_reason``, a bool, None, a
    mapping - is JSON (``"non-finite loss"`` with its quotes, ``true``), so it is neither dropped nor mistaken
    for a number: the gate sees the recorded type and judges it (an aborted run stays aborted; a bool or
    numeric-text rate is rejected as invalid evidence).
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return repr(float(value))
    if isinstance(value, str) and len(value) > _MAX_METRIC_TEXT:
        value = value[: _MAX_METRIC_TEXT - 1] + "…"  # a reason is kept readable; its head is what matters
    text = json.dumps(value, default=str, ensure_ascii=False)
    # A mapping too long for a tag is cut: no longer JSON, it reads back as text, which the gate rejects
    # as a rate and counts as aborted as an abort entry (fail-closed either way).
    return text[:_MAX_TAG_VALUE]


def _tag_metric(text: str) -> Any:
    """A ``metric.*`` tag value back as the value registered: a number, else the JSON value, else the text."""
    try:
        return float(text)  # the number form, and every tag written before non-numbers were kept
    except (TypeError, ValueError):
        pass
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text  # set by hand or cut: the gate judges it as text (never a number, never "not aborted")


def register_candidate(
    client: MlflowClient,
    name: str,
    model_uri: str,
    run_id: str | None,
    metrics: Mapping[str, Any],
    tags: Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
) -> str:
    """Register ``model_uri`` as a new version of ``name``, tag it with its metrics, alias it ``challenger``.

    Returns the version as a string. Every metric is recorded, numeric or not, in the ``metrics`` JSON tag
    (:func:`metrics_tag_value`): a text ``abort_reason`` or a bool must reach the gate as it was recorded,
    where it fails closed; dropping it would let an aborted run be promoted.

    ``idempotency_key`` (the pipeline passes its MLflow run id and model URI) makes a retry safe: when a
    version carrying the same key exists — a previous attempt created it and then lost the server before
    the alias was set — that version is completed and returned instead of registering a duplicate.
    """
    _ensure_registered_model(client, name)
    if idempotency_key is not None:
        existing = _version_with_key(client, name, idempotency_key)
        if existing is not None:
            client.set_registered_model_alias(name, CHALLENGER, existing)
            logger.info("%s version %s already registered by an earlier attempt: reused", name, existing)
            return existing
    version_tags: dict[str, str] = {k: str(v)[:_MAX_TAG_VALUE] for k, v in redact(dict(tags or {})).items()}
    version_tags[METRICS_TAG] = metrics_tag_value(redact(dict(metrics)))
    if idempotency_key is not None:
        version_tags[REGISTRATION_KEY_TAG] = idempotency_key
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    mv = client.create_model_version(
        name=name, source=_source_for(client, model_uri), run_id=run_id, tags=version_tags, model_id=model_id
    )
    version = str(mv.version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    logger.info("registered %s version %s from %s (alias %s)", name, version, model_uri, CHALLENGER)
    return version


def _version_with_key(client: MlflowClient, name: str, key: str) -> str | None:
    quoted = name.replace("'", "\\'")
    value = key.replace("'", "\\'")
    found = client.search_model_versions(f"name='{quoted}' and tags.`{REGISTRATION_KEY_TAG}`='{value}'")
    versions = [int(mv.version) for mv in found]
    return str(min(versions)) if versions else None


def metrics_tag_value(metrics: Mapping[str, Any]) -> str:
    """Every metric in one JSON tag (``metrics``), so a version carries a handful of tags and its card,
    not one tag per metric. JSON keeps the recorded types: numbers (NaN and inf too: Python's JSON writes
    and reads them), texts, bools, None; a text is cut to 2,000 characters; anything else is its str."""

    def cut(value: Any) -> Any:
        return value[:2000] if isinstance(value, str) else value

    return json.dumps({str(k): cut(v) for k, v in metrics.items()}, default=str, sort_keys=True)


def _metrics_from_tags(tags: Mapping[str, str]) -> dict[str, Any]:
    """The registered metrics (the ``metrics`` JSON tag; versions registered before it: one ``metric.*``
    tag each) as the values recorded (numbers, texts, bools ...), unvalidated: judging them is the gate's
    job (:func:`spf.pipeline.gate.decide`), for the candidate and the champion alike. A ``metrics`` tag
    that is not a JSON object (edited by hand) contributes nothing: the gate then finds the metrics missing
    and fails closed."""
    out = {
        k[len(METRIC_TAG_PREFIX) :]: _tag_metric(v)
        for k, v in tags.items()
        if k.startswith(METRIC_TAG_PREFIX)
    }
    if METRICS_TAG in tags:
        try:
            blob = json.loads(tags[METRICS_TAG])
        except (TypeError, ValueError):
            blob = None
        if isinstance(blob, dict):
            out.update(blob)
        else:
            logger.warning("model version tag %r is not a JSON object: ignored", METRICS_TAG)
    return out


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as exc:
        if is_missing(exc):
            return None
        raise
    version = aliases.get(alias)
    # A server returns versions as strings, the local SQLite store as ints: compare as strings.
    return None if version is None else str(version)


def version_metrics(client: MlflowClient, name: str, version: str) -> dict[str, Any]:
    """The registered metrics of one model version, as the values recorded (:func:`_metrics_from_tags`)."""
    return _metrics_from_tags(client.get_model_version(name, str(version)).tags or {})


def champion_version(client: MlflowClient, name: str) -> tuple[str | None, dict[str, Any]]:
    """``(version, metrics)`` of the version aliased ``champion``; ``(None, {})`` when there is none."""
    version = _alias_version(client, name, CHAMPION)
    if version is None:
        return None, {}
    return version, version_metrics(client, name, version)


def _data_lines(data: list[dict[str, Any]]) -> list[str]:
    """The data the candidate was trained and judged on (the prepare stage's manifest), as markdown."""
    if not data:
        return []
    rows = [
        f"| {e.get('role')} | {e.get('source')} | {e.get('path')} | {e.get('rows')} | `{str(e.get('sha256', ''))[:12]}` |"
        for e in data
    ]
    return ["## Data", "", "| role | source | file | rows | sha256 |", "|---|---|---|---|---|", *rows, ""]


def _metric_rows(metrics: Mapping[str, Any]) -> list[str]:
    """The headline rates with their 95 % Wilson intervals and n, as a markdown table."""
    rows = []
    for key in (
        "harmful_rate",
        "overrefusal_rate",
        "jailbreak_rate",
        "prefill_rate",
        "utility",
        "base_utility",
    ):
        value = metrics.get(key)
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            continue
        lo, hi, n = (metrics.get(f"{key}_{s}") for s in ("ci_low", "ci_high", "n"))
        ci = f"[{lo:.3f}, {hi:.3f}]" if isinstance(lo, numbers.Real) and isinstance(hi, numbers.Real) else "-"
        rows.append(
            f"| {key} | {float(value):.3f} | {ci} | {int(n) if isinstance(n, numbers.Real) else '-'} |"
        )
    if not rows:
        return []
    return ["| metric | rate | 95 % CI (Wilson) | n |", "|---|---|---|---|", *rows, ""]


def _report_markdown(
    name: str,
    version: str,
    decision: GateDecision,
    thresholds: GateThresholds,
    data: list[dict[str, Any]],
    metrics: Mapping[str, Any] | None = None,
    about: Mapping[str, Any] | None = None,
) -> str:
    """The model card: what the version is (base, method, data and its hash), how safe and useful it
    measured (rates with intervals), and what the gate decided and why. It is the registry version's
    description and the run's ``gate/gate.md``."""
    verdict = {
        "promoted": "PROMOTED to champion",
        "would-promote": "WOULD PROMOTE (shadow mode: champion unchanged)",
        "awaiting-approval": f"PASSED, AWAITING APPROVAL (alias {PENDING}; champion unchanged)",
    }.get(decision.outcome, "REJECTED (champion unchanged)")
    before = f"v{decision.champion_version}" if decision.champion_version else "none"
    about = dict(about or {})
    facts = [(k, about.get(k)) for k in ("base_model", "method", "scenario", "judge", "run_id")]
    rates = _metric_rows(metrics or {})
    lines = [
        f"# {name} v{version}",
        "",
        f"**Gate: {verdict}** (mode {thresholds.mode}) - champion before: {before}",
        "",
        *(["| | |", "|---|---|", *[f"| {k} | `{v}` |" for k, v in facts if v not in (None, "")], ""] if any(v for _, v in facts) else []),
        *(["## Safety and utility (held-out test prompts)", "", *rates] if rates else []),
        "## Gate reasons",
        "",
        *[f"- {r}" for r in decision.reasons],
        "",
        "## Checks",
        "",
        "| check | value | threshold | passed |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for check, c in decision.checks.items():
        value = c.get("value")
        shown = "missing" if value is None else f"{value:.4g}"
        note = f" ({c['skipped']})" if c.get("skipped") else ""
        lines.append(
            f"| {check} | {shown} | {c.get('threshold'):.4g} | {'yes' if c['passed'] else 'NO'}{note} |"
        )
    lines += ["", *_data_lines(data)]
    if about.get("settings"):
        lines += [
            "## Fine-tuning settings",
            "",
            "```json",
            json.dumps(about["settings"], sort_keys=True),
            "```",
            "",
        ]
    lines += ["## Thresholds", "", "```json", json.dumps(thresholds.to_dict(), indent=2)]
    return "\n".join([*lines, "```", ""])


def model_card(text: str) -> str:
    """``text`` cut to what a registry description holds, saying so when cut."""
    if len(text) <= _MAX_DESCRIPTION:
        return text
    tail = "\n\n*(cut: the full card is the run's gate/gate.md)*\n"
    return text[: _MAX_DESCRIPTION - len(tail)] + tail


def _write_report(
    report_dir: str | Path,
    name: str,
    version: str,
    decision: GateDecision,
    thresholds: GateThresholds,
    data: list[dict[str, Any]],
    metrics: Mapping[str, Any] | None = None,
    about: Mapping[str, Any] | None = None,
) -> str:
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": name,
        "version": version,
        "decision": decision.outcome,
        **decision.to_dict(),
        "thresholds": thresholds.to_dict(),
        "data": data,  # data/manifest.json's inputs: role, source, file, rows, sha256
        "about": dict(about or {}),
    }
    card = _report_markdown(name, version, decision, thresholds, data, metrics, about)
    (out / "gate.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out / "gate.md").write_text(card)
    return card


def _gate_locked(
    client: MlflowClient, name: str, version: str, thresholds: GateThresholds, lock: RegistryLock | None
) -> GateDecision:
    """Decide against the champion read now and move the alias (compare-and-set, see apply_gate)."""
    candidate = version_metrics(client, name, version)
    decision: GateDecision | None = None
    for attempt in range(1, MAX_CAS_ATTEMPTS + 1):
        before, champ_metrics = champion_version(client, name)
        # Re-judging the current champion (a rerun of the gate) compares it with nothing but the limits.
        against = champ_metrics if before is not None and before != version else None
        decision = decide(candidate, against, thresholds, champion_version=before)
        if not decision.promote:
            break
        current = _alias_version(client, name, CHAMPION)
        if current != before:  # a writer that bypassed the lock (a person in the UI, an old client)
            logger.warning(
                "champion of %s moved from %s to %s during the gate (attempt %d); re-deciding",
                name,
                before,
                current,
                attempt,
            )
            continue
        if lock is not None and not lock.owned():
            raise RegistryLockLost(
                f"promotion lock {lock.lock_name!r} was broken as stale while gating v{version}; "
                "champion not moved (raise SPF_REGISTRY_LOCK_STALE_S if gates are this slow)"
            )
        client.set_registered_model_alias(name, CHAMPION, version)
        logger.info("%s v%s promoted to %s (was %s)", name, version, CHAMPION, before)
        break
    else:
        assert decision is not None
        decision = GateDecision(
            promote=False,
            reasons=[f"champion alias kept changing during {MAX_CAS_ATTEMPTS} attempts; not promoted"],
            checks=decision.checks,
            champion_version=_alias_version(client, name, CHAMPION),
        )
    assert decision is not None
    if decision.outcome == "awaiting-approval":
        client.set_registered_model_alias(name, PENDING, version)
    gate_tags = {
        "gate.decision": decision.outcome,
        "gate.mode": thresholds.mode,
        "gate.thresholds": json.dumps(thresholds.to_dict()),
        "gate.reasons": json.dumps(decision.reasons)[:_MAX_TAG_VALUE],
        "gate.checks": json.dumps(decision.checks)[:_MAX_TAG_VALUE],
        "gate.champion_before": decision.champion_version or "none",
    }
    for key, value in gate_tags.items():
        client.set_model_version_tag(name, version, key, value)
    return decision


def apply_gate(
    client: MlflowClient,
    name: str,
    version: str,
    thresholds: GateThresholds,
    report_dir: str | Path,
    *,
    lock: bool | RegistryLock = True,
    data: list[dict[str, Any]] | None = None,
    about: Mapping[str, Any] | None = None,
) -> GateDecision:
    """Decide on ``version`` against the current champion and promote it when it passes.

    Writes ``gate.decision``/``gate.reasons``/``gate.checks``/``gate.champion_before`` tags on the
    version and ``gate.json`` + ``gate.md`` into ``report_dir`` (the caller logs them to its run); ``data``
    (the run's data manifest entries) is recorded in both.

    Concurrency: read champion → decide → move alias → record happens inside :class:`RegistryLock`
    (``lock=True``, or a configured ``RegistryLock``), so concurrent gates are serialised and each judges
    against the champion the previous one left: exactly one champion, the one the rule picks. The alias is
    also re-read right before it is moved (compare-and-set) against writers that do not take the lock; if
    it changed, the candidate is re-judged (at most ``MAX_CAS_ATTEMPTS`` times, then rejected,
    fail-closed). ``lock=False`` (tests only) shows the race the lock closes. A rejected candidate never
    touches ``champion``.
    """
    version = str(version)
    if lock is False:
        decision = _gate_locked(client, name, version, thresholds, None)
    else:
        held = lock if isinstance(lock, RegistryLock) else RegistryLock(client, name)
        with held:
            decision = _gate_locked(client, name, version, thresholds, held)
    _publish_card(client, report_dir, name, version, decision, thresholds, data or [], about)
    return decision


def _publish_card(
    client: MlflowClient,
    report_dir: str | Path,
    name: str,
    version: str,
    decision: GateDecision,
    thresholds: GateThresholds,
    data: list[dict[str, Any]],
    about: Mapping[str, Any] | None,
) -> None:
    """The card of a judged version, from its registered metrics: gate.md/gate.json and its description."""
    metrics = version_metrics(client, name, version)
    card = _write_report(report_dir, name, version, decision, thresholds, data, metrics, about)
    client.update_model_version(name, version, description=model_card(card))


def approve(
    client: MlflowClient, name: str, version: str, approver: str, report_dir: str | Path | None = None
) -> GateDecision:
    """A person approves ``version``, parked under ``pending-approval`` by a ``manual`` gate: it is judged
    again, with the thresholds recorded at its gate, against the champion of this moment (which may have
    moved since), and promoted only if it still passes. Either way the pending alias is removed and the
    version's tags, description and report say who decided and what."""
    version = str(version)
    if not approver.strip():
        raise ValueError("approve needs the approver's name")
    with RegistryLock(client, name) as held:
        if _alias_version(client, name, PENDING) != version:
            raise LookupError(f"{name} v{version} is not awaiting approval (alias {PENDING!r} is elsewhere)")
        recorded = client.get_model_version(name, version).tags.get("gate.thresholds")
        settings = json.loads(recorded) if recorded else {}
        thresholds = GateThresholds.from_dict({**settings, "mode": "enforce"})
        decision = _gate_locked(client, name, version, thresholds, held)
        client.delete_registered_model_alias(name, PENDING)
        client.set_model_version_tag(name, version, "gate.approved_by", approver[:200])
    decision.reasons.append(f"approved by {approver}")
    out = Path(report_dir) if report_dir is not None else Path(tempfile.mkdtemp(prefix="spf-approve-"))
    _publish_card(client, out, name, version, decision, thresholds, [], {"approved_by": approver})
    logger.info("%s v%s approved by %s: %s", name, version, approver, decision.outcome)
    return decision


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.registry approve NAME VERSION --by WHO``: the manual gate's approval step."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tasks.registry", description=main.__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    ok = sub.add_parser("approve", help="judge a pending-approval version again and promote it if it passes")
    ok.add_argument("name")
    ok.add_argument("version")
    ok.add_argument("--by", required=True, help="who approves (recorded on the version)")
    ok.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or the project's")
    args = ap.parse_args(argv)
    client = make_client(resolve_tracking_uri(args.tracking_uri))
    try:
        decision = approve(client, args.name, args.version, args.by)
    except LookupError as err:
        print(f"error: {err}")
        return 2
    print(f"{args.name} v{args.version}: {decision.outcome} - " + "; ".join(decision.reasons))
    return 0 if decision.promote else 1


if __name__ == "__main__":
    raise SystemExit(main())


def rollback_champion(
    client: MlflowClient,
    name: str,
    previous_version: str | None,
    *,
    promoted_version: str | None = None,
) -> None:
    """Point ``champion`` back at ``previous_version``, or remove the alias when there was none.

    Meant for a Prefect transaction's ``on_rollback`` hook: if a step after the promotion fails, the
    registry returns to the state before it. Runs under :class:`RegistryLock`; with ``promoted_version``
    it only acts while ``champion`` is still that version — a promotion by another run since is kept.
    """
    with RegistryLock(client, name):
        if promoted_version is not None:
            current = _alias_version(client, name, CHAMPION)
            if current != str(promoted_version):
                logger.warning(
                    "not rolling back %s: %s is v%s now, not v%s", name, CHAMPION, current, promoted_version
                )
                return
        if previous_version is None:
            try:
                client.delete_registered_model_alias(name, CHAMPION)
            except MlflowException as exc:
                if not is_missing(exc):
                    raise
            logger.warning("rolled back %s: alias %s removed", name, CHAMPION)
            return
        client.set_registered_model_alias(name, CHAMPION, str(previous_version))
        logger.warning("rolled back %s: %s -> v%s", name, CHAMPION, previous_version)


def load_champion(name: str, tracking_uri: str | None = None, dst_path: str | Path | None = None) -> Any:
    """Load ``models:/NAME@champion`` as a pyfunc model.

    The alias is resolved once with an explicit client and the pinned version is downloaded, instead
    of ``mlflow.pyfunc.load_model("models:/NAME@champion")`` with a global ``mlflow.set_tracking_uri``:
    no process-wide state is changed, and a promotion landing mid-download cannot mix two versions.
    """
    import mlflow.artifacts
    import mlflow.pyfunc

    uri = resolve_tracking_uri(tracking_uri)
    client = make_client(uri)
    version = _alias_version(client, name, CHAMPION)
    if version is None:
        raise LookupError(f"registered model {name!r} has no {CHAMPION!r} alias")
    dst = Path(dst_path) if dst_path is not None else Path(tempfile.mkdtemp(prefix="spf-champion-"))
    # The version's own artifact location, not a models:/ URI: MLflow resolves models:/ with the global
    # registry URI even when one is passed to download_artifacts.
    source = client.get_model_version_download_uri(name, version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri)
    logger.info("loading %s v%s (%s) from %s", name, version, CHAMPION, local)
    return mlflow.pyfunc.load_model(local)
