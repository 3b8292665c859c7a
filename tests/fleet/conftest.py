"""Every fleet test runs on both storage backends: SQLite (the default, in the test's state
directory) and PostgreSQL (a database of its own, dropped after the test).

The backend reaches every Fleet the test makes, in this process and in the ``edgesdk fleet``
processes it starts, through ``EDGESDK_FLEET_DB`` (what ``--db`` defaults to)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite", "postgresql"], autouse=True)
def fleet_db(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The fleet database URL of this run of the test (None: SQLite in the state directory)."""
    if request.param == "sqlite":
        monkeypatch.delenv("EDGESDK_FLEET_DB", raising=False)
        yield None
        return
    url = request.getfixturevalue("postgres_db")
    monkeypatch.setenv("EDGESDK_FLEET_DB", url)
    yield url
