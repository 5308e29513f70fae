"""Where data lives: the files this package ships, and the public data folder beside the checkout.

The one place that knows either location (the CLI, the pipeline, the benchmark, the analysis and the tests
all ask here), so the resolution order — argument, then ``$SPF_SHARED_DATA``, then ``<repo>/../shared/data``
— cannot drift between them.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from spf.data.samples import DataError

__all__ = [
    "PACKAGE_DATA",
    "REPO_SHARED_DATA",
    "SHIPPED_PREFIX",
    "find_shared_data",
    "require_shared_data",
    "shipped_file",
]

SHIPPED_PREFIX = "spf/data/"
PACKAGE_DATA = Path(str(resources.files("spf.data")))
# the checkout's public data folder (a source checkout only: <repo>/../shared/data)
REPO_SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def shipped_file(name: str) -> Path:
    """A data file shipped inside the package (``spf/data/<name>``), wherever the package is installed.

    ``name`` may carry the repository-relative prefix ``spf/data/`` (how configs name shipped files).
    """
    return PACKAGE_DATA / name.removeprefix(SHIPPED_PREFIX)


def find_shared_data(shared_data: str | Path | None = None) -> Path | None:
    """The public data folder: ``shared_data``, else ``$SPF_SHARED_DATA``, else ``<repo>/../shared/data``.

    An explicitly named folder (argument or environment) must exist; the repository default may be absent,
    in which case ``None`` is returned and callers fall back to the shipped data or skip.
    """
    explicit = shared_data if shared_data is not None else os.environ.get("SPF_SHARED_DATA") or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise DataError(f"shared data folder {path} does not exist")
        return path
    return REPO_SHARED_DATA if REPO_SHARED_DATA.is_dir() else None


def require_shared_data(shared_data: str | Path | None = None) -> Path:
    """:func:`find_shared_data` for commands that cannot run without the public folder."""
    path = find_shared_data(shared_data)
    if path is None:
        raise DataError(
            f"public data folder not found ({REPO_SHARED_DATA} is absent): pass --shared-data DIR or set "
            "SPF_SHARED_DATA (what it holds: shared/data/SOURCES.md in the project's workspace)"
        )
    return path
