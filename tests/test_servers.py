"""The servers the tests start themselves: a private PostgreSQL, for a machine where none answers
(a fresh CI machine whose package did not start one)."""

from __future__ import annotations

import os

import psycopg

from servers import PostgresServer


def test_a_private_postgresql_serves_a_fleet_database_and_goes_away(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGESDK_TEST_PG", "private")
    server = PostgresServer(tmp_path)
    try:
        assert server.private and ":5432/" not in server.admin_url
        url = server.create_database()
        from fleet.storage import open_storage

        storage = open_storage(url, tmp_path / "state")
        with storage.connect() as db:
            assert db.schema_version() >= 5  # migrated: the fleet's schema stands in it
        server.drop_database(url)
        with psycopg.connect(server.admin_url) as conn:
            names = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        assert url.rsplit("/", 1)[1] not in names
    finally:
        server.stop()
    assert not server._answers(server.admin_url)
    if os.geteuid() == 0:
        assert not server.root.exists()  # its own directory, outside pytest's root-only tree, removed
