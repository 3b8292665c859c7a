"""The IPC floor for agent_bench: the least a cross-process inference can cost on this machine.

A server process with one interpreter (threads as the agent's) that takes a shared-memory region
(memfd over ``SCM_RIGHTS``) and then, per 16-byte request, does ``set_tensor`` from the region,
``invoke()``, ``get_tensor`` and one ``sendmsg`` of a 16-byte header plus the output bytes: no
framing, no checks, no pool, no statistics. Whatever the agent's socket path costs beyond this
row in the same run is edgesdk's own; what this row costs beyond a bare ``invoke()`` is the
machine's (two process wake-ups, the input crossing cores).

    python bench/ipc_floor.py --bundle B.edgebundle --socket /tmp/floor.sock [--threads 2]
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADER = 16


def serve(bundle: str, socket_path: str, threads: int) -> None:
    from sdk.bundle import Bundle
    from sdk.runtime import DelegateOptions, open_engine

    engine = open_engine(Bundle.open(bundle).model_bytes(), "cpu", DelegateOptions(num_threads=threads))
    it = engine.interpreter
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(1)
    conn, _ = listener.accept()
    _, fds, _, _ = socket.recv_fds(conn, 1, 1)
    size = int(np.prod(inp["shape"])) * np.dtype(inp["dtype"]).itemsize
    region = mmap.mmap(fds[0], size)
    x = np.frombuffer(region, dtype=inp["dtype"], count=int(np.prod(inp["shape"]))).reshape(inp["shape"])
    request = bytearray(HEADER)
    header = bytes(HEADER)
    while conn.recv_into(request) == HEADER:
        it.set_tensor(inp["index"], x)
        it.invoke()
        y = it.get_tensor(out["index"])
        conn.sendmsg([header, memoryview(y).cast("B")])


class FloorClient:
    """The client side: the input is written into the region once (like ``AgentClient.buffer``)."""

    def __init__(self, socket_path: str, x: np.ndarray, out_nbytes: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        fd = os.memfd_create("ipc-floor")
        os.ftruncate(fd, x.nbytes)
        self.region = mmap.mmap(fd, x.nbytes)
        np.frombuffer(self.region, dtype=x.dtype, count=x.size)[:] = x.ravel()
        socket.send_fds(self.sock, [b"F"], [fd])
        os.close(fd)
        self.reply = bytearray(HEADER + out_nbytes)
        self.request = bytes(HEADER)

    def __call__(self) -> bytearray:
        self.sock.sendall(self.request)
        view, got = memoryview(self.reply), 0
        while got < len(self.reply):
            got += self.sock.recv_into(view[got:])
        return self.reply

    def close(self) -> None:
        self.sock.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    serve(args.bundle, args.socket, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
