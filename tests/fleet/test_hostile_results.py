"""Hostile task results on a real Mosquitto with a real ``Fleet``: a rogue MQTT client (any device
can publish on its own ``up`` topic) takes tasks and answers them with well-formed but wrong
outputs, answers other devices' tasks, and claims the wrong model version. Honest simulated
devices do the work; their output is an echo of the inputs, so the job's outputs can be checked.
These are exactly the results that protocol validation cannot catch: the fleet must."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import paho.mqtt.client as mqtt

from sdk import protocol as proto

#: what the rogue answers, in turn, for the tasks leased to it (the task is for digits v2: float32[N, 10])
HOSTILE_ANSWERS = ("rows", "shape", "dtype", "count", "version")


def echo(x: np.ndarray, width: int) -> np.ndarray:
    return x.reshape(len(x), -1)[:, :width]


class Rogue:
    """A bare paho client posing as device ``rogue``: it announces itself online with digits v2
    and free slots, answers each task leased to it with the next of :data:`HOSTILE_ANSWERS`,
    and answers every task it sees for another device (an open broker lets it subscribe to
    them) with a plausible result from its own topic."""

    def __init__(self, port: int, device: str = "rogue") -> None:
        self.device = device
        self.sent: Counter[str] = Counter()
        self.own_result_ids: list[str] = []
        self.acked: set[str] = set()
        self._answers = iter(HOSTILE_ANSWERS)
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(proto.topic(device, "cmd"), 1), (proto.subscription("task"), 1)])  # its own and all others' tasks
        self.client.loop_start()
        status = proto.Status(device=device, online=True, agent_version="0-rogue", models={"digits": "2"})
        self._up("status", status.to_payload(), retain=True)
        self._announce(free=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _up(self, channel: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(proto.topic(self.device, channel), payload, qos=1, retain=retain)

    def _announce(self, free: int) -> None:
        self._up("up", proto.WorkRequest(device=self.device, models={"digits": "2"}, capacity=1, free=free).to_payload())

    def _on_message(self, client, userdata, msg) -> None:
        device, channel = proto.parse_topic(msg.topic)
        if channel == "cmd":
            ack = proto.decode(msg.payload)
            if isinstance(ack, proto.Ack):
                with self._lock:
                    self.acked.update(ack.ack_ids)
            return
        task = proto.Task.from_payload(msg.payload)
        if device == self.device:
            self._answer_own(task)
        else:  # someone else's task: a correctly shaped answer, from a device that holds no lease
            self._result(task, "snooped", [np.zeros((task.count, 10), np.float32)])

    def _answer_own(self, task: proto.Task) -> None:
        with self._lock:
            mode = next(self._answers, None)
        n = task.count
        if mode is None:  # done being hostile: an honest error, and no more work please
            self._result(task, "error", [], error="rogue: out of tricks")
            self._announce(free=0)
            return
        outputs = {"rows": [np.zeros((n + 1, 10), np.float32)],
                   "shape": [np.zeros((n, 7), np.float32)],
                   "dtype": [np.zeros((n, 10), np.float64)],
                   "count": [np.zeros((n, 10), np.float32), np.zeros((n, 10), np.float32)],
                   "version": [np.zeros((n, 10), np.float32)]}[mode]
        self._result(task, mode, outputs, version="1" if mode == "version" else "2")
        self._announce(free=1)

    def _result(self, task: proto.Task, mode: str, outputs: list, version: str = "2", error: str = "") -> None:
        msg = proto.TaskResult(device=self.device, job=task.job, task=task.id, model=task.model, version=version,
                               outputs=[proto.Result.encode_tensor(o) for o in outputs], error=error,
                               elapsed_s=0.001, samples=task.count)
        with self._lock:
            self.sent[mode] += 1
            if mode != "snooped":
                self.own_result_ids.append(msg.id)
        self._up("up", msg.to_payload())


def test_a_rogue_device_cannot_spoil_a_job(broker, make_fleet, make_sims, eventually, digits_bundle_v2) -> None:
    fleet = make_fleet(broker.url)
    fleet.add_bundle(digits_bundle_v2.path)  # the fleet knows digits v2's outputs: float32[N, 10]
    rogue = Rogue(broker.port)
    try:
        assert eventually(lambda: [d.id for d in fleet.devices() if d.online] == ["rogue"])
        x = np.random.default_rng(7).random((600, 8, 8, 1), dtype=np.float32)
        job = fleet.submit("digits", x, batch_size=10, max_attempts=20)
        # the rogue alone answers first: no result was accepted yet, only the manifest says what is right
        assert eventually(lambda: rogue.sent["error"] >= 1)
        assert fleet.job(job).counts["DONE"] == 0
        sims = make_sims(2, broker.url, models={"digits": "2"}, output_width=10, infer_s=0.005)
        result = fleet.finish_job(job, timeout=120)

        np.testing.assert_array_equal(result.outputs[0], echo(x, 10))  # every row the honest echo
        assert set(result.devices) <= set(sims.ids)  # not one task taken from the rogue
        assert rogue.sent["snooped"] >= 1 and all(rogue.sent[m] == 1 for m in HOSTILE_ANSWERS), rogue.sent
        stats = fleet.stats
        # the answers to its own tasks arrived while it held their leases: each one dropped as unfit
        assert stats["rejected_results.bad_outputs"] == 4  # rows, shape, dtype, count
        assert stats["rejected_results.wrong_version"] == 1
        # its answers to other devices' tasks: dropped while the task was leased to another device
        assert stats["rejected_results.not_leased"] >= 1
        assert stats["rejected_results"] == sum(stats[f"rejected_results.{k}"] for k in
                                                ("bad_outputs", "wrong_version", "not_leased", "unknown_task"))
        assert stats["isolated_failures"] == 0 and stats["failed_messages"] == 0
        # every result the rogue sent for its own tasks was acknowledged: no outbox re-sends them forever
        assert eventually(lambda: set(rogue.own_result_ids) <= rogue.acked)
        # the rogue's unfit answers counted as failed attempts, so its tasks were re-queued and redone
        assert result.retries >= len(HOSTILE_ANSWERS)
    finally:
        rogue.close()


def test_without_a_manifest_the_first_accepted_result_sets_the_outputs(broker, make_fleet, make_sims,
                                                                       eventually) -> None:
    """A model the fleet holds no bundle of (installed on the devices another way): results of one
    job must all look like its first accepted one, so they always concatenate."""
    narrow = make_sims(1, broker.url, prefix="narrow", models={"noop": "1"}, output_width=4, infer_s=0.02)
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 1)
    x = np.arange(400, dtype=np.float32).reshape(50, 8)
    job = fleet.submit("noop", x, batch_size=5, max_attempts=2)
    assert eventually(lambda: fleet.job(job).counts["DONE"] >= 1)
    narrow.stop()  # from now on only a device answering 6 columns
    wide = make_sims(1, broker.url, prefix="wide", models={"noop": "1"}, output_width=6)
    summary = fleet.wait_job(job, timeout=60)
    assert summary.state == "FAILED" and "do not match float32[N, 4]" in summary.reason, summary.reason
    assert fleet.stats["rejected_results.bad_outputs"] >= 2
    assert wide.ids[0] not in summary.devices


def test_a_result_for_the_wrong_version_is_refused_and_redone(broker, make_fleet, make_sims, eventually) -> None:
    """The device announced version 1; by the time it answers it runs version 3: the fleet does
    not mix outputs of a version the task was not sent for."""
    sims = make_sims(1, broker.url, models={"noop": "1"}, infer_s=0.5)
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 1)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    job = fleet.submit("noop", x, batch_size=2, max_attempts=5)
    assert eventually(lambda: fleet.job(job).counts["LEASED"] == 1)
    sims.devices[sims.ids[0]].models["noop"] = "3"  # upgraded while the task runs
    summary = fleet.wait_job(job, timeout=60)
    assert fleet.stats["rejected_results.wrong_version"] >= 1
    assert summary.state == "SUCCEEDED"  # redone on version 3, which the device announced afterwards
    with fleet.database() as db:
        assert db.scalar("SELECT version FROM tasks WHERE job = ?", (job,)) == "3"
    np.testing.assert_array_equal(fleet.outputs(job)[0], x)


def test_what_a_task_result_must_hold_comes_from_the_manifest(digits_bundle, digits_bundle_v2) -> None:
    from fleet.jobs import OutputSpec, manifest_output_specs
    from sdk.bundle import Bundle

    v1, v2 = (Bundle.open(b.path).manifest.data for b in (digits_bundle, digits_bundle_v2))
    assert v1["outputs"][0]["dtype"] == "int8" and v2["outputs"][0]["dtype"] == "float32"
    # the agent dequantizes an int8 output: both versions answer float32 scores for 10 classes
    assert manifest_output_specs(v1) == manifest_output_specs(v2) == [OutputSpec("float32", (10,))]
    dynamic = {"outputs": [{"dtype": "int32", "shape": [1, 4, 3], "shape_signature": [-1, -1, 3]}]}
    assert manifest_output_specs(dynamic) == [OutputSpec("int32", (None, 3))]
    spec = manifest_output_specs(dynamic)[0]
    assert spec.fits(np.zeros((5, 9, 3), np.int32)) and not spec.fits(np.zeros((5, 9, 4), np.int32))
    assert not spec.fits(np.zeros((5, 9, 3), np.int64)) and not spec.fits(np.zeros((5, 3), np.int32))
