"""flows/logs.py: the library's loggers get Prefect's API handler for a flow run and lose it afterwards."""

from __future__ import annotations

import logging
import warnings

import pytest

pytest.importorskip("prefect")

from prefect.logging.handlers import APILogHandler

from flows.logs import LIBRARY_LOGGERS, library_logs_to_prefect, with_library_logs
from spf.pipeline.params import Scenario


def _api_handlers(name: str) -> int:
    return sum(isinstance(h, APILogHandler) for h in logging.getLogger(name).handlers)


def test_handlers_levels_and_warnings_capture_are_put_back():
    spf = logging.getLogger("spf")
    spf.setLevel(logging.WARNING)  # a user's own setting, raised back afterwards
    try:
        with library_logs_to_prefect():
            assert all(_api_handlers(n) == 1 for n in LIBRARY_LOGGERS)
            assert spf.getEffectiveLevel() == logging.INFO
            assert logging.getLogger("tasks").isEnabledFor(logging.INFO)
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                seen: list[logging.LogRecord] = []
                probe = logging.Handler()
                probe.emit = seen.append  # type: ignore[method-assign]
                logging.getLogger("py.warnings").addHandler(probe)
                try:
                    warnings.warn("a library warning", UserWarning, stacklevel=1)
                finally:
                    logging.getLogger("py.warnings").removeHandler(probe)
            assert any("a library warning" in r.getMessage() for r in seen)  # warnings reach the run's log
        assert all(_api_handlers(n) == 0 for n in LIBRARY_LOGGERS)
        assert spf.level == logging.WARNING and logging.getLogger("tasks").level == logging.NOTSET
    finally:
        spf.setLevel(logging.NOTSET)


def test_the_decorated_function_keeps_its_evaluated_signature_and_result():
    def fn(x: int, scenario: Scenario = "sst2") -> str:
        assert _api_handlers("spf") == 1
        return f"{x}-{scenario}"

    wrapped = with_library_logs(fn)
    assert wrapped(2) == "2-sst2" and _api_handlers("spf") == 0
    import inspect

    # evaluated types, so Prefect builds the parameter model without the flow module's namespace
    assert inspect.signature(wrapped).parameters["scenario"].annotation == Scenario
