"""The fleet as a service and over TLS: ``edgesdk fleet serve`` carries out what other commands
ask for; agents and fleet talk through a broker that requires client certificates; a database made
by an older fleet is migrated."""

import json
import signal
import time

import numpy as np

from fleet import Fleet


def test_fleet_serve_carries_out_requests_from_other_commands(broker, make_sims, spawn, edgesdk_cli, tmp_path,
                                                              eventually, digits_bundle_v2) -> None:
    sims = make_sims(3, broker.url, models={"digits": "1", "noop": "1"}, infer_s=0.001)
    state = tmp_path / "fleet"
    args = ["fleet", "--broker", broker.url, "--state", state]
    serve = spawn(*args, "serve", log_name="fleet-serve")
    reader = Fleet(state, broker.url)
    assert eventually(lambda: len([d for d in reader.devices() if d.online]) == 3, timeout=30)

    r = edgesdk_cli(*args, "deploy", digits_bundle_v2.path, "--devices", ",".join(sims.ids), "--no-wait", "--json")
    rid = json.loads(r.stdout)["rollout"]
    assert eventually(lambda: reader.rollout(rid).state == "SUCCEEDED", timeout=60)  # serve did it
    assert all(sims.models(d)["digits"] == "2" for d in sims.ids)

    np.save(tmp_path / "x.npy", np.arange(80, dtype=np.float32).reshape(20, 4))
    r = edgesdk_cli(*args, "run", "noop", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npz", "--batch-size", "3",
                    "--json")  # with serve running, `run` only watches it work
    assert r.returncode == 0, r.stderr
    assert "watching it work" in r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npz")["y"], np.arange(80, dtype=np.float32).reshape(20, 4))

    second = spawn(*args, "serve", log_name="fleet-serve-2")  # one controller leads: this one stands by
    assert eventually(lambda: "it leads when no other controller does" in (tmp_path / "fleet-serve-2.log").read_text())
    time.sleep(0.5)
    assert "leading" not in (tmp_path / "fleet-serve-2.log").read_text().replace("it leads when", "")
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(30) == 0
    assert eventually(lambda: "fleet controller: leading" in (tmp_path / "fleet-serve-2.log").read_text(), timeout=30)
    r = edgesdk_cli(*args, "run", "noop", "--input", tmp_path / "x.npy", "-o", tmp_path / "y2.npz", "--json")
    assert r.returncode == 0 and "watching it work" in r.stderr, r.stderr  # the standby took over and does the work
    np.testing.assert_array_equal(np.load(tmp_path / "y2.npz")["y"], np.load(tmp_path / "y.npz")["y"])
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0


def test_fleet_and_agents_over_mutual_tls(make_broker, make_link, make_fleet, tls_material, eventually, digits_bundle,
                                          digits_bundle_v2, digits, edgesdk_cli, tmp_path) -> None:
    tls = tls_material
    secured = make_broker(extra=f"cafile {tls['ca']}\ncertfile {tls['server_cert']}\nkeyfile {tls['server_key']}\n"
                                "require_certificate true\nuse_identity_as_username true\n")
    url = f"mqtts://127.0.0.1:{secured.port}"
    creds = dict(ca_file=str(tls["ca"]), client_cert=str(tls["client_cert"]), client_key=str(tls["client_key"]))
    make_link("dev-tls", url=url, preinstall=[digits_bundle.path], **creds)
    fleet = make_fleet(url, **creds)
    assert eventually(lambda: [d.id for d in fleet.devices() if d.online] == ["dev-tls"])
    rid = fleet.deploy(digits_bundle_v2.path, devices=["dev-tls"])
    assert fleet.wait_rollout(rid, timeout=60).state == "SUCCEEDED"
    assert fleet.run("digits", digits.x_test[:30], batch_size=10, timeout=60).outputs[0].shape == (30, 10)
    fleet.stop()
    r = edgesdk_cli("fleet", "--broker", url, "--state", tmp_path / "cli-state", "--ca-file", tls["ca"],
                    "--client-cert", tls["client_cert"], "--client-key", tls["client_key"], "devices", "--json")
    assert r.returncode == 0, r.stderr
    assert [d["id"] for d in json.loads(r.stdout)] == ["dev-tls"]
    r = edgesdk_cli("fleet", "--broker", url, "--state", tmp_path / "anon", "--ca-file", tls["ca"], "devices")
    assert r.returncode == 17 and "cannot connect" in r.stderr  # no client certificate: refused, one clear line


def _version_1_database(fleet_db, state) -> None:
    """A fleet database as edgesdk made it at schema version 1 (no tasks.version, jobs.output_spec,
    jobs.bytes_sent, leader or blobs), holding a job in progress. SQLite: the layout of those
    days (no version recorded, inputs as files); PostgreSQL: the first migration's tables."""
    from fleet.storage.schema import MIGRATIONS

    job = ("INSERT INTO jobs (id, model, state, options, samples, tasks, created) VALUES ('oldjob', 'noop', "
           "'RUNNING', '" + json.dumps({"batch_size": 5, "lease_s": 60, "max_attempts": 5, "inputs": 1}) + "', 10, 2, 0)")
    tasks = ("INSERT INTO tasks (id, job, idx, start, stop, state) VALUES ('oldjob-0', 'oldjob', 0, 0, 5, 'PENDING'), "
             "('oldjob-1', 'oldjob', 1, 5, 10, 'PENDING')")
    if fleet_db is None:
        import sqlite3

        state.mkdir(parents=True)
        db = sqlite3.connect(state / "fleet.sqlite")
        for statement in [*MIGRATIONS[1], job, tasks]:
            db.execute(statement)
        db.commit()
        db.close()
        return
    import psycopg

    from fleet.storage.postgres import ddl

    with psycopg.connect(fleet_db, autocommit=True) as conn:
        for statement in [*MIGRATIONS[1], job, tasks]:
            for sql in ddl(statement):
                conn.execute(sql)
        conn.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1)")


def test_a_database_of_an_older_fleet_is_migrated_and_its_job_resumes(broker, make_fleet, make_sims, eventually,
                                                                     tmp_path, fleet_db) -> None:
    from fleet.storage import SCHEMA_VERSION, open_storage

    state = tmp_path / "fleet"
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    _version_1_database(fleet_db, state)
    if fleet_db is None:  # the files of those days
        (state / "jobs" / "oldjob").mkdir(parents=True)
        np.save(state / "jobs" / "oldjob" / "x0.npy", x)

    storage = open_storage(fleet_db, state)  # opening it migrates it
    with storage.connect() as fdb:
        assert fdb.schema_version() == SCHEMA_VERSION
        assert "version" in fdb.columns("tasks") and {"output_spec", "bytes_sent"} <= fdb.columns("jobs")
        assert fdb.columns("leader") and fdb.columns("blobs")
    if fleet_db is not None:  # inputs live in the database from version 4 on
        storage.blobs.put_array("input", "oldjob.0", x)
    make_sims(1, broker.url, models={"noop": "1"})
    fleet = make_fleet(broker.url, state=state)
    np.testing.assert_array_equal(fleet.finish_job("oldjob", timeout=60).outputs[0], x)
    with fleet.database() as fdb:
        assert {r["version"] for r in fdb.all("SELECT version FROM tasks")} == {"1"}  # recorded at dispatch
