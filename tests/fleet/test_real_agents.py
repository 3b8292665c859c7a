"""The fleet with real agents (LiteRT, real bundles, real installs) on a real Mosquitto, and on
amqtt (MQTT 3.1.1): rollouts that succeed, abort on failures, abort on a measured latency
regression; an offline device catching up; batch jobs with exactly one result per sample."""


import numpy as np
import pytest

from sdk.runtime import open_engine


def local_predictions(bundle_path, x):
    """What any agent must answer: the bundle's model run here, one sample at a time."""
    from sdk.bundle import Bundle
    from sdk.runtime import dequantize, quantize

    b = Bundle.open(bundle_path)
    engine = open_engine(b.model_bytes(), "cpu")
    spec_in, spec_out = engine.inputs[0], engine.outputs[0]
    out = []
    for s in x:
        xi = s[None].astype(np.float32)
        xi = quantize(xi, spec_in) if spec_in.quantized else xi
        out.append(dequantize(engine.run([xi])[0], spec_out))
    return np.concatenate(out)


def test_rollout_then_a_job_on_real_agents(broker, make_link, make_fleet, eventually, digits_bundle, digits_bundle_v2,
                                           digits) -> None:
    for i in range(2):
        make_link(f"pi-{i}", tags={"site": "berlin"}, preinstall=[digits_bundle.path], pool_size=2)
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices({"site": "berlin"}) if d.online]) == 2)
    d = fleet.devices()[0]
    assert d.models == {"digits": "1"} and "cpu" in d.delegates and d.runtime["name"] and d.agent_version
    rid = fleet.deploy(digits_bundle_v2.path, to={"site": "berlin"}, canary=1, max_latency_regression=5)
    view = fleet.wait_rollout(rid, timeout=120)
    assert view.state == "SUCCEEDED", view
    for dev in view.devices:  # the agents measured both versions, interleaved, during the install
        assert dev["previous_version"] == "1" and dev["p50_ms"] > 0 and dev["previous_p50_ms"] > 0
    assert eventually(lambda: all(x.models == {"digits": "2"} for x in fleet.devices()))

    result = fleet.run("digits", digits.x_test, batch_size=32, timeout=120)
    assert result.outputs[0].shape == (len(digits.x_test), 10)
    np.testing.assert_allclose(result.outputs[0], local_predictions(digits_bundle_v2.path, digits.x_test), atol=1e-5)
    accuracy = float(np.mean(np.argmax(result.outputs[0], axis=1) == digits.y_test))
    assert accuracy > 0.9
    assert set(result.devices) == {"pi-0", "pi-1"}
    assert eventually(lambda: any(x.heartbeat.get("digits", {}).get("requests", 0) > 0 for x in fleet.devices()))


def test_failures_abort_the_rollout_and_the_canary_is_rolled_back(broker, make_link, make_fleet, eventually, digits_bundle,
                                                                 digits_bundle_v2_other, signing_keys, other_keys) -> None:
    # the canary trusts the key that signed version 2; the other two do not, and refuse it
    canary, _ = make_link("a-canary", trusted=[signing_keys.public, other_keys.public], preinstall=[digits_bundle.path])
    make_link("b-dev", preinstall=[digits_bundle.path])
    make_link("c-dev", preinstall=[digits_bundle.path])
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 3)
    rid = fleet.deploy(digits_bundle_v2_other, devices=["a-canary", "b-dev", "c-dev"], canary=1, batch_percent=100,
                       max_failure_percent=50, min_executed=2)
    view = fleet.wait_rollout(rid, timeout=120)
    states = {d["device"]: d for d in view.devices}
    assert view.state == "ABORTED" and "2 of 3 devices failed" in view.reason
    assert states["a-canary"]["state"] == "ROLLED_BACK"
    for dev in ("b-dev", "c-dev"):
        assert states[dev]["state"] == "FAILED" and "verify failed" in states[dev]["reason"]
        assert "not among the trusted keys" in states[dev]["reason"]
    assert canary.store.active("digits") == "1"
    assert canary.model("digits").version == "1"


def test_a_measured_latency_regression_rolls_the_canary_back(broker, make_link, make_fleet, eventually, digits_bundle,
                                                           digits_bundle_slow) -> None:
    canary, _ = make_link("canary", preinstall=[digits_bundle.path])
    make_link("other", preinstall=[digits_bundle.path])
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 2)
    # int16x8 runs about 10x slower than int8 on x86: the agent measures both during the install
    rid = fleet.deploy(digits_bundle_slow.path, devices=["canary", "other"], canary=1, max_latency_regression=2.5)
    view = fleet.wait_rollout(rid, timeout=120)
    assert view.state == "ABORTED", view
    first = view.devices[0]
    assert first["device"] == "canary" and first["state"] == "ROLLED_BACK"
    assert "latency regression" in first["reason"] and first["p50_ms"] > 2.5 * first["previous_p50_ms"]
    assert view.devices[1]["state"] == "CANCELED"
    assert canary.model("digits").version == "1"


def test_an_offline_device_gets_the_rollout_when_it_returns(broker, make_link, make_fleet, eventually, digits_bundle,
                                                           digits_bundle_v2, tmp_path, signing_keys) -> None:
    make_link("up-1", preinstall=[digits_bundle.path])
    away, away_link = make_link("away-1", preinstall=[digits_bundle.path])
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 2)
    away_link.stop()
    away.stop()
    assert eventually(lambda: not next(d for d in fleet.devices() if d.id == "away-1").online)
    rid = fleet.deploy(digits_bundle_v2.path, devices=["up-1", "away-1"], canary=1, batch_percent=100)
    assert eventually(lambda: fleet.rollout(rid).counts["SUCCEEDED"] == 1, timeout=60)
    view = fleet.rollout(rid)
    assert view.state == "RUNNING" and view.counts["QUEUED"] == 1  # waits for the offline device
    back, _ = make_link("away-1")  # the same state dir: it comes back with version 1
    assert back.model("digits").version == "1"
    view = fleet.wait_rollout(rid, timeout=120)
    assert view.state == "SUCCEEDED" and view.counts["SUCCEEDED"] == 2
    assert eventually(lambda: back.model("digits").version == "2")


def test_rollout_and_job_through_an_mqtt_311_broker(amqtt_broker, make_link, make_fleet, eventually, digits_bundle,
                                                   digits_bundle_v2, digits) -> None:
    for i in range(2):
        make_link(f"old-{i}", url=amqtt_broker.url, protocol="auto", preinstall=[digits_bundle.path])
    fleet = make_fleet(amqtt_broker.url)
    assert fleet.conn.protocol == "3.1.1"
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 2)
    rid = fleet.deploy(digits_bundle_v2.path, devices=["old-0", "old-1"], canary=1)
    assert fleet.wait_rollout(rid, timeout=120).state == "SUCCEEDED"
    x = digits.x_test[:200]
    result = fleet.run("digits", x, batch_size=20, timeout=120)
    np.testing.assert_allclose(result.outputs[0], local_predictions(digits_bundle_v2.path, x), atol=1e-5)


def test_the_fleet_authenticates_to_a_broker_with_passwords(make_broker, make_link, make_fleet, eventually,
                                                           digits_bundle) -> None:
    from sdk.errors import BrokerError

    b = make_broker(users={"fleet": "f-secret", "dev-1": "d-secret"})
    make_link("dev-1", url=b.url, username="dev-1", password="d-secret", preinstall=[digits_bundle.path])
    fleet = make_fleet(b.url, username="fleet", password="f-secret")
    assert eventually(lambda: [d.id for d in fleet.devices() if d.online] == ["dev-1"])
    fleet.stop()
    with pytest.raises(BrokerError, match="cannot connect"):
        make_fleet(b.url, username="fleet", password="wrong")


# --- inputs that travel compactly ------------------------------------------------------------------------
def test_uint8_images_travel_as_uint8_in_pieces_under_a_small_packet_limit(make_broker, make_link, make_fleet,
                                                                            eventually, wide_image_bundle) -> None:
    from sdk.encoding import Normalization

    broker = make_broker(extra="max_packet_size 4096\n")  # a 48x48x3 sample: 6.75 KiB as uint8, 27 KiB as float32
    for i in range(2):
        make_link(f"w-{i}", url=broker.url, preinstall=[wide_image_bundle.path])
    fleet = make_fleet(broker.url)
    fleet.add_bundle(wide_image_bundle.path)  # the fleet learns the model's inputs from its manifest
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 2)
    assert fleet.conn.max_packet == 4096  # what the broker announced at connect
    pixels = np.random.default_rng(0).integers(0, 256, size=(12, 48, 48, 3), dtype=np.uint8)
    floats = Normalization(2 / 255, -1.0).apply(pixels)
    as_uint8 = fleet.run("wide", pixels, batch_size=8, timeout=120)
    pieces_for_uint8 = fleet.stats["task_pieces"]
    as_float = fleet.run("wide", floats, batch_size=8, timeout=120)
    assert as_uint8.input_encoding == ["uint8-normalized-on-device"] and as_float.input_encoding == ["as-given"]
    assert as_uint8.task_samples == 1 and pieces_for_uint8 >= 2 * 12  # every sample in pieces
    expected = local_predictions(wide_image_bundle.path, floats)
    np.testing.assert_allclose(as_uint8.outputs[0], expected, atol=1e-5)
    np.testing.assert_allclose(as_float.outputs[0], expected, atol=1e-5)
    assert as_uint8.input_bytes_per_sample == 48 * 48 * 3 and as_float.input_bytes_per_sample == 4 * 48 * 48 * 3
    assert as_uint8.bytes_per_sample < as_float.bytes_per_sample / 3


def test_an_int8_model_gets_inputs_quantised_once_by_the_fleet(broker, make_link, make_fleet, eventually,
                                                              digits_bundle_pixels, digits) -> None:
    make_link("q-0", preinstall=[digits_bundle_pixels.path])
    fleet = make_fleet(broker.url)
    assert eventually(lambda: any(d.online for d in fleet.devices()))
    x = digits.x_test[:64].astype(np.float32)
    # the fleet holds no bundle of the model yet: floats travel as given and the agent quantises them
    by_agent = fleet.run("digits", x, batch_size=16, timeout=120)
    assert by_agent.input_encoding == ["as-given"] and by_agent.input_bytes_per_sample == 256
    fleet.add_bundle(digits_bundle_pixels.path)
    by_fleet = fleet.run("digits", x, batch_size=16, timeout=120)
    assert by_fleet.input_encoding == ["quantized-by-fleet"] and by_fleet.input_bytes_per_sample == 64
    np.testing.assert_array_equal(by_fleet.outputs[0], by_agent.outputs[0])  # the fleet's quantisation is the agent's
    np.testing.assert_array_equal(by_fleet.outputs[0], local_predictions(digits_bundle_pixels.path, x))
    assert np.mean(np.argmax(by_fleet.outputs[0], axis=1) == digits.y_test[:64]) > 0.85
    assert by_fleet.bytes_per_sample < by_agent.bytes_per_sample / 2
    pixels = np.rint(x * 16).astype(np.uint8)  # the same images as uint8 pixels: normalised on the device
    as_pixels = fleet.run("digits", pixels, batch_size=16, timeout=120)
    assert as_pixels.input_encoding == ["uint8-normalized-on-device"] and as_pixels.input_bytes_per_sample == 64
    np.testing.assert_array_equal(as_pixels.outputs[0], by_fleet.outputs[0])


# --- inputs and outputs by name ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def named_model(tmp_path_factory, signing_keys):
    """A signed bundle ``named`` with two inputs of different dtypes (int32 ``token_ids``, float32
    ``features``) and three outputs; the samples of a job in a ``.npz`` by input name, written in
    the opposite of the model's input order; and what Keras answers for them, by output name."""
    from converter import convert
    from converter.source import keras

    k = keras()
    k.utils.set_random_seed(0)
    ids, feat = k.Input((6,), dtype="int32", name="token_ids"), k.Input((4,), name="features")
    h = k.layers.Concatenate()([k.layers.GlobalAveragePooling1D()(k.layers.Embedding(20, 3)(ids)), feat])
    model = k.Model([ids, feat], [k.layers.Dense(5)(h), k.layers.Dense(2, activation="softmax")(h), k.layers.Dense(3)(h)])
    root = tmp_path_factory.mktemp("named")
    model.save(root / "named.keras")
    rng = np.random.default_rng(1)
    x = {"token_ids": rng.integers(0, 20, (10, 6)).astype(np.int32), "features": rng.random((10, 4), dtype=np.float32)}
    np.savez(root / "eval.npz", **x)
    res = convert(root / "named.keras", target="cpu", quantize="none", eval_data=root / "eval.npz",
                  key=signing_keys.private, output=root / "named.edgebundle", runs=3, name="named")
    assert [t["key"] for t in res.manifest.inputs] == ["token_ids", "features"]
    np.savez(root / "job.npz", features=x["features"], token_ids=x["token_ids"])  # not the model's order
    expected = dict(zip(("output_0", "output_1", "output_2"), model.predict(x, verbose=0)))
    return res.bundle_path, root / "job.npz", expected


def test_a_job_with_named_inputs_of_two_dtypes_gives_named_outputs(broker, make_link, make_fleet, eventually,
                                                                   named_model, tmp_path) -> None:
    bundle, job_input, expected = named_model
    make_link("n-0", preinstall=[bundle])
    fleet = make_fleet(broker.url)
    fleet.add_bundle(bundle)  # the fleet reads the .npz by the manifest's input names
    assert eventually(lambda: any(d.online for d in fleet.devices()))
    result = fleet.run("named", job_input, batch_size=4, timeout=120, output=tmp_path / "out.npz")
    from sdk.bundle import Bundle

    outputs = Bundle.open(bundle).manifest.outputs  # TFLite's order, not Keras's
    assert [o.shape for o in result.outputs] == [(10, *t["shape"][1:]) for t in outputs]
    written = np.load(tmp_path / "out.npz")
    assert sorted(written.files) == sorted(expected)
    for name, want in expected.items():  # each output under its own name, as Keras computes it
        np.testing.assert_allclose(written[name], want, atol=1e-5)
