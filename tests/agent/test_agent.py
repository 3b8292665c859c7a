"""The agent in-process, on the real LiteRT runtime: install → serve → update → rollback, bad
bundles refused while the old model keeps answering, bad inputs, the local socket API, metrics."""

import threading
import urllib.request
import zipfile

import numpy as np
import pytest

from agent import Agent, AgentClient
from sdk.bundle import write_bundle
from sdk.errors import InferenceError, InstallError
from sdk.modelinfo import read_model_info
from sdk.signing import load_private_key


def accuracy(predict, digits, n=100) -> float:
    preds = [int(np.argmax(predict([x[None]])[0])) for x in digits.x_test[:n]]
    return float(np.mean(np.array(preds) == digits.y_test[:n]))


def test_install_serve_update_rollback(agent, digits_bundle, digits_bundle_v2, digits) -> None:
    r1 = agent.install(digits_bundle.path)
    assert r1["version"] == "1" and r1["previous"] is None and r1["delegate"] == "cpu"
    assert accuracy(lambda xs: agent.predict("digits", xs), digits) >= 0.9
    assert agent.model("digits").inputs[0].dtype == "int8"

    r2 = agent.install(digits_bundle_v2.path)
    assert (r2["version"], r2["previous"]) == ("2", "1")
    assert agent.model("digits").inputs[0].dtype == "float32"
    assert accuracy(lambda xs: agent.predict("digits", xs), digits) >= 0.9

    back = agent.rollback("digits")
    assert (back["version"], back["previous"]) == ("1", "2")
    assert agent.model("digits").version == "1" and agent.store.active("digits") == "1"
    assert accuracy(lambda xs: agent.predict("digits", xs), digits, n=30) >= 0.9
    (m,) = agent.models()  # stats are per loaded version: only the 30 requests since the rollback
    assert m["active"] == "1" and m["previous"] == "2" and m["stats"]["requests"] == 30


def test_restart_resumes_the_active_versions(agent_config, digits_bundle, digits_bundle_v2) -> None:
    a = Agent(agent_config).start(local_api=False)
    a.install(digits_bundle.path)
    a.install(digits_bundle_v2.path)
    a.rollback("digits")
    a.stop()
    b = Agent(agent_config).start(local_api=False)
    assert b.model("digits").version == "1"
    b.stop()


def rezip(src, dst, replace=None, drop=()):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.filename not in drop:
                zout.writestr(item.filename, (replace or {}).get(item.filename, zin.read(item.filename)))
    return dst


def custom_op_bundle(path, tflite: bytes, key) -> None:
    info = read_model_info(tflite)
    manifest = {"name": "digits", "version": "9", "target": "cpu", "model_file": "model.tflite",
                "inputs": [t.to_dict() for t in info.inputs], "outputs": [t.to_dict() for t in info.outputs],
                "ops": info.ops, "min_runtime_version": info.min_runtime_version}
    write_bundle(path, manifest, {"model.tflite": tflite}, private_key=key)


def test_bad_bundles_are_refused_and_the_old_model_keeps_answering(
    agent, digits_bundle, digits, tmp_path, other_keys, signing_keys, custom_op_tflite
) -> None:
    agent.install(digits_bundle.path)
    corrupt = tmp_path / "corrupt.edgebundle"
    data = bytearray(digits_bundle.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    unsigned = rezip(digits_bundle.path, tmp_path / "unsigned.edgebundle", drop=("signature.json",))
    from sdk.bundle import Bundle

    wrong_key = Bundle.open(digits_bundle.path).sign(load_private_key(other_keys.private), tmp_path / "w.edgebundle")
    custom = tmp_path / "custom.edgebundle"
    custom_op_bundle(custom, custom_op_tflite, load_private_key(signing_keys.private))
    cases = {corrupt: "verify failed", unsigned: "unsigned", wrong_key: "not among the trusted keys",
             custom: "Svd", tmp_path / "missing.edgebundle": "cannot read bundle"}

    stop = threading.Event()
    answers, failures = [], []

    def keep_asking():
        while not stop.is_set():
            try:
                answers.append(agent.predict("digits", [digits.x_test[0][None]]))
            except Exception as exc:  # noqa: BLE001 - any failure here is the bug under test
                failures.append(exc)

    t = threading.Thread(target=keep_asking)
    t.start()
    try:
        for bundle, reason in cases.items():
            with pytest.raises(InstallError, match=reason):
                agent.install(bundle)
            assert agent.model("digits").version == "1" and agent.store.active("digits") == "1"
    finally:
        stop.set()
        t.join()
    assert answers and not failures
    assert agent.store.versions("digits") == ["1"]


def test_health_check_rejects_a_bundle_whose_outputs_do_not_match(agent, digits_bundle, tmp_path, signing_keys) -> None:
    import io
    import json

    from sdk.bundle import Bundle

    b = Bundle.open(digits_bundle.path)
    g = b.manifest.golden
    outs = np.load(io.BytesIO(b.read(g["file"])))
    shifted = {k: np.clip(v.astype(np.int32) + 20, -128, 127).astype(v.dtype) for k, v in outs.items()}
    buf = io.BytesIO()
    np.savez_compressed(buf, **shifted)
    files = {n: b.read(n) for n in b.manifest.files}
    files[g["file"]] = buf.getvalue()
    manifest = {k: v for k, v in json.loads(json.dumps(b.manifest.data)).items() if k not in ("files", "schema")}
    bad = write_bundle(tmp_path / "bad.edgebundle", manifest, files, private_key=load_private_key(signing_keys.private))
    with pytest.raises(InstallError, match="health check failed: golden pair 0"):
        agent.install(bad)
    limit = {**manifest, "latency_limit_ms": 1e-6}
    slow = write_bundle(tmp_path / "slow.edgebundle", limit, {n: b.read(n) for n in b.manifest.files},
                        private_key=load_private_key(signing_keys.private))
    with pytest.raises(InstallError, match="exceeds the bundle's limit"):
        agent.install(slow)


def test_a_bundle_for_a_newer_runtime_is_refused_by_an_older_one(agent_config, digits_bundle, digits_bundle_v2) -> None:
    """The runtime is the agent's seam: a device whose LiteRT knows an older TFLite than a bundle
    needs refuses the bundle before loading it (the old model keeps serving), with the fix."""
    import dataclasses

    from sdk.runtime import find_runtime

    old = dataclasses.replace(find_runtime(allow_tensorflow=False), version="0.9.0", tflite_version="1.10.0")
    a = Agent(agent_config, runtime=old).start(local_api=False)
    try:
        with pytest.raises(InstallError, match="needs TFLite runtime .* this device has ai_edge_litert 0.9.0 "
                                               r"\(TFLite 1.10.0\): upgrade the runtime"):
            a.install(digits_bundle.path)
        assert a.models() == [] or all(m["active"] is None for m in a.models())
        assert a.describe()["runtime"]["version"] == "0.9.0"  # what it reports to the fleet
    finally:
        a.stop()


def test_bad_inputs_fail_that_caller_only(agent, digits_bundle, digits) -> None:
    agent.install(digits_bundle.path)
    x = digits.x_test[0][None]
    with pytest.raises(InferenceError, match="no model named 'nope'"):
        agent.predict("nope", [x])
    with pytest.raises(InferenceError, match=r"must have shape \[1, 8, 8, 1\]"):
        agent.predict("digits", [np.zeros((1, 4, 4, 1), np.float32)])
    with pytest.raises(InferenceError, match="takes 1 input"):
        agent.predict("digits", [x, x])
    with pytest.raises(InferenceError, match="raw input .* must be int8"):
        agent.predict("digits", [x], raw=True)
    with pytest.raises(InferenceError, match="unknown input"):
        agent.predict("digits", {"image": x})
    name = agent.model("digits").manifest["inputs"][0]["name"]
    by_name = agent.predict("digits", {name: x})[0]
    assert np.array_equal(by_name, agent.predict("digits", [x])[0])
    assert agent.predict("digits", [x[0]])[0].shape == (1, 10)  # a sample without its batch axis
    raw = agent.predict("digits", [np.zeros((1, 8, 8, 1), np.int8)], raw=True)[0]
    assert raw.dtype == np.int8
    assert agent.model("digits").stats.errors == 4  # the unknown-model request counts nowhere


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prometheus_metrics_endpoint(agent_config, digits_bundle, digits) -> None:
    agent_config.metrics_port = free_port()
    a = Agent(agent_config).start(local_api=False)
    try:
        a.install(digits_bundle.path)
        for x in digits.x_test[:10]:
            a.predict("digits", [x[None]])
        url = f"http://127.0.0.1:{agent_config.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        a.stop()
    assert 'edgesdk_inference_seconds_count{model="digits",version="1"} 10' in text
    assert 'edgesdk_requests_total{model="digits",version="1"} 10' in text
    assert 'le="+Inf"' in text
