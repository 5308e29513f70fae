"""``spf_pipeline``: DVC data versioning → align → single-sample safety subspace → SPF fine-tuning (a GPU
deployment) → evaluation → MLflow tracking → registry promotion gate.

Parameters are typed so the Prefect UI renders a form; everything not on the form is reachable through
``overrides`` (dotted keys of params.yaml). Invalid parameters (unknown method, negative rank, missing
dataset …) fail in the first step, before any work. The run's effective parameters are written to
``params.yaml`` (as ``dvc exp run -S`` does) and the stage outputs are committed to DVC, so ``dvc.lock``
describes the run and its hash is tagged on the MLflow run.

Run it:  python -m flows.pipeline [--set finetune.steps=20 ...]   (Prefect's ephemeral mode unless
PREFECT_API_URL points at a server; MLflow on runs/mlflow/mlflow.db unless MLFLOW_TRACKING_URI is set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.transactions import transaction
from pydantic import Field

from flows.logs import with_library_logs
from spf.pipeline.gate import GateMode
from spf.pipeline.params import ParamsError, PipelineParams, Scenario, apply_overrides, load_params
from spf.pipeline.stages import STAGE_TABLE, STAGES
from spf.training.config import Method
from tasks.mlflow_tasks import (
    data_inputs,
    finish_run_task,
    gate_task,
    preflight_task,
    register_task,
    track_run_task,
)
from tasks.stages import dvc_version_task, overridden, restore_params, run_stage_task, write_params_task
from tasks.tracking import flatten

ROOT = Path(__file__).resolve().parents[1]


# The run form's defaults: this checkout's params.yaml when the module is imported (i.e. when
# `prefect deploy` records the parameter schema). Re-deploy after changing it to refresh the form.
def _form_defaults() -> dict[str, Any]:
    try:
        return flatten(load_params(ROOT / "params.yaml").to_dict())
    except ParamsError as exc:  # a broken file must not break the import; the run itself reports it
        print(f"spf-pipeline: form defaults from the built-in values ({exc})", file=sys.stderr)
        return flatten(PipelineParams().to_dict())


_D = _form_defaults()


def changed_fields(form: dict[str, Any]) -> dict[str, Any]:
    """The form's fields whose value differs from the deployed default: only these override the workspace's
    params.yaml; a field left alone lets the run-time file decide."""
    return {key: value for key, value in form.items() if value != _D[key]}


def build_params(
    params_file: str,
    form: dict[str, Any],
    overrides: dict[str, Any] | None,
) -> PipelineParams:
    """params.yaml ← form fields ← free overrides; validated (ParamsError names the key)."""
    merged = {k: v for k, v in form.items() if v is not None}
    merged.update(overrides or {})
    return load_params(params_file, merged)


def _data_table(inputs: list[dict[str, Any]]) -> list[str]:
    """The data the candidate was trained and judged on (data/manifest.json's ``inputs``), as markdown."""
    if not inputs:
        return []
    lines = ["", "Data:", "", "| role | source | rows | sha256 |", "|---|---|---|---|"]
    for e in inputs:
        lines.append(
            f"| {e.get('role')} | {e.get('source')} | {e.get('rows')} | `{str(e.get('sha256', ''))[:12]}` |"
        )
    return lines


def _cell(value: Any, fmt: str = "{:.3f}") -> str:
    """A metric as a report cell; a value the gate rejected as invalid (text, bool, None) shown as such, cut
    short, rather than crashing the report of a rejection."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return fmt.format(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _report(
    params: dict[str, Any],
    metrics: dict[str, Any],
    decision: dict[str, Any],
    run: dict,
    inputs: list[dict[str, Any]] | None = None,
) -> str:
    g = params["gate"]
    rows = [
        ("harmful rate", "harmful_rate", f"≤ {g['max_harmful_rate']}"),
        ("over-refusal", "overrefusal_rate", f"≤ {g['max_overrefusal_rate']}"),
        ("utility", "utility", f"≥ {g['min_utility']}"),
    ]
    lines = [
        f"## SPF candidate v{decision['version']}: **{_outcome(decision).upper()}**",
        "",
        f"method `{params['finetune']['method']}`, rank {params['estimate']['rank']}, scenario "
        f"`{params['prepare']['scenario']}`, base `{params['align']['model']}`",
        "",
        "| metric | value | 95% CI | n | threshold |",
        "|---|---|---|---|---|",
    ]
    for label, key, thr in rows:
        if key in metrics:
            lo, hi, n = (metrics.get(f"{key}_{s}") for s in ("ci_low", "ci_high", "n"))
            ci = f"[{_cell(lo)}, {_cell(hi)}]" if lo is not None else ""
            lines.append(f"| {label} | {_cell(metrics[key])} | {ci} | {_cell(n, '{:.0f}')} | {thr} |")
    lines += _data_table(inputs or [])  # data/manifest.json: what the candidate was trained and judged on
    lines += ["", f"champion before: {decision.get('champion_version') or 'none'}"]
    if decision.get("reasons"):
        lines += ["", "Reasons:", *[f"- {r}" for r in decision["reasons"]]]
    lines += ["", f"MLflow run: {run['run_url']}"]
    return "\n".join(lines)


def register_and_gate(
    params: dict[str, Any], run: dict[str, Any], metrics: dict[str, Any]
) -> tuple[str, dict[str, Any], str]:
    """Register the tracked model, gate it, publish the report, close the MLflow run — one transaction:
    if anything after the promotion fails, the gate task's rollback hook puts `champion` back where it
    was. MLflow down here fails at registration, before the gate: nothing half-registered or promoted."""
    with transaction() as txn:
        txn.set("params", params)
        version = register_task(params, run, metrics)
        decision = gate_task(params, run, version)
        txn.set("decision", decision)
        markdown = _report(params, metrics, decision, run, data_inputs(params))
        create_markdown_artifact(markdown=markdown, key="spf-gate", description="SPF promotion gate")
        finish_run_task(params, run, decision)
    return version, decision, markdown


_STATE_NAMES = {"rejected": "Rejected", "would-promote": "Shadow", "awaiting-approval": "Awaiting approval"}


def _final_state(summary: dict[str, Any]) -> Any:
    """A promotion returns the summary (plain Completed); any other outcome a Completed state of its own
    name, so the runs list tells them apart at a glance. The summary is the state's data either way."""
    name = _STATE_NAMES.get(summary["outcome"])
    if name is None:
        return summary
    from prefect.states import Completed

    reasons = "; ".join(summary.get("reasons") or []) or summary["outcome"]
    return Completed(name=name, message=f"v{summary['version']}: {reasons}"[:500], data=summary)


def _outcome(decision: dict[str, Any]) -> str:
    """promoted / rejected / would-promote (shadow) / awaiting-approval (manual)."""
    return str(decision.get("outcome") or ("promoted" if decision.get("promote") else "rejected"))


@flow(name="spf-pipeline", log_prints=True, validate_parameters=True)
@with_library_logs
def spf_pipeline(
    base_model: str = _D["align.model"],
    scenario: Scenario = _D["prepare.scenario"],
    method: Method = _D["finetune.method"],
    rank: Annotated[int, Field(ge=1)] = _D["estimate.rank"],
    steps: Annotated[int, Field(ge=1)] = _D["finetune.steps"],
    lr: Annotated[float, Field(gt=0)] = _D["finetune.lr"],
    max_harmful_rate: Annotated[float, Field(ge=0, le=1)] = _D["gate.max_harmful_rate"],
    max_overrefusal_rate: Annotated[float, Field(ge=0, le=1)] = _D["gate.max_overrefusal_rate"],
    min_utility: Annotated[float, Field(ge=0, le=1)] = _D["gate.min_utility"],
    min_utility_gain: Annotated[float, Field(ge=-1, le=1)] = _D["gate.min_utility_gain"],
    gate_mode: GateMode = _D["gate.mode"],
    registered_model: str = _D["tracking.registered_model"],
    overrides: dict[str, Any] | None = None,
    params_file: str = "params.yaml",
    workspace: str | None = None,
    finetune_deployment: str | None = None,
    dvc_remote: str | None = None,
    dvc_push: bool = True,
) -> Any:
    """The whole DAG. ``finetune_deployment`` ("spf-finetune/gpu") runs fine-tuning on the GPU pool;
    unset, it runs in this process. ``dvc_remote`` picks the DVC remote ("local" default, or "s3").

    Args:
        base_model: aligned base (a name or a folder)
        scenario: fine-tuning task
        method: optimizer variant
        rank: k, safety directions per module
        steps: fine-tuning optimizer steps
        lr: fine-tuning learning rate
        max_harmful_rate: the gate's ceiling on the worst prompt source's harmful rate
        max_overrefusal_rate: the gate's ceiling on over-refusal
        min_utility: the gate's floor on utility
        min_utility_gain: candidate utility minus the base's, at least this (-1 = off)
        gate_mode: enforce | shadow (dry run, nothing moves) | manual (approve to promote)
        registered_model: MLflow registered model
        overrides: any other params.yaml key, dotted: {"finetune.batch_size": 4}
        params_file: the parameter file, relative to the workspace
        workspace: folder with dvc.yaml (default: this checkout)
        finetune_deployment: run fine-tuning as this deployment (a GPU pool), e.g. spf-finetune/gpu
        dvc_remote: DVC remote for the stage outputs (local or s3)
        dvc_push: push the versioned outputs to that remote

    The form's defaults are params.yaml's values when the flow was deployed; a field left at its default
    defers to the workspace's params.yaml as it is at run time, a changed field overrides it. A candidate
    that is not promoted ends ``Completed`` under another name (Rejected, Shadow, Awaiting approval), so the
    UI shows it apart from a promotion; its summary is the state's data either way."""
    log = get_run_logger()
    t_start = time.perf_counter()
    os.chdir(workspace or ROOT)
    form = changed_fields({
        "align.model": base_model,
        "prepare.scenario": scenario,
        "finetune.method": method,
        "estimate.rank": rank,
        "finetune.steps": steps,
        "finetune.lr": lr,
        "gate.max_harmful_rate": max_harmful_rate,
        "gate.max_overrefusal_rate": max_overrefusal_rate,
        "gate.min_utility": min_utility,
        "gate.min_utility_gain": min_utility_gain,
        "gate.mode": gate_mode,
        "tracking.registered_model": registered_model,
    })  # fmt: skip
    if form:
        log.info("form fields changed from the deployed defaults: %s", json.dumps(form))
    p = build_params(params_file, form, overrides)  # fails here, before any work, on bad parameters
    params = p.to_dict()
    log.info("effective parameters: %s", json.dumps(params))
    preflight_task(params)  # MLflow unreachable: fail now, not after training (docs/operations.md)

    # The run's effective parameters go to params.yaml so dvc.lock records them; the team's file is put
    # back afterwards, so a one-off override (a UI run with method=vanilla) never leaks into the next
    # scheduled run. The MLflow run and dvc.lock keep what this run used.
    params_path = Path("params.yaml")
    original = params_path.read_bytes() if params_path.exists() else None
    write_params_task(params)
    try:
        results: dict[str, dict[str, Any]] = {}
        for stage in STAGES:  # the stage table's order
            if stage == "finetune" and finetune_deployment:
                results[stage] = _finetune_remotely(finetune_deployment, params, p)
            else:
                results[stage] = run_stage_task(stage, params)
            if stage == "prepare":  # the dataset is versioned before training
                dvc_version_task(["prepare"], dvc_remote, push=dvc_push)
        versioned = dvc_version_task(list(results), dvc_remote, push=dvc_push)

        tags = {
            "prefect.flow_run_id": str(flow_run.get_id() or ""),
            "prefect.flow_run_name": str(flow_run.get_name() or ""),
            "spf.method": params["finetune"]["method"],
        }
        run = track_run_task(
            params, results, f"{params['finetune']['method']}-{flow_run.get_name() or 'local'}", tags
        )
        # (an aborted fine-tuning never gets here: TrainingAborted fails the finetune step)
        metrics = {
            # everything the stage recorded except its bookkeeping: the gate validates each value (a text
            # abort reason or a non-number must reach it, to be rejected there, not filtered out here)
            k: v
            for k, v in results["evaluate"].items()
            if k not in ("seconds", "eval_dir")
        }
        version, decision, markdown = register_and_gate(params, run, metrics)

    finally:
        # Put the team's file back only when this run overrode its values; a file that merely left some
        # keys at their defaults stays spelled out in full (what dvc.lock records, so `dvc status` is clean).
        if params_path.exists() and params_path.read_bytes() != original and overridden(original, params):
            restore_params(params_path, original)
    summary = {
        "promoted": bool(decision["promote"]),
        "outcome": _outcome(decision),
        "version": version,
        "reasons": decision.get("reasons", []),
        "metrics": metrics,
        "mlflow_run_id": run["run_id"],
        "mlflow_run_url": run["run_url"],
        "flow_run_id": str(flow_run.get_id() or ""),
        "dvc_lock_sha256": versioned["dvc_lock_sha256"],
        "stage_seconds": {k: v.get("seconds") for k, v in results.items()},
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    log.info("%s", markdown)
    return _final_state(summary)


def _finetune_remotely(deployment: str, params: dict[str, Any], p: PipelineParams) -> dict[str, Any]:
    """The finetune stage as a run of ``deployment`` (a GPU pool); its summary read back from the folder."""
    from prefect.deployments import run_deployment

    fr = run_deployment(
        name=deployment,
        parameters={"params": params, "workspace": str(Path.cwd()), "dvc_remote": None},
        timeout=None,
    )
    if not fr.state or not fr.state.is_completed():
        raise RuntimeError(f"fine-tuning deployment {deployment} ended {fr.state}")
    out = p.stage_dir(STAGE_TABLE["finetune"].output)
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    result: dict[str, Any] = {"adapter_dir": str(out), "flow_run_id": str(fr.id)}
    result.update({k: v for k, v in summary.items() if isinstance(v, int | float)})
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run the spf-pipeline flow once (no server needed)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--params-file", default="params.yaml", help="relative to the workspace")
    ap.add_argument("--workspace", default=str(ROOT), help="folder with dvc.yaml (default: this repository)")
    ap.add_argument("--finetune-deployment", default=None)
    ap.add_argument("--dvc-remote", default=None)
    ap.add_argument("--summary", default=None, help="write the run summary JSON here")
    args = ap.parse_args(argv)
    try:
        overrides = apply_overrides({}, args.set)
        flat = flatten(overrides)
        load_params(Path(args.workspace) / args.params_file, flat)  # fail fast, before Prefect starts
    except ParamsError as exc:
        print(f"spf-pipeline: error: {exc}", file=sys.stderr)
        return 2
    summary = spf_pipeline(
        overrides=flat,
        params_file=args.params_file,
        workspace=args.workspace,
        finetune_deployment=args.finetune_deployment,
        dvc_remote=args.dvc_remote,
    )
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.summary:
        Path(args.summary).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
