"""A row the fleet cannot process (garbage JSON in a job's options or a task's outputs, a rollout
whose options do not parse) fails only its own job or rollout, with the reason; every other
rollout and job still finishes, while the fleet runs and after a restart on the same state
directory. Real Mosquitto, simulated devices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fleet import Fleet
from fleet.jobs import collect_outputs
from sdk import protocol as proto
from sdk.errors import JobError, RolloutError


def poison(fleet: Fleet, sql: str, *params) -> None:
    """Change the fleet database behind the fleet's back (as a bug, a disk error or a hand would)."""
    with fleet.database() as db:
        assert db.execute(sql, params).rowcount >= 1


def ghost_job(fleet: Fleet, **options) -> str:
    """A job of a model no device runs: nothing but the poison ever touches it."""
    return fleet.submit("ghost", np.zeros((4, 4), np.float32), batch_size=2, **options)


def poisoned_rows(fleet: Fleet, state, bundle, tmp_path, tag: str) -> dict[str, str]:
    """A job with garbage options, a finished job whose stored outputs are garbage, and a
    rollout (to an offline device: it waits) whose options are not valid JSON."""
    bad_options = ghost_job(fleet)
    poison(fleet, "UPDATE jobs SET options = '{not json' WHERE id = ?", bad_options)
    bad_outputs = ghost_job(fleet, output=tmp_path / f"{tag}.npz")
    poison(fleet, "UPDATE tasks SET state = 'DONE', device = 'x', done_at = 1, outputs = 'garbage' WHERE job = ?",
           bad_outputs)
    bad_rollout = fleet.deploy(bundle.path, devices=["nobody"])
    poison(fleet, "UPDATE rollouts SET options = '[' WHERE id = ?", bad_rollout)
    return {"options": bad_options, "outputs": bad_outputs, "rollout": bad_rollout}


def assert_failed_alone(fleet: Fleet, bad: dict[str, str]) -> None:
    job = fleet.wait_job(bad["options"], timeout=30)
    assert job.state == "FAILED" and "could not process it: JSONDecodeError" in job.reason, job.reason
    job = fleet.wait_job(bad["outputs"], timeout=30)
    assert job.state == "FAILED" and "stored outputs of task 0 are unreadable" in job.reason, job.reason
    with pytest.raises(JobError, match="unreadable"):  # a JobError, never a raw JSON or numpy error
        fleet.outputs(bad["outputs"])
    view = fleet.wait_rollout(bad["rollout"], timeout=30)
    assert view.state == "FAILED" and view.done and "could not process it" in view.reason, view.reason
    assert view.counts["CANCELED"] == 1 and view.options == {"unreadable": "["}
    assert bad["rollout"] in [v.id for v in fleet.rollouts()]  # the listing still works
    with pytest.raises(RolloutError, match="FAILED"):
        fleet.rollback(bad["rollout"])


def test_poisoned_rows_fail_alone_while_running_and_after_a_restart(broker, make_sims, eventually, tmp_path,
                                                                     digits_bundle, digits_bundle_v2) -> None:
    sims = make_sims(3, broker.url, models={"digits": "1", "noop": "1"}, infer_s=0.001)
    state = tmp_path / "fleet"
    fleet = Fleet(state, broker.url, tick=0.1).start()
    try:
        assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 3)
        # poisoned while the fleet runs
        bad = poisoned_rows(fleet, state, digits_bundle_v2, tmp_path, "live")
        x = np.arange(240, dtype=np.float32).reshape(60, 4)
        good_rollout = fleet.deploy(digits_bundle_v2.path, devices=sims.ids, canary=1, batch_percent=100)
        np.testing.assert_array_equal(fleet.run("noop", x, batch_size=7, timeout=60).outputs[0], x)
        assert fleet.wait_rollout(good_rollout, timeout=60).state == "SUCCEEDED"
        assert all(sims.models(d)["digits"] == "2" for d in sims.ids)
        assert_failed_alone(fleet, bad)
        assert fleet.stats["isolated_failures"] >= 2
    finally:
        fleet.stop()

    # poisoned while no fleet runs; healthy work waits in the same database
    reader = Fleet(state, broker.url)
    bad = poisoned_rows(reader, state, digits_bundle, tmp_path, "restart")
    half_poisoned = reader.submit("noop", x, batch_size=30, output=tmp_path / "half.npz")  # task 0 garbage, task 1 fine
    poison(reader, "UPDATE tasks SET state = 'DONE', device = 'x', done_at = 1, outputs = '[{\"b64\": 3}]' "
                  "WHERE id = ?", f"{half_poisoned}-0")
    good_job = reader.submit("noop", x, batch_size=7)
    good_rollout = reader.deploy(digits_bundle.path, devices=sims.ids, canary=1, batch_percent=100)
    fleet = Fleet(state, broker.url, tick=0.1).start()
    try:
        np.testing.assert_array_equal(fleet.finish_job(good_job, timeout=60).outputs[0], x)
        assert fleet.wait_rollout(good_rollout, timeout=60).state == "SUCCEEDED"
        assert all(sims.models(d)["digits"] == "1" for d in sims.ids)
        assert_failed_alone(fleet, bad)
        half = fleet.wait_job(half_poisoned, timeout=30)
        assert half.state == "FAILED" and "stored outputs of task 0 are unreadable" in half.reason
    finally:
        fleet.stop()


def test_collect_outputs_raises_job_errors_only(tmp_path, fleet_db) -> None:
    """Rows that do not fit together (written behind the fleet's back) give a JobError that says
    what to do, not numpy's ValueError from concatenate."""
    from fleet.storage import open_storage

    enc = proto.Result.encode_tensor
    with open_storage(fleet_db, tmp_path).connect() as db:
        db.execute("INSERT INTO jobs (id, model, state, options, samples, tasks, created) "
                   "VALUES ('j', 'm', 'RUNNING', '{}', 4, 2, 0)")
        for i, outputs in enumerate([[enc(np.zeros((2, 3), np.float32))], [enc(np.zeros((2, 5), np.float32))]]):
            db.execute("INSERT INTO tasks (id, job, idx, start, stop, state, outputs) VALUES (?, 'j', ?, ?, ?, 'DONE', ?)",
                       (f"j-{i}", i, 2 * i, 2 * i + 2, json.dumps(outputs)))
        with pytest.raises(JobError, match="do not fit together.*run it again"):
            collect_outputs(db, "j")
        db.execute("UPDATE tasks SET outputs = ? WHERE id = 'j-1'",
                   (json.dumps([enc(np.zeros((2, 3), np.float32))] * 2),))
        with pytest.raises(JobError, match="task 1 holds 2 outputs where task 0 holds 1"):
            collect_outputs(db, "j")
