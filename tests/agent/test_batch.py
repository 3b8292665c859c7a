"""Tasks run as batches: one ``invoke`` for a model with a dynamic batch dimension, sample by
sample for a fixed batch (the last slice padded), the same outputs either way; results stored in
the outbox together; an agent announces and honours its prefetch."""

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from sdk import protocol as proto
from sdk.runtime import open_engine


def _tflite(model) -> bytes:
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


@pytest.fixture(scope="module")
def dynamic_two_outputs() -> bytes:
    """A small float CNN with a dynamic batch dimension and two outputs (landmarks and a score)."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return _tflite(keras.Model(inp, [keras.layers.Dense(6)(x), keras.layers.Dense(1, activation="sigmoid")(x)]))


@pytest.fixture(scope="module")
def fixed_batch_two() -> bytes:
    """A model whose batch is fixed at 2 (static shapes, as for an Edge TPU)."""
    import keras

    keras.utils.set_random_seed(1)
    inp = keras.Input((5,), batch_size=2)
    return _tflite(keras.Model(inp, keras.layers.Dense(3)(inp)))


def _one_by_one(engine, x: np.ndarray) -> list[np.ndarray]:
    rows = [engine.run([x[i : i + 1]]) for i in range(len(x))]
    return [np.concatenate([r[k] for r in rows]) for k in range(len(rows[0]))]


def test_a_dynamic_batch_runs_in_one_invoke_with_the_outputs_of_one_sample_at_a_time(dynamic_two_outputs) -> None:
    engine = open_engine(dynamic_two_outputs, "cpu")
    assert engine.batchable and engine.inputs[0].shape == [1, 16, 16, 3]
    x = np.random.default_rng(0).random((37, 16, 16, 3), dtype=np.float32)
    calls = []
    invoke = engine.interpreter.invoke
    engine.interpreter = type("Counting", (), {"__getattr__": lambda s, n: getattr(invoke.__self__, n),
                                                "invoke": lambda s: calls.append(1) or invoke()})()
    batched = engine.run_batch([x])
    assert len(calls) == 1  # the whole task in one invoke
    engine.interpreter = invoke.__self__
    expected = _one_by_one(engine, x)  # (run() resizes back to batch 1)
    assert sorted(y.shape for y in batched) == [(37, 1), (37, 6)]  # (TFLite orders outputs its own way)
    for got, want in zip(batched, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    again = engine.run_batch([x[:5]])  # another batch size: resized again
    np.testing.assert_allclose(again[0], expected[0][:5], rtol=1e-5, atol=1e-6)


def test_a_fixed_batch_of_one_runs_sample_by_sample(digits_model, digits) -> None:
    from converter.loaders import KerasKind
    from converter.options import ConvertOptions
    from converter.recipes import Recipe
    from sdk.dataset import Dataset

    kind = KerasKind()  # the int8 digits model with a static batch (cpu bundles keep a dynamic one)
    src = kind.load(digits_model.path, ConvertOptions(target="edgetpu"))
    model = kind.convert(src, Recipe("int8", "int8"), Dataset([digits.x_train[:100]], None, "c", [src.inputs[0].name]))
    engine = open_engine(model, "cpu")
    assert not engine.batchable  # a static [1, 8, 8, 1] input
    spec = engine.inputs[0]
    from sdk.runtime import quantize

    x = quantize(digits.x_test[:23].astype(np.float32), spec)
    got = engine.run_batch([x])
    want = _one_by_one(engine, x)
    assert got[0].shape == (23, 10) and got[0].dtype == want[0].dtype
    np.testing.assert_array_equal(got[0], want[0])


def test_a_fixed_batch_larger_than_one_runs_in_slices_with_the_last_padded(fixed_batch_two) -> None:
    engine = open_engine(fixed_batch_two, "cpu")
    assert not engine.batchable and engine.inputs[0].shape == [2, 5]
    x = np.random.default_rng(2).random((5, 5), dtype=np.float32)
    got = engine.run_batch([x])[0]
    pairs = [engine.run([np.stack([x[i], x[i + 1] if i + 1 < 5 else np.zeros(5, np.float32)])])[0] for i in (0, 2, 4)]
    assert got.shape == (5, 3)
    np.testing.assert_allclose(got, np.concatenate(pairs)[:5], rtol=1e-6)


def test_predict_batch_converts_whole_arrays_and_answers_as_predict_does(agent, digits_bundle, digits) -> None:
    agent.install(digits_bundle.path)
    model = agent.model("digits")
    x = digits.x_test[:40].astype(np.float32)
    before = model.stats.requests
    batched = model.predict_batch([x])[0]
    single = np.concatenate([model.predict([x[i : i + 1]])[0] for i in range(len(x))])
    assert batched.shape == (40, 10) and batched.dtype == np.float32  # dequantized, as predict answers
    np.testing.assert_array_equal(batched, single)
    assert model.stats.requests == before + 1 + 40
    from sdk.errors import InferenceError

    with pytest.raises(InferenceError, match="must be a batch of samples of shape"):
        model.predict_batch([x[:, :4]])
    with pytest.raises(InferenceError, match="takes 1 input"):
        model.predict_batch([x, x])


def test_results_stored_together_take_one_transaction_all_or_none(tmp_path) -> None:
    from agent.outbox import Outbox
    from sdk.errors import BackpressureError

    box = Outbox(tmp_path / "o.sqlite", max_messages=3)
    frame = proto.TaskResult(device="d", job="j", task="j-0", model="m", samples=1,
                             outputs=[np.ones((1, 2), np.float32)]).to_payload()
    box.put_many([("a", "t", frame), ("b", "t", b"{}")])
    assert [m.payload for m in box.due(0)] == [frame, b"{}"]  # binary payloads come back as stored
    with pytest.raises(BackpressureError):
        box.put_many([("c", "t", b"1"), ("d", "t", b"2")])
    assert len(box) == 2  # none of the refused pair was kept
    box.mark_sent([m.seq for m in box.due(0)])
    assert box.due(30) == [] and box.ack(["a", "b"]) == 2 and len(box) == 0
    box.close()


def test_results_the_writer_publishes_itself_are_stored_as_sent_and_go_again_after_a_reconnect(tmp_path) -> None:
    from agent.outbox import Outbox

    box = Outbox(tmp_path / "o.sqlite")
    box.put_many([("a", "t", b"1"), ("b", "t", b"2")], sending=True)
    assert box.due(30) == [] and [m.attempts for m in box.due(0)] == [1, 1]  # sent by the caller: not due yet
    box.close()
    box = Outbox(tmp_path / "o.sqlite")  # the agent killed and restarted: still there
    assert len(box) == 2
    box.reset_sent()  # a reconnect: due again at once
    assert [m.id for m in box.due(30)] == ["a", "b"]
    box.close()


def test_an_agent_announces_its_prefetch_holds_that_many_and_declines_beyond(make_link, broker, make_collector, eventually,
                                                                            digits_bundle, digits) -> None:
    collector = make_collector(broker.port)
    agent, link = make_link("dev-p", preinstall=[digits_bundle.path], prefetch=2)
    assert eventually(lambda: any(w.device == "dev-p" and (w.capacity, w.prefetch, w.free) == (1, 2, 1)
                                  for w in collector.work_requests))
    release = __import__("threading").Event()
    model = agent.model("digits")
    real = model.predict_batch
    model.predict_batch = lambda *a, **k: (release.wait(30), real(*a, **k))[1]  # a slow device: tasks pile up
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    x = digits.x_test[:2].astype(np.float32)
    try:
        for i in range(8):  # more than 2 x (capacity + prefetch): the last two are declined
            pub.publish(proto.topic("dev-p", "task"), proto.Task(f"job-{i}", "job", "digits", 30.0, [x]).to_payload(),
                        qos=1)
        assert eventually(lambda: len(link._work_request().running) == 6)
        assert not eventually(lambda: len(link._work_request().running) > 6, timeout=1)
        held = link._work_request()
        assert held.free == 0 and held.prefetch == 2  # holding capacity + prefetch or more: no free slot
    finally:
        release.set()
    assert eventually(lambda: len(collector.of_type(proto.TaskResult)) == 6)
    assert {r.task for r in collector.of_type(proto.TaskResult)} == {f"job-{i}" for i in range(6)}
    assert eventually(lambda: link._work_request().free == 1)
    pub.disconnect()
    pub.loop_stop()


def test_an_agent_with_short_tasks_asks_for_more_queued_and_takes_all_it_asked_for(make_link, broker, make_collector,
                                                                                    eventually, digits_bundle, digits) -> None:
    collector = make_collector(broker.port)
    # (resend_after 60: results arrive because the writer publishes them as it stores them)
    agent, link = make_link("dev-h", preinstall=[digits_bundle.path], prefetch=2, prefetch_horizon=10.0,
                            resend_after=60.0)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    x = digits.x_test[:2].astype(np.float32)
    release = __import__("threading").Event()

    def send(first: int, count: int) -> None:
        for i in range(first, first + count):
            pub.publish(proto.topic("dev-h", "task"), proto.Task(f"job-{i}", "job", "digits", 30.0, [x]).to_payload(),
                        qos=1)

    try:
        send(0, 3)  # tasks of a few ms: ten seconds of work is more than MAX_PREFETCH of them
        assert eventually(lambda: len(collector.of_type(proto.TaskResult)) == 3)
        assert eventually(lambda: any(w.device == "dev-h" and w.prefetch == proto.MAX_PREFETCH
                                      for w in collector.work_requests))
        model = agent.model("digits")
        real = model.predict_batch
        model.predict_batch = lambda *a, **k: (release.wait(30), real(*a, **k))[1]  # slow now: tasks pile up
        send(3, 20)  # more than 2 x (1 + 2), all within what it announced: none is declined
        assert eventually(lambda: len(link._work_request().running) == 20)
        release.set()
        assert eventually(lambda: len(collector.of_type(proto.TaskResult)) == 23)
    finally:
        release.set()
        pub.disconnect()
        pub.loop_stop()
    link.prefetch_min = 0
    assert link.prefetch == 0  # prefetch 0: none, however short the tasks


def test_results_waiting_for_an_ack_are_announced_as_done_also_after_a_restart(make_link, broker, make_collector,
                                                                                eventually, digits_bundle, digits,
                                                                                tmp_path) -> None:
    """What the fleet needs to tell a task lost on the way from one that finished: the agent's
    announcements name the tasks whose results wait in its outbox (``done``) until acknowledged,
    and a restarted agent still knows them (from its outbox on disk)."""
    collector = make_collector(broker.port, ack=False)  # a fleet that does not acknowledge (yet)
    agent, link = make_link("dev-d", preinstall=[digits_bundle.path], resend_after=60.0)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    x = digits.x_test[:2].astype(np.float32)
    try:
        for i in range(3):
            pub.publish(proto.topic("dev-d", "task"), proto.Task(f"t-{i}", "job", "digits", 30.0, [x]).to_payload(), qos=1)
        assert eventually(lambda: link._work_request().done == ["t-0", "t-1", "t-2"])
        assert link._work_request().running == []
        link.stop()
        agent.stop()
        agent2, link2 = make_link("dev-d", resend_after=60.0)  # the same state dir
        assert link2._work_request().done == ["t-0", "t-1", "t-2"]  # read back from the outbox on disk
        results = {r.task: r.id for r in collector.of_type(proto.TaskResult)}
        pub.publish(proto.topic("dev-d", "cmd"), proto.Ack(ack_ids=[results["t-1"]]).to_payload(), qos=1)
        assert eventually(lambda: link2._work_request().done == ["t-0", "t-2"])
    finally:
        pub.disconnect()
        pub.loop_stop()
