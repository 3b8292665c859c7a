"""The one module that imports paho-mqtt: a connection that reconnects, never blocks paho's
network thread, and never publishes a message the broker would refuse.

What it takes care of (see ``shared/notes/mqtt.md`` for why each matters):

* paho 2.x, MQTT 5 where the broker speaks it, else MQTT 3.1.1 (amqtt): ``protocol="auto"``
  probes once with v5 and falls back; the wire protocol uses nothing v5-only.
* Callbacks run on paho's single network thread, so incoming messages are handed to a worker
  thread; an exception in a handler is logged and the loop lives on.
* Subscriptions are (re)made in ``on_connect``, so they survive reconnects.
* paho ignores the broker's Maximum Packet Size and an oversized QoS-1 publish loops forever:
  :meth:`MqttConnection.publish` checks the size first (the broker's limit when it announces
  one, else ``max_packet_size``) and raises :class:`~sdk.errors.BrokerError` instead.
* ``TCP_NODELAY`` on the socket (paho leaves Nagle on, which adds up to 40 ms per exchange).
* A persistent session (``clean_start=False`` + session expiry on v5, ``clean_session=False``
  on 3.1.1) so QoS-1 commands sent while a device was briefly away are still delivered.
* Several brokers (the nodes of a clustered broker: ``mqtt://node1:1883,node2:1883``): the
  connection uses the first and, whenever it loses or cannot reach one, tries the next in turn.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from .deps import require
from .errors import BrokerError

log = logging.getLogger("edgesdk.mqtt")

__all__ = ["MqttSettings", "MqttConnection", "probe_protocol"]

Handler = Callable[[str, bytes], None]

#: what a broker URL looks like (error messages)
BROKER_URL_USAGE = "use mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (a cluster's nodes: mqtt://HOST:PORT,HOST:PORT)"


def _paho(extra: str | tuple[str, ...]):
    return require("paho.mqtt.client", extra, "to talk to the MQTT broker")


@dataclass
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    tls: bool = False
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""
    username: str = ""
    password: str = ""
    keepalive: int = 30
    protocol: str = "auto"  # "auto" | "5" | "3.1.1"
    persistent_session: bool = True
    session_expiry: int = 24 * 3600
    max_packet_size: int = 256 * 1024
    #: more brokers to fail over to, in order, after (host, port): nodes of one clustered broker
    fallbacks: tuple[tuple[str, int], ...] = ()
    #: the extra that brings paho-mqtt to whoever connects (the agent passes "agent", the fleet
    #: "fleet"), named in the error when it is missing
    extra: str | tuple[str, ...] = ("agent", "fleet")

    @property
    def brokers(self) -> list[tuple[str, int]]:
        """Every broker this connection may use, in the order it tries them."""
        return [(self.host, self.port), *self.fallbacks]

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> "MqttSettings":
        """Settings for ``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]`` (TLS), or several
        brokers of one cluster, ``mqtt://HOST[:PORT],HOST[:PORT],...``; plus any field."""
        from urllib.parse import urlparse

        from .errors import ConfigError

        usage = f"broker URL {url!r}: {BROKER_URL_USAGE}"
        scheme, sep, rest = url.partition("://")
        if scheme not in ("mqtt", "mqtts") or not sep:
            raise ConfigError(usage)
        tls = scheme == "mqtts"
        credentials, _, hosts = rest.rpartition("@")
        brokers = []
        for part in hosts.rstrip("/").split(","):
            try:
                u = urlparse(f"{scheme}://{part}")
                port = u.port
            except ValueError as exc:
                raise ConfigError(f"{usage} ({exc})") from exc
            if not u.hostname or u.path or u.query:
                raise ConfigError(usage)
            brokers.append((u.hostname, port or (8883 if tls else 1883)))
        fields: dict[str, object] = {"host": brokers[0][0], "port": brokers[0][1], "tls": tls,
                                     "fallbacks": tuple(brokers[1:])}
        if credentials:
            from urllib.parse import unquote

            user, _, password = credentials.partition(":")
            fields.update(username=unquote(user), password=unquote(password))
        fields.update({k: v for k, v in kwargs.items() if v not in (None, "")})
        return cls(**fields)  # type: ignore[arg-type]


def _protocol_const(mqtt, protocol: str) -> int:
    return mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311


def probe_protocol(settings: MqttSettings, timeout: float = 5.0, broker: Optional[tuple[str, int]] = None) -> str:
    """Connect once with MQTT 5 (to ``broker``, default the first); ``"3.1.1"`` if the broker
    refuses the protocol version."""
    mqtt = _paho(settings.extra)
    result: dict[str, object] = {}
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
    _configure_auth(client, settings)

    def on_connect(c, userdata, flags, reason_code, properties):
        result["connack"] = reason_code
        done.set()

    def on_disconnect(c, userdata, flags, reason_code, properties):
        done.set()

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    host, port = broker or (settings.host, settings.port)
    try:
        client.connect(host, port, keepalive=10)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"cannot reach the MQTT broker at {host}:{port}: {exc}") from exc
    client.loop_start()
    done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    connack = result.get("connack")
    if connack is None:
        return "3.1.1"  # closed without a CONNACK, as MQTT 3.1.1-only brokers (amqtt) answer a v5 CONNECT
    # any CONNACK means the broker speaks v5 (a refusal for credentials is for the real connect to report),
    # except "Unsupported protocol version" (0x84)
    return "3.1.1" if getattr(connack, "value", 0) == 0x84 else "5"


def _configure_auth(client, s: MqttSettings) -> None:
    if s.username:
        client.username_pw_set(s.username, s.password or None)
    if s.tls:
        try:
            client.tls_set(ca_certs=s.ca_file or None, certfile=s.client_cert or None, keyfile=s.client_key or None)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise BrokerError(f"TLS setup failed ({exc}): check ca_file, client_cert and client_key") from exc


def _no_delay(client) -> None:
    """paho leaves Nagle's algorithm on: a small publish then waits for the ACK of the previous
    one (up to 40 ms with delayed ACKs), which caps a request/response exchange at ~20/s."""
    try:
        sock = client.socket()
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:
        log.debug("could not set TCP_NODELAY: %s", exc)


class MqttConnection:
    """A long-lived, self-reconnecting MQTT connection.

    ``handler(topic, payload)`` runs on a worker thread for every message on ``subscriptions``.
    ``on_connected`` (also on the worker thread) runs after every (re)connect, once the broker
    has acknowledged the subscriptions. ``connected`` is set at the same moment, so "connected"
    always means "connected and hearing its topics": a message published to it after that is
    not lost to a subscription still in flight.
    """

    def __init__(
        self,
        settings: MqttSettings,
        handler: Handler,
        subscriptions: Iterable[tuple[str, int]] = (),
        *,
        will: Optional[tuple[str, bytes, int, bool]] = None,
        on_connected: Optional[Callable[[], None]] = None,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.subscriptions = list(subscriptions)
        self.will = will
        self.on_connected = on_connected
        self.connected = threading.Event()
        self.protocol = settings.protocol
        self.broker_max_packet: Optional[int] = None
        self._work: "queue.Queue[Optional[tuple[str, object]]]" = queue.Queue()
        self._worker: Optional[threading.Thread] = None
        self._client = None
        self._closing = False
        self.connects = 0
        self._subscribe_mid: Optional[int] = None
        self._broker = 0  # index into settings.brokers of the broker in use
        self._connect_kwargs: dict = {}

    @property
    def broker(self) -> tuple[str, int]:
        """The broker (host, port) this connection uses now."""
        return self.settings.brokers[self._broker]

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "MqttConnection":
        """Start the worker and connect in the background (the broker may be down: it retries)."""
        self._worker = threading.Thread(target=self._work_loop, name="edgesdk-mqtt-worker", daemon=True)
        self._worker.start()
        if self.protocol != "auto":
            self._connect(self.protocol)
            return self
        try:
            self._connect(self._probe_each())
        except BrokerError as exc:
            # No broker is reachable now, so the protocol is unknown: keep probing until one
            # answers, then connect with what it speaks (an MQTT 3.1.1 broker refuses v5 for good).
            log.warning("%s; retrying", exc)
            threading.Thread(target=self._probe_until_reachable, name="edgesdk-mqtt-probe", daemon=True).start()
        return self

    def _probe_each(self) -> str:
        """The protocol of the first broker, in turn from the current one, that answers."""
        brokers = self.settings.brokers
        for _ in range(len(brokers)):
            try:
                return probe_protocol(self.settings, broker=self.broker)
            except BrokerError:
                if len(brokers) == 1:
                    raise
                self._broker = (self._broker + 1) % len(brokers)
        raise BrokerError("cannot reach any of the MQTT brokers " + ", ".join(f"{h}:{p}" for h, p in brokers))

    def _probe_until_reachable(self) -> None:
        while not self._closing:
            try:
                protocol = self._probe_each()
            except BrokerError:
                time.sleep(2.0)
                continue
            if not self._closing:
                self._connect(protocol)
            return

    def _connect(self, protocol: str) -> None:
        mqtt = _paho(self.settings.extra)
        self.protocol = protocol
        proto = _protocol_const(mqtt, protocol)
        kwargs = {"client_id": self.settings.client_id, "protocol": proto}
        if proto == mqtt.MQTTv311:
            kwargs["clean_session"] = not self.settings.persistent_session
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        _configure_auth(client, self.settings)
        if self.will:
            topic, payload, qos, retain = self.will
            client.will_set(topic, payload, qos=qos, retain=retain)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        connect_kwargs = {"keepalive": self.settings.keepalive}
        if proto == mqtt.MQTTv5:
            props = mqtt.Properties(require("paho.mqtt.packettypes", self.settings.extra).PacketTypes.CONNECT)
            if self.settings.persistent_session:
                props.SessionExpiryInterval = self.settings.session_expiry
            connect_kwargs["clean_start"] = not self.settings.persistent_session
            connect_kwargs["properties"] = props
        self._connect_kwargs = connect_kwargs
        host, port = self.broker
        try:
            client.connect_async(host, port, **connect_kwargs)
        except (OSError, socket.gaierror) as exc:
            raise BrokerError(f"cannot reach the MQTT broker at {host}:{port}: {exc}") from exc
        self._client = client
        client.loop_start()

    def stop(self, *, publish_before: Optional[tuple[str, bytes, int, bool]] = None, timeout: float = 5.0) -> None:
        """Disconnect cleanly (optionally publishing one last message, e.g. retained 'offline')."""
        self._closing = True
        client = self._client
        if client is not None:
            if publish_before and self.connected.is_set():
                info = client.publish(*publish_before)
                try:
                    info.wait_for_publish(timeout)
                except (RuntimeError, ValueError):
                    pass
            client.disconnect()
            client.loop_stop()
        self._work.put(None)
        if self._worker is not None:
            self._worker.join(timeout)

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    # --- publishing ---------------------------------------------------------------------------
    @property
    def max_packet(self) -> int:
        return min(self.settings.max_packet_size, self.broker_max_packet or self.settings.max_packet_size)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Queue a publish; return its message id. Raises BrokerError when it is too large or
        when the client is not connected (the caller keeps the message and retries)."""
        size = len(payload) + len(topic.encode()) + 16
        if size > self.max_packet:
            raise BrokerError(
                f"message of {size} bytes on {topic} exceeds the broker's maximum packet size of {self.max_packet}"
            )
        client = self._client
        if client is None or not self.connected.is_set():
            raise BrokerError("not connected to the MQTT broker")
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != 0:
            raise BrokerError(f"publish on {topic} failed (paho rc {info.rc})")
        return info.mid

    # --- paho callbacks: network thread, never block -------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if getattr(reason_code, "is_failure", False):
            log.warning("broker refused the connection: %s", reason_code)
            return
        _no_delay(client)
        maximum = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self.broker_max_packet = int(maximum) if maximum else None
        if self.subscriptions:
            _rc, self._subscribe_mid = client.subscribe(self.subscriptions)
            return  # ready once the broker acknowledges them (_on_subscribe)
        self._ready()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [str(rc) for rc in reason_codes if getattr(rc, "is_failure", False)]
        if refused:  # an ACL that denies a topic: say so, and work with what was granted
            log.warning("the broker refused %d of %d subscriptions (%s); check this client's ACL",
                        len(refused), len(reason_codes), ", ".join(refused))
        self._ready()

    def _ready(self) -> None:
        self.connects += 1
        self.connected.set()
        log.info("connected to %s:%s (MQTT %s)", *self.broker, self.protocol)
        self._work.put(("__connected__", b""))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._closing:
            log.warning("disconnected from the broker at %s:%s (%s); reconnecting", *self.broker, reason_code)
            self._next_broker(client)

    def _on_connect_fail(self, client, userdata) -> None:
        if not self._closing:
            self._next_broker(client)

    def _next_broker(self, client) -> None:
        """Reconnect to the next broker of the list (a clustered broker's next node); paho's
        loop makes the attempt, after its back-off."""
        brokers = self.settings.brokers
        if len(brokers) < 2:
            return
        self._broker = (self._broker + 1) % len(brokers)
        try:
            client.connect_async(*self.broker, **self._connect_kwargs)
        except (OSError, ValueError) as exc:
            log.warning("cannot switch to the broker at %s:%s: %s", *self.broker, exc)

    def _on_message(self, client, userdata, msg) -> None:
        self._work.put((msg.topic, bytes(msg.payload)))

    def _work_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            topic, payload = item
            try:
                if topic == "__connected__":
                    if self.on_connected:
                        self.on_connected()
                else:
                    self.handler(topic, payload)  # type: ignore[arg-type]
            except Exception:  # a handler bug must not stop message processing
                log.exception("handler failed for a message on %s", topic)
