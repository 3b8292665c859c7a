"""Servers that tests and benchmarks start and kill themselves: a free port, a NATS cluster, a
PostgreSQL server.

Kept out of ``conftest.py`` so that ``bench/chaos.py`` runs its cluster mode on exactly the
cluster the tests use, and so that a test can start a private PostgreSQL of its own."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
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


class PostgresServer:
    """A PostgreSQL server for the fleet's tests: the one answering on ``$EDGESDK_TEST_PG_URL``
    (default ``postgresql://postgres@127.0.0.1:5432/postgres``) when it does, else a private
    instance made with ``initdb`` and started with ``pg_ctl`` on a free loopback port (set
    ``EDGESDK_TEST_PG=private`` to always make one). Each test gets a database of its own
    (:meth:`create_database`), dropped after it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.private = False
        self._own_root = False  # a directory made for the server, removed when it stops
        self.admin_url = os.environ.get("EDGESDK_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
        if os.environ.get("EDGESDK_TEST_PG") == "private" or not self._answers(self.admin_url):
            self._start_private()

    @staticmethod
    def _answers(url: str) -> bool:
        import psycopg

        try:
            psycopg.connect(url, connect_timeout=3).close()
            return True
        except psycopg.Error:
            return False

    def _as_owner(self) -> list[str]:
        """initdb and postgres refuse to run as root: run them as the ``postgres`` user (Debian's
        package makes it) or ``nobody``, owning the data directory."""
        if os.geteuid() != 0:
            return []
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None or shutil.which("setpriv") is None:
            raise RuntimeError("a private PostgreSQL needs a non-root user (postgres or nobody) and setpriv (util-linux)")
        entry = pwd.getpwnam(user)
        # pytest's own temporary tree is root's alone (mode 0700): that user could not reach a
        # directory inside it, so the server gets one of its own under the system's temp dir
        self.root = Path(tempfile.mkdtemp(prefix="edgesdk-postgres-"))
        self._own_root = True
        os.chown(self.root, entry.pw_uid, entry.pw_gid)
        return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]

    def _start_private(self) -> None:
        tools = [p for p in ("initdb", "pg_ctl") if shutil.which(p)]
        bindir = "" if len(tools) == 2 else next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"))), "")
        if len(tools) < 2 and not bindir:
            raise RuntimeError("no PostgreSQL answers and initdb/pg_ctl are missing: run .ci/setup "
                               "(apt-get install -y postgresql)")
        exe = (lambda name: os.path.join(bindir, name)) if bindir else (lambda name: name)
        self.private = True
        self.port = free_port()
        prefix = self._as_owner()  # may move self.root (see there)
        self.data = self.root / "data"
        made = subprocess.run([*prefix, exe("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                               "-E", "UTF8"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed for a private PostgreSQL in {self.root}: {made.stderr.strip()[-2000:]}")
        subprocess.run([*prefix, exe("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-w",
                        "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off",
                        "start"], check=True, stdout=subprocess.DEVNULL)
        self._stop = [*prefix, exe("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        deadline = time.monotonic() + 30
        while not self._answers(self.admin_url):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the private PostgreSQL did not start: {(self.root / 'postgres.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def url(self, database: str) -> str:
        return self.admin_url.rsplit("/", 1)[0] + "/" + database

    def create_database(self) -> str:
        import psycopg

        name = "edgesdk_test_" + uuid.uuid4().hex[:10]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        from fleet.storage import close_storage

        close_storage(url)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def stop(self) -> None:
        if self.private:
            subprocess.run(self._stop, check=False, stdout=subprocess.DEVNULL)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
