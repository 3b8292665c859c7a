"""The fleet as operators run it: ``edgesdk fleet ...`` processes, SIGKILLed mid-job and
mid-rollout and resumed; three agent processes, one killed mid-job; the CLI's JSON output."""

import json
import signal

import numpy as np

from agent import Agent
from agent.config import load_config
from fleet import Fleet


def fleet_args(broker, state):
    return ["fleet", "--broker", broker.url, "--state", state]


def test_a_killed_fleet_process_resumes_its_job_without_redoing_tasks(broker, make_sims, spawn, edgesdk_cli, tmp_path,
                                                                      eventually) -> None:
    sims = make_sims(3, broker.url, models={"noop": "1"}, infer_s=0.0005, resend_after=1.0)
    x = np.random.default_rng(2).random((6000, 4), dtype=np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    state = tmp_path / "fleet"
    proc = spawn(*fleet_args(broker, state), "run", "noop", "--input", tmp_path / "in.npz", "-o", tmp_path / "out.npz",
                 "--batch-size", "20", log_name="fleet-run")
    reader = Fleet(state, broker.url)
    assert eventually(lambda: reader.jobs_list() and reader.jobs_list()[0].counts["DONE"] >= 60, timeout=60)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    job = reader.jobs_list()[0]
    assert job.state == "RUNNING" and job.counts["DONE"] < job.tasks
    before = reader.database().all("SELECT id, device, done_at FROM tasks WHERE state = 'DONE'")
    r = edgesdk_cli(*fleet_args(broker, state), "job", "resume", job.id, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["state"] == "SUCCEEDED" and summary["samples_done"] == 6000
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["y"], x)
    after = {row["id"]: (row["device"], row["done_at"]) for row in reader.database().all("SELECT id, device, done_at FROM tasks")}
    assert all(after[row["id"]] == (row["device"], row["done_at"]) for row in before)  # finished tasks kept, not redone
    assert sum(sims.devices[d].tasks_done for d in sims.ids) <= job.tasks + 3 * 2  # at most the in-flight ones twice


def test_a_killed_fleet_process_resumes_its_rollout(broker, make_sims, spawn, edgesdk_cli, tmp_path, eventually,
                                                    digits_bundle_v2) -> None:
    sims = make_sims(6, broker.url, models={"digits": "1"}, install_s=1.0, resend_after=1.0)
    state = tmp_path / "fleet"
    r = edgesdk_cli(*fleet_args(broker, state), "deploy", digits_bundle_v2.path, "--devices", ",".join(sims.ids),
                    "--canary", "2", "--batch-percent", "50", "--no-wait", "--json")
    assert r.returncode == 0, r.stderr
    rid = json.loads(r.stdout)["rollout"]
    proc = spawn(*fleet_args(broker, state), "rollout", rid, "--watch", log_name="fleet-watch")
    reader = Fleet(state, broker.url)
    assert eventually(lambda: reader.rollout(rid).counts["SUCCEEDED"] >= 2, timeout=60)
    assert eventually(lambda: reader.rollout(rid).counts["IN_PROGRESS"] >= 1, timeout=30)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert reader.rollout(rid).state == "RUNNING"
    r = edgesdk_cli(*fleet_args(broker, state), "rollout", rid, "--watch", "--json")
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert view["state"] == "SUCCEEDED" and view["counts"]["SUCCEEDED"] == 6
    assert all(sims.models(d)["digits"] == "2" for d in sims.ids)
    listed = json.loads(edgesdk_cli(*fleet_args(broker, state), "rollouts", "--json").stdout)
    assert [v["id"] for v in listed] == [rid]


def test_three_agent_processes_one_killed_mid_job(broker, spawn, agent_toml, make_fleet, eventually, digits_bundle,
                                                  digits) -> None:
    procs = {}
    for i in range(3):
        cfg_path = agent_toml(f"worker-{i}", broker.url)
        setup = Agent(load_config(cfg_path, env={}))
        setup.install(digits_bundle.path)
        setup.stop()
        procs[f"worker-{i}"] = spawn("agent", "run", "--config", cfg_path, log_name=f"worker-{i}")
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online and d.models]) == 3, timeout=60)
    x = np.concatenate([digits.x_test] * 40)  # 14,400 samples
    job = fleet.submit("digits", x, batch_size=40, lease_s=600)
    assert eventually(lambda: fleet.job(job).devices.get("worker-0", {}).get("tasks", 0) >= 3, timeout=60)
    procs["worker-0"].send_signal(signal.SIGKILL)  # its leased tasks come back through its Last-Will
    result = fleet.finish_job(job, timeout=300)
    assert result.counts == {"PENDING": 0, "LEASED": 0, "DONE": result.tasks, "FAILED": 0}
    assert result.outputs[0].shape == (len(x), 10)
    expected = np.concatenate([np.asarray(fleet.outputs(job)[0][: len(digits.x_test)])] * 40)
    np.testing.assert_array_equal(result.outputs[0], expected)  # every repeat of the test set got the same answers
    accuracy = float(np.mean(np.argmax(result.outputs[0], axis=1) == np.concatenate([digits.y_test] * 40)))
    assert accuracy > 0.9
    assert {"worker-1", "worker-2"} <= set(result.devices)
    for p in (procs["worker-1"], procs["worker-2"]):
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0


def test_devices_and_job_as_json_from_the_cli(broker, make_sims, make_fleet, edgesdk_cli, tmp_path, eventually) -> None:
    make_sims(2, broker.url, models={"noop": "7"}, tags={"site": "lab"}, infer_s=0.001)
    state = tmp_path / "fleet"
    r = edgesdk_cli(*fleet_args(broker, state), "devices", "--tag", "site=lab", "--json")
    assert r.returncode == 0, r.stderr
    devices = json.loads(r.stdout)
    assert [d["id"] for d in devices] == ["sim-0000", "sim-0001"]
    assert all(d["online"] and d["models"] == {"noop": "7"} for d in devices)
    table = edgesdk_cli(*fleet_args(broker, state), "devices")
    assert "sim-0001" in table.stdout and "noop@7" in table.stdout and "site=lab" in table.stdout
    np.save(tmp_path / "x.npy", np.ones((50, 4), dtype=np.float32))
    r = edgesdk_cli(*fleet_args(broker, state), "run", "noop", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.jsonl",
                    "--format", "jsonl", "--batch-size", "8", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["state"] == "SUCCEEDED" and summary["tasks"] == 7 and summary["efficiency"] > 0
    assert len((tmp_path / "y.jsonl").read_text().splitlines()) == 50
    shown = edgesdk_cli(*fleet_args(broker, state), "job", summary["id"])
    assert shown.returncode == 0 and "SUCCEEDED 50/50 samples" in shown.stdout
    missing = edgesdk_cli(*fleet_args(broker, state), "rollout", "nope")
    assert missing.returncode == 20 and missing.stderr.strip() == "error: no rollout 'nope': list them with edgesdk fleet rollouts"
