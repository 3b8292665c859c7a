"""Batch jobs against a real Mosquitto with simulated devices (real protocol, timed fake
inference that echoes its inputs, so every result can be checked against its sample)."""

import json

import numpy as np

from sdk import protocol as proto


def publish_once(port: int, topic: str, payload: bytes) -> None:
    """One QoS-1 message from a bare paho client (a device that is not an edgesdk agent)."""
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.publish(topic, payload, qos=1).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def echo(x: np.ndarray, width: int = 4) -> np.ndarray:
    return x.reshape(len(x), -1)[:, :width]


def test_every_sample_gets_exactly_one_result_in_input_order(broker, make_fleet, make_sims, eventually) -> None:
    sims = make_sims(4, broker.url, models={"noop": "1"}, capacity=2, infer_s=0.0002)
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 4)
    x = np.random.default_rng(0).random((2000, 8, 8, 1), dtype=np.float32)
    result = fleet.run("noop", x, batch_size=50, timeout=60)
    assert result.state == "SUCCEEDED" and result.samples_done == 2000 and result.counts["DONE"] == 40
    np.testing.assert_array_equal(result.outputs[0], echo(x))
    assert set(result.devices) == set(sims.ids)
    assert sum(d["samples"] for d in result.devices.values()) == 2000
    assert abs(sum(d["share"] for d in result.devices.values()) - 1.0) < 1e-9
    assert result.samples_per_s > 0 and 0 < result.efficiency <= 1.2
    assert sum(sims.devices[d].tasks_done for d in sims.ids) == 40  # no task ran twice


def test_pull_dispatch_gives_a_fast_device_more_work_than_a_slow_one(broker, make_fleet, make_sims, eventually) -> None:
    fast = make_sims(1, broker.url, prefix="fast", models={"noop": "1"}, infer_s=0.0002)
    slow = make_sims(1, broker.url, prefix="slow", models={"noop": "1"}, infer_s=0.005)
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 2)
    x = np.zeros((3000, 4), dtype=np.float32)
    result = fleet.run("noop", x, batch_size=20, timeout=60)
    f, s = result.devices[fast.ids[0]], result.devices[slow.ids[0]]
    assert f["samples"] > 3 * s["samples"], result.devices
    assert f["throughput"] > 5 * s["throughput"]


def test_a_device_that_hangs_loses_its_lease_and_the_task_is_redone(broker, make_fleet, make_sims, eventually) -> None:
    sims = make_sims(2, broker.url, models={"noop": "1"}, infer_s=0.001)
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 2)
    sims.devices[sims.ids[0]].alive = False  # hangs: still "online", never answers
    x = np.arange(400, dtype=np.float32).reshape(100, 4)
    result = fleet.run("noop", x, batch_size=10, lease_s=1.0, timeout=60)
    np.testing.assert_array_equal(result.outputs[0], x)
    assert result.retries >= 1 and set(result.devices) == {sims.ids[1]}


def test_a_device_that_dies_has_its_tasks_redispatched_at_once(broker, make_fleet, make_sims, eventually) -> None:
    sims = make_sims(3, broker.url, models={"noop": "1"}, infer_s=0.002)
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 3)
    x = np.random.default_rng(1).random((3000, 4), dtype=np.float32)
    job = fleet.submit("noop", x, batch_size=25, lease_s=600)  # only the Last-Will can free its tasks in time
    assert eventually(lambda: fleet.job(job).counts["DONE"] >= 10)
    sims.kill(sims.ids[0])
    result = fleet.finish_job(job, timeout=60)
    np.testing.assert_array_equal(result.outputs[0], x)
    assert result.counts == {"PENDING": 0, "LEASED": 0, "DONE": 120, "FAILED": 0}


def test_results_as_jsonl_and_npz_files(broker, make_fleet, make_sims, eventually, tmp_path) -> None:
    make_sims(2, broker.url, models={"noop": "1"})
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 2)
    x = np.arange(60, dtype=np.float32).reshape(15, 4)
    fleet.run("noop", x, batch_size=4, output=tmp_path / "r.jsonl", fmt="jsonl", timeout=30)
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [ln["index"] for ln in lines] == list(range(15))
    assert [ln["outputs"][0] for ln in lines] == x.tolist()
    fleet.run("noop", x, batch_size=4, output=tmp_path / "r.npz", timeout=30)
    np.testing.assert_array_equal(np.load(tmp_path / "r.npz")["y"], x)


def test_tasks_are_cut_to_the_packet_limit_and_a_sample_larger_than_it_travels_in_pieces(broker, make_fleet, make_sims,
                                                                                          eventually) -> None:
    sims = make_sims(2, broker.url, models={"noop": "1"}, capacity=2)
    fleet = make_fleet(broker.url)  # the fleet's packet limit: 256 KiB
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 2)
    x = np.random.default_rng(1).random((100, 32, 32, 3), dtype=np.float32)  # 12 KiB a sample: 21 fit in a task
    result = fleet.run("noop", x, batch_size=64, timeout=60)
    assert result.task_samples == 21 and result.tasks == 5 and fleet.stats["task_pieces"] == 0
    np.testing.assert_array_equal(result.outputs[0], echo(x))
    big = np.random.default_rng(2).random((3, 224, 224, 3), dtype=np.float32)  # 588 KiB a sample: 3 pieces each
    result = fleet.run("noop", big, batch_size=8, timeout=60)
    assert result.state == "SUCCEEDED" and result.task_samples == 1 and fleet.stats["task_pieces"] >= 9
    np.testing.assert_array_equal(result.outputs[0], echo(big))
    assert result.input_bytes_per_sample == 224 * 224 * 3 * 4 and result.bytes_per_sample > 224 * 224 * 3 * 4
    assert sims.dropped["task-piece"] == 0


def test_hostile_task_pieces_are_dropped_and_counted_by_simulated_devices(broker, make_fleet, make_sims,
                                                                          eventually) -> None:
    sims = make_sims(1, broker.url, models={"noop": "1"})
    from sdk import protocol as proto

    frame = proto.Task("t-1", "j", "noop", 5.0, [np.ones((1, 4000), np.float32)]).to_payload()
    pieces = proto.split_task(frame, "t-1", 5000)
    forged = proto.TaskPiece("t-1", 0, pieces[0].count, pieces[0].total, pieces[0].sha256, b"\0" * len(pieces[0].data))
    topic = proto.topic(sims.ids[0], "task")
    publish_once(broker.port, topic, pieces[0].to_payload())
    publish_once(broker.port, topic, forged.to_payload())  # other bytes for a piece held: refused
    publish_once(broker.port, topic, proto.split_task(frame, "t-1", 3000)[1].to_payload())  # another cut: refused
    assert eventually(lambda: sims.dropped["task-piece"] == 2)
    for p in pieces[1:]:
        publish_once(broker.port, topic, p.to_payload())
    assert eventually(lambda: sims.devices[sims.ids[0]].tasks_done == 1)  # the genuine task still ran


def test_a_garbage_result_from_a_stranger_is_dropped_and_the_rest_goes_on(broker, make_fleet, make_sims, eventually) -> None:
    from sdk import protocol as proto

    fleet = make_fleet(broker.url)
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    job = fleet.submit("noop", x, batch_size=5)
    bad = {"schema": 1, "type": "task_result", "id": proto.new_id(), "ts": 1.0, "device": "rogue", "job": job,
           "task": f"{job}-0", "outputs": ["not a tensor"], "samples": 5}  # by hand: the protocol may refuse it
    publish_once(broker.port, proto.topic("rogue", "up"), json.dumps(bad).encode())
    # refused by the protocol (malformed), or by the fleet (rogue holds no lease); either way dropped
    assert eventually(lambda: fleet.stats["malformed"] + fleet.stats["rejected_results"] == 1)
    assert fleet.stats["failed_messages"] == 0 and fleet.stats["isolated_failures"] == 0
    make_sims(1, broker.url, models={"noop": "1"})
    result = fleet.finish_job(job, timeout=30)
    np.testing.assert_array_equal(result.outputs[0], x)
    assert list(result.devices) == ["sim-0000"]


def test_a_result_speaking_for_another_device_is_dropped(broker, make_fleet, make_sims, eventually) -> None:
    from sdk import protocol as proto

    fleet = make_fleet(broker.url)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    job = fleet.submit("noop", x, batch_size=2)
    forged = proto.TaskResult(device="sim-0000", job=job, task=f"{job}-0", model="noop",
                              outputs=[proto.Result.encode_tensor(np.zeros((2, 4), np.float32))], samples=2)
    publish_once(broker.port, proto.topic("intruder", "up"), forged.to_payload())
    assert eventually(lambda: fleet.stats["spoofed"] == 1)
    make_sims(1, broker.url, models={"noop": "1"})
    np.testing.assert_array_equal(fleet.finish_job(job, timeout=30).outputs[0], x)  # the forged zeros were not taken


def test_the_fleet_keeps_a_device_s_prefetch_queued_and_never_more(broker, make_fleet, make_sims, eventually) -> None:
    import threading

    sims = make_sims(2, broker.url, models={"noop": "1"}, capacity=1, infer_s=0.01, prefetch=3)
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 2)
    peak = {d: [0, 0] for d in sims.ids}  # most tasks held, most running at once
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for d in sims.ids:
                dev = sims.devices[d]
                peak[d][0] = max(peak[d][0], len(dev.slots))
                peak[d][1] = max(peak[d][1], dev.busy)
            done.wait(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    x = np.random.default_rng(3).random((120, 4), dtype=np.float32)
    try:
        result = fleet.run("noop", x, batch_size=2, timeout=60)  # 60 tasks of 20 ms
    finally:
        done.set()
        watcher.join(5)
    np.testing.assert_array_equal(result.outputs[0], echo(x))
    assert sum(sims.devices[d].tasks_done for d in sims.ids) == 60 and result.retries == 0  # each task once
    for d, (held, running) in peak.items():
        assert held == 4, (d, held)  # capacity 1 + prefetch 3: the fleet fills the queue, never beyond it
        assert running == 1  # and the device runs only its capacity


def test_without_prefetch_a_device_holds_only_what_it_runs(broker, make_fleet, make_sims, eventually) -> None:
    sims = make_sims(1, broker.url, models={"noop": "1"}, capacity=2, infer_s=0.01)
    fleet = make_fleet(broker.url)
    assert eventually(lambda: any(d.online for d in fleet.devices()))
    seen = []
    real = sims._on_task
    sims._on_task = lambda d, task: (seen.append(len(d.slots)), real(d, task))[1]
    x = np.random.default_rng(4).random((40, 4), dtype=np.float32)
    result = fleet.run("noop", x, batch_size=2, timeout=60)
    np.testing.assert_array_equal(result.outputs[0], echo(x))
    assert max(seen) <= 1  # a task arrives only while fewer than capacity (2) are held


def test_a_task_lost_on_the_way_is_sent_again_without_waiting_for_its_lease(broker, make_fleet, make_sims,
                                                                             eventually) -> None:
    """A device announces the tasks it holds and those whose results wait for an ack; a task
    leased to it long enough ago that it has neither was lost (a broker that died with it in
    flight): back in the queue at once, not after its lease of 10 minutes."""
    from test_rollout_sim import FakeClock

    clock = FakeClock()
    sims = make_sims(2, broker.url, models={"noop": "1"}, announce_interval=1.0)
    fleet = make_fleet(broker.url, clock=clock)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 2)
    engine = fleet.engine
    publish, lost = engine._publish, []

    def lossy(topic, payload, qos=1):  # the first task sent to sim-0001 never arrives
        if topic == proto.topic("sim-0001", "task") and not lost:
            lost.append(proto.Task.from_payload(payload).id)
            return True
        return publish(topic, payload, qos)

    engine._publish = lossy
    x = np.arange(80, dtype=np.float32).reshape(20, 4)
    job = fleet.submit("noop", x, batch_size=2, lease_s=600)
    assert eventually(lambda: lost and fleet.job(job).counts["DONE"] == 9)  # all but the lost one
    assert fleet.job(job).state == "RUNNING"
    clock.advance(11)  # past LOST_AFTER_S: the device's next announcement shows the task is not there
    result = fleet.finish_job(job, timeout=30)
    np.testing.assert_array_equal(result.outputs[0], x)
    assert fleet.stats["lost_tasks"] == 1 and result.retries == 1
