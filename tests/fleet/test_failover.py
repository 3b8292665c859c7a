"""Several controllers on one fleet database: one leads, the others stand by and take over when
it dies; a leader that stalled and wakes up after losing its lease writes nothing.

With PostgreSQL the lease is a row timed by the server with a fencing epoch (fleet.leader); with
SQLite it is an flock, which a stalled process keeps (so nobody takes over from it) and a dead
one drops at once."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np

from fleet import Fleet
from sdk import protocol as proto


def ghost_status(device: str) -> tuple[str, bytes]:
    """A device's status message, as the engine's inbox holds one taken off the broker."""
    return proto.topic(device, "status"), proto.Status(device=device, online=True).to_payload()


def test_a_standby_takes_over_when_the_leader_stops_and_only_one_leads(broker, make_fleet, tmp_path, eventually,
                                                                        fleet_db) -> None:
    state = tmp_path / "fleet"
    a = make_fleet(broker.url, state=state, lease_s=2)
    b = Fleet(state, broker.url, tick=0.1, lease_s=2).start(standby=True)
    try:
        time.sleep(1.0)
        assert a.leading and not b.leading and b.running and b.controller_elsewhere()
        a.stop()  # a clean stop gives the lease up at once
        assert eventually(lambda: b.leading, timeout=10)
        assert not a.leading and eventually(lambda: b.conn is not None and b.conn.connected.is_set())
    finally:
        b.stop()


def _stall_between_steps(fleet: Fleet, release: threading.Event, message: tuple[str, bytes]) -> threading.Event:
    """Make the leading engine stop before its next transaction (as SIGSTOP or a GC pause would),
    then go on with ``message`` as its next batch once ``release`` is set."""
    engine = fleet.engine
    stalled = threading.Event()
    take = engine._take_batch

    def stalled_take():
        if not release.is_set():
            stalled.set()
            release.wait()
            return [message]
        return take()

    engine._take_batch = stalled_take
    return stalled


def _stall_inside_a_transaction(fleet: Fleet, release: threading.Event, device: str) -> threading.Event:
    """Make the leading engine stop in the middle of a transaction (after its lease check), while
    it applies a status of ``device``, then go on and write it once ``release`` is set."""
    engine = fleet.engine
    stalled = threading.Event()
    on_status = engine.handlers[proto.Status]

    def slow(dev, msg, now, acks):
        if dev == device:
            stalled.set()
            release.wait()
        on_status(dev, msg, now, acks)

    engine.handlers[proto.Status] = slow
    engine.inbox.put(ghost_status(device))
    return stalled


def _check_stalled_leader(a: Fleet, b: Fleet, release: threading.Event, device: str, fleet_db, eventually) -> None:
    if fleet_db is None:
        # SQLite: the stalled process keeps its flock; nobody takes over, and when it goes on it writes
        time.sleep(3.0)
        assert not b.leading
        release.set()
        assert eventually(lambda: any(d.id == device for d in b.devices()), timeout=10)
        assert a.leading and not b.leading
        return
    # PostgreSQL: the lease lapses (2 s, by the server's clock) and the standby takes over with the next epoch
    epoch = a.leadership.epoch
    assert eventually(lambda: b.leading, timeout=15)
    assert b.leadership.epoch == epoch + 1
    release.set()
    assert eventually(lambda: not a.leading, timeout=10)  # it found its epoch gone and stood down
    time.sleep(0.5)
    assert device not in {d.id for d in b.devices()}  # ...without writing what it was about to write
    assert b.leading and b.leadership.current().holder == b.leadership.me


def test_a_leader_stalled_between_transactions_writes_nothing_after_its_lease_lapsed(
        broker, make_fleet, tmp_path, eventually, fleet_db) -> None:
    state = tmp_path / "fleet"
    a = make_fleet(broker.url, state=state, lease_s=2)
    release = threading.Event()
    stalled = _stall_between_steps(a, release, ghost_status("ghost-between"))
    assert stalled.wait(5)
    b = make_fleet(broker.url, state=state, lease_s=2, standby=True)
    try:
        _check_stalled_leader(a, b, release, "ghost-between", fleet_db, eventually)
    finally:
        release.set()


def test_a_leader_stalled_inside_a_transaction_writes_nothing_after_its_lease_lapsed(
        broker, make_fleet, tmp_path, eventually, fleet_db) -> None:
    state = tmp_path / "fleet"
    a = make_fleet(broker.url, state=state, lease_s=2)
    release = threading.Event()
    stalled = _stall_inside_a_transaction(a, release, "ghost-inside")
    assert stalled.wait(5)
    b = make_fleet(broker.url, state=state, lease_s=2, standby=True)
    try:
        # PostgreSQL ends the stalled session after a lease period idle in its transaction, which
        # releases the lease row's lock; the standby takes over
        _check_stalled_leader(a, b, release, "ghost-inside", fleet_db, eventually)
    finally:
        release.set()


def serve(spawn, broker, state, name: str):
    return spawn("fleet", "--broker", broker.url, "--state", state, "serve", "--lease", "2", log_name=name)


def test_the_leader_process_killed_mid_job_and_mid_rollout(broker, spawn, agent_toml, make_sims, tmp_path, eventually,
                                                          digits_bundle, digits, fleet_db) -> None:
    """Two ``fleet serve`` processes; the leader is SIGKILLed while a job runs on two real agents
    and a rollout goes through simulated devices in stages. The standby takes over: every sample
    gets exactly one result, identical to local inference; the rollout finishes."""
    from agent import Agent
    from agent.config import load_config
    from test_real_agents import local_predictions

    agents = []
    for i in range(2):
        cfg = agent_toml(f"ha-{i}", broker.url, tags={"kind": "agent"})
        setup = Agent(load_config(cfg, env={}))
        setup.install(digits_bundle.path)
        setup.stop()
        agents.append(spawn("agent", "run", "--config", cfg, log_name=f"ha-{i}"))
    sims = make_sims(6, broker.url, models={"blob": "1"}, install_s=0.7, resend_after=1.0)
    state = tmp_path / "fleet"
    first = serve(spawn, broker, state, "serve-1")
    reader = Fleet(state, broker.url)
    assert eventually(reader.controller_elsewhere, timeout=30)
    second = serve(spawn, broker, state, "serve-2")
    assert eventually(lambda: len([d for d in reader.devices() if d.online]) == 8, timeout=60)

    x = np.concatenate([digits.x_test] * 60)  # 23,820 samples in tasks of 30
    rid = reader.deploy(digits_bundle.path, devices=sims.ids, canary=1, batch_percent=20)  # 6 stages of ~0.7 s
    job = reader.submit("digits", x, batch_size=30, to={"kind": "agent"})  # the simulated devices only echo
    assert eventually(lambda: reader.job(job).counts["DONE"] >= 20, timeout=60, interval=0.01)
    assert reader.job(job).state == "RUNNING" and reader.rollout(rid).state == "RUNNING"
    first.send_signal(signal.SIGKILL)
    first.wait(10)

    result = reader.finish_job(job, timeout=120)
    assert result.counts == {"PENDING": 0, "LEASED": 0, "DONE": result.tasks, "FAILED": 0}
    expected = np.concatenate([local_predictions(digits_bundle.path, digits.x_test)] * 60)
    np.testing.assert_array_equal(result.outputs[0], expected)  # one result per sample, as local inference gives
    view = reader.wait_rollout(rid, timeout=60)
    assert view.state == "SUCCEEDED" and view.counts["SUCCEEDED"] == 6
    assert all(sims.models(d)["digits"] == "1" for d in sims.ids)
    if fleet_db is not None:
        assert reader.leadership.current().epoch == 2  # the standby leads with the next epoch
    assert second.poll() is None
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0
    for p in agents:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0


def test_commands_from_another_machine_go_through_the_database(broker, make_sims, spawn, edgesdk_cli, tmp_path,
                                                               eventually, digits_bundle_v2, fleet_db) -> None:
    """With PostgreSQL, commands run with another state directory (another machine: no file of
    the controller's in reach) deploy, watch the rollout, run a job and write its results again
    later, through the database and whichever controller leads. (SQLite keeps bundles and inputs beside its file: one machine.)"""
    import json

    import numpy as np

    sims = make_sims(3, broker.url, models={"digits": "1", "noop": "1"}, infer_s=0.001)
    serve(spawn, broker, tmp_path / "controller", "serve")
    elsewhere = tmp_path / ("workstation" if fleet_db else "controller")
    args = ["fleet", "--broker", broker.url, "--state", elsewhere]
    assert eventually(lambda: json.loads(edgesdk_cli(*args, "devices", "--json").stdout or "[]")
                      and all(d["online"] for d in json.loads(edgesdk_cli(*args, "devices", "--json").stdout)))
    r = edgesdk_cli(*args, "deploy", digits_bundle_v2.path, "--devices", ",".join(sims.ids), "--no-wait", "--json")
    assert r.returncode == 0, r.stderr
    rollout = json.loads(r.stdout)["rollout"]
    r = edgesdk_cli(*args, "rollout", rollout, "--watch", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "SUCCEEDED", r.stderr
    assert [v["id"] for v in json.loads(edgesdk_cli(*args, "rollouts", "--json").stdout)] == [rollout]
    x = np.arange(120, dtype=np.float32).reshape(30, 4)
    np.save(tmp_path / "x.npy", x)
    r = edgesdk_cli(*args, "run", "noop", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npz", "--json")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npz")["y"], x)
    (job,) = [j["id"] for j in json.loads(edgesdk_cli(*args, "jobs", "--json").stdout)]
    r = edgesdk_cli(*args, "job", job, "-o", tmp_path / "again.npz", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "SUCCEEDED", r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "again.npz")["y"], x)
    if fleet_db:
        assert not (elsewhere / "bundles").exists() and not (elsewhere / "jobs").exists()  # nothing kept here
