"""Outages of the services the pipeline talks to (S3 behind DVC and MLflow, the MLflow server itself):
bounded retries with exponential backoff, and a final error that names the service and its endpoint.

Two layers, each bounded, so an outage fails in seconds to a minute instead of hanging:

* **Per HTTP request** (MLflow client): :func:`apply_mlflow_http_defaults` sets
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1`` and
  ``MLFLOW_HTTP_REQUEST_TIMEOUT=60`` unless the environment already sets them. MLflow's own defaults
  (7 retries, factor 2, 120 s timeout) keep one call against a dead server retrying for ~4 minutes.
* **Per step** (a Prefect task, a ``dvc push``): :class:`RetryPolicy` — ``SPF_IO_RETRIES`` further
  attempts (default 2) after delays ``SPF_IO_RETRY_DELAY`` (2 s) × ``SPF_IO_RETRY_BACKOFF`` (4) ^ i,
  capped at ``SPF_IO_RETRY_MAX_DELAY`` (60 s): by default 2 s, then 8 s.

Prefect's own ``retries`` do the step level for every task; :func:`retry_call` is used only for the DVC
transfers, which run after a local ``dvc commit`` (dvc-version) or inside the finetune flow's body, where a
Prefect retry would repeat the commit or the whole fine-tune.

The step-level policy is read from the environment when a task module is imported (Prefect fixes a
task's retries at decoration), so set the variables before the flow process starts.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "MLFLOW_HTTP_DEFAULTS",
    "RetryPolicy",
    "ServiceUnavailable",
    "apply_mlflow_http_defaults",
    "describe_mlflow_failure",
    "is_mlflow_outage",
    "retry_call",
]

# Applied only where the environment does not set them (see the module docstring).
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


class ServiceUnavailable(RuntimeError):
    """A service stayed unreachable (or kept failing) through every retry; the message names it."""

    def __init__(
        self, service: str, endpoint: str | None, cause: BaseException | str, attempts: int | None = None
    ):
        self.service = service
        self.endpoint = endpoint
        self.attempts = attempts
        self.cause = str(cause)
        where = f" at {endpoint}" if endpoint else ""
        tries = f" after {attempts} attempts" if attempts else ""
        super().__init__(f"{service}{where} failed{tries}: {cause}")

    def __reduce__(self):  # picklable (Prefect persists and re-raises task exceptions)
        return (type(self), (self.service, self.endpoint, self.cause, self.attempts))


def _env_number(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {raw!r}")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` further attempts after the first; the i-th waits ``delay * backoff**i`` (≤ max_delay)."""

    retries: int = 2
    delay: float = 2.0
    backoff: float = 4.0
    max_delay: float = 60.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.delay < 0 or self.backoff < 1 or self.max_delay < 0:
            raise ValueError(f"invalid retry policy {self}")

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def delays(self) -> list[float]:
        """Seconds to wait before each retry (``retries`` values, non-decreasing)."""
        return [min(self.delay * self.backoff**i, self.max_delay) for i in range(self.retries)]

    @classmethod
    def from_env(cls, prefix: str = "SPF_IO_") -> RetryPolicy:
        """``{prefix}RETRIES``, ``{prefix}RETRY_DELAY``, ``{prefix}RETRY_BACKOFF``, ``{prefix}RETRY_MAX_DELAY``."""
        d = cls()
        return cls(
            retries=int(_env_number(f"{prefix}RETRIES", d.retries, 0)),
            delay=_env_number(f"{prefix}RETRY_DELAY", d.delay, 0),
            backoff=_env_number(f"{prefix}RETRY_BACKOFF", d.backoff, 1),
            max_delay=_env_number(f"{prefix}RETRY_MAX_DELAY", d.max_delay, 0),
        )

    def prefect_options(self) -> dict[str, object]:
        """``retries`` / ``retry_delay_seconds`` for ``@task`` or ``Task.with_options``."""
        return {"retries": self.retries, "retry_delay_seconds": self.delays() or 0}


def retry_call(
    fn: Callable[[], T],
    *,
    service: str,
    endpoint: str | None = None,
    policy: RetryPolicy | None = None,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, at most ``policy.attempts`` times, sleeping ``policy.delays()``
    in between; then raise :class:`ServiceUnavailable` naming ``service`` and ``endpoint`` (the last
    error chained). Exceptions outside ``retry_on`` propagate at once."""
    policy = policy or RetryPolicy.from_env()
    delays = policy.delays()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except retry_on as exc:
            if attempt == policy.attempts:
                raise ServiceUnavailable(service, endpoint, exc, attempt) from exc
            wait = delays[attempt - 1]
            logger.warning(
                "%s%s: attempt %d/%d failed (%s); retrying in %.1f s",
                service,
                f" at {endpoint}" if endpoint else "",
                attempt,
                policy.attempts,
                str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                wait,
            )
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def apply_mlflow_http_defaults() -> None:
    """Bound MLflow's per-request retries and timeout (values in :data:`MLFLOW_HTTP_DEFAULTS`), leaving
    any the environment already sets. MLflow reads them at every request."""
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _healthy(tracking_uri: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except Exception:
        return False


def is_mlflow_outage(exc: BaseException) -> bool:
    """Whether ``exc`` is the MLflow client giving up on the server (connection refused, timeouts, 5xx
    after its retries), as opposed to a request the server answered with an error (bad name, missing
    run), which no retry or outage message would fix."""
    if isinstance(exc, ServiceUnavailable | ConnectionError | TimeoutError):
        return True
    try:
        import requests

        if isinstance(exc, requests.exceptions.RequestException):
            return True
    except ImportError:  # pragma: no cover
        pass
    message = str(exc)
    return (
        "API request to" in message and ("failed with exception" in message or "error code 5" in message)
    ) or getattr(exc, "error_code", None) == "TEMPORARILY_UNAVAILABLE"


def describe_mlflow_failure(tracking_uri: str, what: str, exc: BaseException) -> ServiceUnavailable:
    """An error for a failed MLflow step that says which service failed.

    A server that answers ``/health`` but failed the step points at what it depends on — for artifact
    uploads the artifact store it proxies to (S3); one that does not answer is itself unreachable.
    """
    if not tracking_uri.startswith("http"):
        return ServiceUnavailable(f"MLflow store ({what})", tracking_uri, exc)
    first = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
    if _healthy(tracking_uri):
        service = (
            f"the artifact store (S3) behind the MLflow server ({what})"
            if "artifact" in what
            else f"the MLflow server ({what}; it answers /health)"
        )
    else:
        service = f"the MLflow tracking server ({what}; unreachable)"
    return ServiceUnavailable(service, tracking_uri, first)
