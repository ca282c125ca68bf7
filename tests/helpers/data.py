"""The shared data sets (BANKING77, CLINC150, the bnlearn networks): read from COACT_DATA_DIR or ../shared/data.

On a developer's machine a test that needs them is skipped when they are absent; in CI (CI=true, set by
.ci/run) it fails instead, so a runner without the data cannot pass by skipping the exactness checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO

SHARED = REPO.parent / "shared" / "data"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def data_root() -> Path:
    """The folder the data loaders read first: COACT_DATA_DIR, else ../shared/data."""
    env = os.environ.get("COACT_DATA_DIR")
    return Path(env).expanduser() if env else SHARED


def missing(what: str) -> None:
    """Skip the calling test (or fixture) because `what` is absent; fail instead under CI=true."""
    message = f"{what} is not present on this machine (set COACT_DATA_DIR or provide ../shared/data)"
    if in_ci():
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


def require(path: Path, what: str | None = None) -> Path:
    """`path` (a file or folder of the shared data), or skip / fail (CI) the test when it is absent."""
    if not path.exists():
        missing(what or str(path))
    return path


def require_module(name: str):
    """`pytest.importorskip`, except that in CI a missing test dependency fails."""
    if in_ci():
        import importlib

        try:
            return importlib.import_module(name)
        except ImportError as e:
            pytest.fail(f"CI=true: test dependency {name!r} is not importable: {e}", pytrace=False)
    return pytest.importorskip(name)
