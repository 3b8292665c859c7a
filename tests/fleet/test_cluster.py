"""A clustered broker: a 3-node NATS cluster speaking MQTT 3.1.1, the fleet on one node and real
agents on the others; a rollout and a job run across nodes, and the fleet's node is SIGKILLed
mid-job: every client fails over to the next node of its list and the job completes, every
sample with exactly one result, identical to local inference."""

from __future__ import annotations

import signal

import numpy as np


def test_rollout_and_job_across_nodes_survive_the_loss_of_a_node(nats_cluster, make_fleet, spawn, agent_toml, eventually,
                                                                 digits_bundle, digits_bundle_v2, digits) -> None:
    from agent import Agent
    from agent.config import load_config
    from test_real_agents import local_predictions

    agents = {}
    for device, nodes in (("node-b", (1, 2, 0)), ("node-c", (2, 1, 0))):
        cfg = agent_toml(device, nats_cluster.url(*nodes))
        setup = Agent(load_config(cfg, env={}))
        setup.install(digits_bundle.path)
        setup.stop()
        agents[device] = spawn("agent", "run", "--config", cfg, log_name=device)
    fleet = make_fleet(nats_cluster.url(0, 1, 2))
    assert fleet.conn.protocol == "3.1.1"  # NATS speaks MQTT 3.1.1 only: the protocol needs nothing newer
    assert eventually(lambda: {d.id for d in fleet.devices() if d.online} == set(agents), timeout=60)

    rid = fleet.deploy(digits_bundle_v2.path, devices=list(agents), canary=1)
    view = fleet.wait_rollout(rid, timeout=90)
    assert view.state == "SUCCEEDED" and view.counts["SUCCEEDED"] == 2
    assert eventually(lambda: all(d.models == {"digits": "2"} for d in fleet.devices()), timeout=30)

    x = np.concatenate([digits.x_test] * 20)  # 7,940 samples in tasks of 20
    job = fleet.submit("digits", x, batch_size=20, lease_s=15)
    assert eventually(lambda: fleet.job(job).counts["DONE"] >= 40, timeout=60)
    nats_cluster.kill(0)  # the fleet's node: the fleet moves to node 1, its session lives on in JetStream
    result = fleet.finish_job(job, timeout=180)
    assert result.counts == {"PENDING": 0, "LEASED": 0, "DONE": result.tasks, "FAILED": 0}
    expected = np.concatenate([local_predictions(digits_bundle_v2.path, digits.x_test)] * 20)
    np.testing.assert_array_equal(result.outputs[0], expected)
    assert fleet.conn.broker != ("127.0.0.1", nats_cluster.mqtt_ports[0])  # it moved to a live node
    for p in agents.values():
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
