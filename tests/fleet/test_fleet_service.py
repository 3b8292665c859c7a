"""The fleet as a service and over TLS: ``edgesdk fleet serve`` carries out what other commands
ask for; agents and fleet talk through a broker that requires client certificates; a database made
by an older fleet is migrated."""

import json
import signal

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

    second = edgesdk_cli(*args, "serve")
    assert second.returncode == 19 and "another fleet process" in second.stderr  # one controller per state dir
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(30) == 0


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


def test_a_database_of_an_older_fleet_is_migrated_and_its_job_resumes(broker, make_fleet, make_sims, eventually,
                                                                     tmp_path) -> None:
    import sqlite3

    from fleet.state import SCHEMA, SCHEMA_VERSION

    state = tmp_path / "fleet"
    (state / "jobs" / "oldjob").mkdir(parents=True)
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(state / "jobs" / "oldjob" / "x0.npy", x)
    # as edgesdk made it before: no tasks.version, no jobs.output_spec, no jobs.bytes_sent
    old_schema = SCHEMA.replace("outputs TEXT, version TEXT);", "outputs TEXT);").replace(
        ", output_spec TEXT,\n    bytes_sent INTEGER NOT NULL DEFAULT 0);", ");")
    assert "version TEXT)" not in old_schema and "output_spec" not in old_schema and "bytes_sent" not in old_schema
    db = sqlite3.connect(state / "fleet.sqlite")
    db.executescript(old_schema)
    db.execute("INSERT INTO jobs (id, model, state, options, samples, tasks, created) VALUES ('oldjob', 'noop', "
               "'RUNNING', ?, 10, 2, 0)", (json.dumps({"batch_size": 5, "lease_s": 60, "max_attempts": 5, "inputs": 1}),))
    db.executemany("INSERT INTO tasks (id, job, idx, start, stop, state) VALUES (?, 'oldjob', ?, ?, ?, 'PENDING')",
                   [("oldjob-0", 0, 0, 5), ("oldjob-1", 1, 5, 10)])
    db.commit()
    db.close()

    make_sims(1, broker.url, models={"noop": "1"})
    fleet = make_fleet(broker.url, state=state)
    with fleet._db() as fdb:
        assert fdb.scalar("PRAGMA user_version") == SCHEMA_VERSION
        assert "version" in {r["name"] for r in fdb.all("PRAGMA table_info(tasks)")}
        assert {"output_spec", "bytes_sent"} <= {r["name"] for r in fdb.all("PRAGMA table_info(jobs)")}
    np.testing.assert_array_equal(fleet.finish_job("oldjob", timeout=60).outputs[0], x)
    with fleet._db() as fdb:
        assert {r["version"] for r in fdb.all("SELECT version FROM tasks")} == {"1"}  # recorded at dispatch
