"""Shared fixtures: signing keys, real small models, real data (scikit-learn's bundled digits).

Models are built and trained in-process (seconds on 2 cores); nothing is downloaded.
Session-scoped fixtures are built once and must not be modified by tests (copy first).
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from servers import NatsCluster, PostgresServer, free_port  # noqa: F401  (shared with bench/chaos.py)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Keys:
    directory: Path
    private: Path
    public: Path


def _keys(root: Path) -> Keys:
    from sdk.signing import generate_keys

    private, public = generate_keys(root)
    return Keys(root, private, public)


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """The fleet's signing key pair."""
    return _keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """A second, untrusted key pair."""
    return _keys(tmp_path_factory.mktemp("other-keys"))


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 1,797 8x8 digit images, scaled to [0, 1], split train/test (converter.digits)."""
    from converter.digits import load_digits_split

    return load_digits_split()


@dataclass
class DigitsModel:
    """A small CNN trained on digits, saved as .keras, with its data files."""

    path: Path
    calibration: Path  # .npz x (300 training samples)
    eval: Path  # .npz x, y (the test split)
    train: Path  # .npz x, y
    eval_unlabelled: Path  # .npz x only
    float_accuracy: float


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory: pytest.TempPathFactory, digits) -> DigitsModel:
    from converter.digits import train_digits_cnn

    root = tmp_path_factory.mktemp("digits")
    model, acc = train_digits_cnn(digits)
    path = root / "digits.keras"
    model.save(path)
    np.savez(root / "calib.npz", x=digits.x_train[:300])
    np.savez(root / "eval.npz", x=digits.x_test, y=digits.y_test)
    np.savez(root / "eval_unlabelled.npz", x=digits.x_test)
    np.savez(root / "train.npz", x=digits.x_train, y=digits.y_train)
    return DigitsModel(path, root / "calib.npz", root / "eval.npz", root / "train.npz", root / "eval_unlabelled.npz", acc)


@dataclass
class BuiltBundle:
    path: Path
    model: bytes
    report: dict


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory, digits_model: DigitsModel, signing_keys: Keys) -> BuiltBundle:
    """The digits CNN converted to full int8 and signed with ``signing_keys``."""
    from converter import convert

    out = tmp_path_factory.mktemp("bundle") / "digits.edgebundle"
    res = convert(
        digits_model.path, target="cpu", quantize="int8", calibration=digits_model.calibration,
        eval_data=digits_model.eval, key=signing_keys.private, output=out, runs=10,
    )
    return BuiltBundle(res.bundle_path, res.model, res.report)


@pytest.fixture(scope="session")
def custom_op_tflite() -> bytes:
    """A real .tflite whose graph holds a custom op (``Svd``) no runtime here implements."""
    import keras
    import tensorflow as tf

    class SingularValues(keras.layers.Layer):
        def call(self, x):
            return tf.linalg.svd(x, compute_uv=False)

    model = keras.Sequential([keras.Input((4, 4)), SingularValues()])
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.allow_custom_ops = True
    return conv.convert()


@pytest.fixture
def edgesdk_cli():
    """Run the real ``edgesdk`` entry point in a subprocess: ``edgesdk_cli("bundle", "verify", ...)``."""

    def run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "edgesdk", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=full_env,
            timeout=600,
        )

    return run


@pytest.fixture(scope="session")
def digits_bundle_v2(tmp_path_factory: pytest.TempPathFactory, digits_model: DigitsModel, signing_keys: Keys) -> BuiltBundle:
    """Version 2 of the digits model: float32 (different outputs and dtypes from v1's int8)."""
    from converter import convert

    out = tmp_path_factory.mktemp("bundle2") / "digits-2.edgebundle"
    res = convert(digits_model.path, target="cpu", quantize="none", version="2", eval_data=digits_model.eval,
                  key=signing_keys.private, output=out, runs=10)
    return BuiltBundle(res.bundle_path, res.model, res.report)


@pytest.fixture
def agent_config(tmp_path: Path, signing_keys: Keys):
    """A config for an agent with its own state dir that trusts ``signing_keys``."""
    from agent.config import load_config

    return load_config(None, env={}, device_id="test-device", state_dir=tmp_path / "state",
                       trusted_keys=[str(signing_keys.public)], threads=1, pool_size=2)


class MosquittoBroker:
    """A real Mosquitto on a free loopback port, which tests can kill (SIGKILL) and restart.

    By default it has its own plain listener (``users``: a password file; ``extra``: more
    configuration lines). With ``include_dir`` it has no listener or authentication of its own:
    the ``*.conf`` files in that directory (e.g. what ``edgesdk fleet credentials init`` wrote)
    bring them, and ``port`` must be the port they listen on.
    """

    def __init__(self, root: Path, users: dict | None = None, extra: str = "", *, include_dir: Path | None = None,
                 port: int | None = None, defaults: bool = False) -> None:
        import getpass

        self.port = port or free_port()
        self.root = root
        self.scheme = "mqtts" if include_dir else "mqtt"
        self.conf = root / "mosquitto.conf"
        # run as ourselves: as root, mosquitto would drop to user "mosquitto", who cannot read pytest's tmp dirs
        # (``defaults``: Mosquitto's own queue limits, as an operator who never tuned it runs it)
        queue = "" if defaults else "max_queued_messages 100000\n"
        common = f"user {getpass.getuser()}\npersistence false\n{queue}log_dest file {root / 'mosquitto.log'}\n"
        if include_dir is not None:
            self.conf.write_text(common + f"{extra}include_dir {include_dir}\n")
        else:
            self.conf.write_text(f"listener {self.port} 127.0.0.1\nset_tcp_nodelay true\n{extra}"
                                 f"{self._auth(users)}{common}")
        self.proc: subprocess.Popen | None = None

    def _auth(self, users: dict | None) -> str:
        if not users:
            return "allow_anonymous true\n"
        pw = self.root / "passwd"
        for i, (user, password) in enumerate(users.items()):
            subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(pw), user, password], check=True)
        return f"allow_anonymous false\npassword_file {pw}\n"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        """What the broker logged so far."""
        path = self.root / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> "MosquittoBroker":
        import socket
        import time

        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start on port {self.port}")

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its configuration (ACL, CRL) without closing connections."""
        import signal

        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)

    def restart(self) -> "MosquittoBroker":
        """SIGTERM, then start again on the same port with the same configuration."""
        self.stop()
        return self.start()

    def kill(self) -> None:
        """SIGKILL: in-flight and queued messages are lost, as in a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def agent(agent_config):
    """An in-process agent with its local API on (the real LiteRT runtime)."""
    from agent import Agent

    a = Agent(agent_config).start()
    yield a
    a.stop()


@contextmanager
def _broker_factory(tmp_path_factory: pytest.TempPathFactory):
    import shutil as _shutil

    if _shutil.which("mosquitto") is None:
        pytest.fail("the mosquitto binary is missing: run .ci/setup (apt-get install -y mosquitto)")
    made = []

    def make(users: dict | None = None, extra: str = "", *, include_dir: Path | None = None,
             port: int | None = None, defaults: bool = False) -> MosquittoBroker:
        b = MosquittoBroker(tmp_path_factory.mktemp("broker"), users, extra, include_dir=include_dir, port=port,
                            defaults=defaults).start()
        made.append(b)
        return b

    try:
        yield make
    finally:
        for b in made:
            b.kill()


@pytest.fixture
def make_broker(tmp_path_factory: pytest.TempPathFactory):
    """``make_broker(users={...})``: a fresh Mosquitto (the ``mosquitto`` binary; .ci/setup installs it);
    ``make_broker(include_dir=DIR, port=PORT)``: one configured by the ``*.conf`` files in DIR."""
    with _broker_factory(tmp_path_factory) as make:
        yield make


@pytest.fixture(scope="module")
def make_module_broker(tmp_path_factory: pytest.TempPathFactory):
    """Like ``make_broker``, for brokers shared by the tests of one module."""
    with _broker_factory(tmp_path_factory) as make:
        yield make


@pytest.fixture
def broker(make_broker):
    """A fresh Mosquitto for one test."""
    return make_broker()


class Collector:
    """A stand-in for the fleet's receiving side: subscribes to every agent's ``up`` channel,
    stores each message id once, and acknowledges it (so agents can clear their outboxes)."""

    def __init__(self, port: int, ack: bool = True) -> None:
        import threading

        import paho.mqtt.client as mqtt

        from sdk import protocol

        self.protocol = protocol
        self.messages: dict[str, object] = {}
        self.deliveries = 0
        self.chunk_requests: list = []
        self.work_requests: list = []
        self.ack_enabled = ack
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(protocol.subscription("up"), 1),
                                                                     (protocol.subscription("status"), 1),
                                                                     (protocol.subscription("heartbeat"), 0)])
        self.heartbeats: list = []
        self.client.on_message = self._on_message
        self.statuses: dict[str, object] = {}
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        device, channel = self.protocol.parse_topic(msg.topic)
        decoded = self.protocol.decode(msg.payload)
        with self.lock:
            if channel == "status":
                self.statuses[device] = decoded
                return
            if channel == "heartbeat":
                self.heartbeats.append(decoded)
                return
            if isinstance(decoded, self.protocol.ChunkRequest):
                self.chunk_requests.append(decoded)
                return
            if isinstance(decoded, self.protocol.WorkRequest):
                self.work_requests.append(decoded)
                return
            self.deliveries += 1
            self.messages.setdefault(decoded.id, decoded)
        if self.ack_enabled:
            client.publish(self.protocol.topic(device, "cmd"), self.protocol.Ack(ack_ids=[decoded.id]).to_payload(), qos=1)

    def of_type(self, cls) -> list:
        with self.lock:
            return [m for m in self.messages.values() if isinstance(m, cls)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def collector(broker):
    c = Collector(broker.port)
    yield c
    c.close()


@pytest.fixture
def make_collector():
    """``make_collector(port)``: a Collector on any broker, closed after the test."""
    made = []

    def make(port: int, ack: bool = True) -> Collector:
        c = Collector(port, ack)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout``; tests assert on the result."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture
def eventually():
    return wait_for


class AmqttBroker:
    """amqtt, a pure-Python MQTT 3.1.1 broker, in-process on a free loopback port."""

    def __init__(self) -> None:
        import asyncio
        import socket
        import threading

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _run(self) -> None:
        import asyncio

        from amqtt.broker import Broker

        asyncio.set_event_loop(self.loop)
        self.broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}}}, loop=self.loop)
        self.loop.run_until_complete(self.broker.start())
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> "AmqttBroker":
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("amqtt did not start")
        return self

    def stop(self) -> None:
        import asyncio

        fut = asyncio.run_coroutine_threadsafe(self.broker.shutdown(), self.loop)
        try:
            fut.result(10)
        except Exception as exc:  # amqtt's shutdown can trip over clients still closing; the loop stops anyway
            import warnings

            warnings.warn(f"amqtt shutdown: {type(exc).__name__}: {exc}")
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


@pytest.fixture
def amqtt_broker():
    b = AmqttBroker().start()
    yield b
    b.stop()


@pytest.fixture
def unstarted_amqtt_broker():
    """An amqtt broker with its port chosen but not listening yet: the test starts it."""
    b = AmqttBroker()
    yield b
    if b._ready.is_set():
        b.stop()


def make_tls_material(root: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (CN = ``dev-tls``), made
    the one way edgesdk makes certificates (:class:`fleet.credentials.CredentialsStore`)."""
    from fleet.credentials import CredentialsStore

    store = CredentialsStore(root / "credentials")
    broker = store.init()
    (device,) = store.issue("dev-tls")
    return {"ca": broker.ca_file, "server_cert": broker.certfile, "server_key": broker.keyfile,
            "client_cert": device.client_cert, "client_key": device.client_key}


@pytest.fixture
def tls_material(tmp_path: Path) -> dict[str, Path]:
    return make_tls_material(tmp_path)


@pytest.fixture
def make_link(tmp_path, signing_keys, request):
    """``make_link("dev-1", url=..., tags=..., trusted=[...])``: an in-process Agent with its MQTT link
    (default broker: the ``broker`` fixture); both are stopped after the test."""
    from agent import Agent
    from agent.config import load_config
    from agent.link import AgentLink

    made = []

    def make(device="dev-1", url=None, **kw):
        url = url or request.getfixturevalue("broker").url
        trusted = kw.pop("trusted", None) or [signing_keys.public]
        cfg = load_config(None, env={}, device_id=device, state_dir=tmp_path / device, broker_url=url,
                          trusted_keys=[str(k) for k in trusted], threads=1, pool_size=kw.pop("pool_size", 1),
                          heartbeat_interval=kw.pop("heartbeat_interval", 0.5), outbox_max=kw.pop("outbox_max", 10000),
                          username=kw.pop("username", ""), password=kw.pop("password", ""),
                          ca_file=kw.pop("ca_file", ""), client_cert=kw.pop("client_cert", ""),
                          client_key=kw.pop("client_key", ""), tags=kw.pop("tags", {}))
        for bundle in kw.pop("preinstall", ()):
            setup = Agent(cfg)
            setup.install(bundle)
            setup.stop()
        agent = Agent(cfg).start(local_api=False)
        protocol = kw.pop("protocol", "5")
        link = AgentLink(agent, resend_after=kw.pop("resend_after", 2.0), chunk_timeout=1.0, protocol=protocol, **kw).start()
        made.append((agent, link))
        return agent, link

    yield make
    for agent, link in made:
        try:
            link.stop()
        except Exception:
            pass
        agent.stop()


@pytest.fixture
def agent_toml(tmp_path, signing_keys):
    """``agent_toml(device, broker_url, keys=None, **config)``: write an agent.toml for a subprocess agent."""
    from agent.config import load_config

    def write(device: str, broker_url: str, keys=None, **extra) -> Path:
        cfg = load_config(None, env={}, device_id=device, broker_url=broker_url, state_dir=tmp_path / f"{device}-state",
                          trusted_keys=[str(k) for k in (keys or [signing_keys.public])], threads=1, pool_size=1,
                          heartbeat_interval=1.0, **extra)
        path = tmp_path / f"{device}.toml"
        path.write_text(cfg.to_toml())
        return path

    return write


@pytest.fixture
def spawn(tmp_path):
    """``spawn("agent", "run", "--config", p)``: ``python -m edgesdk ...`` as a real process (log in tmp_path);
    whatever is still running is killed after the test."""
    procs = []

    def start(*args: str, log_name: str = "proc") -> subprocess.Popen:
        log = open(tmp_path / f"{log_name}.log", "ab")
        p = subprocess.Popen([sys.executable, "-m", "edgesdk", *map(str, args)], stdout=log,
                             stderr=subprocess.STDOUT, env={**os.environ, "EDGESDK_DEBUG": "1", "TF_CPP_MIN_LOG_LEVEL": "3"})
        procs.append((p, log))
        return p

    yield start
    for p, log in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        log.close()


@pytest.fixture
def preinstall():
    """``preinstall(cfg_path, *bundles)``: the agent config at ``cfg_path``, with ``bundles`` installed
    in its store as a previous run would have left them (the agent itself is not started)."""
    from agent import Agent
    from agent.config import load_config

    def install(cfg_path, *bundles):
        cfg = load_config(cfg_path, env={})
        setup = Agent(cfg)
        for bundle in bundles:
            setup.install(bundle)
        setup.stop()
        return cfg

    return install


@pytest.fixture
def agent_process(spawn, eventually):
    """``agent_process(cfg_path, "--no-mqtt")``: ``edgesdk agent run --config cfg_path`` as a real
    process (``spawn``: killed after the test), once it answers on its local socket; returns it."""
    from agent import AgentClient
    from agent.config import load_config
    from sdk.errors import InferenceError

    def start(cfg_path, *options: str) -> subprocess.Popen:
        cfg = load_config(cfg_path, env={})
        proc = spawn("agent", "run", *options, "--config", cfg_path, log_name=f"agent-{cfg.device_id}")

        def answers() -> bool:
            assert proc.poll() is None, f"the agent exited with {proc.returncode}"
            try:
                with AgentClient(cfg.socket_path, timeout=5) as client:
                    return client.ping()
            except InferenceError:
                return False

        assert eventually(answers, timeout=60)
        return proc

    return start


@pytest.fixture
def make_fleet(tmp_path):
    """``make_fleet(url)``: a started :class:`fleet.Fleet` with its own state dir, stopped after the test."""
    from fleet import Fleet

    made = []

    def make(url, state=None, standby=False, **kw):
        f = Fleet(state or tmp_path / "fleet", url, tick=0.1, **kw).start(standby=standby)
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop()


@pytest.fixture
def make_api():
    """``make_api(fleet, token=None, **app_options)``: the fleet's HTTP application
    (:func:`fleet.http.create_app`) served on a free loopback port by a real uvicorn; returns an
    ``httpx.Client`` for it (sending the token when given). Both are closed after the test."""
    import httpx

    from fleet.http import ApiServer, create_app

    made = []

    def make(fleet, token=None, **app_options):
        server = ApiServer("127.0.0.1", 0, token_required=token is not None)
        server.start(create_app(fleet, token=token, **app_options))
        client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"} if token else {},
                              timeout=30)
        made.append((server, client))
        return client

    yield make
    for server, client in made:
        client.close()
        server.stop()


@pytest.fixture
def make_sims():
    """``make_sims(n, url, **options)``: started :class:`fleet.SimulatedDevices`, stopped after the test."""
    from fleet import SimulatedDevices

    made = []

    def make(count, url, **kw):
        s = SimulatedDevices(count, url, **kw).start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


@pytest.fixture(scope="session")
def digits_bundle_slow(tmp_path_factory: pytest.TempPathFactory, digits_model: DigitsModel, signing_keys: Keys) -> BuiltBundle:
    """Version 3 of the digits model: int16x8, about 10x slower than int8 on x86 (a latency regression)."""
    from converter import convert

    out = tmp_path_factory.mktemp("bundle3") / "digits-3.edgebundle"
    res = convert(digits_model.path, target="cpu", quantize="int16x8", version="3", calibration=digits_model.calibration,
                  eval_data=digits_model.eval, key=signing_keys.private, output=out, runs=10)
    return BuiltBundle(res.bundle_path, res.model, res.report)


@pytest.fixture(scope="session")
def digits_bundle_v2_other(tmp_path_factory: pytest.TempPathFactory, digits_bundle_v2: BuiltBundle, other_keys: Keys) -> Path:
    """digits version 2 signed by ``other_keys`` (trusted only by agents told to)."""
    from sdk.bundle import Bundle
    from sdk.signing import load_private_key

    out = tmp_path_factory.mktemp("bundle2o") / "digits-2-other.edgebundle"
    Bundle.open(digits_bundle_v2.path).sign(load_private_key(other_keys.private), out)
    return out


def reversion_bundle(src: Path, version: str, private_key_path: Path, out: Path) -> Path:
    """The bundle at ``src`` as version ``version`` (same model and golden files), signed anew
    through the real signing path: the small update a delta carries well."""
    from sdk.bundle import Bundle, write_bundle
    from sdk.signing import load_private_key

    b = Bundle.open(src)
    manifest = {k: v for k, v in b.manifest.data.items() if k not in ("files", "schema")}
    manifest["version"] = version
    files = {name: b.read(name) for name in b.manifest.files}
    return write_bundle(out, manifest, files, private_key=load_private_key(private_key_path))


@pytest.fixture(scope="session")
def digits_bundle_v2_same_model(tmp_path_factory: pytest.TempPathFactory, digits_bundle: BuiltBundle,
                                signing_keys: Keys) -> Path:
    """digits version 1's model re-released as version 2, signed by ``signing_keys`` (a delta
    against version 1 is a small fraction of it)."""
    return reversion_bundle(digits_bundle.path, "2", signing_keys.private,
                            tmp_path_factory.mktemp("bundle2s") / "digits-2s.edgebundle")


@pytest.fixture(scope="session")
def digits_bundle_pixels(tmp_path_factory: pytest.TempPathFactory, digits_model: DigitsModel, signing_keys: Keys) -> BuiltBundle:
    """The digits CNN as full int8 with int8 I/O, recording the uint8 normalisation ``1/16, 0``
    (the digits' pixels are 0..16): devices take uint8 pixels or fleet-quantised int8 for it."""
    from converter import convert

    out = tmp_path_factory.mktemp("bundlepx") / "digits-px.edgebundle"
    res = convert(digits_model.path, target="cpu", quantize="int8", io_dtype="int8", calibration=digits_model.calibration,
                  eval_data=digits_model.eval, key=signing_keys.private, output=out, runs=5,
                  input_normalization=(1 / 16, 0.0))
    return BuiltBundle(res.bundle_path, res.model, res.report)


@pytest.fixture(scope="session")
def wide_image_bundle(tmp_path_factory: pytest.TempPathFactory, signing_keys: Keys) -> BuiltBundle:
    """A small float32 model named ``wide`` on 48x48x3 images (27 KiB a sample as float32, 6.75 KiB
    as uint8), recording the normalisation ``2/255, -1`` (pixels to [-1, 1]): a sample larger
    than a small broker packet limit."""
    from converter import convert
    from converter.source import keras

    k = keras()
    k.utils.set_random_seed(0)
    model = k.Sequential([k.Input((48, 48, 3)), k.layers.Conv2D(4, 3, activation="relu"),
                          k.layers.GlobalAveragePooling2D(), k.layers.Dense(3)])
    root = tmp_path_factory.mktemp("wide")
    model.save(root / "wide.keras")
    out = root / "wide.edgebundle"
    res = convert(root / "wide.keras", target="cpu", quantize="none", key=signing_keys.private, output=out, runs=3,
                  name="wide", input_normalization={"": (2 / 255, -1.0)})
    return BuiltBundle(res.bundle_path, res.model, res.report)


@pytest.fixture
def reversioned():
    """:func:`reversion_bundle`: ``reversioned(src, version, private_key_path, out)``."""
    return reversion_bundle


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory):
    """The PostgreSQL server the fleet's tests use (see :class:`PostgresServer`)."""
    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


@pytest.fixture
def postgres_db(postgres_server: PostgresServer):
    """The URL of a fresh PostgreSQL database, dropped after the test."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture
def nats_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A started 3-node NATS cluster with MQTT (see :class:`NatsCluster`), killed after the test."""
    cluster = NatsCluster(tmp_path_factory.mktemp("nats")).start()
    yield cluster
    cluster.stop()
