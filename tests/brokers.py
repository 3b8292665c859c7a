"""Brokers that tests and benchmarks start and kill themselves: a free port, a NATS cluster.

Kept out of ``conftest.py`` so that ``bench/chaos.py`` runs its cluster mode on exactly the
cluster the tests use."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on right now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsCluster:
    """A 3-node NATS cluster with JetStream and MQTT on loopback (Debian's ``nats-server``; .ci/setup
    installs it): a clustered MQTT 3.1.1 broker whose sessions, retained messages, wills and QoS-1
    state live in JetStream streams replicated over the nodes. Tests can SIGKILL a node and start
    it again."""

    def __init__(self, root: Path, nodes: int = 3) -> None:
        if shutil.which("nats-server") is None:
            raise RuntimeError("the nats-server binary is missing: run .ci/setup (apt-get install -y nats-server)")
        self.root = root
        ports = [(free_port(), free_port(), free_port(), free_port()) for _ in range(nodes)]
        self.mqtt_ports = [p[2] for p in ports]
        self.monitor_ports = [p[3] for p in ports]
        routes = ", ".join(f"nats-route://127.0.0.1:{p[1]}" for p in ports)
        self.confs = []
        for i, (client, cluster, mqtt, monitor) in enumerate(ports, start=1):
            conf = root / f"n{i}.conf"
            conf.write_text(
                f"server_name: n{i}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n"
                f'jetstream {{ store_dir: "{root / f"js{i}"}" }}\n'
                f"cluster {{ name: edgesdk, listen: 127.0.0.1:{cluster}, routes: [{routes}] }}\n"
                f"mqtt {{ listen: 127.0.0.1:{mqtt}, stream_replicas: {min(3, nodes)} }}\n")
            self.confs.append(conf)
        self.procs: list[subprocess.Popen | None] = [None] * nodes

    def restart(self, node: int) -> None:
        """Start a killed node again (same store), and wait until the cluster answers."""
        self.start(node)

    def url(self, *nodes: int) -> str:
        """``mqtt://`` URL of the given nodes (0-based), in order: the first, then the others to fail over to."""
        return "mqtt://" + ",".join(f"127.0.0.1:{self.mqtt_ports[i]}" for i in nodes)

    def start(self, *nodes: int) -> "NatsCluster":
        for i in nodes or range(len(self.confs)):
            log = self.root / f"n{i + 1}.log"
            self.procs[i] = subprocess.Popen(["nats-server", "-c", str(self.confs[i]), "-l", str(log)],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()
        return self

    def _json(self, node: int, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_ports[node]}{path}", timeout=2) as r:
            return json.load(r)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Every running node answers MQTT and sees a JetStream meta leader."""
        deadline = time.monotonic() + timeout
        running = [i for i, p in enumerate(self.procs) if p is not None]
        while time.monotonic() < deadline:
            try:
                for i in running:
                    socket.create_connection(("127.0.0.1", self.mqtt_ports[i]), timeout=0.5).close()
                    if not self._json(i, "/jsz").get("meta_cluster", {}).get("leader"):
                        raise OSError("no JetStream meta leader yet")
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the NATS cluster did not come up: " + " | ".join(
            (self.root / f"n{i + 1}.log").read_text(errors="replace")[-600:] for i in running))

    def kill(self, node: int) -> None:
        """SIGKILL one node, as a crash."""
        p = self.procs[node]
        if p is not None:
            p.kill()
            p.wait(10)
            self.procs[node] = None

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)
