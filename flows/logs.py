"""The library's own log lines and warnings in the Prefect UI, for the length of a flow run.

Prefect sends only its own loggers (``prefect.flow_runs``, ``prefect.task_runs``) to the API; ``spf`` and
``tasks`` log through ``logging.getLogger(__name__)`` and warn through ``warnings``, which would reach the
worker's console and never the run's page. PREFECT_LOGGING_EXTRA_LOGGERS does the same job, but only when
set before Prefect configures logging, in every process a worker starts, and it leaves those loggers at the
root's WARNING level; here the flow attaches Prefect's API handler itself and takes it off again at the end,
so library use outside a flow run never tries to send to the API.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

LIBRARY_LOGGERS = ("spf", "tasks", "py.warnings")


def _run_handler() -> logging.Handler:
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class RunLogHandler(APILogHandler):
        """Sends only what is logged inside a flow or task run (a thread without Prefect's context, or a
        warning raised by this very handler, would otherwise loop through py.warnings)."""

        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "flow_run_id", None) or FlowRunContext.get() or TaskRunContext.get():
                super().emit(record)

    return RunLogHandler()


@contextmanager
def library_logs_to_prefect(
    names: tuple[str, ...] = LIBRARY_LOGGERS, level: int = logging.INFO
) -> Iterator[None]:
    handler = _run_handler()
    saved = []
    logging.captureWarnings(True)  # warnings.warn → the "py.warnings" logger
    try:
        for name in names:
            logger = logging.getLogger(name)
            saved.append((logger, logger.level))
            if logger.level == logging.NOTSET or logger.level > level:
                logger.setLevel(level)
            logger.addHandler(handler)
        yield
    finally:
        for logger, old_level in saved:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
        logging.captureWarnings(False)


def with_library_logs(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a flow function (under ``@flow``): its run's page shows the library's logs and warnings."""

    @functools.wraps(fn)  # keeps the signature, so Prefect's parameter schema is the function's own
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with library_logs_to_prefect():
            return fn(*args, **kwargs)

    # Prefect resolves string annotations (from __future__ import annotations) in the wrapper's module,
    # which does not define the flow's types: hand it the signature with them already evaluated.
    wrapper.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    return wrapper
