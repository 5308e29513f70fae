"""The MLOps stack's tests (Prefect, MLflow, DVC) are not collected on a core-only install (`pip install spf`
without the `pipeline` extra), so `pytest` still collects cleanly there; each file also importorskips."""

import importlib.util

if any(importlib.util.find_spec(name) is None for name in ("mlflow", "prefect")):
    collect_ignore_glob = ["test_*.py"]
