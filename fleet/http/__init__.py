"""The fleet's HTTP surface (``pip install 'edgesdk[fleet]'``): a REST API under ``/api/v1``, a
live dashboard at ``/`` and Prometheus metrics at ``/metrics``, served by ``edgesdk fleet serve
--http HOST:PORT`` from the process that runs the controller.

* :func:`create_app` — the application around a running :class:`fleet.Fleet` (:mod:`.app`);
* :class:`ApiServer` — uvicorn in a background thread, TLS, the loopback rule (:mod:`.server`);
* :class:`FleetMetrics` — what ``/metrics`` shows (:mod:`.metrics`).

Importing :mod:`fleet` does not import this package (nor FastAPI): only ``serve --http`` does.
"""

from .app import create_app
from .auth import read_token
from .metrics import FleetMetrics
from .server import ApiServer, is_loopback, parse_listen
from .uploads import MIB, UploadLimits

__all__ = ["create_app", "ApiServer", "FleetMetrics", "UploadLimits", "read_token", "parse_listen",
           "is_loopback", "MIB"]
