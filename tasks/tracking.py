"""MLflow tracking for the pipeline: the one module that talks to MLflow's tracking API.

Everything goes through an explicit :class:`mlflow.tracking.MlflowClient` and an explicit ``run_id``.
The fluent API (``mlflow.start_run``/``mlflow.log_metric``) keeps the active run in a thread-local
stack, so under a Prefect task runner a task on another thread would log to no run or to the wrong
one; explicit ids make every call independent of which thread runs it.

Outages: :func:`make_client` bounds MLflow's per-request retries and timeout
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``, ``..._BACKOFF_FACTOR=1``, ``..._TIMEOUT=60`` unless the environment
sets them; see :mod:`tasks.resilience`), so a call against a dead server fails in ~2 s instead of ~4 min.

Credentials never reach MLflow: params and tags pass through :func:`redact`, and the S3 keys the
artifact store needs live only in the MLflow server's environment (see ``scripts/services.sh``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from spf.io import file_sha256
from tasks.resilience import apply_mlflow_http_defaults

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LOCAL_DIR = Path("runs") / "mlflow"

# MLflow's server-side limits (mlflow/utils/validation.py): param values up to 6000 characters; one
# log_batch call takes at most 1000 metrics, 100 params and 100 tags.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100

REDACTED = "***"
# Substrings that mark a credential wherever they appear in a key.
_SECRET_SUBSTRINGS = (
    "secret",
    "password",
    "passwd",
    "key_id",
    "access_key",
    "credential",
    "api_key",
    "apikey",
)
# "token" only as (the end of) a word: "hf_token"/"authtoken" are secrets, "max_new_tokens"/"tokenizer"
# are training settings that must stay visible.
_TOKEN_WORD = re.compile(r"token$")
_KEY_SPLIT = re.compile(r"[._/\-\s]+")
# user:password@ inside URLs (e.g. a remote URL copied into a config).
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s:]+:[^/@\s]+@")

_STATUSES = ("FINISHED", "FAILED", "KILLED")
# The MLflow UI opens an experiment in its model-training view (runs, metrics, charts) or its GenAI view
# (traces, evaluations) by this tag; without it MLflow 3 may infer GenAI. Of the kinds its UI knows, only
# "custom_model_development" ("Machine learning") is the model-training one ("finetuning", also in its list,
# is a legacy value). MLflow 3.17's UI still opens in the view last chosen in that browser (GenAI by default):
# the links we log add ?workflowType=machine_learning (tasks/mlflow_tasks.py run_url).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
_OLD_KINDS = ("finetuning",)  # what earlier versions of this module set: replaced


# ------------------------------------------------------------------------------------------------ URIs


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Tracking (and registry) URI: ``uri`` > ``$MLFLOW_TRACKING_URI`` > a SQLite file under runs/mlflow.

    The fallback is an absolute ``sqlite:///`` path in the project, not MLflow's own default
    (``mlflow.db`` in whatever the current directory is), so every command and flow sees the same store.
    """
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").is_file() else Path.cwd()
    folder = (root / DEFAULT_LOCAL_DIR).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def make_client(uri: str | None = None) -> MlflowClient:
    """A client whose tracking and registry URIs are both :func:`resolve_tracking_uri` ``(uri)``; MLflow's
    HTTP retries/timeout are bounded first (:func:`tasks.resilience.apply_mlflow_http_defaults`)."""
    apply_mlflow_http_defaults()
    resolved = resolve_tracking_uri(uri)
    return MlflowClient(tracking_uri=resolved, registry_uri=resolved)


def _local_artifact_root(tracking_uri: str) -> str | None:
    """For a local SQLite store: an artifact folder next to the database (else MLflow uses ./mlruns)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a server decides (mlflow-artifacts:/ proxied to S3)
    db = Path(tracking_uri[len("sqlite:///") :])
    return (db.parent / "artifacts").resolve().as_uri()


# --------------------------------------------------------------------------------------- params / tags


def _is_secret_key(key: str) -> bool:
    low = key.lower()
    if any(s in low for s in _SECRET_SUBSTRINGS):
        return True
    return any(_TOKEN_WORD.search(word) for word in _KEY_SPLIT.split(low) if word)


def _scrub_value(value: str) -> str:
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", value)


def redact(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` with the value of every credential-like key replaced by ``***`` and URL passwords removed.

    Credential-like: the key contains secret/password/key_id/access_key/credential/api_key, or one of
    its words ends in "token" (``hf_token``, not ``max_new_tokens``). Applied to flattened keys, so a
    nested ``s3.aws_secret_access_key`` is caught too.
    """
    out: dict[str, Any] = {}
    for key, value in d.items():
        if _is_secret_key(str(key)):
            out[key] = REDACTED
        elif isinstance(value, str):
            out[key] = _scrub_value(value)
        else:
            out[key] = value
    return out


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), default=str)
    return str(value)


def flatten(d: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested mappings → one level, keys joined by ``sep`` (``{"a": {"b": 1}}`` → ``{"a.b": 1}``); an empty
    mapping stays a value. The one flattener of params (``.``), metrics (``/``) and flow overrides."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, sep, name))
        else:
            out[name] = value
    return out


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b.c": "value"}``; lists JSON-encoded; values cut to MLflow's 6000 chars.

    Redaction is separate (:func:`redact`) so callers can flatten for display; :func:`log_params` does
    both.
    """
    out: dict[str, str] = {}
    for name, value in flatten(d, ".", prefix).items():
        text = _to_text(value)
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            logger.warning(
                "param %s is %d characters; truncated to %d", name, len(text), MAX_PARAM_VALUE_LENGTH
            )
            text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
        out[name] = text
    return out


# --------------------------------------------------------------------------------------------- provenance


def git_commit(repo_dir: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` in ``repo_dir`` (default: the project), or None outside a git checkout."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=str(repo_dir or PROJECT_ROOT),
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


# ----------------------------------------------------------------------------------------------- runs


def get_or_create_experiment(client: MlflowClient, experiment: str) -> str:
    """The id of experiment ``experiment``, creating it when missing (race-safe: a concurrent create wins)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        if found.tags.get(EXPERIMENT_KIND_TAG, _OLD_KINDS[0]) in _OLD_KINDS:  # made before this tag, or by us
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    root = _local_artifact_root(client.tracking_uri)
    location = f"{root}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', experiment)}" if root else None
    try:
        return client.create_experiment(
            experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except MlflowException:
        found = client.get_experiment_by_name(experiment)  # another process created it first
        if found is None:
            raise
        return found.experiment_id


def start_run(
    client: MlflowClient,
    experiment: str,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    *,
    repo_dir: str | Path | None = None,
    dvc_lock: str | Path | None = None,
) -> str:
    """Create a run and return its id. Tags get ``git.commit`` and ``dvc.lock.sha256`` when available.

    ``dvc_lock`` defaults to ``<repo_dir>/dvc.lock``: its hash pins the exact data/params versions of
    the pipeline that produced this run.
    """
    repo = Path(repo_dir) if repo_dir is not None else PROJECT_ROOT
    all_tags: dict[str, Any] = {}
    commit = git_commit(repo)
    if commit:
        all_tags["git.commit"] = commit
        all_tags["mlflow.source.git.commit"] = commit  # the tag MLflow's UI shows
    lock = Path(dvc_lock if dvc_lock is not None else repo / "dvc.lock")
    if lock.is_file():
        all_tags["dvc.lock.sha256"] = file_sha256(lock)  # = `sha256sum dvc.lock`
    all_tags.update(tags or {})
    safe_tags = {k: _to_text(v)[:MAX_PARAM_VALUE_LENGTH] for k, v in redact(all_tags).items()}
    experiment_id = get_or_create_experiment(client, experiment)
    run = client.create_run(experiment_id, tags=safe_tags, run_name=run_name)
    logger.info("MLflow run %s (%s) in experiment %s", run.info.run_id, run_name, experiment)
    return run.info.run_id


def end_run(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run terminated with ``status`` (FINISHED, FAILED or KILLED)."""
    if status not in _STATUSES:
        raise ValueError(f"run status must be one of {_STATUSES}, got {status!r}")
    client.set_terminated(run_id, status=status)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set run tags (redacted), batched."""
    items = [RunTag(k, _to_text(v)[:MAX_PARAM_VALUE_LENGTH]) for k, v in redact(dict(tags)).items()]
    for chunk in _chunks(items, MAX_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> dict[str, str]:
    """Flatten, redact and log ``params``; returns what was logged. MLflow params are write-once."""
    flat = redact(flatten_params(params))
    items = [Param(k, v) for k, v in flat.items()]
    for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    return flat


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    try:  # numpy / torch scalars
        import numbers

        if isinstance(value, numbers.Number):
            return float(value)  # type: ignore[arg-type]
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            return float(value.item())
    except (TypeError, ValueError):
        return None
    return None


def _flatten_metrics(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in flatten(d, "/", prefix).items():
        x = _numeric(value)
        if x is None:
            logger.debug("metric %s skipped: not numeric (%r)", name, value)
            continue
        out[name] = x
    return out


def _log_metric_objects(client: MlflowClient, run_id: str, metrics: list[Metric]) -> int:
    for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)
    return len(metrics)


def log_metrics(
    client: MlflowClient, run_id: str, metrics: Mapping[str, Any], step: int | None = None
) -> dict[str, float]:
    """Log the numeric entries of ``metrics`` (nested mappings become ``a/b``); others are skipped.

    NaN and inf are logged as they are: a diverged loss is information, not noise.
    """
    flat = _flatten_metrics(metrics)
    ts = int(time.time() * 1000)
    _log_metric_objects(client, run_id, [Metric(k, v, ts, int(step or 0)) for k, v in flat.items()])
    return flat


def log_artifacts(
    client: MlflowClient, run_id: str, local_path: str | Path, artifact_path: str | None = None
) -> None:
    """Upload a file or a folder (recursively) under ``artifact_path`` of the run."""
    p = Path(local_path)
    if p.is_dir():
        client.log_artifacts(run_id, str(p), artifact_path)
    elif p.is_file():
        client.log_artifact(run_id, str(p), artifact_path)
    else:
        raise FileNotFoundError(f"artifact {p} does not exist")


def _dvc_out(dvc_lock: str | Path | None, stage: str = "prepare") -> dict[str, Any]:
    """``{"stage", "path", "md5"}`` of ``stage``'s first output in ``dvc.lock`` (what ``dvc pull`` fetches)."""
    if dvc_lock is None or not Path(dvc_lock).is_file():
        return {}
    import yaml

    try:
        outs = (yaml.safe_load(Path(dvc_lock).read_text()) or {}).get("stages", {}).get(stage, {}).get(
            "outs"
        ) or []
    except (yaml.YAMLError, AttributeError):
        return {}
    first = outs[0] if outs and isinstance(outs[0], Mapping) else {}
    return {"stage": stage, "path": first.get("path"), "md5": first.get("md5")} if first else {}


def log_data_manifest(
    client: MlflowClient, run_id: str, manifest_path: str | Path, dvc_lock: str | Path | None = None
) -> list[dict[str, Any]]:
    """Record which data the run used, from the prepare stage's ``data/manifest.json``: the file as the
    ``data_manifest.json`` artifact, params ``data.<role>.source|rows|sha256`` per input, and every input
    as an MLflow dataset input of the run (context ``training`` for the training set, the role otherwise),
    its source the file and — with ``dvc_lock`` — the DVC output that versions it (stage, path, md5: what
    ``dvc pull`` fetches). Returns the manifest's inputs."""
    manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
    entries = [e for e in manifest.get("inputs") or [] if isinstance(e, Mapping) and e.get("role")]
    with tempfile.TemporaryDirectory() as tmp:  # the artifact's name says what it is, beside the others
        copy = Path(tmp) / "data_manifest.json"
        copy.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        client.log_artifact(run_id, str(copy))
    params: dict[str, Any] = {}
    for entry in entries:
        role = str(entry["role"])
        for field in ("source", "rows", "sha256"):
            params[f"data.{role}.{field}"] = entry.get(field)
    log_params(client, run_id, params)
    dvc = _dvc_out(dvc_lock)
    inputs = []
    for entry in (e for e in entries if e.get("sha256")):
        role = str(entry["role"])
        source = {"uri": str(entry.get("path", "")), **({"dvc": dvc} if dvc else {})}
        dataset = Dataset(
            name=role,
            digest=str(entry["sha256"])[:12],  # MLflow keeps at most 36 characters; the param has it all
            source_type="dvc" if dvc else "local",
            source=json.dumps(source),
            profile=json.dumps({"num_rows": entry.get("rows"), "source": entry.get("source")}),
        )
        context = InputTag(key=MLFLOW_DATASET_CONTEXT, value="training" if role == "train" else role)
        inputs.append(DatasetInput(dataset=dataset, tags=[context]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    return [dict(e) for e in entries]


# ------------------------------------------------------------------------------------------ telemetry


def _step_metric_name(key: str) -> str:
    # Keys that already carry a namespace ("spf/removed_frac") keep it; plain ones go under train/.
    return key if "/" in key else f"train/{key}"


def telemetry_metrics(telemetry: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """``(name, value, step)`` for every numeric field of a ``spf.training.loop.train`` metrics.json."""
    rows: list[tuple[str, float, int]] = []
    for entry in telemetry.get("steps") or []:
        step = int(entry.get("step", 0))
        for key, value in entry.items():
            x = None if key == "step" else _numeric(value)
            if x is not None:
                rows.append((_step_metric_name(key), x, step))
    for entry in telemetry.get("evals") or []:
        step = int(entry.get("step", 0))
        for key, value in entry.items():
            x = None if key == "step" else _numeric(value)
            if x is not None:
                rows.append((f"eval/{key}", x, step))
    summary = telemetry.get("summary") or {}
    for name, value in _flatten_metrics(summary, "summary").items():
        rows.append((name, value, 0))
    return rows


def plot_training(telemetry: Mapping[str, Any], out: str | Path) -> Path | None:
    """Training loss and safety/task loss over steps as a PNG; None when matplotlib is unavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and workers
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no training plot")
        return None
    steps = telemetry.get("steps") or []
    evals = telemetry.get("evals") or []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    try:
        xs = [s["step"] for s in steps if _numeric(s.get("loss")) is not None]
        ax1.plot(xs, [s["loss"] for s in steps if _numeric(s.get("loss")) is not None], label="train loss")
        ax1.set_xlabel("step")
        ax1.set_title("training loss")
        ax1.legend()
        for key, label in (
            ("safety_loss_sample", "safety loss (estimation sample)"),
            ("safety_loss_heldout", "safety loss (held-out)"),
            ("task_loss", "task loss"),
        ):
            pts = [(e["step"], e[key]) for e in evals if _numeric(e.get(key)) is not None]
            if pts:
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax2.set_xlabel("step")
        ax2.set_title("safety / task loss")
        if ax2.has_data():
            ax2.legend()
        fig.tight_layout()
        out = Path(out)
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


def log_telemetry(client: MlflowClient, run_id: str, metrics_json_path: str | Path) -> int:
    """Log a fine-tuning ``metrics.json`` (per-step, per-eval and summary values) plus a plot.

    Step fields become ``train/<field>`` (or keep their own namespace, ``spf/removed_frac``) at their
    step, evals ``eval/<field>``, the summary ``summary/<field>``. The file itself is logged under
    ``telemetry/`` and the plot as ``plots/training.png``. Returns the number of metric values logged.
    """
    path = Path(metrics_json_path)
    telemetry = json.loads(path.read_text())
    ts = int(time.time() * 1000)
    rows = telemetry_metrics(telemetry)
    n = _log_metric_objects(client, run_id, [Metric(k, v, ts, s) for k, v, s in rows])
    client.log_artifact(run_id, str(path), "telemetry")
    with tempfile.TemporaryDirectory(prefix="spf-plot-") as tmp:
        png = plot_training(telemetry, Path(tmp) / "training.png")
        if png is not None:
            client.log_artifact(run_id, str(png), "plots")
    logger.info("logged %d telemetry values from %s", n, path)
    return n


# -------------------------------------------------------------------------------------------- models


def _pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc model, given explicitly: ``spf``'s own runtime dependencies
    (the package itself rides in the model's ``code`` folder) plus MLflow and pandas for serving.

    MLflow's own inference imports the model and scans the environment: slow (seconds) and it fails on
    optional packages such as torchvision. Local version labels (``+cpu``) are dropped so the pins also
    resolve on a CUDA machine.
    """
    from packaging.requirements import Requirement

    names = ["mlflow", "pandas", "tokenizers"]
    for spec in metadata.requires("spf") or []:
        req = Requirement(spec)
        if req.marker is None:  # extras (dev, pipeline, trl) are not needed to serve
            names.append(req.name)
    reqs = []
    for dist in dict.fromkeys(names):
        try:
            reqs.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for the block, then put back *with* the environment.

    MLflow's own ``_use_tracking_uri`` restores a previously unset global by unsetting MLFLOW_TRACKING_URI
    in ``os.environ`` too, so every later client of the process (the flow's next task) fell back to a
    local SQLite file. Here both the global and the variable come back as they were."""
    from mlflow.tracking._tracking_service import utils

    saved_global, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    try:
        utils.set_tracking_uri(uri)
        yield
    finally:
        utils._tracking_uri = saved_global
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def log_adapter_model(
    client: MlflowClient,
    run_id: str,
    adapter_dir: str | Path,
    base_model: str,
    name: str = "model",
    embed_base: bool = False,
    *,
    max_new_tokens: int = 64,
) -> str:
    """Log ``adapter_dir`` (a PEFT ``save_pretrained`` folder, or a full fine-tune's model folder) as an MLflow
    pyfunc model; return its URI.

    By default only the adapter is stored and ``base_model`` (an ``spf.load_model`` reference such as
    ``smollm2-135m-instruct`` or ``tiny-llama``) is recorded in the model config, because the base is
    hundreds of MB and shared by every candidate. ``embed_base=True`` also copies the base folder (which
    must then be a local folder) so the model loads where the base is not available.
    """
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    import spf

    adapter = Path(adapter_dir)
    # a LoRA adapter (adapter_config.json) or a full fine-tune's whole model (config.json): the pyfunc
    # model loads either with spf.models.load_finetuned
    if not any((adapter / f).is_file() for f in ("adapter_config.json", "config.json")):
        raise FileNotFoundError(
            f"{adapter} is neither a PEFT adapter folder (adapter_config.json) nor a full fine-tune (config.json)"
        )
    artifacts = {"adapter": str(adapter)}
    if embed_base:
        if not Path(base_model).is_dir():
            raise ValueError(f"embed_base=True needs base_model to be a local folder, got {base_model!r}")
        artifacts["base"] = str(base_model)
    signature = ModelSignature(
        # One unnamed string column: accepts both a list of prompts and a DataFrame with a `prompt`
        # column (a named schema would reject the list, which pyfunc turns into a column named 0).
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [ParamSpec("max_new_tokens", "long", max_new_tokens), ParamSpec("batch_size", "long", 8)]
        ),
    )
    from mlflow.models import Model

    # Created by our client, in the run's experiment (Model.log would put it in the *active* experiment,
    # usually Default) and then filled by Model.log, which reads MLflow's global tracking URI.
    logged = client.create_logged_model(
        experiment_id=client.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id,
        model_type="spf-adapter",
    )  # fmt: skip
    with _global_tracking_uri(client.tracking_uri), warnings.catch_warnings():
        # No input_example on purpose: MLflow would load the base model and predict to validate it.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*", category=UserWarning)
        info = Model.log(
            artifact_path=None,
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=str(PROJECT_ROOT / "tasks" / "pyfunc_model.py"),  # models from code
            code_paths=[str(Path(spf.__file__).parent)],  # `import spf` where the model is loaded
            artifacts=artifacts,
            signature=signature,
            pip_requirements=_pip_requirements(),
            model_config={"base_model": base_model, "max_new_tokens": max_new_tokens, "batch_size": 8},
            metadata={"spf_version": spf.__version__, "base_model": base_model, "embed_base": embed_base},
            model_id=logged.model_id,
        )
    uri = info.model_uri  # models:/<model id>: a LoggedModel, linked to the run
    logger.info("logged pyfunc model %s (base %s, embedded: %s)", uri, base_model, embed_base)
    return uri
