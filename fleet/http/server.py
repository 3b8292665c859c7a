"""Serving the application: uvicorn in a background thread of the fleet's process.

:func:`parse_listen` reads ``HOST:PORT`` (``[::1]:8080`` for IPv6; port 0 picks a free one).
:class:`ApiServer` checks everything before the fleet starts (the token rule, the TLS files, the
port free), then serves an application from its own thread until :meth:`ApiServer.stop`: the
controller's engine and the HTTP server share the process and the fleet's database, nothing else.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from typing import Any, Optional

from sdk.errors import ConfigError

__all__ = ["ApiServer", "parse_listen", "is_loopback"]


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ConfigError when malformed."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--http {value!r}: give HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); a name is resolved."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


class ApiServer:
    """An application (:meth:`start`) served on ``host:port`` (TLS with ``tls_cert``/``tls_key``)
    from a background thread.

    ``token_required``: whether the app checks a token; without one, only a loopback address is
    accepted. The TLS files are loaded and the socket bound here, so a refusal, bad TLS files or
    a busy port fail before anything starts (``serve`` makes this before it starts the fleet)."""

    def __init__(self, host: str, port: int, *, token_required: bool, tls_cert: Optional[str] = None,
                 tls_key: Optional[str] = None) -> None:
        if not token_required and not is_loopback(host):
            raise ConfigError(f"--http {host}:{port} is reachable from other machines, so the API needs a token: "
                              "give --api-token-file FILE (make one with  head -c 32 /dev/urandom | base64 > FILE), "
                              "or listen on 127.0.0.1")
        if bool(tls_cert) != bool(tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if tls_cert:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls_cert, tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot use --tls-cert {tls_cert} / --tls-key {tls_key}: {exc}: give a PEM "
                                  "certificate and its private key") from exc
        self.tls_cert, self.tls_key = tls_cert, tls_key
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}: choose another --http address") from exc
        self.host, self.port = host, self._socket.getsockname()[1]
        self.app: Any = None
        self._server: Any = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls_cert else 'http'}://{host}:{self.port}"

    def start(self, app: Any, timeout: float = 10.0) -> "ApiServer":
        """Serve ``app`` (from :func:`~fleet.http.create_app`); returns once it accepts connections."""
        import uvicorn

        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", ssl_certfile=self.tls_cert,
                                ssl_keyfile=self.tls_key, timeout_graceful_shutdown=2, server_header=False)
        self.app, self._server = app, uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="edgesdk-fleet-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the HTTP server on {self.url} did not start (its log says why)")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """End the event streams, then the server (open requests get 2 s to finish)."""
        if self.app is not None:
            self.app.state.closing.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self._socket.close()
