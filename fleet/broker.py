"""An embedded MQTT broker on a free loopback port, for ``edgesdk demo`` and local trials.

The ``mosquitto`` binary when it is installed (a generated configuration: one loopback
listener, ``set_tcp_nodelay``, no persistence), else amqtt in-process (pure Python, MQTT 3.1.1,
``pip install amqtt``). Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from sdk.errors import BrokerError

__all__ = ["EmbeddedBroker", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


class EmbeddedBroker:
    def __init__(self, kind: str = "auto", port: Optional[int] = None, *, defaults: bool = False) -> None:
        """``defaults``: Mosquitto with its own queue limits (as installed), not the raised one."""
        if kind == "auto":
            kind = "mosquitto" if shutil.which("mosquitto") else "amqtt"
        if kind not in ("mosquitto", "amqtt"):
            raise BrokerError(f"unknown embedded broker {kind!r}: mosquitto or amqtt")
        self.kind = kind
        self.port = port or free_port()
        self.defaults = defaults
        self._proc: Optional[subprocess.Popen] = None
        self._dir: Optional[tempfile.TemporaryDirectory] = None
        self._loop = None
        self._thread: Optional[threading.Thread] = None
        self._broker = None

    @property
    def pid(self) -> Optional[int]:
        """The mosquitto process id (None for the in-process amqtt broker)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "EmbeddedBroker":
        if self.kind == "mosquitto":
            self._dir = tempfile.TemporaryDirectory(prefix="edgesdk-broker-")
            conf = Path(self._dir.name) / "mosquitto.conf"
            conf.write_text(f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\nset_tcp_nodelay true\n"
                            "allow_anonymous true\npersistence false\n"
                            + ("" if self.defaults else "max_queued_messages 100000\n"))
            self._proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
        else:
            self._start_amqtt()
        if not _wait_listening(self.port, 20):
            self.stop()
            raise BrokerError(f"the embedded {self.kind} broker did not start on 127.0.0.1:{self.port}")
        return self

    def _start_amqtt(self) -> None:
        import asyncio

        from sdk.deps import require

        amqtt_broker = require("amqtt.broker", ("demo", "dev"), "for an embedded MQTT broker without mosquitto")
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._broker = amqtt_broker.Broker(
                {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}}}, loop=self._loop)
            self._loop.run_until_complete(self._broker.start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="edgesdk-amqtt", daemon=True)
        self._thread.start()
        ready.wait(20)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
        if self._loop is not None and self._broker is not None:
            import asyncio

            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(10)
            except Exception:  # amqtt's shutdown can trip over clients still closing; the loop stops anyway
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self._loop = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
