"""The fleet's HTTP API through real HTTP (uvicorn on a loopback port, httpx) around a real fleet,
a real Mosquitto and real agents: devices, a rollout from an uploaded bundle and its rollback, a
job from an uploaded .npz and its results, /metrics; bad tokens and bad uploads answered with the
CLI's code and message, changing nothing; `fleet serve --http` refusing a public address without
a token, and serving HTTPS to a real agent process's fleet."""

import datetime
import io
import ipaddress
import json
import re
import signal
import ssl

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "test-token-0123456789abcdef"


def sample(metrics_text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus exposition."""
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def wait_done(client: httpx.Client, path: str, eventually) -> dict:
    seen = {}

    def done() -> bool:
        seen.update(client.get(path).json())
        return seen["state"] not in ("RUNNING", "ABORTING", "ROLLING_BACK")

    assert eventually(done, timeout=120), seen
    return seen


@pytest.fixture
def berlin(broker, make_link, make_fleet, make_api, eventually, digits_bundle):
    """Two real agents running digits 1 (tag site=berlin), the fleet, and an API client with the token."""
    for i in range(2):
        make_link(f"pi-{i}", tags={"site": "berlin"}, preinstall=[digits_bundle.path])
    fleet = make_fleet(broker.url)
    assert eventually(lambda: len([d for d in fleet.devices() if d.online]) == 2)
    return fleet, make_api(fleet, token=TOKEN)


def test_devices_a_rollout_and_its_rollback_a_job_and_metrics(berlin, eventually, digits_bundle_v2, digits) -> None:
    fleet, api = berlin
    devices = api.get("/api/v1/devices").json()
    assert [d["id"] for d in devices] == ["pi-0", "pi-1"]
    assert all(d["online"] and d["models"] == {"digits": "1"} and d["tags"] == {"site": "berlin"} for d in devices)
    assert len(api.get("/api/v1/devices", params={"tag": "site=berlin", "online": "true"}).json()) == 2
    assert api.get("/api/v1/devices", params={"tag": "site=paris"}).json() == []
    assert api.get("/api/v1/devices", params={"online": "false"}).json() == []
    assert api.get("/api/v1/devices/pi-1").json()["id"] == "pi-1"
    missing = api.get("/api/v1/devices/pi-9")
    assert missing.status_code == 404
    assert missing.json() == {"code": 20, "error": "NotFoundError",
                              "message": "no device 'pi-9': list them with edgesdk fleet devices"}

    # a rollout from an uploaded bundle, with the options of `fleet deploy`
    created = api.post("/api/v1/rollouts", files={"bundle": ("digits-2.edgebundle", digits_bundle_v2.path.read_bytes())},
                       data={"to": "site=berlin", "canary": "1", "max_latency_regression": "5"})
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    assert created.headers["location"] == f"/api/v1/rollouts/{rid}"
    assert created.json()["version"] == "2" and created.json()["options"]["canary"] == 1
    view = wait_done(api, f"/api/v1/rollouts/{rid}", eventually)
    assert view["state"] == "SUCCEEDED" and view["counts"]["SUCCEEDED"] == 2
    assert {d["device"]: d["previous_version"] for d in view["devices"]} == {"pi-0": "1", "pi-1": "1"}
    assert [r["id"] for r in api.get("/api/v1/rollouts").json()] == [rid]
    assert eventually(lambda: all(d["models"] == {"digits": "2"} for d in api.get("/api/v1/devices").json()))

    # a job from an uploaded .npz; its results as the CLI writes them
    x = digits.x_test[:300]
    submitted = api.post("/api/v1/jobs", files={"inputs": ("frames.npz", npz_bytes(x=x))},
                         data={"model": "digits", "batch_size": "32"})
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]
    assert submitted.json()["samples"] == 300 and submitted.json()["tasks"] == 10
    job = wait_done(api, f"/api/v1/jobs/{job_id}", eventually)
    assert job["state"] == "SUCCEEDED" and job["samples_done"] == 300 and job["samples_per_s"] > 0
    assert [j["id"] for j in api.get("/api/v1/jobs").json()] == [job_id]
    results = api.get(f"/api/v1/jobs/{job_id}/results")
    assert results.status_code == 200 and results.headers["content-type"] == "application/octet-stream"
    y = np.load(io.BytesIO(results.content))["y"]
    np.testing.assert_array_equal(y, fleet.outputs(job_id)[0])
    assert y.shape == (300, 10) and np.mean(np.argmax(y, axis=1) == digits.y_test[:300]) > 0.9

    # /metrics, read from the fleet at scrape time
    text = api.get("/metrics").text
    assert sample(text, "edgesdk_fleet_devices", presence="online") == 2
    assert sample(text, "edgesdk_fleet_rollouts", state="SUCCEEDED") == 1
    assert sample(text, "edgesdk_fleet_jobs", state="SUCCEEDED") == 1
    assert sample(text, "edgesdk_fleet_job_samples_done_total") == 300
    assert sample(text, "edgesdk_fleet_messages_received_total", kind="task_result") >= 10
    assert sample(text, "edgesdk_fleet_messages_received_total", kind="install_status") >= 2
    assert sample(text, "edgesdk_fleet_engine_batch_seconds_count") > 0  # the engine's on_batch hook
    assert sample(text, "edgesdk_fleet_engine_batch_messages_total") >= 12

    # the rollback, as `fleet rollback`
    back = api.post(f"/api/v1/rollouts/{rid}/rollback")
    assert back.status_code == 202 and back.json()["state"] == "ROLLING_BACK"
    assert wait_done(api, f"/api/v1/rollouts/{rid}", eventually)["state"] == "ROLLED_BACK"
    assert eventually(lambda: all(d["models"] == {"digits": "1"} for d in api.get("/api/v1/devices").json()))
    again = api.post(f"/api/v1/rollouts/{rid}/cancel")
    assert again.status_code == 422 and again.json() == {
        "code": 21, "error": "RolloutError", "message": f"rollout {rid} is ROLLED_BACK: only a RUNNING rollout can be canceled"}

    spec = api.get("/api/v1/openapi.json").json()
    assert {"/api/v1/devices", "/api/v1/devices/{device_id}", "/api/v1/rollouts", "/api/v1/rollouts/{rollout_id}",
            "/api/v1/rollouts/{rollout_id}/cancel", "/api/v1/rollouts/{rollout_id}/rollback", "/api/v1/jobs",
            "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/results", "/api/v1/events", "/metrics"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def unsigned_copy(src, out):
    from sdk.bundle import Bundle, write_bundle

    b = Bundle.open(src)
    manifest = {k: v for k, v in b.manifest.data.items() if k not in ("files", "schema")}
    return write_bundle(out, manifest, {name: b.read(name) for name in b.manifest.files})


def test_desired_configuration_over_http_reaches_real_agents(berlin, eventually) -> None:
    fleet, api = berlin
    r = api.put("/api/v1/config/tags/site=berlin", json={"heartbeat_interval": 3.0, "tags": {"zone": "n"}})
    assert r.status_code == 200 and r.json() == {"revision": 1}
    r = api.put("/api/v1/config/devices/pi-1", json={"work_slots": 2})
    assert r.json() == {"revision": 2}
    assert eventually(lambda: {d["id"]: d["config_state"] for d in api.get("/api/v1/devices").json()}
                      == {"pi-0": "in sync", "pi-1": "in sync"}, timeout=60)
    devices = {d["id"]: d for d in api.get("/api/v1/devices").json()}
    assert devices["pi-1"]["config"]["work_slots"] == 2 and devices["pi-0"]["tags"]["zone"] == "n"
    assert [e["target"] for e in api.get("/api/v1/config").json()] == ["site=berlin", "pi-1"]
    bad = api.put("/api/v1/config/devices/pi-0", json={"threads": 0})
    assert bad.status_code == 400 and bad.json()["message"].startswith("desired configuration: config.threads")
    assert api.delete("/api/v1/config/devices/pi-1", params={"key": "work_slots"}).json() == {"revision": 3}
    assert eventually(lambda: {d["id"]: d for d in api.get("/api/v1/devices").json()}["pi-1"]["config"]["work_slots"]
                      == 0, timeout=60)  # back to its own file's value


def test_bad_tokens_and_bad_uploads_get_the_clis_errors_and_change_nothing(broker, make_link, make_fleet, make_api,
                                                                           eventually, digits_bundle, tmp_path) -> None:
    from fleet.http import UploadLimits

    make_link("pi-0", preinstall=[digits_bundle.path])
    fleet = make_fleet(broker.url)
    fleet.add_bundle(digits_bundle.path)  # the fleet knows the model's inputs: job inputs are checked
    assert eventually(lambda: any(d.online for d in fleet.devices()))
    api = make_api(fleet, token=TOKEN)
    anonymous = httpx.Client(base_url=api.base_url, timeout=30)
    wrong = httpx.Client(base_url=api.base_url, headers={"Authorization": "Bearer not-the-token-at-all"}, timeout=30)
    bundle = digits_bundle.path.read_bytes()

    for client, says in ((anonymous, "this API needs a token"), (wrong, "the token is not the one")):
        for method, path in (("GET", "/api/v1/devices"), ("GET", "/api/v1/rollouts"), ("GET", "/api/v1/jobs/x"),
                             ("GET", "/metrics"), ("GET", "/api/v1/events"), ("GET", "/api/v1/openapi.json"),
                             ("GET", "/api/v1/snapshot"), ("POST", "/api/v1/rollouts/x/rollback")):
            r = client.request(method, path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path, r.text)
            assert r.json()["code"] == 23 and r.json()["error"] == "AuthenticationError"
            assert r.json()["message"].startswith(says)
        r = client.post("/api/v1/rollouts", files={"bundle": ("d.edgebundle", bundle)}, data={"devices": "pi-0"})
        assert r.status_code == 401
    assert anonymous.get("/api/v1/events", params={"token": "wrong-token-0123456789"}).status_code == 401
    assert anonymous.get("/api/v1/devices", params={"token": TOKEN}).status_code == 401  # headers only, but for events
    with anonymous.stream("GET", "/api/v1/events", params={"token": TOKEN}) as events:
        assert events.status_code == 200 and events.headers["content-type"].startswith("text/event-stream")
        lines = events.iter_lines()
        assert next(line for line in lines if line.startswith("event:")) == "event: snapshot"
        snapshot = json.loads(next(lines).removeprefix("data: "))
        assert [d["id"] for d in snapshot["devices"]] == ["pi-0"] and snapshot["totals"]["online"] == 1
    assert anonymous.get("/").status_code == 200  # the page itself asks for the token

    def deploy(name, raw, **data):
        return api.post("/api/v1/rollouts", files={"bundle": (name, raw)}, data={"devices": "pi-0", **data})

    corrupt = deploy("broken.edgebundle", bundle[: len(bundle) // 2])
    assert corrupt.status_code == 422 and corrupt.json()["code"] == 8 and corrupt.json()["error"] == "BundleInvalidError"
    assert corrupt.json()["message"].startswith("broken.edgebundle is not a valid .edgebundle")
    unsigned = deploy("digits-unsigned.edgebundle", unsigned_copy(digits_bundle.path, tmp_path / "u.edgebundle").read_bytes())
    assert unsigned.status_code == 422 and unsigned.json() == {
        "code": 8, "error": "BundleError", "message": "digits-unsigned.edgebundle is not signed, and agents refuse "
                                                     "unsigned bundles: sign it with edgesdk bundle sign BUNDLE --key private.pem"}
    hostile_name = deploy("../../etc/passwd", b"not a bundle")
    assert hostile_name.status_code == 422 and hostile_name.json()["message"].startswith("bundle.edgebundle is not a valid")
    assert deploy("d.edgebundle", bundle, canary="-1").json() == {"code": 21, "error": "RolloutError",
                                                                  "message": "--canary must be 0 or more"}
    not_a_number = deploy("d.edgebundle", bundle, canary="many")
    assert not_a_number.status_code == 400 and not_a_number.json()["code"] == 2
    assert not_a_number.json()["message"].startswith("canary: ")
    both = api.post("/api/v1/rollouts", files={"bundle": ("d.edgebundle", bundle)}, data={"devices": "pi-0", "to": "a=b"})
    assert both.json()["message"] == "say which devices: --to TAG=VALUE or --devices ID,ID"

    def submit(raw, **data):
        return api.post("/api/v1/jobs", files={"inputs": ("frames.npz", raw)}, data={"model": "digits", **data})

    wrong_shape = submit(npz_bytes(x=np.zeros((10, 5), dtype=np.float32)))
    assert wrong_shape.status_code == 422 and wrong_shape.json()["code"] == 5 and wrong_shape.json()["error"] == "DataError"
    assert wrong_shape.json()["message"].startswith("job input data frames.npz has samples of shape [5], but model input")
    assert wrong_shape.json()["message"].endswith("expects [8, 8, 1]")
    not_numpy = submit(b"a,b,c\n1,2,3\n")
    assert not_numpy.status_code == 422 and not_numpy.json()["message"].startswith("the job's input file is neither")
    bad_model = api.post("/api/v1/jobs", files={"inputs": ("x.npy", b"")}, data={"model": "../digits"})
    assert bad_model.status_code == 400 and bad_model.json()["code"] == 2
    assert submit(npz_bytes(x=np.zeros((4, 8, 8, 1), np.float32)), batch_size="0").json()["message"] == \
        "--batch-size must be at least 1"
    assert api.post("/api/v1/rollouts/nope/cancel").json() == {
        "code": 20, "error": "NotFoundError", "message": "no rollout 'nope': list them with edgesdk fleet rollouts"}
    assert api.get("/api/v1/jobs/nope").status_code == 404 and api.get("/api/v1/nothing").json()["code"] == 20

    # uploads over the limits: refused from Content-Length, and cut off when streamed without one
    small = make_api(fleet, token=TOKEN, limits=UploadLimits(max_bundle_bytes=len(bundle) - 1, max_input_bytes=1000))
    big = small.post("/api/v1/rollouts", files={"bundle": ("d.edgebundle", bundle)}, data={"devices": "pi-0"})
    assert big.status_code == 413 and big.json()["code"] == 8 and "--max-bundle-mb" in big.json()["message"]
    big_input = small.post("/api/v1/jobs", files={"inputs": ("x.npy", b"\x93NUMPY" + bytes(2000))}, data={"model": "digits"})
    assert big_input.status_code == 413 and big_input.json()["code"] == 5 and "--max-input-mb" in big_input.json()["message"]
    head = ('--b0undary\r\nContent-Disposition: form-data; name="devices"\r\n\r\npi-0\r\n--b0undary\r\n'
            'Content-Disposition: form-data; name="bundle"; filename="d.edgebundle"\r\n\r\n').encode()
    streamed = small.post("/api/v1/rollouts", content=iter([head, bundle, bundle, b"\r\n--b0undary--\r\n"]),
                          headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert "content-length" not in streamed.request.headers and streamed.status_code == 413
    assert streamed.json()["error"] == "BundleError"

    assert fleet.rollouts() == [] and fleet.jobs_list() == []  # nothing was created
    assert [d.models for d in fleet.devices()] == [{"digits": "1"}]

    # a job that exists but is not finished has no results yet
    waiting = submit(npz_bytes(x=np.zeros((4, 8, 8, 1), np.float32)), to="site=nowhere").json()["id"]
    r = api.get(f"/api/v1/jobs/{waiting}/results")
    assert r.status_code == 422 and r.json()["message"].startswith(f"job {waiting} is RUNNING: its results are complete")


def serve_url(proc, log, eventually) -> str:
    """The URL `fleet serve --http` announced in its log (port 0: the one it chose)."""
    found = {}

    def announced() -> bool:
        m = re.search(r"HTTP API on (https?://127\.0\.0\.1:\d+)/api/v1", log.read_text() if log.exists() else "")
        found["url"] = m and m.group(1)
        return bool(m) or proc.poll() is not None

    assert eventually(announced, timeout=60) and found["url"], log.read_text()
    return found["url"]


def test_serve_is_open_on_loopback_and_refuses_a_public_address_without_a_token(edgesdk_cli, spawn, tmp_path,
                                                                                 eventually) -> None:
    state = tmp_path / "state"
    base = ("fleet", "--state", state, "--broker", "mqtt://127.0.0.1:9", "serve")
    r = edgesdk_cli(*base, "--http", "0.0.0.0:0")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: --http 0.0.0.0:0 is reachable from other machines, so the API needs a token: "
                               "give --api-token-file FILE")
    (tmp_path / "short").write_text("secret\n")
    r = edgesdk_cli(*base, "--http", "0.0.0.0:0", "--api-token-file", tmp_path / "short")
    assert r.returncode == 2 and "must be one word of at least 16 characters" in r.stderr
    r = edgesdk_cli(*base, "--api-token-file", tmp_path / "short")
    assert r.returncode == 2 and "go with --http HOST:PORT" in r.stderr
    assert not state.exists()  # refused before the fleet opened its state
    serve = spawn(*base, "--http", "127.0.0.1:0", log_name="serve")  # no broker yet: the controller stands by
    url = serve_url(serve, tmp_path / "serve.log", eventually)
    assert "(no token: loopback only)" in (tmp_path / "serve.log").read_text()
    assert httpx.get(url + "/api/v1/devices").json() == []
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(30) == 0


def self_signed(tmp_path):
    """A certificate for 127.0.0.1 and its key, made with cryptography."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_serve_over_tls_with_a_token_and_an_agent_process(broker, spawn, agent_toml, tmp_path, eventually) -> None:
    cert, key = self_signed(tmp_path)
    (tmp_path / "token").write_text(TOKEN + "\n")
    serve = spawn("fleet", "--broker", broker.url, "--state", tmp_path / "fleet", "serve", "--http", "127.0.0.1:0",
                  "--api-token-file", tmp_path / "token", "--tls-cert", cert, "--tls-key", key, log_name="serve")
    log = tmp_path / "serve.log"
    url = serve_url(serve, log, eventually)
    assert url.startswith("https://")
    spawn("agent", "run", "--config", agent_toml("tls-dev", broker.url), log_name="agent")
    trusted = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(base_url=url, verify=trusted, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        assert eventually(lambda: [d["id"] for d in api.get("/api/v1/devices", params={"online": "true"}).json()]
                          == ["tls-dev"], timeout=60)
        assert httpx.get(url + "/api/v1/devices", verify=trusted).status_code == 401
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate does not connect
            httpx.get(url + "/api/v1/devices")
        assert json.loads(api.get("/api/v1/snapshot").text)["totals"]["online"] == 1
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(30) == 0, log.read_text()


def test_importing_the_fleet_loads_no_web_stack() -> None:
    """Only `serve --http` imports FastAPI, uvicorn and prometheus-client."""
    import subprocess
    import sys

    code = ("import sys, fleet, fleet.cli, fleet.service; "
            "print([m for m in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client', 'fleet.http') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
